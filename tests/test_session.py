"""The PyTorch session agrees with the model's own HF forward (float32: |logits diff| <= 1e-4,
same argmax) for prefill, chunked prefill, one-token decode and a k+1-token verify with rows at
different positions, with plain and with prepacked (oneDNN) linears; and it refuses inputs that
break the contract."""

import copy

import numpy as np
import pytest
import torch
from tiny import VOCAB, tiny_model

from spd_cluster.sessions.base import SessionInputError
from spd_cluster.sessions.heads import TurboHeads
from spd_cluster.sessions.torch_session import TorchSession

ATOL = 1e-4


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def run(session, rows, keep):
    """rows: list of (slot, token ids, first position); right-padded with -1."""
    width = max(len(t) for _, t, _ in rows)
    ids = np.zeros((len(rows), width), np.int64)
    pos = np.full((len(rows), width), -1, np.int64)
    for i, (_, toks, p0) in enumerate(rows):
        ids[i, : len(toks)] = toks
        pos[i, : len(toks)] = np.arange(p0, p0 + len(toks))
    return session.run({"input_ids": ids, "position_ids": pos, "batch_index": np.array([[s] for s, _, _ in rows]),
                        "num_logits_to_keep": np.arange(keep).reshape(-1, 1)})["logits"]


def prefill(session, slot, toks, chunk):
    out = None
    for c in range(0, len(toks), chunk):
        out = run(session, [(slot, toks[c : c + chunk], c)], 1)
    return out


@pytest.fixture(params=[("llama", False), ("qwen2", False), ("llama", True), ("qwen2", True)],
                ids=["llama", "qwen2", "llama-packed", "qwen2-packed"])
def model(request):
    m = tiny_model(request.param[0])
    m.pack = request.param[1]
    return m


def make(model, *args, **kw) -> TorchSession:
    """A session over ``model``; a packed one over a copy, so HF's reference keeps nn.Linear."""
    if not model.pack:
        return TorchSession(model, *args, **kw)
    s = TorchSession(copy.deepcopy(model), *args, pack=True, **kw)
    parts = [m for m in (s.model, s.heads, s._head_lm) if m is not None]  # the heads' readout too
    assert s.packed and not any(type(m) is torch.nn.Linear for part in parts for m in part.modules())
    return s


def seqs(n, lengths, seed=0):
    g = np.random.default_rng(seed)
    return [g.integers(3, VOCAB, size=l).tolist() for l in lengths]


def test_prefill_matches_hf(model):
    s = make(model, full_batch_size=2, ctx_len=64)
    (toks,) = seqs(1, [21])
    out = run(s, [(1, toks, 0)], len(toks))
    ref = hf_logits(model, toks)
    np.testing.assert_allclose(out[0], ref, atol=ATOL)
    assert (out[0].argmax(-1) == ref.argmax(-1)).all()


def test_chunked_prefill_and_decode_match_hf(model):
    s = make(model, full_batch_size=3, ctx_len=64)
    (toks,) = seqs(1, [23])
    out = prefill(s, 2, toks, chunk=8)  # chunks of 8, 8, 7
    full = toks + [int(out[0, -1].argmax())]
    np.testing.assert_allclose(out[0, -1], hf_logits(model, toks)[-1], atol=ATOL)
    for _ in range(3):  # one-token decode steps
        out = run(s, [(2, [full[-1]], len(full) - 1)], 1)
        np.testing.assert_allclose(out[0, -1], hf_logits(model, full)[-1], atol=ATOL)
        full.append(int(out[0, -1].argmax()))


def test_verify_rows_at_different_positions(model):
    s = make(model, full_batch_size=4, ctx_len=64)
    a, b, spec_a, spec_b = seqs(4, [9, 20, 4, 2], seed=1)
    prefill(s, 3, a, chunk=16)
    prefill(s, 0, b, chunk=16)
    # slot 3 verifies 4 tokens at positions 9..12, slot 0 verifies 2 at 20..21 (padded)
    out = run(s, [(3, spec_a, len(a)), (0, spec_b, len(b))], 4)
    np.testing.assert_allclose(out[0], hf_logits(model, a + spec_a)[-4:], atol=ATOL)
    np.testing.assert_allclose(out[1, :2], hf_logits(model, b + spec_b)[-2:], atol=ATOL)


def test_rejected_tokens_need_no_rollback(model):
    s = make(model, full_batch_size=1, ctx_len=64)
    a, junk, good = seqs(3, [10, 5, 3], seed=2)
    prefill(s, 0, a, chunk=16)
    run(s, [(0, junk, len(a))], 5)  # written at 10..14, then "rejected"
    out = run(s, [(0, good, len(a))], 3)  # overwrite 10..12; 13..14 must be invisible
    np.testing.assert_allclose(out[0], hf_logits(model, a + good)[-3:], atol=ATOL)


def test_slot_reuse_with_a_shorter_prompt(model):
    s = make(model, full_batch_size=1, ctx_len=64)
    long, short = seqs(2, [30, 6], seed=3)
    prefill(s, 0, long, chunk=16)
    out = prefill(s, 0, short, chunk=16)
    np.testing.assert_allclose(out[0, -1], hf_logits(model, short)[-1], atol=ATOL)


def test_heads_add_an_axis_and_keep_base_logits(model):
    torch.manual_seed(0)
    heads = TurboHeads(model.config.hidden_size, num_heads=3, num_layers=2)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.2)
    s = make(model, full_batch_size=1, ctx_len=32, heads=heads)
    (toks,) = seqs(1, [7])
    out = run(s, [(0, toks, 0)], 2)
    assert out.shape == (1, 2, 4, VOCAB)
    np.testing.assert_allclose(out[0, :, 0], hf_logits(model, toks)[-2:], atol=ATOL)
    assert not np.allclose(out[0, :, 1], out[0, :, 0])


def test_head_guesses_are_the_argmax_over_head_vocab_where_the_verified_prefix_ends(model, tmp_path):
    """``argmax``: tokens are the base logits' argmax at every kept column; each head's argmax and
    softmax probability come from the column where the row's verified prefix ends, over the full
    vocabulary or over ``head_vocab`` only where the heads have one (also after a save/load round
    trip); ``head_guesses`` False returns base outputs only; ids outside the vocabulary are refused."""
    torch.manual_seed(0)
    heads = TurboHeads(model.config.hidden_size, num_heads=2)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.2)
    full = make(model, full_batch_size=1, ctx_len=32, heads=copy.deepcopy(heads))
    vocab = np.array([3, 5, 17, 40, VOCAB - 1])
    heads.vocab = torch.from_numpy(vocab)
    heads.save(tmp_path / "h")
    loaded = TurboHeads.load(tmp_path / "h")
    assert loaded.vocab.tolist() == vocab.tolist()
    part = make(model, full_batch_size=1, ctx_len=32, heads=loaded)
    (toks,) = seqs(1, [7])
    call = {"input_ids": np.array([toks]), "position_ids": np.arange(7)[None], "batch_index": np.zeros((1, 1), np.int64),
            "num_logits_to_keep": np.zeros((3, 1), np.int64)}
    every = full.run(call)["logits"]  # [1, 3, H + 1, V]: the columns of tokens 4, 5, 6
    base = every[0, :, 0].argmax(-1)
    toks = list(toks)
    toks[5] = int(base[0])  # the token after column 4 is what the base model chose there
    toks[6] = (int(base[1]) + 1) % VOCAB  # and the one after column 5 is not: verified up to column 1
    call["input_ids"] = np.array([toks])
    every = full.run(call)["logits"]
    logits = every[0, 1, 1:]  # [2, V]: the heads at kept column 1
    for s, ids in ((full, np.arange(VOCAB)), (part, vocab)):
        out = s.run({**call, "argmax": np.array(True)})
        assert out["tokens"].tolist() == [every[0, :, 0].argmax(-1).tolist()]
        sub = logits[..., ids]
        assert out["head_tokens"].shape == out["head_probs"].shape == (1, 2)
        assert out["head_tokens"][0].tolist() == ids[sub.argmax(-1)].tolist()
        want = np.exp(sub.max(-1)) / np.exp(sub).sum(-1)
        np.testing.assert_allclose(out["head_probs"][0], want, rtol=1e-4)
        plain = s.run({**call, "argmax": np.array(True), "head_guesses": np.array(False)})
        assert set(plain) == {"tokens"}
    assert full.run({**call, "head_guesses": np.array(False)})["logits"].shape == (1, 3, VOCAB)
    heads.vocab = torch.tensor([0, VOCAB])
    with pytest.raises(ValueError, match="head_vocab"):
        TorchSession(model, 1, 32, heads=heads)


def test_packing_replaces_weights_and_keeps_tied_ones():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tied = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)).eval()
    ref = copy.deepcopy(tied)
    s = TorchSession(tied, full_batch_size=1, ctx_len=16, pack=True)
    assert s.packed and s.vocab_size == VOCAB
    # the tied lm_head still shares the embedding; an untied projection keeps only its packed copy
    assert s.model.lm_head.weight is s.model.model.embed_tokens.weight and not s.model.lm_head.weight.is_meta
    assert s.model.model.layers[0].mlp.up_proj.weight.is_meta
    toks = [5, 9, 3, 7]
    np.testing.assert_allclose(run(s, [(0, toks, 0)], 4)[0], hf_logits(ref, toks), atol=ATOL)
    assert s.packed == "onednn"
    # bfloat16 is not oneDNN's (its bf16 packing needs AVX512-BF16 / AVX-NE-CONVERT): our AVX2 kernel
    assert TorchSession(tiny_model("llama").to(torch.bfloat16), 1, 16, pack=True).packed == "avx2-bf16"


def test_cpu_kernels_refuse_a_bare_linear_they_could_not_swap():
    from spd_cluster.sessions.torch_session import use_cpu_kernels

    with pytest.raises(TypeError, match="bare nn.Linear"):
        use_cpu_kernels(tiny_model("llama"), torch.nn.Linear(8, 4))


@pytest.mark.parametrize("dtype, kind", [(torch.float32, "onednn"), (torch.bfloat16, "avx2-bf16")])
def test_cpu_kernels_for_a_block_give_the_model_back(dtype, kind):
    from spd_cluster.sessions.torch_session import cpu_kernels

    model = tiny_model("llama").to(dtype)
    before = {name: m for name, m in model.named_modules() if type(m) is torch.nn.Linear}
    attn = model.config._attn_implementation
    toks = [5, 9, 3, 7]
    ref = hf_logits(model, toks)
    with cpu_kernels(model) as ran:
        assert ran == kind and not any(type(m) is torch.nn.Linear for m in model.modules())
        np.testing.assert_allclose(hf_logits(model, toks), ref, atol=ATOL if dtype == torch.float32 else 0.05)
    after = {name: m for name, m in model.named_modules() if type(m) is torch.nn.Linear}
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert not any(p.is_meta for p in model.parameters())
    assert model.config._attn_implementation == attn
    np.testing.assert_array_equal(hf_logits(model, toks), ref)  # plain PyTorch again, bit for bit


def test_bfloat16_argmax_agrees():
    model = tiny_model("llama")
    s = TorchSession(tiny_model("llama").to(torch.bfloat16), full_batch_size=1, ctx_len=32)
    (toks,) = seqs(1, [12], seed=4)
    out = run(s, [(0, toks, 0)], 12)
    assert (out[0].argmax(-1) == hf_logits(model, toks).argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize(
    "inputs, message",
    [
        (dict(input_ids=np.zeros((1, 2), np.int64), position_ids=np.array([[63, 64]]), batch_index=np.array([[0]])),
         "ctx_len"),
        (dict(input_ids=np.zeros((1, 1), np.int64), position_ids=np.array([[0]]), batch_index=np.array([[2]])),
         "out of range"),
        (dict(input_ids=np.zeros((1, 3), np.int64), position_ids=np.array([[0, 1]]), batch_index=np.array([[0]])),
         "shape"),
        (dict(input_ids=np.zeros((2, 1), np.int64), position_ids=np.zeros((2, 1), np.int64),
              batch_index=np.array([[0]])), "batch_index"),
        (dict(input_ids=np.zeros((1, 1), np.int64), position_ids=np.array([[-1]]), batch_index=np.array([[0]])),
         "padding"),
    ],
)
def test_contract_errors(inputs, message):
    s = TorchSession(tiny_model("llama"), full_batch_size=2, ctx_len=64)
    with pytest.raises(SessionInputError, match=message):
        s.run(inputs)
