// The fused CPU op's passes for AVX-512 (F, BW, VL, DQ) + AVX2 + FMA (x86-64 with GCC; empty
// elsewhere). A pragma, not a flag, for the reason given in pama_cpu_isa_avx2.cpp.
#include "pama_cpu_pass.h"

#if PAMA_CPU_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
namespace pama_cpu::isa_avx512 {
constexpr int kVecDoubles = 8, kVecRegs = 32;  // doubles per vector register, registers
#define PAMA_CPU_AVX512 1  // this copy may use AVX-512 intrinsics (a pragma defines no __AVX512F__ in C++)
#include "pama_cpu_kernels.h"
#undef PAMA_CPU_AVX512
}  // namespace pama_cpu::isa_avx512
#pragma GCC pop_options
#endif
