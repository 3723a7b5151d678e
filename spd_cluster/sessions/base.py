"""The device-session contract every backend implements.

It has the shape of QEfficient's ``QAICInferenceSession.run``: a dict of numpy arrays in, a dict
of numpy arrays out, with the KV cache living on the device between calls.

Inputs of ``run``:
  input_ids           [B, S] int64
  position_ids        [B, S] int64; -1 marks padding (no KV write, output ignored)
  batch_index         [B, 1] int64; the KV slot of each row (0 <= slot < full_batch_size)
  num_logits_to_keep  how many positions of each row return logits. As in QEfficient's compiled
                      specialisations, an array counts by its first dimension (``np.arange(n)
                      .reshape(-1, 1)`` keeps n); a plain int keeps that many. The kept window
                      ends at the row's last valid (largest-position) token, so with right
                      padding ``logits[:, j]`` belongs to input column ``j`` as long as the
                      row's valid length is <= n.

  argmax              optional bool (default False): return the target's tokens, not its logits:
                      the argmax is taken on the device and only [B, n] ids cross to the host
  head_guesses        optional bool (default True): a session with projection heads computes
                      them in this call; False runs it as a plain session (base outputs only)

Output, without ``argmax``:
  logits  [B, n, vocab] float32, or [B, n, heads + 1, vocab] for a session computing its heads
          (index 0 is the base model; head h predicts the token h + 1 further on).
Output, with ``argmax``:
  tokens       [B, n] int64: the base logits' argmax at each kept column
  head_tokens  [B, heads] int64, head_probs [B, heads] float32 (a session computing its heads):
               each head's argmax and its softmax probability at the kept column where the row's
               greedily verified prefix ends: column a, where kept columns 1..a hold exactly the
               tokens the base model chose after the column before (``verified_column``). Those
               are the guesses for the tokens after the one the row emits last, from this very
               call. (A session whose heads have a ``head_vocab`` takes the argmax over it.)

Cache semantics: slot s holds ``ctx_len`` positions. Writing position p replaces what was there;
a query at position p attends to keys at positions <= p of its own slot only. Rejected
speculative tokens therefore need no rollback and rows may sit at different positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, runtime_checkable

import numpy as np

from .greedy import greedy_accept, greedy_guesses


class SessionInputError(ValueError):
    """Inputs that break the session contract (shapes, slots, positions)."""


@runtime_checkable
class DeviceSession(Protocol):
    full_batch_size: int
    ctx_len: int
    vocab_size: int
    num_heads: int  # projection heads; 0 for a plain session
    eos_token_ids: list[int]  # the model's end-of-sequence ids (may be empty)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class SessionCall:
    """One ``run`` call, typed: what callers build instead of the string-keyed dict, which
    ``as_inputs()`` gives in the contract's shape (the optional fields only where set).

    ``batch_index``: the KV slot of each row, as [B] or [B, 1]; ``num_logits_to_keep``: an int
    or the contract's array (``None``: the contract's default, 1)."""

    input_ids: np.ndarray
    position_ids: np.ndarray
    batch_index: np.ndarray
    num_logits_to_keep: object = None
    argmax: Optional[bool] = None
    head_guesses: Optional[bool] = None

    def as_inputs(self) -> dict[str, np.ndarray]:
        out = {"input_ids": self.input_ids, "position_ids": self.position_ids,
               "batch_index": np.asarray(self.batch_index, dtype=np.int64).reshape(-1, 1)}
        if self.num_logits_to_keep is not None:
            n = self.num_logits_to_keep
            out["num_logits_to_keep"] = n if isinstance(n, np.ndarray) else np.ones((int(n), 1), dtype=np.int64)
        for key in ("argmax", "head_guesses"):
            if getattr(self, key) is not None:
                out[key] = np.array(bool(getattr(self, key)))
        return out


@dataclass(frozen=True)
class CheckedInputs:
    input_ids: np.ndarray
    position_ids: np.ndarray
    batch_index: np.ndarray  # [B]
    num_logits: int
    argmax: bool = False  # return tokens, not logits
    head_guesses: bool = True  # compute the heads (sessions that have them)


def logits_to_keep(value, seq_len: int) -> int:
    if value is None:
        return 1
    if isinstance(value, np.ndarray):
        n = int(value.shape[0]) if value.ndim else int(value)
    else:
        n = int(value)
    if not 1 <= n:
        raise SessionInputError(f"num_logits_to_keep must be >= 1, got {n}")
    return min(n, seq_len)


def check_inputs(inputs: dict[str, np.ndarray], full_batch_size: int, ctx_len: int) -> CheckedInputs:
    """Validate a ``run`` input dict against the contract; raise SessionInputError naming the field."""
    for key in ("input_ids", "position_ids", "batch_index"):
        if key not in inputs:
            raise SessionInputError(f"missing input '{key}'")
    ids = np.asarray(inputs["input_ids"])
    pos = np.asarray(inputs["position_ids"])
    slots = np.asarray(inputs["batch_index"])
    if ids.ndim != 2:
        raise SessionInputError(f"input_ids must be [batch, seq], got shape {ids.shape}")
    if pos.shape != ids.shape:
        raise SessionInputError(f"position_ids shape {pos.shape} != input_ids shape {ids.shape}")
    if slots.size != ids.shape[0] or slots.ndim not in (1, 2):
        raise SessionInputError(f"batch_index must be [batch, 1] with batch={ids.shape[0]}, got shape {slots.shape}")
    slots = slots.reshape(-1).astype(np.int64)
    if slots.size and (slots.min() < 0 or slots.max() >= full_batch_size):
        raise SessionInputError(f"batch_index {slots.tolist()} out of range for full_batch_size={full_batch_size}")
    if len(set(slots.tolist())) != slots.size:
        raise SessionInputError(f"batch_index {slots.tolist()} names a slot twice in one call")
    if pos.size and pos.max() >= ctx_len:
        raise SessionInputError(f"position {int(pos.max())} >= ctx_len={ctx_len}")
    if pos.size and pos.min() < -1:
        raise SessionInputError(f"position {int(pos.min())} < -1 (only -1 marks padding)")
    n = logits_to_keep(inputs.get("num_logits_to_keep"), ids.shape[1])
    flags = {}
    for key in ("argmax", "head_guesses"):
        if key in inputs:
            v = np.asarray(inputs[key])
            if v.size != 1 or v.dtype.kind not in "bi":
                raise SessionInputError(f"{key} must be one bool, got {v.dtype} of shape {v.shape}")
            flags[key] = bool(v.reshape(-1)[0])
    return CheckedInputs(ids.astype(np.int64, copy=False), pos.astype(np.int64, copy=False), slots, n, **flags)


def verified_column(x: CheckedInputs, kept: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """[B]: per row, the kept column where its greedily verified prefix ends: the number of
    leading kept columns j (j >= 1, valid) whose input token is ``tokens[:, j - 1]``, the base
    model's choice after the column before (the verifier's own rule)."""
    rows = np.arange(kept.shape[0])[:, None]
    follow = kept[:, 1:]
    valid = x.position_ids[rows, follow] >= 0
    counts = np.cumprod(valid, axis=1).sum(axis=1)
    return greedy_accept(x.input_ids[rows, follow], counts, tokens)


def argmax_outputs(x: CheckedInputs, kept: np.ndarray, logits: np.ndarray, num_heads: int) -> dict[str, np.ndarray]:
    """The ``argmax`` outputs of a call from its logits, for a session whose device returns logits
    (QEfficient's graphs): what a card's own argmax would hand back."""
    base = logits[:, :, 0] if logits.ndim == 4 else logits
    out = {"tokens": base.argmax(-1).astype(np.int64)}
    if num_heads and x.head_guesses and logits.ndim == 4:
        col = verified_column(x, kept, out["tokens"])
        out["head_tokens"], out["head_probs"] = greedy_guesses(logits[np.arange(logits.shape[0]), col, 1:])
    return out


def keep_index(position_ids: np.ndarray, n: int) -> np.ndarray:
    """Column indices [B, n] of the kept logits: a window of n columns ending at each row's
    largest-position column (QEfficient's gather rule)."""
    last = position_ids.argmax(axis=1)
    lower = np.where(last < n, 0, last + 1 - n)
    return lower[:, None] + np.arange(n)[None, :]


def prefill_chunks(ids: np.ndarray, chunk: int, slot: int):
    """The calls of a chunked prefill of ``ids`` into ``slot`` (``SessionCall``s): chunks of
    ``chunk`` columns, the last right-padded with position -1 (the fixed shape compiled sessions
    expect), each keeping the logits of its last valid token."""
    for c in range(0, ids.shape[0], chunk):
        part = ids[c : c + chunk]
        pad = chunk - part.shape[0]
        yield SessionCall(np.pad(part, (0, pad))[None],
                          np.pad(np.arange(c, c + part.shape[0]), (0, pad), constant_values=-1)[None],
                          np.array([slot]), num_logits_to_keep=1)
