// Row-wise attention for few query rows (decode, verify), float32, batch invariant
// (sessions/rowwise.py). Query row s of sequence b attends to keys 0 .. lengths[b, s] - 1 of its
// own sequence, and every (b, s, head) follows one fixed sequence of operations: the scores as
// 8-lane dot products over the head dimension, then their max, exp (exp8, lane by lane) and sum
// in key order, then the weighted sum of values in key order. Rows sharing a key/value head are
// computed side by side (QB at a time), which changes no row's operations, so a row's output never
// depends on what else the call holds or how the work is split between threads: a k + 1-row
// verify computes exactly what k + 1 one-row decode steps would.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "bf16_linear.h"

namespace spd_bf16 {

// The query rows of one key/value head are computed QB at a time over each key (GQA's query
// heads and a verify's rows share the keys): a key or value vector is loaded once for QB rows, and
// QB independent accumulator chains keep the FMA units busy where one row's chain waited on its
// own latency. Each row's arithmetic is unchanged by the blocking: its score for key j is its own
// 8-lane dot product (lanes summed by hsum, then the tail), its weights are exp(score - max) in
// key order, and its output element d is the FMA sum of weight * value over keys in key order.
constexpr int64_t QB = 8;

// exp of 8 floats (Cephes' expf: a degree-6 polynomial on [-ln2/2, ln2/2] scaled by 2^n, within
// ~2 ulp; 0 below -87.3, where a softmax weight no longer counts). Lane by lane, so a value's
// result does not depend on its neighbours.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-88.0f));
  const __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  const __m256 scaled = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  return _mm256_and_ps(scaled, _mm256_cmp_ps(fx, _mm256_set1_ps(-126.f), _CMP_GE_OQ));
}

// p[0 .. n) = exp(p - max(p)) in place; returns their sum, added in key order
inline float softmax_weights(float* p, int64_t n) {
  __m256 mv = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(p + j));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mv), _mm256_extractf128_ps(mv, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  float m = _mm_cvtss_f32(m4);
  for (; j < n; ++j) m = std::max(m, p[j]);  // max is exact in any order
  const __m256 mb = _mm256_set1_ps(m);
  j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(p + j, exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j), mb)));
  if (j < n) {  // the tail through the same lanes
    alignas(32) float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t i = j; i < n; ++i) t[i - j] = p[i] - m;
    _mm256_store_ps(t, exp8(_mm256_load_ps(t)));
    for (int64_t i = j; i < n; ++i) p[i] = t[i - j];
  }
  float sum = 0.f;
  for (j = 0; j < n; ++j) sum += p[j];
  return sum;
}

// p[i * N + j] = q_i . k_j (q_i pre-scaled) for the block's QB rows and keys 0 .. n - 1
inline void block_scores(const float* qs, const float* kr, float* p, int64_t n, int64_t D, int64_t N) {
  const int64_t D8 = D & ~int64_t(7);
  for (int64_t j = 0; j < n; ++j) {
    const float* kj = kr + j * D;
    __m256 acc[QB];
    for (int64_t i = 0; i < QB; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D8; d += 8) {
      const __m256 kv = _mm256_loadu_ps(kj + d);
      for (int64_t i = 0; i < QB; ++i) acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(qs + i * D + d), kv, acc[i]);
    }
    for (int64_t i = 0; i < QB; ++i) {
      float s = hsum(acc[i]);
      for (int64_t d = D8; d < D; ++d) s += qs[i * D + d] * kj[d];
      p[i * N + j] = s;
    }
  }
}

// o_i = inv_i * sum_j p[i * N + j] * v_j over keys 0 .. n - 1 (a row's weights past its own
// length are 0, which leave its sums unchanged)
inline void block_values(const float* p, const float* vr, float* const* o, const float* inv, int64_t n, int64_t nq,
                         int64_t D, int64_t N) {
  const int64_t D8 = D & ~int64_t(7);
  for (int64_t d = 0; d < D8; d += 8) {
    __m256 acc[QB];
    for (int64_t i = 0; i < QB; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      const __m256 vv = _mm256_loadu_ps(vr + j * D + d);
      for (int64_t i = 0; i < QB; ++i) acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + i * N + j), vv, acc[i]);
    }
    for (int64_t i = 0; i < nq; ++i) _mm256_storeu_ps(o[i] + d, _mm256_mul_ps(acc[i], _mm256_set1_ps(inv[i])));
  }
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t d = D8; d < D; ++d) {
      float s = 0.f;
      for (int64_t j = 0; j < n; ++j) s = std::fma(p[i * N + j], vr[j * D + d], s);
      o[i][d] = s * inv[i];
    }
}

// q [B, H, S, D], k and v [B, G, N, D] (G key/value heads shared by H / G query heads each),
// all float32 contiguous; lengths [B, S] int64 (0 gives a zero row). Returns [B, S, H, D].
inline torch::Tensor rowwise_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                       const torch::Tensor& lengths, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes(), "q [B,H,S,D], k and v [B,G,N,D]");
  TORCH_CHECK(q.scalar_type() == torch::kFloat && k.scalar_type() == torch::kFloat && v.scalar_type() == torch::kFloat,
              "float32 q, k, v");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "contiguous q, k, v");
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3), G = k.size(1), N = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && G > 0 && H % G == 0, "q and k disagree on B, D or heads");
  TORCH_CHECK(lengths.scalar_type() == torch::kLong && lengths.dim() == 2 && lengths.size(0) == B &&
              lengths.size(1) == S, "lengths: int64 [B, S]");
  auto len = lengths.contiguous();
  const int64_t* lp = len.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * S; ++i) TORCH_CHECK(lp[i] >= 0 && lp[i] <= N, "lengths outside 0..N");
  auto out = torch::empty({B, S, H, D}, q.options());
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const int64_t Hg = H / G, Q = S * Hg, blocks = (Q + QB - 1) / QB;  // rows (s, head of group g) of each (b, g)
  at::parallel_for(0, B * G * blocks, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> p(QB * std::max<int64_t>(N, 1)), qs(QB * D);
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t b = t / (G * blocks), g = (t / blocks) % G, q0 = (t % blocks) * QB, nq = std::min(QB, Q - q0);
      const float* kr = kp + (b * G + g) * N * D;
      const float* vr = vp + (b * G + g) * N * D;
      float* o[QB];
      int64_t rows_n[QB];
      float inv[QB];
      int64_t n = 0;
      std::fill(qs.begin(), qs.end(), 0.f);  // rows past nq: zeros, computed and dropped
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t s = (q0 + i) / Hg, h = g * Hg + (q0 + i) % Hg;
        const float* qr = qp + ((b * H + h) * S + s) * D;
        for (int64_t d = 0; d < D; ++d) qs[i * D + d] = qr[d] * sc;
        o[i] = op + ((b * S + s) * H + h) * D;
        rows_n[i] = lp[b * S + s];
        n = std::max(n, rows_n[i]);
      }
      block_scores(qs.data(), kr, p.data(), n, D, N);
      for (int64_t i = 0; i < QB; ++i) {
        float* pi = p.data() + i * N;
        const int64_t ni = i < nq ? rows_n[i] : 0;
        const float sum = softmax_weights(pi, ni);
        for (int64_t j = ni; j < n; ++j) pi[j] = 0.f;
        if (i < nq) inv[i] = ni ? 1.f / sum : 0.f;
      }
      block_values(p.data(), vr, o, inv, n, nq, D, N);
    }
  });
  return out;
}

}  // namespace spd_bf16
