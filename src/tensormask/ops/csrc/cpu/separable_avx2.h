// AVX2 versions of the float32 inner loops of the separable path (align2nat_cpu.cpp), picked at run
// time when the CPU has AVX2. They compute the same sums in the same order as the portable loops
// (multiply, then add; no fused multiply-adds), so both give the same bits (tested).
//
// What they do that the portable loops cannot: the rows are short (24-96 values on the benchmark
// shapes, 41-47 on most cells' column ranges), so a compiler's vector loop spends much of its time in
// its scalar remainder. Loops that overwrite their output end with one more full vector that overlaps
// the previous one (it rewrites some values with the same result) and so have no remainder; loops
// that add into their output (axpy4) end with a masked vector. Stage A also splits its rows by column
// phase in registers (shuffles) instead of in a second pass through memory, the backward's final
// stencil interleaves its phases in registers the same way, and outputs big enough for non-temporal
// stores are stored from the registers instead of through a staging buffer. Strides R other than 1, 2
// and 4 keep the portable loops.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define TM_HAVE_AVX2_KERNELS 1
#else
#define TM_HAVE_AVX2_KERNELS 0
#endif

namespace tensormask {
namespace avx2 {

#if TM_HAVE_AVX2_KERNELS

// On when the CPU has AVX2, unless TENSORMASK_CPU_SIMD=0 (read once; the tests compare both ways).
inline bool enabled() {
  static const bool on = [] {
    const char* env = std::getenv("TENSORMASK_CPU_SIMD");
    return __builtin_cpu_supports("avx2") && !(env && std::string(env) == "0");
  }();
  return on;
}

// The phase counts R with a register shuffle below (1: no split).
inline bool supports_stride(int64_t stride) { return stride == 1 || stride == 2 || stride == 4; }

#define TM_AVX2 __attribute__((target("avx2")))

// (w0 a + w1 b) + (w2 c + w3 d), the order of the portable loops.
TM_AVX2 inline __m256 weighted4(__m256 w0, __m256 a, __m256 w1, __m256 b, __m256 w2, __m256 c, __m256 w3,
                                __m256 d) {
  return _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(w0, a), _mm256_mul_ps(w1, b)),
                       _mm256_add_ps(_mm256_mul_ps(w2, c), _mm256_mul_ps(w3, d)));
}

// Phase split of R vectors holding 8 R consecutive values v[R m + q], m = 0..7: out[q] = v[R m + q].
template <int kR>
TM_AVX2 inline void split_phases(const __m256 in[kR], __m256 out[kR]) {
  if constexpr (kR == 1) {
    out[0] = in[0];
  } else if constexpr (kR == 2) {
    // Per 128-bit lane, shuffle takes (in0 even, in1 even); the 64-bit permute restores the m order.
    out[0] = _mm256_castpd_ps(_mm256_permute4x64_pd(
        _mm256_castps_pd(_mm256_shuffle_ps(in[0], in[1], _MM_SHUFFLE(2, 0, 2, 0))), _MM_SHUFFLE(3, 1, 2, 0)));
    out[1] = _mm256_castpd_ps(_mm256_permute4x64_pd(
        _mm256_castps_pd(_mm256_shuffle_ps(in[0], in[1], _MM_SHUFFLE(3, 1, 3, 1))), _MM_SHUFFLE(3, 1, 2, 0)));
  } else {
    // A 4x4 transpose per 128-bit lane gives phase q as (m 0 2 4 6 | 1 3 5 7); the permute reorders m.
    const __m256 t0 = _mm256_unpacklo_ps(in[0], in[1]), t1 = _mm256_unpackhi_ps(in[0], in[1]);
    const __m256 t2 = _mm256_unpacklo_ps(in[2], in[3]), t3 = _mm256_unpackhi_ps(in[2], in[3]);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    out[0] = _mm256_permutevar8x32_ps(_mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)), order);
    out[1] = _mm256_permutevar8x32_ps(_mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2)), order);
    out[2] = _mm256_permutevar8x32_ps(_mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)), order);
    out[3] = _mm256_permutevar8x32_ps(_mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2)), order);
  }
}

// The inverse: R phase vectors (m = 0..7 each) into 8 R consecutive values out[R m + q].
template <int kR>
TM_AVX2 inline void merge_phases(const __m256 in[kR], __m256 out[kR]) {
  if constexpr (kR == 1) {
    out[0] = in[0];
  } else if constexpr (kR == 2) {
    const __m256 lo = _mm256_unpacklo_ps(in[0], in[1]), hi = _mm256_unpackhi_ps(in[0], in[1]);
    out[0] = _mm256_permute2f128_ps(lo, hi, 0x20);
    out[1] = _mm256_permute2f128_ps(lo, hi, 0x31);
  } else {
    const __m256 t0 = _mm256_unpacklo_ps(in[0], in[1]), t1 = _mm256_unpackhi_ps(in[0], in[1]);
    const __m256 t2 = _mm256_unpacklo_ps(in[2], in[3]), t3 = _mm256_unpackhi_ps(in[2], in[3]);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
    const __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
    const __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
    out[0] = _mm256_permute2f128_ps(u0, u1, 0x20);
    out[1] = _mm256_permute2f128_ps(u2, u3, 0x20);
    out[2] = _mm256_permute2f128_ps(u0, u1, 0x31);
    out[3] = _mm256_permute2f128_ps(u2, u3, 0x31);
  }
}

// Stage A of one A row, written phase split: A(s) = (w00 x0[s] + w01 x0[s + 1]) + (w10 x1[s] + w11 x1[s + 1])
// (x = pad outside [0, win)) for s in [-1, win), stored at ph[q * m_len + m + 1] for s = R m + q; the
// phase-row entries of s outside [-1, win) get pad. The vectors cover m in [0, m_end): 8 R values
// from s = R m0 need x up to R m0 + 8 R <= win - 1; the last vector overlaps the one before it.
template <int kR>
TM_AVX2 void stage_a_row(float* ph, const float* x0, const float* x1, int64_t win, int64_t m_len, float w00,
                         float w01, float w10, float w11, float pad) {
  const int64_t m_last = win - 1 - 8 * kR >= 0 ? (win - 1 - 8 * kR) / kR : -1;  // the last vector's m0
  const int64_t m_end = m_last >= 0 ? m_last + 8 : 0;
  const __m256 v00 = _mm256_set1_ps(w00), v01 = _mm256_set1_ps(w01), v10 = _mm256_set1_ps(w10),
               v11 = _mm256_set1_ps(w11);
  for (int64_t m0 = 0; m_end > 0; m0 = std::min<int64_t>(m0 + 8, m_end - 8)) {
    __m256 a[kR], out[kR];
    for (int k = 0; k < kR; ++k) {
      const int64_t s = kR * m0 + 8 * k;
      a[k] = weighted4(v00, _mm256_loadu_ps(x0 + s), v01, _mm256_loadu_ps(x0 + s + 1), v10,
                       _mm256_loadu_ps(x1 + s), v11, _mm256_loadu_ps(x1 + s + 1));
    }
    split_phases<kR>(a, out);
    for (int q = 0; q < kR; ++q) _mm256_storeu_ps(ph + q * m_len + m0 + 1, out[q]);
    if (m0 == m_end - 8) break;
  }
  auto at = [&](const float* row, int64_t i) { return i >= 0 && i < win ? row[i] : pad; };
  auto one = [&](int64_t m) {  // the R values at m, one by one
    for (int q = 0; q < kR; ++q) {
      const int64_t s = kR * m + q;
      ph[q * m_len + m + 1] =
          s >= -1 && s < win ? (w00 * at(x0, s) + w01 * at(x0, s + 1)) + (w10 * at(x1, s) + w11 * at(x1, s + 1))
                             : pad;
    }
  };
  one(-1);
  for (int64_t m = m_end; m + 1 < m_len; ++m) one(m);
}

inline void stage_a_row(int64_t stride, float* ph, const float* x0, const float* x1, int64_t win, int64_t m_len,
                        float w00, float w01, float w10, float w11, float pad) {
  switch (stride) {
    case 1: return stage_a_row<1>(ph, x0, x1, win, m_len, w00, w01, w10, w11, pad);
    case 2: return stage_a_row<2>(ph, x0, x1, win, m_len, w00, w01, w10, w11, pad);
    default: return stage_a_row<4>(ph, x0, x1, win, m_len, w00, w01, w10, w11, pad);
  }
}

// Lanes [0, n) set, n in [0, 8].
TM_AVX2 inline __m256i first_lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Results written once and not read again soon (outputs of 8 MiB and more, see kStreamBytes in
// align2nat_cpu.cpp) go straight from the registers to memory with non-temporal stores, in whole
// aligned vectors, when the rows are a whole number of vectors long (see `direct` in the kernels).

// `rows` rows of `outside` (row length wout, a multiple of 8; dst 32-byte aligned), non-temporal.
TM_AVX2 void fill_rows_stream(float* dst, int64_t wout, float outside, int64_t rows) {
  const __m256 value = _mm256_set1_ps(outside);
  for (int64_t i = 0; i < rows * wout; i += 8) _mm256_stream_ps(dst + i, value);
}

// The stage B vector at columns [c, c + 8) of a row whose taps exist in [xb, xe) only (a_q[j] is the tap of
// column j): masked loads for the lanes inside, pad for the others.
TM_AVX2 inline __m256 sum4_edge(const float* a0, const float* a1, const float* a2, const float* a3, __m256 v0,
                                __m256 v1, __m256 v2, __m256 v3, __m256 pad, int64_t c, int64_t xb, int64_t xe) {
  if (c + 8 <= xb || c >= xe) return pad;
  const __m256i inside = _mm256_andnot_si256(first_lanes(xb - c), first_lanes(xe - c));
  const __m256 value = weighted4(v0, _mm256_maskload_ps(a0 + c, inside), v1, _mm256_maskload_ps(a1 + c, inside), v2,
                                 _mm256_maskload_ps(a2 + c, inside), v3, _mm256_maskload_ps(a3 + c, inside));
  return _mm256_blendv_ps(pad, value, _mm256_castsi256_ps(inside));
}

// sum4_rows (below) with non-temporal stores (wout a multiple of 8, o 32-byte aligned): every vector of
// a row is written whole, its lanes outside [xb, xe) given `outside`; the taps are read only in [xb, xe)
// (masked loads at the two edges).
TM_AVX2 void sum4_rows_stream(float* o, int64_t os, const float* a0, const float* a1, const float* a2,
                              const float* a3, int64_t as, float w0, float w1, float w2, float w3, int64_t xb,
                              int64_t xe, int64_t wout, float outside, int64_t rows) {
  const __m256 v0 = _mm256_set1_ps(w0), v1 = _mm256_set1_ps(w1), v2 = _mm256_set1_ps(w2), v3 = _mm256_set1_ps(w3);
  const __m256 pad = _mm256_set1_ps(outside);
  // Every row has the same vectors: [0, lo) outside or partly inside, [lo, hi) inside, [hi, wout) the rest.
  const int64_t lo = std::min((xb + 7) / 8 * 8, wout), hi = std::max(xe / 8 * 8, lo);
  // A vector at column c reads tap c - xb: shift the tap pointers so that column c reads at [c].
  a0 -= xb, a1 -= xb, a2 -= xb, a3 -= xb;
  for (int64_t y = 0; y < rows; ++y, o += os, a0 += as, a1 += as, a2 += as, a3 += as) {
    for (int64_t c = 0; c < lo; c += 8)
      _mm256_stream_ps(o + c, sum4_edge(a0, a1, a2, a3, v0, v1, v2, v3, pad, c, xb, xe));
    for (int64_t c = lo; c < hi; c += 8)
      _mm256_stream_ps(o + c, weighted4(v0, _mm256_loadu_ps(a0 + c), v1, _mm256_loadu_ps(a1 + c), v2,
                                        _mm256_loadu_ps(a2 + c), v3, _mm256_loadu_ps(a3 + c)));
    for (int64_t c = hi; c < wout; c += 8)
      _mm256_stream_ps(o + c, sum4_edge(a0, a1, a2, a3, v0, v1, v2, v3, pad, c, xb, xe));
  }
}

// Stage B for rows rows of one output plane: row y of o (stride os) gets `outside` in columns [0, xb)
// and [xe, wout), and (w0 a0 + w1 a1) + (w2 a2 + w3 a3) over rows y of a0..a3 (stride as, element 0 at
// column xb) in [xb, xe).
TM_AVX2 void sum4_rows(float* o, int64_t os, const float* a0, const float* a1, const float* a2, const float* a3,
                       int64_t as, float w0, float w1, float w2, float w3, int64_t xb, int64_t xe, int64_t wout,
                       float outside, int64_t rows) {
  const int64_t n = xe - xb;
  const __m256 v0 = _mm256_set1_ps(w0), v1 = _mm256_set1_ps(w1), v2 = _mm256_set1_ps(w2), v3 = _mm256_set1_ps(w3);
  for (int64_t y = 0; y < rows; ++y, o += os, a0 += as, a1 += as, a2 += as, a3 += as) {
    for (int64_t i = 0; i < xb; ++i) o[i] = outside;
    float* oi = o + xb;
    if (n >= 8) {
      for (int64_t i = 0;; i = std::min<int64_t>(i + 8, n - 8)) {
        _mm256_storeu_ps(oi + i, weighted4(v0, _mm256_loadu_ps(a0 + i), v1, _mm256_loadu_ps(a1 + i), v2,
                                           _mm256_loadu_ps(a2 + i), v3, _mm256_loadu_ps(a3 + i)));
        if (i == n - 8) break;
      }
    } else {
      for (int64_t i = 0; i < n; ++i) oi[i] = (w0 * a0[i] + w1 * a1[i]) + (w2 * a2[i] + w3 * a3[i]);
    }
    for (int64_t i = xe; i < wout; ++i) o[i] = outside;
  }
}

// Stage B transposed: row y of d_q (stride ds) += w_q * row y of src (stride ss), q = 0..3, n values per row.
TM_AVX2 void axpy4_rows(float* d0, float* d1, float* d2, float* d3, int64_t ds, const float* src, int64_t ss,
                        float w0, float w1, float w2, float w3, int64_t n, int64_t rows) {
  const __m256 v0 = _mm256_set1_ps(w0), v1 = _mm256_set1_ps(w1), v2 = _mm256_set1_ps(w2), v3 = _mm256_set1_ps(w3);
  const int64_t body = n / 8 * 8;
  const __m256i tail = first_lanes(n - body);
  for (int64_t y = 0; y < rows; ++y, d0 += ds, d1 += ds, d2 += ds, d3 += ds, src += ss) {
    for (int64_t i = 0; i < body; i += 8) {
      const __m256 g = _mm256_loadu_ps(src + i);
      _mm256_storeu_ps(d0 + i, _mm256_add_ps(_mm256_loadu_ps(d0 + i), _mm256_mul_ps(v0, g)));
      _mm256_storeu_ps(d1 + i, _mm256_add_ps(_mm256_loadu_ps(d1 + i), _mm256_mul_ps(v1, g)));
      _mm256_storeu_ps(d2 + i, _mm256_add_ps(_mm256_loadu_ps(d2 + i), _mm256_mul_ps(v2, g)));
      _mm256_storeu_ps(d3 + i, _mm256_add_ps(_mm256_loadu_ps(d3 + i), _mm256_mul_ps(v3, g)));
    }
    if (body < n) {
      // Masked: a full vector would add twice into the values it overlaps.
      const __m256 g = _mm256_maskload_ps(src + body, tail);
      float* const d[4] = {d0 + body, d1 + body, d2 + body, d3 + body};
      const __m256 w[4] = {v0, v1, v2, v3};
      for (int q = 0; q < 4; ++q)
        _mm256_maskstore_ps(d[q], tail, _mm256_add_ps(_mm256_maskload_ps(d[q], tail), _mm256_mul_ps(w[q], g)));
    }
  }
}

// The backward's stage A transposed (see stencil_phases in align2nat_cpu.cpp): row y of dst (stride win)
// gets dst[s] = (w01 g0(s - 1) + w00 g0(s)) + (w11 g1(s - 1) + w10 g1(s)) for s in [0, win), with g0 the
// phase-split gA row y (at g + y gs), g1 the row before it, g(s) = g[q len + m + 1] for s = R m + q.
// Phase q of s = R j + q reads g(s - 1) from phase q - 1 at j (phase R - 1 at j - 1 for q = 0). The
// vectors cover j in [0, win / R) (8 R values each, the last overlapping), the rest goes value by value.
// With kStream (win a multiple of 8 R, dst 32-byte aligned), the vectors are stored non-temporally.
template <int kR, bool kStream>
TM_AVX2 void stencil_rows(float* dst, const float* g, int64_t gs, int64_t len, int64_t win, int64_t rows, float w01,
                          float w00, float w11, float w10) {
  const int64_t full = win / kR, j_end = full >= 8 ? full : 0;
  const __m256 v01 = _mm256_set1_ps(w01), v00 = _mm256_set1_ps(w00), v11 = _mm256_set1_ps(w11),
               v10 = _mm256_set1_ps(w10);
  for (int64_t y = 0; y < rows; ++y, dst += win, g += gs) {
    const float *g0 = g, *g1 = g - gs;
    for (int64_t j = 0; j_end > 0; j = std::min<int64_t>(j + 8, j_end - 8)) {
      __m256 phases[kR], out[kR];
      for (int q = 0; q < kR; ++q) {
        const int64_t at = q * len + j + 1, before = q > 0 ? at - len : (kR - 1) * len + j;
        phases[q] = weighted4(v01, _mm256_loadu_ps(g0 + before), v00, _mm256_loadu_ps(g0 + at), v11,
                              _mm256_loadu_ps(g1 + before), v10, _mm256_loadu_ps(g1 + at));
      }
      merge_phases<kR>(phases, out);
      for (int q = 0; q < kR; ++q) {
        if constexpr (kStream)
          _mm256_stream_ps(dst + kR * j + 8 * q, out[q]);
        else
          _mm256_storeu_ps(dst + kR * j + 8 * q, out[q]);
      }
      if (j == j_end - 8) break;
    }
    for (int64_t s = kR * j_end; s < win; ++s) {
      const int64_t j = s / kR, q = s % kR;
      const int64_t at = q * len + j + 1, before = q > 0 ? at - len : (kR - 1) * len + j;
      dst[s] = (w01 * g0[before] + w00 * g0[at]) + (w11 * g1[before] + w10 * g1[at]);
    }
  }
}

template <bool kStream>
inline void stencil_rows(int64_t stride, float* dst, const float* g, int64_t gs, int64_t len, int64_t win,
                         int64_t rows, float w01, float w00, float w11, float w10) {
  switch (stride) {
    case 1: return stencil_rows<1, kStream>(dst, g, gs, len, win, rows, w01, w00, w11, w10);
    case 2: return stencil_rows<2, kStream>(dst, g, gs, len, win, rows, w01, w00, w11, w10);
    default: return stencil_rows<4, kStream>(dst, g, gs, len, win, rows, w01, w00, w11, w10);
  }
}

#undef TM_AVX2

#else  // no AVX2 kernels on this compiler / architecture

inline bool enabled() { return false; }
inline bool supports_stride(int64_t) { return false; }

#endif

}  // namespace avx2
}  // namespace tensormask
