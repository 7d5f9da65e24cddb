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
// buffers stay in L2 (see "Separable fast path" below).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#include <type_traits>
#include <vector>

#include "../align2nat.h"

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
// The backward runs the same two stages transposed. One private A row (all cells) at a time keeps
// the working set in cache. The sum is reassociated, so float64 keeps the exact 16-term path
// (bit-identical to detectron2's order).
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
    stride = static_cast<int64_t>(p.r_hw);
    k_v.resize(p.vout);
    j_u.resize(p.uout);
    for (int64_t v = 0; v < p.vout; ++v) {
      const AxisTaps<acc_t> t0 = axis_taps(g.grid(0, v, g.half_vout), false);
      const AxisTaps<acc_t> t1 = axis_taps(g.grid(std::max<int64_t>(p.hout - 1, 0), v, g.half_vout), false);
      if (v == 0) wy[0] = t0.w_lo, wy[1] = t0.w_hi;
      const bool same_weights = t0.w_lo == wy[0] && t0.w_hi == wy[1] && t1.w_lo == wy[0] && t1.w_hi == wy[1];
      if (!same_weights || t1.lo != t0.lo + stride * std::max<int64_t>(p.hout - 1, 0)) return;
      k_v[v] = t0.lo;
      v_taps.push_back(axis_taps(g.cell(v, g.off_v), false));
    }
    for (int64_t u = 0; u < p.uout; ++u) {
      const AxisTaps<acc_t> t0 = axis_taps(g.grid(0, u, g.half_uout), false);
      const AxisTaps<acc_t> t1 = axis_taps(g.grid(std::max<int64_t>(p.wout - 1, 0), u, g.half_uout), false);
      if (u == 0) wx[0] = t0.w_lo, wx[1] = t0.w_hi;
      const bool same_weights = t0.w_lo == wx[0] && t0.w_hi == wx[1] && t1.w_lo == wx[0] && t1.w_hi == wx[1];
      if (!same_weights || t1.lo != t0.lo + stride * std::max<int64_t>(p.wout - 1, 0)) return;
      j_u[u] = t0.lo;
      u_taps.push_back(axis_taps(g.cell(u, g.off_u), false));
    }
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
};

// --- The inner loops of the separable path: contiguous, one pass each. -----------------------
// The float32 versions are compiled twice (AVX2 and the baseline ISA) and picked at load time by
// the CPU (GCC function multi-versioning), so the extension still runs on any x86-64 machine.
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

// o[i] = (w0 a0[i] + w1 a1[i]) + (w2 a2[i] + w3 a3[i]), i in [0, n): stage B, the 4 cell taps.
template <typename out_t, typename acc_t>
inline void sum4(out_t* o, const acc_t* const a[4], const acc_t w[4], int64_t n) {
  const acc_t *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3];
  for (int64_t i = 0; i < n; ++i)
    o[i] = static_cast<out_t>((w[0] * a0[i] + w[1] * a1[i]) + (w[2] * a2[i] + w[3] * a3[i]));
}
TM_SIMD_CLONES void sum4_f32(float* o, const float* a0, const float* a1, const float* a2, const float* a3, float w0,
                             float w1, float w2, float w3, int64_t n) {
  for (int64_t i = 0; i < n; ++i) o[i] = (w0 * a0[i] + w1 * a1[i]) + (w2 * a2[i] + w3 * a3[i]);
}
inline void sum4(float* o, const float* const a[4], const float w[4], int64_t n) {
  sum4_f32(o, a[0], a[1], a[2], a[3], w[0], w[1], w[2], w[3], n);
}

// d_q[i] += w_q * src[i] for q = 0..3, i in [0, n): stage B transposed, one output row into the
// phase rows of its 4 cell taps (4 distinct rows: the callers send skipped taps to scratch rows).
template <typename acc_t, typename in_t>
inline void axpy4(acc_t* const d[4], const in_t* src, const acc_t w[4], int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t g = static_cast<acc_t>(src[i]);
    d[0][i] += w[0] * g;
    d[1][i] += w[1] * g;
    d[2][i] += w[2] * g;
    d[3][i] += w[3] * g;
  }
}
TM_SIMD_CLONES void axpy4_f32(float* __restrict d0, float* __restrict d1, float* __restrict d2,
                              float* __restrict d3, const float* __restrict src, float w0, float w1, float w2,
                              float w3, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = src[i];
    d0[i] += w0 * g;
    d1[i] += w1 * g;
    d2[i] += w2 * g;
    d3[i] += w3 * g;
  }
}
inline void axpy4(float* const d[4], const float* src, const float w[4], int64_t n) {
  axpy4_f32(d[0], d[1], d[2], d[3], src, w[0], w[1], w[2], w[3], n);
}

// Phase split of rows of R * len values: phases[ph * len + j] = row[R j + ph] (split = true), or
// its inverse (split = false). R is a compile-time constant for the common lambdas so that the
// compiler turns the strided accesses into shuffles.
template <int kR>
inline void phase_copy(float* row, float* phases, int64_t len, int64_t stride, bool split) {
  const int64_t R = kR > 0 ? kR : stride;
  if (split) {
    for (int64_t j = 0; j < len; ++j)
      for (int64_t ph = 0; ph < R; ++ph) phases[ph * len + j] = row[R * j + ph];
  } else {
    for (int64_t j = 0; j < len; ++j)
      for (int64_t ph = 0; ph < R; ++ph) row[R * j + ph] = phases[ph * len + j];
  }
}
TM_SIMD_CLONES void phase_copy_f32(float* row, float* phases, int64_t len, int64_t stride, bool split) {
  switch (stride) {
    case 2: return phase_copy<2>(row, phases, len, stride, split);
    case 4: return phase_copy<4>(row, phases, len, stride, split);
    case 8: return phase_copy<8>(row, phases, len, stride, split);
    default: return phase_copy<0>(row, phases, len, stride, split);
  }
}

// Software prefetch of `bytes` bytes for reading. The separable kernels visit a short run of rows in
// each of many planes, a stride the hardware prefetcher does not follow, so they ask a few planes
// ahead for the input they will read next.
inline void prefetch_row(const void* ptr, int64_t bytes) {
  const char* p = static_cast<const char*>(ptr);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(p + i, 0, 3);
}
constexpr int64_t kPrefetchAhead = 16;  // planes ahead (8 and 16 measured alike, 4 slower)

// dst[i] = src[i], i in [0, n), for results written once and not read again soon (the kernels'
// outputs, when they are too big to stay in cache anyway: see kStreamBytes). float32 on x86 uses
// non-temporal stores, which skip reading the destination lines into the cache first and leave the
// cache to the inputs; measured 10-20% faster on the benchmark shapes, slower on small outputs.
constexpr int64_t kStreamBytes = int64_t(8) << 20;
template <typename scalar_t>
inline void store_once(scalar_t* dst, const scalar_t* src, int64_t n) {
  std::memcpy(dst, src, n * sizeof(scalar_t));
}
#if defined(__SSE2__)
inline void store_once(float* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 15) != 0; ++i) dst[i] = src[i];
  for (; i + 4 <= n; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
  for (; i < n; ++i) dst[i] = src[i];
}
inline void store_fence() { _mm_sfence(); }  // non-temporal stores are weakly ordered
#else
inline void store_fence() {}
#endif

// Layout of one A row (all cells) in the separable path, phase split: with m_len = (Win + 1) / R + 2,
// A(c, s = R m + ph) lives at [(c R + ph) m_len + m + 1], m = -1 .. (Win - 1) / R; after the cells,
// one phase row of pad values (the forward's taps outside the input read it), then 4 scratch phase
// rows (the backward sends the taps that get no gradient there). Interleaved back, the same values
// are one row per cell of R m_len entries with A(c, s) at [c R m_len + R + s].
struct PhaseLayout {
  int64_t stride, m_len, plane, pad_at, scratch_at, size;  // R, phase-row length, values per cell, ...
  PhaseLayout(int64_t r, int64_t win, int64_t cells)
      : stride(r), m_len((win + 1) / r + 2), plane(r * m_len), pad_at(cells * plane), scratch_at(pad_at + m_len),
        size(scratch_at + 4 * m_len) {}
};

// Stage B of output cell (v, u), precomputed once per call: the 4 cell taps (c, d) as offsets of
// their phase rows in the phase buffer, shifted so that element x is the tap of output column x,
// and their weights wv_c wu_d. A tap outside the input points at the pad row (forward, off); the
// backward's offsets (grad_off) send the taps that get no gradient (outside, or weight 0) to scratch.
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
          cp.off[q] = inside ? ((vs[c] * p.uin + us[d]) * lay.stride + st.ph_u[u]) * lay.m_len + shift
                             : lay.pad_at + shift;
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

// How many output rows y of each (v, u) plane one task handles: the kernels walk all the planes per
// task, so longer runs per plane give the memory system longer contiguous bursts; bounded by the
// private buffer of R Y phase-split rows (at most ~768 KB, so that it stays in a 1 MB L2; measured on
// the benchmark shapes: Y = 4 for lambda 2, 2 for lambda 4, 8 for lambda 1).
inline int64_t rows_per_task(const PhaseLayout& lay, int64_t elem_bytes) {
  const int64_t per_y = lay.stride * lay.size * elem_bytes;
  return std::min<int64_t>(8, std::max<int64_t>(1, (768 * 1024) / per_y));
}

// Output rows [y0, y1) of cell v whose A row R y + K_v lies in [ra, rz).
inline void user_rows(int64_t stride, int64_t k_v, int64_t ra, int64_t rz, int64_t hout, int64_t* y0, int64_t* y1) {
  *y0 = std::min(std::max<int64_t>(-floor_div(k_v - ra, stride), 0), hout);      // ceil((ra - K_v) / R)
  *y1 = std::max(std::min(-floor_div(k_v - rz, stride), hout), *y0);             // ceil((rz - K_v) / R)
}

// Forward, one task per block of R Y A rows (n, r = rb .. rb + R Y - 1, r from -1 to Hin-1): stage A
// for all Vin*Uin cells into a private phase-split buffer (each X plane read in one run of rows), then
// stage B as contiguous 4-row weighted sums, Y consecutive rows of every output plane per task.
template <typename scalar_t, typename acc_t>
void separable_forward(const scalar_t* x, scalar_t* out, const Align2NatParams& p, const SeparableTaps<acc_t>& st,
                       acc_t pad) {
  const int64_t cells = p.vin * p.uin, R = st.stride, plane_out = p.hout * p.wout, plane_in = p.hin * p.win;
  const PhaseLayout lay(R, p.win, cells);
  const std::vector<CellPlan<acc_t>> plans = make_cell_plans(p, st, lay, pad);
  const acc_t w00 = st.wy[0] * st.wx[0], w01 = st.wy[0] * st.wx[1], w10 = st.wy[1] * st.wx[0],
              w11 = st.wy[1] * st.wx[1];
  const std::vector<scalar_t> pad_row(p.win + 1, static_cast<scalar_t>(pad));  // an X row outside the input
  const int64_t block = R * rows_per_task(lay, sizeof(acc_t));
  const int64_t blocks = (p.hin + 1 + block - 1) / block;
  const bool stream = p.batch * p.vout * p.uout * plane_out * int64_t(sizeof(scalar_t)) >= kStreamBytes;

  at::parallel_for(0, p.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    // A rows rb .. rb + block - 1: row i phase split at [i lay.size] (+ its pad row), see PhaseLayout.
    std::vector<acc_t> phases(block * lay.size, pad);
    std::vector<acc_t> row(lay.plane, pad);  // one A row of one cell, interleaved: s at [R + s]
    std::vector<scalar_t> staged(stream ? block * p.wout : 0);  // rows of one cell (v, u), stored at once
    for (int64_t k = begin; k < end; ++k) {
      const int64_t n = k / blocks, rb = (k % blocks) * block - 1, re = std::min(rb + block, p.hin);
      for (int64_t c = 0; c < cells; ++c) {  // stage A: X rows r and r + 1 (the pad row where outside)
        const scalar_t* xp = x + (n * cells + c) * plane_in;
        if (c + kPrefetchAhead < cells) {
          const int64_t first = std::max<int64_t>(rb, 0), last = std::min(re + 1, p.hin);
          if (first < last)
            prefetch_row(xp + kPrefetchAhead * plane_in + first * p.win, (last - first) * p.win * sizeof(scalar_t));
        }
        for (int64_t r = rb; r < re; ++r) {
          const scalar_t* x0 = r >= 0 ? xp + r * p.win : pad_row.data();
          const scalar_t* x1 = r + 1 < p.hin ? xp + (r + 1) * p.win : pad_row.data();
          acc_t* ph = phases.data() + (r - rb) * lay.size + c * lay.plane;
          // R = 1 needs no phase split: write straight into the phase buffer (s at [1 + s]).
          acc_t* dst = R == 1 ? ph + 1 : row.data() + R;
          auto at = [&](const scalar_t* xr, int64_t s) {
            return (s >= 0 && s < p.win) ? static_cast<acc_t>(xr[s]) : pad;
          };
          dst[-1] = (w00 * pad + w01 * at(x0, 0)) + (w10 * pad + w11 * at(x1, 0));
          stencil2x2(dst, x0, x1, w00, w01, w10, w11, p.win - 1);
          dst[p.win - 1] = (w00 * at(x0, p.win - 1) + w01 * pad) + (w10 * at(x1, p.win - 1) + w11 * pad);
          if (R > 1) phase_copy_f32(row.data(), ph, lay.m_len, R, true);
        }
      }
      for (int64_t v = 0; v < p.vout; ++v) {  // stage B: output rows [y0, y1) of every cell (v, u)
        int64_t y0, y1;
        user_rows(R, st.k_v[v], rb, re, p.hout, &y0, &y1);
        if (y0 == y1) continue;
        scalar_t* o = out + ((n * p.vout + v) * p.uout * p.hout + y0) * p.wout;  // cell (v, 0), row y0
        const CellPlan<acc_t>* cp = plans.data() + v * p.uout;
        for (int64_t u = 0; u < p.uout; ++u, ++cp, o += plane_out) {
          const int64_t xb = cp->x_begin, xe = cp->x_end;
          const scalar_t outside = static_cast<scalar_t>(cp->outside);
          // Rows y0 .. y1-1 of cell (v, u): straight into the output, or staged for non-temporal stores.
          scalar_t* dst = stream ? staged.data() : o;
          for (int64_t y = y0; y < y1; ++y) {
            scalar_t* oy = dst + (y - y0) * p.wout;
            const acc_t* base = phases.data() + (R * y + st.k_v[v] - rb) * lay.size + xb;
            const acc_t* rows[4] = {base + cp->off[0], base + cp->off[1], base + cp->off[2], base + cp->off[3]};
            std::fill(oy, oy + xb, outside);
            sum4(oy + xb, rows, cp->w, xe - xb);
            std::fill(oy + xe, oy + p.wout, outside);
          }
          if (stream) store_once(o, staged.data(), (y1 - y0) * p.wout);
        }
      }
    }
    store_fence();
  });

  // Output rows whose A row is outside [-1, Hin) read pad only.
  at::parallel_for(0, p.batch * p.vout * p.hout, 64, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t y = k % p.hout, v = (k / p.hout) % p.vout, n = k / (p.hout * p.vout);
      const int64_t r = R * y + st.k_v[v];
      if (r >= -1 && r < p.hin) continue;
      for (int64_t u = 0; u < p.uout; ++u) {
        scalar_t* o = out + (((n * p.vout + v) * p.uout + u) * p.hout + y) * p.wout;
        std::fill(o, o + p.wout, static_cast<scalar_t>(plans[v * p.uout + u].outside));
      }
    }
  });
}

// Backward, a gather per block of R Y gA rows (n, r = rb .. rb + R Y - 1, from -1 to Hin-1): stage B
// transposed (each gA row collects, phase split, the output rows that read it, as contiguous
// multiply-adds into a private buffer, Y consecutive rows of every grad_out plane per task; then it is
// interleaved), and from each consecutive pair of gA rows, gX row r = sum_ab wy_a wx_b gA(r - a, s - b)
// (stage A transposed). gA row rb - 1 is carried over from the previous block of the same task, or
// recomputed at a task's first block. Every gA element sums its terms in the same (v, u, tap) order
// whatever the blocks, so the result does not depend on the number of threads.
template <typename scalar_t, typename acc_t>
void separable_backward(const scalar_t* grad_out, scalar_t* grad_x, const Align2NatParams& p,
                        const SeparableTaps<acc_t>& st) {
  const int64_t cells = p.vin * p.uin, R = st.stride, plane_out = p.hout * p.wout;
  const PhaseLayout lay(R, p.win, cells);
  const std::vector<CellPlan<acc_t>> plans = make_cell_plans(p, st, lay, acc_t(0));
  const acc_t w00 = st.wy[0] * st.wx[0], w01 = st.wy[0] * st.wx[1], w10 = st.wy[1] * st.wx[0],
              w11 = st.wy[1] * st.wx[1];
  const int64_t block = R * rows_per_task(lay, sizeof(acc_t));
  const int64_t blocks = (p.hin + 1 + block - 1) / block;
  const bool stream = p.batch * cells * p.hin * p.win * int64_t(sizeof(scalar_t)) >= kStreamBytes;

  at::parallel_for(0, p.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    // gA rows ra .. rz - 1, phase split: row i at [i lay.size] (R = 1: this is already the interleaved layout).
    std::vector<acc_t> split(R > 1 ? block * lay.size : 0);
    // gA rows rb - 1 .. rb + block - 1, interleaved: row i (gA row rb - 1 + i), cell c, column s at
    // [i lay.size + c plane + R + s].
    std::vector<acc_t> ga((block + 1) * lay.size);
    std::vector<scalar_t> staged(stream ? block * p.win : 0);  // gX rows of one cell, stored at once
    // gA rows [ra, rz) into ga rows starting at `dst`.
    auto ga_rows = [&](int64_t n, int64_t ra, int64_t rz, acc_t* dst) {
      acc_t* acc = R > 1 ? split.data() : dst;
      for (int64_t i = 0; i < rz - ra; ++i) std::fill(acc + i * lay.size, acc + i * lay.size + lay.pad_at, acc_t(0));
      for (int64_t v = 0; v < p.vout; ++v) {
        int64_t y0, y1;
        user_rows(R, st.k_v[v], ra, rz, p.hout, &y0, &y1);
        if (y0 == y1) continue;
        const scalar_t* go = grad_out + ((n * p.vout + v) * p.uout * p.hout + y0) * p.wout;  // cell (v, 0), row y0
        const CellPlan<acc_t>* cp = plans.data() + v * p.uout;
        for (int64_t u = 0; u < p.uout; ++u, ++cp, go += plane_out) {
          if (u + kPrefetchAhead < p.uout)
            prefetch_row(go + kPrefetchAhead * plane_out, (y1 - y0) * p.wout * sizeof(scalar_t));
          const int64_t xb = cp->x_begin, xe = cp->x_end;
          for (int64_t y = y0; y < y1; ++y) {
            acc_t* a = acc + (R * y + st.k_v[v] - ra) * lay.size + xb;
            acc_t* const d[4] = {a + cp->grad_off[0], a + cp->grad_off[1], a + cp->grad_off[2], a + cp->grad_off[3]};
            axpy4(d, go + (y - y0) * p.wout + xb, cp->w, xe - xb);
          }
        }
      }
      if (R > 1)
        for (int64_t i = 0; i < rz - ra; ++i)
          for (int64_t c = 0; c < cells; ++c)
            phase_copy_f32(dst + i * lay.size + c * lay.plane, split.data() + i * lay.size + c * lay.plane, lay.m_len,
                           R, false);
    };
    for (int64_t k = begin; k < end; ++k) {
      const int64_t n = k / blocks, rb = (k % blocks) * block - 1, re = std::min(rb + block, p.hin);
      if (rb >= 0) {  // gA row rb - 1 into ga row 0
        if (k > begin && (k - 1) / blocks == n)
          std::copy(ga.begin() + block * lay.size, ga.begin() + (block + 1) * lay.size, ga.begin());
        else
          ga_rows(n, rb - 1, rb, ga.data());
      }
      ga_rows(n, rb, re, ga.data() + lay.size);
      const int64_t first = std::max<int64_t>(rb, 0);
      for (int64_t c = 0; c < cells; ++c) {  // gX rows [first, re) of cell c (staged for non-temporal stores)
        scalar_t* gx = grad_x + ((n * cells + c) * p.hin + first) * p.win;
        scalar_t* dst = stream ? staged.data() : gx;
        for (int64_t r = first; r < re; ++r) {
          const acc_t* g0 = ga.data() + (r - rb + 1) * lay.size + c * lay.plane + R;  // gA row r: g0[s], s >= -1
          const acc_t* g1 = g0 - lay.size;                                             // gA row r - 1
          // gx[s] = (w01 g0[s-1] + w00 g0[s]) + (w11 g1[s-1] + w10 g1[s])
          stencil2x2(dst + (r - first) * p.win, g0 - 1, g1 - 1, w01, w00, w11, w10, p.win);
        }
        if (stream) store_once(gx, staged.data(), (re - first) * p.win);
      }
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
    if (separable.ok) return separable_forward(x, out, p, separable, static_cast<acc_t>(pad));
  }
  const ColumnTaps<acc_t> cols(p, g);
  const acc_t pad_acc = static_cast<acc_t>(pad);
  const int64_t rows_total = p.batch * p.vout * p.uout * p.hout;
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, p.wout));

  at::parallel_for(0, rows_total, grain, [&](int64_t row_begin, int64_t row_end) {
    // Rows of taps outside the input point here: a row of pad values, so no check is needed on y, v, u.
    const std::vector<scalar_t> pad_row(std::max<int64_t>(1, p.win), pad);
    for (int64_t r = row_begin; r < row_end; ++r) {
      int64_t t = r;
      const int64_t y = t % p.hout;
      t /= p.hout;
      const int64_t u = t % p.uout;
      t /= p.uout;
      const int64_t v = t % p.vout;
      const int64_t n = t / p.vout;
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
    if (separable.ok) return separable_backward(grad_out, grad_x, p, separable);
  }
  const ColumnTaps<acc_t> cols(p, g);
  std::vector<AxisTaps<acc_t>> v_taps(p.vout), u_taps(p.uout);
  for (int64_t v = 0; v < p.vout; ++v) v_taps[v] = axis_taps(g.cell(v, g.off_v), p.nearest);
  for (int64_t u = 0; u < p.uout; ++u) u_taps[u] = axis_taps(g.cell(u, g.off_u), p.nearest);
  // Cell coordinates are (v + 0.5) / q + off: increasing in v with slope 1 / q.
  const double cell_scale = 1.0 / p.q_vu;
  const int64_t rows_total = p.batch * p.vin * p.uin * p.hin;
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(1, p.win));

  at::parallel_for(0, rows_total, grain, [&](int64_t row_begin, int64_t row_end) {
    std::vector<acc_t> acc(std::max<int64_t>(1, p.win));
    for (int64_t r = row_begin; r < row_end; ++r) {
      int64_t t = r;
      const int64_t yi = t % p.hin;
      t /= p.hin;
      const int64_t ui = t % p.uin;
      t /= p.uin;
      const int64_t vi = t % p.vin;
      const int64_t n = t / p.vin;
      std::fill(acc.begin(), acc.end(), acc_t(0));

      int64_t v_begin, v_end, u_begin, u_end;
      candidate_range(cell_scale, 0.5 * cell_scale + p.off_v, vi, p.vout, &v_begin, &v_end);
      candidate_range(cell_scale, 0.5 * cell_scale + p.off_u, ui, p.uout, &u_begin, &u_end);
      for (int64_t v = v_begin; v < v_end; ++v) {
        const acc_t wv = v_taps[v].weight_of(vi);
        if (wv == acc_t(0)) continue;
        int64_t y_begin, y_end;
        candidate_range(p.r_hw, p.r_off * ((v + 0.5) - p.vout / 2.0), yi, p.hout, &y_begin, &y_end);
        for (int64_t u = u_begin; u < u_end; ++u) {
          const acc_t wu = u_taps[u].weight_of(ui);
          if (wu == acc_t(0)) continue;
          const int64_t* lo = cols.lo.data() + u * p.wout;
          const int64_t* hi = cols.hi.data() + u * p.wout;
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
