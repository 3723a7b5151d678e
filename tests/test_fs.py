"""Locations: local paths and URIs through pyarrow.fs, file sets, whole-file publishing; on the
local disk and on a real S3 API (moto's server on 127.0.0.1)."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest
from s3server import s3  # noqa: F401 - fixture

from spd_cluster.io import fs


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return fs.resolve(str(tmp_path / "data"))
    return fs.resolve(request.getfixturevalue("s3")(f"bkt-{tmp_path.name.lower().replace('_', '-')[-20:]}") + "/data")


def test_file_sets_directory_glob_and_file(root):
    for name in ("b.jsonl", "a.parquet", "sub/c.jsonl.gz", "notes.txt", ".hidden.jsonl", "_SUCCESS"):
        fs.write_bytes(root.join(*name.split("/")), b"x")
    names = lambda locs: [loc.path[len(root.path) + 1:] for loc in locs]  # noqa: E731
    suffixes = (".jsonl", ".parquet", ".jsonl.gz")
    assert names(fs.list_files(root, suffixes)) == ["a.parquet", "b.jsonl", "sub/c.jsonl.gz"]
    assert names(fs.list_files(root.join("*.jsonl"), suffixes)) == ["b.jsonl"]  # * stays in one directory
    assert names(fs.list_files(root.join("**", "*.jsonl*"), suffixes)) == ["b.jsonl", "sub/c.jsonl.gz"]
    assert names(fs.list_files(root.join("b.jsonl"), suffixes)) == ["b.jsonl"]
    assert fs.list_files(root.join("missing"), suffixes) == []
    assert all(str(loc).endswith(loc.path[len(root.path):]) for loc in fs.list_files(root, suffixes))


def test_publish_never_leaves_a_partial_file_under_the_final_name(root):
    target = root.join("out", "shard-00000.parquet")

    def half(f: pafs.FileSystem, path: str) -> None:
        with f.open_output_stream(path) as out:
            out.write(b"half of it")
        raise RuntimeError("died while writing")

    with pytest.raises(RuntimeError):
        fs.publish(target, half)
    assert not target.exists()
    assert [i.path for i in root.fs.get_file_info(pafs.FileSelector(root.path, recursive=True, allow_not_found=True))
            if i.type == pafs.FileType.File] == []  # and no temporary left behind
    fs.write_bytes(target, b"all of it")
    fs.write_bytes(target, b"all of it, again")  # a retried shard replaces its file
    assert fs.read_bytes(target) == b"all of it, again"


def test_resolve_names_what_it_cannot_reach():
    with pytest.raises(ValueError, match="nosuch://x/y: not a location"):
        fs.resolve("nosuch://x/y")
    with pytest.raises(ValueError, match="bad filesystem options"):
        fs.resolve("s3://b/k", {"no_such_option": 1})
    loc = fs.resolve("s3://b/k", {"endpoint_override": "http://127.0.0.1:9"})
    assert loc.path == "b/k" and not loc.local
    assert fs.resolve("relative/dir").local


def test_temporaries_of_a_killed_writer_are_removed_and_nothing_else(root):
    fs.write_bytes(root.join("shard-00001.parquet"), b"published")
    fs.write_bytes(root.join(".keep"), b"not ours")
    with root.fs.open_output_stream(root.join(f"{fs.TEMP_PREFIX}0123456789ab-shard-00002.parquet").path) as f:
        f.write(b"half")  # what publish leaves when its process is SIGKILLed before the move
    assert fs.remove_temporaries(root) == 1
    left = [i.path[len(root.path) + 1:] for i in root.fs.get_file_info(pafs.FileSelector(root.path))]
    assert sorted(left) == [".keep", "shard-00001.parquet"]
    assert fs.remove_temporaries(root.join("missing")) == 0


def test_filesystem_options_keep_the_environments_endpoint(s3):  # noqa: F811
    """Options for an S3 URI (a region, say) still reach the endpoint AWS_ENDPOINT_URL names, as
    a URI without options does: never the public AWS endpoint behind the user's back."""
    bucket = s3("opts-bucket")
    loc = fs.resolve(bucket + "/x.txt", {"region": "us-east-1"})
    fs.write_bytes(loc, b"here")
    assert fs.read_bytes(fs.resolve(bucket + "/x.txt")) == b"here"
