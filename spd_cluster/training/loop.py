"""Stage 3, loop: train the heads on distilled rows (AdamW, warmup + cosine), evaluate them.

Loss = cross-entropy through the frozen lm_head (optionally mixed with KL to the target's own
distribution at t + h), head h weighted ``head_decay ** (h - 1)`` as in Medusa. The final
accuracy is measured over the vocabulary the heads propose from (a target outside it counts as a
miss): per head, top-1 on the held-out split, shown on the progress bar (with its ETA), printed
at the end and stored in ``speculator_config.json``.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..sessions.heads import TurboHeads
from .data import IGNORE, Distilled, TrainingError, TrainSettings
from .model import Readout, new_heads


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
    heads = new_heads(model, s, heads)
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
    readout = Readout(model, vocab_ids, device)
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
