// bindings.h: registration hooks of the source files that add ops to pama_ext._C.
//
// Each extra source file (beside pama_cpu.cpp, which owns PYBIND11_MODULE) defines one
// `register_*_bindings(m)` that adds its functions to the module, so the module body stays
// one line per file and the files stay independent of each other.
#pragma once

#include <torch/extension.h>

// csrc/gae_cpu.cpp: m.def("gae", ...), per-objective GAE over [B, T, N] (pama_ext/rl/gae.py).
void register_gae_bindings(pybind11::module_& m);
