"""The bfloat16 linear kernel (sessions/kernels, sessions/bf16.py): float32-accurate against a
float64 reference on odd shapes, batch invariant bit for bit, and a bfloat16 session on it agrees
with the model's own forward; its AVX512-BF16 tiles give the AVX2 tiles' bits, for 1..16 rows;
with row-wise attention (sessions/rowwise.py) a k-token verify gives the same bits as k one-token
decode steps, so bfloat16 speculation returns exactly the baseline's tokens; `cpu_kernels: false`
keeps PyTorch's linears."""

import copy
import os

import numpy as np
import pytest
import torch
from tiny import VOCAB, tiny_model

from spd_cluster.config import ModelSpec
from spd_cluster.sessions import bf16
from spd_cluster.sessions.loader import load_session
from spd_cluster.sessions.torch_session import TorchSession


def reference(x, w, b):
    y = x.double() @ w.double().T
    return y if b is None else y + b.double()


# (rows M, outputs N, inputs K): tails in every direction (K % 16, N % 48, M % 3 and % 4)
SHAPES = [(1, 50, 40), (2, 7, 16), (3, 97, 72), (4, 48, 24), (5, 101, 1536), (8, 13, 9), (13, 96, 136)]


@pytest.mark.parametrize("m, n, k", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_matches_float64_and_is_batch_invariant(m, n, k, bias):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    b = torch.randn(n, generator=g) if bias else None
    y = bf16.linear(x, w, b)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    # float32 accumulation: error within a few float32 ulps of sum |x| |w|
    bound = 1e-5 * (x.abs().double() @ w.abs().double().T) + 1e-6
    assert ((y.double() - reference(x, w, b)).abs() <= bound).all()
    # a row alone, rows reversed: the same bits as in the whole call
    for i in range(m):
        assert torch.equal(bf16.linear(x[i : i + 1], w, b)[0], y[i])
    assert torch.equal(bf16.linear(x.flip(0), w, b), y.flip(0))


def test_bfloat16_in_and_out_and_leading_dims():
    x = torch.randn(2, 3, 40).to(torch.bfloat16)
    w = torch.randn(24, 40).to(torch.bfloat16)
    y = bf16.linear(x, w)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 24)
    torch.testing.assert_close(y, (x.float() @ w.float().T).to(torch.bfloat16), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("m, n, k", SHAPES)
def test_bfloat16_input_gives_the_float32_path_rounded_bit_for_bit(m, n, k):
    """bfloat16 x goes to the kernel as it is and comes back rounded in C++: the same bits as
    widening x, the float32 call and PyTorch's .to(bfloat16); ties, overflow, infinities and NaN
    included (through the bias, with x = 0)."""
    g = torch.Generator().manual_seed(m + n + k)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    b = torch.randn(n, generator=g)
    kernel = bf16.extension().bf16_linear  # takes bfloat16 x itself, no float32 copy
    for bias in (None, b):
        y = kernel(x, w, bias)
        assert y.dtype == torch.bfloat16 and torch.equal(bf16.linear(x, w, bias), y)
        assert torch.equal(y.view(torch.int16), bf16.linear(x.float(), w, bias).to(torch.bfloat16).view(torch.int16))
    words = torch.tensor([0x3F808000, 0x3F818000, 0x3F80C001, 0xBF808000, 0x7F7FFFFF, 0x7F800000, 0xFF800000,
                          0x7FC00001, 0x00000001, 0x80000000], dtype=torch.int64).to(torch.int32)
    n = max(n, len(words))
    special = words.view(torch.float32).repeat(n // len(words) + 1)[:n].contiguous()
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    zeros = torch.zeros(m, k)
    y, want = kernel(zeros.to(torch.bfloat16), w, special), bf16.linear(zeros, w, special).to(torch.bfloat16)
    nan = want.isnan()  # PyTorch's own NaN bits differ between its scalar and vector paths
    assert nan.any() and torch.equal(y.isnan(), nan)
    assert torch.equal(y[~nan].view(torch.int16), want[~nan].view(torch.int16))


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())


def test_the_tiles_follow_the_cpu():
    """AVX512-BF16 tiles exactly where the CPU has AVX512-BF16 (and BW, VL), unless SPD_BF16_ISA
    names others; AVX2 ones can always be asked for, AVX512-BF16 ones only there."""
    native = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= cpu_flags()
    default = os.environ.get("SPD_BF16_ISA") or ("avx512-bf16" if native else "avx2")
    assert bf16.isa() == default
    assert bf16.isas() == (["avx2", "avx512-bf16"] if native else ["avx2"])
    try:
        bf16.set_isa("avx2")
        assert bf16.isa() == "avx2"
        with pytest.raises(RuntimeError, match="'avx2' or 'avx512-bf16'"):
            bf16.set_isa("amx")
        if not native:
            with pytest.raises(RuntimeError, match="no AVX512-BF16"):
                bf16.set_isa("avx512-bf16")
    finally:
        bf16.set_isa(default)


# outputs N: whole tiles of 8 and 6, pairs and a lone row, tasks of 48 split over threads; inputs
# K: a K % 16 tail or none
WIDE = [(101, 1540), (96, 1536), (7, 40), (1, 16)]


@pytest.mark.parametrize("isa", ["avx2", "avx512-bf16"])
@pytest.mark.parametrize("n, k", WIDE)
def test_each_isa_is_batch_invariant_for_1_to_16_rows(isa, n, k):
    """Every row count 1..16 (one pass of 1..8 rows, two passes past 8) gives each row the bits it
    gets alone and within 16 rows: float32 sums and bfloat16 outputs, with and without bias; the
    sums are float32-accurate. A CPU without AVX512-BF16 refuses those tiles."""
    if isa not in bf16.isas():
        with pytest.raises(RuntimeError, match="no AVX512-BF16"):
            bf16.set_isa(isa)
        return
    ext = bf16.extension()
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(16, k, generator=g).to(torch.bfloat16)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    b = torch.randn(n, generator=g)
    default = bf16.isa()
    try:
        bf16.set_isa(isa)
        for bias in (None, b):
            whole, whole16 = ext.bf16_linear(x, w, bias, float_out=True), ext.bf16_linear(x, w, bias)
            assert whole.dtype == torch.float32 and whole16.dtype == torch.bfloat16
            bound = 1e-5 * (x.abs().double() @ w.abs().double().T) + 1e-6
            assert ((whole.double() - reference(x, w, bias)).abs() <= bound).all()
            for m in range(1, 17):
                assert torch.equal(ext.bf16_linear(x[:m], w, bias, float_out=True), whole[:m])
                assert torch.equal(ext.bf16_linear(x[16 - m:], w, bias).view(torch.int16), whole16[16 - m:].view(torch.int16))
            for i in range(16):
                assert torch.equal(ext.bf16_linear(x[i : i + 1], w, bias, float_out=True)[0], whole[i])
    finally:
        bf16.set_isa(default)


@pytest.mark.parametrize("n, k", WIDE + [(13, 9), (50, 40)])
def test_avx512_bf16_tiles_give_the_avx2_bits(n, k):
    """bfloat16 activations on the AVX512-BF16 tiles: the float32 sums of the AVX2 tiles bit for
    bit (and of float32 activations, which always take the AVX2 tiles), for 1..16 rows; zeros,
    large and small values included. Where the CPU has no AVX512-BF16 both runs take AVX2."""
    ext = bf16.extension()
    g = torch.Generator().manual_seed(7 * n + k)
    x = torch.randn(16, k, generator=g) * torch.logspace(-6, 6, k)[torch.randperm(k, generator=g)]
    x[3] = 0
    x = x.to(torch.bfloat16)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    b = torch.randn(n, generator=g)
    default = bf16.isa()
    try:
        for bias in (None, b):
            out = {}
            for isa in ("avx2", bf16.isas()[-1]):
                bf16.set_isa(isa)
                out[isa] = [ext.bf16_linear(x[:m], w, bias, float_out=True) for m in range(1, 17)]
            for a, c in zip(*out.values()):
                assert torch.equal(a, c)
            assert torch.equal(out["avx2"][-1], ext.bf16_linear(x.float(), w, bias))
    finally:
        bf16.set_isa(default)


def run(session, toks, p0, keep):
    out = session.run({"input_ids": np.array([toks]), "position_ids": np.array([np.arange(p0, p0 + len(toks))]),
                       "batch_index": np.zeros((1, 1), np.int64), "num_logits_to_keep": np.zeros((keep, 1), np.int64)})
    return out["logits"][0]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bfloat16_session_on_the_kernel(arch):
    model = tiny_model(arch).to(torch.bfloat16)
    plain = TorchSession(copy.deepcopy(model), 1, 64)
    fast = TorchSession(copy.deepcopy(model), 1, 64, pack=True)
    assert plain.packed is None and fast.packed == "avx2-bf16"
    assert not any(type(m) is torch.nn.Linear for m in fast.model.modules())
    toks = np.random.default_rng(3).integers(3, VOCAB, size=24)
    ref = run(plain, toks[:20], 0, 20)
    got = run(fast, toks[:20], 0, 20)
    np.testing.assert_allclose(got, ref, atol=0.1)  # bf16 rounding of each layer's outputs
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
    # a 4-token verify and 4 one-token decode steps see the same logits
    verify = run(fast, toks[20:24], 20, 4)
    fast.cache.reset()
    run(fast, toks[:20], 0, 1)
    decode = np.concatenate([run(fast, toks[20 + i : 21 + i], 20 + i, 1) for i in range(4)])
    np.testing.assert_array_equal(verify, decode)


class _Attn:
    sliding_window, is_causal = None, True


@pytest.mark.parametrize("heads, kv_heads, dim", [(12, 2, 128), (4, 4, 20), (6, 3, 8)])
def test_rowwise_attention_matches_float64_and_is_batch_invariant(heads, kv_heads, dim):
    """The C++ row-wise attention: each row over keys 0 .. its length - 1 only (GQA, lengths
    differing by row and sequence, a padding row of length 0 gives zeros), float32-accurate, and a
    row computed alone has the same bits as in the whole call; the Python fallback agrees."""
    from spd_cluster.sessions import rowwise

    g = torch.Generator().manual_seed(heads * 100 + dim)
    B, S, N = 2, 5, 41
    q, k, v = (torch.randn(B, h, n, dim, generator=g) for h, n in ((heads, S), (kv_heads, N), (kv_heads, N)))
    lengths = torch.tensor([[30, 31, 32, 33, 0], [37, 38, 39, 40, 41]])
    mask = (torch.arange(N)[None, None, :] < lengths[:, :, None])[:, None]  # [B, 1, S, N]
    out, _ = rowwise.rowwise_attention(_Attn(), q, k, v, mask, scaling=dim ** -0.5)
    assert out.shape == (B, S, heads, dim)
    for b in range(B):
        for s in range(S):
            n = int(lengths[b, s])
            for h in range(heads):
                kv = h // (heads // kv_heads)
                if n == 0:
                    assert not out[b, s, h].any()
                    continue
                p = torch.softmax(q[b, h, s].double() @ k[b, kv, :n].double().T * dim ** -0.5, -1)
                torch.testing.assert_close(out[b, s, h].double(), p @ v[b, kv, :n].double(), rtol=0, atol=2e-6)
            alone, _ = rowwise.rowwise_attention(_Attn(), q[b : b + 1, :, s : s + 1], k[b : b + 1], v[b : b + 1],
                                                 mask[b : b + 1, :, s : s + 1], scaling=dim ** -0.5)
            assert torch.equal(alone[0, 0], out[b, s])
    ext, bf16._ext = bf16._ext, None
    bf16._error = RuntimeError("pretend the extension is missing")
    try:
        python, _ = rowwise.rowwise_attention(_Attn(), q, k, v, mask, scaling=dim ** -0.5)
    finally:
        bf16._ext, bf16._error = ext, None
    torch.testing.assert_close(python, out, rtol=0, atol=2e-6)


def test_rowwise_attention_blocks_of_rows_keep_each_rows_bits():
    """The kernel computes the rows of a key/value head eight at a time: a verify's 9 rows x 6
    query heads (blocks of 8 that straddle rows, the last one partial), rows of different lengths
    in one block, a zero-length row, scores large enough that most weights underflow to 0, and
    long contexts (the vectorised exp and its tail): each row as accurate as float32 scores of that
    size allow (a score near 100 carries ~1e-5 of rounding into its weight) and, computed alone,
    the same bits."""
    from spd_cluster.sessions import rowwise

    g = torch.Generator().manual_seed(7)
    B, H, G, S, N, D = 2, 12, 2, 9, 613, 64
    q = torch.randn(B, H, S, D, generator=g) * 4  # scores of tens: exp(score - max) underflows for most keys
    k, v = torch.randn(B, G, N, D, generator=g), torch.randn(B, G, N, D, generator=g)
    lengths = torch.tensor([[605 + s for s in range(S)], [0, 1, 2, 9, 17, 250, 599, 612, 613]])
    mask = (torch.arange(N)[None, None, :] < lengths[:, :, None])[:, None]
    out, _ = rowwise.rowwise_attention(_Attn(), q, k, v, mask, scaling=1.0)
    for b in range(B):
        for s in range(S):
            n = int(lengths[b, s])
            for h in range(H):
                if n == 0:
                    assert not out[b, s, h].any()
                    continue
                p = torch.softmax(q[b, h, s].double() @ k[b, h // (H // G), :n].double().T, -1)
                torch.testing.assert_close(out[b, s, h].double(), p @ v[b, h // (H // G), :n].double(),
                                           rtol=0, atol=5e-5)
            alone, _ = rowwise.rowwise_attention(_Attn(), q[b : b + 1, :, s : s + 1], k[b : b + 1], v[b : b + 1],
                                                 mask[b : b + 1, :, s : s + 1], scaling=1.0)
            assert torch.equal(alone[0, 0], out[b, s])


# PyTorch's SDPA on an AVX2 CPU (this project's machines) rounds a 5-query verify differently from
# 5 one-query decode steps on this model and context; its AVX512 kernels happen not to: what the
# row-wise attention is for is shown where it is needed, and its own claim is checked everywhere.
SDPA_DIFFERS = [("sdpa", False)] if torch.backends.cpu.get_cpu_capability() == "AVX2" else []


@pytest.mark.parametrize("attn, bitwise", SDPA_DIFFERS + [("spd_rowwise", True)])
def test_verify_and_decode_agree_bit_for_bit_with_rowwise_attention(attn, bitwise):
    """A k-token verify with the row-wise attention the session installs gives the bits of k
    one-token decode steps (plain SDPA on AVX2 does not)."""
    model = tiny_model("qwen2", hidden=128).to(torch.bfloat16)
    s = TorchSession(model, 1, 128, pack=True)
    assert s.model.config._attn_implementation == "spd_rowwise"
    s.model.set_attn_implementation(attn)
    toks = np.random.default_rng(0).integers(3, VOCAB, size=105)
    run(s, toks[:100], 0, 1)
    verify = run(s, toks[100:], 100, 5)
    s.cache.reset()
    run(s, toks[:100], 0, 1)
    decode = np.concatenate([run(s, toks[100 + i : 101 + i], 100 + i, 1) for i in range(5)])
    assert np.array_equal(verify, decode) is bitwise


def test_a_session_computes_the_same_logits_on_either_tiles():
    """Prefill, verify and decode of a bfloat16 session: the same bits on the AVX2 and the
    AVX512-BF16 tiles (where the CPU has both)."""
    s = TorchSession(tiny_model("qwen2", hidden=128).to(torch.bfloat16), 1, 64, pack=True)
    toks = np.random.default_rng(1).integers(3, VOCAB, size=30)
    default, out = bf16.isa(), {}
    try:
        for isa in bf16.isas():
            bf16.set_isa(isa)
            s.cache.reset()
            out[isa] = [run(s, toks[:20], 0, 20), run(s, toks[20:28], 20, 8), run(s, toks[28:29], 28, 1)]
    finally:
        bf16.set_isa(default)
    assert out and all(np.array_equal(a, b) for got in out.values() for a, b in zip(got, out["avx2"]))


def test_a_prefill_takes_pytorchs_linears_where_the_tiles_are_avx512_bf16(monkeypatch):
    """A prefill chunk (one logit kept, wider than row-wise attention's rows) on AVX512-BF16 tiles
    computes what the model without the kernel computes, bit for bit, and calls the kernel not
    once; on AVX2 tiles, and for a verify (every logit kept) or a chunk of 16 on either, the
    kernel computes it."""
    model = tiny_model("qwen2", hidden=128).to(torch.bfloat16)
    plain = TorchSession(copy.deepcopy(model), 1, 64)
    s = TorchSession(copy.deepcopy(model), 1, 64, pack=True)
    toks = np.random.default_rng(2).integers(3, VOCAB, size=40)
    calls = []
    kernel = bf16.linear
    monkeypatch.setattr(bf16, "linear", lambda *a: calls.append(1) or kernel(*a))

    def kernel_calls(session, part, p0, keep):
        calls.clear()
        logits = run(session, part, p0, keep)
        return len(calls), logits

    expected = run(plain, toks[:30], 0, 1)
    default = bf16.isa()
    try:
        for isa in bf16.isas():
            bf16.set_isa(isa)
            s.cache.reset()
            n, logits = kernel_calls(s, toks[:30], 0, 1)
            assert (n == 0) is (isa == "avx512-bf16")
            if isa == "avx512-bf16":
                assert np.array_equal(logits, expected)
            assert kernel_calls(s, toks[30:40], 30, 1)[0] > 0  # 10 wide: the kernel
            s.cache.reset()
            assert kernel_calls(s, toks[:16], 0, 1)[0] > 0
            assert kernel_calls(s, toks[16:36], 16, 20)[0] > 0  # a verify of 20
    finally:
        bf16.set_isa(default)


def test_bfloat16_speculation_returns_the_baseline_tokens():
    from spd_cluster.engine import SpDEngine, SpDSettings
    from spd_cluster.sessions.heads import TurboHeads

    model = tiny_model("qwen2", hidden=128).to(torch.bfloat16)
    torch.manual_seed(0)
    heads = TurboHeads(128, num_heads=3)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.05)
    g = np.random.default_rng(5)
    prompts = [g.integers(3, VOCAB, size=n).tolist() for n in (70, 90, 40)]
    prompts.append(prompts[0][:30] * 3)  # repetitive: prompt lookup proposes often
    out = {}
    for mode in ("baseline", "pld", "multiproj", "draft"):
        settings = SpDSettings(num_speculative_tokens=3, prefill_seq_len=32, ctx_len=256, max_new_tokens=40,
                               full_batch_size=2, ignore_eos=True, adaptive_k=False)  # every proposal verified
        session = TorchSession(copy.deepcopy(model), 2, 256, heads=copy.deepcopy(heads) if mode == "multiproj" else None,
                               pack=True)
        draft = TorchSession(copy.deepcopy(model), 2, 256, pack=True) if mode == "draft" else None  # the target itself
        info = SpDEngine(mode, session, None, settings, draft=draft).generate(prompts)
        out[mode] = [g.tolist() for g in info.generated_ids]
        if mode != "baseline":
            assert info.perf_metrics.mean_num_accepted_tokens > 1.0  # it did speculate
    assert out["pld"] == out["baseline"] and out["multiproj"] == out["baseline"] and out["draft"] == out["baseline"]


def test_tied_weights_stay_shared_and_load_session_switch(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tied = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    tied.save_pretrained(tmp_path / "m")
    s = TorchSession(copy.deepcopy(tied).to(torch.bfloat16).eval(), 1, 16, pack=True)
    assert s.packed == "avx2-bf16"
    assert s.model.lm_head.weight is s.model.model.embed_tokens.weight  # no copy of the weight
    assert load_session(str(tmp_path / "m"), dtype="bfloat16", full_batch_size=1, ctx_len=16).packed == "avx2-bf16"
    assert load_session(str(tmp_path / "m"), dtype="bfloat16", full_batch_size=1, ctx_len=16,
                        packed_linears=False).packed is None
    assert ModelSpec(model="m").cpu_kernels and not ModelSpec(model="m", cpu_kernels=False).cpu_kernels


def test_float32_models_keep_pytorchs_linears():
    assert bf16.available(tiny_model("llama").to(torch.bfloat16)) and not bf16.available(tiny_model("llama"))
