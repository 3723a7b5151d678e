"""QAIC adapter: lazy import, the clear error without QEfficient, and — against a fake QEfficient
that enforces the compiled specialisations — the calls it makes and the contract it keeps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from spd_cluster.sessions.base import SessionInputError, keep_index
from spd_cluster.sessions.qaic import compile_root

V = 101  # fake vocab


def token_of(tok: int, pos: int, head: int = 0) -> int:
    """The argmax the fake device puts at a kept column: a function of what sits there."""
    return (tok * 31 + pos * 7 + head) % V


class FakeQpcSession:
    """Behaves like QAICInferenceSession on a continuous-batching QPC: refuses any input or
    output-buffer shape outside the compiled specialisations and records KV writes. A QPC of a
    graph with the argmax outputs (add_device_argmax) also has tokens (and the heads' guesses at
    the verified column); an output whose buffer was set empty stays on the device."""

    instances: list["FakeQpcSession"] = []

    def __init__(self, qpc_path, device_ids=None):
        self.qpc_path, self.device_ids = qpc_path, device_ids
        cfg = json.loads(Path(qpc_path).read_text())
        self.is_tlm, self.heads, self.fbs = cfg["is_tlm"], cfg["heads"], cfg["full_batch_size"]
        p = cfg["prefill_seq_len"]
        # (batch, seq_len, logits kept) as QEfficient builds them for CB: one decode shape per k
        self.specs = [(1, p, 1)] + [(self.fbs, k + 1, k + 1) if self.is_tlm else (self.fbs, 1, 1) for k in cfg["ks"]]
        self.input_names = ["input_ids", "position_ids", "batch_index", "past_key.0", "past_value.0"]
        if self.is_tlm:
            self.input_names.append("num_logits_to_keep")
        argmax = ["tokens"] + (["head_tokens", "head_probs"] if self.heads else []) if cfg["argmax"] else []
        self.output_names = ["logits", *argmax, "past_key.0_RetainedState", "past_value.0_RetainedState"]
        self.skipped: set[str] = set()
        self.buffers: dict[str, tuple] = {}
        self.runs: list[tuple[int, int]] = []
        self.returned: list[set[str]] = []
        self.writes: dict[tuple[int, int], int] = {}
        FakeQpcSession.instances.append(self)

    def skip_buffers(self, names):
        self.skipped |= set(names)

    def set_buffers(self, buffers):
        self.buffers.update({k: v.shape for k, v in buffers.items()})

    def run(self, inputs):
        ids, pos, slots = inputs["input_ids"], inputs["position_ids"], inputs["batch_index"]
        b, s = ids.shape
        spec = next((sp for sp in self.specs if sp[:2] == (b, s)
                     and (not self.is_tlm or inputs["num_logits_to_keep"].shape == (sp[2], 1))), None)
        assert spec is not None, f"no specialisation for {ids.shape}"
        assert set(inputs) <= set(self.input_names) - self.skipped, set(inputs)
        keep = spec[2]
        out_shape = (b, keep) + ((self.heads + 1,) if self.heads else ()) + (V,)
        assert slots.shape == (b, 1) and len(set(slots.ravel().tolist())) == b
        self.runs.append((b, s))
        for r in range(b):
            for j in range(s):
                if pos[r, j] >= 0:
                    self.writes[(int(slots[r, 0]), int(pos[r, j]))] = int(ids[r, j])
        logits = np.zeros(out_shape, np.float32)
        last = pos.argmax(1)
        tokens = np.zeros((b, keep), np.int32)
        head_tokens = np.zeros((b, self.heads), np.int32)
        for r in range(b):
            lower = max(0, last[r] + 1 - keep)
            for j in range(keep):
                c = min(lower + j, s - 1)
                for h in range(self.heads + 1 if self.heads else 1):
                    idx = (r, j, h) if self.heads else (r, j)
                    logits[idx + (token_of(ids[r, c], pos[r, c], h),)] = 1.0
                tokens[r, j] = token_of(ids[r, c], pos[r, c])
            a = 0  # the verified column: kept columns 1..a valid, each the token chosen at the one before
            while a + 1 < keep and lower + a + 1 < s and pos[r, lower + a + 1] >= 0 and ids[r, lower + a + 1] == tokens[r, a]:
                a += 1
            c = min(lower + a, s - 1)
            head_tokens[r] = [token_of(ids[r, c], pos[r, c], h + 1) for h in range(self.heads)]
        e = np.e / (np.e + V - 1)  # softmax at the one-hot 1.0
        everything = {"logits": logits, "tokens": tokens, "head_tokens": head_tokens,
                      "head_probs": np.full((b, self.heads), e, np.float32)}
        out = {}
        for name in self.output_names:
            if name.endswith("_RetainedState"):
                continue
            shape = self.buffers.get(name)
            if shape == (0,):
                continue  # left on the device
            assert shape == everything[name].shape, (name, shape, everything[name].shape)
            out[name] = everything[name]
        self.returned.append(set(out))
        return out


class FakeQEFFModel:
    calls: list[dict] = []

    def __init__(self, name, kwargs):
        self.name, self.kwargs = name, kwargs
        qc = kwargs.get("qaic_config") or {}
        spec_cfg = {"num_speculative_tokens": 2} if qc.get("speculative_model_type") == "turbo" else None
        cfg = types.SimpleNamespace(vocab_size=V, speculative_config=spec_cfg)
        self.model = types.SimpleNamespace(config=cfg, generation_config=types.SimpleNamespace(eos_token_id=[7, 9]))

    @classmethod
    def from_pretrained(cls, name, **kwargs):
        FakeQEFFModel.calls.append({"from_pretrained": (name, kwargs)})
        return cls(name, kwargs)

    def export(self, export_dir):
        FakeQEFFModel.calls.append({"export": export_dir})
        return str(Path(export_dir) / "model.onnx")

    def compile(self, **kwargs):
        FakeQEFFModel.calls.append({"compile": kwargs})
        qc = self.kwargs.get("qaic_config") or {}
        heads = self.model.config.speculative_config["num_speculative_tokens"] if self.model.config.speculative_config else 0
        out = Path(kwargs["_qpc_dir"]) / f"qpc-{len(FakeQEFFModel.calls)}.json"
        ks = kwargs.get("num_speculative_tokens")
        out.write_text(json.dumps({
            "is_tlm": qc.get("speculative_model_type") in ("target", "turbo"), "heads": heads,
            "ks": [heads] if heads else ks if isinstance(ks, list) else [ks or 0],
            "full_batch_size": kwargs["full_batch_size"], "prefill_seq_len": kwargs["prefill_seq_len"],
            "argmax": kwargs["onnx_path"].endswith("-argmax.onnx"),
        }))
        return str(out)


@pytest.fixture
def fake_qeff(monkeypatch, tmp_path):
    """Inject a fake QEfficient package into sys.modules."""
    FakeQEFFModel.calls.clear()
    FakeQpcSession.instances.clear()
    qpc_dir = tmp_path / "qpcs"
    qpc_dir.mkdir()
    orig_compile = FakeQEFFModel.compile

    def compile_(self, **kw):
        return orig_compile(self, _qpc_dir=qpc_dir, **kw)

    monkeypatch.setattr(FakeQEFFModel, "compile", compile_)
    # the graph with the argmax outputs: a name the fake QPC reads (the real pass is tested on
    # QEfficient's graphs, tests/test_qeff_standin.py)
    monkeypatch.setattr("spd_cluster.sessions.qaic.add_device_argmax",
                        lambda path, *a: str(path).replace(".onnx", "-argmax.onnx"))
    root = types.ModuleType("QEfficient")
    root.QEFFAutoModelForCausalLM = FakeQEFFModel
    gen = types.ModuleType("QEfficient.generation")
    ci = types.ModuleType("QEfficient.generation.cloud_infer")
    ci.QAICInferenceSession = FakeQpcSession
    ci.is_qaicrt_imported = ci.is_aicapi_imported = True  # the SDK is "there"
    utils = types.ModuleType("QEfficient.utils")
    utils.constants = types.ModuleType("QEfficient.utils.constants")
    compiler = tmp_path / "qaic-compile"
    compiler.write_text("")
    utils.constants.COMPILER = [str(compiler), "-aic-hw"]
    for name, mod in {"QEfficient": root, "QEfficient.generation": gen, "QEfficient.generation.cloud_infer": ci,
                      "QEfficient.utils": utils, "QEfficient.utils.constants": utils.constants}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setenv("SPD_CLUSTER_CACHE", str(tmp_path / "cache"))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": V}))
    return model_dir


def save_heads(d: Path, num_heads: int = 2, num_layers: int = 1, vocab=None, same_layers: bool = False) -> str:
    import torch

    from spd_cluster.sessions.heads import TurboHeads

    torch.manual_seed(0)
    heads = TurboHeads(8, num_heads, num_layers, extra_config=None if vocab is None else {"head_vocab": vocab})
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_()
        if same_layers:
            for proj in heads.projections:
                for block in proj:
                    block.load_state_dict(proj[0].state_dict())
    heads.save(d)
    return str(d)


def test_import_does_not_import_qefficient():
    code = "import sys, spd_cluster.sessions.qaic as q; print('QEfficient' in sys.modules, q.QaicSession.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "QaicSession"]


def test_missing_qefficient_raises_clear_error(monkeypatch):
    from spd_cluster.sessions.qaic import QaicUnavailableError, load_qaic_session

    monkeypatch.setitem(sys.modules, "QEfficient", None)  # makes `import QEfficient` fail
    with pytest.raises(QaicUnavailableError) as e:
        load_qaic_session("any/model", "target", full_batch_size=2, ctx_len=64, prefill_seq_len=8,
                          num_speculative_tokens=3, device_ids=[0])
    msg = str(e.value)
    assert "make setup-qaic" in msg and "pip install --no-deps" in msg and "constraints/qaic.txt" in msg
    assert "runtime: onnxruntime" in msg and "device: cpu" in msg
    assert isinstance(e.value, RuntimeError)


def test_the_install_hint_is_what_make_setup_qaic_runs():
    """The hint installs QEfficient --no-deps beside its pins, as the Makefile does (its metadata
    names torch wheels by URL, so a plain pip install cannot work)."""
    root = Path(__file__).resolve().parents[1]
    make = (root / "Makefile").read_text()
    assert "setup-qaic:" in make and "--no-deps $(or $(QEFF_WHEEL),$(QEFF_UPSTREAM))" in make
    pins = (root / "constraints" / "qaic.txt").read_text().split()
    assert {"transformers==5.5.4", "numpy==1.26.4", "onnxruntime==1.22.0"} <= set(pins)


def test_a_missing_card_sdk_is_reported_before_any_export(fake_qeff, tmp_path):
    from spd_cluster.sessions.qaic import QaicUnavailableError, load_qaic_session

    sys.modules["QEfficient.utils.constants"].COMPILER = [str(tmp_path / "no" / "qaic-compile"), "-aic-hw"]
    with pytest.raises(QaicUnavailableError, match="missing the compiler") as e:
        load_qaic_session(str(fake_qeff), "target", full_batch_size=2, ctx_len=64, prefill_seq_len=8,
                          num_speculative_tokens=3, device_ids=[0])
    assert "runtime: onnxruntime" in str(e.value)
    assert FakeQEFFModel.calls == []  # nothing loaded, nothing exported


def test_an_unsupported_target_architecture_is_refused_before_loading(fake_qeff):
    from spd_cluster.sessions.qaic import load_qaic_session

    (fake_qeff / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    with pytest.raises(ValueError, match="for llama, qwen2, qwen3 only; .* is 'gemma3_text'"):
        load_qaic_session(str(fake_qeff), "target", full_batch_size=2, ctx_len=64, prefill_seq_len=8,
                          num_speculative_tokens=3, device_ids=[0])
    assert FakeQEFFModel.calls == []
    load_qaic_session(str(fake_qeff), "draft", full_batch_size=2, ctx_len=64, prefill_seq_len=8,
                      num_speculative_tokens=3, device_ids=[0])  # as a draft QEfficient takes it


def test_multi_layer_heads_are_refused_unless_their_layers_are_one(fake_qeff, tmp_path):
    from spd_cluster.sessions.qaic import load_qaic_session

    kw = dict(full_batch_size=2, ctx_len=64, prefill_seq_len=8, num_speculative_tokens=3, device_ids=[0])
    with pytest.raises(ValueError, match="ResBlock repeated turbo_num_layers times"):
        load_qaic_session(str(fake_qeff), "target", speculator_path=save_heads(tmp_path / "h2", num_layers=2), **kw)
    assert FakeQEFFModel.calls == []
    s = load_qaic_session(str(fake_qeff), "target", **kw,
                          speculator_path=save_heads(tmp_path / "same", num_layers=2, same_layers=True))
    assert s.num_heads == 2  # layers that are one module: what the card computes


def test_bad_role_rejected():
    from spd_cluster.sessions.qaic import load_qaic_session

    with pytest.raises(ValueError, match="role"):
        load_qaic_session("x/y", "verifier", full_batch_size=1, ctx_len=8, prefill_seq_len=4,
                          num_speculative_tokens=1, device_ids=[0])


def test_target_calls(fake_qeff):
    from spd_cluster.sessions.qaic import load_qaic_session

    s = load_qaic_session(str(fake_qeff), "target", full_batch_size=4, ctx_len=64, prefill_seq_len=8,
                          num_speculative_tokens=3, device_ids=[2, 3], aic_num_cores=14, mxfp6_matmul=True)
    fp, ex, cp = (FakeQEFFModel.calls[0]["from_pretrained"], FakeQEFFModel.calls[1]["export"],
                  FakeQEFFModel.calls[2]["compile"])
    assert fp == (str(fake_qeff.resolve()), {"continuous_batching": True, "qaic_config": {"speculative_model_type": "target"}})
    cp = {k: v for k, v in cp.items() if k != "_qpc_dir"}
    root = compile_root(str(fake_qeff.resolve()), "target", None)
    assert str(root).startswith(str(Path(os.environ["SPD_CLUSTER_CACHE"]))) and ex == str(root / "onnx")
    assert cp == {"compile_dir": str(root), "onnx_path": str(root / "onnx" / "model-argmax.onnx"), "num_cores": 14,
                  "num_devices": 2, "prefill_seq_len": 8, "ctx_len": 64, "full_batch_size": 4,
                  "mxfp6_matmul": True, "mxint8_kv_cache": False, "num_speculative_tokens": [0, 1, 2, 3],
                  "aic_enable_depth_first": True}
    qpc = FakeQpcSession.instances[0]
    assert qpc.device_ids == [2, 3]
    assert qpc.skipped == {"past_key.0", "past_value.0", "past_key.0_RetainedState", "past_value.0_RetainedState"}
    assert (s.full_batch_size, s.ctx_len, s.vocab_size, s.num_heads, s.eos_token_ids) == (4, 64, V, 0, [7, 9])


def test_draft_calls(fake_qeff):
    from spd_cluster.sessions.qaic import load_qaic_session

    load_qaic_session(str(fake_qeff), "draft", full_batch_size=4, ctx_len=64, prefill_seq_len=8,
                      num_speculative_tokens=3, device_ids=[0])
    name, kw = FakeQEFFModel.calls[0]["from_pretrained"]
    assert kw == {"continuous_batching": True, "qaic_config": None}
    assert "num_speculative_tokens" not in FakeQEFFModel.calls[2]["compile"]


def test_turbo_joins_speculator_dir(fake_qeff, tmp_path):
    from spd_cluster.sessions.qaic import load_qaic_session

    heads = tmp_path / "heads"
    save_heads(heads)
    s = load_qaic_session(str(fake_qeff), "target", full_batch_size=2, ctx_len=64, prefill_seq_len=8,
                          num_speculative_tokens=5, device_ids=[0], speculator_path=str(heads))
    name, kw = FakeQEFFModel.calls[0]["from_pretrained"]
    assert kw["qaic_config"] == {"speculative_model_type": "turbo"}
    joined = Path(name)
    assert sorted(p.name for p in joined.iterdir()) == ["config.json", "speculator.safetensors", "speculator_config.json"]
    assert (joined / "speculator.safetensors").resolve() == (heads / "speculator.safetensors").resolve()
    assert "num_speculative_tokens" not in FakeQEFFModel.calls[2]["compile"]  # fixed by the heads
    assert s.num_heads == 2


def _expected(ids, pos, n, heads=0):
    want = keep_index(pos, n)
    return np.array([[[token_of(ids[r, c], pos[r, c], h) for h in range(heads + 1)] for c in want[r]]
                     for r in range(ids.shape[0])])


def _check(s, ids, pos, slots, n, heads=0):
    out = s.run({"input_ids": ids, "position_ids": pos, "batch_index": np.array(slots).reshape(-1, 1),
                 "num_logits_to_keep": np.zeros((n, 1), np.int64)})["logits"]
    assert out.shape == (ids.shape[0], min(n, ids.shape[1])) + ((heads + 1,) if heads else ()) + (V,)
    got = out.argmax(-1)
    exp = _expected(ids, pos, min(n, ids.shape[1]), heads)
    valid = (pos >= 0).any(1)
    np.testing.assert_array_equal(got[valid].reshape(exp[valid].shape), exp[valid])
    return out


def _positions(starts, valid, width):
    return np.array([[st + j if j < v else -1 for j in range(width)] for st, v in zip(starts, valid)], np.int64)


@pytest.mark.parametrize("role", ["target", "draft"])
def test_run_maps_calls_onto_specialisations(fake_qeff, role):
    from spd_cluster.sessions.qaic import load_qaic_session

    rng = np.random.default_rng(0)
    s = load_qaic_session(str(fake_qeff), role, full_batch_size=4, ctx_len=64, prefill_seq_len=8,
                          num_speculative_tokens=3, device_ids=[0])
    qpc = FakeQpcSession.instances[0]
    expected_writes = {}

    def call(slots, starts, valid, width, n):
        ids = rng.integers(0, 1000, (len(slots), width))
        pos = _positions(starts, valid, width)
        _check(s, ids, pos, slots, n)
        for r, sl in enumerate(slots):
            for j in range(width):
                if pos[r, j] >= 0:
                    expected_writes[(sl, int(pos[r, j]))] = int(ids[r, j])

    call([2], [0], [13], 20, 1)  # long prompt: chunked prefill, right padding
    call([0, 3], [0, 0], [5, 17], 17, 1)  # two prompts of different lengths: one prefill each
    call([0, 1, 2, 3], [5, 17, 13, 0], [1, 1, 1, 0], 1, 1)  # plain decode, one row all padding
    call([1, 3, 2], [5, 9, 20], [2, 1, 2], 2, 1)  # bonus-token step, row padding to full batch
    if role == "target":
        call([0, 1, 2, 3], [6, 18, 14, 30], [4, 4, 2, 3], 4, 4)  # verify k+1 tokens
        call([2, 0], [40, 50], [3, 4], 4, 3)  # fewer rows than compiled, narrower window
    else:
        with pytest.raises(SessionInputError, match="num_logits_to_keep"):
            s.run({"input_ids": np.zeros((1, 2), np.int64), "position_ids": np.array([[0, 1]]),
                   "batch_index": np.array([[0]]), "num_logits_to_keep": np.zeros((2, 1), np.int64)})
    assert qpc.writes == expected_writes  # padding rows and columns never wrote the KV
    assert s.widths == ((1, 2, 3, 4) if role == "target" else (1,))
    assert set(qpc.runs) <= {(1, 8)} | {(4, w) for w in s.widths}


def test_turbo_run_returns_head_logits(fake_qeff, tmp_path):
    from spd_cluster.sessions.qaic import load_qaic_session

    save_heads(fake_qeff)
    s = load_qaic_session(str(fake_qeff), "target", full_batch_size=2, ctx_len=64, prefill_seq_len=4,
                          num_speculative_tokens=2, device_ids=[0], speculator_path=str(fake_qeff))
    assert FakeQEFFModel.calls[0]["from_pretrained"][0] == str(fake_qeff.resolve())  # used in place
    ids = np.arange(6).reshape(1, 6)
    _check(s, ids, _positions([0], [6], 6), [1], 1, heads=2)
    ids = np.array([[5, 6, 7], [8, 9, 10]])
    _check(s, ids, _positions([6, 3], [3, 2], 3), [1, 0], 3, heads=2)


def test_turbo_heads_propose_only_from_their_head_vocab(fake_qeff, tmp_path):
    """The card's turbo graph applies the whole lm_head to the heads; the session keeps the
    heads' logits to ``head_vocab``, as our PyTorch session computes them."""
    from spd_cluster.sessions.qaic import load_qaic_session

    vocab = list(range(0, V, 3))
    s = load_qaic_session(str(fake_qeff), "target", full_batch_size=2, ctx_len=64, prefill_seq_len=4,
                          num_speculative_tokens=2, device_ids=[0], speculator_path=save_heads(tmp_path / "hv", vocab=vocab))
    ids = np.array([[5, 6, 7, 8]])
    out = s.run({"input_ids": ids, "position_ids": np.arange(4)[None], "batch_index": np.array([[0]]),
                 "num_logits_to_keep": np.zeros((1, 1), np.int64)})["logits"][0, 0]
    off = np.setdiff1d(np.arange(V), vocab)
    assert np.isneginf(out[1:, off]).all() and np.isfinite(out[1:, vocab]).all()
    assert np.isfinite(out[0]).all()  # the base logits keep every token
    assert out[0].argmax() == token_of(8, 3, 0)


def _call(ids, pos, slots, n, **flags):
    return {"input_ids": ids, "position_ids": pos, "batch_index": np.array(slots).reshape(-1, 1),
            "num_logits_to_keep": np.zeros((n, 1), np.int64), **{k: np.array(v) for k, v in flags.items()}}


def _following(starts, valid, width, accept):
    """Verify inputs whose first ``accept[r]`` proposals are what the fake device chooses."""
    pos = _positions(starts, valid, width)
    ids = np.array([[(3 + 5 * r) % V] * width for r in range(len(starts))])
    for r, a in enumerate(accept):
        for j in range(1, width):
            ids[r, j] = token_of(ids[r, j - 1], pos[r, j - 1]) if j <= a else (token_of(ids[r, j - 1], pos[r, j - 1]) + 1) % V
    return ids, pos


@pytest.mark.parametrize("role", ["target", "draft"])
def test_greedy_calls_bring_only_ids_off_the_device(fake_qeff, role):
    """The graph takes the argmax: a greedy call brings back int32 ids (bytes_off_device counts
    them), a call that asks for logits brings back the logits, and each gets what it asked."""
    from spd_cluster.sessions.qaic import load_qaic_session

    s = load_qaic_session(str(fake_qeff), role, full_batch_size=4, ctx_len=64, prefill_seq_len=8,
                          num_speculative_tokens=3, device_ids=[0])
    qpc = FakeQpcSession.instances[0]
    assert s.device_argmax
    rng = np.random.default_rng(1)
    calls = [([2], [0], [13], 20, 1), ([0, 1, 2, 3], [5, 17, 13, 0], [1, 1, 1, 0], 1, 1)]
    if role == "target":
        calls += [([0, 1, 2, 3], [6, 18, 14, 30], [4, 4, 2, 3], 4, 4), ([2, 0], [40, 50], [3, 2], 3, 3)]
    for slots, starts, valid, width, n in calls:
        ids, pos = rng.integers(0, 1000, (len(slots), width)), _positions(starts, valid, width)
        out = s.run(_call(ids, pos, slots, n, argmax=True))
        assert set(out) == {"tokens"} and out["tokens"].dtype == np.int64
        ok = (pos >= 0).any(1)
        np.testing.assert_array_equal(out["tokens"][ok], _expected(ids, pos, n)[ok][..., 0])
        assert all(r == {"tokens"} for r in qpc.returned)  # no logits came back
        runs = qpc.runs[-len(qpc.returned):]  # this call's device runs: [rows, kept columns] int32 each
        assert s.last_call_bytes == sum(b * (w if role == "target" and b == 4 else 1) * 4 for b, w in runs)
        qpc.returned.clear()
    # a verify of fbs x (k + 1): the ids' bytes, against the logits' bytes of the same call with logits
    ids, pos = rng.integers(0, 1000, (4, 4)), _positions([6, 18, 14, 30], [4, 4, 4, 4], 4)
    n = 4 if role == "target" else 1
    s.run(_call(ids, pos, [0, 1, 2, 3], n, argmax=True))
    before = s.bytes_off_device
    runs = 1 if role == "target" else 4  # a draft decodes one column a run
    assert s.last_call_bytes == runs * 4 * (n if role == "target" else 1) * 4  # int32 ids
    out = s.run(_call(ids, pos, [0, 1, 2, 3], n))
    assert set(out) == {"logits"} and qpc.returned[-1] == {"logits"}
    assert s.last_call_bytes == runs * 4 * (n if role == "target" else 1) * V * 4 == s.bytes_off_device - before


def test_turbo_guesses_come_from_the_graph_unless_its_window_differs(fake_qeff):
    """Heads' ids and probabilities at the verified column come off the device as [B, heads]; a
    call whose window the graph cannot see as the contract does (num_logits_to_keep narrower than
    the compiled keep, valid columns before it) takes the logits instead: the same answer."""
    from spd_cluster.sessions.base import argmax_outputs, check_inputs, keep_index
    from spd_cluster.sessions.qaic import load_qaic_session

    save_heads(fake_qeff)
    s = load_qaic_session(str(fake_qeff), "target", full_batch_size=3, ctx_len=64, prefill_seq_len=4,
                          num_speculative_tokens=2, device_ids=[0], speculator_path=str(fake_qeff))
    qpc = FakeQpcSession.instances[0]
    assert s.widths == (3,) and s.device_argmax  # the heads fix k: one decode width

    def both(call):
        logits = s.run({k: v for k, v in call.items() if k != "argmax"})["logits"]
        c = check_inputs(call, 3, 64)
        want = argmax_outputs(c, keep_index(c.position_ids, c.num_logits), logits, 2)
        qpc.returned.clear()
        got = s.run(call)
        return want, got

    ids, pos = _following([10, 20, 30], [3, 3, 2], 3, accept=[2, 1, 1])
    want, got = both(_call(ids, pos, [0, 1, 2], 3, argmax=True))
    assert qpc.returned == [{"tokens", "head_tokens", "head_probs"}]
    assert s.last_call_bytes == 3 * 3 * 4 + 3 * 2 * (4 + 4)  # ids, heads' ids and probabilities
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6)
    assert got["head_tokens"][0].tolist() == [token_of(ids[0, 2], pos[0, 2], h) for h in (1, 2)]  # column 2
    assert got["head_tokens"][1].tolist() == [token_of(ids[1, 1], pos[1, 1], h) for h in (1, 2)]  # column 1
    out = s.run(_call(ids, pos, [0, 1, 2], 3, argmax=True, head_guesses=False))
    assert set(out) == {"tokens"} and qpc.returned[-1] == {"tokens"}  # heads left on the card
    ids, pos = _following([40, 50, 60], [3, 3, 1], 3, accept=[2, 2, 0])
    want, got = both(_call(ids, pos, [0, 1, 2], 2, argmax=True))  # windows: columns 1..2, the graph's 0..2
    assert qpc.returned == [{"logits"}]
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_widths_are_the_decode_specialisations_compiled(fake_qeff):
    """QEfficient compiles one decode specialisation per k' of a num_speculative_tokens list; the
    session runs a call on the narrowest compiled width that holds it and says which it has."""
    from spd_cluster.sessions.qaic import load_qaic_session

    kw = dict(full_batch_size=2, ctx_len=64, prefill_seq_len=8, num_speculative_tokens=4, device_ids=[0])
    s = load_qaic_session(str(fake_qeff), "target", widths=[3, 2], **kw)
    assert FakeQEFFModel.calls[2]["compile"]["num_speculative_tokens"] == [1, 2, 4]  # k + 1 always there
    assert s.widths == (2, 3, 5)
    qpc = FakeQpcSession.instances[0]
    for width, spec in ((1, (2, 2)), (2, (2, 2)), (3, (2, 3)), (4, (2, 5)), (5, (2, 5))):
        ids, pos = _following([10, 20], [width, width], width, accept=[width - 1, 0])
        _check(s, ids, pos, [0, 1], width)
        assert qpc.runs[-1] == spec
    with pytest.raises(ValueError, match="widths must lie in 1..num_speculative_tokens"):
        load_qaic_session(str(fake_qeff), "target", widths=[6], **kw)


def test_the_sdk_notice_is_dropped_only_where_no_card_was_asked_for(tmp_path):
    """QEfficient's import logs "QAIC SDK is not installed" through its own logger and handler
    wherever qaicrt is missing; import_qefficient drops that record for runtime onnxruntime (the
    stand-in needs no SDK) and keeps it, and every other record, for runtime qaic."""
    pkg = tmp_path / "QEfficient"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "import logging, sys\n"
        "logger = logging.getLogger('QEfficient')\n"
        "logger.addHandler(logging.StreamHandler(sys.stderr))\n"
        "logger.warning(\"QAIC SDK is not installed, eager mode features won't be available!\")\n"
        "logger.warning('something else')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for runtime, shown in (("onnxruntime", False), ("qaic", True)):
        code = (f"from spd_cluster.sessions.qaic import import_qefficient; q = import_qefficient({runtime!r}); "
                "import logging; logging.getLogger('QEfficient').warning('later: QAIC SDK is not installed'); "
                "print(q.__file__)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        assert out.stdout.strip() == str(pkg / "__init__.py")
        lines = out.stderr.splitlines()
        assert ("QAIC SDK is not installed, eager mode features won't be available!" in lines) == shown
        assert "something else" in lines and "later: QAIC SDK is not installed" in lines  # only that record, only then
