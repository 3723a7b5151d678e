"""Shared shell of the seed-compatible scripts in scripts/ (draft, pld, multiproj).

They take the QEfficient examples' flags, build the same engine the Ray actors run, print the
ExecInfo, then one line per prompt as the seed does: ``print(f"{prompt=} {generation=}")``.

``--num-speculative-tokens`` k means what it means in the seed by default: k is fixed
(``--no-adaptive-k``), so every step proposes k tokens a row (fewer only where the row may emit
fewer, or the method has fewer: a lookup with no match, heads or draft under
``--confidence-threshold``). The target as its own draft at k 4 then accepts every proposal, ~5
tokens a step, as in the seed. ``--adaptive-k`` (the job config's default, ``spd.adaptive_k``)
makes k the most a step proposes: each step proposes the 0..k tokens that pay for their verify
(engine/adaptive.py), at most ~2% slower than target-only where nothing is accepted.
"""

from __future__ import annotations

import argparse

from .engine import SpDSettings, build_engine

DEFAULT_PROMPTS = ["My name is"]
DEFAULT_MODEL = "smollm2-135m"


def comma_separated_ints(x: str) -> list[int]:
    return [int(q) for q in x.split(",")]


def optional_int(x: str | None) -> int | None:
    return None if x in (None, "None", "none", "") else int(x)


def _draft_flags(p) -> None:
    p.add_argument("--confidence-threshold", type=float, default=0.0,
                   help="stop proposing once the product of the proposals' probabilities falls below this; 0 = off")
    p.add_argument("--draft-model-name", default=DEFAULT_MODEL)
    p.add_argument("--target-model-name", default=DEFAULT_MODEL)
    p.add_argument("--draft-device-group", type=comma_separated_ints, default=[0])
    p.add_argument("--draft-dtype", default=None, choices=["float32", "bfloat16", "float16"])


def _pld_flags(p) -> None:
    p.set_defaults(num_speculative_tokens=3, ctx_len=1024)
    p.add_argument("--target-model-name", default=DEFAULT_MODEL)
    p.add_argument("--max-ngram-size", type=int, default=3)


def _multiproj_flags(p) -> None:
    p.add_argument("--confidence-threshold", type=float, default=0.0,
                   help="stop proposing once the product of the heads' probabilities falls below this; 0 = off")
    p.add_argument("--pretrained-model-name-or-path", dest="target_model_name", default=DEFAULT_MODEL,
                   help="target model")
    p.add_argument("--speculator-path", default=None, help="heads directory, if not in the model directory")
    p.add_argument("--prompt-lookup", action="store_true",
                   help="also propose what followed the latest earlier match of the text's tail, when that is "
                        "longer than the heads' guesses and starts with the same token")
    p.add_argument("--max-ngram-size", type=int, default=3, help="with --prompt-lookup: longest n-gram looked up")


# each seed script's own flags (QEfficient's draft_spd_inference.py, pld_spd_inference.py,
# multiprojs_spd_inference.py), by the mode it runs
SCRIPT_FLAGS = {"draft": _draft_flags, "pld": _pld_flags, "multiproj": _multiproj_flags}


def parser(mode: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=f"{mode} speculative decoding (spd_cluster engine)")
    p.add_argument("--prompts", action="append", default=None, help="input prompt (repeatable)")
    p.add_argument("--num-speculative-tokens", type=int, default=4,
                   help="k: every step proposes k tokens a row (the seed's meaning); with --adaptive-k, the most "
                        "a step proposes")
    p.add_argument("--adaptive-k", action=argparse.BooleanOptionalAction, default=False,
                   help="each step proposes the 0..k tokens that pay for their verify (from the acceptance seen "
                        "and the measured step costs); default off: k fixed, as in the seed")
    p.add_argument("--prefill-seq-len", type=int, default=32)
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--prefill-bsz", type=int, default=1, help="accepted for compatibility; prefill runs one prompt at a time")
    p.add_argument("--full-batch-size", type=optional_int, default=None,
                   help="KV slots decoded together (continuous batching); default: 1")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: up to ctx_len")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu | cuda | qaic")
    p.add_argument("--chat-template", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--ignore-eos-token", action="store_true")
    p.add_argument("--target-device-group", type=comma_separated_ints, default=[0])
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0, help="with the prompt's index, seeds its random stream")
    # what a script without the flag runs with
    p.set_defaults(max_ngram_size=3, confidence_threshold=0.0, prompt_lookup=False, draft_model_name=None,
                   draft_dtype=None, draft_device_group=None, speculator_path=None)
    SCRIPT_FLAGS[mode](p)
    return p


def main(mode: str, argv: list[str] | None = None) -> None:
    args = parser(mode).parse_args(argv)
    prompts = args.prompts or DEFAULT_PROMPTS
    target = args.target_model_name
    settings = SpDSettings(
        num_speculative_tokens=args.num_speculative_tokens,
        adaptive_k=args.adaptive_k,
        max_ngram_size=args.max_ngram_size,
        confidence_threshold=args.confidence_threshold,
        prompt_lookup=args.prompt_lookup,
        prefill_seq_len=args.prefill_seq_len,
        ctx_len=args.ctx_len,
        max_new_tokens=args.max_new_tokens or args.ctx_len,
        full_batch_size=args.full_batch_size or 1,
        ignore_eos=args.ignore_eos_token,
        chat_template=args.chat_template,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    try:
        engine = build_engine(
            mode, settings, target, dtype=args.dtype, device=args.device,
            draft_model=args.draft_model_name, draft_dtype=args.draft_dtype,
            speculator_path=args.speculator_path,
            target_device_ids=args.target_device_group, draft_device_ids=args.draft_device_group,
        )
    except (ValueError, FileNotFoundError) as e:  # a model not installed, heads not trained: the message has the fix
        raise SystemExit(f"error: {e}") from None
    exec_info = engine.generate(prompts)
    print(exec_info)
    for prompt, generation in zip(exec_info.prompts, exec_info.generated_texts):
        print(f"{prompt=} {generation=}")
