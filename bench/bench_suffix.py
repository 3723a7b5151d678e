"""suffix vs pld vs the target alone, in one process, interleaved (A B C C B A ...), on datasets
whose outputs repeat one another (records turned into JSON with fixed keys, the same edit on many
small functions) and on open chat prompts.

    nice -n 5 python bench/bench_suffix.py                          # SmolLM2-135M, float32
    nice -n 5 python bench/bench_suffix.py --target qwen2.5-coder-1.5b --dtype bfloat16 --records 32
    nice -n 5 python bench/bench_suffix.py --host --repeats 5          # host cost per step: pld, suffix, suffix-py
    nice -n 5 python bench/bench_suffix.py --also-factor 1             # and suffix at max_spec_factor 1, interleaved

Each run is one ``generate`` over a whole dataset (a job's shard: continuous batching over
``--fbs`` slots, a fresh engine, so suffix's job-wide index starts empty and fills as rows finish),
after a warm-up. Per dataset and mode it prints medians over ``--repeats`` runs, with the spread
(min-max): decode tok/s, tokens per step (accepted proposals + the target's own token), the same
over the first and the last quarter of the dataset's rows, and for suffix the tokens accepted from
the row's own text and from the job's other outputs; every output is compared with the target
alone's (identical). Adaptive k is the engine's default; ``--fixed-k`` always proposes k.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import this_tree  # noqa: F401  (this tree's spd_cluster, not an installed one)
from spd_cluster.engine import SpDEngine, SpDSettings, StepCost
from spd_cluster.sessions import eos_token_ids, load_model, load_tokenizer
from spd_cluster.sessions.torch_session import TorchSession

FIRST = ["Alice", "Bruno", "Chen", "Dana", "Emil", "Farah", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena",
         "Mateo", "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara"]
LAST = ["Martin", "Costa", "Wei", "Levi", "Novak", "Haddad", "Petrov", "Sato", "Okafor", "Berg", "Silva", "Rossi"]
CITY = ["Lyon", "Porto", "Suzhou", "Haifa", "Brno", "Oslo", "Kyoto", "Lagos", "Quito", "Perth", "Tartu", "Cork"]
ROLE = ["engineer", "manager", "designer", "analyst", "nurse", "teacher", "chemist", "pilot"]


def templated(n: int) -> list[str]:
    """Records, each to be turned into JSON with the same keys."""
    g = np.random.default_rng(0)
    out = []
    for _ in range(n):
        first, last = g.choice(FIRST), g.choice(LAST)
        rec = (f"name: {first} {last}; city: {g.choice(CITY)}; age: {int(g.integers(21, 70))}; "
               f"role: {g.choice(ROLE)}; email: {first.lower()}.{last.lower()}@example.com")
        out.append('Turn this record into a JSON object with the keys "name", "city", "age", "role" and "email". '
                   f"Reply with the JSON only.\n\n{rec}")
    return out


VERBS = ["total", "count", "average", "largest", "smallest", "filter", "scale", "merge"]
NOUNS = ["prices", "orders", "scores", "weights", "ratings", "samples", "balances", "votes"]


def code_edits(n: int) -> list[str]:
    """The same edit on many small functions."""
    g = np.random.default_rng(1)
    out = []
    for _ in range(n):
        verb, noun, arg = g.choice(VERBS), g.choice(NOUNS), g.choice(["factor", "limit", "offset", "weight"])
        code = (f"def {verb}_{noun}({noun}, {arg}):\n    result = []\n    for item in {noun}:\n"
                f"        if item > {arg}:\n            result.append(item * {arg})\n    return result\n")
        out.append("Add type hints and a one-line docstring to this function, and rename it to "
                   f"{verb}_{noun}_v2. Return the full code only.\n\n```python\n{code}```")
    return out


OPEN = ["Write a short story about a robot who learns to paint.", "Explain how a hash table works.",
        "What are three tips for learning a new language?", "Describe the water cycle for a child.",
        "Give me a recipe idea for a rainy evening.", "Why is the sky blue?",
        "Write a limerick about a cat and a violin.", "What should I pack for a week of hiking?"]

SETS = {"templated": templated, "code-edit": code_edits, "open": lambda n: (OPEN * (n // len(OPEN) + 1))[:n]}


def quarter(results, which: int) -> float:
    """Tokens per step over the rows of one quarter of the dataset (dataset order)."""
    n = len(results)
    rows = results[which * n // 4 : (which + 1) * n // 4]
    steps = [a for r in rows for a in r.accepted_per_step]
    return sum(steps) / len(steps) if steps else 0.0


def host(repeats: int) -> None:
    """Host milliseconds per step and per emitted token of pld and suffix, with sessions whose
    forwards cost nothing (bench_host.py's FreeSession and prompts), in process CPU time (other
    processes on a shared machine do not count), interleaved, medians [min-max]; and the proposer's
    own share per step and per token (its start, propose, learn and finish: the engine's work grows
    with the width verified, which is not the proposer's cost). ``suffix`` is the process's index
    (the compiled one where it builds, engine/suffix_native.py), ``suffix-py`` the pure-Python one."""
    from bench_host import FreeSession, prompts

    from spd_cluster.engine import suffix as sfx

    print("host CPU ms per step and per token (k 4, 200 new tokens a row, sessions that cost nothing, vocab 49152); "
          f"suffix's index: {'native' if sfx.native() is not None else 'python (no native index here)'}")
    chosen = sfx.native() or False
    modes = ["pld", "suffix", "suffix-py"]
    for fbs in (1, 4):
        got: dict = {m: [] for m in modes}
        for rep in range(repeats):
            for label in (modes if rep % 2 == 0 else modes[::-1]):
                mode = label.split("-")[0]
                sfx._NATIVE = False if label == "suffix-py" else chosen  # read when the proposer is made
                s = SpDSettings(num_speculative_tokens=4, prefill_seq_len=32, ctx_len=1024, max_new_tokens=200,
                                full_batch_size=fbs, ignore_eos=True)
                cost = StepCost([0.010 * (1 + 0.05 * w) for w in range(5)], draft_s=0.001)
                engine = SpDEngine(mode, FreeSession(fbs, s.ctx_len, 49152), None, s, eos_token_ids=[], step_cost=cost)
                work = prompts(fbs, 200, seed=fbs)
                engine.generate(work[:1])  # warm-up
                spent = [0.0]  # the proposer's own CPU time (start, propose, learn, finish)
                for name in ("start", "propose", "learn", "finish"):
                    if not hasattr(engine.proposer, name):
                        continue
                    def timed(*a, _f=getattr(engine.proposer, name), **kw):
                        t = time.process_time()
                        try:
                            return _f(*a, **kw)
                        finally:
                            spent[0] += time.process_time() - t
                    setattr(engine.proposer, name, timed)
                t0 = time.process_time()
                m = engine.generate(work).perf_metrics
                cpu = 1000 * (time.process_time() - t0)
                got[label].append((cpu / m.decode_iterations, cpu / m.num_decode_tokens, m.mean_num_accepted_tokens,
                                  1000 * spent[0] / m.decode_iterations, 1000 * spent[0] / m.num_decode_tokens))
        for mode, v in got.items():
            v = np.array(v)
            print(f"fbs {fbs} {mode:9} ms/step {np.median(v[:, 0]):.3f} [{v[:, 0].min():.3f}-{v[:, 0].max():.3f}]  "
                  f"ms/token {np.median(v[:, 1]):.3f} [{v[:, 1].min():.3f}-{v[:, 1].max():.3f}]  "
                  f"tokens/step {np.median(v[:, 2]):.2f}  proposer ms/step {np.median(v[:, 3]):.3f} "
                  f"[{v[:, 3].min():.3f}-{v[:, 3].max():.3f}]  ms/token {np.median(v[:, 4]):.4f} "
                  f"[{v[:, 4].min():.4f}-{v[:, 4].max():.4f}]")
        ratios = {m: np.array(got[m])[:, 3] / np.array(got["pld"])[:, 3] for m in modes[1:]}
        print(f"fbs {fbs} proposer ms/step / pld's (same repeat): " + ", ".join(
            f"{m} {np.median(r):.2f} [{r.min():.2f}-{r.max():.2f}]" for m, r in ratios.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--sets", default="templated,code-edit,open")
    ap.add_argument("--records", type=int, default=32, help="rows of the templated and code-edit sets")
    ap.add_argument("--open", type=int, default=8, help="rows of the open set")
    ap.add_argument("--new", type=int, default=96, help="max new tokens a row")
    ap.add_argument("--fbs", type=int, default=4)
    ap.add_argument("--k", type=int, default=8, help="k of pld and suffix")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each mode (order A B C, then C B A, ...)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fixed-k", action="store_true", help="always propose k (adaptive_k off)")
    ap.add_argument("--factor", type=float, default=None, help="spd.suffix_max_spec_factor (default: the setting's)")
    ap.add_argument("--also-factor", default="", help="comma-separated suffix_max_spec_factor values run as extra "
                                                      "modes suffix@F in the same interleaving (e.g. 1)")
    ap.add_argument("--host", action="store_true", help="only the host cost of pld and suffix (no model)")
    args = ap.parse_args()
    if args.host:
        return host(max(args.repeats, 3))
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.target, args.dtype), load_tokenizer(args.target)
    eos = eos_token_ids(model, tok)
    modes = ["baseline", "pld", "suffix"] + [f"suffix@{f}" for f in args.also_factor.split(",") if f]
    extra = {} if args.factor is None else {"suffix_max_spec_factor": args.factor}
    print("load average", open("/proc/loadavg").read().split()[:3])
    ctx = 1024
    session = TorchSession(model, args.fbs, ctx, pack=True)
    cost = StepCost.measure(session, args.fbs, args.k + 1)  # one curve for every run: the same device
    print(f"target {args.target} ({args.dtype}), fbs {args.fbs}, k {args.k} ({'fixed' if args.fixed_k else 'adaptive'}), "
          f"{args.new} new tokens, {args.threads} threads, greedy, chat template, {args.repeats} runs a mode "
          f"interleaved; medians [min-max]")

    def run(mode, prompts):
        kw = extra if mode == "suffix" else {}
        if mode.startswith("suffix@"):
            mode, kw = "suffix", {"suffix_max_spec_factor": float(mode[7:])}
        s = SpDSettings(num_speculative_tokens=args.k if mode != "baseline" else 1, prefill_seq_len=64, ctx_len=ctx,
                        max_new_tokens=args.new, full_batch_size=args.fbs, chat_template=True,
                        adaptive_k=not args.fixed_k, **kw)
        engine = SpDEngine(mode, session, tok, s, eos_token_ids=eos, step_cost=cost)
        return engine.generate(prompts, prompt_ids=list(range(len(prompts))))

    run("baseline", ["Hello"])  # warm-up
    for set_name in args.sets.split(","):
        prompts = SETS[set_name](args.open if set_name == "open" else args.records)
        got = {m: [] for m in modes}
        t0 = time.perf_counter()
        for rep in range(args.repeats):
            for mode in (modes if rep % 2 == 0 else modes[::-1]):
                got[mode].append(run(mode, prompts))
        base_ids = [x.tolist() for x in got["baseline"][0].generated_ids]
        print(f"\n[{set_name}] {len(prompts)} rows, {time.perf_counter() - t0:.0f} s")
        print(f"{'mode':9} {'decode tok/s':>20} {'tokens/step':>18} {'1st quarter':>12} {'last quarter':>12} "
              f"{'x target':>9} identical  accepted row/job")
        med = {}
        for mode in modes:
            infos = got[mode]
            tps = [i.perf_metrics.decode_throughput for i in infos]
            tok_step = [i.perf_metrics.mean_num_accepted_tokens for i in infos]
            q1 = [quarter(i.results, 0) for i in infos]
            q4 = [quarter(i.results, 3) for i in infos]
            same = all([x.tolist() for x in i.generated_ids] == base_ids for i in infos)
            med[mode] = (float(np.median(tps)), float(np.median(tok_step)))
            m = infos[-1].perf_metrics
            src = f"{m.suffix_accepted_row}/{m.suffix_accepted_job}" if mode.startswith("suffix") else ""
            speed = med[mode][0] / med["baseline"][0] if "baseline" in med else 1.0
            print(f"{mode:9} {med[mode][0]:8.1f} [{min(tps):.1f}-{max(tps):.1f}] {med[mode][1]:6.2f} "
                  f"[{min(tok_step):.2f}-{max(tok_step):.2f}] {np.median(q1):12.2f} {np.median(q4):12.2f} "
                  f"{speed:8.2f}x {str(same):9} {src}", flush=True)
            if speed > med[mode][1] * 1.02:
                print(f"  ERROR: {mode} is {speed:.2f}x the target alone at {med[mode][1]:.2f} tokens per step: "
                      "a speedup above tokens per step is a measurement artefact")
        s, p = med["suffix"], med["pld"]
        print(f"suffix / pld: tokens per step {s[1] / p[1]:.2f}x, decode tok/s {s[0] / p[0]:.2f}x; "
              f"suffix / target: {s[0] / med['baseline'][0]:.2f}x; load average "
              f"{open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    main()
