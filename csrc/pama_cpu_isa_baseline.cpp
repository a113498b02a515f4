// The fused CPU op's passes for the baseline instruction set: what the wheel's compiler flags
// allow (x86-64 SSE2, or aarch64's), so they run on every CPU the wheel installs on.
#include "pama_cpu_pass.h"

namespace pama_cpu::isa_baseline {
constexpr int kVecDoubles = 2, kVecRegs = 16;  // doubles per vector register, registers
#include "pama_cpu_kernels.h"
}  // namespace pama_cpu::isa_baseline
