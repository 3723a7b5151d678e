// Tiles of the AVX2 bfloat16-weight linear (bf16_linear.cpp). No torch here, so a plain C++
// harness can time them.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace spd_bf16 {

inline float widen1(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// float32 -> bfloat16, round to nearest even as PyTorch's .to(bfloat16); NaN stays NaN (0x7fc0, the
// bits of PyTorch's scalar path; its vector path gives 0xffff)
inline uint16_t round_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Weights are read 16 bfloat16 at a time as eight 32-bit words: word j holds elements 2j (low
// half) and 2j + 1 (high half), so `word << 16` is element 2j as float32 and `word & 0xffff0000`
// is element 2j + 1, two cheap integer ops for 16 weights. The activations are laid out to match
// once per call (interleave()): per 16-block, the 8 even elements, then the 8 odd ones.
// x is float32 or bfloat16 (uint16_t, widened exactly).
inline float as_float(float v) { return v; }
inline float as_float(uint16_t v) { return widen1(v); }

template <typename T>
inline void interleave(const T* x, float* xi, int64_t M, int64_t K) {
  const int64_t K16 = K & ~int64_t(15);
  for (int64_t m = 0; m < M; ++m) {
    const T* r = x + m * K;
    float* o = xi + m * K;
    for (int64_t k = 0; k < K16; k += 16)
      for (int j = 0; j < 8; ++j) {
        o[k + j] = as_float(r[k + 2 * j]);
        o[k + 8 + j] = as_float(r[k + 2 * j + 1]);
      }
    for (int64_t k = K16; k < K; ++k) o[k] = as_float(r[k]);
  }
}

inline void finish(__m256 acc, const float* xi, const uint16_t* w, const float* bias, float* y, int64_t K,
                   int64_t N, int64_t m, int64_t n) {
  float s = hsum(acc);
  for (int64_t k = K & ~int64_t(15); k < K; ++k) s += xi[m * K + k] * widen1(w[n * K + k]);
  if (bias) s += bias[n];
  y[m * N + n] = s;
}

// Rows m0 .. m0 + MB of x against weight rows n0 .. n0 + NB (MB * NB <= 10, MB <= 5, NB <= 4). The accumulators
// are named variables, not an array, so GCC keeps them in registers.
#define SPD_ACC(i) __m256 a##i##0 = _mm256_setzero_ps(), a##i##1 = a##i##0, a##i##2 = a##i##0, a##i##3 = a##i##0;
#define SPD_ROW(i)                                                                   \
  if constexpr (MB > i) {                                                            \
    __m256 xe = _mm256_loadu_ps(xi + (m0 + i) * K + k);                              \
    __m256 xo = _mm256_loadu_ps(xi + (m0 + i) * K + k + 8);                          \
    __asm__("" : "+x"(xe), "+x"(xo)); /* keep them in registers, one load each */    \
    a##i##0 = _mm256_fmadd_ps(xo, o0, _mm256_fmadd_ps(xe, e0, a##i##0));              \
    if constexpr (NB > 1) a##i##1 = _mm256_fmadd_ps(xo, o1, _mm256_fmadd_ps(xe, e1, a##i##1)); \
    if constexpr (NB > 2) a##i##2 = _mm256_fmadd_ps(xo, o2, _mm256_fmadd_ps(xe, e2, a##i##2)); \
    if constexpr (NB > 3) a##i##3 = _mm256_fmadd_ps(xo, o3, _mm256_fmadd_ps(xe, e3, a##i##3)); \
  }
#define SPD_W(j)                                                                     \
  __m256 e##j = e0, o##j = o0;                                                       \
  if constexpr (NB > j) {                                                            \
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (n0 + j) * K + k)); \
    e##j = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));                            \
    o##j = _mm256_castsi256_ps(_mm256_and_si256(v, hi));                             \
  }
#define SPD_OUT(i)                                                                   \
  if constexpr (MB > i) {                                                            \
    finish(a##i##0, xi, w, bias, y, K, N, m0 + i, n0);                               \
    if constexpr (NB > 1) finish(a##i##1, xi, w, bias, y, K, N, m0 + i, n0 + 1);     \
    if constexpr (NB > 2) finish(a##i##2, xi, w, bias, y, K, N, m0 + i, n0 + 2);     \
    if constexpr (NB > 3) finish(a##i##3, xi, w, bias, y, K, N, m0 + i, n0 + 3);     \
  }

template <int MB, int NB>
inline void tile(const float* xi, const uint16_t* w, const float* bias, float* y, int64_t K, int64_t N,
                 int64_t m0, int64_t n0) {
  static_assert(MB >= 1 && MB <= 5 && NB >= 1 && NB <= 4 && MB * NB <= 10, "tile shape");
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  SPD_ACC(0) SPD_ACC(1) SPD_ACC(2) SPD_ACC(3) SPD_ACC(4)
  const int64_t K16 = K & ~int64_t(15);
  for (int64_t k = 0; k < K16; k += 16) {
    __m256 e0, o0;
    {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + n0 * K + k));
      e0 = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      o0 = _mm256_castsi256_ps(_mm256_and_si256(v, hi));
    }
    SPD_W(1) SPD_W(2) SPD_W(3)
    // the next tile's weight rows, from memory into L1 while this one computes (a prefetch never
    // faults, so the one past the last row is harmless)
    _mm_prefetch(reinterpret_cast<const char*>(w + (n0 + NB) * K + k), _MM_HINT_T0);
    if constexpr (NB > 1) _mm_prefetch(reinterpret_cast<const char*>(w + (n0 + NB + 1) * K + k), _MM_HINT_T0);
    if constexpr (NB > 2) _mm_prefetch(reinterpret_cast<const char*>(w + (n0 + NB + 2) * K + k), _MM_HINT_T0);
    if constexpr (NB > 3) _mm_prefetch(reinterpret_cast<const char*>(w + (n0 + NB + 3) * K + k), _MM_HINT_T0);
    SPD_ROW(0) SPD_ROW(1) SPD_ROW(2) SPD_ROW(3) SPD_ROW(4)
  }
  SPD_OUT(0) SPD_OUT(1) SPD_OUT(2) SPD_OUT(3) SPD_OUT(4)
}
#undef SPD_ACC
#undef SPD_ROW
#undef SPD_W
#undef SPD_OUT

// All rows of (interleaved) x against weight rows n0 .. n0 + NB, in blocks of at most MB rows.
template <int MB, int NB>
inline void columns(const float* xi, const uint16_t* w, const float* bias, float* y, int64_t M, int64_t K,
                    int64_t N, int64_t n0) {
  int64_t m = 0;
  for (; m + MB <= M; m += MB) tile<MB, NB>(xi, w, bias, y, K, N, m, n0);
  switch (M - m) {
    case 3: if constexpr (MB > 3) tile<3, NB>(xi, w, bias, y, K, N, m, n0); break;
    case 2: if constexpr (MB > 2) tile<2, NB>(xi, w, bias, y, K, N, m, n0); break;
    case 1: if constexpr (MB > 1) tile<1, NB>(xi, w, bias, y, K, N, m, n0); break;
    default: break;
  }
}

// y[:, n0 .. n1) for all M rows of interleaved x. Tiles hold at most 10 accumulators: 3 weight
// rows x 3 activation rows, 2 x 4, 2 x 5 (a k = 4 verify: each weight row read once for all five
// rows; two passes of 3 + 2 rows took ~5% longer), or, for a decode step (M = 1), 4 x 1.
inline void block(const float* xi, const uint16_t* w, const float* bias, float* y, int64_t M, int64_t K,
                  int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
  if (M == 1) {
    for (; n + 4 <= n1; n += 4) tile<1, 4>(xi, w, bias, y, K, N, 0, n);
  } else if (M == 5) {  // a k = 4 verify: all five rows in one pass over each weight row
    for (; n + 2 <= n1; n += 2) tile<5, 2>(xi, w, bias, y, K, N, 0, n);
  } else if (M % 4 == 0) {
    for (; n + 2 <= n1; n += 2) columns<4, 2>(xi, w, bias, y, M, K, N, n);
  } else {
    for (; n + 3 <= n1; n += 3) columns<3, 3>(xi, w, bias, y, M, K, N, n);
  }
  for (; n < n1; ++n) columns<4, 1>(xi, w, bias, y, M, K, N, n);
}

}  // namespace spd_bf16
