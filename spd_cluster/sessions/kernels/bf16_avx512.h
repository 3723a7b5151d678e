// Tiles of the AVX512-BF16 bfloat16 linear (bf16_linear.cpp, sessions/bf16.py): the same sums as
// the AVX2 tiles (bf16_linear.h), bit for bit, at twice their arithmetic per instruction.
//
// `vdpbf16ps` multiplies pairs of bfloat16 and adds both products to a float32 lane, the odd
// element's product first, rounding after each add. A product of two bfloat16 is exact in float32,
// so one `vdpbf16ps` lane step is exactly two float32 FMAs. The AVX2 tile's lane j takes, per
// 16-element block, x[2j] w[2j] then x[2j + 1] w[2j + 1] (even first); here each 32-bit word of the
// weights is rotated by 16 bits in a register and x is laid out with each pair swapped once per
// call (swap_pairs), so the even product comes first again. One zmm holds the 8 lanes of two
// weight rows over one 16-element block (two 256-bit loads), against that block of one activation
// row broadcast to both halves: every output element is the same 8-lane float32 accumulator over
// k in order as in the AVX2 tile, then the same horizontal sum, tail and bias. So the result is
// the AVX2 kernel's, bit for bit, except where an input, a product or a partial sum is subnormal
// (below 2^-126: `vdpbf16ps` flushes those to zero), and it is batch invariant for the same reason
// the AVX2 kernel is. Only bfloat16 activations take it (x is read as bfloat16 pairs); float32
// activations keep the AVX2 tiles.
//
// Compiled with a target attribute on each function, not -mavx512*: the extension builds and loads
// on an AVX2-only CPU, and bf16_linear.cpp calls these only where the CPU says it has AVX512-BF16.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "bf16_linear.h"

#if (defined(__clang__) && __clang_major__ >= 11) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 10)
#define SPD_HAVE_AVX512BF16 1
#define SPD_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#endif

namespace spd_bf16 {

// The CPU (and the OS: the zmm state) has what the tiles below need.
inline bool cpu_has_avx512bf16() {
#ifdef SPD_HAVE_AVX512BF16
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// x [M, K] bfloat16 -> xs: each pair of each whole 16-element block swapped (the layout the rotated
// weight words need); the K % 16 tail as it is (finish512 takes it element by element).
inline void swap_pairs(const uint16_t* x, uint16_t* xs, int64_t M, int64_t K) {
  const int64_t K16 = K & ~int64_t(15);
  for (int64_t m = 0; m < M; ++m) {
    const uint16_t* r = x + m * K;
    uint16_t* o = xs + m * K;
    for (int64_t k = 0; k < K16; k += 2) {
      o[k] = r[k + 1];
      o[k + 1] = r[k];
    }
    for (int64_t k = K16; k < K; ++k) o[k] = r[k];
  }
}

#ifdef SPD_HAVE_AVX512BF16

// finish() of the AVX2 tile, for one 8-lane half of a zmm accumulator: the same horizontal sum,
// then the tail and the bias in the same order.
SPD_AVX512 inline void finish512(__m256 acc, const uint16_t* xs, const uint16_t* w, const float* bias, float* y,
                                 int64_t K, int64_t N, int64_t m, int64_t n) {
  float s = hsum(acc);
  for (int64_t k = K & ~int64_t(15); k < K; ++k) s += widen1(xs[m * K + k]) * widen1(w[n * K + k]);
  if (bias) s += bias[n];
  y[m * N + n] = s;
}

SPD_AVX512 inline __m256 upper256(__m512 v) {
  return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
}

// Rows m0 .. m0 + MB of xs against weight rows n0 .. n0 + NR (MB <= 8, NR <= 8; an odd NR's last
// zmm holds its last row twice, stored once). Accumulator a{i}{p}: activation row i, weight rows
// 2p (low half) and 2p + 1 (high half). Named variables, not arrays, so they stay in registers.
#define SPD_ACC(i) __m512 a##i##0 = _mm512_setzero_ps(), a##i##1 = a##i##0, a##i##2 = a##i##0, a##i##3 = a##i##0;
#define SPD_W(p)                                                                                          \
  __m512bh w##p = w0;                                                                                     \
  if constexpr (NP > p) {                                                                                 \
    constexpr int lo = 2 * p, hi = 2 * p + 1 < NR ? 2 * p + 1 : 2 * p;                                    \
    const __m256i l = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (n0 + lo) * K + k));      \
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (n0 + hi) * K + k));      \
    w##p = (__m512bh)_mm512_rol_epi32(_mm512_inserti64x4(_mm512_castsi256_si512(l), h, 1), 16);        \
  }
#define SPD_ROW(i)                                                                                        \
  if constexpr (MB > i) {                                                                                 \
    const __m512bh xv = (__m512bh)_mm512_broadcast_i64x4(                                                 \
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs + (m0 + i) * K + k)));                    \
    a##i##0 = _mm512_dpbf16_ps(a##i##0, xv, w0);                                                          \
    if constexpr (NP > 1) a##i##1 = _mm512_dpbf16_ps(a##i##1, xv, w1);                                    \
    if constexpr (NP > 2) a##i##2 = _mm512_dpbf16_ps(a##i##2, xv, w2);                                    \
    if constexpr (NP > 3) a##i##3 = _mm512_dpbf16_ps(a##i##3, xv, w3);                                    \
  }
#define SPD_PAIR(i, p)                                                                                    \
  if constexpr (NP > p) {                                                                                 \
    finish512(_mm512_castps512_ps256(a##i##p), xs, w, bias, y, K, N, m0 + i, n0 + 2 * p);                \
    if constexpr (2 * p + 1 < NR) finish512(upper256(a##i##p), xs, w, bias, y, K, N, m0 + i, n0 + 2 * p + 1); \
  }
#define SPD_OUT(i) \
  if constexpr (MB > i) { SPD_PAIR(i, 0) SPD_PAIR(i, 1) SPD_PAIR(i, 2) SPD_PAIR(i, 3) }

template <int MB, int NR>
SPD_AVX512 inline void tile512(const uint16_t* xs, const uint16_t* w, const float* bias, float* y, int64_t K,
                               int64_t N, int64_t m0, int64_t n0) {
  static_assert(MB >= 1 && MB <= 8 && NR >= 1 && NR <= 8 && MB * ((NR + 1) / 2) <= 24, "tile shape");
  constexpr int NP = (NR + 1) / 2;
  SPD_ACC(0) SPD_ACC(1) SPD_ACC(2) SPD_ACC(3) SPD_ACC(4) SPD_ACC(5) SPD_ACC(6) SPD_ACC(7)
  const int64_t K16 = K & ~int64_t(15);
  for (int64_t k = 0; k < K16; k += 16) {
    __m512bh w0;
    {
      const __m256i l = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + n0 * K + k));
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (n0 + (NR > 1)) * K + k));
      w0 = (__m512bh)_mm512_rol_epi32(_mm512_inserti64x4(_mm512_castsi256_si512(l), h, 1), 16);
    }
    SPD_W(1) SPD_W(2) SPD_W(3)
    // the next tile's weight rows, from memory into L2 while this one computes (a prefetch never
    // faults, so rows past the last are harmless). Into L2, not L1 as the AVX2 tiles do: on these
    // EPYCs one thread then streams 20-25 GB/s instead of 14-17 (a 1536 x 8960 linear, a 1536 x
    // 151936 lm_head: -10% to -35%, one row or eight)
    for (int j = 0; j < NR; ++j) _mm_prefetch(reinterpret_cast<const char*>(w + (n0 + NR + j) * K + k), _MM_HINT_T1);
    SPD_ROW(0) SPD_ROW(1) SPD_ROW(2) SPD_ROW(3) SPD_ROW(4) SPD_ROW(5) SPD_ROW(6) SPD_ROW(7)
  }
  SPD_OUT(0) SPD_OUT(1) SPD_OUT(2) SPD_OUT(3) SPD_OUT(4) SPD_OUT(5) SPD_OUT(6) SPD_OUT(7)
}
#undef SPD_ACC
#undef SPD_W
#undef SPD_ROW
#undef SPD_PAIR
#undef SPD_OUT

// Weight rows n0 .. n1 for MB activation rows from m0: tiles of NR rows, then pairs, then one row.
template <int MB, int NR>
SPD_AVX512 inline void rows512(const uint16_t* xs, const uint16_t* w, const float* bias, float* y, int64_t K,
                               int64_t N, int64_t m0, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) tile512<MB, NR>(xs, w, bias, y, K, N, m0, n);
  for (; n + 2 <= n1; n += 2) tile512<MB, 2>(xs, w, bias, y, K, N, m0, n);
  if (n < n1) tile512<MB, 1>(xs, w, bias, y, K, N, m0, n);
}

// y[:, n0 .. n1) for all M rows of pair-swapped xs, in passes of at most 8 rows: each weight tile
// is read from memory once per pass (a verify of up to 7 tokens is one pass). Up to 24
// accumulators a tile: 8 weight rows x up to 6 activation rows, 6 x 7 or 6 x 8.
SPD_AVX512 inline void block512(const uint16_t* xs, const uint16_t* w, const float* bias, float* y, int64_t M,
                                int64_t K, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < M; m += 8) {
    switch (M - m < 8 ? M - m : 8) {
      case 1: rows512<1, 8>(xs, w, bias, y, K, N, m, n0, n1); break;
      case 2: rows512<2, 8>(xs, w, bias, y, K, N, m, n0, n1); break;
      case 3: rows512<3, 8>(xs, w, bias, y, K, N, m, n0, n1); break;
      case 4: rows512<4, 8>(xs, w, bias, y, K, N, m, n0, n1); break;
      case 5: rows512<5, 8>(xs, w, bias, y, K, N, m, n0, n1); break;
      case 6: rows512<6, 8>(xs, w, bias, y, K, N, m, n0, n1); break;
      case 7: rows512<7, 6>(xs, w, bias, y, K, N, m, n0, n1); break;
      default: rows512<8, 6>(xs, w, bias, y, K, N, m, n0, n1); break;
    }
  }
}

#endif  // SPD_HAVE_AVX512BF16

}  // namespace spd_bf16
