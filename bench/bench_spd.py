"""SpD modes against the target-only baseline, in one process, interleaved and repeated.

    python bench/bench_spd.py [--target qwen2.5-coder-1.5b --draft qwen2.5-coder-0.5b --dtype bfloat16]
                              [--sets open,copy_heavy] [--prompts 6] [--new 96] [--repeats 3]
                              [--k-draft 5] [--k-pld 12] [--k-multiproj 4] [--modes baseline,pld,draft]
                              [--fixed-k] [--overlap] [--temperature 0.7]

Prompt sets are bench/prompts/<set>.jsonl (open generation; copy-heavy: edit this code, quote
this text, convert this CSV), each through the tokenizer's chat template; or ``--sets
builtin-open,builtin-copy`` for the small sets written in this file. Each mode has its own
engine (and session) over the same loaded models. After one discarded warm-up run of every
engine over the set (the first run after a model loads can be 50% slower), the modes run in
blocks, forward then reverse (baseline, pld, draft | draft, pld, baseline | ...), ``--repeats``
blocks (bench/interleave.py). Printed per set: each mode's decode throughput (median [min-max],
IQR), tokens per step, and speedup (median [min-max] of its per-block ratio to the baseline);
then the same on end-to-end throughput (prefill included); and whether every output of every
run is token-identical to the baseline's (greedy). A speedup above tokens per step cannot be
true and is printed as an ERROR (exit status 1), not as a figure.

k is adaptive (the engine's default: each step proposes 0..k tokens, engine/adaptive.py);
``--fixed-k`` always proposes k. ``--overlap`` adds ``draft+overlap`` (spd.overlap_draft; here
draft and target share the host's cores). multiproj runs with random heads (trained heads:
bench/bench_heads.py). ``--temperature`` > 0 samples (adaptive k stays on): the modes whose
proposals are point masses (pld, suffix, multiproj) emit the baseline's sampled text token for
token (engine/sampling.py) and are checked for it; a sampling draft's text is another sample of
the same distribution, so its identical check is skipped.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import this_tree  # noqa: E402, F401  (this tree's spd_cluster, not an installed one)

from interleave import Sample, errors, print_table, run_interleaved, summarize  # noqa: E402

from spd_cluster.engine import SpDEngine, SpDSettings  # noqa: E402
from spd_cluster.engine.modes import mode as mode_of  # noqa: E402
from spd_cluster.sessions import eos_token_ids, load_model, load_tokenizer  # noqa: E402
from spd_cluster.sessions.heads import TurboHeads  # noqa: E402
from spd_cluster.sessions.torch_session import TorchSession  # noqa: E402

HERE = Path(__file__).resolve().parent

CODE = '''def compute_total(items, tax_rate):
    subtotal = 0
    for item in items:
        price = item["price"]
        quantity = item["quantity"]
        subtotal += price * quantity
    tax = subtotal * tax_rate
    total = subtotal + tax
    return round(total, 2)


def describe_order(order):
    lines = []
    for item in order["items"]:
        lines.append(f"{item['name']}: {item['quantity']} x {item['price']}")
    lines.append(f"Total: {compute_total(order['items'], order['tax_rate'])}")
    return "\\n".join(lines)
'''

TEXT = ("The committee met on Tuesday to review the budget for the coming year. After a long "
        "discussion, the members agreed to increase funding for the library, to repair the roof of "
        "the community hall, and to hire two additional staff for the summer programme.")

CSV = """name,city,age,role
Alice Martin,Lyon,34,engineer
Bruno Costa,Porto,41,manager
Chen Wei,Suzhou,29,designer
Dana Levi,Haifa,38,analyst
"""

BUILTIN = {
    "builtin-open": [
        "Write a short story about a robot who learns to paint.",
        "Explain how a hash table works and when to use one.",
    ],
    "builtin-copy": [
        f"Rename the function compute_total to order_total everywhere in this code and return the full code:\n\n{CODE}",
        f"Add type hints to every function in this code and return the complete code:\n\n{CODE}",
        f"Quote the following paragraph exactly, then give it a title:\n\n{TEXT}",
        f"Convert this CSV to a JSON list of objects, one per row:\n\n{CSV}",
    ],
}


def prompt_set(name: str) -> list[str]:
    if name in BUILTIN:
        return BUILTIN[name]
    path = HERE / "prompts" / f"{name}.jsonl"
    if not path.exists():
        raise SystemExit(f"no prompt set {name!r}: {path} does not exist (builtin: {', '.join(BUILTIN)})")
    return [json.loads(line)["prompt"] for line in path.open() if line.strip()]


def random_heads(hidden: int, num_heads: int) -> TurboHeads:
    torch.manual_seed(0)
    heads = TurboHeads(hidden, num_heads, 1)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return heads


def commit() -> str:
    """HEAD's short hash (+ whether tracked files differ from it); an exported tree (git archive)
    names its commit in SPD_BENCH_COMMIT."""
    import os

    if os.environ.get("SPD_BENCH_COMMIT"):
        return os.environ["SPD_BENCH_COMMIT"] + " (exported tree)"
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True).stdout.strip()
        return head + (" (+ uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="qwen2.5-coder-1.5b")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k-draft", type=int, default=5)
    ap.add_argument("--k-pld", type=int, default=12)
    ap.add_argument("--k-multiproj", type=int, default=4)
    ap.add_argument("--modes", default="baseline,pld,draft", help="the first mode that does not speculate is the baseline")
    ap.add_argument("--fixed-k", action="store_true", help="always propose k (adaptive_k off)")
    ap.add_argument("--sets", default="open,copy_heavy", help="bench/prompts/<set>.jsonl, or builtin-open,builtin-copy")
    ap.add_argument("--prompts", type=int, default=0, help="the first N prompts of each set (0: all)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved blocks (each runs every mode once)")
    ap.add_argument("--overlap", action="store_true", help="also run draft+overlap (spd.overlap_draft)")
    ap.add_argument("--temperature", type=float, default=0.0, help="> 0: speculative sampling")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = args.modes.split(",") + (["draft+overlap"] if args.overlap else [])
    baseline = next((n for n in names if not mode_of(n.partition("+")[0]).speculates), None)
    if baseline is None:
        raise SystemExit(f"--modes needs a mode that does not speculate (the baseline), got {names}")
    target = load_model(args.target, args.dtype)
    tok = load_tokenizer(args.target)
    needs_draft = any(mode_of(n.partition("+")[0]).needs_draft for n in names)
    draft = load_model(args.draft, args.dtype) if needs_draft else None
    eos = eos_token_ids(target, tok)
    pack = True  # as load_session: CPU linears on few-row kernels (oneDNN float32, AVX2 bfloat16)
    k = {"draft": args.k_draft, "pld": args.k_pld, "multiproj": args.k_multiproj}
    greedy = args.temperature == 0
    print(f"commit {commit()}; target {args.target} ({args.dtype}), draft {args.draft if needs_draft else '-'}, "
          f"{args.new} new tokens, {'greedy' if greedy else f'temperature {args.temperature}'}, batch 1, "
          f"{args.threads} threads, chat template, CPU kernels: {pack}, k "
          f"{'fixed' if args.fixed_k else 'adaptive'}, {args.repeats} interleaved blocks after a warm-up")
    print("command: python " + " ".join(sys.argv))
    failed = []
    for set_name in args.sets.split(","):
        prompts = prompt_set(set_name)
        if args.prompts:
            prompts = prompts[: args.prompts]
        engines = {}
        for name in names:
            mode, _, variant = name.partition("+")
            spec = mode_of(mode)
            settings = SpDSettings(num_speculative_tokens=k.get(mode, 1), prefill_seq_len=64, ctx_len=1024,
                                   max_new_tokens=args.new, full_batch_size=1, chat_template=True,
                                   adaptive_k=not args.fixed_k, overlap_draft=variant == "overlap",
                                   temperature=args.temperature, seed=0)
            heads = random_heads(target.config.hidden_size, k[mode]) if spec.uses_heads else None
            session = TorchSession(target, 1, settings.ctx_len, heads=heads, pack=pack)
            d = TorchSession(draft, 1, settings.ctx_len, pack=pack) if spec.needs_draft else None
            engines[name] = SpDEngine(mode, session, tok, settings, draft=d, eos_token_ids=eos)

        def run(name: str) -> Sample:
            info = engines[name].generate(prompts)
            m = info.perf_metrics
            proposing = (m.proposed_per_position[0] / m.num_row_steps) if m.proposed_per_position and m.num_row_steps else 0.0
            return Sample(m.decode_throughput, m.mean_num_accepted_tokens or 1.0, m.e2e_time,
                          {"e2e": m.e2e_throughput, "ids": [g.tolist() for g in info.generated_ids],
                           "proposing": proposing})

        print(f"\n[{set_name}] {len(prompts)} prompts", flush=True)
        runs = run_interleaved(names, run, args.repeats)
        print("decode throughput (tokens emitted by decode steps / decode time):")
        figs = summarize(runs, baseline)
        print_table(figs)
        print("end-to-end throughput (all tokens / run time, prefill included):")
        e2e = summarize(runs.with_throughput(lambda s: s.extra["e2e"]), baseline)
        print_table(e2e)
        ref = runs.samples[baseline][0].extra["ids"]
        for name in names:
            ss = runs.samples[name]
            checked = greedy or not mode_of(name.partition("+")[0]).needs_draft  # sampled: point masses only
            same = all(s.extra["ids"] == ref for s in ss) if checked else "n/a (a sampling draft)"
            share = sorted(s.extra["proposing"] for s in ss)[len(ss) // 2]
            print(f"  {name:14} identical to {baseline} in every run: {same}; steps proposing (median): {share:.0%}")
            if checked and not same:
                failed.append(f"[{set_name}] {name}: outputs differ from {baseline}")
        failed += [f"[{set_name}] {e}" for e in errors(figs) + errors(e2e)]
        del engines
    if failed:
        print("\n" + "\n".join(f"ERROR {f}" for f in failed))
        raise SystemExit(1)


if __name__ == "__main__":
    main()
