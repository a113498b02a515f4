// solvers_cpu.cpp: the weight solvers of pama_math.h as ops of their own, on a Gram matrix or
// per-objective means given directly rather than on the loss inputs: `min_norm_weights`
// (pama_ext.min_norm_weights, pama_ext.statistics), and `theorem1` and `_min_norm_weights_info`
// (the solver with its diagnostics), which the tests check against pama_ext/reference.py.
// The fused op calls the same solvers inside its forward pass (pama_cpu.cpp); these ops only
// convert tensors around them.
//
// Contract: csrc/README.md "Solvers" (pama_ext/reference.py is the oracle).
#include "bindings.h"

#include <ATen/Parallel.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "pama_math.h"

namespace {

using at::Tensor;

// min over the simplex of c^T G c (float64 [N]).
Tensor min_norm_weights_op(const Tensor& gram) {
  TORCH_CHECK_VALUE(gram.dim() == 2 && gram.size(0) == gram.size(1), "min_norm_weights: gram must be [N, N], got ",
                    gram.sizes());
  const int64_t n = gram.size(0);
  TORCH_CHECK_VALUE(n >= 1 && n <= PAMA_MAX_N, "min_norm_weights: N must be in [1, ", PAMA_MAX_N, "], got ", n);
  const Tensor g = gram.to(at::kCPU, at::kDouble).contiguous();
  Tensor c = at::empty({n}, at::TensorOptions().dtype(at::kDouble));
  auto sc = std::make_unique<pama::MinNormScratch>();
  pama::min_norm_weights(g.data_ptr<double>(), static_cast<int>(n), c.data_ptr<double>(), sc.get());
  return c;
}

// The same, with the solver's diagnostics (for tests): (weights, objective, kkt_residual,
// major iterations, minor iterations, status: 0 converged, 1 iteration cap, 2 singular
// bordered system, 3 stalled, 4 trivial case (N <= 2 or G = 0)).
py::tuple min_norm_weights_info_op(const Tensor& gram) {
  Tensor c = min_norm_weights_op(gram);
  const Tensor g = gram.to(at::kCPU, at::kDouble).contiguous();
  const int n = static_cast<int>(g.size(0));
  auto sc = std::make_unique<pama::MinNormScratch>();
  pama::MinNormInfo info;
  std::vector<double> c2(n);
  pama::min_norm_weights(g.data_ptr<double>(), n, c2.data(), sc.get(), &info);
  double obj = 0.0, kkt = 0.0;
  pama::quad_objective_kkt(g.data_ptr<double>(), n, c.data_ptr<double>(), &obj, &kkt);
  return py::make_tuple(c, obj, kkt, info.major_iters, info.minor_iters, info.status);
}

// Theorem 1 along the last dimension (float64, same shape).
Tensor theorem1_op(const Tensor& a) {
  TORCH_CHECK_VALUE(a.dim() >= 1 && a.size(-1) >= 1, "theorem1: expected a tensor [..., N] with N >= 1, got ",
                    a.sizes());
  const Tensor x = a.to(at::kCPU, at::kDouble).contiguous();
  Tensor c = at::empty_like(x);
  const int64_t n = x.size(-1);
  const int64_t rows = n > 0 ? x.numel() / n : 0;
  const double* px = x.data_ptr<double>();
  double* pc = c.data_ptr<double>();
  at::parallel_for(0, rows, 4096, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) pama::theorem1(px + r * n, static_cast<int>(n), pc + r * n);
  });
  return c;
}
}  // namespace

void register_solver_bindings(pybind11::module_& m) {
  m.def("min_norm_weights", &min_norm_weights_op, "exact argmin over the simplex of c^T G c (float64)",
        py::arg("gram"));
  m.def("_min_norm_weights_info", &min_norm_weights_info_op,
        "min_norm_weights with diagnostics: (weights, objective, kkt_residual, major, minor, status)",
        py::arg("gram"));
  m.def("theorem1", &theorem1_op, "Theorem 1 weights along the last dimension (float64)", py::arg("a"));
}
