// bindings.cpp: the pybind11 module pama_ext._C and its build_info.
//
// The ops live in the other source files, each adding its own through a register_*_bindings
// hook (bindings.h), so this file knows no kernel: it fixes the module's contents and the
// order the ops are added in, and reports how the extension was compiled.
#include "bindings.h"

#include <ATen/Parallel.h>
#include <torch/version.h>  // TORCH_VERSION

#include <string>

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
  add_cpu_build_info(d);  // csrc/pama_cpu.cpp: block_tokens, specialised_n, cpu_isa*
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pama_ext._C: fused PAMA CPU kernels (see csrc/README.md)";
  register_cpu_bindings(m);     // csrc/pama_cpu.cpp: pama_forward, pama_backward
  register_solver_bindings(m);  // csrc/solvers_cpu.cpp: min_norm_weights, _min_norm_weights_info, theorem1
  m.def("build_info", &build_info, "what this extension was compiled with");
  register_gae_bindings(m);  // csrc/gae_cpu.cpp: gae
#ifdef PAMA_WITH_CUDA
  register_cuda_bindings(m);  // csrc/pama_cuda.cpp (CUDA builds only)
#endif
}
