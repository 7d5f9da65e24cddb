// tensormask::_align2nat_device_emulation: the CUDA kernels' per-element functions
// (../align2nat_elements.h) run on the CPU, one loop iteration per CUDA thread, so that machines without
// a GPU test the arithmetic the GPU runs (tests/ops/test_align2nat_device_emulation.py). A test tool,
// not a fast path: the public ops never call it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../align2nat_elements.h"

namespace tensormask {
namespace {

template <typename scalar_t, typename index_t>
void emulate(const at::Tensor& input, at::Tensor& result, const Align2NatParams& p, double pad_val, bool backward) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry<acc_t> g(p);
  const GatherPlan<acc_t> plan(p);
  const acc_t pad = static_cast<acc_t>(static_cast<scalar_t>(pad_val));
  const scalar_t* in = input.const_data_ptr<scalar_t>();
  scalar_t* out = result.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, result.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const index_t index = static_cast<index_t>(i);
      out[i] = static_cast<scalar_t>(backward ? backward_element<scalar_t, acc_t, index_t>(in, p, g, plan, index)
                                              : forward_element<scalar_t, acc_t, index_t>(in, p, g, index, pad));
    }
  });
}

at::Tensor device_emulation(const at::Tensor& input, at::IntArrayRef in_cells, at::IntArrayRef out_cells,
                            at::IntArrayRef size, double unit_hw, double unit_vu, double aligned_unit_hw,
                            double aligned_unit_vu, double pad_val, c10::string_view mode, bool backward, bool index32) {
  const Align2NatParams p = make_params(input, backward, in_cells, out_cells, size, unit_hw, unit_vu, aligned_unit_hw,
                                        aligned_unit_vu, mode);
  at::Tensor result = backward ? at::empty({p.batch, p.vin * p.uin, p.hin, p.win}, input.options())
                               : at::empty({p.batch, p.vout * p.uout, p.hout, p.wout}, input.options());
  if (result.numel() == 0) return result;
  if (backward && input.numel() == 0) return result.zero_();  // as the CUDA backward (an empty input of the
                                                               // forward reads pad everywhere, in the kernel)
  const at::Tensor contiguous = input.contiguous();
  TORCH_CHECK_VALUE(!index32 || (result.numel() < (int64_t(1) << 31) && input.numel() < (int64_t(1) << 31)),
                    "_align2nat_device_emulation: index32 needs tensors of fewer than 2^31 elements");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "align2nat_device_emulation", [&] {
    if (index32)
      emulate<scalar_t, int32_t>(contiguous, result, p, pad_val, backward);
    else
      emulate<scalar_t, int64_t>(contiguous, result, p, pad_val, backward);
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(tensormask, CPU, m) { m.impl("_align2nat_device_emulation", &device_emulation); }

}  // namespace tensormask
