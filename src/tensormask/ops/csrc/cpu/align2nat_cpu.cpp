// CPU kernels of tensormask::align2nat and tensormask::align2nat_backward, parallel over rows
// (a row = the W axis of one (n, channel, y)); both backwards are gathers: every task owns the
// rows it writes and adds into them in a fixed order, so results are deterministic.
//
// Exact path (float64, nearest mode, and any geometry):
//   forward:  one task per output row (n, v, u, y): its 8 input rows (2 y-taps x 2 v-taps x
//             2 u-taps, the pad row where a tap is outside) are fixed, so the inner loop over the
//             output columns only gathers the 2 x-taps from each and sums the 16 terms in
//             detectron2's order (bit-identical to the reference); interior columns run unchecked.
//   backward: one task per input row (n, vi, ui, yi) walks the output rows that tap it.
// Separable path (float32/float16/bfloat16 bilinear whenever all outputs share their y- and
// x-weights, e.g. swap_align2nat with integer lambda and up_align2nat): 4 + 4 multiply-adds per
// output instead of 16, every inner loop contiguous (phase-split rows), in blocks of rows whose
// buffers stay in L2; plain shifted plane copies when all weights are 0 or 1 (see "Separable fast
// path" below).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <memory>
#if defined(__SSE2__)
#include <immintrin.h>
#endif
#include <type_traits>
#include <vector>

#include "../align2nat.h"
#include "../align2nat_elements.h"
#include "separable_avx2.h"

namespace tensormask {
namespace {

// x-taps of every output column, per output cell u (they depend on (x, u) only).
template <typename acc_t>
struct ColumnTaps {
  std::vector<int64_t> lo, hi;     // (Uout * Wout) input columns
  std::vector<acc_t> w_lo, w_hi;   // (Uout * Wout) weights
  std::vector<int64_t> begin, end; // (Uout) columns [begin, end) have both taps inside [0, Win)
  std::vector<char> constant;      // (Uout) same weights on every column (integer r_hw)

  ColumnTaps(const Align2NatParams& p, const Geometry<acc_t>& g)
      : lo(p.uout * p.wout), hi(p.uout * p.wout), w_lo(p.uout * p.wout), w_hi(p.uout * p.wout),
        begin(p.uout, 0), end(p.uout, 0), constant(p.uout, 1) {
    for (int64_t u = 0; u < p.uout; ++u) {
      bool any_inside = false;
      for (int64_t x = 0; x < p.wout; ++x) {
        const int64_t k = u * p.wout + x;
        const AxisTaps<acc_t> t = axis_taps(g.grid(x, u, g.half_uout), p.nearest);
        lo[k] = t.lo;
        hi[k] = t.hi;
        w_lo[k] = t.w_lo;
        w_hi[k] = t.w_hi;
        // Taps grow with x, so the columns with both taps inside form one run.
        if (t.lo >= 0 && t.hi < p.win) {
          if (!any_inside) begin[u] = x;
          any_inside = true;
          end[u] = x + 1;
        }
        if (w_lo[k] != w_lo[u * p.wout] || w_hi[k] != w_hi[u * p.wout]) constant[u] = 0;
      }
    }
  }
};

template <typename scalar_t, typename acc_t>
inline acc_t load_checked(const scalar_t* row, int64_t i, int64_t size, acc_t pad) {
  return (i >= 0 && i < size) ? static_cast<acc_t>(row[i]) : pad;
}

// The 16 bilinear terms of one output column; term k = (a, b, c, d) = (y-tap, x-tap, v-tap, u-tap)
// with k = 8a + 4b + 2c + d, summed in increasing k (detectron2's order).
template <bool kChecked, bool kConstantWeights, typename scalar_t, typename acc_t>
inline acc_t bilinear_column(const scalar_t* const rows[8], int64_t i_lo, int64_t i_hi, const acc_t* w16,
                             const acc_t wy[2], acc_t wx_lo, acc_t wx_hi, const acc_t wv[2], const acc_t wu[2],
                             int64_t win, acc_t pad) {
  acc_t sum = 0;
  for (int k = 0; k < 16; ++k) {
    const int a = k >> 3, b = (k >> 2) & 1, c = (k >> 1) & 1, d = k & 1;
    const scalar_t* row = rows[a * 4 + c * 2 + d];
    const int64_t i = b ? i_hi : i_lo;
    const acc_t value = kChecked ? load_checked(row, i, win, pad) : static_cast<acc_t>(row[i]);
    const acc_t w = kConstantWeights ? w16[k] : ((wy[a] * (b ? wx_hi : wx_lo)) * wv[c]) * wu[d];
    sum = k == 0 ? w * value : sum + w * value;
  }
  return sum;
}

// ---------------------------------------------------------------------------------------------
// Separable fast path (float32 / float16 / bfloat16 bilinear, when every output shares the same
// y- and x-weights: integer r_hw and a constant fraction of r_off * cv, as in swap_align2nat with
// integer lambda and up_align2nat). Then the 16 taps factor into
//   stage A: A(n, c, r, s) = sum_ab wy_a wx_b X(n, c, r + a, s + b)   (pad outside), r in [-1, Hin), s in [-1, Win)
//   stage B: out(n, v, u, y, x) = sum_cd wv_c wu_d A(n, (v_c, u_d), R y + K_v, R x + J_u)
// 4 + 4 multiply-adds per output instead of 16. Stage B reads A with stride R = r_hw in x; to keep
// every inner loop contiguous, A rows are stored split by column phase (s = R m + ph lives in
// phase row ph at m), so output column x of cell u reads phase row (J_u mod R) at x + floor(J_u / R).
// The backward runs the same two stages transposed. A task keeps a block of A rows of only two cell
// rows vi at a time (output cell row v reads cell rows floor(v^) and ceil(v^), which never decrease
// with v), so the working set stays in L2 while every plane is read and written in long runs. The sum
// is reassociated, so float64 keeps the exact 16-term path (bit-identical to detectron2's order).
// When every weight is 0 or 1 (lambda 1, odd S) the path reduces to plane shifts (see ShiftPlan).
// ---------------------------------------------------------------------------------------------
inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// Output columns x whose A-column R x + J lies in [-1, Win): [begin, end).
inline void a_column_range(int64_t stride, int64_t offset, int64_t win, int64_t wout, int64_t* begin, int64_t* end) {
  // R x + J >= -1  <=>  x >= ceil((-1 - J) / R);   R x + J <= Win - 1  <=>  x <= floor((Win - 1 - J) / R)
  const int64_t lo = -floor_div(1 + offset, stride);  // ceil((-1 - J) / R)
  const int64_t hi = floor_div(win - 1 - offset, stride) + 1;
  *begin = std::min(std::max<int64_t>(lo, 0), wout);
  *end = std::max(std::min(hi, wout), *begin);
}

template <typename acc_t>
struct SeparableTaps {
  bool ok = false;
  int64_t stride = 0;            // R = r_hw
  acc_t wy[2], wx[2];            // the shared spatial weights
  std::vector<int64_t> k_v, j_u; // (Vout), (Uout): A-row offset of cell v, A-column offset of cell u
  std::vector<AxisTaps<acc_t>> v_taps, u_taps;
  std::vector<int64_t> x_begin, x_end;  // (Uout): the output columns whose A column is in [-1, Win)
  std::vector<int64_t> q_u, ph_u;       // (Uout): J_u = R q_u + ph_u, 0 <= ph_u < R

  SeparableTaps(const Align2NatParams& p, const Geometry<acc_t>& g) {
    if (p.nearest || p.r_hw < 1 || std::floor(p.r_hw) != p.r_hw || p.vout * p.uout == 0) return;
    // A block of A rows is a multiple of R rows: a stride far beyond the input (which gives an output of
    // one row and column) would make its buffers huge for nothing, so such a geometry takes the exact path.
    if (p.r_hw > static_cast<double>(std::max<int64_t>(64, std::max(p.hin, p.win) + 1))) return;
    stride = static_cast<int64_t>(p.r_hw);
    if (!plan_axis(g, p.vout, p.hout, g.half_vout, g.off_v, wy, k_v, v_taps) ||
        !plan_axis(g, p.uout, p.wout, g.half_uout, g.off_u, wx, j_u, u_taps))
      return;
    x_begin.resize(p.uout);
    x_end.resize(p.uout);
    q_u.resize(p.uout);
    ph_u.resize(p.uout);
    for (int64_t u = 0; u < p.uout; ++u) {
      a_column_range(stride, j_u[u], p.win, p.wout, &x_begin[u], &x_end[u]);
      q_u[u] = floor_div(j_u[u], stride);
      ph_u[u] = j_u[u] - q_u[u] * stride;
    }
    ok = true;
  }

 private:
  // One axis (v with its output rows y, or u with its output columns x): separable when every cell's
  // spatial taps have the weights w of cell 0 and advance by R per output row. Fills the first tap of
  // each cell (K_v or J_u) and its cell taps; false when the axis is not separable.
  bool plan_axis(const Geometry<acc_t>& g, int64_t cells, int64_t out_len, acc_t half_out, acc_t off, acc_t w[2],
                 std::vector<int64_t>& first, std::vector<AxisTaps<acc_t>>& taps) {
    const int64_t last = std::max<int64_t>(out_len - 1, 0);
    first.resize(cells);
    for (int64_t c = 0; c < cells; ++c) {
      const AxisTaps<acc_t> t0 = axis_taps(g.grid(0, c, half_out), false);
      const AxisTaps<acc_t> t1 = axis_taps(g.grid(last, c, half_out), false);
      if (c == 0) w[0] = t0.w_lo, w[1] = t0.w_hi;
      const bool same_weights = t0.w_lo == w[0] && t0.w_hi == w[1] && t1.w_lo == w[0] && t1.w_hi == w[1];
      if (!same_weights || t1.lo != t0.lo + stride * last) return false;
      first[c] = t0.lo;
      taps.push_back(axis_taps(g.cell(c, off), false));
    }
    return true;
  }
};

// --- The inner loops of the separable path: contiguous, one pass each. -----------------------
// On CPUs with AVX2, the float32 ones run as the hand-vectorised loops of separable_avx2.h (R = 1, 2,
// 4; the same bits). The portable float32 versions here are compiled twice (AVX2 and the baseline ISA)
// and picked at load time (GCC function multi-versioning), so the extension runs on any x86-64 machine.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define TM_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TM_SIMD_CLONES
#endif

// dst[i] = (wa0 a[i] + wa1 a[i + 1]) + (wb0 b[i] + wb1 b[i + 1]), i in [0, n): the 2x2 spatial stencil.
template <typename out_t, typename in_t, typename acc_t>
inline void stencil2x2(out_t* dst, const in_t* a, const in_t* b, acc_t wa0, acc_t wa1, acc_t wb0, acc_t wb1,
                       int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    dst[i] = static_cast<out_t>((wa0 * static_cast<acc_t>(a[i]) + wa1 * static_cast<acc_t>(a[i + 1])) +
                                (wb0 * static_cast<acc_t>(b[i]) + wb1 * static_cast<acc_t>(b[i + 1])));
}
TM_SIMD_CLONES void stencil2x2_f32(float* dst, const float* a, const float* b, float wa0, float wa1, float wb0,
                                   float wb1, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = (wa0 * a[i] + wa1 * a[i + 1]) + (wb0 * b[i] + wb1 * b[i + 1]);
}
inline void stencil2x2(float* dst, const float* a, const float* b, float wa0, float wa1, float wb0, float wb1,
                       int64_t n) {
  stencil2x2_f32(dst, a, b, wa0, wa1, wb0, wb1, n);
}

// Row y of o (stride os) = (w0 a0 + w1 a1) + (w2 a2 + w3 a3) over the rows y of a0..a3 (stride as, element 0
// at column xb) in columns [xb, xe), `outside` in [0, xb) and [xe, wout), y in [0, rows): stage B, the 4 cell
// taps, for the run of rows of one output plane. One call per run, not per row: the rows are short (24-48
// values on the benchmark shapes), and a call per row measured ~15% slower (here and in axpy4).
template <typename out_t, typename acc_t>
inline void sum4(out_t* o, int64_t os, const acc_t* const a[4], int64_t as, const acc_t w[4], int64_t xb, int64_t xe,
                 int64_t wout, out_t outside, int64_t rows) {
  for (int64_t y = 0; y < rows; ++y) {
    const acc_t *a0 = a[0] + y * as, *a1 = a[1] + y * as, *a2 = a[2] + y * as, *a3 = a[3] + y * as;
    out_t* oy = o + y * os;
    std::fill(oy, oy + xb, outside);
    for (int64_t i = 0; i < xe - xb; ++i)
      oy[xb + i] = static_cast<out_t>((w[0] * a0[i] + w[1] * a1[i]) + (w[2] * a2[i] + w[3] * a3[i]));
    std::fill(oy + xe, oy + wout, outside);
  }
}
TM_SIMD_CLONES void sum4_f32(float* o, int64_t os, const float* a0, const float* a1, const float* a2, const float* a3,
                             int64_t as, float w0, float w1, float w2, float w3, int64_t n, int64_t rows) {
  for (int64_t y = 0; y < rows; ++y, o += os, a0 += as, a1 += as, a2 += as, a3 += as)
    for (int64_t i = 0; i < n; ++i) o[i] = (w0 * a0[i] + w1 * a1[i]) + (w2 * a2[i] + w3 * a3[i]);
}
inline void sum4(float* o, int64_t os, const float* const a[4], int64_t as, const float w[4], int64_t xb, int64_t xe,
                 int64_t wout, float outside, int64_t rows) {
#if TM_HAVE_AVX2_KERNELS
  if (avx2::enabled())
    return avx2::sum4_rows(o, os, a[0], a[1], a[2], a[3], as, w[0], w[1], w[2], w[3], xb, xe, wout, outside, rows);
#endif
  sum4_f32(o + xb, os, a[0], a[1], a[2], a[3], as, w[0], w[1], w[2], w[3], xe - xb, rows);
  if (xb > 0 || xe < wout)
    for (float* oy = o; oy < o + rows * os; oy += os) {
      std::fill(oy, oy + xb, outside);
      std::fill(oy + xe, oy + wout, outside);
    }
}

// `rows` rows of `value` (row length wout) at dst; with `nt`, non-temporal (float32 + AVX2 only, see `direct`
// in separable_forward).
template <typename scalar_t>
inline void fill_rows(scalar_t* dst, int64_t wout, scalar_t value, int64_t rows, bool nt) {
#if TM_HAVE_AVX2_KERNELS
  if constexpr (std::is_same<scalar_t, float>::value)
    if (nt) return avx2::fill_rows_stream(dst, wout, value, rows);
#endif
  std::fill(dst, dst + rows * wout, value);
}
// sum4 with non-temporal stores (float32 + AVX2 only, see `direct` in separable_forward).
template <typename scalar_t, typename acc_t>
inline void sum4_stream(scalar_t* o, int64_t os, const acc_t* const a[4], int64_t as, const acc_t w[4], int64_t xb,
                        int64_t xe, int64_t wout, scalar_t outside, int64_t rows) {
#if TM_HAVE_AVX2_KERNELS
  if constexpr (std::is_same<scalar_t, float>::value)
    return avx2::sum4_rows_stream(o, os, a[0], a[1], a[2], a[3], as, w[0], w[1], w[2], w[3], xb, xe, wout, outside,
                                  rows);
#endif
  TORCH_INTERNAL_ASSERT(false, "sum4_stream: float32 with AVX2 only");
}

// Row y of d_q (stride ds) += w_q * row y of src (stride ss) for q = 0..3, n values per row, y in [0, rows):
// stage B transposed, the run of rows of one grad_out plane into the phase rows of their 4 cell taps
// (4 distinct rows: the callers send skipped taps to scratch rows).
template <typename acc_t, typename in_t>
inline void axpy4(acc_t* const d[4], int64_t ds, const in_t* src, int64_t ss, const acc_t w[4], int64_t n,
                  int64_t rows) {
  for (int64_t y = 0; y < rows; ++y)
    for (int64_t i = 0; i < n; ++i) {
      const acc_t g = static_cast<acc_t>(src[y * ss + i]);
      d[0][y * ds + i] += w[0] * g;
      d[1][y * ds + i] += w[1] * g;
      d[2][y * ds + i] += w[2] * g;
      d[3][y * ds + i] += w[3] * g;
    }
}
TM_SIMD_CLONES void axpy4_f32(float* __restrict d0, float* __restrict d1, float* __restrict d2,
                              float* __restrict d3, int64_t ds, const float* __restrict src, int64_t ss, float w0,
                              float w1, float w2, float w3, int64_t n, int64_t rows) {
  for (int64_t y = 0; y < rows; ++y, d0 += ds, d1 += ds, d2 += ds, d3 += ds, src += ss)
    for (int64_t i = 0; i < n; ++i) {
      const float g = src[i];
      d0[i] += w0 * g;
      d1[i] += w1 * g;
      d2[i] += w2 * g;
      d3[i] += w3 * g;
    }
}
inline void axpy4(float* const d[4], int64_t ds, const float* src, int64_t ss, const float w[4], int64_t n,
                  int64_t rows) {
#if TM_HAVE_AVX2_KERNELS
  if (avx2::enabled()) return avx2::axpy4_rows(d[0], d[1], d[2], d[3], ds, src, ss, w[0], w[1], w[2], w[3], n, rows);
#endif
  axpy4_f32(d[0], d[1], d[2], d[3], ds, src, ss, w[0], w[1], w[2], w[3], n, rows);
}

// Phase split of a row of R * len values: phases[ph * len + j] = row[R j + ph]. R is a compile-time
// constant for the common lambdas so that the compiler turns the strided loads into shuffles.
template <int kR>
inline void phase_split(const float* row, float* phases, int64_t len, int64_t stride) {
  const int64_t R = kR > 0 ? kR : stride;
  for (int64_t j = 0; j < len; ++j)
    for (int64_t ph = 0; ph < R; ++ph) phases[ph * len + j] = row[R * j + ph];
}
TM_SIMD_CLONES void phase_split_f32(const float* row, float* phases, int64_t len, int64_t stride) {
  switch (stride) {
    case 2: return phase_split<2>(row, phases, len, stride);
    case 4: return phase_split<4>(row, phases, len, stride);
    case 8: return phase_split<8>(row, phases, len, stride);
    default: return phase_split<0>(row, phases, len, stride);
  }
}

// The backward's stage A transposed, read from phase-split gA rows and written interleaved, for rows
// rows of one gX plane: row y of dst (stride win) gets dst[s] = (w01 g0(s - 1) + w00 g0(s)) +
// (w11 g1(s - 1) + w10 g1(s)), s in [0, win), with g0 = gA row y (at g + y gs) and g1 = the gA row before
// it (at g0 - gs), where g(s) for s = R m + ph (m >= -1) is g[ph * len + m + 1] (the PhaseLayout of one
// cell; R = 1: g(s) = g[s + 1]). The phase-s loop is unrolled for the common R, so the interleaved stores
// become shuffles; one call per run of rows, like sum4.
template <int kR, typename out_t, typename acc_t>
inline void stencil_phases(out_t* dst, const acc_t* g, int64_t gs, int64_t len, int64_t stride, int64_t win,
                           int64_t rows, acc_t w01, acc_t w00, acc_t w11, acc_t w10) {
  const int64_t R = kR > 0 ? kR : stride, full = win / R;
  for (int64_t y = 0; y < rows; ++y, dst += win, g += gs) {
    const acc_t *g0 = g, *g1 = g - gs;
    auto value = [&](int64_t j, int64_t ph) {  // s = R j + ph; g(s - 1) is phase R - 1 at j - 1 when ph = 0
      const int64_t at = ph * len + j + 1, before = ph > 0 ? at - len : (R - 1) * len + j;
      return static_cast<out_t>((w01 * g0[before] + w00 * g0[at]) + (w11 * g1[before] + w10 * g1[at]));
    };
    for (int64_t j = 0; j < full; ++j)
      for (int64_t ph = 0; ph < R; ++ph) dst[R * j + ph] = value(j, ph);
    for (int64_t ph = 0; R * full + ph < win; ++ph) dst[R * full + ph] = value(full, ph);
  }
}
template <typename out_t, typename acc_t>
inline void stencil_phases(out_t* dst, const acc_t* g, int64_t gs, int64_t len, int64_t stride, int64_t win,
                           int64_t rows, acc_t w01, acc_t w00, acc_t w11, acc_t w10) {
  stencil_phases<0>(dst, g, gs, len, stride, win, rows, w01, w00, w11, w10);
}
TM_SIMD_CLONES void stencil_phases_f32(float* dst, const float* g, int64_t gs, int64_t len, int64_t stride,
                                       int64_t win, int64_t rows, float w01, float w00, float w11, float w10) {
  switch (stride) {
    case 1: return stencil_phases<1>(dst, g, gs, len, stride, win, rows, w01, w00, w11, w10);
    case 2: return stencil_phases<2>(dst, g, gs, len, stride, win, rows, w01, w00, w11, w10);
    case 4: return stencil_phases<4>(dst, g, gs, len, stride, win, rows, w01, w00, w11, w10);
    case 8: return stencil_phases<8>(dst, g, gs, len, stride, win, rows, w01, w00, w11, w10);
    default: return stencil_phases<0>(dst, g, gs, len, stride, win, rows, w01, w00, w11, w10);
  }
}
inline void stencil_phases(float* dst, const float* g, int64_t gs, int64_t len, int64_t stride, int64_t win,
                           int64_t rows, float w01, float w00, float w11, float w10) {
#if TM_HAVE_AVX2_KERNELS
  if (avx2::enabled() && avx2::supports_stride(stride))
    return avx2::stencil_rows<false>(stride, dst, g, gs, len, win, rows, w01, w00, w11, w10);
#endif
  stencil_phases_f32(dst, g, gs, len, stride, win, rows, w01, w00, w11, w10);
}

// stencil_phases when a spatial weight is zero (an odd stride with odd cells, e.g. up_align2nat to 15 x 15
// cells: y^ and x^ are integers, weights (1, 0)): the terms of weight zero are left out, so a NaN / inf
// in gA does not reach the neighbouring row or column through 0 * inf (docs/ops.md, "Non-finite values").
// Otherwise the same sums in the same order (portable loop only; this case is rare).
template <typename out_t, typename acc_t>
void stencil_phases_skip_zero(out_t* dst, const acc_t* g, int64_t gs, int64_t len, int64_t stride, int64_t win,
                              int64_t rows, acc_t w01, acc_t w00, acc_t w11, acc_t w10) {
  const int64_t R = stride;
  auto term = [](acc_t w, acc_t value) { return w == acc_t(0) ? acc_t(0) : w * value; };
  for (int64_t y = 0; y < rows; ++y, dst += win, g += gs) {
    const acc_t *g0 = g, *g1 = g - gs;
    for (int64_t s = 0; s < win; ++s) {
      const int64_t j = s / R, ph = s % R;
      const int64_t at = ph * len + j + 1, before = ph > 0 ? at - len : (R - 1) * len + j;
      dst[s] = static_cast<out_t>((term(w01, g0[before]) + term(w00, g0[at])) +
                                  (term(w11, g1[before]) + term(w10, g1[at])));
    }
  }
}

// stencil_phases with non-temporal stores (float32 + AVX2 only, see `direct` in separable_backward).
template <typename out_t, typename acc_t>
inline void stencil_phases_stream(out_t* dst, const acc_t* g, int64_t gs, int64_t len, int64_t stride, int64_t win,
                                  int64_t rows, acc_t w01, acc_t w00, acc_t w11, acc_t w10) {
#if TM_HAVE_AVX2_KERNELS
  if constexpr (std::is_same<out_t, float>::value)
    return avx2::stencil_rows<true>(stride, dst, g, gs, len, win, rows, w01, w00, w11, w10);
#endif
  TORCH_INTERNAL_ASSERT(false, "stencil_phases_stream: float32 with AVX2 only");
}

// Software prefetch of `bytes` bytes for reading. The separable kernels visit a run of rows in each of
// many planes, jumps the hardware prefetcher does not foresee, so they ask a few planes ahead for the
// input they will read next.
inline void prefetch_row(const void* ptr, int64_t bytes) {
  const char* p = static_cast<const char*>(ptr);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(p + i, 0, 3);
}
// How many planes ahead to prefetch when each plane is read in runs of run_bytes: about 32 KB ahead
// (16 and 64 KB measured alike, no prefetch ~15% slower).
inline int64_t prefetch_ahead(int64_t run_bytes) {
  constexpr int64_t kPrefetchBytes = 32 * 1024;
  return std::max<int64_t>(1, kPrefetchBytes / std::max<int64_t>(1, run_bytes));
}

// dst[i] = src[i], i in [0, n), for results written once and not read again soon (the kernels'
// outputs, when they are too big to stay in cache anyway: see kStreamBytes). float32 on x86 uses
// non-temporal stores, which skip reading the destination lines into the cache first and leave the
// cache to the inputs; measured 10-20% faster on the benchmark shapes, slower on small outputs.
// 32-byte stores where the CPU has AVX (picked at run time): ~3% faster fwd+bwd than 16-byte ones.
constexpr int64_t kStreamBytes = int64_t(8) << 20;
template <typename scalar_t>
inline void store_once(scalar_t* dst, const scalar_t* src, int64_t n) {
  std::memcpy(dst, src, n * sizeof(scalar_t));
}
#if defined(__SSE2__)
// n a multiple of 8, dst 32-byte aligned.
__attribute__((target("avx"))) inline void stream_avx(float* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
}
inline void store_once(float* dst, const float* src, int64_t n) {
  static const bool avx = __builtin_cpu_supports("avx");
  const int64_t width = avx ? 8 : 4;  // floats per non-temporal store, which needs an aligned dst
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & (4 * width - 1)) != 0; ++i) dst[i] = src[i];
  const int64_t body = (n - i) / width * width;
  if (avx)
    stream_avx(dst + i, src + i, body);
  else
    for (int64_t j = i; j < i + body; j += 4) _mm_stream_ps(dst + j, _mm_loadu_ps(src + j));
  for (i += body; i < n; ++i) dst[i] = src[i];
}
inline void store_fence() { _mm_sfence(); }  // non-temporal stores are weakly ordered
#else
inline void store_fence() {}
#endif

// Layout of one A row of one cell row vi (the Uin cells (vi, 0 .. Uin-1)) in the separable path, phase
// split: with m_len = (Win + 1) / R + 2, A(ui, s = R m + ph) lives at [(ui R + ph) m_len + m + 1],
// m = -1 .. (Win - 1) / R; after the cells, one phase row of pad values (the forward's taps outside the
// input read it), then 4 scratch phase rows (the backward sends the taps that get no gradient there).
struct PhaseLayout {
  int64_t stride, m_len, plane, pad_at, scratch_at, size;  // R, phase-row length, values per cell, ...
  PhaseLayout(int64_t r, int64_t win, int64_t cells)
      : stride(r), m_len((win + 1) / r + 2), plane(r * m_len), pad_at(cells * plane), scratch_at(pad_at + m_len),
        size(scratch_at + 4 * m_len) {}
};

// Stage B of output cell (v, u), precomputed once per call: the 4 cell taps (c, d) as offsets of
// their phase rows in an A row of cell row vs[c] (the v tap c), shifted so that element x is the tap of
// output column x, and their weights wv_c wu_d. A tap outside the input points at the pad row
// (forward, off); the backward's offsets (grad_off) send the taps that get no gradient (outside, or
// weight 0) to scratch.
template <typename acc_t>
struct CellPlan {
  int64_t off[4], grad_off[4];
  acc_t w[4];
  int64_t x_begin, x_end;  // the columns whose A column is in [-1, Win); the others read pad only
  acc_t outside;           // (w0 pad + w1 pad) + (w2 pad + w3 pad): the value of those columns
};

template <typename acc_t>
std::vector<CellPlan<acc_t>> make_cell_plans(const Align2NatParams& p, const SeparableTaps<acc_t>& st,
                                             const PhaseLayout& lay, acc_t pad) {
  std::vector<CellPlan<acc_t>> plans(p.vout * p.uout);
  for (int64_t v = 0; v < p.vout; ++v)
    for (int64_t u = 0; u < p.uout; ++u) {
      CellPlan<acc_t>& cp = plans[v * p.uout + u];
      const AxisTaps<acc_t>& tv = st.v_taps[v];
      const AxisTaps<acc_t>& tu = st.u_taps[u];
      const int64_t vs[2] = {tv.lo, tv.hi}, us[2] = {tu.lo, tu.hi};
      const acc_t wv[2] = {tv.w_lo, tv.w_hi}, wu[2] = {tu.w_lo, tu.w_hi};
      const int64_t shift = 1 + st.q_u[u];
      for (int c = 0; c < 2; ++c)
        for (int d = 0; d < 2; ++d) {
          const int q = c * 2 + d;
          const bool inside = vs[c] >= 0 && vs[c] < p.vin && us[d] >= 0 && us[d] < p.uin;
          cp.off[q] = inside ? (us[d] * lay.stride + st.ph_u[u]) * lay.m_len + shift : lay.pad_at + shift;
          cp.w[q] = wv[c] * wu[d];
          // Two taps with nonzero weight never share a cell (equal taps have w_hi = 0), so the 4
          // destinations of the backward are distinct rows.
          cp.grad_off[q] = inside && cp.w[q] != acc_t(0) ? cp.off[q] : lay.scratch_at + q * lay.m_len + shift;
        }
      cp.x_begin = st.x_begin[u];
      cp.x_end = st.x_end[u];
      cp.outside = (cp.w[0] * pad + cp.w[1] * pad) + (cp.w[2] * pad + cp.w[3] * pad);
    }
  return plans;
}

// The cell rows that output cell row v reads (forward) or sends gradient to (backward, nonzero weight
// only): rows[c] is the v tap c, or -1 when it is outside the input (or gets no gradient). Both taps
// lie in consecutive cell rows that never decrease with v, so the kernels walk v in order and keep
// only two cell rows of A (or gA) at a time, in the ring slot of their parity.
template <typename acc_t>
inline void tap_rows(const AxisTaps<acc_t>& tv, int64_t vin, bool nonzero_only, int64_t rows[2]) {
  const int64_t vs[2] = {tv.lo, tv.hi};
  const acc_t wv[2] = {tv.w_lo, tv.w_hi};
  for (int c = 0; c < 2; ++c)
    rows[c] = vs[c] >= 0 && vs[c] < vin && !(nonzero_only && wv[c] == acc_t(0)) ? vs[c] : -1;
}

// How many A (or gA) rows one task handles: the kernels walk all the planes per task, so longer runs
// per plane give the memory system longer contiguous bursts (the hardware prefetcher follows them);
// bounded by the private ring of 2 cell rows (at most ~768 KB, so that it stays in a 1 MB L2), a
// multiple of R, and evened out over the blocks of an image.
inline int64_t rows_per_block(const PhaseLayout& lay, int64_t elem_bytes, int64_t total) {
  const int64_t R = lay.stride, fit = (768 * 1024) / (2 * lay.size * elem_bytes);
  const int64_t blocks = (total + std::max(fit, R) - 1) / std::max(fit, R);
  const int64_t rows = (total + blocks - 1) / blocks;
  return (rows + R - 1) / R * R;
}

// Output rows [y0, y1) of cell v whose A row R y + K_v lies in [ra, rz).
inline void user_rows(int64_t stride, int64_t k_v, int64_t ra, int64_t rz, int64_t hout, int64_t* y0, int64_t* y1) {
  *y0 = std::min(std::max<int64_t>(-floor_div(k_v - ra, stride), 0), hout);      // ceil((ra - K_v) / R)
  *y1 = std::max(std::min(-floor_div(k_v - rz, stride), hout), *y0);             // ceil((rz - K_v) / R)
}

// The pure-shift case of the separable path (swap_align2nat with lambda 1 and odd S): R = 1, spatial
// weights (1, 0) and one cell tap of weight 1 per output cell, no two output cells on one input cell.
// Then out(n, v, u, y, x) = X(n, cell(v, u), y + K_v, x + J_u) (pad outside) and the backward is the
// inverse shift (0 outside): plane copies, with none of the zero-weight taps. (The general path would
// give the same values: it adds those taps times 0.)
struct ShiftPlan {
  bool ok = false;
  std::vector<int64_t> cell;    // (Vout*Uout): the input cell that output cell (v, u) copies, or -1 (pad only)
  std::vector<int64_t> source;  // (Vin*Uin): the output cell that copies input cell c, or -1 (no gradient)
};

template <typename acc_t>
ShiftPlan make_shift_plan(const Align2NatParams& p, const SeparableTaps<acc_t>& st) {
  ShiftPlan sp;
  const acc_t one(1), zero(0);
  if (st.stride != 1 || st.wy[0] != one || st.wy[1] != zero || st.wx[0] != one || st.wx[1] != zero) return sp;
  sp.cell.assign(p.vout * p.uout, -1);
  sp.source.assign(p.vin * p.uin, -1);
  for (int64_t v = 0; v < p.vout; ++v)
    for (int64_t u = 0; u < p.uout; ++u) {
      const AxisTaps<acc_t>& tv = st.v_taps[v];
      const AxisTaps<acc_t>& tu = st.u_taps[u];
      if (tv.w_lo != one || tv.w_hi != zero || tu.w_lo != one || tu.w_hi != zero) return sp;
      if (tv.lo < 0 || tv.lo >= p.vin || tu.lo < 0 || tu.lo >= p.uin) continue;
      const int64_t c = tv.lo * p.uin + tu.lo;
      if (sp.source[c] >= 0) return sp;
      sp.source[c] = v * p.uout + u;
      sp.cell[v * p.uout + u] = c;
    }
  sp.ok = true;
  return sp;
}

// dst (hd, wd) = src (hs, ws) shifted: dst[y][x] = src[y + dy][x + dx], `fill` where that is outside
// src (or everywhere when src is null). Staged and stored at once when `staged` is given.
template <typename scalar_t>
void shifted_plane(scalar_t* dst, int64_t hd, int64_t wd, const scalar_t* src, int64_t hs, int64_t ws, int64_t dy,
                   int64_t dx, scalar_t fill, scalar_t* staged) {
  scalar_t* o = staged ? staged : dst;
  const int64_t x0 = std::min(std::max<int64_t>(-dx, 0), wd), x1 = std::max(std::min(ws - dx, wd), x0);
  for (int64_t y = 0; y < hd; ++y, o += wd) {
    const int64_t r = y + dy;
    if (!src || r < 0 || r >= hs) {
      std::fill(o, o + wd, fill);
      continue;
    }
    std::fill(o, o + x0, fill);
    std::copy(src + r * ws + x0 + dx, src + r * ws + x1 + dx, o + x0);
    std::fill(o + x1, o + wd, fill);
  }
  if (staged) store_once(dst, staged, hd * wd);
}

// The shift path over all planes of one direction: dst plane i copies src plane from[i] (or -1).
template <typename scalar_t>
void shift_planes(scalar_t* dst, int64_t dst_planes, int64_t hd, int64_t wd, const scalar_t* src, int64_t src_planes,
                  int64_t hs, int64_t ws, const std::vector<int64_t>& from, const std::vector<int64_t>& dy,
                  const std::vector<int64_t>& dx, scalar_t fill, int64_t batch) {
  const bool stream = batch * dst_planes * hd * wd * int64_t(sizeof(scalar_t)) >= kStreamBytes;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, hd * wd));
  at::parallel_for(0, batch * dst_planes, grain, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> staged(stream ? hd * wd : 0);
    for (int64_t k = begin; k < end; ++k) {
      const int64_t n = k / dst_planes, i = k % dst_planes, j = from[i];
      const scalar_t* sp = j >= 0 ? src + (n * src_planes + j) * hs * ws : nullptr;
      shifted_plane(dst + k * hd * wd, hd, wd, sp, hs, ws, dy[i], dx[i], fill, stream ? staged.data() : nullptr);
    }
    store_fence();
  });
}

template <typename scalar_t, typename acc_t>
void shift_forward(const scalar_t* x, scalar_t* out, const Align2NatParams& p, const SeparableTaps<acc_t>& st,
                   const ShiftPlan& sp, acc_t pad) {
  std::vector<int64_t> dy(p.vout * p.uout), dx(p.vout * p.uout);
  for (int64_t i = 0; i < p.vout * p.uout; ++i) dy[i] = st.k_v[i / p.uout], dx[i] = st.j_u[i % p.uout];
  shift_planes(out, p.vout * p.uout, p.hout, p.wout, x, p.vin * p.uin, p.hin, p.win, sp.cell, dy, dx,
               static_cast<scalar_t>(pad), p.batch);
}

template <typename scalar_t, typename acc_t>
void shift_backward(const scalar_t* grad_out, scalar_t* grad_x, const Align2NatParams& p,
                    const SeparableTaps<acc_t>& st, const ShiftPlan& sp) {
  std::vector<int64_t> dy(p.vin * p.uin, 0), dx(p.vin * p.uin, 0);
  for (int64_t c = 0; c < p.vin * p.uin; ++c)
    if (sp.source[c] >= 0) dy[c] = -st.k_v[sp.source[c] / p.uout], dx[c] = -st.j_u[sp.source[c] % p.uout];
  shift_planes(grad_x, p.vin * p.uin, p.hin, p.win, grad_out, p.vout * p.uout, p.hout, p.wout, sp.source, dy, dx,
               static_cast<scalar_t>(0), p.batch);
}

// Forward, one task per block of A rows (n, r = rb .. re - 1, r from -1 to Hin-1): the output cell rows
// v in order, each from the two cell rows of A it reads, computed when first needed (stage A for their
// Uin cells into a private phase-split ring slot: each X plane read in one run of rows), then stage B
// as contiguous 4-row weighted sums, the block's rows of every output plane (v, u) in one run.
template <typename scalar_t, typename acc_t>
void separable_forward(const scalar_t* x, scalar_t* out, const Align2NatParams& p, const SeparableTaps<acc_t>& st,
                       acc_t pad) {
  const int64_t cells = p.vin * p.uin, R = st.stride, plane_out = p.hout * p.wout, plane_in = p.hin * p.win;
  const PhaseLayout lay(R, p.win, p.uin);
  const std::vector<CellPlan<acc_t>> plans = make_cell_plans(p, st, lay, pad);
  const acc_t w00 = st.wy[0] * st.wx[0], w01 = st.wy[0] * st.wx[1], w10 = st.wy[1] * st.wx[0],
              w11 = st.wy[1] * st.wx[1];
  const std::vector<scalar_t> pad_row(p.win + 1, static_cast<scalar_t>(pad));  // an X row outside the input
  const int64_t block = rows_per_block(lay, sizeof(acc_t), p.hin + 1);
  const int64_t blocks = (p.hin + 1 + block - 1) / block;
  const bool stream = p.batch * p.vout * p.uout * plane_out * int64_t(sizeof(scalar_t)) >= kStreamBytes;
  [[maybe_unused]] const bool simd_stage_a = avx2::enabled() && avx2::supports_stride(R);  // float32, in registers
  // float32 + AVX2 with whole-vector rows: the non-temporal stores go straight from the registers, unstaged.
  const bool direct = stream && std::is_same<scalar_t, float>::value && avx2::enabled() && p.wout % 8 == 0 &&
                      reinterpret_cast<uintptr_t>(out) % 32 == 0;

  at::parallel_for(0, p.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    // Ring slot i holds A rows rb .. rb + block - 1 of one cell row, row r at [(i block + r - rb) lay.size].
    // Stage A writes every cell's phase rows in full, so only the pad rows need a value up front.
    const std::unique_ptr<acc_t[]> ring(new acc_t[2 * block * lay.size]);
    for (int64_t i = 0; i < 2 * block; ++i)
      std::fill(ring.get() + i * lay.size + lay.pad_at, ring.get() + i * lay.size + lay.scratch_at, pad);
    std::vector<acc_t> row(lay.plane, pad);  // one A row of one cell, interleaved: s at [R + s]
    std::vector<scalar_t> staged(stream ? p.hout * p.wout : 0);  // rows of one cell (v, u), stored at once
    for (int64_t k = begin; k < end; ++k) {
      const int64_t n = k / blocks, rb = (k % blocks) * block - 1, re = std::min(rb + block, p.hin);
      int64_t held[2] = {-1, -1};  // the cell row in each ring slot
      // A rows [rb, re) of cell row vi (stage A: X rows r and r + 1, the pad row where outside).
      auto cell_row = [&](int64_t vi) {
        acc_t* slot = ring.get() + (vi & 1) * block * lay.size;
        if (held[vi & 1] == vi) return slot;
        held[vi & 1] = vi;
        for (int64_t ui = 0; ui < p.uin; ++ui) {
          const int64_t c = vi * p.uin + ui;
          const scalar_t* xp = x + (n * cells + c) * plane_in;
          const int64_t first = std::max<int64_t>(rb, 0), last = std::min(re + 1, p.hin);
          const int64_t ahead = prefetch_ahead((last - first) * p.win * sizeof(scalar_t));
          if (c + ahead < cells && first < last)
            prefetch_row(xp + ahead * plane_in + first * p.win, (last - first) * p.win * sizeof(scalar_t));
          for (int64_t r = rb; r < re; ++r) {
            const scalar_t* x0 = r >= 0 ? xp + r * p.win : pad_row.data();
            const scalar_t* x1 = r + 1 < p.hin ? xp + (r + 1) * p.win : pad_row.data();
            acc_t* ph = slot + (r - rb) * lay.size + ui * lay.plane;
#if TM_HAVE_AVX2_KERNELS
            if constexpr (std::is_same<scalar_t, float>::value) {
              if (simd_stage_a) {
                avx2::stage_a_row(R, ph, x0, x1, p.win, lay.m_len, w00, w01, w10, w11, pad);
                continue;
              }
            }
#endif
            // R = 1 needs no phase split: write straight into the slot (s at [1 + s]).
            acc_t* dst = R == 1 ? ph + 1 : row.data() + R;
            auto at = [&](const scalar_t* xr, int64_t s) {
              return (s >= 0 && s < p.win) ? static_cast<acc_t>(xr[s]) : pad;
            };
            dst[-1] = (w00 * pad + w01 * at(x0, 0)) + (w10 * pad + w11 * at(x1, 0));
            stencil2x2(dst, x0, x1, w00, w01, w10, w11, p.win - 1);
            dst[p.win - 1] = (w00 * at(x0, p.win - 1) + w01 * pad) + (w10 * at(x1, p.win - 1) + w11 * pad);
            if (R > 1) phase_split_f32(row.data(), ph, lay.m_len, R);
          }
        }
        return slot;
      };
      for (int64_t v = 0; v < p.vout; ++v) {  // stage B: output rows [y0, y1) of every cell (v, u)
        int64_t y0, y1, rows[2];
        user_rows(R, st.k_v[v], rb, re, p.hout, &y0, &y1);
        // The output rows whose A row is outside [-1, Hin) read pad only: the first block writes those
        // above its rows, the last block those below, in the same runs: rows [z0, z1) of each plane.
        const int64_t z0 = rb == -1 ? 0 : y0, z1 = re == p.hin ? p.hout : y1;
        if (z0 == z1) continue;
        tap_rows(st.v_taps[v], p.vin, false, rows);
        const bool pad_only = y0 == y1 || (rows[0] < 0 && rows[1] < 0);  // or both v taps outside
        // The taps outside the input read the pad rows of the other tap's slot.
        const acc_t* slot[2] = {nullptr, nullptr};
        if (!pad_only) {
          slot[0] = rows[0] >= 0 ? cell_row(rows[0]) : cell_row(rows[1]);
          slot[1] = rows[1] >= 0 ? cell_row(rows[1]) : slot[0];
        }
        scalar_t* o = out + ((n * p.vout + v) * p.uout * p.hout + z0) * p.wout;  // cell (v, 0), row z0
        const CellPlan<acc_t>* cp = plans.data() + v * p.uout;
        for (int64_t u = 0; u < p.uout; ++u, ++cp, o += plane_out) {
          const int64_t xb = cp->x_begin, xe = cp->x_end;
          const scalar_t outside = static_cast<scalar_t>(cp->outside);
          // Rows z0 .. z1-1 of cell (v, u): straight into the output, or staged for non-temporal stores.
          scalar_t* dst = stream && !direct ? staged.data() : o;
          if (pad_only) {
            fill_rows(dst, p.wout, outside, z1 - z0, direct);
          } else {
            fill_rows(dst, p.wout, outside, y0 - z0, direct);
            const int64_t at = (R * y0 + st.k_v[v] - rb) * lay.size + xb;  // A row R y0 + K_v, column xb
            const acc_t* taps[4] = {slot[0] + at + cp->off[0], slot[0] + at + cp->off[1],
                                    slot[1] + at + cp->off[2], slot[1] + at + cp->off[3]};
            scalar_t* oy0 = dst + (y0 - z0) * p.wout;
            if (direct)
              sum4_stream(oy0, p.wout, taps, R * lay.size, cp->w, xb, xe, p.wout, outside, y1 - y0);
            else
              sum4(oy0, p.wout, taps, R * lay.size, cp->w, xb, xe, p.wout, outside, y1 - y0);
            fill_rows(dst + (y1 - z0) * p.wout, p.wout, outside, z1 - y1, direct);
          }
          if (stream && !direct) store_once(o, staged.data(), (z1 - z0) * p.wout);
        }
      }
    }
    store_fence();
  });
}

// Backward, a gather per block of gX rows (n, r = first .. re - 1, the blocks of the forward): stage B
// transposed, then stage A transposed, walking the output cell rows v in order with a ring of two gA
// cell rows like the forward. A slot holds gA rows ra .. re - 1 (ra = max(rb - 1, -1): the block's A
// rows and the one above them, which gX row rb needs) of the Uin cells of one cell row, phase split.
// Each grad_out row of (v, u) is added (4 contiguous multiply-adds) into the gA rows of the two cell
// rows it taps; once no later v taps a cell row (all later taps are >= the v tap lo), its gX rows are
// gX(r, s) = sum_ab wy_a wx_b gA(r - a, s - b), read straight from the phase rows and written
// interleaved, each X plane in one run of rows. Cell rows that no output taps get zeros. The gA row
// above a block is recomputed, not carried over, so every gA value sums its terms in the same
// (v, u, tap) order whatever the blocks and tasks: the result does not depend on the thread count.
template <typename scalar_t, typename acc_t>
void separable_backward(const scalar_t* grad_out, scalar_t* grad_x, const Align2NatParams& p,
                        const SeparableTaps<acc_t>& st) {
  const int64_t cells = p.vin * p.uin, R = st.stride, plane_out = p.hout * p.wout, plane_in = p.hin * p.win;
  const PhaseLayout lay(R, p.win, p.uin);
  const std::vector<CellPlan<acc_t>> plans = make_cell_plans(p, st, lay, acc_t(0));
  const acc_t w00 = st.wy[0] * st.wx[0], w01 = st.wy[0] * st.wx[1], w10 = st.wy[1] * st.wx[0],
              w11 = st.wy[1] * st.wx[1];
  const int64_t block = rows_per_block(lay, sizeof(acc_t), p.hin + 1);
  const int64_t blocks = (p.hin + 1 + block - 1) / block;
  const int64_t slot_size = (block + 1) * lay.size;
  const bool stream = p.batch * cells * plane_in * int64_t(sizeof(scalar_t)) >= kStreamBytes;
  // float32 + AVX2 with rows of whole phase vectors: the non-temporal stores go straight from the registers.
  const bool zero_weight = w00 == acc_t(0) || w01 == acc_t(0) || w10 == acc_t(0) || w11 == acc_t(0);
  const bool direct = stream && std::is_same<scalar_t, float>::value && avx2::enabled() && !zero_weight &&
                      avx2::supports_stride(R) && p.win % (8 * R) == 0 && reinterpret_cast<uintptr_t>(grad_x) % 32 == 0;

  at::parallel_for(0, p.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    // Ring slot i holds gA rows ra .. re - 1 of one cell row, row r at [i slot_size + (r - ra) lay.size].
    // Its cell phase rows are zeroed when a cell row moves in. The scratch rows (where the taps that get
    // no gradient go) are only added to and never used, so they are zeroed once here (no stray NaNs or
    // denormals in the adds); the pad row is unused.
    const std::unique_ptr<acc_t[]> ring(new acc_t[2 * slot_size]);
    for (int64_t i = 0; i < 2 * (block + 1); ++i)
      std::fill(ring.get() + i * lay.size + lay.scratch_at, ring.get() + (i + 1) * lay.size, acc_t(0));
    std::vector<scalar_t> staged(stream ? block * p.win : 0);  // gX rows of one cell, stored at once
    for (int64_t k = begin; k < end; ++k) {
      const int64_t n = k / blocks, rb = (k % blocks) * block - 1, re = std::min(rb + block, p.hin);
      const int64_t ra = std::max<int64_t>(rb - 1, -1), first = std::max<int64_t>(rb, 0);
      int64_t held[2] = {-1, -1};  // the cell row in each ring slot
      int64_t done = 0;            // the cell rows below `done` have their gX rows written
      // gX rows [first, re) of the cell rows done .. vi - 1, which no output taps: zeros.
      auto zeros_below = [&](int64_t vi) {
        for (; done < vi; ++done)
          for (int64_t ui = 0; ui < p.uin; ++ui) {
            scalar_t* gx = grad_x + ((n * cells + done * p.uin + ui) * p.hin + first) * p.win;
            std::fill(gx, gx + (re - first) * p.win, scalar_t(0));
          }
      };
      // gX rows [first, re) of the cells of cell row vi, from its ring slot, which is then free.
      auto finish = [&](int64_t vi) {
        zeros_below(vi);
        const acc_t* slot = ring.get() + (vi & 1) * slot_size;
        for (int64_t ui = 0; ui < p.uin; ++ui) {
          scalar_t* gx = grad_x + ((n * cells + vi * p.uin + ui) * p.hin + first) * p.win;
          const acc_t* g = slot + (first - ra) * lay.size + ui * lay.plane;  // gA row `first` of cell (vi, ui)
          if (direct) {
            stencil_phases_stream(gx, g, lay.size, lay.m_len, R, p.win, re - first, w01, w00, w11, w10);
            continue;
          }
          scalar_t* dst = stream ? staged.data() : gx;
          if (zero_weight)
            stencil_phases_skip_zero(dst, g, lay.size, lay.m_len, R, p.win, re - first, w01, w00, w11, w10);
          else
            stencil_phases(dst, g, lay.size, lay.m_len, R, p.win, re - first, w01, w00, w11, w10);
          if (stream) store_once(gx, staged.data(), (re - first) * p.win);
        }
        held[vi & 1] = -1;
        done = vi + 1;
      };
      // The ring slot of cell row vi, zeroed when vi moves in.
      auto cell_row = [&](int64_t vi) {
        acc_t* slot = ring.get() + (vi & 1) * slot_size;
        if (held[vi & 1] == vi) return slot;
        held[vi & 1] = vi;
        for (int64_t i = 0; i < re - ra; ++i)
          std::fill(slot + i * lay.size, slot + i * lay.size + lay.pad_at, acc_t(0));
        return slot;
      };
      // The held cell rows below `limit`, finished in increasing order.
      auto finish_below = [&](int64_t limit) {
        const int64_t lo = std::min(held[0], held[1]), hi = std::max(held[0], held[1]);
        if (lo >= 0 && lo < limit) finish(lo);
        if (hi >= 0 && hi < limit) finish(hi);
      };
      for (int64_t v = 0; v < p.vout; ++v) {  // stage B transposed: grad_out rows [y0, y1) of every cell (v, u)
        finish_below(st.v_taps[v].lo);  // no later v taps a cell row below this v's lower tap
        int64_t y0, y1, rows[2];
        user_rows(R, st.k_v[v], ra, re, p.hout, &y0, &y1);
        if (y0 == y1) continue;
        tap_rows(st.v_taps[v], p.vin, true, rows);
        if (rows[0] < 0 && rows[1] < 0) continue;  // no gradient from this output cell row
        // The taps that get no gradient go to the scratch rows of the other tap's slot.
        acc_t* slot[2] = {rows[0] >= 0 ? cell_row(rows[0]) : nullptr, rows[1] >= 0 ? cell_row(rows[1]) : nullptr};
        if (!slot[0]) slot[0] = slot[1];
        if (!slot[1]) slot[1] = slot[0];
        const scalar_t* go = grad_out + ((n * p.vout + v) * p.uout * p.hout + y0) * p.wout;  // cell (v, 0), row y0
        const CellPlan<acc_t>* cp = plans.data() + v * p.uout;
        const int64_t run_bytes = (y1 - y0) * p.wout * int64_t(sizeof(scalar_t));  // rows y0 .. y1-1 of a plane
        const int64_t ahead = prefetch_ahead(run_bytes);
        for (int64_t u = 0; u < p.uout; ++u, ++cp, go += plane_out) {
          if (v * p.uout + u + ahead < p.vout * p.uout) prefetch_row(go + ahead * plane_out, run_bytes);
          const int64_t xb = cp->x_begin, xe = cp->x_end;
          const int64_t at = (R * y0 + st.k_v[v] - ra) * lay.size + xb;  // gA row R y0 + K_v, column xb
          acc_t* const d[4] = {slot[0] + at + cp->grad_off[0], slot[0] + at + cp->grad_off[1],
                               slot[1] + at + cp->grad_off[2], slot[1] + at + cp->grad_off[3]};
          axpy4(d, R * lay.size, go + xb, p.wout, cp->w, xe - xb, y1 - y0);
        }
      }
      finish_below(p.vin);
      zeros_below(p.vin);
    }
    store_fence();
  });
}

template <typename scalar_t>
void forward_kernel(const scalar_t* x, scalar_t* out, const Align2NatParams& p, scalar_t pad) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry<acc_t> g(p);
  if constexpr (!std::is_same<scalar_t, double>::value) {
    const SeparableTaps<acc_t> separable(p, g);
    if (separable.ok) {
      const ShiftPlan shift = make_shift_plan(p, separable);
      if (shift.ok) return shift_forward(x, out, p, separable, shift, static_cast<acc_t>(pad));
      return separable_forward(x, out, p, separable, static_cast<acc_t>(pad));
    }
  }
  const ColumnTaps<acc_t> cols(p, g);
  const acc_t pad_acc = static_cast<acc_t>(pad);
  const int64_t rows_total = p.batch * p.vout * p.uout * p.hout;
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, p.wout));

  at::parallel_for(0, rows_total, grain, [&](int64_t row_begin, int64_t row_end) {
    // Rows of taps outside the input point here: a row of pad values, so no check is needed on y, v, u.
    const std::vector<scalar_t> pad_row(std::max<int64_t>(1, p.win), pad);
    for (int64_t r = row_begin; r < row_end; ++r) {
      const CellIndex idx = unravel<int64_t>(r, p.vout, p.uout, p.hout, 1);
      const int64_t n = idx.n, v = idx.v, u = idx.u, y = idx.y;
      scalar_t* o = out + r * p.wout;

      const AxisTaps<acc_t> ty = axis_taps(g.grid(y, v, g.half_vout), p.nearest);
      const AxisTaps<acc_t> tv = axis_taps(g.cell(v, g.off_v), p.nearest);
      const AxisTaps<acc_t> tu = axis_taps(g.cell(u, g.off_u), p.nearest);
      const int64_t ys[2] = {ty.lo, ty.hi}, vs[2] = {tv.lo, tv.hi}, us[2] = {tu.lo, tu.hi};
      const scalar_t* rows[8];
      for (int a = 0; a < 2; ++a)
        for (int c = 0; c < 2; ++c)
          for (int d = 0; d < 2; ++d) {
            const bool inside = ys[a] >= 0 && ys[a] < p.hin && vs[c] >= 0 && vs[c] < p.vin && us[d] >= 0 &&
                                us[d] < p.uin;
            rows[a * 4 + c * 2 + d] =
                inside ? x + (((n * p.vin + vs[c]) * p.uin + us[d]) * p.hin + ys[a]) * p.win : pad_row.data();
          }
      const int64_t* lo = cols.lo.data() + u * p.wout;
      const int64_t* hi = cols.hi.data() + u * p.wout;
      const acc_t* w_lo = cols.w_lo.data() + u * p.wout;
      const acc_t* w_hi = cols.w_hi.data() + u * p.wout;
      const int64_t begin = cols.begin[u], end = cols.end[u];

      if (p.nearest) {
        const scalar_t* row = rows[0];
        for (int64_t c = 0; c < p.wout; ++c)
          o[c] = (lo[c] >= 0 && lo[c] < p.win) ? row[lo[c]] : pad;
        continue;
      }
      const acc_t wy[2] = {ty.w_lo, ty.w_hi}, wv[2] = {tv.w_lo, tv.w_hi}, wu[2] = {tu.w_lo, tu.w_hi};
      const acc_t* no_weights = nullptr;
      auto checked = [&](int64_t c) {
        o[c] = static_cast<scalar_t>(bilinear_column<true, false>(rows, lo[c], hi[c], no_weights, wy, w_lo[c], w_hi[c],
                                                                  wv, wu, p.win, pad_acc));
      };
      for (int64_t c = 0; c < begin; ++c) checked(c);
      if (cols.constant[u] && begin < end) {
        acc_t w16[16];
        for (int k = 0; k < 16; ++k) {
          const int a = k >> 3, b = (k >> 2) & 1, cc = (k >> 1) & 1, d = k & 1;
          w16[k] = ((wy[a] * (b ? w_hi[begin] : w_lo[begin])) * wv[cc]) * wu[d];
        }
        for (int64_t c = begin; c < end; ++c)
          o[c] = static_cast<scalar_t>(bilinear_column<false, true>(rows, lo[c], hi[c], w16, wy, acc_t(0), acc_t(0),
                                                                    wv, wu, p.win, pad_acc));
      } else {
        for (int64_t c = begin; c < end; ++c)
          o[c] = static_cast<scalar_t>(bilinear_column<false, false>(rows, lo[c], hi[c], no_weights, wy, w_lo[c],
                                                                     w_hi[c], wv, wu, p.win, pad_acc));
      }
      for (int64_t c = std::max(begin, end); c < p.wout; ++c) checked(c);
    }
  });
}

template <typename scalar_t>
void backward_kernel(const scalar_t* grad_out, scalar_t* grad_x, const Align2NatParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry<acc_t> g(p);
  if constexpr (!std::is_same<scalar_t, double>::value) {
    const SeparableTaps<acc_t> separable(p, g);
    if (separable.ok) {
      const ShiftPlan shift = make_shift_plan(p, separable);
      if (shift.ok) return shift_backward(grad_out, grad_x, p, separable, shift);
      return separable_backward(grad_out, grad_x, p, separable);
    }
  }
  const ColumnTaps<acc_t> cols(p, g);
  std::vector<AxisTaps<acc_t>> v_taps(p.vout), u_taps(p.uout);
  for (int64_t v = 0; v < p.vout; ++v) v_taps[v] = axis_taps(g.cell(v, g.off_v), p.nearest);
  for (int64_t u = 0; u < p.uout; ++u) u_taps[u] = axis_taps(g.cell(u, g.off_u), p.nearest);
  // Cell coordinates are (v + 0.5) / q + off: increasing in v with slope 1 / q.
  const GatherPlan<acc_t> plan(p);
  // The x taps of weight zero (the ceil tap of an integer x^, which equals its floor tap) add into a sink
  // column at Win instead, never read: a tap of weight zero passes nothing back, not even 0 * inf = NaN,
  // like every other backend (docs/ops.md, "Non-finite values").
  std::vector<int64_t> lo_g(cols.lo), hi_g(cols.hi);
  for (size_t k = 0; k < lo_g.size(); ++k) {
    if (cols.w_lo[k] == acc_t(0)) lo_g[k] = p.win;
    if (cols.w_hi[k] == acc_t(0)) hi_g[k] = p.win;
  }
  const int64_t rows_total = p.batch * p.vin * p.uin * p.hin;
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(1, p.win));

  at::parallel_for(0, rows_total, grain, [&](int64_t row_begin, int64_t row_end) {
    std::vector<acc_t> acc(p.win + 1);  // + the sink column
    for (int64_t r = row_begin; r < row_end; ++r) {
      const CellIndex idx = unravel<int64_t>(r, p.vin, p.uin, p.hin, 1);
      const int64_t n = idx.n, vi = idx.v, ui = idx.u, yi = idx.y;
      std::fill(acc.begin(), acc.end(), acc_t(0));

      int64_t v_begin, v_end, u_begin, u_end;
      tap_range(plan.cell_scale, plan.shift_v, vi, p.vout, &v_begin, &v_end);
      tap_range(plan.cell_scale, plan.shift_u, ui, p.uout, &u_begin, &u_end);
      for (int64_t v = v_begin; v < v_end; ++v) {
        const acc_t wv = v_taps[v].weight_of(vi);
        if (wv == acc_t(0)) continue;
        int64_t y_begin, y_end;
        tap_range(g.r_hw, g.r_off * ((static_cast<acc_t>(v) + static_cast<acc_t>(0.5)) - g.half_vout), yi, p.hout,
                  &y_begin, &y_end);
        for (int64_t u = u_begin; u < u_end; ++u) {
          const acc_t wu = u_taps[u].weight_of(ui);
          if (wu == acc_t(0)) continue;
          const int64_t* lo = lo_g.data() + u * p.wout;
          const int64_t* hi = hi_g.data() + u * p.wout;
          const acc_t* w_lo = cols.w_lo.data() + u * p.wout;
          const acc_t* w_hi = cols.w_hi.data() + u * p.wout;
          const int64_t begin = cols.begin[u], end = std::max(cols.begin[u], cols.end[u]);
          for (int64_t y = y_begin; y < y_end; ++y) {
            const acc_t wy = axis_taps(g.grid(y, v, g.half_vout), p.nearest).weight_of(yi);
            if (wy == acc_t(0)) continue;
            const scalar_t* go = grad_out + (((n * p.vout + v) * p.uout + u) * p.hout + y) * p.wout;
            const acc_t w = (wy * wv) * wu;
            auto add_checked = [&](int64_t c) {
              const acc_t gw = w * static_cast<acc_t>(go[c]);
              if (lo[c] >= 0 && lo[c] < p.win) acc[lo[c]] += w_lo[c] * gw;
              if (!p.nearest && hi[c] >= 0 && hi[c] < p.win) acc[hi[c]] += w_hi[c] * gw;
            };
            for (int64_t c = 0; c < begin; ++c) add_checked(c);
            if (p.nearest) {
              for (int64_t c = begin; c < end; ++c) acc[lo[c]] += w * static_cast<acc_t>(go[c]);
            } else {
              for (int64_t c = begin; c < end; ++c) {
                const acc_t gw = w * static_cast<acc_t>(go[c]);
                acc[lo[c]] += w_lo[c] * gw;
                acc[hi[c]] += w_hi[c] * gw;
              }
            }
            for (int64_t c = end; c < p.wout; ++c) add_checked(c);
          }
        }
      }
      scalar_t* gx = grad_x + r * p.win;
      for (int64_t c = 0; c < p.win; ++c) gx[c] = static_cast<scalar_t>(acc[c]);
    }
  });
}

at::Tensor align2nat_cpu(const at::Tensor& x, at::IntArrayRef in_cells, at::IntArrayRef out_cells,
                         at::IntArrayRef out_size, double unit_hw, double unit_vu, double aligned_unit_hw,
                         double aligned_unit_vu, double pad_val, c10::string_view mode) {
  const Align2NatParams p =
      make_params(x, false, in_cells, out_cells, out_size, unit_hw, unit_vu, aligned_unit_hw, aligned_unit_vu, mode);
  at::Tensor out = at::empty({p.batch, p.vout * p.uout, p.hout, p.wout}, x.options());
  if (out.numel() == 0) return out;
  const at::Tensor xc = x.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "align2nat_cpu", [&] {
    forward_kernel<scalar_t>(xc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), p,
                             static_cast<scalar_t>(pad_val));
  });
  return out;
}

at::Tensor align2nat_backward_cpu(const at::Tensor& grad_out, at::IntArrayRef in_cells, at::IntArrayRef out_cells,
                                  at::IntArrayRef in_size, double unit_hw, double unit_vu, double aligned_unit_hw,
                                  double aligned_unit_vu, c10::string_view mode) {
  const Align2NatParams p = make_params(grad_out, true, in_cells, out_cells, in_size, unit_hw, unit_vu,
                                        aligned_unit_hw, aligned_unit_vu, mode);
  at::Tensor grad_x = at::empty({p.batch, p.vin * p.uin, p.hin, p.win}, grad_out.options());
  if (grad_x.numel() == 0) return grad_x;
  if (grad_out.numel() == 0) return grad_x.zero_();
  const at::Tensor gc = grad_out.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "align2nat_backward_cpu", [&] {
    backward_kernel<scalar_t>(gc.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(), p);
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(tensormask, CPU, m) {
  m.impl("align2nat", &align2nat_cpu);
  m.impl("align2nat_backward", &align2nat_backward_cpu);
}

}  // namespace tensormask
