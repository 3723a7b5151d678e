"""The driver at scale (issue 27): memory bounded however many rows (SeenIds spills its ids past a
bound and finds the duplicates across what it spilled), and a resume that reads what it needs from
the output (scan.parquet, the checkpoint) instead of scanning the dataset and the finished shards."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import GOOD, make_cfg

from spd_cluster.io import dataset as dsmod
from spd_cluster.io.dataset import SeenIds, iter_shards, scan


def _firsts(ids: list[str]) -> list[int]:
    """What a dict of every id says: for each id, the row of its first occurrence, else -1."""
    first, want = {}, []
    for i, x in enumerate(ids):
        want.append(first.get(x, -1))
        first.setdefault(x, i)
    return want


@pytest.mark.parametrize("bound", [1, 7, 100, 2_000])
def test_seen_ids_past_its_bound_spills_and_still_finds_every_duplicate_and_its_first_row(bound):
    rng = random.Random(bound)
    ids = [f"id-{rng.randrange(3000)}" for _ in range(10_000)]  # many repeats, far apart and near
    seen, got = SeenIds(bound), []
    for lo in range(0, len(ids), 700):  # batches of uneven size, so runs of many lengths spill
        got += seen.add(ids[lo:lo + 700], list(range(lo, min(lo + 700, len(ids)))))
        assert seen.held <= max(bound, 700) + 700  # never more than the bound and a batch in memory
    assert seen.file is not None and len(seen.spilled) > 1
    late = seen.late()
    assert all(got[r] == -1 for r in late)  # add did not answer them: late() does
    for r, f in late.items():
        got[r] = f
    assert got == _firsts(ids)
    seen.close()


def _parquet(path: Path, rows: list[dict], group: int = 3) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=group)
    return path


def _dataset(root: Path) -> Path:
    """Three Parquet files (row groups of 3) and a JSONL one; ids repeat within and across files."""
    root.mkdir()
    prompts = [GOOD[i % len(GOOD)] for i in range(40)]
    ids = [f"p{i}" for i in range(40)]
    ids[7], ids[19], ids[33], ids[38] = "p2", "p2", "p11", "p30"  # in the file, across files, in the last one
    rows = [{"id": i, "prompt": p} for i, p in zip(ids, prompts)]
    rows[25]["prompt"] = None  # not a string: an error row too
    _parquet(root / "a.parquet", rows[:12])
    _parquet(root / "b.parquet", rows[12:24])
    _parquet(root / "c.parquet", rows[24:34])
    (root / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[34:]))
    return root


def test_a_scan_past_the_bound_names_the_same_duplicates_as_one_under_it(tmp_path, monkeypatch):
    monkeypatch.setattr(dsmod, "BATCH_ROWS", 5)  # batches of 5 rows: the ids spill after the first
    ds = str(_dataset(tmp_path / "ds"))
    under = scan(ds, "prompt", "id")
    past = scan(ds, "prompt", "id", spill_ids=2)
    assert not under.late_rows and past.late_rows == {7, 19, 33, 38}
    assert past.row_errors == under.row_errors  # the same rows, each named by its file and row
    assert under.row_errors[19] == "b.parquet row 7 (id 'p2'): duplicate prompt_id 'p2' (first at row 2)"
    assert under.row_errors[38] == "d.jsonl line 5 (id 'p30'): duplicate prompt_id 'p30' (first at row 30)"
    assert past.file_rows == under.file_rows == [12, 12, 10, 6] and past.num_rows == 40


def test_the_audit_sample_leaves_out_duplicates_found_late(tiny, tmp_path, monkeypatch):
    """A duplicate found after the audit's sample saw its row (a scan past the bound) is not
    audited: the picks are those of a scan that found it at once."""
    from spd_cluster.cluster.plan import plan
    from spd_cluster.cluster.preflight import preflight

    ds = _dataset(tmp_path / "ds")
    monkeypatch.setattr(dsmod, "BATCH_ROWS", 5)

    def picks(spill: int, out: str) -> dict:
        monkeypatch.setattr(dsmod, "SPILL_IDS", spill)
        cfg = make_cfg(tiny, ds, tmp_path / out, **{"audit.fraction": 1.0, "cluster.shard_size": 4,
                                                     "max_error_fraction": 1})
        pf = preflight(cfg, for_run=True)
        assert bool(pf.info.late_rows) == (spill < 40)
        return plan(pf).audit_picks

    want = picks(1 << 20, "a")
    assert picks(2, "b") == want
    assert not any(row % 4 in want.get(row // 4, []) for row in (7, 19, 25, 33, 38))  # no error row


def _written(out, shard_ids, shard_size: int) -> None:
    """Shard files and the checkpoint, as pairs and the driver leave them (rows aside)."""
    from spd_cluster.cluster.commit import Checkpoint
    from spd_cluster.io import results as rio

    records = {}
    for sid in shard_ids:
        records[sid] = {"shard_id": sid, "first_row": sid * shard_size, "num_prompts": shard_size, "num_errors": 0}
        rio.write_shard(out, sid, [], records[sid])
    Checkpoint(rio._loc(out), records).write_checkpoint()


def _rows(shards) -> dict:
    return {s.shard_id: [(r.row, r.prompt_id, r.prompt, r.error) for r in s.rows] for s in shards}


def test_a_resume_reads_its_plan_from_the_output_not_the_dataset(tiny, tmp_path, monkeypatch):
    """A half-finished job resumed: the dataset is not scanned (scan.parquet holds its rows, row
    errors, each file's rows and the audit's picks), the files and row groups of the finished
    shards are not read, the shards left are each sent once with the rows and errors a scan gives,
    and a changed dataset is still refused. A finished job's resume reads no row at all."""
    from spd_cluster.cluster.commit import open_job
    from spd_cluster.cluster.plan import plan
    from spd_cluster.cluster.preflight import preflight
    from spd_cluster.io.results import OutputError

    ds = _dataset(tmp_path / "ds")
    out = tmp_path / "out"
    cfg = make_cfg(tiny, ds, out, **{"audit.fraction": 0.5, "max_error_fraction": 1})  # shards of 4: 10
    first = plan(preflight(cfg, for_run=True))
    open_job(first, None, 1.0).write()
    assert (out / dsmod.SCAN_FILE).exists() and first.num_shards == 10 and first.audit_picks
    all_rows = _rows(first.shards())
    done = [0, 1, 2, 3, 4, 7]  # file a (rows 0-11), most of b (12-19) and one shard of c (28-31)
    _written(out, done, 4)

    read: list[int] = []  # rows the readers turned into lists
    for fmt in ("parquet", "jsonl"):
        def counting(*a, _real=dsmod._READERS[fmt], **k):
            for prompts, ids, lines in _real(*a, **k):
                read.extend([0] * len(prompts or []))
                yield prompts, ids, lines
        monkeypatch.setitem(dsmod._READERS, fmt, counting)

    def no_scan(*a, **k):
        raise AssertionError("a resume does not scan the dataset")

    with monkeypatch.context() as m:
        m.setattr(dsmod, "scan", no_scan)
        pf = preflight(cfg, for_run=True)
        again = plan(pf)
        shards = list(again.shards())
    assert "not scanned again" in {c.name: c for c in pf.checks}["dataset"].detail and not pf.complete
    assert [s.shard_id for s in shards] == [5, 6, 8, 9] and again.todo == 4  # each shard left, once
    assert _rows(shards) == {k: v for k, v in all_rows.items() if k not in done}
    assert again.info.row_errors == first.info.row_errors and again.audit_picks == first.audit_picks
    # not file a, nor b's row groups of rows 12-14 and 15-17: b's 18-20 and 21-23 (shard 5), c, d
    assert len(read) == 6 + 10 + 6

    _written(out, range(10), 4)  # finished: nothing is read at all
    read.clear()
    with monkeypatch.context() as m:
        m.setattr(dsmod, "scan", no_scan)
        done_plan = plan(preflight(cfg, for_run=True))
        assert done_plan.todo == 0 and list(done_plan.shards()) == [] and read == []

    _parquet(ds / "c.parquet", [{"id": f"n{i}", "prompt": "changed"} for i in range(10)])
    with pytest.raises(OutputError, match="dataset file contents changed"):
        preflight(cfg, for_run=True)


def test_iter_shards_skips_written_shards_whatever_the_format(tmp_path):
    """The shards to run are those a whole read gives, without the written ones, from a file
    set (file counts known) and from a single JSONL file (read through)."""
    ds = _dataset(tmp_path / "ds")
    for path in (str(ds), str(ds / "d.jsonl")):
        info = scan(path, "prompt", "id")
        whole = _rows(iter_shards(info, 4, "prompt", "id"))
        skip = {0, 2, 3, 4}
        assert _rows(iter_shards(info, 4, "prompt", "id", skip=skip)) == {k: v for k, v in whole.items() if k not in skip}


def test_a_resume_on_s3_reads_its_plan_from_the_bucket(s3, tiny, tmp_path, monkeypatch):
    """The same on object storage: scan.parquet published in the output's bucket, the dataset's
    fingerprint one listing, and a half-finished job resumed without a scan."""
    from spd_cluster.cluster.commit import open_job
    from spd_cluster.cluster.plan import plan
    from spd_cluster.cluster.preflight import preflight
    from spd_cluster.io import fs

    local = _dataset(tmp_path / "ds")
    bucket = s3("scale")
    for f in sorted(local.iterdir()):
        fs.write_bytes(fs.resolve(f"{bucket}/ds/{f.name}"), f.read_bytes())
    out = f"{bucket}/out"
    cfg = make_cfg(tiny, f"{bucket}/ds/", out, **{"audit.fraction": 0.5, "max_error_fraction": 1})
    first = plan(preflight(cfg, for_run=True))
    open_job(first, None, 1.0).write()
    assert fs.resolve(out).join(dsmod.SCAN_FILE).exists()
    all_rows = _rows(first.shards())
    _written(out, [0, 1, 2, 3], 4)

    def no_scan(*a, **k):
        raise AssertionError("a resume does not scan the dataset")

    monkeypatch.setattr(dsmod, "scan", no_scan)
    again = plan(preflight(cfg, for_run=True))
    assert _rows(again.shards()) == {k: v for k, v in all_rows.items() if k > 3}
    assert again.audit_picks == first.audit_picks and again.info.row_errors == first.info.row_errors
