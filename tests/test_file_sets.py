"""A dataset is a file, a directory or a glob of Parquet / JSONL / CSV files (text ones also .gz
or .zst), local or on object storage (a real S3 API: moto's server on 127.0.0.1); row ids are
stable (the id column, else file:row) whatever the listing order or files added beside."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from helpers import GOOD, make_cfg, reference  # tiny, local_ray, s3: fixtures (conftest.py)

from spd_cluster.io import fs
from spd_cluster.io.dataset import DatasetError, iter_shards, scan


def write_set(root: fs.Location) -> None:
    """Three files, three formats, two compressed; a non-data file and a hidden one beside."""
    def put(name: str, data: bytes) -> None:
        fs.write_bytes(root.join(*name.split("/")), data)

    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"prompt": ["p0", "p1"], "n": [1, 2]}), sink)
    put("a.parquet", sink.getvalue().to_pybytes())
    put("b/c.jsonl.gz", gzip.compress(b"".join(json.dumps({"prompt": f"j{i}"}).encode() + b"\n" for i in range(3))))
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as z:
        pacsv.write_csv(pa.table({"prompt": ["c0", "c1"]}), z)
    put("d.csv.zst", sink.getvalue().to_pybytes())
    put("README.txt", b"not data")
    put(".e.jsonl", b'{"prompt": "hidden"}\n')


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        loc = fs.resolve(str(tmp_path / "set"))
    else:
        loc = fs.resolve(request.getfixturevalue("s3")(f"ds-{abs(hash(tmp_path.name)) % 10**8}") + "/set")
    write_set(loc)
    return loc


def test_a_directory_is_every_data_file_below_it(root):
    info = scan(str(root))
    shards = list(iter_shards(info, 3))
    rows = [r for sh in shards for r in sh.rows]
    assert [r.prompt for r in rows] == ["p0", "p1", "j0", "j1", "j2", "c0", "c1"]
    assert [r.prompt_id for r in rows] == ["a.parquet:0", "a.parquet:1", "b/c.jsonl.gz:0", "b/c.jsonl.gz:1",
                                           "b/c.jsonl.gz:2", "d.csv.zst:0", "d.csv.zst:1"]
    assert [len(s) for s in shards] == [3, 3, 1] and info.num_rows == 7 and not info.row_errors
    assert info.format == "csv+jsonl+parquet"


def test_a_glob_picks_files_and_ids_do_not_move_when_files_are_added(root):
    before = {r.prompt: r.prompt_id for sh in iter_shards(scan(str(root.join("**", "*.jsonl.gz"))), 10) for r in sh.rows}
    assert before == {"j0": "b/c.jsonl.gz:0", "j1": "b/c.jsonl.gz:1", "j2": "b/c.jsonl.gz:2"}
    fs.write_bytes(root.join("0-first.jsonl"), b'{"prompt": "new"}\n')  # sorts before every other file
    info = scan(str(root))
    after = {r.prompt: r.prompt_id for sh in iter_shards(info, 10) for r in sh.rows}
    assert after["new"] == "0-first.jsonl:0" and after["p0"] == "a.parquet:0" and after["j1"] == "b/c.jsonl.gz:1"


def test_the_fingerprint_sees_a_changed_file_but_not_a_listing(root):
    first = scan(str(root)).sha256
    assert scan(str(root)).sha256 == first  # listed and read again: the same dataset
    fs.write_bytes(root.join("b", "c.jsonl.gz"), gzip.compress(b'{"prompt": "changed"}\n'))
    assert scan(str(root)).sha256 != first  # resume refuses it


def test_file_set_errors_name_the_file_and_row(root):
    fs.write_bytes(root.join("f.jsonl"), b'{"prompt": "ok"}\n{"prompt": 7}\n')
    info = scan(str(root))
    assert [e for e in info.row_errors.values()] == ["f.jsonl line 2 (id 'f.jsonl:1'): prompt is int 7, not a string"]
    with pytest.raises(DatasetError, match="no csv, jsonl, parquet files"):
        scan(str(root.join("nothing-*.parquet")))


def test_a_missing_bucket_or_file_is_a_clear_error(s3):
    with pytest.raises(DatasetError, match="dataset file not found: s3://"):
        scan(s3("empty-bucket") + "/none.jsonl")
    with pytest.raises(DatasetError, match=r"dataset file not found: s3://no-such-bucket/x.jsonl"):
        scan("s3://no-such-bucket/x.jsonl")
    assert isinstance(fs.resolve("s3://b/x").fs, pafs.S3FileSystem)


@pytest.mark.slow
def test_a_job_reads_a_directory_of_parquet_files_from_s3(s3, tiny, local_ray, tmp_path):
    """Real Ray, real S3 API: every prompt of a bucket's Parquet directory runs exactly once, the
    ids of the file set are the rows' ids, and the output equals the in-process engine's."""
    import pandas as pd

    from spd_cluster.cluster.coordinator import run_job

    root = fs.resolve(s3("job-data") + "/prompts")
    for i, chunk in enumerate([GOOD[:4], GOOD[4:7], GOOD[7:]]):
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"prompt": chunk}), sink)
        fs.write_bytes(root.join(f"part-{i}.parquet"), sink.getvalue().to_pybytes())
    cfg = make_cfg(tiny, root.uri + "/", tmp_path / "out", **{"dataset.id_column": "null", "cluster.num_pairs": 1,
                                                               "audit.fraction": 0})
    res = run_job(cfg, progress=False)
    df = pd.read_parquet(tmp_path / "out" / "results").sort_values("row")
    assert res.status == "completed" and len(df) == len(GOOD) and df.error.isna().all()
    assert list(df.prompt_id) == [f"part-{i}.parquet:{j}" for i, n in enumerate([4, 3, 3]) for j in range(n)]
    assert list(df.prompt) == GOOD
    ref = reference(tiny, cfg)
    assert {int(r.row): list(r.generated_ids) for r in df.itertuples()} == ref


def _bucket_set(s3, name: str, n: int) -> fs.Location:
    """n prompts with ids, as three Parquet files under a bucket's prompts/."""
    root = fs.resolve(s3(name) + "/prompts")
    per = -(-n // 3)
    for i in range(3):
        ids = list(range(i * per, min(n, (i + 1) * per)))
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"id": [f"q{j}" for j in ids], "prompt": [f"{GOOD[j % len(GOOD)]} {j}" for j in ids]}),
                       sink)
        fs.write_bytes(root.join(f"part-{i}.parquet"), sink.getvalue().to_pybytes())
    return root


def _objects(loc: fs.Location) -> list[str]:
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True, allow_not_found=True))
    return sorted(i.path[len(loc.path) + 1:] for i in infos if i.type == pafs.FileType.File)


@pytest.mark.slow
def test_a_job_on_s3_survives_a_killed_pair_and_a_cancel_and_runs_every_prompt_once(s3, tiny, local_ray,
                                                                                    tmp_path):
    """Real Ray, real S3 API: the dataset is a bucket's Parquet directory and the output is in the
    bucket too, written by the pairs. A pair's actor is killed mid-job (its shards run again), the
    job is cancelled part way and resumed: every prompt once, equal to the target alone."""
    import os
    import signal

    import pandas as pd

    from spd_cluster import status as status_mod
    from spd_cluster.cluster.coordinator import run_job
    from spd_cluster.io import results as rio

    n = 24
    data = _bucket_set(s3, "spd-job", n)
    out = fs.resolve(data.uri.rsplit("/", 1)[0] + "/out")
    cfg = make_cfg(tiny, data.uri + "/", out.uri, **{"cluster.shard_size": 2, "audit.fraction": 0.2,
                                                     "spd.max_new_tokens": 32, "spd.ignore_eos": "true"})
    pids, done, retried = {}, [], set()

    def on_event(kind, **kw):
        if kind == "ready":
            pids[kw["pair_id"]] = kw["info"]["pid"]
        if kind == "retry":
            retried.add(kw["shard_id"])
        if kind == "done":
            done.append(kw["shard_id"])
            if len(done) == 2:
                os.kill(pids[0], signal.SIGKILL)  # pair 0's target actor: Ray restarts it, its shards go again
            if len(done) >= 6 and retried & set(done):  # once a shard of the killed pair ran again
                raise KeyboardInterrupt  # as Ctrl-C: cancelled, what is written stays

    with pytest.raises(KeyboardInterrupt):
        run_job(cfg, progress=False, on_event=on_event)
    assert retried
    assert rio.read_job_json(out)["status"] == "cancelled"
    res = run_job(cfg, progress=False)
    assert res.status == "completed" and res.shards_skipped >= 6 and res.shards_skipped + res.shards_run == 12

    table = pq.read_table(out.join("results").path, filesystem=out.fs).to_pandas().sort_values("row")
    assert table.row.tolist() == list(range(n)) and table.prompt_id.tolist() == [f"q{j}" for j in range(n)]
    assert {int(r.row): list(r.generated_ids) for r in table.itertuples()} == reference(tiny, cfg)
    names = _objects(out)
    assert [x for x in names if x.startswith("results/")] == [f"results/shard-{i:05d}.parquet" for i in range(12)]
    assert set(names) - {f"results/shard-{i:05d}.parquet" for i in range(12)} == \
        {"job.json", "shards.parquet", "exec_info.parquet", "audit.parquet", "scan.parquet"}  # no temporary object left
    shards = pq.read_table(out.join("shards.parquet").path, filesystem=out.fs).to_pandas()
    assert shards.shard_id.tolist() == list(range(12)) and shards.attempts.max() == 2
    audit = pq.read_table(out.join("audit.parquet").path, filesystem=out.fs).to_pandas()
    assert len(audit) == 5 and audit["match"].all()  # ceil(0.2 * 24), every one kept across the resume
    st = status_mod.job_status(out.uri)
    assert st["state"] == "completed" and st["prompts_done"] == n and st["shards_done"] == 12
    job = rio.read_job_json(out)
    assert [r["status"] for r in job["runs"]] == ["cancelled", "completed"]
    assert pd.read_parquet(out.join("exec_info.parquet").path, filesystem=out.fs).num_prompts[0] == n


@pytest.mark.slow
def test_a_pair_that_dies_after_writing_its_shard_leaves_it_once(s3, tiny, local_ray, tmp_path,
                                                                  monkeypatch):
    """A pair that wrote a shard's file on S3 and died before its answer: the shard runs again
    elsewhere and its file is replaced whole: one file, each prompt once, the retry's record."""
    import ray

    from spd_cluster.cluster import actors
    from spd_cluster.cluster.coordinator import run_job
    from spd_cluster.io import results as rio
    from helpers import InProcessPair

    @ray.remote
    def died():
        raise RuntimeError("the actor died unexpectedly before finishing this task")

    class DiesAfterWriting(InProcessPair):
        deaths: list = []

        def run(self, request):
            ref = super().run(request)  # the file is written
            if request.shard_id == 1 and not self.deaths:
                self.deaths.append(self.pair_id)
                return died.remote()
            return ref

    monkeypatch.setattr(actors, "Pair", DiesAfterWriting)
    data = _bucket_set(s3, "spd-once", 8)
    out = fs.resolve(data.uri.rsplit("/", 1)[0] + "/out")
    cfg = make_cfg(tiny, data.uri + "/", out.uri, **{"cluster.shard_size": 2, "audit.fraction": 0})
    res = run_job(cfg, progress=False)
    assert res.status == "completed" and DiesAfterWriting.deaths
    table = pq.read_table(out.join("results").path, filesystem=out.fs).to_pandas().sort_values("row")
    assert table.row.tolist() == list(range(8))
    files = rio.written_shards(out)
    assert sorted(files) == [0, 1, 2, 3] and rio.read_shard_record(files[1])["attempts"] == 2
    assert [r["attempts"] for r in rio.read_shards_table(out)] == [1, 2, 1, 1]
