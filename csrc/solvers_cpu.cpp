// solvers_cpu.cpp: the weight solvers of pama_math.h as ops of their own, on a Gram matrix or
// per-objective means given directly rather than on the loss inputs: `min_norm_weights`
// (pama_ext.min_norm_weights, pama_ext.statistics), and `theorem1` and `_min_norm_weights_info`
// (the solver with its diagnostics), which the tests check against pama_ext/reference.py.
// The fused op calls the same solvers inside its forward pass (pama_cpu.cpp); these ops only
// convert tensors around them.
//
// Contract: csrc/README.md "Solvers" (pama_ext/reference.py is the oracle).
// Light ATen headers only, never <ATen/ATen.h> (cpu_ops.h says why): torch then
// fails the build if a header that pulls in every operator creeps back in.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "cpu_ops.h"

#include <ATen/Parallel.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "pama_math.h"

namespace pama_cpu_ops {

using at::Tensor;

Tensor min_norm_weights(const Tensor& gram) {
  TORCH_CHECK_VALUE(gram.dim() == 2 && gram.size(0) == gram.size(1), "min_norm_weights: gram must be [N, N], got ",
                    gram.sizes());
  const int64_t n = gram.size(0);
  TORCH_CHECK_VALUE(n >= 1 && n <= PAMA_MAX_N, "min_norm_weights: N must be in [1, ", PAMA_MAX_N, "], got ", n);
  const Tensor g = gram.to(at::kCPU, at::kDouble).contiguous();
  Tensor c = new_cpu_tensor({n}, at::kDouble);
  auto sc = std::make_unique<pama::MinNormScratch>();
  pama::min_norm_weights(g.data_ptr<double>(), static_cast<int>(n), c.data_ptr<double>(), sc.get());
  return c;
}

std::tuple<Tensor, double, double, int64_t, int64_t, int64_t> min_norm_weights_info(const Tensor& gram) {
  Tensor c = min_norm_weights(gram);
  const Tensor g = gram.to(at::kCPU, at::kDouble).contiguous();
  const int n = static_cast<int>(g.size(0));
  auto sc = std::make_unique<pama::MinNormScratch>();
  pama::MinNormInfo info;
  std::vector<double> c2(n);
  pama::min_norm_weights(g.data_ptr<double>(), n, c2.data(), sc.get(), &info);
  double obj = 0.0, kkt = 0.0;
  pama::quad_objective_kkt(g.data_ptr<double>(), n, c.data_ptr<double>(), &obj, &kkt);
  return {c, obj, kkt, info.major_iters, info.minor_iters, info.status};
}

Tensor theorem1(const Tensor& a) {
  TORCH_CHECK_VALUE(a.dim() >= 1 && a.size(-1) >= 1, "theorem1: expected a tensor [..., N] with N >= 1, got ",
                    a.sizes());
  const Tensor x = a.to(at::kCPU, at::kDouble).contiguous();
  Tensor c = new_cpu_tensor(x.sizes(), at::kDouble);  // x: contiguous float64
  const int64_t n = x.size(-1);
  const int64_t rows = n > 0 ? x.numel() / n : 0;
  const double* px = x.data_ptr<double>();
  double* pc = c.data_ptr<double>();
  at::parallel_for(0, rows, 4096, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) pama::theorem1(px + r * n, static_cast<int>(n), pc + r * n);
  });
  return c;
}
}  // namespace pama_cpu_ops
