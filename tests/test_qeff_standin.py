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
from helpers import build_tokenizer
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


def session(path: str, role: str, fbs: int, k: int, heads: str | None = None, device_argmax: bool = True):
    key = (path, role, fbs, k, heads, device_argmax)
    if key not in _sessions:
        _sessions[key] = load_qaic_session(path, role, full_batch_size=fbs, ctx_len=CTX, prefill_seq_len=PREFILL,
                                           num_speculative_tokens=k, device_ids=[0], speculator_path=heads,
                                           runtime="onnxruntime", device_argmax=device_argmax)
    return _sessions[key]


def hf_greedy(model, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.slow
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
    assert target.device_argmax and target.widths == tuple(range(1, k + 2))
    assert target.session.spec_runs[1] > 0 and sum(n > 0 for n in target.session.spec_runs[1:]) >= 2  # several widths
    if (arch, fbs, k) == ("llama", 3, 4):  # the graph without the argmax (the host takes it): the same
        assert run("pld", session(tdir, "target", fbs, k, device_argmax=False))[0] == want
    draft, info = run("draft", target, draft=session(ddir, "draft", fbs, k))
    assert draft == want
    heads = random_heads(tmp_path / "heads", k, seed=k)
    turbo = session(tdir, "target", fbs, k, heads)
    assert turbo.num_heads == k
    multi, _ = run("multiproj", turbo)
    assert multi == want


def _verify_call(s, ids, pos, fbs, **flags):
    return {"input_ids": ids, "position_ids": pos, "batch_index": np.arange(fbs)[:, None],
            "num_logits_to_keep": np.zeros((ids.shape[1], 1), np.int64), **{k: np.array(v) for k, v in flags.items()}}


@pytest.mark.slow
@pytest.mark.parametrize("heads", [0, 3])
def test_greedy_steps_bring_only_ids_off_the_standin(models, tmp_path, heads):
    """Bytes off the device per verify step of fbs x (k + 1) tokens: int32 ids (and the heads'
    int32 ids and float32 probabilities, fbs x heads) where the graph takes the argmax, the
    float32 logits without it or where the call asks for logits; the ids are the host's argmax
    of those logits, the heads' guesses the host's at each row's verified column."""
    from spd_cluster.sessions.base import check_inputs, keep_index, verified_column

    tdir, model, _ = models["llama"]
    fbs, k, vocab = 3, heads or 4, model.config.vocab_size
    hd = random_heads(tmp_path / "h", heads, seed=2) if heads else None
    on_card, on_host = session(tdir, "target", fbs, k, hd), session(tdir, "target", fbs, k, hd, device_argmax=False)
    assert on_card.device_argmax and not on_host.device_argmax
    for s in (on_card, on_host):
        for slot in range(fbs):
            s.run({"input_ids": np.array([PROMPTS[0][:PREFILL]]), "position_ids": np.arange(PREFILL)[None],
                   "batch_index": np.array([[slot]]), "num_logits_to_keep": np.ones((1, 1), np.int64)})
    # proposals the target accepts for k, 1 and 0 columns: built column by column from its own choices
    accept = [k, 1, 0]
    ids = np.array([[7 + r] * (k + 1) for r in range(fbs)])
    pos = np.tile(np.arange(PREFILL, PREFILL + k + 1), (fbs, 1))
    for j in range(1, k + 1):
        t = on_host.run(_verify_call(on_host, ids, pos, fbs, argmax=True, head_guesses=False))["tokens"]
        for r in range(fbs):
            ids[r, j] = t[r, j - 1] if j <= accept[r] else (t[r, j - 1] + 1) % vocab
    call = _verify_call(on_card, ids, pos, fbs, argmax=True)
    want, got = on_host.run(call), on_card.run(call)
    c = check_inputs(call, fbs, CTX)
    np.testing.assert_array_equal(verified_column(c, keep_index(pos, k + 1), want["tokens"]), accept)
    assert set(got) == set(want) == ({"tokens", "head_tokens", "head_probs"} if heads else {"tokens"})
    np.testing.assert_array_equal(got["tokens"], want["tokens"])
    if heads:
        np.testing.assert_array_equal(got["head_tokens"], want["head_tokens"])
        np.testing.assert_allclose(got["head_probs"], want["head_probs"], rtol=1e-5)
    ids_bytes = fbs * (k + 1) * 4 + fbs * heads * (4 + 4)
    logits_bytes = fbs * (k + 1) * (heads + 1 if heads else 1) * vocab * 4
    assert on_card.last_call_bytes == on_card.session.last_bytes_out == ids_bytes
    assert on_host.last_call_bytes == on_host.session.last_bytes_out == logits_bytes
    sampled = on_card.run(_verify_call(on_card, ids, pos, fbs))  # sampling needs the logits: the same QPC
    assert on_card.last_call_bytes == logits_bytes
    np.testing.assert_array_equal(sampled["logits"][..., 0, :].argmax(-1) if heads else sampled["logits"].argmax(-1),
                                  want["tokens"])


def test_a_shape_outside_the_specialisations_fails(models):
    tdir, _, _ = models["llama"]
    s = session(tdir, "target", 3, 4)
    qpc = s.session
    ok = {"input_ids": np.zeros((1, PREFILL), np.int64), "position_ids": np.arange(PREFILL)[None],
          "batch_index": np.array([[0]]), "num_logits_to_keep": np.zeros((1, 1), np.int64)}
    vocab = tiny_model("llama").config.vocab_size
    qpc.skip_buffers(["tokens"])  # logits only, here (the session sets both per call)
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
    # the prefill, then one decode specialisation per verify width 1..k+1 (QEfficient's k list)
    assert [sp["symbols"]["seq_len"] for sp in specs["specializations"]] == [str(PREFILL), "1", "2", "3", "4", "5"]
    assert s.widths == (1, 2, 3, 4, 5)


def test_the_standin_drops_writes_at_minus_one(models):
    """A row of padding (position -1) in slot 2 leaves slot 2's cache as it was."""
    tdir, _, _ = models["qwen2"]
    s = session(tdir, "target", 3, 4)
    qpc = s.session
    # the session is shared with earlier tests, whose last call set the decode buffer: set this call's
    # specialisation's, as QaicSession does before each call
    qpc.set_buffers({"logits": np.zeros((3, 5, tiny_model("qwen2").config.vocab_size), np.float32),
                     "tokens": np.zeros((3, 5), np.int32)})
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


@pytest.mark.slow
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
    # the graph's own argmax keeps to head_vocab too (its -inf mask): the same guesses come off the card
    on_card = session(tdir, "target", 1, 3, sub).run({**feed, "argmax": np.array(True)})
    np.testing.assert_array_equal(on_card["head_tokens"], tokens)
    np.testing.assert_allclose(on_card["head_probs"], probs, atol=2e-3)


@pytest.mark.slow
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


@pytest.mark.slow
def test_no_sdk_notice_where_no_card_was_asked_for(tmp_path):
    """QEfficient logs "QAIC SDK is not installed" on import wherever qaicrt is missing; a stand-in
    run (runtime onnxruntime: no card asked for) does not show it, a card run (runtime qaic) does."""
    import subprocess
    import sys

    tdir = save(tiny_model("llama"), tmp_path / "m")
    env = {**__import__("os").environ, "SPD_CLUSTER_CACHE": str(tmp_path / "cache")}
    standin = (f"from spd_cluster.sessions.qaic import load_qaic_session as L; import numpy as np\n"
               f"s = L({tdir!r}, 'target', full_batch_size=1, ctx_len=64, prefill_seq_len=8, num_speculative_tokens=2,"
               f" device_ids=[0], runtime='onnxruntime')\n"
               f"print(s.run({{'input_ids': np.zeros((1, 8), np.int64), 'position_ids': np.arange(8)[None],"
               f" 'batch_index': np.zeros((1, 1), np.int64), 'argmax': np.array(True)}})['tokens'].shape)")
    out = subprocess.run([sys.executable, "-c", standin], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(1, 1)" in out.stdout and "QAIC SDK" not in out.stdout + out.stderr
    card = ("from spd_cluster.sessions.qaic import check_qaic_runtime\n"
            "try:\n    check_qaic_runtime('qaic')\nexcept Exception as e:\n    print(type(e).__name__)\n"
            "import QEfficient; print('sdk', QEfficient.check_qaic_sdk())")
    out = subprocess.run([sys.executable, "-c", card], capture_output=True, text=True, env=env)
    sdk = "sdk True" in out.stdout  # a card host: QEfficient has nothing to say
    assert ("QAIC SDK is not installed" in out.stdout + out.stderr) == (not sdk), out.stdout + out.stderr
