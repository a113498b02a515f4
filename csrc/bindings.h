// bindings.h: registration hooks of the source files that add ops to pama_ext._C.
//
// bindings.cpp owns PYBIND11_MODULE and build_info; every other source file defines one
// `register_*_bindings(m)` that adds its functions to the module, so the module body stays
// one line per file and the files stay independent of each other.
#pragma once

// ATen (tensors, at::parallel_for) and pybind11 with torch's Tensor type casters: all that the
// bindings use. Not <torch/extension.h>: it also pulls in the whole C++ frontend (nn, optim,
// data), and parsing it took 50 s per file against 24 s for these two (g++ -O3, 2-core VM);
// four files include this header.
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

// csrc/pama_cpu.cpp: m.def("pama_forward" / "pama_backward"), the CPU kernels of the fused op
// (pama_ext/_ops.py registers them as the CPU implementation of pama_ext::pama_forward /
// pama_backward).
void register_cpu_bindings(pybind11::module_& m);
// csrc/pama_cpu.cpp: the CPU kernels' entries of build_info (block_tokens, specialised_n and
// the instruction sets: compiled, best on this CPU, chosen per call).
void add_cpu_build_info(pybind11::dict& d);

// csrc/solvers_cpu.cpp: m.def("min_norm_weights" / "_min_norm_weights_info" / "theorem1"), the
// solvers of pama_math.h on their own.
void register_solver_bindings(pybind11::module_& m);

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
