// CUDA kernels of tensormask::align2nat and tensormask::align2nat_backward.
//
//   forward:  one thread per output element, the 16 (or 1) taps of align2nat.h.
//   backward: a gather, one thread per input element: it walks the output elements whose taps hit
//             it, in a fixed order, and sums their weighted gradients. No atomics, deterministic.
// Device guard, current stream, capped grid-stride loops, no device-wide synchronisation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../align2nat.h"

namespace tensormask {
namespace {

constexpr int kThreads = 256;

int64_t blocks_for(int64_t total) {
  const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 16;
  return std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, max_blocks));
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t fetch(const scalar_t* __restrict__ x, const Align2NatParams& p, int64_t n,
                                       int64_t v, int64_t u, int64_t y, int64_t c, acc_t pad) {
  const bool inside = v >= 0 && v < p.vin && u >= 0 && u < p.uin && y >= 0 && y < p.hin && c >= 0 && c < p.win;
  return inside ? static_cast<acc_t>(x[(((n * p.vin + v) * p.uin + u) * p.hin + y) * p.win + c]) : pad;
}

template <typename scalar_t, typename acc_t>
__global__ void align2nat_forward_kernel(int64_t total, const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                                         Align2NatParams p, Geometry<acc_t> g, acc_t pad) {
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const CellIndex idx = unravel(index, p.vout, p.uout, p.hout, p.wout);
    const int64_t n = idx.n, v = idx.v, u = idx.u, y = idx.y, c = idx.x;

    const AxisTaps<acc_t> ty = axis_taps(g.grid(y, v, g.half_vout), p.nearest);
    const AxisTaps<acc_t> tx = axis_taps(g.grid(c, u, g.half_uout), p.nearest);
    const AxisTaps<acc_t> tv = axis_taps(g.cell(v, g.off_v), p.nearest);
    const AxisTaps<acc_t> tu = axis_taps(g.cell(u, g.off_u), p.nearest);
    if (p.nearest) {
      out[index] = static_cast<scalar_t>(fetch(x, p, n, tv.lo, tu.lo, ty.lo, tx.lo, pad));
      continue;
    }
    const int64_t ys[2] = {ty.lo, ty.hi}, xs[2] = {tx.lo, tx.hi}, vs[2] = {tv.lo, tv.hi}, us[2] = {tu.lo, tu.hi};
    const acc_t wy[2] = {ty.w_lo, ty.w_hi}, wx[2] = {tx.w_lo, tx.w_hi};
    const acc_t wv[2] = {tv.w_lo, tv.w_hi}, wu[2] = {tu.w_lo, tu.w_hi};
    acc_t sum = 0;
#pragma unroll
    for (int k = 0; k < 16; ++k) {  // term k = (a, b, c, d) = 8a + 4b + 2c + d: y, x, v, u order
      const int a = k >> 3, b = (k >> 2) & 1, cc = (k >> 1) & 1, d = k & 1;
      const acc_t term = (((wy[a] * wx[b]) * wv[cc]) * wu[d]) * fetch(x, p, n, vs[cc], us[d], ys[a], xs[b], pad);
      sum = k == 0 ? term : sum + term;
    }
    out[index] = static_cast<scalar_t>(sum);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void align2nat_backward_kernel(int64_t total, const scalar_t* __restrict__ grad_out,
                                          scalar_t* __restrict__ grad_x, Align2NatParams p, Geometry<acc_t> g) {
  const double cell_scale = 1.0 / p.q_vu;
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const CellIndex idx = unravel(index, p.vin, p.uin, p.hin, p.win);
    const int64_t n = idx.n, vi = idx.v, ui = idx.u, yi = idx.y, xi = idx.x;

    acc_t sum = 0;
    int64_t v_begin, v_end, u_begin, u_end;
    candidate_range(cell_scale, 0.5 * cell_scale + p.off_v, vi, p.vout, &v_begin, &v_end);
    candidate_range(cell_scale, 0.5 * cell_scale + p.off_u, ui, p.uout, &u_begin, &u_end);
    for (int64_t v = v_begin; v < v_end; ++v) {
      const acc_t wv = axis_taps(g.cell(v, g.off_v), p.nearest).weight_of(vi);
      if (wv == acc_t(0)) continue;
      int64_t y_begin, y_end;
      candidate_range(p.r_hw, p.r_off * ((v + 0.5) - p.vout / 2.0), yi, p.hout, &y_begin, &y_end);
      for (int64_t u = u_begin; u < u_end; ++u) {
        const acc_t wu = axis_taps(g.cell(u, g.off_u), p.nearest).weight_of(ui);
        if (wu == acc_t(0)) continue;
        int64_t x_begin, x_end;
        candidate_range(p.r_hw, p.r_off * ((u + 0.5) - p.uout / 2.0), xi, p.wout, &x_begin, &x_end);
        for (int64_t y = y_begin; y < y_end; ++y) {
          const acc_t wy = axis_taps(g.grid(y, v, g.half_vout), p.nearest).weight_of(yi);
          if (wy == acc_t(0)) continue;
          const scalar_t* go = grad_out + (((n * p.vout + v) * p.uout + u) * p.hout + y) * p.wout;
          for (int64_t c = x_begin; c < x_end; ++c) {
            const acc_t wx = axis_taps(g.grid(c, u, g.half_uout), p.nearest).weight_of(xi);
            if (wx == acc_t(0)) continue;
            sum += (((wy * wx) * wv) * wu) * static_cast<acc_t>(go[c]);
          }
        }
      }
    }
    grad_x[index] = static_cast<scalar_t>(sum);
  }
}

at::Tensor align2nat_cuda(const at::Tensor& x, at::IntArrayRef in_cells, at::IntArrayRef out_cells,
                          at::IntArrayRef out_size, double unit_hw, double unit_vu, double aligned_unit_hw,
                          double aligned_unit_vu, double pad_val, c10::string_view mode) {
  const Align2NatParams p =
      make_params(x, false, in_cells, out_cells, out_size, unit_hw, unit_vu, aligned_unit_hw, aligned_unit_vu, mode);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor out = at::empty({p.batch, p.vout * p.uout, p.hout, p.wout}, x.options());
  if (out.numel() == 0) return out;
  const at::Tensor xc = x.contiguous();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "align2nat_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t pad = static_cast<acc_t>(static_cast<scalar_t>(pad_val));
    align2nat_forward_kernel<scalar_t, acc_t><<<blocks_for(out.numel()), kThreads, 0, stream>>>(
        out.numel(), xc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), p, Geometry<acc_t>(p), pad);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor align2nat_backward_cuda(const at::Tensor& grad_out, at::IntArrayRef in_cells, at::IntArrayRef out_cells,
                                   at::IntArrayRef in_size, double unit_hw, double unit_vu, double aligned_unit_hw,
                                   double aligned_unit_vu, c10::string_view mode) {
  const Align2NatParams p = make_params(grad_out, true, in_cells, out_cells, in_size, unit_hw, unit_vu,
                                        aligned_unit_hw, aligned_unit_vu, mode);
  const c10::cuda::CUDAGuard device_guard(grad_out.device());
  at::Tensor grad_x = at::empty({p.batch, p.vin * p.uin, p.hin, p.win}, grad_out.options());
  if (grad_x.numel() == 0) return grad_x;
  if (grad_out.numel() == 0) return grad_x.zero_();
  const at::Tensor gc = grad_out.contiguous();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "align2nat_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    align2nat_backward_kernel<scalar_t, acc_t><<<blocks_for(grad_x.numel()), kThreads, 0, stream>>>(
        grad_x.numel(), gc.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(), p, Geometry<acc_t>(p));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(tensormask, CUDA, m) {
  m.impl("align2nat", &align2nat_cuda);
  m.impl("align2nat_backward", &align2nat_backward_cuda);
}

}  // namespace tensormask
