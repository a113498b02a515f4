// bindings.h: registration hooks of the source files that add ops to pama_ext._C.
//
// Each extra source file (beside pama_cpu.cpp, which owns PYBIND11_MODULE) defines one
// `register_*_bindings(m)` that adds its functions to the module, so the module body stays
// one line per file and the files stay independent of each other.
#pragma once

#include <torch/extension.h>

// csrc/gae_cpu.cpp: m.def("gae", ...), per-objective GAE over [B, T, N] (pama_ext/rl/gae.py).
void register_gae_bindings(pybind11::module_& m);

#ifdef PAMA_WITH_CUDA
// csrc/pama_cuda.cpp (built only when torch has CUDA, setup.py defines PAMA_WITH_CUDA):
// m.def("pama_forward_cuda" / "pama_backward_cuda"), the CUDA kernels of the fused op,
// registered as the CUDA implementation of pama_ext::pama_forward / pama_backward by
// pama_ext/_ops.py.
void register_cuda_bindings(pybind11::module_& m);
// CUDART_VERSION the kernels were compiled with (pama_cuda_kernels.cu), for build_info.
int pama_cuda_runtime_version();
#endif
