// The align2nat geometry shared by the CPU and CUDA kernels (host and device code).
//
// Appendix A.1, eq. (5), in the arithmetic of detectron2's SwapAlign2Nat (see
// src/tensormask/ops/geometry.py, which computes the same constants in Python):
//   natural element (n, v, u, y, x) of an (N, Vout*Uout, Hout, Wout) output reads the aligned
//   input (N, Vin*Uin, Hin, Win) at
//     v^ = (v + 0.5) / q_vu + off_v          u^ = (u + 0.5) / q_vu + off_u
//     y^ = r_hw * y + r_off * ((v + 0.5) - Vout / 2)
//     x^ = r_hw * x + r_off * ((u + 0.5) - Uout / 2)
//   bilinear: 16 taps (floor and ceil of each coordinate), weight ((wy * wx) * wv) * wu, summed in
//   y, x, v, u order; nearest: the tap floor(c + 0.5) of each coordinate. A tap outside the input
//   reads pad_val and gets no gradient.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#if defined(__CUDACC__)
#define TM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TM_HOST_DEVICE inline
#endif

namespace tensormask {

// The largest output size and sampling position (in input cells) make_params accepts: far inside the
// range where float64 positions, their floor / ceil and int64 indices are exact.
constexpr double kMaxExtent = 1099511627776.0;  // 2^40

// Sizes and the float64 constants of one transform, validated once on the host.
struct Align2NatParams {
  int64_t batch, vin, uin, hin, win;
  int64_t vout, uout, hout, wout;
  double r_hw;   // unit_hw / aligned_unit_hw
  double r_off;  // unit_vu / aligned_unit_hw
  double q_vu;   // aligned_unit_vu / unit_vu
  double off_v;  // (Vin / 2 - 0.5) - (Vout / 2) / q_vu
  double off_u;  // (Uin / 2 - 0.5) - (Uout / 2) / q_vu
  bool nearest;
};

// The constants in the accumulation type (float for float32/float16/bfloat16, double for float64).
template <typename acc_t>
struct Geometry {
  acc_t r_hw, r_off, q_vu, off_v, off_u, half_vout, half_uout;

  explicit Geometry(const Align2NatParams& p)
      : r_hw(static_cast<acc_t>(p.r_hw)),
        r_off(static_cast<acc_t>(p.r_off)),
        q_vu(static_cast<acc_t>(p.q_vu)),
        off_v(static_cast<acc_t>(p.off_v)),
        off_u(static_cast<acc_t>(p.off_u)),
        half_vout(static_cast<acc_t>(p.vout / 2.0)),
        half_uout(static_cast<acc_t>(p.uout / 2.0)) {}

  // v^ (or u^ with off_u) of output cell v.
  TM_HOST_DEVICE acc_t cell(int64_t v, acc_t off) const {
    return (static_cast<acc_t>(v) + static_cast<acc_t>(0.5)) / q_vu + off;
  }
  // y^ of output row y in window cell v (x^ of column x in cell u with half_uout).
  TM_HOST_DEVICE acc_t grid(int64_t y, int64_t v, acc_t half_out) const {
    return r_hw * static_cast<acc_t>(y) + r_off * ((static_cast<acc_t>(v) + static_cast<acc_t>(0.5)) - half_out);
  }
};

// The (at most) two taps of one coordinate.
template <typename acc_t>
struct AxisTaps {
  int64_t lo, hi;
  acc_t w_lo, w_hi;

  // Weight of input index i in this coordinate (0 if neither tap is i).
  TM_HOST_DEVICE acc_t weight_of(int64_t i) const {
    return (lo == i ? w_lo : static_cast<acc_t>(0)) + (hi == i ? w_hi : static_cast<acc_t>(0));
  }
};

template <typename acc_t>
TM_HOST_DEVICE AxisTaps<acc_t> axis_taps(acc_t c, bool nearest) {
  if (nearest) {
    const int64_t i = static_cast<int64_t>(std::floor(c + static_cast<acc_t>(0.5)));
    return {i, i, static_cast<acc_t>(1), static_cast<acc_t>(0)};
  }
  const acc_t low = std::floor(c);
  const acc_t w_hi = c - low;
  return {static_cast<int64_t>(low), static_cast<int64_t>(std::ceil(c)), static_cast<acc_t>(1) - w_hi, w_hi};
}

// Output indices [begin, end) that may tap input index i along one axis whose coordinate
// c(t) = scale * t + shift (scale > 0) is computed in acc_t: a tap of nonzero weight has c(t) in the
// open interval (i - 1, i + 1) (bilinear; nearest: [i - 0.5, i + 0.5), inside it). The range is that
// interval's, widened only by a margin for the rounding of c(t) and of this computation (16 ulps of the
// magnitudes involved), so it holds every output index that taps i; callers keep the taps of nonzero
// weight (weight_of). For swap with lambda 2 (S 15): 5 candidates on a cell axis, 2 on a spatial one.
template <typename acc_t>
TM_HOST_DEVICE void tap_range(acc_t scale, acc_t shift, int64_t i, int64_t n, int64_t* begin, int64_t* end) {
  const acc_t ii = static_cast<acc_t>(i), one(1);
  const acc_t eps = std::numeric_limits<acc_t>::epsilon();
  const acc_t abs_i = ii < acc_t(0) ? -ii : ii, abs_shift = shift < acc_t(0) ? -shift : shift;
  const acc_t margin = acc_t(16) * eps * (abs_i + abs_shift + acc_t(2) + scale * static_cast<acc_t>(n));
  const acc_t lo = std::floor((ii - one - shift - margin) / scale);
  const acc_t hi = std::floor((ii + one - shift + margin) / scale) + one;  // exclusive
  const acc_t nn = static_cast<acc_t>(n);
  *begin = lo <= acc_t(0) ? 0 : (lo >= nn ? n : static_cast<int64_t>(lo));
  *end = hi <= acc_t(0) ? 0 : (hi >= nn ? n : static_cast<int64_t>(hi));
  if (*end < *begin) *end = *begin;
}

// The coordinates of element i of an (N, V*U, H, W) tensor (channel v * U + u); with w = 1, of row i.
// index_t = int32_t when the tensor has fewer than 2^31 elements (4 cheap divisions instead of 64-bit ones).
struct CellIndex {
  int64_t n, v, u, y, x;
};
template <typename index_t = int64_t>
TM_HOST_DEVICE CellIndex unravel(index_t i, index_t v, index_t u, index_t h, index_t w) {
  CellIndex idx;
  idx.x = i % w;
  i /= w;
  idx.y = i % h;
  i /= h;
  idx.u = i % u;
  i /= u;
  idx.v = i % v;
  idx.n = i / v;
  return idx;
}

// Validates the arguments of tensormask::align2nat / align2nat_backward and derives the constants.
// `t` is x (forward) or grad_out (backward); `spatial` is out_size (forward) or in_size (backward).
Align2NatParams make_params(
    const at::Tensor& t,
    bool backward,
    at::IntArrayRef in_cells,
    at::IntArrayRef out_cells,
    at::IntArrayRef spatial,
    double unit_hw,
    double unit_vu,
    double aligned_unit_hw,
    double aligned_unit_vu,
    c10::string_view mode);

}  // namespace tensormask
