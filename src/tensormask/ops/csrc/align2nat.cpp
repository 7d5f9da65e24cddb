// tensormask._C: the schemas of the align2nat ops, declared once; the CPU and CUDA files register
// their kernels with TORCH_LIBRARY_IMPL. Fake kernels and autograd live in Python
// (src/tensormask/ops/backend.py).
#include <Python.h>

#include <torch/library.h>

#include "align2nat.h"

#include <algorithm>
#include <sstream>

extern "C" {
// Importing tensormask._C from Python runs the static registrations below; the module is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace tensormask {

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
    c10::string_view mode) {
  const char* op = backward ? "align2nat_backward" : "align2nat";
  const char* name = backward ? "grad_out" : "x";
  TORCH_CHECK_VALUE(t.dim() == 4, op, ": ", name, " must have rank 4 (N, C, H, W), got shape ", t.sizes());
  const at::ScalarType dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
                   ": ", name, " must be float32, float64, float16 or bfloat16",
                   at::isFloat8Type(dtype) ? " (float8 types have no align2nat kernel)" : "", ", got ", dtype);
  TORCH_CHECK_VALUE(in_cells.size() == 2 && in_cells[0] > 0 && in_cells[1] > 0, op,
              ": in_cells must be two positive ints (Vin, Uin), got ", in_cells);
  TORCH_CHECK_VALUE(out_cells.size() == 2 && out_cells[0] > 0 && out_cells[1] > 0, op,
              ": out_cells must be two positive ints (Vout, Uout), got ", out_cells);
  TORCH_CHECK_VALUE(spatial.size() == 2 && spatial[0] >= 0 && spatial[1] >= 0, op,
              backward ? ": in_size must be two sizes (Hin, Win), got " : ": out_size must be two sizes (Hout, Wout), got ",
              spatial);
  for (double unit : {unit_hw, unit_vu, aligned_unit_hw, aligned_unit_vu}) {
    TORCH_CHECK_VALUE(unit > 0 && std::isfinite(unit), op,
                ": units must be positive finite numbers, got unit_hw=", unit_hw, " unit_vu=", unit_vu,
                " aligned_unit_hw=", aligned_unit_hw, " aligned_unit_vu=", aligned_unit_vu);
  }
  TORCH_CHECK_VALUE(mode == "bilinear" || mode == "nearest", op, ": mode must be 'bilinear' or 'nearest', got '",
              std::string(mode), "'");

  Align2NatParams p;
  p.batch = t.size(0);
  p.vin = in_cells[0];
  p.uin = in_cells[1];
  p.vout = out_cells[0];
  p.uout = out_cells[1];
  if (backward) {
    TORCH_CHECK_VALUE(t.size(1) == p.vout * p.uout, op, ": grad_out has ", t.size(1), " channels, out_cells ", out_cells,
                " need ", p.vout * p.uout);
    p.hout = t.size(2);
    p.wout = t.size(3);
    p.hin = spatial[0];
    p.win = spatial[1];
  } else {
    TORCH_CHECK_VALUE(t.size(1) == p.vin * p.uin, op, ": x has ", t.size(1), " channels, in_cells ", in_cells, " need ",
                p.vin * p.uin);
    p.hin = t.size(2);
    p.win = t.size(3);
    p.hout = spatial[0];
    p.wout = spatial[1];
  }
  p.r_hw = unit_hw / aligned_unit_hw;
  p.r_off = unit_vu / aligned_unit_hw;
  p.q_vu = aligned_unit_vu / unit_vu;
  p.off_v = (p.vin / 2.0 - 0.5) - (p.vout / 2.0) / p.q_vu;
  p.off_u = (p.uin / 2.0 - 0.5) - (p.uout / 2.0) / p.q_vu;
  p.nearest = mode == "nearest";

  // The derived constants must stay usable: ratios that neither underflow to 0 nor overflow, and
  // sampling positions that index exactly in int64 (the kernels cast floor / ceil of them). Units
  // far apart (e.g. unit_hw=1e-300) would otherwise give an output size or positions past int64.
  auto units = [&](std::ostream& out) -> std::ostream& {
    return out << " (unit_hw=" << unit_hw << " unit_vu=" << unit_vu << " aligned_unit_hw=" << aligned_unit_hw
               << " aligned_unit_vu=" << aligned_unit_vu << ")";
  };
  for (double ratio : {p.r_hw, p.r_off, p.q_vu, 1.0 / p.q_vu}) {
    if (!(ratio > 0 && std::isfinite(ratio))) {
      std::ostringstream msg;
      units(msg << op << ": the unit ratios unit_hw/aligned_unit_hw, unit_vu/aligned_unit_hw and "
                         "aligned_unit_vu/unit_vu must be positive finite numbers, got "
                << p.r_hw << ", " << p.r_off << ", " << p.q_vu);
      TORCH_CHECK_VALUE(false, msg.str());
    }
  }
  // (Hout, Wout) = ceil((Hin, Win) / r_hw), tolerating the last-bit error of ratios such as 3 * (1/3),
  // exactly as tensormask.ops.geometry.Align2NatGeometry.output_size computes it.
  int64_t expected[2];
  const int64_t in_hw[2] = {p.hin, p.win};
  for (int k = 0; k < 2; ++k) {
    const double value = static_cast<double>(in_hw[k]) / p.r_hw;
    if (!(value <= kMaxExtent)) {
      std::ostringstream msg;
      units(msg << op << ": an input of spatial size " << in_hw[k] << " gives an output of size " << value
                << ", more than " << kMaxExtent);
      TORCH_CHECK_VALUE(false, msg.str());
    }
    expected[k] = std::max<int64_t>(0, static_cast<int64_t>(std::ceil(value - 1e-9 * std::max(1.0, std::abs(value)))));
  }
  if (backward) {
    TORCH_CHECK_VALUE(expected[0] == p.hout && expected[1] == p.wout, op, ": grad_out of spatial size (", p.hout,
                      ", ", p.wout, ") does not fit in_size ", spatial, ": the forward of an input of that size gives (",
                      expected[0], ", ", expected[1], ") = ceil(in_size * aligned_unit_hw / unit_hw)");
  } else {
    TORCH_CHECK_VALUE(expected[0] == p.hout && expected[1] == p.wout, op, ": out_size must be ceil((Hin, Win) * ",
                      "aligned_unit_hw / unit_hw) = (", expected[0], ", ", expected[1], ") for x of shape ", t.sizes(),
                      ", got ", spatial);
  }
  // Every sampling position lies within this bound (eq. (5) of appendix A.1 at the extreme indices).
  const double reach = p.r_hw * static_cast<double>(std::max<int64_t>(1, std::max(p.hout, p.wout))) +
                       p.r_off * static_cast<double>(std::max(p.vout, p.uout)) +
                       static_cast<double>(std::max(p.vout, p.uout)) / p.q_vu + std::abs(p.off_v) + std::abs(p.off_u);
  if (!(reach <= kMaxExtent)) {
    std::ostringstream msg;
    units(msg << op << ": these units put sampling positions up to " << reach << " cells away, more than "
              << kMaxExtent);
    TORCH_CHECK_VALUE(false, msg.str());
  }
  return p;
}

TORCH_LIBRARY(tensormask, m) {
  // x: aligned (N, Vin*Uin, Hin, Win) -> natural (N, Vout*Uout, Hout, Wout), out_size = (Hout, Wout).
  m.def(
      "align2nat(Tensor x, int[2] in_cells, int[2] out_cells, int[2] out_size, float unit_hw, float unit_vu, "
      "float aligned_unit_hw, float aligned_unit_vu, float pad_val, str mode) -> Tensor");
  // grad_out: (N, Vout*Uout, Hout, Wout) -> grad_x (N, Vin*Uin, Hin, Win), in_size = (Hin, Win).
  m.def(
      "align2nat_backward(Tensor grad_out, int[2] in_cells, int[2] out_cells, int[2] in_size, float unit_hw, "
      "float unit_vu, float aligned_unit_hw, float aligned_unit_vu, str mode) -> Tensor");
  // A test tool (CPU only): the CUDA kernels' per-element arithmetic run on the CPU (cpu/device_emulation.cpp);
  // `size` is out_size (forward) or in_size (backward); index32 picks the kernels' 32-bit index variant.
  m.def(
      "_align2nat_device_emulation(Tensor input, int[2] in_cells, int[2] out_cells, int[2] size, float unit_hw, "
      "float unit_vu, float aligned_unit_hw, float aligned_unit_vu, float pad_val, str mode, bool backward, "
      "bool index32) -> Tensor");
}

}  // namespace tensormask
