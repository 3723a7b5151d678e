"""bfloat16 linears on the CPU through our own AVX2 kernel: fast at few rows, and batch invariant.

On a CPU without AVX512-BF16 / AMX / AVX-NE-CONVERT (this project's AMD EPYC machines), PyTorch's
bfloat16 ``F.linear`` and oneDNN both fall back to code whose cost grows with the row count: a
[5, 1536] x [1536, 8960] linear costs ~3.6x one row, so a k + 1-token verify costs several decode
steps and speculation cannot pay in bfloat16. ``kernels/bf16_linear.cpp`` reads each weight row
from memory once per call, widens it to float32 in registers (bf16 is the high half of a float32)
and applies it to all rows with FMAs: five rows cost ~1.3x one row, and one row runs at memory
speed. It is also batch invariant (a row's result does not depend on which other rows share the
call), so a verify forward computes exactly what k + 1 decode steps would, linear for linear.
That is why it is used on CPUs with native bfloat16 too (AVX512-BF16): PyTorch's bfloat16 linears
there are not batch invariant, and a verify's argmax can then differ from a decode step's (seen
on Qwen2.5-Coder-1.5B: speculation stopped returning the target-only tokens).

The extension is compiled on first use with the system C++ compiler through
``torch.utils.cpp_extension`` (a minute, cached under ``~/.cache/torch_extensions``). Where
that fails, or the CPU lacks AVX2/FMA, ``available`` is False and models keep PyTorch's linears. Inference only: no autograd.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch
from torch import nn

KERNELS = Path(__file__).resolve().parent / "kernels"
SOURCES = ("bf16_linear.cpp", "bf16_linear.h", "attention.h")
_ext, _error = None, None


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
    return _ext


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight.detach(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, avx2-bf16"


def use_kernel(root: nn.Module) -> int:
    """Replace every bfloat16 ``nn.Linear`` under ``root`` with a Bf16Linear; returns how many."""
    from .packed import _linears

    n = 0
    for parent, name, child in list(_linears(root)):
        if child.weight.dtype == torch.bfloat16:
            setattr(parent, name, Bf16Linear(child))
            n += 1
    return n
