"""Plain greedy decode: our session (baseline mode of the engine) vs HF `generate`, same model,
same dtype, same prompt, batch 1; runs alternate after a warm-up and the best of each counts.
The session is built as `load_session` builds it: float32 on CPU runs on prepacked oneDNN linears
(sessions/packed.py), over its own copy of the weights so HF's `generate` keeps nn.Linear.

    python bench/bench_session.py [--models smollm2-135m:float32,qwen2.5-coder-1.5b:bfloat16] [--new 64]
"""

from __future__ import annotations

import argparse
import copy
from time import perf_counter

import torch

from spd_cluster.engine import SpDEngine, SpDSettings
from spd_cluster.sessions import eos_token_ids, load_model, load_tokenizer
from spd_cluster.sessions.torch_session import TorchSession

PROMPT = "Write a Python function that parses a CSV file and returns the rows as dictionaries."


def hf_run(model, ids, new):
    t0 = perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=new, do_sample=False)
    return out[0, ids.shape[1]:].tolist(), perf_counter() - t0


def ours_run(engine, ids):
    t0 = perf_counter()
    info = engine.generate([ids[0].tolist()])
    return info.generated_ids[0].tolist(), perf_counter() - t0


def tok_per_s(run) -> float:
    tokens, seconds = run
    return len(tokens) / seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-135m:float32,qwen2.5-coder-1.5b:bfloat16")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"greedy decode, batch 1, {args.new} new tokens, {args.threads} threads, best of {args.repeats}")
    print(f"{'model':24} {'dtype':9} {'HF generate tok/s':>18} {'session tok/s':>14} {'ratio':>6} identical packed")
    for spec in args.models.split(","):
        name, dtype = spec.split(":")
        model = load_model(name, dtype)
        tok = load_tokenizer(name)
        ids = tok(PROMPT, return_tensors="pt")["input_ids"]
        settings = SpDSettings(prefill_seq_len=32, ctx_len=ids.shape[1] + args.new + 8, max_new_tokens=args.new,
                               full_batch_size=1)
        pack = dtype == "float32"
        session = TorchSession(copy.deepcopy(model) if pack else model, 1, settings.ctx_len, pack=pack)
        engine = SpDEngine("baseline", session, tok, settings, eos_token_ids=eos_token_ids(model, tok))
        hf_run(model, ids, 4)
        ours_run(engine, ids)
        # alternate the two so both see the same machine load
        hf_runs, ours_runs = [], []
        for _ in range(args.repeats):
            hf_runs.append(hf_run(model, ids, args.new))
            ours_runs.append(ours_run(engine, ids))
        hf_tps, ours_tps = max(map(tok_per_s, hf_runs)), max(map(tok_per_s, ours_runs))
        same = hf_runs[0][0] == ours_runs[0][0]
        print(f"{name:24} {dtype:9} {hf_tps:18.2f} {ours_tps:14.2f} {ours_tps / hf_tps:6.2f} {same!s:9} {session.packed}")


if __name__ == "__main__":
    main()
