// Row-wise attention for few query rows (decode, verify), float32, batch invariant
// (sessions/rowwise.py). Query row s of sequence b attends to keys 0 .. lengths[b, s] - 1 of its
// own sequence; every (b, s, head) is computed alone, in one fixed order: the scores as 8-lane
// dot products over the head dimension, then max, exp and sum in key order, then the weighted
// sum of values in key order. So a row's output never depends on what else the call holds or how
// the work is split between threads: a k + 1-row verify computes exactly what k + 1 one-row
// decode steps would.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <limits>
#include <vector>

#include "bf16_linear.h"

namespace spd_bf16 {

inline float dot(const float* a, const float* b, int64_t d) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < d; ++i) s += a[i] * b[i];
  return s;
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
  at::parallel_for(0, B * S * H, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> p(N), qs(D);
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t b = i / (S * H), s = (i / H) % S, h = i % H, g = h / (H / G), n = lp[b * S + s];
      const float* qr = qp + ((b * H + h) * S + s) * D;
      const float* kr = kp + (b * G + g) * N * D;
      const float* vr = vp + (b * G + g) * N * D;
      float* o = op + ((b * S + s) * H + h) * D;
      for (int64_t d = 0; d < D; ++d) {
        qs[d] = qr[d] * sc;
        o[d] = 0.f;
      }
      if (n == 0) continue;
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < n; ++j) {
        p[j] = dot(qs.data(), kr + j * D, D);
        m = std::max(m, p[j]);
      }
      float sum = 0.f;
      for (int64_t j = 0; j < n; ++j) {
        p[j] = std::exp(p[j] - m);
        sum += p[j];
      }
      for (int64_t j = 0; j < n; ++j) {
        const float w = p[j];
        const float* vj = vr + j * D;
        for (int64_t d = 0; d < D; ++d) o[d] += w * vj[d];
      }
      const float inv = 1.f / sum;
      for (int64_t d = 0; d < D; ++d) o[d] *= inv;
    }
  });
  return out;
}

}  // namespace spd_bf16
