"""Dataset readers: formats, shards, ids, and bad files that fail fast naming file and column."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spd_cluster.io.dataset import DatasetError, iter_rows, iter_shards, scan

PROMPTS = [f"prompt number {i}" for i in range(10)]


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def parquet(path, **cols):
    pq.write_table(pa.table(cols), path, row_group_size=3)
    return path


def csv(path, text):
    path.write_text(text)
    return path


@pytest.fixture(params=["parquet", "jsonl", "csv"])
def dataset(request, tmp_path):
    ids = [f"id-{i}" for i in range(len(PROMPTS))]
    if request.param == "parquet":
        return parquet(tmp_path / "d.parquet", text=PROMPTS, key=ids)
    if request.param == "jsonl":
        return jsonl(tmp_path / "d.jsonl", [{"key": k, "text": p, "other": 1} for k, p in zip(ids, PROMPTS)])
    lines = ["key,text,other"] + [f'{k},"{p}",1' for k, p in zip(ids, PROMPTS)]
    return csv(tmp_path / "d.csv", "\n".join(lines) + "\n")


def test_every_format_streams_rows_and_shards(dataset):
    rows = list(iter_rows(dataset, "text", "key"))
    assert [r.prompt for r in rows] == PROMPTS
    assert [r.prompt_id for r in rows] == [f"id-{i}" for i in range(10)]
    assert [r.row for r in rows] == list(range(10))
    info = scan(dataset, "text", "key")
    assert info.num_rows == 10 and info.row_errors == {} and len(info.sha256) == 64
    shards = list(iter_shards(info, 4, "text", "key"))
    assert [len(s) for s in shards] == [4, 4, 2] and [s.shard_id for s in shards] == [0, 1, 2]
    assert [s.first_row for s in shards] == [0, 4, 8] and info.num_shards(4) == 3
    assert [r.prompt for s in shards for r in s.rows] == PROMPTS


def test_no_id_column_means_row_numbers(dataset):
    assert [r.prompt_id for r in iter_rows(dataset, "text")] == [str(i) for i in range(10)]


def test_duplicate_and_null_ids_become_row_errors(tmp_path):
    p = jsonl(tmp_path / "d.jsonl", [{"id": 1, "prompt": "a"}, {"id": "1", "prompt": "b"}, {"id": None, "prompt": "c"},
                                    {"id": 2, "prompt": "d"}, {"id": 2, "prompt": "e"}])
    info = scan(p, "prompt", "id")
    assert sorted(info.row_errors) == [1, 2, 4]
    assert "duplicate prompt_id '1' (first at row 0)" in info.row_errors[1]
    assert "null" in info.row_errors[2]
    (shard,) = iter_shards(info, 10, "prompt", "id")
    assert [r.error is None for r in shard.rows] == [True, False, False, True, False]


def test_bad_values_pass_through_for_the_engine(tmp_path):
    p = jsonl(tmp_path / "d.jsonl", [{"prompt": ""}, {"prompt": 42}, {"nothing": 1}, {"prompt": ["x"]}, {"prompt": "ok"}])
    assert [r.prompt for r in iter_rows(p)] == ["", 42, None, ["x"], "ok"]
    # CSV keeps everything as text, an empty cell as ""
    c = csv(tmp_path / "d.csv", 'prompt\n42\n""\n   \nok\n')
    assert [r.prompt for r in iter_rows(c)] == ["42", "", "   ", "ok"]


def test_jsonl_blank_lines_are_not_rows(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a"}\n\n   \n{"prompt": "b"}\n')
    assert [(r.row, r.prompt) for r in iter_rows(p)] == [(0, "a"), (1, "b")]


def test_bad_files_fail_naming_file_and_column(tmp_path):
    with pytest.raises(DatasetError, match="dataset file not found: .*missing.jsonl"):
        scan(tmp_path / "missing.jsonl")
    with pytest.raises(DatasetError, match=r"unknown format '.tsv'"):  # .txt is a format: one prompt per line
        scan(csv(tmp_path / "d.tsv", "prompt\nx\n"))
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(DatasetError, match=r"corrupt.parquet: not a readable Parquet file"):
        scan(corrupt)
    good = parquet(tmp_path / "t.parquet", text=PROMPTS)
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(DatasetError, match="truncated.parquet"):
        scan(truncated, "text")
    with pytest.raises(DatasetError, match=r"t.parquet: no column 'prompt' \(dataset.prompt_column\)"):
        scan(good)
    with pytest.raises(DatasetError, match=r"no column 'id' \(dataset.id_column\)"):
        scan(good, "text", "id")
    with pytest.raises(DatasetError, match=r"d.csv: no column 'prompt'"):
        scan(csv(tmp_path / "d.csv", "text\nx\n"))
    with pytest.raises(DatasetError, match=r"d.jsonl: no row has the key 'prompt'"):
        scan(jsonl(tmp_path / "d.jsonl", [{"text": "x"}]))
    with pytest.raises(DatasetError, match=r"bad.jsonl: line 2 is not valid JSON"):
        p = tmp_path / "bad.jsonl"
        p.write_text('{"prompt": "a"}\n{"prompt": \n')
        scan(p)
    with pytest.raises(DatasetError, match="no rows"):
        scan(jsonl(tmp_path / "empty.jsonl", []))
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    with pytest.raises(DatasetError, match="empty-dir: no csv, jsonl, parquet files"):
        scan(empty)  # a directory is a file set (tests/test_file_sets.py), here one without data


def test_format_override(tmp_path):
    p = jsonl(tmp_path / "d.data", [{"prompt": "x"}])
    assert [r.prompt for r in iter_rows(p, format="jsonl")] == ["x"]


def test_streaming_does_not_read_ahead(tmp_path):
    """A shard comes out before the rest of the file is read (the driver holds shards, not the dataset)."""
    p = parquet(tmp_path / "big.parquet", prompt=[f"p{i}" for i in range(10_000)])
    info = scan(p)
    assert info.num_rows == 10_000
    it = iter_shards(info, 16)
    first = next(it)
    assert len(first) == 16 and first.rows[0].prompt == "p0"
    assert sum(len(s) for s in it) == 10_000 - 16


def test_unreadable_files_name_the_file_and_line(tmp_path):
    # a damaged uncompressed Parquet page: one byte of a string turned into invalid UTF-8
    good = tmp_path / "u.parquet"
    pq.write_table(pa.table({"prompt": [f"prompt {i} h\u00e9llo" for i in range(20)]}), good, compression="NONE")
    data = bytearray(good.read_bytes())
    at = data.find("prompt 7 h".encode()) + len("prompt 7 h")
    data[at] = 0xFF
    bad = tmp_path / "damaged.parquet"
    bad.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"damaged.parquet: corrupt Parquet data: column 'prompt' row 7 is not valid UTF-8"):
        scan(bad)
    # JSONL: the line (and column) of the bad byte, not a buffer offset; a BOM is not an error
    j = tmp_path / "bad.jsonl"
    j.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n\n{"prompt": "b"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl: line 4 is not valid UTF-8 \(byte 0xe9 at column 16\)"):
        scan(j)
    j.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n')
    assert [r.prompt for r in iter_rows(j)] == ["a"]
    # CSV: the line of the first invalid byte
    c = tmp_path / "bad.csv"
    c.write_bytes(b'prompt,other\nok,1\n"two\nlines",2\nbad \xff here,3\n')
    with pytest.raises(DatasetError, match=r"bad.csv: line 5 is not valid UTF-8 \(byte 0xff at column 5\)"):
        scan(c)
    c.write_bytes(b"\xff\xfeprompt\nx\n")
    with pytest.raises(DatasetError, match=r"bad.csv: line 1 is not valid UTF-8"):
        scan(c)


def test_missing_column_lists_what_the_file_has(tmp_path):
    good = parquet(tmp_path / "t.parquet", text=PROMPTS, key=list(range(10)))
    with pytest.raises(DatasetError, match=r"no column 'txt' \(dataset.prompt_column\); columns found: \['key', 'text'\]; "
                                           r"did you mean 'text'\?"):
        scan(good, "txt")
    with pytest.raises(DatasetError, match=r"d.csv: no column 'prompt'.*columns found: \['body', 'id'\]"):
        scan(csv(tmp_path / "d.csv", "id,body\n1,x\n"))
    with pytest.raises(DatasetError, match=r"d.jsonl: no row has the key 'promt' \(dataset.prompt_column\); "
                                           r"keys found: \['id', 'prompt'\]; did you mean 'prompt'\?"):
        scan(jsonl(tmp_path / "d.jsonl", [{"id": 1, "prompt": "x"}]), "promt")


def test_seen_ids_finds_every_duplicate_and_its_first_row_across_batches():
    import random

    from spd_cluster.io.dataset import SeenIds

    rng = random.Random(0)
    ids = [f"id-{rng.randrange(3000)}" for _ in range(10_000)]  # many repeats, far apart and near
    seen, got, first = SeenIds(), [], {}
    for lo in range(0, len(ids), 700):  # batches of uneven size: runs of many lengths merge
        got += seen.add(ids[lo:lo + 700], list(range(lo, min(lo + 700, len(ids)))))
    want = []
    for i, x in enumerate(ids):  # what a dict of every id would say
        want.append(first.get(x, -1))
        first.setdefault(x, i)
    assert got == want and sum(g >= 0 for g in got) == len(ids) - len(set(ids))
    assert len(seen.runs) <= 15 and sum(run[0].size for run in seen.runs) == len(set(ids))


# -- text files: one prompt per line ------------------------------------------------------------

def test_text_file_is_one_prompt_per_line_ids_are_line_numbers(tmp_path):
    import gzip

    text = "\ufefffirst prompt\n\n  second, indented  \r\n   \nthird \"quoted\", with, commas\n"
    for name, data in (("p.txt", text.encode()), ("p.txt.gz", gzip.compress(text.encode()))):
        path = tmp_path / name
        path.write_bytes(data)
        rows = list(iter_rows(path, "ignored", "ignored-too"))  # a text file has no columns
        assert [r.prompt for r in rows] == ["first prompt", "  second, indented  ", 'third "quoted", with, commas']
        assert [r.prompt_id for r in rows] == ["1", "3", "5"] and [r.line for r in rows] == [1, 3, 5]
        assert [r.row for r in rows] == [0, 1, 2]
        info = scan(path)
        assert info.num_rows == 3 and info.format == "text" and info.row_errors == {}
        assert [r.prompt for s in iter_shards(info, 2) for r in s.rows] == [r.prompt for r in rows]


def test_dataset_format_text_reads_a_file_of_any_name_as_one_prompt_per_line(tmp_path):
    from spd_cluster.config import config_from_dict

    path = tmp_path / "prompts.lst"
    path.write_text("alpha\n\nbeta\n")
    cfg = config_from_dict({"name": "t", "mode": "pld", "target": {"model": "m"},
                            "dataset": {"path": str(path), "format": "text"}, "output": {"path": str(tmp_path / "o")}})
    assert cfg.dataset.format == "text"
    rows = list(iter_rows(path, format=cfg.dataset.format))
    assert [(r.prompt_id, r.prompt) for r in rows] == [("1", "alpha"), ("3", "beta")]


def test_text_files_in_a_set_and_their_errors(tmp_path):
    d = tmp_path / "set"
    d.mkdir()
    (d / "a.txt").write_text("one\ntwo\n")
    jsonl(d / "b.jsonl", [{"prompt": "three"}])
    rows = list(iter_rows(str(d / "*")))  # a glob names the .txt files too
    assert [(r.prompt_id, r.prompt) for r in rows] == [("a.txt:1", "one"), ("a.txt:2", "two"), ("b.jsonl:0", "three")]
    assert [r.prompt for r in iter_rows(str(d / "*.txt"))] == ["one", "two"]
    assert [r.prompt for r in iter_rows(d)] == ["three"]  # a directory: its data files (a .txt there is mostly a README)
    (tmp_path / "bad.txt").write_bytes(b"fine\nbad \xe9 byte\n")
    with pytest.raises(DatasetError, match=r"line 2 is not valid UTF-8 \(byte 0xe9 at column 5\)"):
        scan(tmp_path / "bad.txt")
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(DatasetError, match="no rows"):
        scan(tmp_path / "blank.txt")
