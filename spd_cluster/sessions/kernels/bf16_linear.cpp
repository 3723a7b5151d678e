// y[M, N] = x[M, K] @ w[N, K]^T (+ bias): bfloat16 weights, float32 activations and accumulation,
// AVX2 + FMA, batch invariant (see sessions/bf16.py); bfloat16 activations on a CPU with
// AVX512-BF16 take the same sums, bit for bit, on `vdpbf16ps` tiles (bf16_avx512.h), chosen
// at run time, one choice per process (never by row count). Each weight row is read
// from memory once per call (the next tile's rows prefetched meanwhile), widened to float32 in
// registers and applied to up to 5 activation rows per pass while it sits in L1, so a k + 1 row
// verify costs little more than a one-row decode step, which is memory-bound.
//
// Batch invariant: every output element is one 8-lane float32 accumulator over k in order, then
// the same horizontal sum, tail and bias; how rows and columns are tiled never changes a bit. So
// a row's result is the same whether it is computed alone (decode) or with others (verify, other
// slots), which keeps speculative verification exactly consistent with one-token decoding.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <string>

#include "attention.h"
#include "bf16_avx512.h"
#include "bf16_linear.h"

using namespace spd_bf16;

// Which tiles bfloat16 activations take: AVX512-BF16 where the CPU has it, else AVX2. Chosen once
// per process (set_isa changes it for all later calls: tests, benchmarks), never per call, so a
// decode step and a verify always run the same instructions.
static bool use_avx512bf16 = cpu_has_avx512bf16();

std::string isa() { return use_avx512bf16 ? "avx512-bf16" : "avx2"; }

void set_isa(const std::string& name) {
  TORCH_CHECK(name == "avx2" || name == "avx512-bf16", "isa: 'avx2' or 'avx512-bf16', not '", name, "'");
  TORCH_CHECK(name == "avx2" || cpu_has_avx512bf16(), "this CPU (or this compiler) has no AVX512-BF16");
  use_avx512bf16 = name == "avx512-bf16";
}

torch::Tensor bf16_linear(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias,
                          bool float_out) {
  const bool half = x.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(x.dim() == 2 && (half || x.scalar_type() == torch::kFloat) && x.is_contiguous(),
              "x: contiguous float32 or bfloat16 [M, K]");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kBFloat16 && w.is_contiguous(), "w: contiguous bfloat16 [N, K]");
  TORCH_CHECK(x.size(1) == w.size(1), "x and w disagree on K");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat && bias->is_contiguous() && bias->numel() == N, "bias: float32 [N]");
    b = bias->data_ptr<float>();
  }
  auto f32 = x.options().dtype(torch::kFloat);
  auto acc = torch::empty({M, N}, f32);
  const bool avx512 = half && use_avx512bf16;
  // the activations laid out for the tiles, once per call: float32 interleaved (AVX2) or bfloat16
  // with each pair swapped (AVX512-BF16)
  auto xi = torch::empty({M, K}, avx512 ? x.options() : f32);
  const uint16_t* xh = half ? reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) : nullptr;
  if (avx512)
    swap_pairs(xh, reinterpret_cast<uint16_t*>(xi.data_ptr<at::BFloat16>()), M, K);
  else if (half)
    interleave(xh, xi.data_ptr<float>(), M, K);
  else
    interleave(x.data_ptr<float>(), xi.data_ptr<float>(), M, K);
  const float* xp = avx512 ? nullptr : xi.data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  float* ap = acc.data_ptr<float>();
  // bfloat16 in, bfloat16 out (rounded as .to(bfloat16) would): no float32 copies of x and y
  // around every call for the caller to make
  // (float_out: the float32 sums as they are, for tests)
  auto y = half && !float_out ? torch::empty({M, N}, x.options()) : acc;
  uint16_t* yp = half && !float_out ? reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()) : nullptr;
  // one task per 48 weight rows (whole tiles of 2, 3 or 4 rows; 6 or 8 on AVX512-BF16); the next tile's rows are prefetched
  constexpr int64_t BLOCK = 48;
  at::parallel_for(0, (N + BLOCK - 1) / BLOCK, 1, [&](int64_t lo, int64_t hi) {
    const int64_t n0 = lo * BLOCK, n1 = std::min(N, hi * BLOCK);
#ifdef SPD_HAVE_AVX512BF16
    if (avx512)
      block512(reinterpret_cast<const uint16_t*>(xi.data_ptr<at::BFloat16>()), wp, b, ap, M, K, N, n0, n1);
    else
#endif
      block(xp, wp, b, ap, M, K, N, n0, n1);
    if (yp)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = n0; n < n1; ++n) yp[m * N + n] = round_bf16(ap[m * N + n]);
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bf16_linear", &bf16_linear, "x[M,K] f32 or bf16 @ w[N,K]^T bf16 (+ bias f32) -> x's dtype (float32 where "
        "float_out), float32 accumulation, AVX2 or AVX512-BF16 (the same bits), batch invariant",
        pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("bias") = pybind11::none(),
        pybind11::arg("float_out") = false);
  m.def("isa", &isa, "which tiles bfloat16 activations take: 'avx512-bf16' or 'avx2'");
  m.def("set_isa", &set_isa, "'avx2' or 'avx512-bf16' (where the CPU has it) for all later calls");
  m.def("rowwise_attention", &rowwise_attention, "q[B,H,S,D] over k, v[B,G,N,D], keys 0..lengths[b,s]-1 per row; "
        "float32, batch invariant -> [B,S,H,D]");
}
