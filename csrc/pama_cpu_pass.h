// pama_cpu_pass.h: what the fused CPU op's dispatcher (pama_cpu.cpp) and its per-ISA passes
// (pama_cpu_isa_*.cpp, each compiling pama_cpu_kernels.h for one instruction set) share: the
// partition of the work into units, the kernels' argument and result structs, and the entry
// points of each instruction set's passes.
//
// The passes live in their own translation units so that a parallel build (MAX_JOBS) compiles
// the instruction sets side by side instead of one after another in one file, and so that
// these units include no more of torch than at::parallel_for and the 16-bit float types.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "pama_math.h"

// x86-64 with GCC: the passes are compiled for the baseline, AVX2 + FMA and AVX-512;
// elsewhere (aarch64, clang) for the baseline only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PAMA_CPU_MULTI_ISA 1
#include <immintrin.h>  // the AVX-512 file's explicit ratio loop (pama_cpu_kernels.h, ratios_x16)
#else
#define PAMA_CPU_MULTI_ISA 0
#endif

namespace pama_cpu {

constexpr int64_t kBlock = 2048;  // tokens per work unit

// What the forward pass must accumulate: S + Q + Gram (batch; Q for pama_statistics), S + Q
// (sequence, batch_mean, sequence_gram: its Gram is built from the per-row means Q_b / M_b
// after the pass), Smin (token). Accumulating only what the granularity needs is an optimisation; the
// statistics it does accumulate are the ones the contract defines.
enum class Mode { Gram, Mean, Min };

// ------------------------------------------------------------------------------ partition
struct Partition {
  int64_t B = 0, T = 0;
  int64_t rows_per_unit = 1;  // T <= kBlock: whole rows per unit
  int64_t segs = 1;           // T > kBlock: segments per row
  int64_t units = 0;
};

inline Partition make_partition(int64_t B, int64_t T) {
  Partition p;
  p.B = B;
  p.T = T;
  if (T > kBlock) {
    p.segs = (T + kBlock - 1) / kBlock;
    p.units = B * p.segs;
  } else {
    p.rows_per_unit = std::max<int64_t>(1, kBlock / std::max<int64_t>(T, 1));
    p.units = (B + p.rows_per_unit - 1) / p.rows_per_unit;
  }
  return p;
}

// Calls f(b, t0, t1) for every row piece of unit u, in a fixed order.
template <typename F>
inline void for_each_piece(const Partition& p, int64_t u, F&& f) {
  if (p.segs > 1) {
    const int64_t b = u / p.segs, s = u % p.segs;
    const int64_t t0 = s * kBlock, t1 = std::min(p.T, t0 + kBlock);
    f(b, t0, t1);
  } else {
    const int64_t r0 = u * p.rows_per_unit, r1 = std::min(p.B, r0 + p.rows_per_unit);
    for (int64_t b = r0; b < r1; ++b) f(b, int64_t(0), p.T);
  }
}

inline int tri_size(int n) { return n * (n + 1) / 2; }

// ------------------------------------------------------------------------------ kernel arguments
// Shared by every instruction set's kernels (csrc/pama_cpu_kernels.h) and the ops below.
// Per-row statistics layout (double): [M_b, Smin_b, S_{b,0..n-1}, Q_{b,0..n-1}].
inline int row_stride(int n) { return 2 + 2 * n; }
// Per-unit slot layout (double): [clipped, nf_logp, nf_old_logp, nf_adv, G upper (n(n+1)/2
// for Mode::Gram), row partial (row_stride, only when rows are split into segments)].
constexpr int kCounts = 4;

struct FwdArgs {
  const void* logp;
  const void* old_logp;
  const void* adv;
  const uint8_t* mask;  // the bool mask read as bytes: bool loads do not vectorise
  int64_t T;
  int n;
  double one_plus_eps;
  // Mode::Min (token) only, else null: op_t [B, T], written f_t = s_t u_t 1[u_t <= 1+eps]
  // (0 at invalid tokens), the gradient factor the backward multiplies (csrc/README.md)
  void* factor = nullptr;
};

struct FwdPass {
  std::vector<double> rows;   // [B, row_stride]
  std::vector<double> slots;  // [units, slot_stride]
  int slot_stride = 0;
  int gram_off = kCounts;
  int rowpart_off = 0;
};

struct BwdArgs {
  const void* logp;
  const void* old_logp;
  const void* adv;
  const uint8_t* mask;  // the bool mask read as bytes: bool loads do not vectorise
  void* grad;
  int64_t T;
  int n;
  double one_plus_eps;
  const void* weights;    // op_t: [N] (shared), [B, N] (per row) or null (token)
  bool weights_per_row;
  const void* row_scale;  // op_t [B]
  double grad_out;
};

// The storage dtype of logp / old_logp / advantages (the grad has logp's). The passes compute
// in op_t = double for Double, float for the others.
enum class Dtype { Float, Double, BFloat16, Half };

// ------------------------------------------------------------------------------ per-ISA entry points
// Defined at the end of pama_cpu_kernels.h, once per instruction set (pama_cpu_isa_*.cpp);
// a set may only be called on a CPU that runs it (pama_cpu.cpp's cpu_isa).
#define PAMA_CPU_PASS_ENTRIES                                                                      \
  void forward_pass_entry(Dtype dt, const FwdArgs& a, const Partition& p, bool bc, Mode mode,     \
                          FwdPass& out);                                                           \
  void backward_pass_entry(Dtype dt, bool token, const BwdArgs& a, const Partition& p, bool bc);
namespace isa_baseline {
PAMA_CPU_PASS_ENTRIES
}  // namespace isa_baseline
#if PAMA_CPU_MULTI_ISA
namespace isa_avx2 {
PAMA_CPU_PASS_ENTRIES
}  // namespace isa_avx2
namespace isa_avx512 {
PAMA_CPU_PASS_ENTRIES
}  // namespace isa_avx512
#endif
#undef PAMA_CPU_PASS_ENTRIES

}  // namespace pama_cpu
