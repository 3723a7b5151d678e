"""A row-level problem is an error row, whatever the row holds: it never fails a shard or costs
another row, and its message names the row (file and line or row, and id)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import GOOD, make_cfg, reference, results, write_jsonl  # tiny, ray2: fixtures (conftest.py)
from tiny import VOCAB, tiny_model

from spd_cluster.cluster.coordinator import run_job
from spd_cluster.engine import SpDEngine, SpDSettings
from spd_cluster.io.dataset import iter_shards, scan
from spd_cluster.sessions.torch_session import TorchSession


def test_a_prompt_is_a_string_and_anything_else_is_a_named_error_row(tmp_path):
    rows = [{"id": "ok", "prompt": "hello"}, {"id": "strs", "prompt": ["a", "b"]}, {"id": "ints", "prompt": [5, 6, 7]},
            {"id": "num", "prompt": 42}, {"id": "obj", "prompt": {"text": "x"}}, {"id": "null", "prompt": None},
            {"id": "nokey"}, {"id": "ok2", "prompt": ""}]
    p = tmp_path / "d.jsonl"
    lines = [json.dumps(r) for r in rows]
    p.write_text("\n".join(lines[:3] + [""] + lines[3:]) + "\n")  # a blank line: lines are not rows
    info = scan(p, "prompt", "id")
    e = info.row_errors
    assert sorted(e) == [1, 2, 3, 4, 5, 6]  # "" is the engine's to refuse, with the tokenizer
    assert e[1] == "d.jsonl line 2 (id 'strs'): prompt is a list of 2 (str), not a string; a prompt is text"
    assert e[2] == "d.jsonl line 3 (id 'ints'): prompt is a list of 3 (int), not a string; a prompt is text"
    assert e[3] == "d.jsonl line 5 (id 'num'): prompt is int 42, not a string"
    assert e[4].startswith("d.jsonl line 6 (id 'obj'): prompt is dict")
    assert e[5] == "d.jsonl line 7 (id 'null'): no prompt: 'prompt' is null or missing"
    assert e[6] == "d.jsonl line 8 (id 'nokey'): no prompt: 'prompt' is null or missing"
    (shard,) = iter_shards(info, 10, "prompt", "id")
    assert [r.error is None for r in shard.rows] == [True, False, False, False, False, False, False, True]
    # Parquet: a list<string> column, and a null in a string column, are named by row
    q = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": pa.array([["a"], ["b", "c"]], pa.list_(pa.string()))}), q)
    assert scan(q).row_errors[1] == "d.parquet row 1 (id '1'): prompt is a list of 2 (str), not a string; a prompt is text"
    pq.write_table(pa.table({"prompt": ["a", None, "c"]}), q)
    assert scan(q).row_errors == {1: "d.parquet row 1 (id '1'): no prompt: 'prompt' is null or missing"}


def test_in_process_token_ids_are_checked_and_nothing_raises():
    class Tok:
        eos_token_id = 2

        def __call__(self, text, **kw):
            if "boom" in text:
                raise RuntimeError("tokenizer broke")
            return {"input_ids": [3 + (ord(c) % 50) for c in text]}

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    s = SpDSettings(prefill_seq_len=8, ctx_len=64, max_new_tokens=4, full_batch_size=2)
    eng = SpDEngine("pld", TorchSession(tiny_model(), 2, 64), Tok(), s)
    prompts = ["hello", ["a", "b"], [3, 4, VOCAB], [-1, 4], [True, 4], np.array([1.5, 2.0]), "boom here",
               [3, 4, 5], np.array([[3, 4]]), [3, 2**70], "again"]
    info = eng.generate(prompts, prompt_ids=[str(i) for i in range(len(prompts))])
    r = info.results
    err = {i: x.error for i, x in enumerate(r) if x.finish_reason == "error"}
    assert sorted(err) == [1, 2, 3, 4, 5, 6, 9]
    assert "list of str" in err[1]
    assert f"token id {VOCAB} at position 2 is outside the target's vocabulary (0..{VOCAB - 1})" in err[2]
    assert "token id -1 at position 0" in err[3] and "list of bool, int" in err[4] and "array of float64" in err[5]
    assert "could not be tokenized: RuntimeError: tokenizer broke" in err[6] and "outside" in err[9]
    # the good rows around them ran; token ids within the vocabulary still run in process
    assert all(r[i].finish_reason in ("eos", "length") and r[i].generated_ids for i in (0, 7, 8, 10))
    assert r[7].num_prompt_tokens == 3 and r[8].num_prompt_tokens == 2


@pytest.mark.slow
def test_bad_rows_never_fail_a_shard_or_cost_another_row(tiny, ray2, tmp_path):
    rows = [{"id": f"p{i}", "prompt": GOOD[i % len(GOOD)]} for i in range(40)]
    rows[1] = {"id": "strs", "prompt": ["the quick", "brown fox"]}  # beside good prompts in shard 0
    rows[5] = {"id": "oov", "prompt": [3, 4, 100_000]}  # token ids outside the vocabulary
    rows[6] = {"id": "ids", "prompt": [3, 4, 5]}  # token ids inside it: not a prompt either
    ds = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = make_cfg(tiny, ds, tmp_path / "out", **{"cluster.num_pairs": 1, "spd.max_new_tokens": 8,
                                                  "audit.fraction": 0})
    events = []
    res = run_job(cfg, progress=False, on_event=lambda kind, **kw: events.append(kind))
    assert res.status == "completed" and res.num_errors == 3
    assert "retry" not in events
    shards = pd.read_parquet(tmp_path / "out" / "shards.parquet")
    assert (shards.attempts == 1).all() and shards.num_prompts.sum() == 40
    df = results(tmp_path / "out").set_index("prompt_id")
    bad = df.loc[["strs", "oov", "ids"]]
    assert (bad.finish_reason == "error").all()
    assert bad.error["strs"] == "d.jsonl line 2 (id 'strs'): prompt is a list of 2 (str), not a string; a prompt is text"
    assert bad.error["oov"].startswith("d.jsonl line 6 (id 'oov'): prompt is a list of 3 (int)")
    assert bad.error["ids"].startswith("d.jsonl line 7 (id 'ids'): prompt is a list of 3 (int)")
    ok = df[df.finish_reason != "error"]
    assert len(ok) == 37 and ok.error.isna().all()
    assert {r: list(g) for r, g in zip(ok.row, ok.generated_ids)} == reference(tiny, cfg)
