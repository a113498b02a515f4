// The fused CPU op's passes for AVX2 + FMA (x86-64 with GCC; empty elsewhere). The target is a
// pragma, not a -mavx2 flag on this file, so that only this file's own functions use the set:
// the inline functions of the headers above it (torch's, the standard library's) keep the
// baseline and cannot leak AVX2 code into the baseline path through the linker.
#include "pama_cpu_pass.h"

#if PAMA_CPU_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace pama_cpu::isa_avx2 {
constexpr int kVecDoubles = 4, kVecRegs = 16;  // doubles per vector register, registers
#include "pama_cpu_kernels.h"
}  // namespace pama_cpu::isa_avx2
#pragma GCC pop_options
#endif
