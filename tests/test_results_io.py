"""Parquet/JSON outputs: schemas, atomic writes, shard metadata for resume, read back with pandas."""

from __future__ import annotations


from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest


from spd_cluster.engine.reduce import empty_metrics
from spd_cluster.io import fs
from spd_cluster.io import results as rio


def row(i, **kw):
    r = {"prompt_id": f"p{i}", "row": i, "prompt": f"prompt {i}", "generated_text": "out", "generated_ids": [1, 2, 3],
         "num_prompt_tokens": 5, "num_generated_tokens": 3, "finish_reason": "length", "error": None,
         "shard_id": 0, "pair_id": 1, "ttft_s": 0.01, "num_decode_iterations": 2, "mean_num_accepted_tokens": 1.5}
    r.update(kw)
    return r


def shard_record(sid=0):
    m = empty_metrics()
    m.generated_tokens_per_prompt, m.num_generated_tokens = [3, 0], 3
    m.proposed_per_position, m.accepted_per_position = [4, 2], [2, 1]
    return {"shard_id": sid, "first_row": 0, "num_prompts": 2, "num_errors": 1, "pair_id": 1, "node_id": "n",
            "attempts": 1, "wall_s": 0.5, "finished_at": "2025-01-01T00:00:00+00:00", **rio.metrics_record(m)}


def test_results_schema_has_required_columns():
    names = set(rio.RESULTS_SCHEMA.names)
    assert names >= {"prompt_id", "prompt", "generated_text", "generated_ids", "num_prompt_tokens",
                     "num_generated_tokens", "finish_reason", "error", "shard_id", "pair_id", "ttft_s",
                     "num_decode_iterations", "mean_num_accepted_tokens"}
    assert str(rio.RESULTS_SCHEMA.field("generated_ids").type) == "list<item: int64>"
    # every SpDPerfMetrics field gets a real type (no silent string fallback)
    for f in rio.METRIC_FIELDS:
        assert str(f.type) != "string", f.name


def test_shard_roundtrip_with_pandas_and_metadata(tmp_path):
    rows = [row(0), row(1, finish_reason="error", error="prompt is empty", generated_ids=[], generated_text="",
                       num_generated_tokens=0, prompt=None)]
    path = rio.write_shard(tmp_path, 0, rows, shard_record())
    assert path.path == str(tmp_path / "results" / "shard-00000.parquet")
    df = pd.read_parquet(path)
    assert list(df.columns) == rio.RESULTS_SCHEMA.names
    assert df.prompt_id.tolist() == ["p0", "p1"] and df.finish_reason.tolist() == ["length", "error"]
    assert list(df.generated_ids[0]) == [1, 2, 3] and list(df.generated_ids[1]) == []
    assert df.error.isna().tolist() == [True, False] and df.prompt.isna().tolist() == [False, True]
    rec = rio.read_shard_record(path)
    assert rec["num_errors"] == 1 and rec["accepted_per_position"] == [2, 1]
    assert rio.written_shards(tmp_path) == {0: path}
    # no temp files left behind
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["shard-00000.parquet"]


def test_shards_and_exec_info_tables(tmp_path):
    rio.write_shards_table(tmp_path, [shard_record(2), shard_record(0)])
    df = pd.read_parquet(tmp_path / "shards.parquet")
    assert df.shard_id.tolist() == [0, 2]
    assert list(df.acceptance_rate_per_position[0]) == [0.5, 0.5]
    rec = {"name": "j", "mode": "pld", "num_prompts": 2, **rio.metrics_record(empty_metrics())}
    rio.write_exec_info(tmp_path, rec)
    t = pq.read_table(tmp_path / "exec_info.parquet")
    assert t.num_rows == 1 and t.schema == rio.EXEC_INFO_SCHEMA
    assert t.column("mode")[0].as_py() == "pld"


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    rio.write_shards_table(tmp_path, [shard_record(0)])
    real = pq.write_table

    def dies_half_way(table, where, **kw):
        real(table.slice(0, 0), where, **kw)
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        rio.write_shards_table(tmp_path, [shard_record(0), shard_record(1)])
    monkeypatch.undo()
    assert [r["shard_id"] for r in rio.read_shards_table(tmp_path)] == [0]
    assert [p.name for p in tmp_path.iterdir()] == ["shards.parquet"]  # temp file cleaned up


def test_unreadable_shard_record_is_none(tmp_path):
    bad = tmp_path / "results" / "shard-00003.parquet"
    bad.parent.mkdir()
    bad.write_bytes(b"garbage")
    assert rio.read_shard_record(bad) is None
    assert {k: v.path for k, v in rio.written_shards(tmp_path).items()} == {3: str(bad)}


def test_check_writable_and_clear(tmp_path):
    out = rio.check_writable(tmp_path / "a" / "b")
    assert (out / "results").is_dir() and list(Path(out).glob(".write-test*")) == []
    rio.write_shard(out, 0, [row(0)], shard_record())
    rio.write_json_atomic({}, out / "job.json")
    Path(out, "mine.txt").write_text("keep me")
    rio.clear_output(out)
    assert sorted(p.name for p in Path(out).iterdir()) == ["mine.txt", "results"]
    assert rio.written_shards(out) == {}


def test_read_only_filesystem_output_fails_at_once():
    # /proc refuses new directories even to root, so this holds whoever runs the tests
    with pytest.raises(rio.OutputError, match="not writable"):
        rio.check_writable("/proc/spd_cluster_out")


def test_output_under_a_file_fails_at_once(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(rio.OutputError, match=r"output path .*file/out is not writable"):
        rio.check_writable(f / "out")


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path):
    if request.param == "local":
        return fs.resolve(str(tmp_path / "out"))
    return fs.resolve(request.getfixturevalue("s3")(f"out-{tmp_path.name.lower().replace('_', '-')[-20:]}") + "/job")


def test_records_come_from_the_checkpoint_and_the_footers_of_later_files_only(out, monkeypatch):
    rio.check_writable(out)
    for sid in (0, 1, 2):
        rio.write_shard(out, sid, [row(sid, shard_id=sid)], {**shard_record(sid), "audit": [{"prompt_id": f"p{sid}"}]})
    rio.write_audit(out, [{"prompt_id": "p0", "row": 0, "shard_id": 0, "pair_id": 1, "match": True}])
    rio.write_shards_table(out, [shard_record(0), shard_record(7)])  # the checkpoint: shard 0, and a gone 7
    fs.write_bytes(rio.shard_path(out, 3), b"half a file")
    read = []
    real = rio.read_shard_record
    monkeypatch.setattr(rio, "read_shard_record", lambda loc: read.append(loc.name) or real(loc))
    records, stale = rio.load_records(out, with_audit=True)
    assert sorted(records) == [0, 1, 2] and [s.name for s in stale] == ["shard-00003.parquet"]
    assert sorted(read) == ["shard-00001.parquet", "shard-00002.parquet", "shard-00003.parquet"]  # not shard 0's
    assert [a["prompt_id"] for a in records[0]["audit"]] == ["p0"] and records[1]["audit"] == [{"prompt_id": "p1"}]
    rio.clear_output(out)
    assert rio.written_shards(out) == {} and rio.read_shards_table(out) == [] and rio.read_job_json(out) is None


def test_an_output_in_a_missing_bucket_fails_at_once(s3):
    s3("some-bucket")  # the server runs; this bucket does not exist
    with pytest.raises(rio.OutputError, match=r"output path s3://no-such-bucket/out is not writable"):
        rio.check_writable("s3://no-such-bucket/out")
