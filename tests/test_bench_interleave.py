"""bench/interleave.py, the harness every speed figure comes from: the schedule, the paired
medians, and a speedup above tokens per step reported as an error instead of a figure."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import interleave as il  # noqa: E402


def test_blocks_alternate_forward_and_reverse_after_a_discarded_warm_up():
    assert il.schedule(["baseline", "pld", "draft"], 2) == [["baseline", "pld", "draft"], ["draft", "pld", "baseline"]]
    calls = []

    def run(name):
        calls.append(name)
        return il.Sample(1.0)

    runs = il.run_interleaved(["baseline", "pld"], run, 3, log=lambda s: None)
    # warm-up: each side until two runs agree (here at once: two each), then the blocks
    assert calls == ["baseline", "baseline", "pld", "pld", "baseline", "pld", "pld", "baseline", "baseline", "pld"]
    assert runs.blocks == [["baseline", "pld"], ["pld", "baseline"], ["baseline", "pld"]]
    assert all(len(v) == 3 for v in runs.samples.values())  # the warm-up is not among them
    with pytest.raises(ValueError):
        il.schedule(["a"], 0)


def test_a_side_is_warmed_up_until_two_runs_in_a_row_agree():
    """A process's first runs compile kernels and touch weights (seen: 0.7, then 3.4, then 9.6 tok/s
    for Qwen 1.5B's baseline): one discarded run left the second, still cold, in the first block."""
    speeds = {"baseline": [0.7, 3.4, 9.6, 9.7, 9.6], "pld": [15.0, 15.2, 15.3]}
    calls = []

    def run(name):
        calls.append(name)
        return il.Sample(speeds[name][sum(c == name for c in calls) - 1], 1.7 if name == "pld" else 1.0)

    runs = il.run_interleaved(["baseline", "pld"], run, 1, log=lambda s: None)
    assert calls[:5] == ["baseline"] * 3 + ["pld"] * 2  # at most MAX_WARMUP, then on
    assert runs.samples["baseline"][0].throughput == 9.7 and runs.samples["pld"][0].throughput == 15.3


def drifting(speed: dict[str, tuple[float, float]], drift: float = 0.1):
    """run(name) whose throughput is speed[name][0] on a machine that slows by ``drift`` a run."""
    n = [0]

    def run(name):
        n[0] += 1
        return il.Sample(speed[name][0] / (1 + drift * n[0]), speed[name][1])

    return run


def test_speedup_is_the_median_of_paired_ratios_with_its_spread():
    run = drifting({"baseline": (10.0, 1.0), "pld": (15.0, 1.8)})
    runs = il.run_interleaved(["baseline", "pld"], run, 4, warmup=[], log=lambda s: None)
    base, pld = il.summarize(runs, "baseline")
    assert base.speedup is None and base.error is None
    assert pld.error is None and pld.tokens_per_step == (1.8, 1.8, 1.8)
    # each block's pld run is beside its own baseline: 1.5 x (1 +- one run of drift), the drift cancels
    assert 1.35 < pld.speedup[1] <= pld.speedup[0] <= pld.speedup[2] < 1.65
    assert pld.speedup[0] == pytest.approx(1.5, abs=0.02)
    thr = [s.throughput for s in runs.samples["pld"]]
    assert pld.throughput == (pytest.approx(sorted(thr)[1] / 2 + sorted(thr)[2] / 2), min(thr), max(thr))
    assert "1.50x [" in il.format_table([base, pld])


def test_a_speedup_above_tokens_per_step_is_an_error_not_a_figure():
    run = drifting({"baseline": (10.0, 1.0), "pld": (20.7, 1.59), "draft": (16.0, 3.2), "in-process": (30.0, 1.0)}, 0)
    runs = il.run_interleaved(["baseline", "pld", "draft", "in-process"], run, 2, log=lambda s: None)
    figs = {f.name: f for f in il.summarize(runs, "baseline")}
    assert "2.07x > 1.59 tokens/step: impossible" in figs["pld"].error
    assert figs["draft"].error is None and figs["draft"].speedup[0] == pytest.approx(1.6)
    assert figs["in-process"].error is None  # not a mode: nothing bounds it
    text = il.format_table(list(figs.values()))
    assert "ERROR: speedup 2.07x" in text and "2.07x [" not in text
    assert il.errors(figs.values()) == [f"pld: {figs['pld'].error}"]
    # the registry says which sides are bound: every mode that speculates, variants too
    assert il.bounded("pld") and il.bounded("draft+overlap") and not il.bounded("baseline")
    assert il.bounded("draft[spd.draft_vocab=32768]") and not il.bounded("baseline[spd.ctx_len=512]")
    assert not il.bounded("in-process")


def test_a_benchmark_run_from_an_exported_tree_measures_that_trees_code(tmp_path):
    """bench/this_tree.py: a bench script of an exported tree (git archive) imports that tree's
    spd_cluster, not the editable install the virtual environment points at, and so do the
    processes it starts (Ray's workers: PYTHONPATH)."""
    import shutil
    import subprocess

    bench = tmp_path / "bench"
    bench.mkdir()
    shutil.copy(Path(__file__).resolve().parents[1] / "bench" / "this_tree.py", bench)
    (tmp_path / "spd_cluster").mkdir()
    (tmp_path / "spd_cluster" / "__init__.py").write_text("")
    (bench / "probe.py").write_text(
        "import subprocess, sys\n"
        "import this_tree  # noqa: F401\n"
        "import spd_cluster\n"
        "print(spd_cluster.__file__)\n"
        "child = 'import spd_cluster; print(spd_cluster.__file__)'\n"
        "print(subprocess.run([sys.executable, '-c', child], capture_output=True, text=True, cwd='/').stdout.strip())\n")
    out = subprocess.run([sys.executable, str(bench / "probe.py")], capture_output=True, text=True, cwd="/",
                         check=True).stdout.split()
    assert out == [str(tmp_path / "spd_cluster" / "__init__.py")] * 2, out
