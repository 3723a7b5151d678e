"""Linear layers on prepacked oneDNN weights, for float32 inference on CPU.

PyTorch's ``F.linear`` on CPU is an MKL sgemm that packs the whole weight matrix on every call.
For the few rows a decode step or a k+1-token verify has, that packing is most of the work: on
this project's 2-vCPU AVX2 machines a [5, 1536] x [1536, 8960] linear takes ~20 ms, ~3.5x one
row, although the weights (the real cost of a memory-bound step) are read once either way. With
the weight reordered once into oneDNN's blocked layout (what ``torch.compile``'s CPU freezing
does), 5 rows cost ~1.3x one row and one row is faster too (SmolLM2's 49k x 576 lm_head: 15 ->
9 ms). That is what makes verifying k+1 tokens nearly as cheap as decoding one, which
speculative decoding needs. Results agree with ``F.linear`` to float32 rounding (~1e-6
relative), not bit for bit.

Only for frozen float32 models on CPU (oneDNN's bfloat16 reorder needs AVX512-BF16 or AVX-NE-
CONVERT, and packed weights have no autograd). ``pack_linears`` swaps modules in place, so use it
on a model the caller owns (``load_session`` does, for its own copy).
"""

from __future__ import annotations

import torch
from torch import nn


def available(model: nn.Module) -> bool:
    """True when this model's linears can be packed: float32 weights on CPU, a oneDNN build."""
    p = next(model.parameters(), None)
    return (p is not None and p.device.type == "cpu" and p.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class PackedLinear(nn.Module):
    """``nn.Linear`` for inference on a oneDNN-packed copy of the weight. ``weight`` is kept when
    another module shares it (tied input embeddings); otherwise it becomes a meta tensor of the
    same shape and dtype, so the packed copy replaces the original instead of doubling memory."""

    def __init__(self, linear: nn.Linear, keep_weight: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        self._packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        self.bias = None if linear.bias is None else linear.bias.detach()
        # the original when shared; else shape/dtype only (a meta tensor, not a parameter)
        self.weight = linear.weight if keep_weight else torch.empty_like(w, device="meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, packed"


def _linears(module: nn.Module):
    """(parent, attribute name, nn.Linear) for every plain ``nn.Linear`` under ``module``."""
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            yield module, name, child
        else:
            yield from _linears(child)


def pack_linears(root: nn.Module, keep_weights: bool = False) -> int:
    """Replace every ``nn.Linear`` under ``root`` with a PackedLinear; returns how many.
    ``keep_weights``: keep every original weight (for a caller that will put them back)."""
    shared = {id(p) for m in root.modules() if type(m) is not nn.Linear for p in m.parameters(recurse=False)}
    n = 0
    for parent, name, child in list(_linears(root)):
        setattr(parent, name, PackedLinear(child, keep_weight=keep_weights or id(child.weight) in shared))
        n += 1
    return n
