"""Jobs through Ray: speculative modes against target-only jobs (``--modes``), or the Ray
layer's overhead and scaling. Prints figures; not a test.

``--modes baseline,pld,draft``: each mode runs as a whole job (run_job, what `spd-cluster run`
does: a local Ray, its pairs loaded, shards, results written), one throwaway warm-up job first,
then the jobs interleaved in blocks, forward then reverse (baseline, pld, draft | draft, pld,
baseline | ...), ``--repeats`` blocks (bench/interleave.py). A job's throughput is its generated
tokens over its shards' run seconds (shards.parquet e2e_time: prefill and decode; actor start-up,
the audit, the engine's warm-up and adaptive k's one-time step-cost measurement left out: every
mode starts its first shard warm, engine/warmup.py); also printed over the
pair's busy seconds (busy_s, which has that measurement) and as decode throughput; tokens per
step from the same shards.
Printed per prompt set (bench/prompts/<set>.jsonl): medians and spread, per-block speedups, and
whether every job's output is token-identical to the baseline job's (greedy). A speedup above
tokens per step is an ERROR (exit status 1), not a figure. Each actor takes the machine's cores
divided by its mode's actors per pair (``--cpus-per-actor`` to set it).

    .venv/bin/python bench/bench_cluster.py --config configs/qwen_draft.yaml --modes baseline,pld,draft \
        --sets copy_heavy,open --repeats 1 --max-new-tokens 96          # base, pld, draft, (draft, pld, base)
    .venv/bin/python bench/bench_cluster.py --config configs/qwen_draft.yaml --modes baseline,pld,draft \
        --sets open --temperature 0.7
    .venv/bin/python bench/bench_cluster.py --config configs/qwen_draft.yaml \
        --modes "baseline,draft,draft[spd.draft_vocab=32768]"     # a side with overrides of its own

Without ``--modes``: the Ray layer's overhead and scaling (issue 4 §7):

Same config, same prompts, one thread per actor:
  1. the in-process engine over all prompts (one thread), tokens / e2e_time
  2. the whole job through Ray, 1 pair        (target: >= 0.95x of 1)
  3. the whole job through Ray, 2 pairs       (target: >= 1.8x of 2)
Ray throughput is the job's aggregate e2e_throughput: all generated tokens / job wall time (first
dispatch to last result; actor start-up and model load are not in it, as they are not in 1).

    .venv/bin/python bench/bench_cluster.py                       # configs/demo.yaml (SmolLM2-135M, pld)
    .venv/bin/python bench/bench_cluster.py --prompts 64 --max-new-tokens 64
    .venv/bin/python bench/bench_cluster.py --tiny                # a random tiny llama: seconds, no store
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import this_tree  # noqa: E402, F401  (this tree's spd_cluster in the driver and in Ray's workers)

from spd_cluster.config import load_config  # noqa: E402


def tiny_model(d: Path) -> str:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = [json.loads(line)["prompt"] for line in (REPO / "data" / "sample_prompts.jsonl").open()]
    tk.train_from_iterator(corpus * 4, trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<s>", "</s>"],
                                                           show_progress=False,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=768,
                                     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    m.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def _spin(_) -> float:
    t = time.perf_counter()
    x = 0
    for i in range(10_000_000):
        x += i
    return time.perf_counter() - t


def cpu_ceiling() -> float:
    """How much faster two busy processes finish two units of work than one process finishes
    one each after the other: the most 2 pairs can gain over 1 on this machine (2.0 on two
    free cores; less on a shared or overcommitted VM)."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(2) as pool:
        one = min(pool.map(_spin, [0]) for _ in range(2))[0]
        two = max(pool.map(_spin, [0, 1]))
    return 2 * one / two


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("--prompts", type=int, default=32, help="prompts (the sample set repeated)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--tiny", action="store_true", help="a random tiny llama instead of the config's model")
    ap.add_argument("--modes", help="compare these modes job against job (the first that does not speculate is the "
                                    "baseline), e.g. baseline,pld,draft")
    ap.add_argument("--sets", default="copy_heavy,open", help="--modes: bench/prompts/<set>.jsonl; a+b: a mixed "
                    "set, a's prompts then b's in one job, with tokens per step by part")
    ap.add_argument("--repeats", type=int, default=2, help="--modes: interleaved blocks (2: A B C C B A)")
    ap.add_argument("--first", type=int, default=0, help="--modes: the first N prompts of each set (0: all)")
    ap.add_argument("--k-pld", type=int, default=12)
    ap.add_argument("--k-draft", type=int, default=5)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--cpus-per-actor", type=int, default=0, help="--modes: 0 = cores / actors per pair")
    ap.add_argument("--audit", type=float, default=0.0, help="--modes: audit.fraction of the speculative jobs "
                                                              "(0: off; their audit speedup is printed beside)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="--modes: a config override")
    args = ap.parse_args()
    if args.modes:
        return compare(args)

    work = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    sample = [json.loads(line)["prompt"] for line in (REPO / "data" / "sample_prompts.jsonl").open()]
    ds = work / "prompts.jsonl"
    ds.write_text("".join(json.dumps({"id": i, "prompt": sample[i % len(sample)]}) + "\n" for i in range(args.prompts)))
    model = tiny_model(work / "tiny") if args.tiny else None
    over = [f"dataset.path={ds}", "dataset.id_column=id", f"spd.max_new_tokens={args.max_new_tokens}",
            "spd.ignore_eos=true", f"cluster.shard_size={args.shard_size}", "cluster.cpus_per_actor=1",
            "output.overwrite=true"]
    if model:
        over += [f"target.model={model}", "spd.chat_template=false"]
    cfg = load_config(args.config, over)
    prompts = [sample[i % len(sample)] for i in range(args.prompts)]
    print(f"config {args.config}: mode={cfg.mode} target={cfg.target.model} ({cfg.target.dtype}); "
          f"{args.prompts} prompts x {args.max_new_tokens} new tokens, shard_size={args.shard_size}, "
          f"full_batch_size={cfg.spd.full_batch_size}, one thread per actor", flush=True)

    # 1. in-process, one thread
    import torch

    from spd_cluster.engine.engine import SpDEngine
    from spd_cluster.sessions import load_session, load_tokenizer

    torch.set_num_threads(1)
    s = cfg.spd
    if cfg.mode == "draft":
        raise SystemExit("bench the Ray overhead with a single-actor mode (pld, baseline, multiproj)")
    session = load_session(cfg.target.model, dtype=cfg.target.dtype, full_batch_size=s.full_batch_size,
                           ctx_len=s.ctx_len, prefill_seq_len=s.prefill_seq_len,
                           num_speculative_tokens=s.num_speculative_tokens, with_heads=cfg.mode == "multiproj",
                           speculator_path=cfg.speculator_path)
    engine = SpDEngine(cfg.mode, session, load_tokenizer(cfg.target.model), s, eos_token_ids=session.eos_token_ids)
    engine.generate(prompts[:2])  # warm-up, as an actor's first shard would be after load
    info = engine.generate(prompts)
    local = info.perf_metrics.e2e_throughput
    ids_local = [list(x) for x in info.generated_ids]
    print(f"in-process engine      : {local:8.2f} tok/s  ({info.perf_metrics.num_generated_tokens} tokens "
          f"in {info.perf_metrics.e2e_time:.2f} s)", flush=True)
    del engine, session

    # 2, 3. through Ray
    import pandas as pd
    import ray

    from spd_cluster.cluster import run_job
    from spd_cluster.config import config_from_dict

    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2, logging_level="WARNING",
             _system_config={"worker_niceness": 0})  # as runtime.init_ray: actors at the driver's priority
    figures = {}
    try:
        for pairs in (1, 2):
            c = config_from_dict(cfg.model_dump(mode="json"),
                                 [f"cluster.num_pairs={pairs}", f"output.path={work / f'out{pairs}'}"])
            t0 = time.perf_counter()
            res = run_job(c, progress=False)
            total = time.perf_counter() - t0
            m = res.exec_info.perf_metrics
            figures[pairs] = m.e2e_throughput
            df = pd.read_parquet(work / f"out{pairs}" / "results").sort_values("row")
            same = [list(x) for x in df.generated_ids] == ids_local
            print(f"Ray, {pairs} pair{'s' if pairs > 1 else ' '}          : {m.e2e_throughput:8.2f} tok/s  "
                  f"({m.num_generated_tokens} tokens, job wall {m.e2e_time:.2f} s, with start-up {total:.1f} s; "
                  f"outputs identical to in-process: {same})", flush=True)
    finally:
        ray.shutdown()
    r1, r2 = figures[1] / local, figures[2] / figures[1]
    print(f"Ray 1 pair / in-process: {r1:.3f}x  (target >= 0.95x) {'OK' if r1 >= 0.95 else 'MISSED'}")
    print(f"2 pairs / 1 pair       : {r2:.3f}x  (target >= 1.8x)  {'OK' if r2 >= 1.8 else 'MISSED'}")
    print(f"cores here: {os.cpu_count()}; load average: {os.getloadavg()[0]:.2f}; two busy processes run "
          f"{cpu_ceiling():.2f}x one (the ceiling for 2 pairs / 1 pair on this machine)")


def compare(args) -> None:
    import subprocess

    import pandas as pd

    from interleave import Sample, errors, print_table, run_interleaved, spread, summarize

    from spd_cluster.cluster import run_job
    from spd_cluster.engine.modes import mode as mode_of

    def side(name: str) -> tuple[str, list[str]]:
        """A side of the comparison: ``MODE`` or ``MODE[KEY=VALUE;...]`` (the mode with config
        overrides of its own, e.g. ``draft[spd.draft_vocab=32768]`` beside ``draft``)."""
        mode, _, rest = name.partition("[")
        return mode, [o for o in rest.rstrip("]").split(";") if o]

    names = args.modes.split(",")
    baseline = next((n for n in names if not mode_of(side(n)[0]).speculates), None)
    if baseline is None:
        raise SystemExit(f"--modes needs a mode that does not speculate (the baseline), got {names}")
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    if os.environ.get("SPD_BENCH_COMMIT"):  # an exported tree (git archive) names its commit
        head, dirty = os.environ["SPD_BENCH_COMMIT"] + " (exported tree)", ""
    cores = os.cpu_count() or 1
    k = {"pld": args.k_pld, "draft": args.k_draft}
    print(f"commit {head}{' (+ uncommitted changes)' if dirty else ''}; config {args.config}; "
          f"{args.max_new_tokens} new tokens, {'greedy' if args.temperature == 0 else f'temperature {args.temperature}'}; "
          f"{cores} cores; {args.repeats} interleaved blocks after a warm-up job", flush=True)
    print("command: python " + " ".join(sys.argv), flush=True)
    failed = []
    jobs = 0
    for set_name in args.sets.split(","):
        # a set "a+b": the sets one after the other in one job (a mixed dataset), figures per part too
        parts = set_name.split("+")
        lines, part_of = [], []
        for part in parts:
            src = REPO / "bench" / "prompts" / f"{part}.jsonl"
            if not src.exists():
                raise SystemExit(f"no prompt set {src}")
            got = [line if line.endswith("\n") else line + "\n" for line in src.open() if line.strip()]
            got = got[: args.first] if args.first else got
            lines += got
            part_of += [part] * len(got)
        ds = work / f"{set_name}.jsonl"
        ds.write_text("".join(lines))

        def run(name: str) -> Sample:
            nonlocal jobs
            jobs += 1
            mode, own = side(name)
            m = mode_of(mode)
            out = work / f"{set_name}-{jobs}-{mode}"
            cpus = args.cpus_per_actor or max(1, cores // m.actors_per_pair)
            over = [f"mode={mode}", f"dataset.path={ds}", "dataset.id_column=id", "dataset.prompt_column=prompt",
                    f"spd.max_new_tokens={args.max_new_tokens}", f"spd.temperature={args.temperature}",
                    f"cluster.cpus_per_actor={cpus}", "cluster.num_pairs=1", f"output.path={out}",
                    "output.overwrite=true", f"audit.fraction={args.audit if m.speculates else 0.0}"]
            if mode in k:
                over.append(f"spd.num_speculative_tokens={k[mode]}")
            cfg = load_config(args.config, over + args.overrides + own)
            res = run_job(cfg, progress=False)
            sh = pd.read_parquet(out / "shards.parquet")
            busy, run_s = float(sh.busy_s.sum()), float(sh.e2e_time.sum())
            tokens = int(sh.num_generated_tokens.sum())
            steps = int(sh.num_row_steps.sum())
            tps = float(sh.num_accepted_tokens.sum()) / steps if steps else 1.0
            rows = pd.read_parquet(out / "results").sort_values("row")
            by_part = {}  # part -> tokens per step of its rows (a mixed set)
            for part in parts:
                mine = rows[[part_of[r] == part for r in rows.row]]
                it = int(mine.num_decode_iterations.sum())
                by_part[part] = float(mine.num_accepted_tokens.sum()) / it if it else 1.0
            extra = {"ids": [list(x) for x in rows.generated_ids], "audit": res.audit.get("speedup"), "parts": by_part,
                     "audit_note": res.audit.get("speedup_note"), "audit_tps": res.audit.get("tokens_per_step"),
                     "decode": float(sh.num_decode_tokens.sum()) / float(sh.decode_time.sum()),
                     "busy": tokens / busy}
            return Sample(tokens / run_s, tps if m.speculates else 1.0, run_s, extra)

        print(f"\n[{set_name}] {sum(1 for line in ds.open() if line.strip())} prompts", flush=True)
        warm = [max(names, key=lambda n: mode_of(side(n)[0]).actors_per_pair)]  # the job that loads every model
        runs = run_interleaved(names, run, args.repeats, warmup=warm)
        print("throughput: generated tokens / the shards' run seconds (e2e_time: prefill and decode)")
        figs = summarize(runs, baseline)
        print_table(figs)
        print("over the pair's busy seconds (busy_s: also the step-cost measurement of adaptive k at the "
              "actor's first shard, and writing results)")
        busy = summarize(runs.with_throughput(lambda s: s.extra["busy"]), baseline)
        print_table(busy)
        print("decode throughput: tokens emitted by decode steps / decode seconds")
        dec = summarize(runs.with_throughput(lambda s: s.extra["decode"]), baseline)
        print_table(dec)
        if len(parts) > 1:
            print("tokens per step by part of the set (each part's rows: accepted tokens / decode steps), median [min-max]")
            for name in names:
                cells = []
                for part in parts:
                    mid, lo, hi = spread([s.extra["parts"][part] for s in runs.samples[name]])
                    cells.append(f"{part} {mid:.2f} [{lo:.2f}-{hi:.2f}]")
                print(f"  {name:10} " + "; ".join(cells))
        ref = runs.samples[baseline][0].extra["ids"]
        for name in names:
            ss = runs.samples[name]
            same = all(s.extra["ids"] == ref for s in ss) if args.temperature == 0 else "n/a (sampling)"
            audits = [s.extra["audit"] for s in ss]
            line = f"  {name:10} identical to {baseline} in every job: {same}"
            if args.audit and mode_of(side(name)[0]).speculates:
                line += "; audit speedups: " + ", ".join(
                    f"{a:.2f}x" + (f" ({s.extra['audit_tps']:.2f} tokens/step)" if s.extra["audit_tps"] else "") if a is not None else f"n/a ({s.extra['audit_note']})"
                    for a, s in zip(audits, ss))
            print(line, flush=True)
            if args.temperature == 0 and not same:
                failed.append(f"[{set_name}] {name}: outputs differ from {baseline}")
        failed += [f"[{set_name}] {e}" for e in errors(figs) + errors(busy) + errors(dec)]
    if failed:
        print("\n" + "\n".join(f"ERROR {f}" for f in failed))
        raise SystemExit(1)


if __name__ == "__main__":
    main()
