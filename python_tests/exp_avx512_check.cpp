// The AVX-512 ratio loop's exp (exp_f32_x16) against the scalar exp_f32 it replaces, on every
// one of the 2^32 float bit patterns. Built and run by python_tests/test_cpu_isa.py with
// setup.py's optimisation flags, inside the same target pragma and namespace layout as
// csrc/pama_cpu_isa_avx512.cpp, so that GCC makes the same FMA contractions as in the
// extension. Prints the number of inputs whose results differ in any bit; exit status 0
// when none do.
#include "pama_cpu_pass.h"

#include <cstdio>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
namespace pama_cpu::isa_check {
constexpr int kVecDoubles = 8, kVecRegs = 32;
#define PAMA_CPU_AVX512 1
#include "pama_cpu_kernels.h"
#undef PAMA_CPU_AVX512
__attribute__((noinline)) void scalar16(const float* x, float* out) {
  for (int l = 0; l < 16; ++l) out[l] = exp_f32(x[l]);
}
__attribute__((noinline)) void vector16(const float* x, float* out) {
  _mm512_storeu_ps(out, exp_f32_x16(_mm512_loadu_ps(x)));
}
}  // namespace pama_cpu::isa_check
#pragma GCC pop_options

int main() {
  using namespace pama_cpu::isa_check;
  alignas(64) float x[16], a[16], b[16];
  unsigned long long differ = 0;
  for (unsigned long long base = 0; base < (1ull << 32); base += 16) {
    for (int l = 0; l < 16; ++l) {
      const uint32_t bits = static_cast<uint32_t>(base + l);
      std::memcpy(&x[l], &bits, 4);
    }
    scalar16(x, a);
    vector16(x, b);
    if (std::memcmp(a, b, sizeof a) != 0)
      for (int l = 0; l < 16; ++l)
        if (std::memcmp(&a[l], &b[l], 4) != 0 && differ++ < 5) std::printf("x=%a exp_f32=%a x16=%a\n", x[l], a[l], b[l]);
  }
  std::printf("%llu of 2^32 inputs differ\n", differ);
  return differ != 0;
}
