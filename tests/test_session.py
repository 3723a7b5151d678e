"""The PyTorch session agrees with the model's own HF forward (float32: |logits diff| <= 1e-4,
same argmax) for prefill, chunked prefill, one-token decode and a k+1-token verify with rows at
different positions; and it refuses inputs that break the contract."""

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
        return model(torch.tensor([ids])).logits[0].numpy()


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


@pytest.fixture(params=["llama", "qwen2"])
def model(request):
    return tiny_model(request.param)


def seqs(n, lengths, seed=0):
    g = np.random.default_rng(seed)
    return [g.integers(3, VOCAB, size=l).tolist() for l in lengths]


def test_prefill_matches_hf(model):
    s = TorchSession(model, full_batch_size=2, ctx_len=64)
    (toks,) = seqs(1, [21])
    out = run(s, [(1, toks, 0)], len(toks))
    ref = hf_logits(model, toks)
    np.testing.assert_allclose(out[0], ref, atol=ATOL)
    assert (out[0].argmax(-1) == ref.argmax(-1)).all()


def test_chunked_prefill_and_decode_match_hf(model):
    s = TorchSession(model, full_batch_size=3, ctx_len=64)
    (toks,) = seqs(1, [23])
    out = prefill(s, 2, toks, chunk=8)  # chunks of 8, 8, 7
    full = toks + [int(out[0, -1].argmax())]
    np.testing.assert_allclose(out[0, -1], hf_logits(model, toks)[-1], atol=ATOL)
    for _ in range(3):  # one-token decode steps
        out = run(s, [(2, [full[-1]], len(full) - 1)], 1)
        np.testing.assert_allclose(out[0, -1], hf_logits(model, full)[-1], atol=ATOL)
        full.append(int(out[0, -1].argmax()))


def test_verify_rows_at_different_positions(model):
    s = TorchSession(model, full_batch_size=4, ctx_len=64)
    a, b, spec_a, spec_b = seqs(4, [9, 20, 4, 2], seed=1)
    prefill(s, 3, a, chunk=16)
    prefill(s, 0, b, chunk=16)
    # slot 3 verifies 4 tokens at positions 9..12, slot 0 verifies 2 at 20..21 (padded)
    out = run(s, [(3, spec_a, len(a)), (0, spec_b, len(b))], 4)
    np.testing.assert_allclose(out[0], hf_logits(model, a + spec_a)[-4:], atol=ATOL)
    np.testing.assert_allclose(out[1, :2], hf_logits(model, b + spec_b)[-2:], atol=ATOL)


def test_rejected_tokens_need_no_rollback(model):
    s = TorchSession(model, full_batch_size=1, ctx_len=64)
    a, junk, good = seqs(3, [10, 5, 3], seed=2)
    prefill(s, 0, a, chunk=16)
    run(s, [(0, junk, len(a))], 5)  # written at 10..14, then "rejected"
    out = run(s, [(0, good, len(a))], 3)  # overwrite 10..12; 13..14 must be invisible
    np.testing.assert_allclose(out[0], hf_logits(model, a + good)[-3:], atol=ATOL)


def test_slot_reuse_with_a_shorter_prompt(model):
    s = TorchSession(model, full_batch_size=1, ctx_len=64)
    long, short = seqs(2, [30, 6], seed=3)
    prefill(s, 0, long, chunk=16)
    out = prefill(s, 0, short, chunk=16)
    np.testing.assert_allclose(out[0, -1], hf_logits(model, short)[-1], atol=ATOL)


def test_heads_add_an_axis_and_keep_base_logits(model):
    torch.manual_seed(0)
    heads = TurboHeads(model.config.hidden_size, num_heads=3, num_layers=2)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.2)
    s = TorchSession(model, full_batch_size=1, ctx_len=32, heads=heads)
    (toks,) = seqs(1, [7])
    out = run(s, [(0, toks, 0)], 2)
    assert out.shape == (1, 2, 4, VOCAB)
    np.testing.assert_allclose(out[0, :, 0], hf_logits(model, toks)[-2:], atol=ATOL)
    assert not np.allclose(out[0, :, 1], out[0, :, 0])


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
