"""Stage 1, data: the prompts, and the distillation rows the heads learn from.

1. The target greedily continues each prompt through our own engine (baseline mode, batched over
   ``gen_batch_size`` KV slots). A recording session keeps the last hidden state (the base
   model's final-norm output, what the heads see at inference) of every token the engine feeds,
   so the distillation data costs no forward beyond the generation itself.
2. Row t of a sequence (t from the last prompt token on) holds hidden[t] and the targets
   seq[t + 1 + h] for h = 0..H (0 is the base token; head h predicts offset 1 + h). Rows live in
   RAM, or in a numpy memmap in a temp dir when they exceed ``memory_budget_mb``.
3. Sequences are split into train / held-out (whole sequences, never one on both sides).

The progress bar counts the tokens to generate (each prompt's budget, ``max_new_tokens`` or what
``ctx_len`` leaves), so its ETA holds from the first steps; a prompt that ends early at EOS
hands its unused budget to the bar at once.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

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
        self.budget: list[int] = []  # rows each sequence may add (its new-token budget), for the bar
        self.counted: dict[int, int] = {}  # rows the bar has counted per sequence so far
        self.hidden = np.zeros((full_batch_size, ctx_len, d), dtype=np.float32)
        self.ids = np.full((full_batch_size, ctx_len), -1, dtype=np.int64)
        self.length = np.zeros(full_batch_size, dtype=np.int64)
        self.owner = np.full(full_batch_size, -1, dtype=np.int64)  # sequence index in each slot
        self.started = 0
        self.spans: dict[int, tuple[int, int]] = {}  # sequence -> (first row, number of rows)
        self.fed_ids: dict[int, np.ndarray] = {}
        self._last = None
        self._hook = self.model.base_model.register_forward_hook(self._grab)

    def begin(self, prompt_lens, rows: _Rows, bar=None, budget: Sequence[int] = ()) -> None:
        self.prompt_lens, self.rows, self.bar, self.budget = list(prompt_lens), rows, bar, list(budget)

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
        if self.bar is not None:  # what an early EOS left of its budget is done too
            done = self.counted.pop(seq, 0)
            left = (self.budget[seq] if seq < len(self.budget) else n - first) - done
            self.bar.update(max(0, left))
            self.bar.set_postfix_str(f"{len(self.spans)}/{len(self.prompt_lens)} prompts", refresh=False)

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
        if self.bar is not None:  # rows recorded by this call: positions from each prompt's last token on
            seqs = self.owner[s]
            first = np.asarray(self.prompt_lens)[seqs] - 1
            for q, k in zip(*np.unique(seqs[p >= first], return_counts=True)):
                self.counted[int(q)] = self.counted.get(int(q), 0) + int(k)
            self.bar.update(int((p >= first).sum()))
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
    engine = SpDEngine("baseline", session, tokenizer, spd, eos_token_ids=eos_token_ids, warm_up=False)
    try:
        ids = encode_prompts(engine, prompts)
    except BaseException:
        session.close()
        raise
    lens = [len(x) for x in ids]
    budget = [min(s.max_new_tokens, s.ctx_len - n) for n in lens]
    capacity = sum(budget)
    rows = _Rows(capacity, model.config.hidden_size, s.memory_budget_mb << 20, cache_dir)
    # counts tokens, not prompts: the ETA holds from the first steps (a prompt takes many)
    bar = tqdm(total=capacity, desc="distil", unit="tok", disable=not progress, dynamic_ncols=True)
    session.begin(lens, rows, bar, budget)
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
