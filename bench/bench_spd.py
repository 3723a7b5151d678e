"""SpD modes against the target-only baseline, measured in the same run on the same session code.

    python bench/bench_spd.py [--target qwen2.5-coder-1.5b --draft qwen2.5-coder-0.5b --dtype bfloat16]
                              [--new 96] [--k-draft 5] [--k-pld 12] [--k-multiproj 4] [--modes baseline,draft,pld]
                              [--fixed-k] [--overlap]

Two prompt sets, each through the tokenizer's chat template: open generation, and copy-heavy
(edit this code, quote this text, convert this CSV). Prints per set and mode: decode tok/s,
speedup over the baseline, mean accepted tokens per step, the share of steps that proposed
anything, and whether every output is token-identical to the baseline's. k is adaptive (the
engine's default: each step proposes 0..k tokens, engine/adaptive.py); ``--fixed-k`` always
proposes k. ``--overlap`` adds ``draft+overlap``: the draft mode with ``spd.overlap_draft`` (the
draft drafts the next window in a thread while the target verifies; here both share the host's
cores). multiproj runs with random heads (trained heads: bench/bench_heads.py).
"""

from __future__ import annotations

import argparse

import torch

from spd_cluster.engine import SpDEngine, SpDSettings
from spd_cluster.sessions import eos_token_ids, load_model, load_tokenizer
from spd_cluster.sessions.heads import TurboHeads
from spd_cluster.sessions.torch_session import TorchSession

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

PROMPT_SETS = {
    "open": [
        "Write a short story about a robot who learns to paint.",
        "Explain how a hash table works and when to use one.",
    ],
    "copy-heavy": [
        f"Rename the function compute_total to order_total everywhere in this code and return the full code:\n\n{CODE}",
        f"Add type hints to every function in this code and return the complete code:\n\n{CODE}",
        f"Quote the following paragraph exactly, then give it a title:\n\n{TEXT}",
        f"Convert this CSV to a JSON list of objects, one per row:\n\n{CSV}",
    ],
}


def random_heads(hidden: int, num_heads: int) -> TurboHeads:
    torch.manual_seed(0)
    heads = TurboHeads(hidden, num_heads, 1)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return heads


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="qwen2.5-coder-1.5b")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k-draft", type=int, default=5)
    ap.add_argument("--k-pld", type=int, default=12)
    ap.add_argument("--k-multiproj", type=int, default=4)
    ap.add_argument("--modes", default="baseline,draft,pld")
    ap.add_argument("--fixed-k", action="store_true", help="always propose k (adaptive_k off)")
    ap.add_argument("--sets", default="open,copy-heavy")
    ap.add_argument("--overlap", action="store_true", help="also run draft+overlap (spd.overlap_draft)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    modes = args.modes.split(",") + (["draft+overlap"] if args.overlap else [])
    target = load_model(args.target, args.dtype)
    tok = load_tokenizer(args.target)
    draft = load_model(args.draft, args.dtype) if any(m.startswith("draft") for m in modes) else None
    eos = eos_token_ids(target, tok)
    pack = True  # as load_session: CPU linears on few-row kernels (oneDNN float32, AVX2 bfloat16)
    k = {"baseline": 1, "draft": args.k_draft, "draft+overlap": args.k_draft, "pld": args.k_pld,
         "multiproj": args.k_multiproj}
    print(f"target {args.target} ({args.dtype}), draft {args.draft}, {args.new} new tokens, greedy, "
          f"batch 1, {args.threads} threads, chat template, CPU kernels: {pack}, k {'fixed' if args.fixed_k else 'adaptive'}")
    for set_name in args.sets.split(","):
        prompts = PROMPT_SETS[set_name]
        print(f"\n[{set_name}] {len(prompts)} prompts")
        print(f"{'mode':13} {'k':>2} {'decode tok/s':>12} {'e2e tok/s':>10} {'speedup':>8} {'accepted/step':>13} "
              f"{'proposing':>9} identical")
        base = None
        for name in modes:
            mode, _, variant = name.partition("+")
            settings = SpDSettings(num_speculative_tokens=k[name], prefill_seq_len=64, ctx_len=1024,
                                   max_new_tokens=args.new, full_batch_size=1, chat_template=True,
                                   adaptive_k=not args.fixed_k, overlap_draft=variant == "overlap")
            heads = random_heads(target.config.hidden_size, k[mode]) if mode == "multiproj" else None
            session = TorchSession(target, 1, settings.ctx_len, heads=heads, pack=pack)
            d = TorchSession(draft, 1, settings.ctx_len, pack=pack) if mode == "draft" else None
            engine = SpDEngine(mode, session, tok, settings, draft=d, eos_token_ids=eos)
            engine.generate(["Hello"])  # warm-up
            info = engine.generate(prompts)
            m = info.perf_metrics
            ids = [g.tolist() for g in info.generated_ids]
            if base is None:
                base = (m.decode_throughput, ids)
            same = ids == base[1]
            proposing = (m.proposed_per_position[0] / m.num_row_steps) if m.proposed_per_position and m.num_row_steps else 0.0
            print(f"{name:13} {k[name]:>2} {m.decode_throughput:12.2f} {m.e2e_throughput:10.2f} "
                  f"{m.decode_throughput / base[0]:7.2f}x {m.mean_num_accepted_tokens:13.2f} {proposing:9.0%} {same}",
                  flush=True)


if __name__ == "__main__":
    main()
