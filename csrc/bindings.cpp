// bindings.cpp: the pybind11 module pama_ext._C and its build_info.
//
// The CPU ops are plain C++ functions in the other source files (cpu_ops.h); this file alone
// binds them (names, argument names, docstrings), so that only it pays for pybind11 and the
// whole of ATen at compile time. It knows no kernel: it fixes the module's contents and the
// order the ops are added in, and reports how the extension was compiled. The CUDA glue adds
// its own ops through register_cuda_bindings (bindings.h).
#include "bindings.h"

#include <ATen/Parallel.h>
#include <torch/version.h>  // TORCH_VERSION

#include <string>

#include "cpu_ops.h"
#include "pama_math.h"

namespace {

// What this extension was compiled with (pama_ext.build_info()["extension"]): backends,
// OpenMP and threads, torch, CUDA version and architectures, N's limit, then the CPU
// kernels' own facts, in that key order.
py::dict build_info() {
  py::dict d;
  py::list backends;
  backends.append("cpu");
  d["backends"] = backends;
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  d["num_threads"] = at::get_num_threads();
  d["torch_version"] = std::string(TORCH_VERSION);
#ifdef PAMA_WITH_CUDA
  backends.append("cuda");
  {
    py::dict cu;
    const int v = pama_cuda_runtime_version();  // CUDART_VERSION of pama_cuda_kernels.cu
    cu["version"] = std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
#ifdef PAMA_CUDA_ARCHS
#define PAMA_STR_(...) #__VA_ARGS__
#define PAMA_STR(...) PAMA_STR_(__VA_ARGS__)
    const std::string archs = PAMA_STR(PAMA_CUDA_ARCHS);  // "sm_80.sm_90" (setup.py: no commas, nvcc splits -D at them)
#else
    const std::string archs;
#endif
    py::list al;
    for (size_t i = 0; i < archs.size();) {
      size_t j = archs.find('.', i);
      if (j == std::string::npos) j = archs.size();
      if (j > i) al.append(archs.substr(i, j - i));
      i = j + 1;
    }
    cu["archs"] = al;
    d["cuda"] = cu;
  }
#else
  d["cuda"] = py::none();
#endif
  d["max_objectives"] = PAMA_MAX_N;
  // csrc/pama_cpu.cpp: block_tokens, specialised_n, the instruction sets
  const pama_cpu_ops::CpuKernelInfo k = pama_cpu_ops::cpu_kernel_info();
  d["block_tokens"] = k.block_tokens;
  py::tuple spec(k.specialised_n.size());
  for (size_t i = 0; i < k.specialised_n.size(); ++i) spec[i] = k.specialised_n[i];
  d["specialised_n"] = spec;
  py::list compiled;
  for (const std::string& isa : k.isa_compiled) compiled.append(isa);
  d["cpu_isa_compiled"] = compiled;
  d["cpu_isa_best"] = k.isa_best;
  d["cpu_isa"] = k.isa;
  d["cpu_isa_large_n"] = k.isa_large_n;
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pama_ext._C: fused PAMA CPU kernels (see csrc/README.md)";
  namespace ops = pama_cpu_ops;
  // csrc/pama_cpu.cpp: the fused op's CPU kernels (pama_ext/_ops.py registers them as the CPU
  // implementation of pama_ext::pama_forward / pama_backward / pama_statistics)
  m.def("pama_statistics", &ops::pama_statistics,
        "the reduction pass alone: ([M, clipped, Q, G] float64, non-finite counts [3])", py::arg("logp"),
        py::arg("old_logp"), py::arg("advantages"), py::arg("mask"), py::arg("clip_eps"), py::arg("granularity"));
  m.def("pama_forward", &ops::pama_forward, "one reduction pass + solve: (loss, weights, row_scale, stats)",
        py::arg("logp"), py::arg("old_logp"), py::arg("advantages"), py::arg("mask"), py::arg("clip_eps"),
        py::arg("granularity"), py::arg("loss_agg"), py::arg("check_finite"));
  m.def("pama_backward", &ops::pama_backward, "one elementwise pass: grad_logp", py::arg("grad_loss"),
        py::arg("logp"), py::arg("old_logp"), py::arg("advantages"), py::arg("mask"), py::arg("weights"),
        py::arg("row_scale"), py::arg("clip_eps"), py::arg("granularity"));
  // csrc/solvers_cpu.cpp: the solvers of pama_math.h on their own
  m.def("min_norm_weights", &ops::min_norm_weights, "exact argmin over the simplex of c^T G c (float64)",
        py::arg("gram"));
  m.def("_min_norm_weights_info", &ops::min_norm_weights_info,
        "min_norm_weights with diagnostics: (weights, objective, kkt_residual, major, minor, status)",
        py::arg("gram"));
  m.def("theorem1", &ops::theorem1, "Theorem 1 weights along the last dimension (float64)", py::arg("a"));
  m.def("build_info", &build_info, "what this extension was compiled with");
  // csrc/gae_cpu.cpp: per-objective GAE (pama_ext/rl/gae.py)
  m.def("gae", &ops::gae,
        "per-objective GAE over [B, T, N] with a [B, T] bool mask: (advantages, returns); "
        "see pama_ext/rl/gae.py",
        py::arg("rewards"), py::arg("values"), py::arg("mask"), py::arg("gamma"), py::arg("lam"));
#ifdef PAMA_WITH_CUDA
  register_cuda_bindings(m);  // csrc/pama_cuda.cpp (CUDA builds only)
#endif
}
