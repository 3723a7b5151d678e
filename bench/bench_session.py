"""Plain greedy decode: our session (baseline mode of the engine) vs HF `generate`, same model,
same dtype, same prompt, batch 1; runs alternate after a warm-up (HF, then our session on each
set of bfloat16 tiles this CPU runs, forward then reverse order in turn); it prints the best of
each and the median of the paired ratios (each session run over its neighbouring HF run), which
is the steadier figure on a machine whose speed drifts, and whether every run gave HF's tokens.
The session is built as `load_session` builds it, CPU kernels on (float32: prepacked oneDNN linears,
sessions/packed.py; bfloat16: our kernel, sessions/bf16.py, on its AVX2 tiles and, where the CPU
has AVX512-BF16, on those: the same tokens, switched per run with `bf16.set_isa`), over its own
copy of the model so HF's `generate` keeps nn.Linear.

    python bench/bench_session.py [--models smollm2-135m:float32,qwen2.5-coder-1.5b:bfloat16] [--new 64]
"""

from __future__ import annotations

import argparse
import copy
import statistics
from time import perf_counter

import torch

import this_tree  # noqa: F401  (this tree's spd_cluster, not an installed one)
from spd_cluster.engine import SpDEngine, SpDSettings
from spd_cluster.sessions import bf16, eos_token_ids, load_model, load_tokenizer
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
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"greedy decode, batch 1, {args.new} new tokens, {args.threads} threads, best of {args.repeats}")
    print(f"{'model':24} {'dtype':9} {'tiles':12} {'HF generate tok/s':>18} {'session tok/s':>14} {'ratio':>6} "
          f"{'median paired':>13} identical packed")
    for spec in args.models.split(","):
        name, dtype = spec.split(":")
        model = load_model(name, dtype)
        tok = load_tokenizer(name)
        ids = tok(PROMPT, return_tensors="pt")["input_ids"]
        settings = SpDSettings(prefill_seq_len=32, ctx_len=ids.shape[1] + args.new + 8, max_new_tokens=args.new,
                               full_batch_size=1)
        # as load_session builds it (CPU kernels on), over a copy so HF's generate keeps nn.Linear
        session = TorchSession(copy.deepcopy(model), 1, settings.ctx_len, pack=True)
        engine = SpDEngine("baseline", session, tok, settings, eos_token_ids=eos_token_ids(model, tok))
        default = bf16.isa()
        tiles = bf16.isas() if session.packed == "avx2-bf16" else ["-"]

        def ours(isa):
            if isa != "-":
                bf16.set_isa(isa)
            return ours_run(engine, ids)

        sides = {"HF": lambda: hf_run(model, ids, args.new), **{isa: (lambda isa=isa: ours(isa)) for isa in tiles}}
        hf_run(model, ids, 4)
        for isa in tiles:
            ours(isa)
        # alternate the sides so all see the same machine load; neither order always (this
        # machine slows under load)
        runs = {n: [] for n in sides}
        for i in range(args.repeats):
            for n in list(sides) if i % 2 == 0 else list(sides)[::-1]:
                runs[n].append(sides[n]())
        if default is not None:
            bf16.set_isa(default)
        hf_tps = max(map(tok_per_s, runs["HF"]))
        for isa in tiles:
            ours_tps = max(map(tok_per_s, runs[isa]))
            same = all(h[0] == o[0] for h, o in zip(runs["HF"], runs[isa]))
            paired = statistics.median(tok_per_s(o) / tok_per_s(h) for h, o in zip(runs["HF"], runs[isa]))
            print(f"{name:24} {dtype:9} {isa:12} {hf_tps:18.2f} {ours_tps:14.2f} {ours_tps / hf_tps:6.2f} "
                  f"{paired:13.2f} {same!s:9} {session.packed}")
        if len(tiles) > 1:
            print(f"{'':24} {'':9} tiles give the same tokens in every run: "
                  f"{all(r[0] == runs[tiles[0]][0][0] for isa in tiles for r in runs[isa])}")


if __name__ == "__main__":
    main()
