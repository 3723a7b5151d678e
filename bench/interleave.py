"""Interleaved benchmarks: baseline and speculative runs in one schedule, repeated, medians.

A speed figure taken from one run of each side, baseline first, measures the machine as much
as the method: the first run after a model loads can be 50% slower than the next, and a machine
shared with other work drifts. So every figure here comes from

  * a warm-up of each side (or of the sides the caller names), thrown away: runs until two in a
    row agree within WARM_AGREE (at most MAX_WARMUP), since the first runs of a process (kernels
    compiled, weights first touched) and of a new session can be several times slower;
  * blocks of one run of each side, in forward then reverse order (A B | B A | A B ...), so a
    drift that is linear in time hits every side alike;
  * per block, each side's throughput over the baseline's of the same block (a paired ratio),
    and the median of those ratios with their spread.

A speculative step verifies at least the token a plain decode step computes, over the same rows,
so it is never cheaper than one; whatever it proposes, a speculative run cannot go faster than
its tokens per step times the baseline. A speedup above its tokens per step (beyond a tolerance
for timing noise) is therefore an artefact of the measurement: it is reported as an ERROR with
both numbers, never as a figure. Which sides this holds for is asked of the mode registry
(``spd_cluster.engine.modes``): every mode that speculates.

    from interleave import Sample, run_interleaved, summarize, print_table
    res = run_interleaved(["baseline", "pld"], run, repeats=3)   # run(name) -> Sample
    figs = summarize(res, baseline="baseline")
    print_table(figs)            # exit non-zero where any figure is an ERROR: errors(figs)
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Optional, Sequence

MAX_WARMUP = 3  # warm-up runs of one side at most
WARM_AGREE = 0.2  # two warm-up runs within this share of each other: the side is warm

TOLERANCE = 0.05  # a speedup may exceed tokens per step by this share (timing noise) before it is an error


@dataclass
class Sample:
    """One run of one side: its throughput (tokens/s, the figure compared) and tokens per step
    (1.0 for a side that does not speculate); ``extra`` holds other per-run values to report
    (e.g. the outputs, for an identical check)."""

    throughput: float
    tokens_per_step: float = 1.0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


@dataclass
class Runs:
    names: list[str]
    blocks: list[list[str]]  # the order each block ran in
    samples: dict[str, list[Sample]]  # name -> one sample per block, in block order
    warmup: list[str]

    def with_throughput(self, key: Callable[[Sample], float]) -> "Runs":
        """The same runs with another figure as throughput (e.g. end to end instead of decode)."""
        return Runs(self.names, self.blocks,
                    {n: [replace(s, throughput=key(s)) for s in ss] for n, ss in self.samples.items()}, self.warmup)


def schedule(names: Sequence[str], repeats: int) -> list[list[str]]:
    """``repeats`` blocks, each with every name once: forward, reverse, forward, ...
    (baseline, pld, draft | draft, pld, baseline | ...)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    fwd = list(names)
    return [fwd if i % 2 == 0 else fwd[::-1] for i in range(repeats)]


def run_interleaved(names: Sequence[str], run: Callable[[str], Sample], repeats: int,
                    warmup: Optional[Iterable[str]] = None, log: Callable[[str], None] = print) -> Runs:
    """Run every name ``repeats`` times in ABBA blocks after a discarded warm-up (each of
    ``warmup``, default: every name, until two runs in a row agree). ``run(name)`` does one run
    and returns its Sample."""
    names = list(names)
    if len(set(names)) != len(names):
        raise ValueError(f"names must be distinct, got {names}")
    warm = list(names if warmup is None else warmup)
    for name in warm:
        last = None
        for _ in range(MAX_WARMUP):
            t0 = time.perf_counter()
            s = run(name)
            log(f"  warm-up {name:14} {s.throughput:8.2f} tok/s  {s.tokens_per_step:5.2f} tokens/step  "
                f"({time.perf_counter() - t0:.1f} s, discarded)")
            if last is not None and abs(s.throughput - last) <= WARM_AGREE * max(s.throughput, last):
                break
            last = s.throughput
    log(f"  load average before the blocks: {_load()}")
    blocks = schedule(names, repeats)
    samples: dict[str, list[Sample]] = {n: [] for n in names}
    for b, order in enumerate(blocks):
        for name in order:
            t0 = time.perf_counter()
            s = run(name)
            s.seconds = s.seconds or time.perf_counter() - t0
            samples[name].append(s)
            log(f"  block {b + 1}/{len(blocks)} {name:14} {s.throughput:8.2f} tok/s  "
                f"{s.tokens_per_step:5.2f} tokens/step  ({s.seconds:.1f} s)")
    log(f"  load average after the blocks: {_load()}")
    return Runs(names, blocks, samples, warm)


def _load() -> str:
    """The host's 1/5/15-minute load averages and core count: a shared machine's figures vary."""
    import os

    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg()) + f" on {os.cpu_count()} cores"
    except OSError:
        return "n/a"


def bounded(name: str) -> bool:
    """Whether a side's speedup cannot exceed its tokens per step: every mode that speculates
    (its step is a verify over the same rows, never cheaper than a plain decode). ``name`` is a
    mode name, optionally with a ``+variant`` (``draft+overlap``) or its own config overrides
    (``draft[spd.draft_vocab=32768]``); other names are not bounded."""
    from spd_cluster.engine.modes import REGISTRY

    m = REGISTRY.get(name.partition("+")[0].partition("[")[0])
    return m is not None and m.speculates


@dataclass
class Figure:
    name: str
    runs: int
    throughput: tuple[float, float, float]  # median, min, max (tokens/s)
    throughput_iqr: tuple[float, float]  # 25th, 75th percentile
    tokens_per_step: tuple[float, float, float]  # median, min, max
    speedup: Optional[tuple[float, float, float]]  # median, min, max of the paired ratios; None for the baseline
    error: Optional[str] = None  # set: the speedup is not a figure (see the module docstring)
    over_bound_blocks: int = 0  # blocks whose own ratio exceeded their own tokens per step (noise, reported)


def spread(xs: Sequence[float]) -> tuple[float, float, float]:
    return statistics.median(xs), min(xs), max(xs)


def _iqr(xs: Sequence[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def check_bound(speedup: float, tokens_per_step: float, tolerance: float = TOLERANCE) -> Optional[str]:
    """None when ``speedup`` can be true for a side that speculates at ``tokens_per_step``,
    else the reason it cannot."""
    if speedup > tokens_per_step * (1 + tolerance):
        return (f"speedup {speedup:.2f}x > {tokens_per_step:.2f} tokens/step: impossible (a speculative "
                f"step is never cheaper than a plain decode step); the timing is disturbed")
    return None


def summarize(runs: Runs, baseline: str, is_bounded: Callable[[str], bool] = bounded,
              tolerance: float = TOLERANCE) -> list[Figure]:
    """Per name: median and spread of throughput and tokens per step; for every name but the
    baseline, the median and spread of its per-block ratio to the baseline's throughput, or an
    error where that median exceeds its median tokens per step (for bounded names)."""
    if baseline not in runs.samples:
        raise ValueError(f"baseline {baseline!r} is not among {runs.names}")
    base = [s.throughput for s in runs.samples[baseline]]
    figs = []
    for name in runs.names:
        ss = runs.samples[name]
        thr, tps = [s.throughput for s in ss], [s.tokens_per_step for s in ss]
        f = Figure(name, len(ss), spread(thr), _iqr(thr), spread(tps), None)
        if name != baseline:
            ratios = [t / b if b > 0 else float("inf") for t, b in zip(thr, base)]
            f.speedup = spread(ratios)
            if is_bounded(name):
                f.error = check_bound(f.speedup[0], f.tokens_per_step[0], tolerance)
                f.over_bound_blocks = sum(r > t * (1 + tolerance) for r, t in zip(ratios, tps))
        figs.append(f)
    return figs


def errors(figs: Iterable[Figure]) -> list[str]:
    return [f"{f.name}: {f.error}" for f in figs if f.error]


def format_table(figs: Sequence[Figure]) -> str:
    """One line per side: throughput median [min-max] (IQR), tokens/step median [min-max],
    speedup median [min-max] or ERROR with the reason."""
    lines = [f"{'side':14} {'runs':>4} {'tok/s median [min-max]':>26} {'IQR':>15} "
             f"{'tokens/step [min-max]':>22}  speedup median [min-max]"]
    for f in figs:
        t, q, k = f.throughput, f.throughput_iqr, f.tokens_per_step
        if f.speedup is None:
            sp = "(baseline)"
        elif f.error:
            sp = f"ERROR: {f.error}"
        else:
            sp = f"{f.speedup[0]:.2f}x [{f.speedup[1]:.2f}-{f.speedup[2]:.2f}]"
            if f.over_bound_blocks:
                sp += f" ({f.over_bound_blocks} block(s) above their own tokens/step: noise)"
        lines.append(f"{f.name:14} {f.runs:>4} {t[0]:9.2f} [{t[1]:6.2f}-{t[2]:6.2f}] "
                     f"{q[0]:6.2f}-{q[1]:<6.2f}  {k[0]:6.2f} [{k[1]:5.2f}-{k[2]:5.2f}]   {sp}")
    return "\n".join(lines)


def print_table(figs: Sequence[Figure], out: Callable[[str], None] = print) -> None:
    out(format_table(figs))
    for e in errors(figs):
        out(f"ERROR {e}")
