"""PyTorch backend of the device-session contract, over any HF causal LM.

Route: a transformers ``Cache`` subclass (``SlotCache``) whose ``update`` scatters each row's new
keys/values at that row's positions into its slot, a 4-D mask built from ``position_ids`` and
per-row ``position_ids`` for RoPE. The model's own attention code runs unchanged, so every
architecture transformers implements with the standard cache call (llama, qwen2, gemma3,
mistral, ...) works without a forward of our own. Attention reads only the first
``max(position) + 1`` positions of each slot, not the whole ``ctx_len``.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from transformers.cache_utils import Cache

from .base import SessionInputError, check_inputs, keep_index, verified_column
from . import bf16, packed, rowwise
from .heads import TurboHeads
from .readout import Readout, rows_linear


def use_cpu_kernels(model, *extra, keep_weights: bool = False) -> str | None:
    """Run the linears of ``model`` (and of ``extra`` modules: heads) on the CPU kernels made for
    few-row calls, in place: float32 on prepacked oneDNN weights (sessions/packed.py), bfloat16 on
    our batch-invariant AVX2 kernel (sessions/bf16.py). Returns which ran
    ("onednn", "avx2-bf16") or None where neither applies (GPU, float16, no AVX2...).
    ``keep_weights``: float32 packing keeps the original weights too (by default it drops those
    no other module shares)."""
    parts = (model, *extra)
    if any(type(m) is torch.nn.Linear for m in parts):  # it would stay as it is, silently
        raise TypeError("use_cpu_kernels swaps the linears under each module it is given, not a bare "
                        "nn.Linear: pass it inside a module (nn.Sequential(linear))")
    if packed.available(model):
        for m in parts:
            packed.pack_linears(m, keep_weights)
        return "onednn"
    if bf16.available(model):
        for m in parts:
            bf16.use_kernel(m)
        if model.config._attn_implementation == "sdpa":
            # with batch-invariant linears, row-wise attention makes a verify compute what
            # one-token decode steps would, bit for bit (sessions/rowwise.py)
            model.set_attn_implementation(rowwise.NAME)
        return "avx2-bf16"
    return None


@contextmanager
def cpu_kernels(model):
    """``use_cpu_kernels`` inside the block only: the model gets its own ``nn.Linear`` modules and
    attention back after it, for a caller that still needs it as it was (the heads trainer
    generates with the target, then trains through its lm_head). Yields which kernels ran."""
    swaps = list(packed._linears(model))
    attn = model.config._attn_implementation
    kind = use_cpu_kernels(model, keep_weights=True)
    try:
        yield kind
    finally:
        for parent, name, child in swaps:
            setattr(parent, name, child)
        if model.config._attn_implementation != attn:
            model.set_attn_implementation(attn)


class SlotCache(Cache):
    """KV cache of ``slots`` rows of ``ctx_len`` positions per layer, written by absolute
    position. Tensors are allocated at the first write of each layer (their shape comes from
    the model's own key states, so GQA, head_dim and per-layer sizes need no config parsing)."""

    def __init__(self, slots: int, ctx_len: int):
        super().__init__(layers=[])
        self.slots, self.ctx_len = slots, ctx_len
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def bind(self, slots: torch.Tensor, positions: torch.Tensor, kv_len: int,
             runs: list[tuple[int, int, int, int]] | None = None) -> None:
        """Set where this call's rows write and how far attention reads. ``runs`` (row, slot,
        first position, length) per row, when every row's valid columns are a prefix of consecutive
        positions (the engine's right-padded rows always are), lets writes be plain slices."""
        self._runs = runs
        if runs is None:
            b, t = torch.nonzero(positions >= 0, as_tuple=True)
            self._rows, self._cols = b, t
            self._slot_w, self._pos_w = slots[b], positions[b, t]
        self._kv_len = kv_len
        first = int(slots[0])
        contiguous = bool((slots == torch.arange(first, first + slots.numel(), device=slots.device)).all())
        self._read = slice(first, first + slots.numel()) if contiguous else slots

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx not in self.keys:
            shape = (self.slots, key_states.shape[1], self.ctx_len, key_states.shape[3])
            self.keys[layer_idx] = key_states.new_zeros(shape)
            self.values[layer_idx] = value_states.new_zeros(shape[:3] + (value_states.shape[3],))
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if self._runs is not None:
            for b, slot, p0, n in self._runs:
                k[slot, :, p0 : p0 + n] = key_states[b, :, :n]
                v[slot, :, p0 : p0 + n] = value_states[b, :, :n]
        else:
            # [B, H, S, D] -> [N, H, D] for the valid (row, column) pairs, written at (slot, :, position)
            k[self._slot_w, :, self._pos_w] = key_states.permute(0, 2, 1, 3)[self._rows, self._cols]
            v[self._slot_w, :, self._pos_w] = value_states.permute(0, 2, 1, 3)[self._rows, self._cols]
        return k[self._read, :, : self._kv_len], v[self._read, :, : self._kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """(kv_length, kv_offset) of the keys ``update`` returns: the first ``kv_len`` positions of
        each slot, on every layer. transformers' mask functions ask this whenever they build a mask
        themselves (the session passes ``None`` on a one-token decode step); the base class would
        answer ``query_length`` since this cache keeps no ``layers``."""
        return self._kv_len, 0

    def reset(self) -> None:
        self.keys.clear()
        self.values.clear()


def attention_mask(positions: torch.Tensor, kv_len: int, window: int | None = None) -> torch.Tensor:
    """[B, 1, S, kv_len] bool: a query at position p sees keys at positions <= p (and > p - window
    for sliding layers). Padding queries (-1) see key 0 only, so softmax never meets an empty row;
    their outputs are ignored and they wrote nothing."""
    keys = torch.arange(kv_len, device=positions.device)
    q = positions.clamp(min=0)[:, None, :, None]
    mask = keys <= q
    if window:
        mask &= keys > q - window
    return mask


def cache_argument(module) -> str:
    """The name under which ``module``'s forward takes its KV cache: ``cache`` where its signature
    has one (newer transformers, which keep ``past_key_values`` as a deprecated alias that warns),
    else ``past_key_values`` (transformers up to ~5.5, QEfficient's pin). Read from the signature,
    so every architecture and release gets the name it declares."""
    import inspect

    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        params = {}
    return "cache" if "cache" in params else "past_key_values"


def _runs(positions: np.ndarray, slots: np.ndarray) -> list[tuple[int, int, int, int]] | None:
    """(row, slot, first position, length) per non-empty row if each row is consecutive positions then padding."""
    valid = positions >= 0
    counts = valid.sum(axis=1)
    if not (valid == (np.arange(positions.shape[1]) < counts[:, None])).all():
        return None
    first = positions[:, 0]
    if not (np.where(valid, positions - first[:, None] - np.arange(positions.shape[1]), 0) == 0).all():
        return None
    return [(b, int(s), int(p), int(n)) for b, (s, p, n) in enumerate(zip(slots, first, counts)) if n > 0]


class TorchSession:
    """One model on one torch device with ``full_batch_size`` KV slots of ``ctx_len`` positions."""

    def __init__(self, model, full_batch_size: int, ctx_len: int, heads: TurboHeads | None = None,
                 pack: bool = False, eos_token_ids: list[int] | None = None, draft_vocab: int | None = None):
        """``pack``: run CPU linears on kernels made for few-row calls, in place on ``model`` and
        ``heads``: float32 on prepacked oneDNN weights (sessions/packed.py), bfloat16 on our AVX2
        kernel where the CPU has no native bfloat16 (sessions/bf16.py); ignored where neither
        applies. ``packed`` says which ran ("onednn", "avx2-bf16" or None). ``draft_vocab``: logits
        over the first that many ids and each slot's fed ids only (sessions/readout.py), for a
        draft; None: the whole vocabulary."""
        self.model = model.eval()
        self.config = model.config
        self.device = next(model.parameters()).device
        self.full_batch_size, self.ctx_len = full_batch_size, ctx_len
        self.eos_token_ids = list(eos_token_ids or [])  # what the engine stops at (the model's generation config)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.heads = heads
        if heads is not None:
            if heads.hidden_size != self.config.hidden_size:
                raise ValueError(
                    f"projection heads have hidden size {heads.hidden_size}, the model has {self.config.hidden_size}"
                )
            self.heads = heads.to(device=self.device, dtype=next(model.parameters()).dtype).eval()
        self.num_heads = heads.num_heads if heads is not None else 0
        self._head_lm, self._head_vocab = self._head_readout()
        if draft_vocab is not None and heads is not None:
            raise ValueError("draft_vocab is for a draft's session; this one carries projection heads (a target's)")
        self.readout = None if draft_vocab is None else Readout(model.get_output_embeddings(), draft_vocab,
                                                                full_batch_size, always=self.eos_token_ids)
        parts = [m for m in (self.heads, self._head_lm, self.readout and self.readout.head) if m is not None]
        self.packed = use_cpu_kernels(model, *parts) if pack else None
        self.cache = SlotCache(full_batch_size, ctx_len)
        self._cache_kw = cache_argument(model.base_model)
        self.layer_types = sorted(set(getattr(self.config, "layer_types", None) or []))
        self.window = getattr(self.config, "sliding_window", None)
        self.softcap = getattr(self.config, "final_logit_softcapping", None)

    def _head_readout(self):
        """The lm_head rows of the heads' vocabulary (``head_vocab``) as their own linear, in a
        Sequential so that the CPU kernels, which swap the linears *under* a module, reach it (a bare
        nn.Linear kept PyTorch's bfloat16 linear: ~5 of a Qwen 1.5B step's ~260 ms); or None."""
        if self.heads is None or self.heads.vocab is None:
            return None, None
        vocab = self.heads.vocab
        if vocab.numel() == 0 or int(vocab.min()) < 0 or int(vocab.max()) >= self.vocab_size:
            raise ValueError(f"projection heads: head_vocab has ids outside the model's vocabulary 0..{self.vocab_size - 1}")
        return rows_linear(self.model.get_output_embeddings(), vocab.to(self.device)), vocab.numpy()

    def _mask(self, positions: torch.Tensor, kv_len: int):
        if positions.shape[1] == 1 and bool((positions[:, 0] == kv_len - 1).all()) and (
            not self.window or kv_len <= self.window
        ):
            # one token per row, every row at the last position: each query sees every key, so no
            # mask at all (SDPA's fastest path, as HF's own decode step)
            return {t: None for t in self.layer_types} if self.layer_types else None
        if not self.layer_types:
            return attention_mask(positions, kv_len)
        full = attention_mask(positions, kv_len)
        return {
            t: attention_mask(positions, kv_len, self.window) if t == "sliding_attention" else full
            for t in self.layer_types
        }

    @torch.inference_mode()
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = check_inputs(inputs, self.full_batch_size, self.ctx_len)
        valid_cols = np.flatnonzero((x.position_ids >= 0).any(axis=0))
        if valid_cols.size == 0:
            raise SessionInputError("every position is padding (-1): nothing to run")
        width = int(valid_cols[-1]) + 1  # trailing all-padding columns cost nothing
        with bf16.library_linears(self._prefill_on_library(x, width)):
            return self._forward(x, width)

    def _prefill_on_library(self, x, width: int) -> bool:
        """A prefill chunk (one logit kept per row, wider than any call row-wise attention computes
        row by row) on the bfloat16 kernel, where prefills take PyTorch's own linears
        (``bf16.library_prefill``): no decode step has to reproduce its bits, and oneDNN's blocked GEMM
        with native bfloat16 computes wide calls faster than the kernel. A verify keeps
        every position's logits, so it stays on the kernel at any width."""
        return (self.packed == "avx2-bf16" and x.num_logits == 1 and width > rowwise.MAX_ROWS
                and bf16.library_prefill())

    def _forward(self, x, width: int) -> dict[str, np.ndarray]:
        kept = keep_index(x.position_ids, x.num_logits).clip(max=width - 1)
        ids = torch.from_numpy(np.ascontiguousarray(x.input_ids[:, :width])).to(self.device)
        pos = torch.from_numpy(np.ascontiguousarray(x.position_ids[:, :width])).to(self.device)
        slots = torch.from_numpy(x.batch_index).to(self.device)
        kv_len = int(x.position_ids.max()) + 1
        if self.readout is not None:
            self.readout.feed(x.input_ids, x.position_ids, x.batch_index)
        self.cache.bind(slots, pos, kv_len, _runs(x.position_ids[:, :width], x.batch_index))
        hidden = self.model.base_model(
            input_ids=ids,
            position_ids=pos.clamp(min=0),
            attention_mask=self._mask(pos, kv_len),
            use_cache=True,
            **{self._cache_kw: self.cache},
        ).last_hidden_state
        idx = torch.from_numpy(kept).to(self.device)
        hidden = hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))  # [B, n, D]
        heads = self.heads is not None and x.head_guesses
        if self.readout is not None:
            if not x.argmax:
                return {"logits": self.readout.logits(hidden, x.batch_index, self._as_logits).cpu().numpy()}
            return {"tokens": self.readout.argmax(hidden, x.batch_index, self._as_logits)}
        if not x.argmax:
            return {"logits": self._logits(self.heads(hidden) if heads else hidden).cpu().numpy()}
        # the argmax on the device: [B, n] ids cross to the host, and the heads run only where
        # each row's verified prefix ends (n + H lm_head rows, not n * (H + 1))
        out = {"tokens": self._logits(hidden).argmax(-1).cpu().numpy()}
        if heads:
            col = torch.from_numpy(verified_column(x, kept, out["tokens"])).to(self.device)
            at = hidden[torch.arange(hidden.shape[0], device=self.device), col]  # [B, D]
            logits = self._logits(self.heads(at)[:, 1:], self._head_lm)  # [B, H, V']
            index = logits.argmax(dim=-1, keepdim=True)
            probs = torch.softmax(logits, dim=-1).gather(-1, index)[..., 0]
            index = index[..., 0].cpu().numpy()
            tokens = index if self._head_vocab is None else self._head_vocab[index]
            out["head_tokens"], out["head_probs"] = tokens.astype(np.int64, copy=False), probs.cpu().numpy()
        return out

    def _logits(self, hidden: torch.Tensor, lm_head=None) -> torch.Tensor:
        return self._as_logits((self.model.lm_head if lm_head is None else lm_head)(hidden))

    def _as_logits(self, logits: torch.Tensor) -> torch.Tensor:
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()
