"""Train multiproj heads for Qwen2.5-Coder by self-distillation on code prompts, then measure
them on *different* code prompts: mean accepted tokens per step and decode speedup of multiproj
over the baseline (target-only greedy), both through the engine in the same run, chunks of
prompts alternating between the two so both see the same machine load.

    python bench/bench_heads.py                        # 0.5B, bf16, full sizes
    python bench/bench_heads.py --large                # 1.5B
    python bench/bench_heads.py --train-prompts 48 --train-new 48 --steps 200 --batch-size 128 \
        --eval-prompts 6 --eval-new 48 --threads 1            # ~28 min on a busy 2-core CPU

    python bench/bench_heads.py --large --dtype bfloat16 --distilled a.npz b.npz --steps 600 \
        --batch-size 256 --eval-prompts 16 --eval-new 64 --threads 2   # rows saved by --save-distilled

On a small shared CPU, ``--threads 1`` is often several times faster than 2.

Prompts come from data/code_prompts_{train,eval}.txt; ``--write-prompts`` (re)generates them from
templates (train and eval use disjoint task lists).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path
from time import perf_counter

import numpy as np
import torch

import this_tree  # noqa: F401  (this tree's spd_cluster, not an installed one)
from spd_cluster.engine import SpDEngine, SpDSettings
from spd_cluster.sessions import eos_token_ids, load_model, load_tokenizer
from spd_cluster.sessions.heads import TurboHeads
from spd_cluster.sessions.torch_session import TorchSession
from spd_cluster.training import TrainSettings, format_accuracy, read_prompts, train_heads

DATA = Path(__file__).resolve().parent.parent / "data"
TRAIN_FILE, EVAL_FILE = DATA / "code_prompts_train.txt", DATA / "code_prompts_eval.txt"

TRAIN_TASKS = [
    "reverses a string", "checks whether a number is prime", "returns the n-th Fibonacci number",
    "merges two sorted lists into one sorted list", "counts the vowels in a string", "computes the factorial of n",
    "removes duplicates from a list while keeping the order", "finds the maximum element of a list",
    "converts a temperature from Celsius to Fahrenheit", "checks whether a string is a palindrome",
    "computes the greatest common divisor of two integers", "flattens a nested list",
    "sorts a list of pairs by their second element", "sums the digits of an integer",
    "returns the transpose of a matrix", "performs binary search on a sorted array",
    "counts how often each word occurs in a text", "validates an email address with a regular expression",
    "computes the mean and standard deviation of a list of numbers", "rotates an array by k positions",
    "checks whether parentheses in a string are balanced", "converts an integer to its binary representation",
    "returns all permutations of a list", "computes the dot product of two vectors",
    "finds the index of the first negative number", "splits a list into chunks of size n",
    "reads a text file and returns the number of lines", "returns the intersection of two lists",
    "implements insertion sort", "multiplies two matrices", "converts a string to title case",
    "computes the power set of a set", "finds the missing number in a list from 1 to n",
    "computes the running sum of a list", "checks whether a year is a leap year",
    "counts the set bits of an integer", "returns the k largest elements of a list",
    "removes all whitespace from a string", "computes the area of a circle given its radius",
    "implements a stack with push, pop and peek",
]
# 40 more training tasks (data/code_prompts_train.txt lines 201-400, after the first 200)
MORE_TRAIN_TASKS = [
    "computes the sum of the squares of a list", "returns the longest word in a sentence",
    "checks whether a number is a perfect square", "converts a Roman numeral to an integer",
    "finds the most frequent element of a list", "computes the n-th triangular number",
    "reverses the order of the words in a sentence", "checks whether a matrix is symmetric",
    "counts the words in a string", "returns the even numbers of a list",
    "computes the Euclidean distance between two points", "implements selection sort",
    "finds the smallest element of a list", "converts a hexadecimal string to an integer",
    "checks whether all elements of a list are distinct", "computes the average of a list of numbers",
    "returns the first n prime numbers", "replaces every vowel in a string with an asterisk",
    "computes compound interest", "swaps the keys and values of a map",
    "implements merge sort", "computes the sum of an arithmetic series",
    "checks whether a string contains only digits", "returns the last n elements of a list",
    "counts the occurrences of a character in a string", "computes the product of the elements of a list",
    "finds the length of the longest increasing subsequence", "converts a snake_case string to camelCase",
    "checks whether a number is an Armstrong number", "generates the first n rows of Pascal's triangle",
    "implements a singly linked list with insert and delete", "returns the range (largest minus smallest) of a list",
    "finds the elements common to three lists", "truncates a string to n characters with an ellipsis",
    "computes the digital root of an integer", "returns the indices of all occurrences of a value in a list",
    "implements quicksort", "computes the number of days between two dates",
    "validates a hexadecimal color code", "shuffles a list in place with the Fisher-Yates algorithm",
]
# 40 more (lines 401-600): data structures, dynamic programming, parsing
EXTRA_TRAIN_TASKS = [
    "computes the nth Catalan number", "checks whether a graph given as an adjacency list has a cycle",
    "performs a breadth-first search on a graph", "performs a depth-first search on a graph",
    "computes the shortest path lengths with Dijkstra's algorithm", "implements a binary search tree with insert and search",
    "computes the height of a binary tree", "checks whether a binary tree is balanced",
    "implements a min-heap with push and pop", "finds the k-th smallest element of a list",
    "computes the edit distance between two strings", "finds the longest common subsequence of two strings",
    "solves the 0/1 knapsack problem with dynamic programming", "counts the ways to climb n stairs taking one or two steps",
    "computes the maximum subarray sum", "encodes a string with run-length encoding",
    "decodes a run-length encoded string", "implements a Caesar cipher",
    "converts an integer to a Roman numeral", "parses a comma-separated line into fields",
    "formats a number with thousands separators", "checks whether a sudoku row is valid",
    "generates all subsets of size k of a list", "computes the prime factors of an integer",
    "implements an LRU cache", "computes the moving average of a list with a window size",
    "transposes the rows and columns of a CSV table held in a list of lists", "removes duplicate characters from a string",
    "finds the majority element of a list", "groups a list of words by their first letter",
    "computes the sum of a matrix's diagonal", "rotates a square matrix by 90 degrees",
    "checks whether a string is a valid floating point number", "computes the greatest element of each row of a matrix",
    "zips two lists into a list of pairs", "counts the leaves of a binary tree",
    "finds the intersection point of two line segments", "computes the nth number of the Tribonacci sequence",
    "converts a Unix timestamp to a date string", "pads a string on the left to a given width",
]
# 40 more (lines 601-800): strings, numbers, collections, small utilities
LATE_TRAIN_TASKS = [
    "checks whether a string is a pangram", "computes the sum of the cubes of the first n integers",
    "returns the characters of a string sorted by frequency", "checks whether two rectangles overlap",
    "converts a number of seconds to a human-readable duration", "finds the second smallest element of a list",
    "computes the nth Lucas number", "returns the words of a sentence that are longer than n characters",
    "checks whether a number is a happy number", "computes the weighted average of two lists",
    "removes consecutive duplicate elements from a list", "finds the longest run of equal elements in a list",
    "converts a list of key-value pairs to a map", "computes the perimeter of a polygon given its vertices",
    "checks whether a list is a permutation of 1 to n", "returns the difference of two sets",
    "counts the digits of an integer", "reverses the digits of an integer",
    "computes the binomial coefficient n choose k", "implements counting sort",
    "implements a circular buffer with a fixed capacity", "checks whether a number is a palindrome",
    "finds the peak element of a list", "computes the angle between the hands of a clock",
    "splits a string into words and removes punctuation", "converts a camelCase string to snake_case",
    "computes the number of trailing zeros of n factorial", "returns the pairwise differences of a list",
    "checks whether a string has all unique characters", "computes the mode of a list of numbers",
    "finds the closest pair of numbers in a sorted list", "implements a trie with insert and search",
    "computes the sum of all elements of a nested list", "returns the minimum and maximum of a list in one pass",
    "validates a date string in the format YYYY-MM-DD", "counts the islands in a grid of zeros and ones",
    "computes the cross product of two 3D vectors", "merges overlapping intervals",
    "checks whether a number is a Fibonacci number", "encodes a string in base64",
]
# 40 more (lines 801-1000): text, numbers, matrices, small data structures
LAST_TRAIN_TASKS = [
    "counts the sentences in a text", "computes the sum of the proper divisors of an integer",
    "checks whether a number is a perfect number", "returns the Collatz sequence starting at n",
    "converts an integer to its hexadecimal representation", "finds the longest word that appears in two sentences",
    "computes the nth root of a number with Newton's method", "checks whether a string is an isogram",
    "returns the indices of the two largest elements of a list", "counts the pairs of equal elements in a list",
    "computes the trace of a square matrix", "checks whether a matrix is an identity matrix",
    "adds two matrices element by element", "returns the column sums of a matrix",
    "implements a deque with push and pop at both ends", "implements a set of integers with a bit vector",
    "computes the running maximum of a list", "returns the list of differences between consecutive elements",
    "checks whether a list contains three consecutive increasing numbers", "finds the smallest missing positive integer",
    "converts degrees to radians", "computes the distance between two points on a sphere",
    "returns the initials of a full name", "masks all but the last four characters of a card number",
    "checks whether a password has an uppercase letter, a digit and at least eight characters",
    "counts the vowels and consonants of a word",
    "replaces tabs in a string with four spaces", "returns the longest line of a text",
    "wraps a text to a given line width", "centers a string in a field of a given width",
    "computes the simple interest on a loan", "computes the monthly payment of a loan",
    "converts kilometers to miles", "computes the body mass index from weight and height",
    "returns the number of days in a given month and year", "returns the day of the week for a date",
    "checks whether a triangle with three given sides is valid", "computes the volume of a sphere",
    "finds the element that appears exactly once when every other appears twice", "sorts the characters of a string",
]
# 40 more (lines 1001-1200): strings, number theory, lists, linked lists, dynamic programming
NEXT_TRAIN_TASKS = [
    "computes the sum of the even Fibonacci numbers below n", "checks whether a string is a rotation of another string",
    "returns the frequency of each character of a string", "implements heap sort",
    "finds the first non-repeating character of a string", "computes the square root of a number with binary search",
    "converts a decimal number to octal", "checks whether a number is a power of two",
    "returns the product of all elements of a list except the current one", "finds the longest palindromic substring of a string",
    "counts the distinct elements of a list", "implements shell sort",
    "computes the determinant of a 3x3 matrix", "returns the elements of a matrix in spiral order",
    "checks whether a linked list has a cycle", "reverses a singly linked list",
    "counts the paths in a grid from the top-left to the bottom-right corner",
    "finds the minimum number of coins that make a given amount",
    "generates all valid combinations of n pairs of parentheses", "computes the sum of the numbers in a string",
    "removes the vowels from a string", "returns the last word of a sentence",
    "interleaves two lists", "converts a list of strings to uppercase",
    "computes the geometric mean of a list of numbers", "checks whether a point lies inside a circle",
    "computes the area of a triangle given its three vertices", "returns the factors of an integer",
    "implements the sieve of Eratosthenes", "computes a power of a number by repeated squaring",
    "finds the longest substring without repeating characters", "counts the inversions in a list",
    "checks whether a list of numbers forms an arithmetic progression", "returns the k most frequent words of a text",
    "implements a hash map with separate chaining", "converts a string of digits to an integer without library functions",
    "counts the ones in the binary representations of 0 to n", "returns the nesting depth of a nested list",
    "checks whether a number is a strong number", "parses a query string into a map of keys and values",
]
# 40 more (lines 1201-1400): expressions, graphs, trees, dates, statistics
FINAL_TRAIN_TASKS = [
    "computes the variance of a list of numbers", "splits a string on a delimiter without library functions",
    "returns the elements of a list at even indices", "checks whether two lists hold the same elements in any order",
    "multiplies two polynomials given as coefficient lists", "evaluates a polynomial at a point with Horner's method",
    "counts the lines, words and characters of a text", "splits an arithmetic expression into tokens",
    "evaluates an arithmetic expression in reverse Polish notation", "converts an infix expression to postfix",
    "finds the maximum nesting depth of parentheses in a string", "computes the area and the diagonal of a rectangle",
    "counts the vowels at even positions of a string", "checks whether a number is divisible by the sum of its digits",
    "computes the least number of perfect squares that sum to n",
    "implements a stack that returns its minimum in constant time",
    "finds the duplicate in a list of n + 1 integers from 1 to n", "rotates a string to the left by k characters",
    "computes the frequencies of the letters of a text, ignoring case", "returns a list with every element repeated twice",
    "computes the length of the last word of a string", "finds the words of a list that start with a given prefix",
    "generates a random password of a given length", "checks whether a graph is bipartite",
    "computes a topological order of a directed acyclic graph", "finds the connected components of an undirected graph",
    "computes a minimum spanning tree with Kruskal's algorithm", "implements union-find with path compression",
    "computes the diameter of a binary tree", "returns the level order traversal of a binary tree",
    "checks whether two binary trees are identical", "computes the sum of the left leaves of a binary tree",
    "finds the lowest common ancestor of two nodes in a binary search tree", "serializes a binary tree to a string",
    "computes the absolute difference between the sums of the two diagonals of a matrix",
    "converts a temperature from Fahrenheit to Kelvin",
    "computes the harmonic mean of a list of numbers", "checks whether a year, month and day form a valid date",
    "counts the weekdays between two dates", "joins a list of names with commas and 'and' before the last",
]
EVAL_TASKS = [
    "finds the longest common prefix of a list of strings", "checks whether two strings are anagrams",
    "computes the least common multiple of two integers", "implements bubble sort",
    "converts a binary string to an integer", "returns the second largest number in a list",
    "capitalizes the first letter of every word in a sentence", "computes the median of a list",
    "checks whether a list is sorted", "counts the uppercase letters in a string",
    "returns the cumulative product of a list", "finds all pairs in a list that sum to a target",
    "implements a queue with enqueue and dequeue", "computes the Hamming distance of two strings",
    "returns the unique characters of a string", "converts minutes to hours and minutes",
]
LANGUAGES = ["Python", "JavaScript", "C", "Go", "Rust"]
TEMPLATES = [
    "Write a {lang} function that {task}.",
    "Implement a {lang} function that {task}, with a short comment.",
]


def task_prompts(tasks: list[str], offset: int, rng: random.Random) -> list[str]:
    """Every task in every language, the two templates alternating, shuffled."""
    prompts = [TEMPLATES[(i + j + offset) % 2].format(lang=lang, task=task)
               for i, task in enumerate(tasks) for j, lang in enumerate(LANGUAGES)]
    rng.shuffle(prompts)
    return prompts


def write_prompts() -> None:
    rng = random.Random(0)
    # the first 40 training tasks (200 prompts), then each later list of 40 (200 more each: lines
    # 201-400, 401-600, 601-800, 801-1000, 1001-1200, 1201-1400) after them, so earlier lines stay what they were
    train = task_prompts(TRAIN_TASKS, 0, rng)
    for n, tasks in enumerate([MORE_TRAIN_TASKS, EXTRA_TRAIN_TASKS, LATE_TRAIN_TASKS, LAST_TRAIN_TASKS,
                                NEXT_TRAIN_TASKS, FINAL_TRAIN_TASKS], 1):
        train += task_prompts(tasks, n % 2, random.Random(n))
    # different tasks (32 prompts): each in two languages
    evals = [TEMPLATES[i % 2].format(lang=LANGUAGES[i % 5], task=task) for i, task in enumerate(EVAL_TASKS * 2)]
    rng.shuffle(evals)
    DATA.mkdir(exist_ok=True)
    TRAIN_FILE.write_text("\n".join(dict.fromkeys(train)) + "\n")
    EVAL_FILE.write_text("\n".join(dict.fromkeys(evals)) + "\n")


def variant(threshold: float, lookup: bool = False) -> str:
    name = "multiproj+lookup" if lookup else "multiproj"
    return f"{name}@{threshold:g}" if threshold else name


def variants(args) -> list[tuple[str, float, bool]]:
    """(name, confidence threshold, prompt lookup) of every multiproj variant to evaluate."""
    both = (False, True) if args.prompt_lookup else (False,)
    return [(variant(t, lookup), t, lookup) for lookup in both for t in args.thresholds]


def evaluate(model, tok, heads, prompts, args, eos):
    """Baseline and multiproj over the same prompts, alternating chunks; summed decode figures."""
    ctx = 512
    settings = SpDSettings(num_speculative_tokens=args.k, prefill_seq_len=64, ctx_len=ctx,
                           max_new_tokens=args.eval_new, full_batch_size=args.fbs, chat_template=True)
    pack = True  # as load_session: CPU kernels on (training is over: in place is fine)
    engines = {"baseline": SpDEngine("baseline", TorchSession(model, args.fbs, ctx, pack=pack), tok, settings,
                                     eos_token_ids=eos)}
    target = TorchSession(model, args.fbs, ctx, heads=heads, pack=pack)
    for name, t, lookup in variants(args):  # one session, an engine per variant
        engines[name] = SpDEngine("multiproj", target, tok,
                                  settings.model_copy(update={"confidence_threshold": t, "prompt_lookup": lookup}),
                                  eos_token_ids=eos)
    engines["baseline"].generate(prompts[:1])  # warm-up
    sums = {m: dict(tokens=0, time=0.0, target=0.0, iters=0, steps=[], ids=[], proposed=np.zeros(args.k),
                    accepted=np.zeros(args.k)) for m in engines}
    for c in range(0, len(prompts), args.chunk):
        for mode, engine in engines.items():
            info = engine.generate(prompts[c : c + args.chunk])
            m, s = info.perf_metrics, sums[mode]
            s["tokens"] += m.num_decode_tokens
            s["time"] += m.decode_time
            s["target"] += m.decode_target_time
            s["iters"] += m.decode_iterations
            s["steps"] += [a for r in info.results for a in r.accepted_per_step]
            s["ids"] += [x.tolist() for x in info.generated_ids]
            if m.proposed_per_position:
                s["proposed"] += np.asarray(m.proposed_per_position)
                s["accepted"] += np.asarray(m.accepted_per_position)
        print(f"  eval {min(c + args.chunk, len(prompts))}/{len(prompts)} prompts", flush=True)
    return sums


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--large", action="store_true", help="Qwen2.5-Coder-1.5B")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--train-prompts", type=int, default=200)
    ap.add_argument("--train-new", type=int, default=128, help="new tokens per training prompt")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-prompts", type=int, default=16)
    ap.add_argument("--eval-new", type=int, default=96)
    ap.add_argument("--k", type=int, default=4, help="speculative tokens per step (<= heads)")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.0], metavar="T",
                    help="confidence thresholds to evaluate multiproj at, each against the same baseline (0 = off)")
    ap.add_argument("--prompt-lookup", action="store_true",
                    help="also evaluate each threshold with spd.prompt_lookup (heads + the row's own text)")
    ap.add_argument("--heads-dir", default=None, help="evaluate these trained heads (no distillation or training)")
    ap.add_argument("--fbs", type=int, default=1, help="KV slots in the evaluation")
    ap.add_argument("--chunk", type=int, default=2, help="prompts per alternation of baseline / multiproj")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default=None, help="keep the heads here (default: a temp dir)")
    ap.add_argument("--distilled", nargs="+", default=[], metavar="NPZ",
                    help="train on rows saved by train-heads --save-distilled instead of distilling here")
    ap.add_argument("--save-distilled", default=None, metavar="NPZ", help="keep the distilled rows")
    ap.add_argument("--write-prompts", action="store_true", help="regenerate data/code_prompts_*.txt")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    if args.large:
        args.model = "qwen2.5-coder-1.5b"
    torch.set_num_threads(args.threads)
    if args.write_prompts or not TRAIN_FILE.exists() or not EVAL_FILE.exists():
        write_prompts()
    train_prompts = read_prompts(TRAIN_FILE)[: args.train_prompts]
    eval_prompts = read_prompts(EVAL_FILE)[: args.eval_prompts]
    assert not set(train_prompts) & set(eval_prompts)

    model = load_model(args.model, args.dtype)
    tok = load_tokenizer(args.model)
    eos = eos_token_ids(model, tok)
    s = TrainSettings(num_heads=args.heads, num_layers=args.layers, steps=args.steps, batch_size=args.batch_size,
                      lr=args.lr, max_new_tokens=args.train_new, ctx_len=512, chat_template=True,
                      gen_batch_size=8, eval_every=max(1, args.steps // 10), eval_fraction=0.1)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-heads-")) / "heads"
    source = (f"rows from {' '.join(args.distilled)}" if args.distilled else
              f"distilling {len(train_prompts)} prompts x {args.train_new} new tokens")
    if args.heads_dir:
        print(f"{args.model} {args.dtype}, {args.threads} threads: heads from {args.heads_dir}", flush=True)
    else:
        print(f"{args.model} {args.dtype}, {args.threads} threads: {source}, {args.heads} heads x {args.layers} "
              f"layer(s), {args.steps} steps", flush=True)
    t0 = perf_counter()
    if args.heads_dir:
        out = Path(args.heads_dir)
        cfg = json.loads((out / "speculator_config.json").read_text())
        report = {"distilled_from": None, **cfg["training"], "top1_accuracy": cfg["top1_accuracy"],
                  "accuracy_split": cfg["accuracy_split"]}
    else:
        _, report = train_heads(model, tok, [] if args.distilled else train_prompts, out, s, model_name=args.model,
                                overwrite=True, eos_token_ids=eos, distilled=args.distilled,
                                save_distilled=args.save_distilled)
    train_total = perf_counter() - t0
    heads = TurboHeads.load(out, hidden_size=model.config.hidden_size)

    print(f"evaluating on {len(eval_prompts)} held-out prompts x {args.eval_new} new tokens, fbs {args.fbs}, "
          f"k {args.k}", flush=True)
    sums = evaluate(model, tok, heads, eval_prompts, args, eos)
    b = sums["baseline"]
    tps = {k: v["tokens"] / v["time"] if v["time"] else 0.0 for k, v in sums.items()}
    step_cost = {k: v["target"] / max(v["iters"], 1) for k, v in sums.items()}
    results = {}
    for name, t, lookup in variants(args):
        m = sums[name]
        same = sum(x == y for x, y in zip(b["ids"], m["ids"]))
        results[name] = {
            "confidence_threshold": t, "prompt_lookup": lookup,
            "decode_tok_s": round(tps[name], 3),
            "speedup": round(tps[name] / tps["baseline"], 3) if tps["baseline"] else 0.0,
            "mean_accepted_tokens": round(float(np.mean(m["steps"])) if m["steps"] else 0.0, 3),
            "verify_step_cost_ratio": round(step_cost[name] / step_cost["baseline"], 3) if step_cost["baseline"] else 0.0,
            "acceptance_rate_per_position": (m["accepted"] / np.maximum(m["proposed"], 1)).round(3).tolist(),
            "proposed_per_step": round(float(m["proposed"].sum()) / max(m["iters"], 1), 3),
            "identical_outputs": b["ids"] == m["ids"], "identical_prompts": f"{same}/{len(eval_prompts)}",
        }
    best = max(results, key=lambda n: results[n]["speedup"])
    figures = {
        "model": args.model, "dtype": args.dtype, "threads": args.threads,
        "train_prompts": report["num_prompts"], "train_new_tokens": report.get("max_new_tokens", args.train_new),
        "distilled_from": report["distilled_from"], "heads_dir": args.heads_dir,
        "distilled_tokens": report["generated_tokens"], "distill_time_s": report["gen_time_s"],
        "train_steps": report.get("steps", args.steps), "train_time_s": report["train_time_s"], "train_total_s": round(train_total, 1),
        "heldout_top1": report["top1_accuracy"],
        "eval_prompts": len(eval_prompts), "eval_new_tokens": args.eval_new, "fbs": args.fbs, "k": args.k,
        "baseline_decode_tok_s": round(tps["baseline"], 3), **results[best], "best": best, "variants": results,
    }
    print()
    print(format_accuracy(report))
    print(f"training: distilled {report['generated_tokens']} tokens from {report['num_prompts']} prompts in "
          f"{report['gen_time_s']:.1f}s{' (earlier, saved rows)' if args.distilled or args.heads_dir else ''}, "
          f"{report.get('steps', args.steps)} steps in {report['train_time_s']:.1f}s")
    print(f"baseline : decode {tps['baseline']:.2f} tok/s, {step_cost['baseline'] * 1e3:.0f} ms per target step")
    for name, r in results.items():
        print(f"{name:<21}: decode {r['decode_tok_s']:.2f} tok/s, {step_cost[name] * 1e3:.0f} ms per target step "
              f"({r['verify_step_cost_ratio']:.2f}x), {r['proposed_per_step']:.2f} proposed and "
              f"{r['mean_accepted_tokens']:.2f} accepted tokens per step, acceptance per position "
              f"{r['acceptance_rate_per_position']}, speedup {r['speedup']:.2f}x, identical {r['identical_prompts']}")
    for lookup in sorted({v[2] for v in variants(args)}):  # the best of the heads alone, then with lookup
        name = max((v[0] for v in variants(args) if v[2] == lookup), key=lambda n: results[n]["speedup"])
        r = results[name]
        note = "" if r["identical_outputs"] or args.dtype == "float32" else \
            " (in bfloat16 a k-token verify and a 1-token decode can round a near-tie differently)"
        print(f"best {'with prompt lookup' if lookup else 'heads alone'}, {name}: speedup {r['speedup']:.2f}x, "
              f"{r['mean_accepted_tokens']:.2f} accepted per step (targets: >= 2.0 accepted, >= 2.0x); identical "
              f"outputs: {'yes' if r['identical_outputs'] else 'NO'}, {r['identical_prompts']} prompts{note}")
    print(json.dumps(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
