// tensormask._C: the schemas of the align2nat ops, declared once; the CPU and CUDA files register
// their kernels with TORCH_LIBRARY_IMPL. Fake kernels and autograd live in Python
// (src/tensormask/ops/backend.py).
#include <Python.h>

#include <torch/library.h>

#include "align2nat.h"

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
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must have rank 4 (N, C, H, W), got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating point, got ", t.scalar_type());
  TORCH_CHECK(in_cells.size() == 2 && in_cells[0] > 0 && in_cells[1] > 0, op,
              ": in_cells must be two positive ints (Vin, Uin), got ", in_cells);
  TORCH_CHECK(out_cells.size() == 2 && out_cells[0] > 0 && out_cells[1] > 0, op,
              ": out_cells must be two positive ints (Vout, Uout), got ", out_cells);
  TORCH_CHECK(spatial.size() == 2 && spatial[0] >= 0 && spatial[1] >= 0, op,
              backward ? ": in_size must be two sizes (Hin, Win), got " : ": out_size must be two sizes (Hout, Wout), got ",
              spatial);
  for (double unit : {unit_hw, unit_vu, aligned_unit_hw, aligned_unit_vu}) {
    TORCH_CHECK(unit > 0 && std::isfinite(unit), op,
                ": units must be positive finite numbers, got unit_hw=", unit_hw, " unit_vu=", unit_vu,
                " aligned_unit_hw=", aligned_unit_hw, " aligned_unit_vu=", aligned_unit_vu);
  }
  TORCH_CHECK(mode == "bilinear" || mode == "nearest", op, ": mode must be 'bilinear' or 'nearest', got '",
              std::string(mode), "'");

  Align2NatParams p;
  p.batch = t.size(0);
  p.vin = in_cells[0];
  p.uin = in_cells[1];
  p.vout = out_cells[0];
  p.uout = out_cells[1];
  if (backward) {
    TORCH_CHECK(t.size(1) == p.vout * p.uout, op, ": grad_out has ", t.size(1), " channels, out_cells ", out_cells,
                " need ", p.vout * p.uout);
    p.hout = t.size(2);
    p.wout = t.size(3);
    p.hin = spatial[0];
    p.win = spatial[1];
  } else {
    TORCH_CHECK(t.size(1) == p.vin * p.uin, op, ": x has ", t.size(1), " channels, in_cells ", in_cells, " need ",
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
}

}  // namespace tensormask
