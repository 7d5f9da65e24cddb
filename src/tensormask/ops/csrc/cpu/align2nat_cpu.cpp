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
// output instead of 16, in row blocks that stay in cache (see SeparableTaps below).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
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
// 4 + 4 multiply-adds per output instead of 16, vectorisable loops, and one private A row (all cells)
// at a time so that the working set stays in cache. The sum is reassociated, so float64 keeps the
// exact 16-term path (bit-identical to detectron2's order).
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
    for (int64_t u = 0; u < p.uout; ++u) a_column_range(stride, j_u[u], p.win, p.wout, &x_begin[u], &x_end[u]);
    ok = true;
  }
};

// o[x] = sum_q w[q] * a[q][R x] for x in [begin, end); kStride = R as a constant (0: runtime R) so
// that the compiler can vectorise the strided loads.
template <int kStride, typename scalar_t, typename acc_t>
inline void gather4(scalar_t* o, const acc_t* const a[4], const acc_t w[4], int64_t begin, int64_t end,
                    int64_t stride) {
  const int64_t R = kStride > 0 ? kStride : stride;
  const acc_t *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3];
  const acc_t w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
  for (int64_t xx = begin; xx < end; ++xx)
    o[xx] = static_cast<scalar_t>((w0 * a0[R * xx] + w1 * a1[R * xx]) + (w2 * a2[R * xx] + w3 * a3[R * xx]));
}

// f(std::integral_constant<int, R>) for the common strides R (lambda of swap_align2nat), else R = 0 (runtime).
template <typename F>
inline void with_stride(int64_t stride, F&& f) {
  switch (stride) {
    case 1: return f(std::integral_constant<int, 1>());
    case 2: return f(std::integral_constant<int, 2>());
    case 4: return f(std::integral_constant<int, 4>());
    case 8: return f(std::integral_constant<int, 8>());
    default: return f(std::integral_constant<int, 0>());
  }
}

// The output rows (n, v, u, y) that read A row r: those of the cells v with R y + K_v = r.
// Visits (v, y) in increasing v.
template <typename acc_t, typename F>
inline void for_each_user_row(const SeparableTaps<acc_t>& st, int64_t r, int64_t hout, F&& visit) {
  for (int64_t v = 0; v < static_cast<int64_t>(st.k_v.size()); ++v) {
    const int64_t dy = r - st.k_v[v];
    if (dy < 0 || dy % st.stride != 0 || dy / st.stride >= hout) continue;
    visit(v, dy / st.stride);
  }
}

// Forward, one task per A row (n, r), r = -1 .. Hin-1: stage A for all Vin*Uin cells into a private
// (L2-resident) buffer, then stage B for every output row that reads it (each reads exactly one r).
template <typename scalar_t, typename acc_t>
void separable_forward(const scalar_t* x, scalar_t* out, const Align2NatParams& p, const SeparableTaps<acc_t>& st,
                       acc_t pad) {
  const int64_t ah = p.hin + 1, aw = p.win + 1, cells = p.vin * p.uin, stride = st.stride;
  const acc_t w00 = st.wy[0] * st.wx[0], w01 = st.wy[0] * st.wx[1], w10 = st.wy[1] * st.wx[0],
              w11 = st.wy[1] * st.wx[1];
  const std::vector<scalar_t> pad_row(p.win + 1, static_cast<scalar_t>(pad));

  // An A row of pad values (s = -1 .. Win-1), read for the cells and rows outside the input.
  const std::vector<acc_t> a_pad_row(aw, pad);
  const acc_t* const a_pad = a_pad_row.data() + 1;

  // One output row of cell (v, u) from the A rows of its 4 cell taps. Columns whose A column is
  // outside [-1, Win) read pad in all 4 taps.
  auto output_row = [&](scalar_t* o, const acc_t* const rows[4], const acc_t w[4], int64_t u) {
    const int64_t j = st.j_u[u], x_begin = st.x_begin[u], x_end = st.x_end[u];
    const scalar_t all_pad = static_cast<scalar_t>((w[0] * pad + w[1] * pad) + (w[2] * pad + w[3] * pad));
    std::fill(o, o + x_begin, all_pad);
    const acc_t* a4[4] = {rows[0] + j, rows[1] + j, rows[2] + j, rows[3] + j};
    with_stride(stride, [&](auto k) { gather4<decltype(k)::value>(o, a4, w, x_begin, x_end, stride); });
    std::fill(o + x_end, o + p.wout, all_pad);
  };
  // The A rows (in a_rows, the A buffer of one row r; nullptr: r outside) and weights of cell (v, u).
  auto cell_rows = [&](int64_t v, int64_t u, const acc_t* a_rows, const acc_t* rows[4], acc_t w[4]) {
    const AxisTaps<acc_t>& tv = st.v_taps[v];
    const AxisTaps<acc_t>& tu = st.u_taps[u];
    const int64_t vs[2] = {tv.lo, tv.hi}, us[2] = {tu.lo, tu.hi};
    const acc_t wv[2] = {tv.w_lo, tv.w_hi}, wu[2] = {tu.w_lo, tu.w_hi};
    for (int c = 0; c < 2; ++c)
      for (int d = 0; d < 2; ++d) {
        const bool inside = a_rows && vs[c] >= 0 && vs[c] < p.vin && us[d] >= 0 && us[d] < p.uin;
        rows[c * 2 + d] = inside ? a_rows + (vs[c] * p.uin + us[d]) * aw + 1 : a_pad;
        w[c * 2 + d] = wv[c] * wu[d];
      }
  };

  at::parallel_for(0, p.batch * ah, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> a_buf(cells * aw);  // A(n, c, r, s) at [c * aw + s + 1]
    for (int64_t k = begin; k < end; ++k) {
      const int64_t n = k / ah, r = k % ah - 1;
      for (int64_t c = 0; c < cells; ++c) {  // stage A: X rows r and r + 1 (the pad row where outside)
        const scalar_t* xp = x + (n * cells + c) * p.hin * p.win;
        const scalar_t* x0 = r >= 0 ? xp + r * p.win : pad_row.data();
        const scalar_t* x1 = r + 1 < p.hin ? xp + (r + 1) * p.win : pad_row.data();
        acc_t* dst = a_buf.data() + c * aw + 1;
        auto at = [&](const scalar_t* row, int64_t s) {
          return (s >= 0 && s < p.win) ? static_cast<acc_t>(row[s]) : pad;
        };
        dst[-1] = (w00 * pad + w01 * at(x0, 0)) + (w10 * pad + w11 * at(x1, 0));
        for (int64_t s = 0; s + 1 < p.win; ++s)
          dst[s] = (w00 * static_cast<acc_t>(x0[s]) + w01 * static_cast<acc_t>(x0[s + 1])) +
                   (w10 * static_cast<acc_t>(x1[s]) + w11 * static_cast<acc_t>(x1[s + 1]));
        dst[p.win - 1] = (w00 * at(x0, p.win - 1) + w01 * pad) + (w10 * at(x1, p.win - 1) + w11 * pad);
      }
      for_each_user_row(st, r, p.hout, [&](int64_t v, int64_t y) {  // stage B
        for (int64_t u = 0; u < p.uout; ++u) {
          const acc_t* rows[4];
          acc_t w[4];
          cell_rows(v, u, a_buf.data(), rows, w);
          output_row(out + (((n * p.vout + v) * p.uout + u) * p.hout + y) * p.wout, rows, w, u);
        }
      });
    }
  });

  // Output rows whose A row is outside [-1, Hin) read pad only.
  at::parallel_for(0, p.batch * p.vout * p.hout, 64, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t y = k % p.hout, v = (k / p.hout) % p.vout, n = k / (p.hout * p.vout);
      const int64_t r = stride * y + st.k_v[v];
      if (r >= -1 && r < p.hin) continue;
      for (int64_t u = 0; u < p.uout; ++u) {
        const acc_t* rows[4];
        acc_t w[4];
        cell_rows(v, u, nullptr, rows, w);
        output_row(out + (((n * p.vout + v) * p.uout + u) * p.hout + y) * p.wout, rows, w, u);
      }
    }
  });
}

// Backward, a gather per block of input rows (n, rows [r0, r1)): gA rows r0-1 .. r1-1 (stage B
// transposed: each gA row r collects the output rows that read it, in a private buffer), and from
// each consecutive pair, gX row r = sum_ab wy_a wx_b gA(r - a, s - b) (stage A transposed).
template <typename scalar_t, typename acc_t>
void separable_backward(const scalar_t* grad_out, scalar_t* grad_x, const Align2NatParams& p,
                        const SeparableTaps<acc_t>& st) {
  const int64_t aw = p.win + 1, cells = p.vin * p.uin, stride = st.stride;
  const acc_t w00 = st.wy[0] * st.wx[0], w01 = st.wy[0] * st.wx[1], w10 = st.wy[1] * st.wx[0],
              w11 = st.wy[1] * st.wx[1];
  constexpr int64_t kBlock = 16;
  const int64_t blocks = (p.hin + kBlock - 1) / kBlock;
  const int64_t m_len = (p.win + 1) / stride + 2;  // m = -1 .. (Win - 1) / R at m + 1

  at::parallel_for(0, p.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> prev(cells * aw), cur(cells * aw);  // gA(n, c, r, s) at [c * aw + s + 1]
    // gA row r is accumulated split by phase, column s = R m + ph at phases[(c * R + ph) * m_len + m + 1],
    // so that every output row adds into one contiguous run; then it is interleaved into buf.
    std::vector<acc_t> phases(cells * stride * m_len);
    auto ga_row = [&](int64_t n, int64_t r, std::vector<acc_t>& buf) {
      std::fill(phases.begin(), phases.end(), acc_t(0));
      for_each_user_row(st, r, p.hout, [&](int64_t v, int64_t y) {
        const AxisTaps<acc_t>& tv = st.v_taps[v];
        for (int64_t u = 0; u < p.uout; ++u) {
          const AxisTaps<acc_t>& tu = st.u_taps[u];
          const scalar_t* go = grad_out + (((n * p.vout + v) * p.uout + u) * p.hout + y) * p.wout;
          const int64_t x_begin = st.x_begin[u], x_end = st.x_end[u];
          const int64_t q = floor_div(st.j_u[u], stride), ph = st.j_u[u] - q * stride;  // s = R (x + q) + ph
          const int64_t vs[2] = {tv.lo, tv.hi}, us[2] = {tu.lo, tu.hi};
          const acc_t wv[2] = {tv.w_lo, tv.w_hi}, wu[2] = {tu.w_lo, tu.w_hi};
          for (int c = 0; c < 2; ++c)
            for (int d = 0; d < 2; ++d) {
              if (vs[c] < 0 || vs[c] >= p.vin || us[d] < 0 || us[d] >= p.uin) continue;  // pad: no gradient
              const acc_t w = wv[c] * wu[d];
              if (w == acc_t(0)) continue;
              acc_t* dst = phases.data() + ((vs[c] * p.uin + us[d]) * stride + ph) * m_len + q + 1;
              for (int64_t xx = x_begin; xx < x_end; ++xx) dst[xx] += w * static_cast<acc_t>(go[xx]);
            }
        }
      });
      for (int64_t c = 0; c < cells; ++c)
        for (int64_t ph = 0; ph < stride; ++ph) {
          const acc_t* src = phases.data() + (c * stride + ph) * m_len + 1;  // src[m], column R m + ph
          acc_t* dst = buf.data() + c * aw + 1;                              // dst[s], s = -1 .. Win-1
          for (int64_t m = floor_div(-1 - ph + stride - 1, stride); stride * m + ph < p.win; ++m)
            dst[stride * m + ph] = src[m];
        }
    };
    for (int64_t k = begin; k < end; ++k) {
      const int64_t n = k / blocks, r0 = (k % blocks) * kBlock, r1 = std::min(r0 + kBlock, p.hin);
      ga_row(n, r0 - 1, prev);
      for (int64_t r = r0; r < r1; ++r) {
        ga_row(n, r, cur);
        for (int64_t c = 0; c < cells; ++c) {
          const acc_t* g0 = cur.data() + c * aw + 1;   // gA row r
          const acc_t* g1 = prev.data() + c * aw + 1;  // gA row r - 1
          scalar_t* gx = grad_x + ((n * cells + c) * p.hin + r) * p.win;
          for (int64_t s = 0; s < p.win; ++s)
            gx[s] = static_cast<scalar_t>((w00 * g0[s] + w01 * g0[s - 1]) + (w10 * g1[s] + w11 * g1[s - 1]));
        }
        std::swap(prev, cur);
      }
    }
  });
}

template <typename scalar_t>
void forward_kernel(const scalar_t* x, scalar_t* out, const Align2NatParams& p, scalar_t pad) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry<acc_t> g(p);
  if (!std::is_same<scalar_t, double>::value) {
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
  if (!std::is_same<scalar_t, double>::value) {
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
