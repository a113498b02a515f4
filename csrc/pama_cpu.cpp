// pama_cpu.cpp: the fused PAMA CPU op (checks, the run-time choice of instruction set, the
// solve between the passes, the loss): the pama_cpu_ops functions of cpu_ops.h that
// bindings.cpp adds to pama_ext._C. The passes over memory are in
// pama_cpu_kernels.h, compiled per instruction set by pama_cpu_isa_*.cpp.
//
// Contract: csrc/README.md (two passes over memory, the O(N^3) solve in between).
//   forward  = one reduction pass: per sequence, in double, M_b, S_{b,i}, Q_{b,i}, Smin_b and
//              the upper triangle of the Gram of I; then the solve; the loss is a dot product.
//   backward = one elementwise pass: g_t = -grad * r_b * s_t * (u_t if u_t <= 1+eps else 0).
//
// Determinism: the work is cut into fixed units that depend only on (B, T), never on the
// thread count: a unit is either a group of whole rows (T <= kBlock) or one kBlock-token
// segment of a row (T > kBlock), so no unit crosses a sequence boundary. Each unit writes
// its own slot and slots are reduced serially in index order, so every result is bitwise
// identical for any number of threads.
// Light ATen headers only, never <ATen/ATen.h> (cpu_ops.h says why): torch then
// fails the build if a header that pulls in every operator creeps back in.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <string>
#include <vector>

#include "cpu_ops.h"
#include "pama_checks.h"
#include "pama_cpu_pass.h"
#include "pama_math.h"

namespace {

using namespace pama_cpu;
using at::Tensor;

using pama_checks::Agg;
using pama_checks::Gran;

// What the forward pass must accumulate for a granularity (pama_cpu_pass.h's Mode).
Mode mode_of(Gran g) {
  switch (g) {
    case Gran::Batch: return Mode::Gram;
    case Gran::Token: return Mode::Min;
    default: return Mode::Mean;
  }
}

// ------------------------------------------------------------------------------ the kernels, per ISA
// csrc/pama_cpu_kernels.h is compiled three times on x86-64 with GCC (pama_cpu_isa_baseline.cpp,
// _avx2.cpp, _avx512.cpp): for the baseline (what the wheel's flags allow everywhere), for
// AVX2 + FMA and for AVX-512 (F, BW, VL, DQ); once elsewhere (aarch64, clang). `cpu_isa()`
// picks the best the CPU supports at run time;
// PAMA_EXT_CPU_ISA=baseline|avx2|avx512 forces one (read at every call, so tests can switch).
enum class Isa { Baseline, Avx2, Avx512 };

const char* isa_name(Isa i) {
  switch (i) {
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
    default: return "baseline";
  }
}

// The best instruction set this CPU runs and this build compiled, or the one
// PAMA_EXT_CPU_ISA asks for (never one the CPU lacks: that would be SIGILL).
Isa best_isa() {
#if PAMA_CPU_MULTI_ISA
  static const Isa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma"))
      return Isa::Avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
    return Isa::Baseline;
  }();
  return best;
#else
  return Isa::Baseline;
#endif
}

// The set for a call: PAMA_EXT_CPU_ISA's if given, else the best, for every N. (Until
// 2026-12-03 N = 5..7 and 16+ used AVX2: their 512-bit loops were no faster, because each
// 64-token chunk ended in a horizontal sum per Gram pair and the transposition of the
// advantages went element by element. With the lanes kept across chunks and the
// transposition done in register blocks, AVX-512 is the faster set for every N:
// benchmarks/README.md.)
Isa cpu_isa() {
  const Isa best = best_isa();
  const char* env = std::getenv("PAMA_EXT_CPU_ISA");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return best;
  Isa want = Isa::Baseline;
  if (std::strcmp(env, "avx2") == 0) want = Isa::Avx2;
  else if (std::strcmp(env, "avx512") == 0) want = Isa::Avx512;
  else TORCH_CHECK_VALUE(std::strcmp(env, "baseline") == 0, "PAMA_EXT_CPU_ISA must be auto, baseline, avx2 or avx512, got '", env, "'");
  return static_cast<int>(want) <= static_cast<int>(best) ? want : best;
}

// the storage dtype of a checked input (pama_checks allows these four)
Dtype dtype_of(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return Dtype::Float;
    case at::kDouble: return Dtype::Double;
    case at::kBFloat16: return Dtype::BFloat16;
    case at::kHalf: return Dtype::Half;
    default: TORCH_CHECK(false, "pama_ext: no CPU kernel for dtype ", x.scalar_type());
  }
}

// forward_pass / backward_pass of the chosen instruction set
void forward_pass_isa(Isa isa, Dtype dt, const FwdArgs& a, const Partition& p, bool bc, Mode mode, FwdPass& out) {
#if PAMA_CPU_MULTI_ISA
  if (isa == Isa::Avx512) return isa_avx512::forward_pass_entry(dt, a, p, bc, mode, out);
  if (isa == Isa::Avx2) return isa_avx2::forward_pass_entry(dt, a, p, bc, mode, out);
#endif
  (void)isa;
  return isa_baseline::forward_pass_entry(dt, a, p, bc, mode, out);
}

void backward_pass_isa(Isa isa, Dtype dt, bool token, const BwdArgs& a, const Partition& p, bool bc) {
#if PAMA_CPU_MULTI_ISA
  if (isa == Isa::Avx512) return isa_avx512::backward_pass_entry(dt, token, a, p, bc);
  if (isa == Isa::Avx2) return isa_avx2::backward_pass_entry(dt, token, a, p, bc);
#endif
  (void)isa;
  return isa_baseline::backward_pass_entry(dt, token, a, p, bc);
}

// ------------------------------------------------------------------------------ checks
// The CPU kernels' side of the checks shared with the CUDA glue (pama_checks.h).
bool on_cpu(const Tensor&, const Tensor& x) { return x.device().is_cpu(); }
constexpr pama_checks::Target kCpuTarget{&on_cpu, "the CPU kernel needs CPU tensors", PAMA_MAX_N,
                                         /*joint_shape_message=*/false, /*dtype_error_name=*/nullptr};

// ------------------------------------------------------------------------------ the reduction pass
// The forward pass of the chosen instruction set over checked inputs, and its counts summed
// over units in index order: [clipped, nf_logp, nf_old_logp, nf_adv].
struct Reduction {
  FwdPass pass;
  Partition part;
  double counts[kCounts] = {0, 0, 0, 0};
};

// factor: for Mode::Min, an acc-dtype [B, T] tensor the pass fills with the token gradient
// factor (pama_forward), or undefined (pama_statistics).
Reduction reduce_pass(const Tensor& logp, const Tensor& old_logp, const Tensor& advantages, const Tensor& mask,
                      double clip_eps, Mode mode, const Tensor& factor = Tensor()) {
  const int64_t B = logp.size(0), T = logp.size(1);
  const int n = static_cast<int>(advantages.size(-1));
  const bool bc = advantages.dim() == 2;
  Reduction r;
  r.part = make_partition(B, T);
  const Isa isa = cpu_isa();
  FwdArgs args{logp.data_ptr(), old_logp.data_ptr(), advantages.data_ptr(), reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()),
               T, n, 1.0 + clip_eps, factor.defined() ? factor.data_ptr() : nullptr};
  forward_pass_isa(isa, dtype_of(logp), args, r.part, bc, mode, r.pass);
  for (int64_t u = 0; u < r.part.units; ++u)
    for (int k = 0; k < kCounts; ++k) r.counts[k] += r.pass.slots[u * r.pass.slot_stride + k];
  return r;
}

// batch: the token Gram, the units' upper triangles summed in unit order, as a full n x n
std::vector<double> token_gram(const Reduction& r, int n) {
  const int nG = tri_size(n);
  std::vector<double> gu(nG, 0.0);
  for (int64_t u = 0; u < r.part.units; ++u) {
    const double* g = r.pass.slots.data() + u * r.pass.slot_stride + r.pass.gram_off;
    for (int k = 0; k < nG; ++k) gu[k] += g[k];
  }
  std::vector<double> G(static_cast<size_t>(n) * n);
  for (int i = 0, k = 0; i < n; ++i)
    for (int j = i; j < n; ++j, ++k) G[i * n + j] = G[j * n + i] = gu[k];
  return G;
}

// sequence_gram: each response counts once: v_b = Q_b / M_b (rows without a valid token
// contribute nothing), G = sum_b v_b v_b^T (upper triangle, rows in index order)
std::vector<double> sequence_gram(const double* rows, int64_t B, int n) {
  const int R = row_stride(n);
  std::vector<double> G(static_cast<size_t>(n) * n, 0.0);
  double v[PAMA_MAX_N];
  for (int64_t b = 0; b < B; ++b) {
    const double mb = rows[b * R];
    if (!(mb > 0.0)) continue;
    for (int i = 0; i < n; ++i) v[i] = rows[b * R + 2 + n + i] / mb;
    for (int i = 0; i < n; ++i)
      for (int j = i; j < n; ++j) G[i * n + j] += v[i] * v[j];
  }
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < i; ++j) G[i * n + j] = G[j * n + i];
  return G;
}

}  // namespace

// ------------------------------------------------------------------------------ ops
namespace pama_cpu_ops {

std::tuple<Tensor, Tensor, Tensor, Tensor> pama_forward(const Tensor& logp, const Tensor& old_logp,
                                                       const Tensor& advantages, const Tensor& mask,
                                                       double clip_eps, const std::string& granularity,
                                                       const std::string& loss_agg, bool check_finite) {
  pama_checks::check_inputs(kCpuTarget, "pama_forward", logp, old_logp, advantages, mask);
  const Gran gran = pama_checks::parse_granularity(granularity);
  const Agg agg = pama_checks::parse_loss_agg(loss_agg);
  pama_checks::check_clip_eps(clip_eps);
  const int64_t B = logp.size(0);
  const int n = static_cast<int>(advantages.size(-1));
  const auto acc = pama_checks::acc_dtype_of(logp);
  // token: the weights output is the [B, T] gradient factor, written by the pass
  const Tensor factor = gran == Gran::Token ? new_cpu_tensor(logp.sizes(), acc) : Tensor();
  const Reduction red = reduce_pass(logp, old_logp, advantages, mask, clip_eps, mode_of(gran), factor);
  const FwdPass& pass = red.pass;
  const double* counts = red.counts;
  const int R = row_stride(n);
  // Non-finite tokens at masked positions: raise (check_finite) naming the first offender.
  if (check_finite) {
    static const char* names[3] = {"logp", "old_logp", "advantages"};
    for (int k = 0; k < 3; ++k)
      TORCH_CHECK_VALUE(counts[1 + k] == 0.0, "pama_loss: `", names[k], "` has ",
                        static_cast<int64_t>(counts[1 + k]),
                        " non-finite value(s) at masked positions; pass nonfinite='mask' to drop such tokens "
                        "instead");
  }
  const double* rows = pass.rows.data();
  double M = 0.0;
  int64_t nonempty = 0;
  for (int64_t b = 0; b < B; ++b) {
    M += rows[b * R];
    nonempty += rows[b * R] > 0.0;
  }

  // weights (double) used by the loss after rounding to the acc dtype, so that the loss is
  // exactly -sum_b r_b sum_i c_i S_{b,i} for the returned weights and row scales
  std::vector<double> c;  // [N] or [B, N]
  double objective = 0.0, kkt = 0.0;
  if (gran == Gran::Batch || gran == Gran::SequenceGram) {
    const std::vector<double> G = gran == Gran::Batch ? token_gram(red, n) : sequence_gram(rows, B, n);
    c.resize(n);
    auto sc = std::make_unique<pama::MinNormScratch>();
    pama::min_norm_weights(G.data(), n, c.data(), sc.get());
    pama::quad_objective_kkt(G.data(), n, c.data(), &objective, &kkt);
  } else if (gran == Gran::BatchMean) {
    std::vector<double> a(n, 0.0);
    for (int64_t b = 0; b < B; ++b)
      for (int i = 0; i < n; ++i) a[i] += rows[b * R + 2 + n + i];
    for (int i = 0; i < n; ++i) a[i] = M > 0.0 ? a[i] / M : 0.0;
    c.resize(n);
    pama::theorem1(a.data(), n, c.data());
    double s = 0.0;
    for (int i = 0; i < n; ++i) s += c[i] * a[i];
    objective = s * s;
  } else if (gran == Gran::Sequence) {
    c.assign(static_cast<size_t>(B) * n, 0.0);
    std::vector<double> per_row(B, 0.0);
    at::parallel_for(0, B, 4096, [&](int64_t b0, int64_t b1) {
      double a[PAMA_MAX_N];
      for (int64_t b = b0; b < b1; ++b) {
        const double mb = rows[b * R];
        for (int i = 0; i < n; ++i) a[i] = mb > 0.0 ? rows[b * R + 2 + n + i] / mb : 0.0;
        double* cb = c.data() + b * n;
        pama::theorem1(a, n, cb);
        double s = 0.0;
        for (int i = 0; i < n; ++i) s += cb[i] * a[i];
        per_row[b] = s * s;
      }
    });
    double tot = 0.0;
    for (int64_t b = 0; b < B; ++b)
      if (rows[b * R] > 0.0) tot += per_row[b];
    objective = nonempty > 0 ? tot / static_cast<double>(nonempty) : 0.0;
  }

  // row scales
  Tensor row_scale_d = new_cpu_tensor({B}, at::kDouble);
  double* rs = row_scale_d.data_ptr<double>();
  for (int64_t b = 0; b < B; ++b) {
    const double mb = rows[b * R];
    if (agg == Agg::TokenMean)
      rs[b] = M > 0.0 ? 1.0 / M : 0.0;
    else
      rs[b] = mb > 0.0 ? 1.0 / (static_cast<double>(nonempty) * mb) : 0.0;
  }
  Tensor row_scale = row_scale_d.to(acc);
  Tensor weights;
  if (gran == Gran::Token) {
    weights = factor;
  } else {
    Tensor wd = gran == Gran::Sequence ? new_cpu_tensor({B, n}, at::kDouble) : new_cpu_tensor({n}, at::kDouble);
    std::copy(c.begin(), c.end(), wd.data_ptr<double>());
    weights = wd.to(acc);
  }
  // loss = -sum_b r_b sum_i c_i S_{b,i}  (or -sum_b r_b Smin_b), with the rounded outputs
  const Tensor rsr = row_scale.to(at::kDouble);
  const Tensor wr = gran == Gran::Token ? Tensor() : weights.to(at::kDouble);
  const double* r_used = rsr.data_ptr<double>();
  const double* c_used = wr.defined() ? wr.data_ptr<double>() : nullptr;
  double loss = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    const double* row = rows + b * R;
    double v;
    if (gran == Gran::Token) {
      v = row[1];
    } else {
      const double* cb = c_used + (gran == Gran::Sequence ? b * n : 0);
      v = 0.0;
      for (int i = 0; i < n; ++i) v += cb[i] * row[2 + i];
    }
    loss += r_used[b] * v;
  }
  loss = -loss;
  if (loss == 0.0) loss = 0.0;  // no -0.0

  Tensor stats = new_cpu_tensor({8}, at::kDouble);
  double* st = stats.data_ptr<double>();
  st[0] = M;
  st[1] = counts[0];
  st[2] = counts[1];
  st[3] = counts[2];
  st[4] = counts[3];
  st[5] = objective;
  st[6] = kkt;
  st[7] = static_cast<double>(nonempty);
  Tensor loss_d = new_cpu_tensor({}, at::kDouble);
  *loss_d.data_ptr<double>() = loss;
  Tensor loss_t = loss_d.to(acc);
  return {loss_t, weights, row_scale, stats};
}

Tensor pama_backward(const Tensor& grad_loss, const Tensor& logp, const Tensor& old_logp, const Tensor& advantages,
                     const Tensor& mask, const Tensor& weights, const Tensor& row_scale, double clip_eps,
                     const std::string& granularity) {
  pama_checks::check_inputs(kCpuTarget, "pama_backward", logp, old_logp, advantages, mask);
  const Gran gran = pama_checks::parse_granularity(granularity);
  const int64_t B = logp.size(0), T = logp.size(1);
  const int n = static_cast<int>(advantages.size(-1));
  const bool bc = advantages.dim() == 2;
  const auto acc = pama_checks::acc_dtype_of(logp);
  pama_checks::check_grad_loss(grad_loss);
  const double go = grad_loss.to(at::kDouble).item<double>();
  // weights and row scales are read in the per-token precision (= the acc dtype)
  const Tensor rsc = row_scale.to(at::kCPU, acc).contiguous();
  pama_checks::check_row_scale(rsc, B);
  Tensor wc;
  bool per_row = false;
  if (gran != Gran::Token) {
    wc = weights.to(at::kCPU, acc).contiguous();
    per_row = gran == Gran::Sequence;
    pama_checks::check_weights(wc, B, n, per_row, granularity);
  }
  Tensor grad = new_cpu_tensor(logp.sizes(), logp.scalar_type());  // logp is contiguous (checked)
  if (logp.numel() == 0) return grad;
  const Partition part = make_partition(B, T);
  const Isa isa = cpu_isa();
  BwdArgs args{logp.data_ptr(), old_logp.data_ptr(), advantages.data_ptr(), reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()),
               grad.data_ptr(), T, n, 1.0 + clip_eps, wc.defined() ? wc.data_ptr() : nullptr, per_row,
               rsc.data_ptr(), go};
  const bool token = gran == Gran::Token;
  backward_pass_isa(isa, dtype_of(logp), token, args, part, bc);
  return grad;
}

// pama_ext::pama_statistics on CPU: the forward's reduction pass alone, no solve and no loss
// (pama_ext/statistics.py): ([M, clipped, Q_1..Q_N, G (N x N, row-major)] float64, the
// non-finite counts of logp, old_logp, advantages at masked positions, float64 [3]).
// batch: the token Gram; sequence_gram: the Gram of the per-response means; batch_mean: G = 0.
std::tuple<Tensor, Tensor> pama_statistics(const Tensor& logp, const Tensor& old_logp, const Tensor& advantages,
                                           const Tensor& mask, double clip_eps, const std::string& granularity) {
  pama_checks::check_inputs(kCpuTarget, "pama_statistics", logp, old_logp, advantages, mask);
  const Gran gran = pama_checks::parse_granularity(granularity);
  TORCH_CHECK_VALUE(gran == Gran::Batch || gran == Gran::BatchMean || gran == Gran::SequenceGram,
                    "pama_statistics: granularity must be 'batch', 'batch_mean' or 'sequence_gram', got '",
                    granularity, "'");
  pama_checks::check_clip_eps(clip_eps);
  const int64_t B = logp.size(0);
  const int n = static_cast<int>(advantages.size(-1));
  const Reduction red = reduce_pass(logp, old_logp, advantages, mask, clip_eps, mode_of(gran));
  const int R = row_stride(n);
  const double* rows = red.pass.rows.data();
  Tensor out = new_cpu_tensor({2 + n + static_cast<int64_t>(n) * n}, at::kDouble);
  double* o = out.data_ptr<double>();
  std::fill(o, o + out.numel(), 0.0);
  for (int64_t b = 0; b < B; ++b) {  // rows in index order
    o[0] += rows[b * R];
    for (int i = 0; i < n; ++i) o[2 + i] += rows[b * R + 2 + n + i];
  }
  o[1] = red.counts[0];
  if (gran != Gran::BatchMean) {
    const std::vector<double> G = gran == Gran::Batch ? token_gram(red, n) : sequence_gram(rows, B, n);
    std::copy(G.begin(), G.end(), o + 2 + n);
  }
  Tensor nonfinite = new_cpu_tensor({3}, at::kDouble);
  std::copy(red.counts + 1, red.counts + 4, nonfinite.data_ptr<double>());
  return {out, nonfinite};
}

CpuKernelInfo cpu_kernel_info() {
  CpuKernelInfo info;
  info.block_tokens = kBlock;
  info.specialised_n = {1, 2, 3, 4, 8};
  // the CPU kernels' instruction sets: compiled, the best this CPU runs, and the one a call
  // uses now (PAMA_EXT_CPU_ISA can force a lower one)
  info.isa_compiled = {"baseline"};
#if PAMA_CPU_MULTI_ISA
  info.isa_compiled.push_back("avx2");
  info.isa_compiled.push_back("avx512");
#endif
  info.isa_best = isa_name(best_isa());
  info.isa = isa_name(cpu_isa());
  info.isa_large_n = info.isa;  // every N uses the same set since 2026-12-03 (cpu_isa)
  return info;
}

}  // namespace pama_cpu_ops
