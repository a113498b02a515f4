// cpu_ops.h: the C++ entry points of the CPU ops, as plain functions on at::Tensor.
//
// pama_cpu.cpp (the fused op), solvers_cpu.cpp (the weight solvers) and gae_cpu.cpp (GAE)
// define them; bindings.cpp alone binds them to Python (pybind11 names, argument names and
// docstrings). The split is for the build: torch's pybind11 casters and <ATen/ATen.h> cost
// about 19 s of g++ -O3 per file that includes them, against 3 s for <ATen/core/Tensor.h>
// and the per-operator headers these files use, so only bindings.cpp pays it (a clean
// MAX_JOBS=2 build on the 2-core machines: see csrc/README.md).
#pragma once

#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

namespace pama_cpu_ops {

// A new contiguous CPU tensor, for the files above: at::detail::empty_cpu is what at::empty
// runs on CPU, and its header costs nothing over <ATen/core/Tensor.h>, where
// <ATen/ops/empty.h> adds 3 s of parsing per file.
inline at::Tensor new_cpu_tensor(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::Tensor(at::detail::empty_cpu(sizes, dtype, /*pin_memory=*/false, /*memory_format_opt=*/std::nullopt));
}

// ------------------------------------------------------------------------------ pama_cpu.cpp
// The fused op's CPU kernels (pama_ext/_ops.py registers them as the CPU implementation of
// pama_ext::pama_forward / pama_backward / pama_statistics; contract: csrc/README.md).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pama_forward(
    const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages, const at::Tensor& mask,
    double clip_eps, const std::string& granularity, const std::string& loss_agg, bool check_finite);
at::Tensor pama_backward(const at::Tensor& grad_loss, const at::Tensor& logp, const at::Tensor& old_logp,
                         const at::Tensor& advantages, const at::Tensor& mask, const at::Tensor& weights,
                         const at::Tensor& row_scale, double clip_eps, const std::string& granularity);
std::tuple<at::Tensor, at::Tensor> pama_statistics(const at::Tensor& logp, const at::Tensor& old_logp,
                                                   const at::Tensor& advantages, const at::Tensor& mask,
                                                   double clip_eps, const std::string& granularity);

// The CPU kernels' entries of build_info, in this order: block_tokens, specialised_n, and
// the instruction sets (compiled, the best this CPU runs, the one a call uses now, and the
// one a call with N = 5..7 or 16+ uses now: the same set since 2026-12-03, the entry kept
// for build_info's users).
struct CpuKernelInfo {
  int64_t block_tokens;
  std::vector<int64_t> specialised_n;
  std::vector<std::string> isa_compiled;
  std::string isa_best, isa, isa_large_n;
};
CpuKernelInfo cpu_kernel_info();

// ------------------------------------------------------------------------------ solvers_cpu.cpp
// min over the simplex of c^T G c (float64 [N]).
at::Tensor min_norm_weights(const at::Tensor& gram);
// The same with the solver's diagnostics (for tests): (weights, objective, kkt_residual,
// major iterations, minor iterations, status: 0 converged, 1 iteration cap, 2 singular
// bordered system, 3 stalled, 4 trivial case (N <= 2 or G = 0)).
std::tuple<at::Tensor, double, double, int64_t, int64_t, int64_t> min_norm_weights_info(const at::Tensor& gram);
// Theorem 1 along the last dimension (float64, same shape).
at::Tensor theorem1(const at::Tensor& a);

// ------------------------------------------------------------------------------ gae_cpu.cpp
// Per-objective GAE over [B, T, N] with a [B, T] bool mask: (advantages, returns)
// (contract: pama_ext/rl/gae.py).
std::tuple<at::Tensor, at::Tensor> gae(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
                                       double gamma, double lam);

}  // namespace pama_cpu_ops
