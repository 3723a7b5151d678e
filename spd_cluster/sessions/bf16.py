"""bfloat16 linears on the CPU through our own kernel: fast at few rows, and batch invariant.

PyTorch's bfloat16 ``F.linear`` and oneDNN cost more with every row on a CPU without native
bfloat16 (a [5, 1536] x [1536, 8960] linear costs ~3.6x one row on an AVX2 EPYC), and on a CPU
with it they are not batch invariant: a verify's argmax can differ from a decode step's (seen on
Qwen2.5-Coder-1.5B: speculation stopped returning the target-only tokens). ``kernels/`` reads
each weight row from memory once per call and applies it to all the call's rows while it sits
in registers and L1, so a verify of a few tokens costs about what a one-row decode step costs
(memory-bound), and every output element is summed in one fixed order whatever the rows: a row's
result does not depend on which other rows share the call, so a verify forward computes exactly
what k + 1 decode steps would, linear for linear.

Two sets of tiles compute the same sums, picked at run time by the CPU (``isa()``):

* ``"avx2"`` (``kernels/bf16_linear.h``, any AVX2 + FMA CPU): the weights widened to float32 in
  registers (bf16 is the high half of a float32), float32 FMAs into 8-lane accumulators, up to 5
  activation rows a pass. On Qwen2.5-Coder-1.5B it made a verify flat to 4 tokens, then linear
  (98, 99, 99, 99, 127, 161, 187, 187 ms at widths 1..8): compute-bound past 4 rows.
* ``"avx512-bf16"`` (``kernels/bf16_avx512.h``, CPUs with AVX512-BF16: these AMD EPYC machines),
  for bfloat16 activations: ``vdpbf16ps`` does two exact bf16 products and their two float32 adds
  per lane per instruction, 32 per zmm, twice the AVX2 tiles' work per instruction, and up to 8
  activation rows a pass, so a verify of up to 8 tokens reads each weight once and stays near the
  memory-bound decode step: on Qwen2.5-Coder-1.5B a verify of 8 costs 1.17-1.28x a decode step
  (1.84x on the AVX2 tiles) and the decode step ~31% less (docs/cpu-kernel.md). With the weight words rotated
  and the activations' pairs swapped it adds the products in the AVX2 tiles' order: the result is
  the AVX2 kernel's bit for bit, except where an input, a product or a partial sum is subnormal
  (below 2^-126, which ``vdpbf16ps`` flushes to zero). Float32 activations keep the AVX2 tiles.

A prefill needs neither batch invariance nor few-row speed: no decode step has to match its
bits, and its calls are wide, where a kernel that reads each weight once per 8 rows is
compute-bound and oneDNN's blocked GEMM is not.
Where the tiles are AVX512-BF16 (the CPU has native bfloat16, which oneDNN uses too), a session's
prefill calls run inside ``library_linears()``, and the Bf16Linear modules take PyTorch's own
``F.linear`` there (docs/cpu-kernel.md, "Prefill"). On AVX2 tiles they keep the kernel:
PyTorch's bfloat16 GEMM without native bfloat16 is slower than the tiles even at a prefill's width.

The choice of tiles is made once per process, never per call, so a decode step and a verify on one machine
always run the same instructions; ``SPD_BF16_ISA=avx2`` in the environment (or ``set_isa``) keeps
the AVX2 tiles. The AVX512 tiles are compiled with target attributes, not ``-mavx512*``, so the
extension builds and loads on AVX2-only CPUs too.

The extension is compiled on first use with the system C++ compiler through
``torch.utils.cpp_extension`` (a minute or two, cached under ``~/.cache/torch_extensions`` by a
digest of ``SOURCES``). Where that fails, or the CPU lacks AVX2/FMA, ``available`` is False and
models keep PyTorch's linears. Inference only: no autograd.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

KERNELS = Path(__file__).resolve().parent / "kernels"
SOURCES = ("bf16_linear.cpp", "bf16_linear.h", "bf16_avx512.h", "attention.h")
_ext, _error = None, None
_library = ContextVar("spd_bf16_library_linears", default=False)


def kernel_runs() -> bool:
    """The CPU has what the kernel is written for (AVX2 and FMA; AVX512 CPUs have both)."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def extension():
    """The compiled kernel module, building it on first call; None where it cannot be built."""
    global _ext, _error
    if _ext is None and _error is None:
        try:
            from torch.utils.cpp_extension import load

            digest = hashlib.sha1(b"".join((KERNELS / f).read_bytes() for f in SOURCES)).hexdigest()[:12]
            _ext = load(name=f"spd_bf16_linear_{digest}", sources=[str(KERNELS / SOURCES[0])],
                        extra_include_paths=[str(KERNELS)], extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
                        verbose=False)
        except Exception as e:  # no compiler, no ninja, ...: PyTorch's linears stay
            _error = e
            warnings.warn(f"bfloat16 AVX2 kernel unavailable, using PyTorch's bfloat16 linears: {e}", stacklevel=2)
        if _ext is not None and os.environ.get("SPD_BF16_ISA"):
            _ext.set_isa(os.environ["SPD_BF16_ISA"])
    return _ext


def isa() -> str | None:
    """Which tiles bfloat16 activations take in this process: "avx512-bf16" or "avx2" (float32
    activations always take "avx2"); None where the extension is unavailable."""
    ext = extension()
    return None if ext is None else ext.isa()


def set_isa(name: str) -> None:
    """Run later calls on "avx2" or "avx512-bf16" tiles (the latter only where the CPU has
    AVX512-BF16), for the whole process: both compute the same bits, so this is for tests and
    benchmarks. Switching between a decode and a verify would break nothing but is never done."""
    extension().set_isa(name)


def isas() -> list[str]:
    """The tiles this CPU (and compiler) can run."""
    ext = extension()
    if ext is None:
        return []
    now = ext.isa()
    try:
        ext.set_isa("avx512-bf16")
        return ["avx2", "avx512-bf16"]
    except RuntimeError:
        return ["avx2"]
    finally:
        ext.set_isa(now)


def library_prefill() -> bool:
    """Whether prefill calls take PyTorch's own linears in this process (``library_linears``):
    where its tiles are AVX512-BF16."""
    return isa() == "avx512-bf16"


@contextmanager
def library_linears(on: bool = True):
    """Within the block (this thread or task only), Bf16Linear modules compute with PyTorch's
    ``F.linear`` instead of the kernel: for calls whose bits no other call has to reproduce."""
    token = _library.set(on)
    try:
        yield
    finally:
        _library.reset(token)


def available(model: nn.Module) -> bool:
    """True when this model's linears can run on the kernel: bfloat16 weights on an AVX2 CPU, and
    the extension builds."""
    p = next(model.parameters(), None)
    return (p is not None and p.device.type == "cpu" and p.dtype == torch.bfloat16 and kernel_runs()
            and extension() is not None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a bfloat16 [N, K] weight (bias float32 or None): float32
    accumulation, the result in ``x``'s dtype."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    if x.dtype not in (torch.float32, torch.bfloat16):
        flat = flat.float()
    y = extension().bf16_linear(flat.contiguous(), weight.contiguous(), bias)  # in x's dtype where bf16 / f32
    return y.to(x.dtype).view(*shape[:-1], weight.shape[0])


class Bf16Linear(nn.Module):
    """``nn.Linear`` on the kernel. Shares the original weight (tied embeddings stay tied, no copy);
    the bias is kept in float32."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = None if linear.bias is None else linear.bias.detach().float()
        self._bias = None if linear.bias is None else linear.bias.detach()  # PyTorch's linear: the weight's dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _library.get() and x.dtype == self.weight.dtype:
            return F.linear(x, self.weight.detach(), self._bias)
        return linear(x, self.weight.detach(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {isa()}"


def use_kernel(root: nn.Module) -> int:
    """Replace every bfloat16 ``nn.Linear`` under ``root`` with a Bf16Linear; returns how many."""
    from .packed import _linears

    n = 0
    for parent, name, child in list(_linears(root)):
        if child.weight.dtype == torch.bfloat16:
            setattr(parent, name, Bf16Linear(child))
            n += 1
    return n
