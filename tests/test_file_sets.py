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
from s3server import s3  # noqa: F401 - fixture
from test_cluster import GOOD, local_ray, make_cfg, reference, tiny  # noqa: F401 - fixtures

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


def test_a_missing_bucket_or_file_is_a_clear_error(s3):  # noqa: F811
    with pytest.raises(DatasetError, match="dataset file not found: s3://"):
        scan(s3("empty-bucket") + "/none.jsonl")
    with pytest.raises(DatasetError, match=r"dataset file not found: s3://no-such-bucket/x.jsonl"):
        scan("s3://no-such-bucket/x.jsonl")
    assert isinstance(fs.resolve("s3://b/x").fs, pafs.S3FileSystem)


def test_a_job_reads_a_directory_of_parquet_files_from_s3(s3, tiny, local_ray, tmp_path):  # noqa: F811
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
