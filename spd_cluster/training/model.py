"""Stage 2, model: the heads and the frozen readout they are trained through.

Only the heads' ResBlocks train; the loss goes through the target's own lm_head, frozen
(``Readout``). With ``vocab="seen"`` the softmax runs over the tokens that occur in the training
targets only (the full 150k-token lm_head would dominate CPU time), and the heads keep that set
as ``head_vocab``: at inference they propose from it alone.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..sessions.heads import TurboHeads
from .data import IGNORE, TrainSettings


def new_heads(model, s: TrainSettings, heads: TurboHeads | None = None) -> TurboHeads:
    """``heads`` (given, e.g. ``--init``) or fresh ones for ``model``, float32 on its device,
    in training mode (each head starts as the identity: it guesses the base model's next token)."""
    device = next(model.parameters()).device
    if heads is None:
        heads = TurboHeads(model.config.hidden_size, s.num_heads, s.num_layers)
    return heads.to(device=device, dtype=torch.float32).train()


class Readout:
    """The frozen lm_head (weight, bias, softcap) restricted to a vocabulary subset (or not)."""

    def __init__(self, model, vocab_ids: np.ndarray | None, device):
        head = model.get_output_embeddings()
        w = head.weight.detach()
        b = getattr(head, "bias", None)
        self.vocab_size = int(w.shape[0])
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        if vocab_ids is not None:
            sel = torch.from_numpy(vocab_ids).to(w.device)
            w, b = w[sel], (b.detach()[sel] if b is not None else None)
            self.index = np.full(self.vocab_size, IGNORE, dtype=np.int64)
            self.index[vocab_ids] = np.arange(len(vocab_ids))
        else:
            self.index = None
        self.weight = w.to(device=device, dtype=torch.float32)
        self.bias = b.detach().to(device=device, dtype=torch.float32) if b is not None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.weight, self.bias)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def map(self, targets: np.ndarray) -> np.ndarray:
        """Token ids -> column indices (IGNORE stays IGNORE; tokens outside the subset too)."""
        if self.index is None:
            return targets
        return np.where(targets >= 0, self.index[np.clip(targets, 0, None)], IGNORE)


_Readout = Readout  # the name before the package split
