"""The QEfficient lane (``make test-qaic``, in .venv-qaic): real QEfficient ``from_pretrained`` /
``export`` / ``compile`` with the compiler call recorded, the exported graph run by the
onnxruntime stand-in (sessions/qaic_standin.py). Every mode is token-identical to HF
``generate`` on the same weights and to the stand-in's own baseline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cluster import build_tokenizer
from tiny import tiny_model

from spd_cluster.engine import SpDEngine, SpDSettings
from spd_cluster.sessions.heads import TurboHeads
from spd_cluster.sessions.qaic import (SPD_MODEL_TYPES, QaicUnavailableError, check_qaic_model, compile_root,
                                       load_qaic_session)

CTX, PREFILL, NEW = 64, 8, 14
PROMPTS = [
    [5, 9, 11, 3, 7, 20, 33, 4, 8, 12, 40, 5, 9, 11],  # longer than one prefill chunk, repeats (pld matches)
    [17, 3, 9],
    [60, 61, 62, 60, 61, 62, 60, 61],
    [44, 12, 44, 12, 44],
]


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        d = tmp_path_factory.mktemp("cache")
        mp.setenv("SPD_CLUSTER_CACHE", str(d))
        yield d


def save(model, d: Path, tokenizer=None) -> str:
    model.save_pretrained(d)
    if tokenizer is not None:
        tokenizer.save_pretrained(d)
    return str(d)


def random_heads(d: Path, num_heads: int, num_layers: int = 1, seed: int = 0, vocab=None, hidden: int = 64) -> str:
    torch.manual_seed(seed)
    heads = TurboHeads(hidden, num_heads, num_layers, extra_config=None if vocab is None else {"head_vocab": vocab})
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0.0, 0.3)
    heads.save(d)
    return str(d)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """arch -> (target dir, target model, draft dir)."""
    out = {}
    for arch in ("llama", "qwen2"):
        t = tiny_model(arch, seed=0)
        tdir = save(t, tmp_path_factory.mktemp(f"{arch}-target"))
        ddir = save(tiny_model(arch, seed=1, layers=1), tmp_path_factory.mktemp(f"{arch}-draft"))
        out[arch] = (tdir, t, ddir)
    return out


_sessions: dict = {}


def session(path: str, role: str, fbs: int, k: int, heads: str | None = None):
    key = (path, role, fbs, k, heads)
    if key not in _sessions:
        _sessions[key] = load_qaic_session(path, role, full_batch_size=fbs, ctx_len=CTX, prefill_seq_len=PREFILL,
                                           num_speculative_tokens=k, device_ids=[0], speculator_path=heads,
                                           runtime="onnxruntime")
    return _sessions[key]


def hf_greedy(model, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("fbs", [1, 3])
@pytest.mark.parametrize("k", [1, 4])
def test_every_mode_on_the_standin_is_hf_greedy(models, tmp_path, arch, fbs, k):
    tdir, model, ddir = models[arch]
    s = SpDSettings(num_speculative_tokens=k, prefill_seq_len=PREFILL, ctx_len=CTX, max_new_tokens=NEW,
                    full_batch_size=fbs)
    target = session(tdir, "target", fbs, k)
    want = [hf_greedy(model, p) for p in PROMPTS]

    def run(mode, tgt, **kw):
        e = SpDEngine(mode, tgt, None, s, eos_token_ids=tgt.eos_token_ids, **kw)
        info = e.generate(PROMPTS)
        assert [r.error for r in info.results] == [None] * len(PROMPTS)
        return [list(ids) for ids in info.generated_ids], info

    base, _ = run("baseline", target)
    assert base == want
    pld, info = run("pld", target)
    assert pld == want
    assert info.perf_metrics.decode_iterations < sum(len(w) for w in want)  # pld verified something
    draft, info = run("draft", target, draft=session(ddir, "draft", fbs, k))
    assert draft == want
    heads = random_heads(tmp_path / "heads", k, seed=k)
    turbo = session(tdir, "target", fbs, k, heads)
    assert turbo.num_heads == k
    multi, _ = run("multiproj", turbo)
    assert multi == want


def test_a_shape_outside_the_specialisations_fails(models):
    tdir, _, _ = models["llama"]
    s = session(tdir, "target", 3, 4)
    qpc = s.session
    ok = {"input_ids": np.zeros((1, PREFILL), np.int64), "position_ids": np.arange(PREFILL)[None],
          "batch_index": np.array([[0]]), "num_logits_to_keep": np.zeros((1, 1), np.int64)}
    vocab = tiny_model("llama").config.vocab_size
    qpc.set_buffers({"logits": np.zeros((1, 1, vocab), np.float32)})  # as QaicSession does per specialisation
    assert qpc.run(ok)["logits"].shape == (1, 1, vocab)
    qpc.set_buffers({"logits": np.zeros((3, 5, vocab), np.float32)})
    with pytest.raises(ValueError, match="output buffer logits was set to shape"):
        qpc.run(ok)  # a prefill into the decode specialisation's buffer
    qpc.set_buffers({"logits": np.zeros((1, 1, vocab), np.float32)})
    for bad in ({"input_ids": np.zeros((1, 3), np.int64), "position_ids": np.arange(3)[None]},  # width 3
                {"input_ids": np.zeros((2, PREFILL), np.int64), "position_ids": np.tile(np.arange(PREFILL), (2, 1)),
                 "batch_index": np.array([[0], [1]])},  # prefill of two rows
                {"num_logits_to_keep": np.zeros((5, 1), np.int64)}):  # decode logits at prefill width
        with pytest.raises(ValueError, match="no compiled specialisation"):
            qpc.run({**ok, **bad})
    rec = json.loads((Path(s.qpc_path) / "compile_command.json").read_text())
    assert rec["command"][0].endswith("qaic-compile") and rec["executed"] is False
    specs = json.loads(Path(next(a.split("=", 1)[1] for a in rec["command"]
                                 if a.startswith("-network-specialization-config="))).read_text())
    assert [sp["symbols"]["seq_len"] for sp in specs["specializations"]] == [str(PREFILL), "5"]


def test_the_standin_drops_writes_at_minus_one(models):
    """A row of padding (position -1) in slot 2 leaves slot 2's cache as it was."""
    tdir, _, _ = models["qwen2"]
    s = session(tdir, "target", 3, 4)
    qpc = s.session
    # the session is shared with earlier tests, whose last call set the decode buffer: set this call's
    # specialisation's, as QaicSession does before each call
    qpc.set_buffers({"logits": np.zeros((3, 5, tiny_model("qwen2").config.vocab_size), np.float32)})
    before = {n: v.copy() for n, v in qpc.state.items()}
    qpc.run({"input_ids": np.full((3, 5), 7, np.int64), "position_ids": np.array([[10, 11, 12, 13, 14], [-1] * 5, [3, 4, -1, -1, -1]]),
             "batch_index": np.array([[0], [2], [1]]), "num_logits_to_keep": np.zeros((5, 1), np.int64)})
    for n, v in qpc.state.items():
        np.testing.assert_array_equal(v[2, :, :CTX], before[n][2, :, :CTX])  # slot 2: untouched
        assert not np.array_equal(v[0, :, 10:15], before[n][0, :, 10:15])  # slot 0 got its five
        np.testing.assert_array_equal(v[1, :, 5:CTX], before[n][1, :, 5:CTX])  # slot 1 only at 3, 4
        assert v.dtype == np.float16  # the custom-IO dtype of a float32 model's KV


def test_spd_model_types_are_qefficients():
    from QEfficient.transformers.models.pytorch_transforms import KVCacheTransform, SpDTransform

    supported = {hf.config_class.model_type for hf, qeff in KVCacheTransform._module_mapping.items()
                 if qeff in SpDTransform._module_mapping}
    assert supported == set(SPD_MODEL_TYPES)


def test_a_missing_sdk_is_reported_before_any_export(tmp_path):
    tdir = save(tiny_model("llama"), tmp_path / "fresh")
    with pytest.raises(QaicUnavailableError, match="qaic-compile") as e:
        load_qaic_session(tdir, "target", full_batch_size=1, ctx_len=CTX, prefill_seq_len=PREFILL,
                          num_speculative_tokens=2, device_ids=[0], runtime="qaic")
    assert "runtime: onnxruntime" in str(e.value)
    assert not compile_root(tdir, "target", None).exists()  # nothing was exported


def test_an_unsupported_target_is_refused_before_compiling(tmp_path):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    d = save(Gemma3ForCausalLM(cfg), tmp_path / "gemma")
    with pytest.raises(ValueError, match="llama, qwen2, qwen3 only") as e:
        load_qaic_session(d, "target", full_batch_size=1, ctx_len=CTX, prefill_seq_len=PREFILL,
                          num_speculative_tokens=2, device_ids=[0], runtime="onnxruntime")
    assert "gemma3_text" in str(e.value)
    assert not compile_root(d, "target", None).exists()


def test_multi_layer_heads_are_refused_before_compiling(models, tmp_path):
    tdir, _, _ = models["llama"]
    heads = random_heads(tmp_path / "two", 2, num_layers=2)
    with pytest.raises(ValueError, match="ResBlock repeated"):
        load_qaic_session(tdir, "target", full_batch_size=1, ctx_len=CTX, prefill_seq_len=PREFILL,
                          num_speculative_tokens=2, device_ids=[0], speculator_path=heads, runtime="onnxruntime")
    assert not compile_root(tdir, "target", heads).exists()
    check_qaic_model(tdir, "target", random_heads(tmp_path / "one", 2, num_layers=1))  # one layer: fine


def test_heads_with_a_head_vocab_propose_what_our_session_proposes(models, tmp_path):
    """Same files on the stand-in and on the PyTorch session: the same guesses, although
    QEfficient's graph applies the whole lm_head to the heads."""
    from spd_cluster.sessions.torch_session import TorchSession

    tdir, model, _ = models["llama"]
    full = random_heads(tmp_path / "full", 3, seed=5)
    prompt = np.array(PROMPTS[0][:PREFILL])
    feed = {"input_ids": prompt[None], "position_ids": np.arange(PREFILL)[None], "batch_index": np.array([[0]]),
            "num_logits_to_keep": np.zeros((1, 1), np.int64)}
    card_full = session(tdir, "target", 1, 3, full).run(feed)["logits"][0, 0, 1:].argmax(-1)
    vocab = [t for t in range(model.config.vocab_size) if t not in set(card_full.tolist())][:40]  # excludes them
    sub = random_heads(tmp_path / "sub", 3, seed=5, vocab=vocab)
    card = session(tdir, "target", 1, 3, sub).run(feed)["logits"][0, 0, 1:]
    torch_s = TorchSession(model, 1, CTX, heads=TurboHeads.load(sub))
    out = torch_s.run({**feed, "argmax": np.array(True)})
    tokens, probs = out["head_tokens"], out["head_probs"]
    np.testing.assert_array_equal(card.argmax(-1), tokens[0])
    e = np.exp(card - card.max(-1, keepdims=True))
    np.testing.assert_allclose((e / e.sum(-1, keepdims=True)).max(-1), probs[0], atol=2e-3)


def test_a_ray_job_on_the_standin_in_every_mode(tmp_path):
    """device qaic, runtime onnxruntime, on a local Ray with a qaic resource: actors take
    {"qaic": 1} and lock distinct device ids; outputs in Parquet equal the baseline's."""
    import pandas as pd
    import ray
    from transformers import LlamaConfig, LlamaForCausalLM

    from spd_cluster.cluster.coordinator import local_qaic_resources, run_job
    from spd_cluster.config import config_from_dict

    tok = build_tokenizer()
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                                     pad_token_id=0))
    with torch.no_grad():
        m.lm_head.weight.mul_(8.0)
    tdir = save(m, tmp_path / "tiny", tok)
    random_heads(Path(tdir), 2)  # heads in the model directory
    ds = tmp_path / "p.jsonl"
    ds.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(
        ["the quick brown fox", "def add(a, b):\n    return a + b\n\ndef add(a, b):", "on ray, on ray, on ray",
         "the lazy dog", "fox fox fox"])))
    qaic = {"runtime": "onnxruntime"}

    def cfg(mode, out, **extra):
        return config_from_dict({
            "mode": mode, "target": {"model": tdir, "device": "qaic", "device_ids": [0, 1], "qaic": qaic},
            "dataset": {"path": str(ds), "id_column": "id"}, "output": {"path": str(tmp_path / out)},
            "spd": {"num_speculative_tokens": 2, "max_new_tokens": 12, "ctx_len": 96, "prefill_seq_len": 16,
                    "full_batch_size": 2},
            "cluster": {"num_pairs": 1, "shard_size": 3, "max_retries": 0}, "audit": {"fraction": 0}, **extra})

    draft_cfg = cfg("draft", "draft", draft={"model": tdir, "device": "qaic", "device_ids": [2], "qaic": qaic})
    assert local_qaic_resources(draft_cfg) == {"qaic": 3.0}
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2, resources={"qaic": 3},
             logging_level="WARNING")
    try:
        outs = {}
        for mode, c in [("baseline", cfg("baseline", "baseline")), ("pld", cfg("pld", "pld")),
                        ("multiproj", cfg("multiproj", "multiproj")), ("draft", draft_cfg)]:
            res = run_job(c, progress=False)
            df = pd.read_parquet(Path(c.output.path) / "results").sort_values("prompt_id")
            assert (df.error.isna()).all() and len(df) == 5
            outs[mode] = [list(x) for x in df.generated_ids]
            assert res.exec_info.mode == mode
    finally:
        ray.shutdown()
    assert outs["pld"] == outs["baseline"] and outs["multiproj"] == outs["baseline"] and outs["draft"] == outs["baseline"]
    with torch.no_grad():
        first = tok("the quick brown fox")["input_ids"]
        ref = m.generate(torch.tensor([first]), max_new_tokens=12, do_sample=False)[0, len(first):].tolist()
    assert outs["baseline"][0] == ref
