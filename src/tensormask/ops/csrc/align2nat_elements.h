// The per-element arithmetic of the CUDA kernels, as host + device functions: the CUDA kernels
// (cuda/align2nat_cuda.cu) run them one thread per element, and the CPU op
// tensormask::_align2nat_device_emulation (cpu/device_emulation.cpp) runs the very same functions on
// the CPU, so the tests check this arithmetic against the reference on machines without a GPU
// (tests/ops/test_align2nat_device_emulation.py). Both are compiled without contracting multiply-adds
// (setup.py: -ffp-contract=off for the host compiler, --fmad=false for nvcc), and with IEEE division,
// so the CPU run gives the same bits as the GPU (docs/ops.md, "CUDA").
//
// Eq. (5) of appendix A.1 in detectron2's arithmetic, as described in align2nat.h.
#pragma once

#include "align2nat.h"

namespace tensormask {

// x[n, (v, u), y, c] in acc_t, or pad outside the input.
template <typename scalar_t, typename acc_t, typename index_t>
TM_HOST_DEVICE acc_t fetch_tap(const scalar_t* __restrict__ x, const Align2NatParams& p, index_t n, int64_t v,
                               int64_t u, int64_t y, int64_t c, acc_t pad) {
  const bool inside = v >= 0 && v < p.vin && u >= 0 && u < p.uin && y >= 0 && y < p.hin && c >= 0 && c < p.win;
  if (!inside) return pad;
  const index_t at = (((n * static_cast<index_t>(p.vin) + static_cast<index_t>(v)) * static_cast<index_t>(p.uin) +
                       static_cast<index_t>(u)) * static_cast<index_t>(p.hin) + static_cast<index_t>(y)) *
                         static_cast<index_t>(p.win) + static_cast<index_t>(c);
  return static_cast<acc_t>(x[at]);
}

// Output element `index` of the forward: the 16 taps, weight ((wy * wx) * wv) * wu, summed in y, x, v,
// u order (nearest: the one tap), exactly like the CPU exact path and the reference.
template <typename scalar_t, typename acc_t, typename index_t>
TM_HOST_DEVICE acc_t forward_element(const scalar_t* __restrict__ x, const Align2NatParams& p, const Geometry<acc_t>& g,
                                     index_t index, acc_t pad) {
  const CellIndex idx = unravel<index_t>(index, static_cast<index_t>(p.vout), static_cast<index_t>(p.uout),
                                         static_cast<index_t>(p.hout), static_cast<index_t>(p.wout));
  const index_t n = static_cast<index_t>(idx.n);
  const AxisTaps<acc_t> ty = axis_taps(g.grid(idx.y, idx.v, g.half_vout), p.nearest);
  const AxisTaps<acc_t> tx = axis_taps(g.grid(idx.x, idx.u, g.half_uout), p.nearest);
  const AxisTaps<acc_t> tv = axis_taps(g.cell(idx.v, g.off_v), p.nearest);
  const AxisTaps<acc_t> tu = axis_taps(g.cell(idx.u, g.off_u), p.nearest);
  if (p.nearest) return fetch_tap<scalar_t, acc_t, index_t>(x, p, n, tv.lo, tu.lo, ty.lo, tx.lo, pad);
  const int64_t ys[2] = {ty.lo, ty.hi}, xs[2] = {tx.lo, tx.hi}, vs[2] = {tv.lo, tv.hi}, us[2] = {tu.lo, tu.hi};
  const acc_t wy[2] = {ty.w_lo, ty.w_hi}, wx[2] = {tx.w_lo, tx.w_hi};
  const acc_t wv[2] = {tv.w_lo, tv.w_hi}, wu[2] = {tu.w_lo, tu.w_hi};
  acc_t sum(0);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int k = 0; k < 16; ++k) {  // term k = (a, b, c, d) = 8a + 4b + 2c + d: y, x, v, u order
    const int a = k >> 3, b = (k >> 2) & 1, c = (k >> 1) & 1, d = k & 1;
    const acc_t term =
        (((wy[a] * wx[b]) * wv[c]) * wu[d]) * fetch_tap<scalar_t, acc_t, index_t>(x, p, n, vs[c], us[d], ys[a], xs[b], pad);
    sum = k == 0 ? term : sum + term;
  }
  return sum;
}

// The constants of the backward gather, computed once per call on the host.
template <typename acc_t>
struct GatherPlan {
  acc_t cell_scale, shift_v, shift_u;  // cell coordinate v^ = cell_scale * v + shift_v (approximately)
  bool cache_x;                        // the x taps of one (u, input column) fit kMaxColumnTaps

  static constexpr int kMaxColumnTaps = 8;

  explicit GatherPlan(const Align2NatParams& p)
      : cell_scale(static_cast<acc_t>(1.0 / p.q_vu)),
        shift_v(static_cast<acc_t>(0.5 / p.q_vu + p.off_v)),
        shift_u(static_cast<acc_t>(0.5 / p.q_vu + p.off_u)),
        // x^ advances by r_hw per output column, so at most floor(2 / r_hw) + 1 columns have x^ in
        // (xi - 1, xi + 1); one more for rounding at the ends.
        cache_x(p.r_hw >= 2.0 / (kMaxColumnTaps - 2)) {}
};

// Input element `index` of the backward, as a gather: the sum over the output elements whose taps hit
// it of weight * grad_out, weight = ((wy * wx) * wv) * wu as in the forward (the product the reference's
// autograd multiplies grad_out by). Terms of weight zero are skipped, so a NaN / inf in grad_out reaches
// exactly the inputs its output depends on (docs/ops.md, "Non-finite values"). Loop order u, v, y, x: the
// (x, wx) pairs of the input column depend on u only, so they are computed once per u (not for every v
// and y); the ranges are tap_range's (the open interval of the taps plus a rounding margin).
template <typename scalar_t, typename acc_t, typename index_t>
TM_HOST_DEVICE acc_t backward_element(const scalar_t* __restrict__ grad_out, const Align2NatParams& p,
                                      const Geometry<acc_t>& g, const GatherPlan<acc_t>& plan, index_t index) {
  const CellIndex idx = unravel<index_t>(index, static_cast<index_t>(p.vin), static_cast<index_t>(p.uin),
                                         static_cast<index_t>(p.hin), static_cast<index_t>(p.win));
  const int64_t vi = idx.v, ui = idx.u, yi = idx.y, xi = idx.x;
  const index_t hout = static_cast<index_t>(p.hout), wout = static_cast<index_t>(p.wout);
  const index_t plane = hout * wout;
  const index_t batch_base = static_cast<index_t>(idx.n) * static_cast<index_t>(p.vout * p.uout);

  int64_t v_begin, v_end, u_begin, u_end;
  tap_range(plan.cell_scale, plan.shift_v, vi, p.vout, &v_begin, &v_end);
  tap_range(plan.cell_scale, plan.shift_u, ui, p.uout, &u_begin, &u_end);
  acc_t sum(0);
  for (int64_t u = u_begin; u < u_end; ++u) {
    const acc_t wu = axis_taps(g.cell(u, g.off_u), p.nearest).weight_of(ui);
    if (wu == acc_t(0)) continue;
    int64_t x_begin, x_end;
    tap_range(g.r_hw, g.r_off * ((static_cast<acc_t>(u) + static_cast<acc_t>(0.5)) - g.half_uout), xi, p.wout, &x_begin,
              &x_end);
    // The (x, wx) pairs of this u (when they fit; else they are recomputed in the y loop).
    int xs[GatherPlan<acc_t>::kMaxColumnTaps];
    acc_t wxs[GatherPlan<acc_t>::kMaxColumnTaps];
    int pairs = 0;
    if (plan.cache_x) {
      for (int64_t c = x_begin; c < x_end && pairs < GatherPlan<acc_t>::kMaxColumnTaps; ++c) {
        const acc_t wx = axis_taps(g.grid(c, u, g.half_uout), p.nearest).weight_of(xi);
        if (wx != acc_t(0)) xs[pairs] = static_cast<int>(c - x_begin), wxs[pairs++] = wx;
      }
    }
    for (int64_t v = v_begin; v < v_end; ++v) {
      const acc_t wv = axis_taps(g.cell(v, g.off_v), p.nearest).weight_of(vi);
      if (wv == acc_t(0)) continue;
      int64_t y_begin, y_end;
      tap_range(g.r_hw, g.r_off * ((static_cast<acc_t>(v) + static_cast<acc_t>(0.5)) - g.half_vout), yi, p.hout,
                &y_begin, &y_end);
      const index_t channel = batch_base + static_cast<index_t>(v * p.uout + u);
      for (int64_t y = y_begin; y < y_end; ++y) {
        const acc_t wy = axis_taps(g.grid(y, v, g.half_vout), p.nearest).weight_of(yi);
        if (wy == acc_t(0)) continue;
        const scalar_t* row = grad_out + channel * plane + static_cast<index_t>(y) * wout + static_cast<index_t>(x_begin);
        if (plan.cache_x) {
          for (int k = 0; k < pairs; ++k) {
            const acc_t w = ((wy * wxs[k]) * wv) * wu;
            if (w != acc_t(0)) sum = sum + w * static_cast<acc_t>(row[xs[k]]);
          }
        } else {
          for (int64_t c = x_begin; c < x_end; ++c) {
            const acc_t wx = axis_taps(g.grid(c, u, g.half_uout), p.nearest).weight_of(xi);
            const acc_t w = ((wy * wx) * wv) * wu;
            if (w != acc_t(0)) sum = sum + w * static_cast<acc_t>(row[c - x_begin]);
          }
        }
      }
    }
  }
  return sum;
}

}  // namespace tensormask
