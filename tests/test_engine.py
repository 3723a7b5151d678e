"""Every mode is token-identical to the target's own greedy HF `generate` (float32), with
continuous batching over 1..4 slots and k in {1, 3, 5}; every accept path (all accepted, partial
accepts, none) with k fixed and adaptive; plus acceptance, finish reasons, errors."""

import numpy as np
import pytest
from engine_world import (ACCEPT_CASES, DEVICE_CURVE, DRAFT, EOS, MAX_NEW, PROMPTS, REFERENCE, TARGET,
                          ModelledTime, accept_run, engine, hf_greedy, random_heads, verifies)
from tiny import VOCAB, tiny_model

from spd_cluster.engine import SpDEngine, SpDSettings
from spd_cluster.sessions.torch_session import TorchSession


@pytest.mark.parametrize("mode", ["baseline", "draft", "pld", "multiproj"])
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("fbs", [1, 2, 3, 4])
def test_lossless_against_hf_generate(mode, k, fbs):
    info = engine(mode, k, fbs).generate(PROMPTS)
    assert [ids.tolist() for ids in info.generated_ids] == REFERENCE
    for r, ref in zip(info.results, REFERENCE):
        assert r.finish_reason == ("eos" if ref[-1] == EOS else "length")


def test_lossless_on_qwen2():
    target = tiny_model("qwen2", seed=4)
    draft = tiny_model("qwen2", seed=5, layers=1)
    ref = [hf_greedy(target, p) for p in PROMPTS]
    for mode in ("draft", "pld"):
        info = engine(mode, 3, 3, target=target, draft=draft).generate(PROMPTS)
        assert [ids.tolist() for ids in info.generated_ids] == ref


@pytest.mark.parametrize("k", [1, 3, 5])
def test_draft_equal_to_target_accepts_everything(k):
    steps = 4
    info = engine("draft", k, 2, draft=TARGET, ignore_eos=True, adaptive_k=False,
                  max_new_tokens=1 + steps * (k + 1)).generate(PROMPTS[:3])
    m = info.perf_metrics
    assert m.mean_num_accepted_tokens == k + 1
    assert m.acceptance_rate_per_position == [1.0] * k
    assert m.generated_tokens_per_prompt == [1 + steps * (k + 1)] * 3


def test_prompt_lookup_accepts_more_than_one_on_repetition():
    model = tiny_model("llama", seed=11)
    loop = [5, 9, 14, 33, 40, 41, 7]
    prompt = loop * 6
    ref = hf_greedy(model, prompt, max_new=30)
    info = engine("pld", 4, 1, target=model, max_new_tokens=30, step_cost=DEVICE_CURVE).generate([prompt])
    assert info.generated_ids[0].tolist() == ref
    # a random model continuing a loop it saw keeps copying it only if its own greedy output does;
    # what matters here: wherever the text repeats, lookup saves target steps
    r = info.results[0]
    assert r.mean_num_accepted_tokens > 1.0
    assert info.perf_metrics.decode_iterations < len(ref) - 1


def test_prompt_lookup_proposes_nothing_without_a_match():
    from spd_cluster.engine import PromptLookupProposer

    p = PromptLookupProposer(max_ngram_size=3)
    assert p.lookup(np.array([1, 2, 3, 4, 5]), 4).size == 0
    assert p.lookup(np.array([1, 2, 3, 9, 1, 2]), 4).tolist() == [3, 9, 1, 2]
    # the longest n-gram wins over a more recent shorter one
    assert p.lookup(np.array([7, 1, 2, 8, 2, 5, 1, 2]), 2).tolist() == [8, 2]


def test_multiproj_proposes_from_the_heads():
    info = engine("multiproj", 4, 2).generate(PROMPTS)
    assert info.perf_metrics.proposed_per_position[0] > 0
    assert info.num_speculative_tokens == 4


def heads_found(tokens, probs):
    """What a verify of one row found, as multiproj learns it: the heads' guesses only."""
    from spd_cluster.engine.verifier import Verified

    return Verified(np.zeros(1, np.int64), np.zeros((1, 1), np.int64), np.asarray(tokens)[None], np.asarray(probs)[None])


def test_confident_count_keeps_the_leading_proposals_whose_probabilities_multiply_above_the_threshold():
    from spd_cluster.engine.proposers import MultiProjProposer, confident_count
    from spd_cluster.engine.verifier import greedy_guesses, top_prob

    probs = np.array([0.9, 0.8, 0.5, 0.99])  # running products 0.9, 0.72, 0.36, 0.356
    assert [confident_count(probs, t) for t in (0.0, 0.3, 0.5, 0.72, 0.95)] == [4, 4, 2, 2, 0]
    logits = np.log(np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.5, 0.0, 0.5]]) + 1e-30)
    np.testing.assert_allclose(top_prob(logits), [0.9, 0.8, 0.5], rtol=1e-6)
    p = MultiProjProposer(3, confidence_threshold=0.7)
    p.learn([0], heads_found(*greedy_guesses(logits)))
    assert p.propose([0], [np.array([1])], [3]).tokens[0].tolist() == [0, 1]
    p.threshold = 0.0
    p.learn([0], heads_found(*greedy_guesses(logits)))
    assert p.propose([0], [np.array([1])], [2]).tokens[0].tolist() == [0, 1]


def test_multiproj_prompt_lookup_replaces_shorter_guesses_that_agree():
    from spd_cluster.engine.proposers import MultiProjProposer, PromptLookupProposer

    p = MultiProjProposer(4, confidence_threshold=0.5, lookup=PromptLookupProposer(3))
    seq = np.array([4, 5, 6, 7, 8, 9, 1, 4, 5])  # tail [4, 5] occurred before: lookup finds [6, 7, 8, 9]
    p.learn([0], heads_found(np.array([6, 3, 3, 3]), np.array([0.9, 0.2, 0.9, 0.9])))  # heads keep [6]
    assert p.propose([0], [seq], [4]).tokens[0].tolist() == [6, 7, 8, 9]
    assert p.propose([0], [seq], [2]).tokens[0].tolist() == [6, 7]  # limits still hold
    p.learn([0], heads_found(np.array([2, 3, 3, 3]), np.array([0.9, 0.2, 0.9, 0.9])))  # heads disagree: they win
    assert p.propose([0], [seq], [4]).tokens[0].tolist() == [2]
    p.learn([0], heads_found(np.array([6, 3, 3, 3]), np.array([0.1, 0.9, 0.9, 0.9])))  # heads guess nothing
    assert p.propose([0], [seq], [4]).tokens[0].tolist() == [6, 7, 8, 9]
    p.learn([0], heads_found(np.array([6, 7, 8, 3]), np.array([0.9, 0.9, 0.9, 0.9])))  # heads as long: heads
    assert p.propose([0], [seq], [3]).tokens[0].tolist() == [6, 7, 8]
    assert p.propose([0], [np.array([1, 2, 3])], [4]).tokens[0].tolist() == [6, 7, 8, 3]  # no match


@pytest.mark.parametrize("fbs", [1, 3])
def test_multiproj_prompt_lookup_stays_lossless_and_emits_more_per_step(fbs):
    model = tiny_model("llama", seed=11)
    loop = [5, 9, 14, 33, 40, 41, 7]
    prompts = PROMPTS[:4] + [loop * 6]
    ref = [hf_greedy(model, p, max_new=30) for p in prompts]
    info = {}
    for lookup in (False, True):
        info[lookup] = engine("multiproj", 4, fbs, target=model, max_new_tokens=30, confidence_threshold=0.3,
                              prompt_lookup=lookup, step_cost=DEVICE_CURVE).generate(prompts)
        assert [ids.tolist() for ids in info[lookup].generated_ids] == ref
    assert info[True].perf_metrics.decode_iterations < info[False].perf_metrics.decode_iterations
    assert info[True].perf_metrics.mean_num_accepted_tokens > info[False].perf_metrics.mean_num_accepted_tokens


@pytest.mark.parametrize("mode", ["draft", "multiproj"])
@pytest.mark.parametrize("fbs", [1, 3])
def test_confidence_threshold_proposes_less_and_stays_lossless(mode, fbs):
    """Stopping a row's proposals early changes how many tokens a step can emit, never which."""
    proposed = {}
    for t in (0.0, 0.1, 0.2):  # random tiny models: top probabilities ~0.07-0.25
        info = engine(mode, 4, fbs, confidence_threshold=t, adaptive_k=False).generate(PROMPTS)
        assert [ids.tolist() for ids in info.generated_ids] == REFERENCE
        proposed[t] = sum(info.perf_metrics.proposed_per_position)
    assert proposed[0.0] > proposed[0.1] > proposed[0.2]


def test_confident_draft_stops_running_early():
    class Counting(TorchSession):
        calls = 0

        def run(self, inputs):
            Counting.calls += 1
            return super().run(inputs)

    counts = {}
    for t in (0.0, 0.99):
        settings = SpDSettings(num_speculative_tokens=4, prefill_seq_len=8, ctx_len=128, max_new_tokens=MAX_NEW,
                               full_batch_size=1, confidence_threshold=t, adaptive_k=False)
        Counting.calls = 0
        info = SpDEngine("draft", TorchSession(TARGET, 1, 128), None, settings, draft=Counting(DRAFT, 1, 128),
                         eos_token_ids=[EOS]).generate(PROMPTS[:3])
        assert [ids.tolist() for ids in info.generated_ids] == REFERENCE[:3]
        counts[t] = Counting.calls
    assert counts[0.99] < counts[0.0]


def test_ctx_len_and_length_finish_reasons():
    prompt = PROMPTS[5]  # 26 tokens
    info = engine("pld", 3, 1, ctx_len=32, ignore_eos=True).generate([prompt, PROMPTS[0]])
    a, b = info.results
    assert a.finish_reason == "ctx_len" and a.num_prompt_tokens + a.num_generated_tokens == 32
    assert b.finish_reason == "length" and b.num_generated_tokens == MAX_NEW


def test_too_long_prompt_is_an_error_row_and_the_rest_go_on():
    long = list(range(3, 3 + 40))
    info = engine("pld", 3, 2, ctx_len=36).generate([PROMPTS[0], long, PROMPTS[2]])
    assert info.results[1].finish_reason == "error"
    assert "40 tokens" in info.results[1].error and "ctx_len=36" in info.results[1].error
    assert info.generated_ids[0].tolist() == REFERENCE[0]
    assert info.generated_ids[2].tolist() == REFERENCE[2]


def test_bad_prompts_are_error_rows():
    class Tok:
        eos_token_id = EOS

        def __call__(self, text, **kw):
            return {"input_ids": [3 + (ord(c) % 50) for c in text]}

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    settings = SpDSettings(prefill_seq_len=8, ctx_len=64, max_new_tokens=5, full_batch_size=2)
    eng = SpDEngine("pld", TorchSession(TARGET, 2, 64), Tok(), settings)
    info = eng.generate(["hello world", "   ", 42, "again"], prompt_ids=["a", "b", "c", "d"])
    reasons = [r.finish_reason for r in info.results]
    assert reasons[1] == reasons[2] == "error"
    assert "empty" in info.results[1].error and "not a string" in info.results[2].error
    assert reasons[0] != "error" and reasons[3] != "error"
    assert info.results[3].generated_text and info.results[3].prompt_id == "d"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_speculative_tokens=0), "num_speculative_tokens"),
        (dict(confidence_threshold=1.0), "confidence_threshold"),
        (dict(ctx_len=16, prefill_seq_len=32), "ctx_len"),
        (dict(max_ngram_size=0), "max_ngram_size"),
    ],
)
def test_settings_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpDSettings(**kwargs)


def test_draft_with_another_vocabulary_is_refused():
    other = tiny_model("llama", seed=1, vocab=VOCAB + 10)
    with pytest.raises(ValueError, match="vocabularies differ"):
        engine("draft", 3, 1, draft=other)


def test_multiproj_without_heads_is_refused():
    settings = SpDSettings(prefill_seq_len=8, ctx_len=64, full_batch_size=1)
    with pytest.raises(ValueError, match="projection heads"):
        SpDEngine("multiproj", TorchSession(TARGET, 1, 64), None, settings)


def test_printed_form_is_the_seeds():
    info = engine("pld", 3, 2).generate(PROMPTS[:2])
    text = repr(info)
    for line in ("Avg TLM+DLM TTFT = ", "Total TLM+DLM Batch TTFT = ", "Decode Throughput = ",
                 "E2E Throughput = ", "Avg number of accepted tokens = ", "Max generation len = ",
                 "Total Generated Tokens per Prompt: = "):
        assert line in text
    m = info.perf_metrics
    assert m.num_generated_tokens == sum(m.generated_tokens_per_prompt) == sum(len(r) for r in REFERENCE[:2])
    assert m.target_forwards == m.decode_iterations + sum(-(-len(p) // 8) for p in PROMPTS[:2])
    assert m.decode_time <= m.e2e_time and m.decode_target_time > 0


def test_multiproj_device_argmax_equals_host_argmax_of_full_head_logits():
    """The session's own argmax (heads only where each row's verified prefix ends) and a session
    that returns every head at every column (QEfficient's shape), its argmax taken on the host
    from those logits, give the same proposals, so the same steps."""
    from spd_cluster.sessions.base import argmax_outputs, check_inputs, keep_index

    class FullHeads:
        def __init__(self, session):
            self.session = session
            self.full_batch_size, self.ctx_len = session.full_batch_size, session.ctx_len
            self.vocab_size, self.num_heads = session.vocab_size, session.num_heads

        def run(self, inputs):
            x = check_inputs(inputs, self.full_batch_size, self.ctx_len)
            logits = self.session.run({**inputs, "argmax": np.array(False)})["logits"]
            assert logits.ndim == (4 if x.head_guesses else 3)
            if not x.argmax:
                return {"logits": logits}
            return argmax_outputs(x, keep_index(x.position_ids, x.num_logits), logits, self.num_heads)

    fast = engine("multiproj", 4, 3, adaptive_k=False)
    full = SpDEngine("multiproj", FullHeads(TorchSession(TARGET, 3, 128, heads=random_heads())), None,
                     fast.settings, eos_token_ids=[EOS])
    a, b = fast.generate(PROMPTS), full.generate(PROMPTS)
    assert [x.tolist() for x in a.generated_ids] == [x.tolist() for x in b.generated_ids] == REFERENCE
    assert a.perf_metrics.accepted_per_position == b.perf_metrics.accepted_per_position
    assert a.perf_metrics.decode_iterations == b.perf_metrics.decode_iterations


@pytest.mark.parametrize("fbs", [1, 4])
@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed-k", "adaptive-k"])
@pytest.mark.parametrize("case", list(ACCEPT_CASES))
def test_every_accept_path_is_lossless(case, adaptive, fbs, monkeypatch):
    """Every mode, k fixed and adaptive, one slot and four (eight prompts: continuous batching),
    on proposals that are all accepted (draft = target, heads planted on the target's own
    predictions), partly accepted (a draft with perturbed weights, heads wrong at every third
    position) or found in the text (pld): the output is the target's, and the accepts happened."""
    seen = verifies(monkeypatch)
    info = accept_run(case, adaptive, fbs, ModelledTime(monkeypatch))
    assert [ids.tolist() for ids in info.generated_ids] == REFERENCE
    m, want = info.perf_metrics, ACCEPT_CASES[case][3]
    accepted, proposed = sum(m.accepted_per_position), sum(m.proposed_per_position)
    if want == "none":
        assert proposed == 0 and m.mean_num_accepted_tokens == 1.0
        return
    assert m.accepted_per_position[1] > 0  # runs of two or more accepted
    if want == "all":
        assert m.accepted_per_position == m.proposed_per_position and m.mean_num_accepted_tokens > 2.5
    if want == "partial":
        assert accepted < proposed
        assert sum(0 < a < n for n, a in seen) >= 3  # runs accepted in part: rejected positions rewritten


# -- the seed-compatible scripts: k means what it means in the seed ---------------------------


def word_tokenizer():
    """A whitespace word-level tokenizer over the tiny model's vocabulary (no training, no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.mark.parametrize("mode", ["draft", "pld", "multiproj"])
def test_seed_scripts_fix_k_unless_asked(mode):
    from spd_cluster.seed_scripts import parser

    assert parser(mode).parse_args([]).adaptive_k is False  # the seed's k: always k
    assert parser(mode).parse_args(["--adaptive-k"]).adaptive_k is True
    assert parser(mode).parse_args(["--no-adaptive-k"]).adaptive_k is False


def test_draft_script_with_the_target_as_its_own_draft_accepts_k_a_step_like_the_seed(tmp_path, capsys):
    """draft_spd_inference.py, the target as its own draft, --num-speculative-tokens 4: every step
    proposes 4 and accepts them, 5 tokens a step (the seed's figure); --adaptive-k may propose
    fewer (a draft as dear as the target does not pay) and prints the same text."""
    from spd_cluster.seed_scripts import main

    d = tmp_path / "tiny"
    TARGET.save_pretrained(d)
    word_tokenizer().save_pretrained(d)
    args = ["--target-model-name", str(d), "--draft-model-name", str(d), "--num-speculative-tokens", "4",
            "--prompts", "w5 w9 w14 w33 w40", "--prompts", "w7 w8", "--full-batch-size", "2",
            "--ignore-eos-token", "--max-new-tokens", "21", "--ctx-len", "64", "--prefill-seq-len", "8"]
    out = {}
    for extra in ([], ["--adaptive-k"]):
        main("draft", args + extra)
        out[bool(extra)] = capsys.readouterr().out
    assert "Avg number of accepted tokens = 5.0\n" in out[False]
    texts = [[line for line in o.splitlines() if line.startswith("prompt=")] for o in out.values()]
    assert texts[0] == texts[1] and len(texts[0]) == 2
