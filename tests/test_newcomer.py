"""What a newcomer meets: a closed pipe ends quietly, a seed script without its model or heads
ends in one line naming the command that provides them (no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_a_closed_pipe_ends_quietly(tmp_path):
    out = tmp_path / "job"
    out.mkdir()
    (out / "job.json").write_text(json.dumps({"name": "j", "status": "completed", "num_shards": 0, "runs": []}))
    r, w = os.pipe()
    os.close(r)  # `| head -1` that has read what it wanted: every write fails with EPIPE
    try:
        for cmd in (["status", str(out)], ["models", "list"]):
            p = subprocess.run([str(BIN / "spd-cluster"), *cmd], stdout=w, stderr=subprocess.PIPE, text=True, timeout=120)
            assert p.stderr == "" and p.returncode == 141, (cmd, p.returncode, p.stderr[-2000:])
    finally:
        os.close(w)


@pytest.mark.slow  # two script runs, each importing torch and transformers
def test_seed_script_without_heads_names_the_train_heads_command(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')  # found; its heads are what is missing
    for extra in ([], ["--speculator-path", str(tmp_path / "heads")]):
        p = subprocess.run([sys.executable, str(REPO / "scripts" / "multiprojs_spd_inference.py"),
                            "--pretrained-model-name-or-path", str(model), "--prompts", "x", *extra],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and "spd-cluster train-heads --model" in last, last
        assert (str(tmp_path / "heads") in last) == bool(extra)
