// CUDA kernels of tensormask::align2nat and tensormask::align2nat_backward.
//
//   forward:  one thread per output element, the 16 (or 1) taps (forward_element).
//   backward: a gather, one thread per input element (backward_element): it walks the output elements
//             whose taps hit it, in a fixed order, and sums their weighted gradients. No atomics,
//             deterministic.
// The per-element arithmetic lives in ../align2nat_elements.h, shared with the CPU op
// tensormask::_align2nat_device_emulation that the CPU tests run. nvcc compiles it with --fmad=false
// (setup.py), so every multiply and add rounds like the CPU kernels' (docs/ops.md, "CUDA").
// 32-bit element indices when the tensors allow, device guard, current stream, capped grid-stride
// loops, no device-wide synchronisation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../align2nat_elements.h"

namespace tensormask {
namespace {

constexpr int kThreads = 256;

int64_t blocks_for(int64_t total) {
  const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 16;
  return std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, max_blocks));
}

// 32-bit indices when every element index of both tensors (and the grid-stride loop's next index) fits.
bool fits_int32(int64_t a, int64_t b) {
  const int64_t limit = std::numeric_limits<int32_t>::max() - int64_t(kThreads) * 65536;
  return a < limit && b < limit;
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kThreads) align2nat_forward_kernel(index_t total, const scalar_t* __restrict__ x,
                                                                     scalar_t* __restrict__ out, Align2NatParams p,
                                                                     Geometry<acc_t> g, acc_t pad) {
  const index_t step = static_cast<index_t>(blockDim.x) * static_cast<index_t>(gridDim.x);
  for (index_t index = static_cast<index_t>(blockIdx.x) * static_cast<index_t>(blockDim.x) + static_cast<index_t>(threadIdx.x);
       index < total; index += step) {
    out[index] = static_cast<scalar_t>(forward_element<scalar_t, acc_t, index_t>(x, p, g, index, pad));
  }
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kThreads) align2nat_backward_kernel(index_t total,
                                                                      const scalar_t* __restrict__ grad_out,
                                                                      scalar_t* __restrict__ grad_x, Align2NatParams p,
                                                                      Geometry<acc_t> g, GatherPlan<acc_t> plan) {
  const index_t step = static_cast<index_t>(blockDim.x) * static_cast<index_t>(gridDim.x);
  for (index_t index = static_cast<index_t>(blockIdx.x) * static_cast<index_t>(blockDim.x) + static_cast<index_t>(threadIdx.x);
       index < total; index += step) {
    grad_x[index] = static_cast<scalar_t>(backward_element<scalar_t, acc_t, index_t>(grad_out, p, g, plan, index));
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
    const Geometry<acc_t> g(p);
    if (fits_int32(out.numel(), xc.numel())) {
      align2nat_forward_kernel<scalar_t, acc_t, int32_t><<<blocks_for(out.numel()), kThreads, 0, stream>>>(
          static_cast<int32_t>(out.numel()), xc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), p, g, pad);
    } else {
      align2nat_forward_kernel<scalar_t, acc_t, int64_t><<<blocks_for(out.numel()), kThreads, 0, stream>>>(
          out.numel(), xc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), p, g, pad);
    }
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
    const Geometry<acc_t> g(p);
    const GatherPlan<acc_t> plan(p);
    if (fits_int32(grad_x.numel(), gc.numel())) {
      align2nat_backward_kernel<scalar_t, acc_t, int32_t><<<blocks_for(grad_x.numel()), kThreads, 0, stream>>>(
          static_cast<int32_t>(grad_x.numel()), gc.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(), p,
          g, plan);
    } else {
      align2nat_backward_kernel<scalar_t, acc_t, int64_t><<<blocks_for(grad_x.numel()), kThreads, 0, stream>>>(
          grad_x.numel(), gc.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(), p, g, plan);
    }
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
