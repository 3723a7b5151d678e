"""Score multiproj heads in a minute instead of a full engine run: replay greedy decoding on
teacher-forced hidden states and count what each step would accept.

    python bench/sim_heads.py --heads-dir heads [more ...] [--prompts data/code_prompts_eval.txt]
        [--new 64] [--thresholds 0 0.2 0.3] [--lookup] [--tree] [--cache rows.npz]

The target greedily continues each prompt (our engine, baseline, bf16 on the CPU kernels); one
forward over prompt + continuation gives the last hidden state at every position. Replaying
decoding on them: a step at emitted token e proposes each head's argmax at the hidden state of
the token before it, keeps the leading ones whose probabilities multiply to at least the
threshold (as ``spd.confidence_threshold``), accepts the prefix that matches the continuation
and emits it plus the target's own token. Tokens per step and proposals per step come out within
~0.01 of ``bench/bench_heads.py``'s engine figures (which also time the steps), so heads and
thresholds can be compared quickly; ``bench_heads.py`` stays the measurement of speed.

``--lookup`` also replays ``spd.prompt_lookup`` (the row's own text searched for its tail; what
followed replaces shorter head guesses that start with the same token).

``--tree`` also prints what tree verification would accept (not implemented in the engine):
every path of the heads' top-``--tree-width`` candidates whose probabilities multiply to at
least the threshold, at most ``--tree-nodes`` nodes, each node one verify row.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import this_tree  # noqa: F401  (this tree's spd_cluster, not an installed one)
from spd_cluster.engine import PromptLookupProposer, SpDEngine, SpDSettings
from spd_cluster.engine.proposers import NgramIndex, with_lookup
from spd_cluster.sessions import eos_token_ids, load_model, load_tokenizer
from spd_cluster.sessions.heads import TurboHeads
from spd_cluster.sessions.torch_session import TorchSession
from spd_cluster.training import read_prompts

EVAL_FILE = Path(__file__).resolve().parent.parent / "data" / "code_prompts_eval.txt"


def baseline(model, tok, new: int, slots: int = 4, pack: bool = True) -> SpDEngine:
    s = SpDSettings(prefill_seq_len=64, ctx_len=512, max_new_tokens=new, full_batch_size=slots, chat_template=True)
    return SpDEngine("baseline", TorchSession(model, slots, 512, pack=pack), tok, s,
                     eos_token_ids=eos_token_ids(model, tok))


def continuations(model, tok, prompts, new: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(hidden [1 + G, D] from the last prompt token on, greedy continuation [G]) per prompt."""
    engine = baseline(model, tok, new)
    out = []
    with torch.inference_mode():
        for p, g in zip(prompts, engine.generate(prompts).generated_ids):
            ids = engine.encode(p)
            h = model.model(input_ids=torch.from_numpy(np.concatenate([ids, g]))[None]).last_hidden_state[0]
            out.append((h[len(ids) - 1 :].float().numpy(), np.asarray(g)))
    return out


def head_candidates(heads: TurboHeads, lm_head: torch.Tensor, hidden: np.ndarray, width: int):
    """Top-``width`` (probabilities [T, H, w], token ids [T, H, w]) of each head at each position."""
    vocab = heads.vocab if heads.vocab is not None else torch.arange(lm_head.shape[0])
    with torch.inference_mode():
        logits = heads(torch.from_numpy(hidden))[:, 1:] @ lm_head[vocab].float().T
        probs, index = torch.softmax(logits, -1).topk(width, dim=-1)
    return probs.numpy(), vocab.numpy()[index.numpy()]


def replay(seqs, policy, num_heads: int) -> tuple[float, float]:
    """(tokens per step, verify rows beyond the first per step) of greedy decoding with ``policy``."""
    tokens = rows = steps = 0
    for prompt, probs, cands, g in seqs:
        e = 0
        while e < len(g) - 1:
            limit = min(num_heads, len(g) - 2 - e)  # as the engine: no proposal past max_new_tokens - 1
            text = lambda: np.concatenate([prompt, g[: e + 1]])  # noqa: E731  (only a lookup needs it)
            n, r = policy(probs[e], cands[e], g[e + 1 : e + 1 + limit], limit, text)
            tokens, rows, steps, e = tokens + n + 1, rows + r, steps + 1, e + n + 1
    return tokens / steps, rows / steps


def chain(threshold: float, lookup: PromptLookupProposer | None = None):
    def policy(probs, cands, truth, limit, text):
        m = limit if threshold <= 0 else int((np.cumprod(probs[:limit, 0]) >= threshold).sum())
        guess = cands[:m, 0]
        if lookup is not None:  # as MultiProjProposer.propose
            guess = with_lookup(guess, text(), limit, NgramIndex(lookup.max_ngram_size))
        n = 0
        while n < len(guess) and guess[n] == truth[n]:
            n += 1
        return n, len(guess)
    return policy


def tree(threshold: float, width: int, max_nodes: int):
    def policy(probs, cands, truth, limit, text):
        nodes, stack = [], [((), 1.0)]
        while stack:
            path, p = stack.pop()
            if len(path) < limit:
                for r in range(width):
                    q = p * probs[len(path), r]
                    if q >= threshold:
                        nodes.append((q, path + (r,)))
                        stack.append((path + (r,), q))
        kept = {path for _, path in sorted(nodes, reverse=True)[:max_nodes]}
        n, path = 0, ()
        while n < limit:
            hit = [r for r in range(width) if cands[n, r] == truth[n]]
            if not hit or path + (hit[0],) not in kept:
                break
            path, n = path + (hit[0],), n + 1
        return n, len(kept)
    return policy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--heads-dir", nargs="+", required=True)
    ap.add_argument("--prompts", default=str(EVAL_FILE))
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.2, 0.3])
    ap.add_argument("--lookup", action="store_true", help="also replay spd.prompt_lookup")
    ap.add_argument("--max-ngram-size", type=int, default=3)
    ap.add_argument("--tree", action="store_true")
    ap.add_argument("--tree-width", type=int, default=2)
    ap.add_argument("--tree-nodes", type=int, default=6)
    ap.add_argument("--cache", default=None, help="keep the hidden states here (reused when it exists)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, "bfloat16")
    tok = load_tokenizer(args.model)
    prompts = read_prompts(args.prompts)[: args.num_prompts]
    if args.cache and Path(args.cache).exists():
        with np.load(args.cache) as f:
            data = [(f[f"h{i}"], f[f"g{i}"]) for i in range(int(f["n"]))]
    else:
        data = continuations(model, tok, prompts, args.new)
        if args.cache:
            np.savez(args.cache, n=len(data), **{f"h{i}": h for i, (h, _) in enumerate(data)},
                     **{f"g{i}": g for i, (_, g) in enumerate(data)})
    lm_head = model.get_output_embeddings().weight.detach()
    encode = baseline(model, tok, args.new, slots=1, pack=False).encode
    prompt_ids = [encode(p) for p in prompts[: len(data)]]
    lookup = PromptLookupProposer(args.max_ngram_size, 4) if args.lookup else None
    print(f"{len(data)} prompts x {args.new} tokens of {args.prompts}")
    for d in args.heads_dir:
        heads = TurboHeads.load(d, hidden_size=lm_head.shape[1]).float().eval()
        seqs = [(ids, *head_candidates(heads, lm_head, h, args.tree_width), g)
                for ids, (h, g) in zip(prompt_ids, data)]
        for t in args.thresholds:
            tokens, rows = replay(seqs, chain(t), heads.num_heads)
            line = f"{d}  threshold {t:g}: {tokens:.3f} tokens/step, {rows:.2f} proposed/step"
            if lookup is not None:
                lt, lr = replay(seqs, chain(t, lookup), heads.num_heads)
                line += f"  | with prompt lookup: {lt:.3f} tokens/step, {lr:.2f} proposed/step"
            if args.tree and t > 0:
                tt, tr = replay(seqs, tree(t, args.tree_width, args.tree_nodes), heads.num_heads)
                line += f"  | tree (top-{args.tree_width}, <= {args.tree_nodes} nodes): {tt:.3f} tokens/step, {tr:.2f} rows/step"
            print(line, flush=True)


if __name__ == "__main__":
    main()
