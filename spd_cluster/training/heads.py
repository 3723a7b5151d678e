"""Train Turbo-format multi-projection heads by self-distillation (Medusa-1 style).

1. The target greedily continues each prompt through our own engine (baseline mode, batched over
   ``gen_batch_size`` KV slots). A recording session keeps the last hidden state (the base
   model's final-norm output, what the heads see at inference) of every token the engine feeds,
   so the distillation data costs no forward beyond the generation itself.
2. Row t of a sequence (t from the last prompt token on) holds hidden[t] and the targets
   seq[t + 1 + h] for h = 0..H (0 is the base token; head h predicts offset 1 + h). Rows live in
   RAM, or in a numpy memmap in a temp dir when they exceed ``memory_budget_mb``.
3. Only the heads' ResBlocks train (AdamW, warmup + cosine), loss = cross-entropy through the
   frozen lm_head (optionally mixed with KL to the target's own distribution at t + h), head h
   weighted ``head_decay ** (h - 1)`` as in Medusa. With ``vocab="seen"`` the softmax runs over
   the tokens that occur in the training targets only (the full 150k-token lm_head would
   dominate CPU time), and the heads keep that set as ``head_vocab``: at inference they propose
   from it alone, so a session applies only those lm_head rows to them. The final accuracy is
   measured over the vocabulary the heads propose from (a target outside it counts as a miss).
4. Sequences are split into train / held-out; per-head top-1 accuracy on the held-out split is
   shown on the progress bar, printed at the end and stored in ``speculator_config.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..sessions.heads import CONFIG_FILE, WEIGHTS_FILE, TurboHeads
from ..sessions.torch_session import TorchSession, cpu_kernels

IGNORE = -100
TEXT_SUFFIXES = {".txt", ".text", ".md", ""}


class TrainingError(ValueError):
    """Bad input to the trainer (dataset, output dir, heads); the message says what to fix."""


@dataclass
class TrainSettings:
    num_heads: int = 4
    num_layers: int = 1
    steps: int = 500
    batch_size: int = 256  # rows (positions) per optimizer step
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    head_decay: float = 0.8  # loss weight of head h: head_decay ** (h - 1)
    kl_weight: float = 0.0  # 0: cross-entropy on the target's tokens; 1: KL to its distribution only
    vocab: str = "seen"  # "seen": softmax over tokens seen in training targets; "full": whole vocabulary
    max_new_tokens: int = 128
    ctx_len: int = 1024
    prefill_seq_len: int = 64
    gen_batch_size: int = 8
    chat_template: bool = False
    ignore_eos: bool = False
    eval_fraction: float = 0.1
    eval_every: int = 50
    max_eval_rows: int = 4096
    memory_budget_mb: int = 2048
    seed: int = 0

    def check(self) -> None:
        if self.num_heads < 1 or self.num_layers < 1:
            raise TrainingError(f"need --heads >= 1 and --layers >= 1, got {self.num_heads}, {self.num_layers}")
        if self.steps < 1 or self.batch_size < 1:
            raise TrainingError(f"need --steps >= 1 and --batch-size >= 1, got {self.steps}, {self.batch_size}")
        if self.eval_every < 1:
            raise TrainingError(f"eval_every must be >= 1, got {self.eval_every}")
        if not 0.0 <= self.kl_weight <= 1.0:
            raise TrainingError(f"--kl-weight must be in [0, 1], got {self.kl_weight}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise TrainingError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if self.vocab not in ("seen", "full"):
            raise TrainingError(f"--vocab must be 'seen' or 'full', got {self.vocab!r}")


# -- dataset ---------------------------------------------------------------------------------


def read_prompts(path: str | Path, column: str = "prompt") -> list[str]:
    """Prompts of a text file (one per line, blank lines skipped) or of the ``column`` of a
    JSONL / CSV / Parquet file. No prompt at all is an error."""
    p = Path(path)
    if not p.is_file():
        raise TrainingError(f"dataset {p}: no such file")
    if p.suffix.lower() in TEXT_SUFFIXES:
        prompts = [line.rstrip("\r\n") for line in p.read_text(encoding="utf-8").splitlines()]
    else:
        from ..io.dataset import DatasetError, iter_rows

        try:
            prompts = [r.prompt for r in iter_rows(p, prompt_column=column)]
        except DatasetError as e:
            raise TrainingError(str(e)) from None
    prompts = [x for x in prompts if isinstance(x, str) and x.strip()]
    if not prompts:
        raise TrainingError(f"dataset {p}: no prompts (need one non-empty prompt per line, or a {column!r} column)")
    return prompts


def check_out_dir(out: str | Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and not overwrite:
        raise TrainingError(
            f"output {out} already exists; pass --overwrite to write the heads into it "
            f"(only {CONFIG_FILE} and {WEIGHTS_FILE} are replaced)"
        )
    if out.exists() and not out.is_dir():
        raise TrainingError(f"output {out} is a file, not a directory")
    return out


# -- distillation data -----------------------------------------------------------------------


class _Rows:
    """[capacity, D] float32 rows in RAM, or in a memmap in a temp dir past the memory budget."""

    def __init__(self, capacity: int, dim: int, budget_bytes: int, cache_dir: str | None = None):
        self.tmp = None
        if capacity * dim * 4 <= budget_bytes:
            self.array = np.empty((capacity, dim), dtype=np.float32)
        else:
            self.tmp = tempfile.TemporaryDirectory(prefix="spd-heads-", dir=cache_dir)
            self.array = np.lib.format.open_memmap(
                str(Path(self.tmp.name) / "hidden.npy"), mode="w+", dtype=np.float32, shape=(capacity, dim)
            )
        self.n = 0

    @property
    def on_disk(self) -> bool:
        return self.tmp is not None

    def append(self, rows: np.ndarray) -> None:
        self.array[self.n : self.n + len(rows)] = rows
        self.n += len(rows)

    def take(self, idx: np.ndarray) -> np.ndarray:
        order = np.argsort(idx)  # sorted reads are kind to a memmap
        out = np.empty((len(idx), self.array.shape[1]), dtype=np.float32)
        out[order] = self.array[idx[order]]
        return out

    def close(self) -> None:
        self.array = None
        if self.tmp is not None:
            self.tmp.cleanup()
            self.tmp = None


class _RecordingSession(TorchSession):
    """A TorchSession that also keeps the last hidden state of every token it feeds.

    The engine takes prompts in order and prefills each into a free slot from position 0, so a
    call that writes position 0 of a slot starts the next sequence there; the previous one in
    that slot is complete and its rows (from the last prompt token on) go to ``rows``. The ids
    seen are kept and checked against the engine's output afterwards."""

    def __init__(self, model, full_batch_size, ctx_len):
        super().__init__(model, full_batch_size, ctx_len)
        d = self.config.hidden_size
        self.prompt_lens, self.rows, self.bar = [], None, None
        self.hidden = np.zeros((full_batch_size, ctx_len, d), dtype=np.float32)
        self.ids = np.full((full_batch_size, ctx_len), -1, dtype=np.int64)
        self.length = np.zeros(full_batch_size, dtype=np.int64)
        self.owner = np.full(full_batch_size, -1, dtype=np.int64)  # sequence index in each slot
        self.started = 0
        self.spans: dict[int, tuple[int, int]] = {}  # sequence -> (first row, number of rows)
        self.fed_ids: dict[int, np.ndarray] = {}
        self._last = None
        self._hook = self.model.base_model.register_forward_hook(self._grab)

    def begin(self, prompt_lens, rows: _Rows, bar=None) -> None:
        self.prompt_lens, self.rows, self.bar = list(prompt_lens), rows, bar

    def _grab(self, module, args, output):
        self._last = output.last_hidden_state

    def close(self) -> None:
        self._hook.remove()

    def _finish(self, slot: int) -> None:
        seq = int(self.owner[slot])
        if seq < 0:
            return
        n, first = int(self.length[slot]), self.prompt_lens[seq] - 1
        self.fed_ids[seq] = self.ids[slot, :n].copy()
        self.spans[seq] = (self.rows.n, n - first)
        self.rows.append(self.hidden[slot, first:n])
        self.owner[slot] = -1
        if self.bar is not None:
            self.bar.update(1)

    def finish_all(self) -> None:
        for slot in range(self.full_batch_size):
            self._finish(slot)

    def run(self, inputs):
        pos = np.asarray(inputs["position_ids"])
        slots = np.asarray(inputs["batch_index"]).reshape(-1)
        for b in np.flatnonzero((pos == 0).any(axis=1)):
            s = int(slots[b])
            self._finish(s)
            self.owner[s], self.length[s] = self.started, 0
            self.ids[s] = -1
            self.started += 1
        out = super().run(inputs)
        hidden = self._last.float().cpu().numpy()  # [B, width, D]
        ids = np.asarray(inputs["input_ids"])
        b, j = np.nonzero(pos[:, : hidden.shape[1]] >= 0)
        s, p = slots[b], pos[b, j]
        self.hidden[s, p] = hidden[b, j]
        self.ids[s, p] = ids[b, j]
        np.maximum.at(self.length, s, p + 1)
        return out


@dataclass
class Distilled:
    """Row r: ``hidden`` [N, D] at position t of sequence ``seq[r]``, ``targets[r, h]`` =
    token t + 1 + h of that sequence (IGNORE past its end). ``split[r]``: 0 train, 1 held-out."""

    rows: _Rows
    targets: np.ndarray  # [N, H + 1] int64
    seq: np.ndarray  # [N] int64
    split: np.ndarray  # [N] int8
    num_sequences: int
    num_tokens: int  # generated tokens
    gen_time_s: float

    @property
    def hidden(self) -> np.ndarray:
        return self.rows.array[: self.rows.n]

    def save(self, path: str | Path) -> None:
        """Write the rows to an ``.npz`` that ``load`` reads back, so other training settings can
        be tried without generating again (generation is most of the trainer's time on CPU)."""
        np.savez(path, hidden=self.hidden, targets=self.targets, seq=self.seq, split=self.split,
                 num_sequences=self.num_sequences, num_tokens=self.num_tokens, gen_time_s=self.gen_time_s)

    @classmethod
    def load(cls, paths: Sequence[str | Path], hidden_size: int, num_heads: int, memory_budget_mb: int = 2048,
             cache_dir: str | None = None) -> "Distilled":
        """Rows saved by ``save``, several files concatenated (their sequences kept apart)."""
        parts = []
        for path in paths:
            try:
                with np.load(path) as f:
                    part = {k: f[k] for k in ("hidden", "targets", "seq", "split", "num_sequences", "num_tokens",
                                              "gen_time_s")}
            except (OSError, KeyError, ValueError) as e:
                raise TrainingError(f"distilled rows {path}: cannot read ({e})") from None
            if part["hidden"].shape[1] != hidden_size:
                raise TrainingError(f"distilled rows {path}: hidden size {part['hidden'].shape[1]}, "
                                    f"the model has {hidden_size} (distilled from another model?)")
            if part["targets"].shape[1] < num_heads + 1:
                raise TrainingError(f"distilled rows {path}: targets for {part['targets'].shape[1] - 1} heads, "
                                    f"--heads {num_heads} needs targets for {num_heads}")
            parts.append(part)
        if not parts:
            raise TrainingError("no distilled rows given")
        n = sum(len(p["hidden"]) for p in parts)
        rows = _Rows(n, hidden_size, memory_budget_mb << 20, cache_dir)
        seqs, offset = [], 0
        for p in parts:
            rows.append(p["hidden"].astype(np.float32, copy=False))
            seqs.append(p["seq"] + offset)
            offset += int(p["num_sequences"])
        return cls(rows, np.concatenate([p["targets"][:, : num_heads + 1] for p in parts]), np.concatenate(seqs),
                   np.concatenate([p["split"] for p in parts]), offset,
                   int(sum(int(p["num_tokens"]) for p in parts)), float(sum(float(p["gen_time_s"]) for p in parts)))


def encode_prompts(engine, prompts: Sequence) -> list[np.ndarray]:
    from ..engine.engine import PromptError

    ids, skipped = [], 0
    for p in prompts:
        try:
            ids.append(engine.encode(p))
        except PromptError:
            skipped += 1
    if skipped:
        print(f"train-heads: skipped {skipped} prompt(s) that are empty or leave no room in ctx_len", file=sys.stderr)
    if not ids:
        raise TrainingError("no usable prompts (all empty or longer than ctx_len)")
    return ids


def distill(model, tokenizer, prompts: Sequence, settings: TrainSettings, eos_token_ids=None,
            cache_dir: str | None = None, progress: bool = True) -> Distilled:
    """Greedy continuations of ``prompts`` by the target, with the hidden states along the way."""
    from tqdm.auto import tqdm

    from ..engine import SpDEngine, SpDSettings

    s = settings
    spd = SpDSettings(num_speculative_tokens=1, prefill_seq_len=s.prefill_seq_len, ctx_len=s.ctx_len,
                      max_new_tokens=s.max_new_tokens, full_batch_size=s.gen_batch_size,
                      ignore_eos=s.ignore_eos, chat_template=s.chat_template)
    session = _RecordingSession(model, s.gen_batch_size, s.ctx_len)
    engine = SpDEngine("baseline", session, tokenizer, spd, eos_token_ids=eos_token_ids)
    try:
        ids = encode_prompts(engine, prompts)
    except BaseException:
        session.close()
        raise
    lens = [len(x) for x in ids]
    capacity = sum(min(s.max_new_tokens, s.ctx_len - n) for n in lens)
    rows = _Rows(capacity, model.config.hidden_size, s.memory_budget_mb << 20, cache_dir)
    bar = tqdm(total=len(ids), desc="distil", unit="prompt", disable=not progress)
    session.begin(lens, rows, bar)
    t0 = time.perf_counter()
    try:
        # on CPU: generate on the few-row kernels (float32 oneDNN about 2x, bfloat16 AVX2 about 3x
        # faster here), then give the model its own nn.Linear modules back for training
        with cpu_kernels(model):
            info = engine.generate(ids)
        session.finish_all()
        gen_time = time.perf_counter() - t0
        targets, seq_of = _targets(session, ids, info.generated_ids, rows.n, s.num_heads)
    except BaseException:
        rows.close()
        raise
    finally:
        session.close()
        bar.close()
    # held-out split by sequence (never rows of one sequence on both sides)
    rng = np.random.default_rng(s.seed)
    n_eval = int(round(s.eval_fraction * len(ids))) if len(ids) > 1 else 0
    n_eval = min(max(n_eval, 1 if s.eval_fraction > 0 and len(ids) > 1 else 0), len(ids) - 1)
    held = np.zeros(len(ids), dtype=np.int8)
    held[rng.permutation(len(ids))[:n_eval]] = 1
    return Distilled(rows, targets, seq_of, held[seq_of], len(ids),
                     int(sum(len(g) for g in info.generated_ids)), gen_time)


def _targets(session: _RecordingSession, ids, generated, num_rows: int, H: int):
    """[N, H + 1] targets (token t + 1 + h) and [N] sequence index of every recorded row."""
    targets = np.full((num_rows, H + 1), IGNORE, dtype=np.int64)
    seq_of = np.zeros(num_rows, dtype=np.int64)
    for i, (prompt, gen) in enumerate(zip(ids, generated)):
        full = np.concatenate([prompt, gen])
        if i not in session.spans or not np.array_equal(session.fed_ids[i], full[: len(full) - 1]):
            raise RuntimeError(f"internal: hidden states recorded for sequence {i} do not match its tokens")
        first, n = session.spans[i]
        t = np.arange(len(prompt) - 1, len(prompt) - 1 + n)
        for h in range(H + 1):
            at = t + 1 + h
            ok = at < len(full)
            targets[first : first + n, h][ok] = full[at[ok]]
        seq_of[first : first + n] = i
    return targets, seq_of


# -- training --------------------------------------------------------------------------------


class _Readout:
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


def _lr(step: int, s: TrainSettings) -> float:
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    frac = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return s.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def _loss(heads, readout, data: Distilled, idx: np.ndarray, s: TrainSettings, device):
    """Weighted loss over heads and the per-head (correct, counted) of a batch of rows."""
    H = s.num_heads
    x = torch.from_numpy(data.rows.take(idx)).to(device)
    tgt = torch.from_numpy(readout.map(data.targets[idx][:, 1:])).to(device)  # [B, H]
    logits = readout(heads(x)[:, 1:])  # [B, H, V']
    weights = torch.tensor([s.head_decay ** h for h in range(H)], device=device)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=IGNORE,
                         reduction="none").view(-1, H)
    valid = (tgt != IGNORE).float()
    per_head = (ce * valid).sum(0) / valid.sum(0).clamp(min=1)
    if s.kl_weight > 0:
        # teacher for head h at row r: the base distribution at row r + h (position t + h)
        has = data.targets[idx][:, 1:] != IGNORE  # row r + h exists in the same sequence
        trow = np.where(has, idx[:, None] + np.arange(1, H + 1), idx[:, None])
        with torch.no_grad():
            t_logits = readout(torch.from_numpy(data.rows.take(trow.reshape(-1))).to(device)).view(len(idx), H, -1)
        kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(t_logits, -1), log_target=True,
                      reduction="none").sum(-1)
        hv = torch.from_numpy(has).to(device).float()
        per_head = (1 - s.kl_weight) * per_head + s.kl_weight * (kl * hv).sum(0) / hv.sum(0).clamp(min=1)
    # accuracy counts every real target: one outside a restricted vocabulary is a miss
    counted = torch.from_numpy(data.targets[idx][:, 1:] != IGNORE).to(device)
    correct = ((logits.argmax(-1) == tgt) & (tgt != IGNORE)).sum(0)
    return (per_head * weights).sum() / weights.sum(), correct, counted.sum(0)


@torch.no_grad()
def evaluate(heads, readout, data: Distilled, rows: np.ndarray, s: TrainSettings, device, chunk: int = 256):
    """Per-head top-1 accuracy (against ``readout``'s vocabulary) and mean loss over ``rows``."""
    correct = torch.zeros(s.num_heads, device=device)
    count = torch.zeros(s.num_heads, device=device)
    loss, batches = 0.0, 0
    for i in range(0, len(rows), chunk):
        lo, c, n = _loss(heads, readout, data, rows[i : i + chunk], s, device)
        correct += c
        count += n
        loss += float(lo)
        batches += 1
    acc = (correct / count.clamp(min=1)).tolist()
    return acc, loss / max(batches, 1)


def train(model, data: Distilled, settings: TrainSettings, heads: TurboHeads | None = None,
          progress: bool = True) -> tuple[TurboHeads, dict]:
    """Train ``heads`` (fresh ones by default) on distilled rows; the model stays frozen."""
    from tqdm.auto import trange

    s = settings
    device = next(model.parameters()).device
    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    if heads is None:
        heads = TurboHeads(model.config.hidden_size, s.num_heads, s.num_layers)
    heads = heads.to(device=device, dtype=torch.float32).train()
    trainable = data.targets[:, 1] != IGNORE  # rows with at least one head target
    train_rows = np.flatnonzero(trainable & (data.split == 0))
    eval_rows = np.flatnonzero(trainable & (data.split == 1))
    split_name = "heldout"
    if len(train_rows) == 0:
        raise TrainingError("no training rows: the continuations are too short (raise --max-new-tokens to >= 3)")
    if len(eval_rows) == 0:
        eval_rows, split_name = train_rows, "train"
    eval_rows = eval_rows[rng.permutation(len(eval_rows))[: s.max_eval_rows]]
    eval_rows.sort()

    vocab_ids = None
    if s.vocab == "seen":
        t = data.targets[train_rows]
        vocab_ids = np.unique(t[t != IGNORE])
    readout = _Readout(model, vocab_ids, device)
    opt = torch.optim.AdamW(heads.parameters(), lr=s.lr, weight_decay=s.weight_decay)

    losses, order, at = [], rng.permutation(train_rows), 0
    acc = None
    start = time.perf_counter()
    bar = trange(s.steps, desc="train-heads", disable=not progress)
    for step in bar:
        if at + s.batch_size > len(order):
            order, at = rng.permutation(train_rows), 0
        idx = order[at : at + s.batch_size]
        at += s.batch_size
        for g in opt.param_groups:
            g["lr"] = _lr(step, s)
        loss, _, _ = _loss(heads, readout, data, idx, s, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % s.eval_every == 0 or step + 1 == s.steps:
            heads.eval()
            acc, _ = evaluate(heads, readout, data, eval_rows, s, device)
            heads.train()
        post = {"loss": f"{losses[-1]:.3f}"}
        if acc is not None:
            post[f"{split_name}_acc"] = "/".join(f"{a:.2f}" for a in acc)
        bar.set_postfix(post, refresh=False)
    bar.close()
    train_time = time.perf_counter() - start
    heads.eval()
    # heads trained over the seen tokens propose only those at inference (head_vocab): measure that
    heads.vocab = None if vocab_ids is None else torch.from_numpy(vocab_ids)
    final_acc, final_loss = evaluate(heads, readout, data, eval_rows, s, device)
    report = {
        "top1_accuracy": [round(a, 4) for a in final_acc],
        "accuracy_split": split_name,
        "eval_loss": round(final_loss, 4),
        "first_loss": round(losses[0], 4),
        "last_loss": round(float(np.mean(losses[-max(1, min(10, len(losses) // 5)):])), 4),
        "train_rows": int(len(train_rows)),
        "eval_rows": int(len(eval_rows)),
        "softmax_vocab": int(len(vocab_ids)) if vocab_ids is not None else readout.vocab_size,
        "train_time_s": round(train_time, 2),
        "losses": losses,
    }
    return heads, report


# -- the whole job ---------------------------------------------------------------------------


def train_heads(model, tokenizer, prompts: Sequence, out: str | Path | None, settings: TrainSettings | None = None,
                *, model_name: str = "", overwrite: bool = False, init_heads: str | Path | None = None,
                eos_token_ids=None, cache_dir: str | None = None, progress: bool = True,
                distilled: Sequence[str | Path] = (), save_distilled: str | Path | None = None,
                ) -> tuple[TurboHeads, dict]:
    """Distil, train, and save heads to ``out`` (None: don't save). Returns (heads, report).
    ``distilled``: train on rows saved earlier (``save_distilled``) instead of generating."""
    s = settings or TrainSettings()
    s.check()
    if out is not None:
        out = check_out_dir(out, overwrite)
    if not distilled and not len(prompts):
        raise TrainingError("empty dataset: no prompts to distil from")
    heads = None
    if init_heads is not None:
        heads = TurboHeads.load(init_heads, hidden_size=model.config.hidden_size)
        s = replace(s, num_heads=heads.num_heads, num_layers=heads.num_layers)
    if eos_token_ids is None:
        from ..sessions.loader import eos_token_ids as _eos

        eos_token_ids = _eos(model, tokenizer)
    if distilled:
        data = Distilled.load(distilled, model.config.hidden_size, s.num_heads, s.memory_budget_mb, cache_dir)
    else:
        data = distill(model, tokenizer, prompts, s, eos_token_ids, cache_dir=cache_dir, progress=progress)
    try:
        if save_distilled is not None:
            data.save(save_distilled)
        heads, report = train(model, data, s, heads=heads, progress=progress)
        report.update(num_prompts=data.num_sequences, generated_tokens=data.num_tokens,
                      gen_time_s=round(data.gen_time_s, 2), hidden_rows=int(data.rows.n),
                      hidden_on_disk=data.rows.on_disk, distilled_from=[str(d) for d in distilled])
    finally:
        data.rows.close()
    heads.extra_config = {
        "base_model": model_name,
        "hidden_size": int(model.config.hidden_size),
        "vocab_size": int(model.get_output_embeddings().weight.shape[0]),
        "top1_accuracy": report["top1_accuracy"],
        "accuracy_split": report["accuracy_split"],
        "training": {**{k: v for k, v in asdict(s).items()},
                     **{k: v for k, v in report.items() if k not in ("top1_accuracy", "accuracy_split", "losses")}},
    }
    if out is not None:
        heads.save(out)
    return heads, report


def format_accuracy(report: dict) -> str:
    accs = " ".join(f"head{h + 1}={a:.3f}" for h, a in enumerate(report["top1_accuracy"]))
    return f"top-1 accuracy ({report['accuracy_split']}, {report['eval_rows']} rows): {accs}"


# -- CLI -------------------------------------------------------------------------------------


def add_cli(subparsers) -> None:
    """Register ``train-heads``; sets ``func(args) -> int``."""
    d = TrainSettings()
    p = subparsers.add_parser("train-heads", help="train multi-projection (multiproj) heads by self-distillation",
                              description="The target greedily continues each prompt; heads learn to predict "
                                          "its tokens 2..H+1 ahead from its last hidden state.")
    p.add_argument("--model", required=True, help="store alias, HF directory or .gguf file")
    p.add_argument("--dataset", help="prompts: text file (one per line), JSONL, CSV or Parquet")
    p.add_argument("--distilled", nargs="+", default=[], metavar="NPZ",
                   help="train on rows saved by --save-distilled instead of generating (in place of --dataset)")
    p.add_argument("--save-distilled", default=None, metavar="NPZ",
                   help="also save the distilled rows (hidden states and targets) to this .npz")
    p.add_argument("--prompt-column", default="prompt", help="column of JSONL/CSV/Parquet prompts")
    p.add_argument("--out", required=True, help="directory for speculator_config.json + speculator.safetensors")
    p.add_argument("--overwrite", action="store_true", help="write into an existing --out")
    p.add_argument("--init", default=None, help="start from existing heads in this directory")
    p.add_argument("--heads", type=int, default=d.num_heads, help="number of heads H (default %(default)s)")
    p.add_argument("--layers", type=int, default=d.num_layers, help="ResBlocks per head (default %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="rows per step (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--kl-weight", type=float, default=d.kl_weight,
                   help="0: cross-entropy on the target's tokens, 1: KL to its distribution (default %(default)s)")
    p.add_argument("--vocab", choices=("seen", "full"), default=d.vocab,
                   help="softmax over tokens seen in training targets (fast) or the whole vocabulary")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--ctx-len", type=int, default=d.ctx_len)
    p.add_argument("--gen-batch-size", type=int, default=d.gen_batch_size, help="KV slots while generating")
    p.add_argument("--chat-template", action="store_true")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--eval-fraction", type=float, default=d.eval_fraction)
    p.add_argument("--memory-budget-mb", type=int, default=d.memory_budget_mb,
                   help="hidden states beyond this go to a memmap in a temp dir (default %(default)s)")
    p.add_argument("--cache-dir", default=None, help="where that temp dir goes (default: system temp)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 is often faster on a busy 2-core machine)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_train)


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    return TrainSettings(
        num_heads=args.heads, num_layers=args.layers, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, kl_weight=args.kl_weight, vocab=args.vocab,
        max_new_tokens=args.max_new_tokens, ctx_len=args.ctx_len, gen_batch_size=args.gen_batch_size,
        chat_template=args.chat_template, ignore_eos=args.ignore_eos, eval_fraction=args.eval_fraction,
        memory_budget_mb=args.memory_budget_mb, seed=args.seed,
    )


def _cmd_train(args: argparse.Namespace) -> int:
    from ..sessions.loader import eos_token_ids, load_model, load_tokenizer

    try:
        s = settings_from_args(args)
        s.check()
        out = check_out_dir(args.out, args.overwrite)
        if bool(args.dataset) == bool(args.distilled):
            raise TrainingError("give one of --dataset (prompts to distil from) or --distilled (rows saved earlier)")
        prompts = read_prompts(args.dataset, args.prompt_column) if args.dataset else []
        if args.threads:
            torch.set_num_threads(args.threads)
        model = load_model(args.model, args.dtype, args.device)
        tok = load_tokenizer(args.model)
        heads, report = train_heads(model, tok, prompts, out, s, model_name=args.model, overwrite=args.overwrite,
                                    init_heads=args.init, eos_token_ids=eos_token_ids(model, tok),
                                    cache_dir=args.cache_dir, progress=not args.no_progress,
                                    distilled=args.distilled, save_distilled=args.save_distilled)
    except (TrainingError, FileNotFoundError) as e:
        print(f"train-heads: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # e.g. heads of the wrong hidden size (--init)
        print(f"train-heads: error: {e}", file=sys.stderr)
        return 2
    print(format_accuracy(report))
    print(f"distilled {report['num_prompts']} prompts -> {report['generated_tokens']} tokens in "
          f"{report['gen_time_s']:.1f}s; trained {s.steps} steps in {report['train_time_s']:.1f}s; "
          f"loss {report['first_loss']:.3f} -> {report['last_loss']:.3f}")
    print(f"heads written to {out} (use: --mode multiproj with speculator_path={out})")
    print(json.dumps({"out": str(out), **{k: v for k, v in report.items() if k != 'losses'}}))
    return 0
