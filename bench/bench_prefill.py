"""A bfloat16 session's prefill of the bench prompts: on the kernel, and on PyTorch's own linears.

    python bench/bench_prefill.py [--models qwen2.5-coder-1.5b,qwen2.5-coder-0.5b] [--set copy_heavy]
                                  [--chunks 32,256] [--repeats 4]

One session per model (load_session's: CPU kernels on, the tiles this CPU runs), every prompt of
``bench/prompts/<set>.jsonl`` in its chat template, prefilled whole in chunks of each ``--chunks``
(``prefill_chunks``, as the engine does). Sides: ``kernel@C`` runs every chunk on the bfloat16
kernel (the path before prefills took PyTorch's linears), ``library@C`` as sessions run now
(chunks wider than 16 tokens on ``F.linear`` where the tiles are AVX512-BF16: ``bf16.library_prefill``).
Blocks A B ... B A after a warm-up; printed per side: seconds for all the prompts, median
[min-max] over blocks, and each side's per-block ratio to the first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import this_tree  # noqa: F401  (this tree's spd_cluster, not an installed one)
from spd_cluster.sessions import bf16, load_session, load_tokenizer
from spd_cluster.sessions.base import prefill_chunks

PROMPTS = Path(__file__).resolve().parent / "prompts"


def prompts(model: str, name: str) -> list[np.ndarray]:
    tok = load_tokenizer(model)
    rows = [json.loads(line) for line in (PROMPTS / f"{name}.jsonl").read_text().splitlines() if line.strip()]
    return [np.array(tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=True,
                                             add_generation_prompt=True, return_dict=True)["input_ids"])
            for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen2.5-coder-1.5b,qwen2.5-coder-0.5b")
    ap.add_argument("--set", default="copy_heavy")
    ap.add_argument("--chunks", default="32,256")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    on_library = bf16.library_prefill
    for model in args.models.split(","):
        session = load_session(model, dtype="bfloat16", full_batch_size=1, ctx_len=1024)
        ids = prompts(model, args.set)
        sides = [(f"{path}@{c}", path, int(c)) for c in args.chunks.split(",") for path in ("kernel", "library")]

        def prefill_all(path: str, chunk: int) -> float:
            bf16.library_prefill = on_library if path == "library" else (lambda: False)
            try:
                t0 = time.perf_counter()
                for p in ids:
                    for call in prefill_chunks(p, chunk, 0):
                        session.run(call.as_inputs())
                return time.perf_counter() - t0
            finally:
                bf16.library_prefill = on_library

        for _, path, chunk in sides:
            prefill_all(path, chunk)
        times: dict[str, list[float]] = {name: [] for name, _, _ in sides}
        for r in range(args.repeats):
            for name, path, chunk in sides if r % 2 == 0 else sides[::-1]:
                times[name].append(prefill_all(path, chunk))
        lengths = [len(p) for p in ids]
        print(f"{model} bfloat16, tiles {bf16.isa()}, {args.threads} threads: {len(ids)} {args.set} prompts of "
              f"{min(lengths)}-{max(lengths)} tokens ({sum(lengths)} in all), {args.repeats} blocks; s, median [min-max]")
        first = sides[0][0]
        for name, ts in times.items():
            ratios = [t / f for t, f in zip(ts, times[first])]
            print(f"  {name:14} {statistics.median(ts):6.2f} [{min(ts):.2f}-{max(ts):.2f}]   "
                  f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}] of {first}")


if __name__ == "__main__":
    main()
