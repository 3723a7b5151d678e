"""Accept paths on the QEfficient card stand-in (the QEfficient lane, ``make test-qaic``): real
QEfficient export, the graph run by onnxruntime (sessions/qaic_standin.py), continuous batching
(six prompts, four slots), k fixed and adaptive. Proposals all accepted (the target as its own
draft; heads that copy the target's next-token prediction where its text repeats a token; heads
planted on the target's own continuation), partly accepted (a draft with perturbed weights; planted
heads wrong at every third position), and the output is the target's own, token for token."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_world import ModelledTime, PlantedHeads, perturbed, verifies, verify_cost
from tiny import tiny_model

from spd_cluster.engine import SpDEngine, SpDSettings
from spd_cluster.sessions.heads import TurboHeads
from spd_cluster.sessions.qaic import load_qaic_session

CTX, PREFILL, NEW, K, FBS = 64, 8, 20, 3, 4
TOKENS = np.random.default_rng(7).integers(3, 96, size=40).tolist()
PROMPTS = [TOKENS[:5], TOKENS[5:22], TOKENS[22:31], TOKENS[31:34], TOKENS[5:11] * 3, TOKENS[:12]]


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPD_CLUSTER_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def card(tmp_path_factory):
    """name -> a stand-in session (compiled once for the module), and the target's greedy answer."""
    target = tiny_model("llama", seed=0)
    dirs = {}
    for name, model in (("target", target), ("near", perturbed(target, 0.005))):
        dirs[name] = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(dirs[name])
    heads = tmp_path_factory.mktemp("copy-heads")
    TurboHeads(target.config.hidden_size, K).save(heads)  # zero blocks: each head is the base readout

    def load(path, role, speculator=None):
        return load_qaic_session(path, role, full_batch_size=FBS, ctx_len=CTX, prefill_seq_len=PREFILL,
                                 num_speculative_tokens=K, device_ids=[0], speculator_path=speculator,
                                 runtime="onnxruntime")

    sessions = {"target": load(dirs["target"], "target"), "same": load(dirs["target"], "draft"),
                "near": load(dirs["near"], "draft"), "copy-heads": load(dirs["target"], "target", str(heads))}
    with torch.no_grad():
        want = [target.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False, eos_token_id=2,
                                pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]
    return sessions, want


# case -> (mode, target, draft, planted heads' miss rule, what the accepts must show)
CASES = {
    "pld": ("pld", "target", None, None, "some"),
    "draft-same": ("draft", "target", "same", None, "all"),
    "draft-near": ("draft", "target", "near", None, "partial"),
    "multiproj-copy-heads": ("multiproj", "copy-heads", None, None, "some"),
    "multiproj-planted": ("multiproj", "target", None, lambda p: False, "all"),
    "multiproj-planted-partial": ("multiproj", "target", None, lambda p: p % 3 == 0, "partial"),
}


@pytest.mark.slow
@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed-k", "adaptive-k"])
@pytest.mark.parametrize("case", list(CASES))
def test_accept_paths_on_the_card_standin(card, case, adaptive, monkeypatch):
    sessions, want = card
    mode, target_name, draft_name, miss, expect = CASES[case]
    clock = ModelledTime(monkeypatch)
    target = sessions[target_name]
    if miss is not None:
        target = PlantedHeads(target, [p + w for p, w in zip(PROMPTS, want)], num_heads=K, miss=miss)
    target = clock.priced(target, verify_cost())
    draft = clock.priced(sessions[draft_name], 0.1) if draft_name else None
    s = SpDSettings(num_speculative_tokens=K, prefill_seq_len=PREFILL, ctx_len=CTX, max_new_tokens=NEW,
                    full_batch_size=FBS, adaptive_k=adaptive)
    seen = verifies(monkeypatch)
    info = SpDEngine(mode, target, None, s, draft=draft, eos_token_ids=[2]).generate(PROMPTS)
    assert [r.error for r in info.results] == [None] * len(PROMPTS)
    assert [ids.tolist() for ids in info.generated_ids] == want
    m = info.perf_metrics
    accepted, proposed = sum(m.accepted_per_position), sum(m.proposed_per_position)
    assert m.accepted_per_position[1] > 0  # runs of two or more accepted
    if expect == "all":
        assert m.accepted_per_position == m.proposed_per_position and m.mean_num_accepted_tokens > 2.5
    if expect == "partial":
        assert accepted < proposed and sum(0 < a < n for n, a in seen) >= 2
