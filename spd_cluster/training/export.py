"""Stage 4, export: the whole job (distil, train, save) and what it reports.

Heads are saved in the Turbo format QEfficient's multiproj example reads
(``speculator_config.json`` + ``speculator.safetensors``), with the held-out accuracy and every
training setting in the config.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

from ..sessions.heads import CONFIG_FILE, WEIGHTS_FILE, TurboHeads
from .data import Distilled, TrainingError, TrainSettings, distill
from .loop import train


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


# What more distilled data gave (docs/heads.md, Qwen2.5-Coder-1.5B bf16, held-out top-1 of heads 1-4)
USEFUL_TOKENS = 25_000
MEASURED = "25k tokens: 0.72/0.54/0.42/0.32 (2.07 tokens/step); 50k: 0.75/0.57/0.45/0.36 (2.12, 1.79x)"


def advice(report: dict) -> str:
    """One line on what the heads' data gives and what more would give."""
    n = int(report.get("generated_tokens") or 0)
    more = ("distil more prompts (--dataset: thousands of prompts like the ones you will run; "
            "--max-new-tokens) or add saved rows (--save-distilled / --distilled)")
    if n < USEFUL_TOKENS:
        return (f"these heads saw {n:,} distilled tokens: too few to be useful (multiproj stays lossless, but "
                f"accepts little). Measured on Qwen2.5-Coder-1.5B, docs/heads.md: {MEASURED}; {more}")
    return f"these heads saw {n:,} distilled tokens (docs/heads.md, Qwen2.5-Coder-1.5B: {MEASURED}); for more: {more}"

