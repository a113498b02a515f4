// bindings.h: pybind11 with torch's Tensor type casters, for the files that bind to Python:
// bindings.cpp (PYBIND11_MODULE, the CPU ops of cpu_ops.h, build_info) and, in CUDA builds,
// pama_cuda.cpp through its registration hook below.
//
// The CPU sources include cpu_ops.h instead: these headers cost about 19 s of g++ -O3 per
// file, against 3 s for <ATen/core/Tensor.h>. Not <torch/extension.h> here either: it also
// pulls in the whole C++ frontend (nn, optim, data), 50 s per file.
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#ifdef PAMA_WITH_CUDA
// csrc/pama_cuda.cpp (built only when torch has CUDA, setup.py defines PAMA_WITH_CUDA):
// m.def("pama_forward_cuda" / "pama_backward_cuda"), the CUDA kernels of the fused op,
// registered as the CUDA implementation of pama_ext::pama_forward / pama_backward by
// pama_ext/_ops.py.
void register_cuda_bindings(pybind11::module_& m);
// CUDART_VERSION the kernels were compiled with (pama_cuda_kernels.cu), for build_info.
int pama_cuda_runtime_version();
#endif
