"""Stage 5, CLI: ``spd-cluster train-heads``."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .data import TrainingError, TrainSettings, read_prompts
from .export import advice, check_out_dir, format_accuracy, train_heads


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
    print(advice(report))
    print(f"heads written to {out}; use them: spd-cluster run CONFIG --set mode=multiproj --set "
          f"speculator_path={out} (configs/multiproj.yaml), or scripts/multiprojs_spd_inference.py "
          f"--speculator-path {out}")
    print(json.dumps({"out": str(out), **{k: v for k, v in report.items() if k != 'losses'}}))
    return 0
