// driver.cpp: runs the real reduce and finalise kernels of csrc/pama_cuda_kernels.cu on CPU,
// under the CUDA block emulator of emu.h, and checks them. Built and fed by emulate.py.
//
// Why: CI has no GPU; this is how the kernel bodies are executed and checked in CI (see
// emu.h for what the emulation models and what it does not).
//
// Input (stdin), one config per line:  dtype mode layout force_any B T N seed
//   dtype f64 | f32 | bf16 | f16; mode gram | mean | min; layout btn ([B,T,N] advantages)
//   | bn ([B,N]); force_any 0 | 1 (reduce_kernel_any for every N instead of launch_reduce's
//   choice; ignored for bn). Empty lines and lines starting with '#' are skipped.
// For each config, with inputs drawn from `seed`:
//   1. the reduce kernel runs under the three schedules (forward, reverse, random) on
//      NaN-filled outputs; the three results must be bitwise equal (a race or a missing
//      barrier makes them differ), and every unit slot and row partial must match a
//      long-double reference within 1e-12 of the sum of |terms| (counts exactly); for mode
//      min (granularity "token") also the [B, T] gradient factor the reduce kernels write (the
//      forward's weights), NaN-filled before each run: bitwise equal across the schedules and,
//      for every element, bitwise equal to the reference computed in op_t exactly as specified,
//      f = valid && u <= 1+eps ? op_t(s * u) : +0 (s from token_rule below, independent of
//      pama::token_min), which is also checked to be within one op_t ulp (relative) of the
//      long-double product s * u: masked-out, non-finite and clipped tokens must be exactly +0;
//   2. finalise_kernel runs on that result under the three schedules, for `batch` (gram)
//      and `sequence_gram` (mean mode, chosen at random with `sequence` and `batch_mean`)
//      also with the solver scratch in dynamic shared memory (as launch_finalise does for
//      N >= 3): all variants must be bitwise equal and the loss finite; for `sequence_gram`
//      the objective and KKT residual must also hold for a long-double Gram of the row means.
// Output (stdout): "ok <config>" or "FAIL <config>" per config, then one line
//   "summary configs=.. failed=.. finalise_smem_checked=.. finalise_sequence_gram_checked=..
//   factor_checked=.. factor_nonzero=.. factor_clipped_zero=.. factor_invalid_zero=.." (token
//   factor elements checked: all, non-zero ones, exact zeros of valid clipped tokens, of
//   invalid tokens); exit status 1 if any failed.
// The emulator itself aborts (EMU FAIL on stderr) on a deadlock, a divergent barrier or a
// shared-memory index out of bounds; the config being run is then the last one echoed on stderr.
#include "emu.h"
// the device part of csrc/pama_cuda_kernels.cu, cut and rewritten by emulate.py
#include "pama_cuda_kernels.emu.inc"

#include <cmath>
#include <iostream>
#include <sstream>
#include <string>
#include <type_traits>

using namespace pama_cuda;

namespace {

template <class S> S from_double(double x);
template <> float from_double<float>(double x) { return (float)x; }
template <> double from_double<double>(double x) { return x; }
template <> __half from_double<__half>(double x) { return __float2half_rn((float)x); }
template <> __nv_bfloat16 from_double<__nv_bfloat16>(double x) { return __float2bfloat16_rn((float)x); }
template <class O, class S> O to_op(S x) { return static_cast<O>(x); }
template <> float to_op<float, __half>(__half x) { return __half2float(x); }
template <> float to_op<float, __nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

struct Config {
  std::string line;  // as read, for messages
  std::string dtype;
  int mode = 0;
  bool broadcast = false;  // [B,N] advantages
  bool force_any = false;
  long B = 0, T = 0;
  int n = 1;
  unsigned long seed = 0;
};

bool g_failed = false;  // the current config failed
long g_smem_checked = 0;  // configs whose finalise compared shared vs global solver scratch
long g_seqgram_checked = 0;  // configs whose sequence_gram finalise was checked against the long-double Gram
// token factor elements checked (all; non-zero; zero as valid but clipped; zero as invalid)
long g_factor_checked = 0, g_factor_nonzero = 0, g_factor_clipped_zero = 0, g_factor_invalid_zero = 0;
#define CHECK(cond, ...)                  \
  do {                                    \
    if (!(cond)) {                        \
      fprintf(stderr, __VA_ARGS__);       \
      fprintf(stderr, "\n");              \
      g_failed = true;                    \
    }                                     \
  } while (0)

// a heap buffer of exactly `count` elements (at least one byte allocated)
template <class T> T* alloc(long count) { return static_cast<T*>(malloc(sizeof(T) * (count > 0 ? count : 1))); }

template <class S, class O, int MODE>
void launch_reduce_emulated(const ReduceArgs& ra, bool broadcast, int n, bool force_any, unsigned grid) {
  if (broadcast) return emu::launch(grid, kThreads, [&] { reduce_kernel_bc<S, O, MODE>(ra); });
  if (!force_any) switch (n) {  // the specialisations launch_reduce uses
      case 1: return emu::launch(grid, kThreads, [&] { reduce_kernel_nt<S, O, 1, MODE>(ra); });
      case 2: return emu::launch(grid, kThreads, [&] { reduce_kernel_nt<S, O, 2, MODE>(ra); });
      case 3: return emu::launch(grid, kThreads, [&] { reduce_kernel_nt<S, O, 3, MODE>(ra); });
      case 4: return emu::launch(grid, kThreads, [&] { reduce_kernel_nt<S, O, 4, MODE>(ra); });
      case 8: return emu::launch(grid, kThreads, [&] { reduce_kernel_nt<S, O, 8, MODE>(ra); });
    }
  emu::launch(grid, kThreads, [&] { reduce_kernel_any<S, O, MODE>(ra); });
}

// sequence_gram: the Gram of the per-row means v_b = Q_b / M_b in long double, from the row
// partials (segments summed); the returned weights must be on the simplex, the reported
// objective must be c^T G c and the KKT residual c^T G c - min_j (G c)_j ~ 0 (relative to
// max_j G_jj; the weights are rounded to acc_t, hence the looser float tolerance).
template <class acc_t>
void check_sequence_gram(const Config& c, const Partition& part, const double* rowpart, const acc_t* weights,
                         const double* stats) {
  const int n = c.n, R = row_stride(n);
  std::vector<long double> G((size_t)n * n, 0.0L), v(n);
  for (long b = 0; b < c.B; ++b) {
    long double mb = 0.0L;
    for (long s = 0; s < part.segs; ++s) mb += rowpart[(b * part.segs + s) * R];
    if (!(mb > 0.0L)) continue;
    for (int i = 0; i < n; ++i) {
      long double q = 0.0L;
      for (long s = 0; s < part.segs; ++s) q += rowpart[(b * part.segs + s) * R + 2 + n + i];
      v[i] = q / mb;
    }
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) G[i * n + j] += v[i] * v[j];
  }
  long double dmax = 0.0L, wsum = 0.0L, obj = 0.0L, gc_min = INFINITY;
  for (int i = 0; i < n; ++i) dmax = std::max(dmax, G[i * n + i]);
  for (int i = 0; i < n; ++i) {
    CHECK(std::isfinite((double)weights[i]) && (double)weights[i] >= 0.0, "sequence_gram weight %d = %g", i,
          (double)weights[i]);
    wsum += (long double)(double)weights[i];
  }
  const long double tol = std::is_same<acc_t, double>::value ? 1e-9L : 1e-5L;
  CHECK(fabsl(wsum - 1.0L) <= tol, "sequence_gram weights sum to %.17Lg", wsum);
  for (int i = 0; i < n; ++i) {
    long double gc = 0.0L;
    for (int j = 0; j < n; ++j) gc += G[i * n + j] * (long double)(double)weights[j];
    obj += (long double)(double)weights[i] * gc;
    gc_min = std::min(gc_min, gc);
  }
  CHECK(obj - gc_min <= tol * dmax + 1e-300L, "sequence_gram KKT residual %.3Lg > %.3Lg (max G_jj %.3Lg)",
        obj - gc_min, tol * dmax, dmax);
  CHECK(fabsl((long double)stats[5] - obj) <= tol * dmax + 1e-300L, "sequence_gram objective %.17g vs c'Gc %.17Lg",
        stats[5], obj);
  CHECK(stats[6] >= 0.0 && stats[6] <= 1e-9 * (double)dmax + 1e-300, "sequence_gram reported KKT residual %g",
        stats[6]);
  ++g_seqgram_checked;
}

// finalise on the reduce result under every schedule (and both scratch placements for the
// Gram solves)
template <class acc_t>
void check_finalise(const Config& c, int gran, int agg, const Partition& part, const double* slots, int slot_stride,
                    const double* rowpart) {
  const long B = c.B;
  const int n = c.n;
  const bool try_smem = (gran == kBatch || gran == kSequenceGram) && n >= 3;
  const long n_weights = gran == kSequence ? B * n : n;
  std::vector<std::vector<uint8_t>> outputs;
  for (int smem = 0; smem < (try_smem ? 2 : 1); ++smem)
    for (int sched = 0; sched < 3; ++sched) {
      double* G = alloc<double>((long)n * n);
      double* cvec = alloc<double>(n);
      auto* scratch = alloc<pama::MinNormScratch>(1);
      acc_t* loss = alloc<acc_t>(1);
      acc_t* weights = alloc<acc_t>(n_weights);
      acc_t* row_scale = alloc<acc_t>(B);
      double* stats = alloc<double>(8);
      for (long i = 0; i < n_weights; ++i) weights[i] = acc_t(-7);
      const size_t dyn_bytes = sizeof(pama::MinNormScratch) + sizeof(double) * (kMaxN * kMaxN + kMaxN);
      emu::dynamic_shared = smem ? static_cast<double*>(malloc(dyn_bytes)) : nullptr;
      if (emu::dynamic_shared) memset(emu::dynamic_shared, 0xFF, dyn_bytes);
      FinaliseArgs fa{};
      fa.B = B;
      fa.n = n;
      fa.gran = gran;
      fa.agg = agg;
      fa.part = part;
      fa.slots = slots;
      fa.slot_stride = slot_stride;
      fa.rowpart = rowpart;
      fa.G = G;
      fa.cvec = cvec;
      fa.mn_scratch = scratch;
      fa.smem_solver = smem != 0;
      fa.loss = loss;
      fa.weights = gran == kToken ? nullptr : weights;  // as launch_forward: token's are the reduce's
      fa.row_scale = row_scale;
      fa.stats = stats;
      emu::schedule = static_cast<emu::Schedule>(sched);
      emu::launch(1, kFinaliseThreads, [&] { finalise_kernel<acc_t>(fa); });
      std::vector<uint8_t> bytes;
      auto append = [&](const void* p, size_t nb) {
        bytes.insert(bytes.end(), (const uint8_t*)p, (const uint8_t*)p + nb);
      };
      append(loss, sizeof(acc_t));
      if (gran != kToken) append(weights, sizeof(acc_t) * n_weights);
      append(row_scale, sizeof(acc_t) * B);
      append(stats, sizeof(double) * 8);
      outputs.push_back(bytes);
      CHECK(std::isfinite((double)*loss), "non-finite loss from finalise (gran=%d smem=%d)", gran, smem);
      if (gran == kSequenceGram && smem == 0 && sched == 0) check_sequence_gram<acc_t>(c, part, rowpart, weights, stats);
      free(G); free(cvec); free(scratch); free(loss); free(weights); free(row_scale); free(stats);
      free(emu::dynamic_shared);
      emu::dynamic_shared = nullptr;
    }
  for (size_t k = 1; k < outputs.size(); ++k)
    CHECK(outputs[k] == outputs[0], "finalise variant %zu (smem=%zu, schedule=%zu) differs from variant 0 (gran=%d agg=%d)",
          k, k / 3, k % 3, gran, agg);
  if (try_smem) ++g_smem_checked;
}

// granularity "token", written out independently of pama::token_min: 0 if some advantage is
// negative, else the smallest positive one, 0 when every advantage is exactly 0 (they abstain)
template <class O, class S>
O token_rule(const S* ad, int n) {
  bool neg = false, pos = false;
  O mn = O(0);
  for (int i = 0; i < n; ++i) {
    const O x = to_op<O>(ad[i]);
    if (x < O(0)) neg = true;
    if (x > O(0)) {
      mn = pos ? std::min(mn, x) : x;
      pos = true;
    }
  }
  return (neg || !pos) ? O(0) : mn;
}

template <class S, class O, int MODE>
void check_config(const Config& c) {
  std::mt19937 rng(c.seed);
  const long B = c.B, T = c.T;
  const int n = c.n;
  const long n_tokens = B * T;
  const long n_adv = c.broadcast ? B * n : n_tokens * n;
  std::normal_distribution<double> normal(0, 1);
  std::uniform_real_distribution<double> uniform(0, 1);
  S* logp = alloc<S>(n_tokens);
  S* old_logp = alloc<S>(n_tokens);
  S* adv = alloc<S>(n_adv);
  uint8_t* mask = alloc<uint8_t>(n_tokens);
  const double inf = INFINITY, nan = NAN;
  auto nonfinite = [&]() { const double r = uniform(rng); return r < 0.4 ? inf : (r < 0.7 ? -inf : nan); };
  // 15 % of tokens masked out, 10 % of rows empty, +-inf / NaN also at masked-out positions
  for (long b = 0; b < B; ++b) {
    const bool empty_row = uniform(rng) < 0.1;
    for (long t = 0; t < T; ++t) {
      const long i = b * T + t;
      double x = -1 + 0.3 * normal(rng), y = x + 0.15 * normal(rng);
      if (uniform(rng) < 0.01) x = nonfinite();
      if (uniform(rng) < 0.01) y = nonfinite();
      logp[i] = from_double<S>(x);
      old_logp[i] = from_double<S>(y);
      mask[i] = (!empty_row && uniform(rng) < 0.85) ? 1 : 0;
    }
  }
  // exact zeros (+0.0 and -0.0; under granularity "token" such objectives abstain): 20 % of
  // the entries, and in some configs one whole objective column; in half the configs only
  // non-negative advantages, so that the abstention decides the tokens' values
  const bool nonneg = uniform(rng) < 0.5;
  const long zero_col = static_cast<long>(rng() % (2 * static_cast<unsigned>(n)));  // >= n: none
  for (long k = 0; k < n_adv; ++k) {
    double a = normal(rng);
    if (nonneg) a = std::fabs(a);
    if (uniform(rng) < 0.2 || k % n == zero_col) a = uniform(rng) < 0.5 ? 0.0 : -0.0;
    if (uniform(rng) < (c.broadcast ? 0.02 : 0.003)) a = nonfinite();
    adv[k] = from_double<S>(a);
  }
  const Partition part = make_partition(B, T);
  const int R = row_stride(n);
  const int slot_stride = kCounts + (MODE == kGram ? tri_size(n) : 0);
  const long n_slots = part.units * slot_stride, n_rowpart = B * part.segs * R;
  double* slots = alloc<double>(n_slots);
  double* rowpart = alloc<double>(n_rowpart);
  O* factor = MODE == kMin ? alloc<O>(n_tokens) : nullptr;  // token: the [B, T] gradient factor
  const double eps = 0.2;
  ReduceArgs ra{};
  ra.logp = logp;
  ra.old_logp = old_logp;
  ra.adv = adv;
  ra.mask = mask;
  ra.B = B;
  ra.T = T;
  ra.n = n;
  ra.one_plus_eps = 1.0 + eps;
  ra.part = part;
  ra.slots = slots;
  ra.slot_stride = slot_stride;
  ra.rowpart = rowpart;
  ra.factor = factor;

  // 1. reduce under the three schedules
  std::vector<double> result[3];  // slots then row partials
  std::vector<O> result_factor[3];  // token: the factor
  for (int sched = 0; sched < 3; ++sched) {
    for (long k = 0; k < n_slots; ++k) slots[k] = nan;
    for (long k = 0; k < n_rowpart; ++k) rowpart[k] = nan;
    if (factor)
      for (long k = 0; k < n_tokens; ++k) factor[k] = static_cast<O>(nan);  // a token not written stays NaN
    emu::schedule = static_cast<emu::Schedule>(sched);
    if (part.units > 0) launch_reduce_emulated<S, O, MODE>(ra, c.broadcast, n, c.force_any, (unsigned)part.units);
    result[sched].assign(slots, slots + n_slots);
    result[sched].insert(result[sched].end(), rowpart, rowpart + n_rowpart);
    if (factor) result_factor[sched].assign(factor, factor + n_tokens);
  }
  for (int sched = 1; sched < 3; ++sched) {
    CHECK(memcmp(result[0].data(), result[sched].data(), result[0].size() * sizeof(double)) == 0,
          "reduce result of schedule %d differs bitwise from schedule 0 (race or missing barrier)", sched);
    if (factor)
      CHECK(memcmp(result_factor[0].data(), result_factor[sched].data(), n_tokens * sizeof(O)) == 0,
            "token factor of schedule %d differs bitwise from schedule 0 (race or missing barrier)", sched);
  }
  int n_factor_mismatch = 0;

  // long-double reference from the same per-token op_t products (pama_math.h)
  const O thr = static_cast<O>(1.0 + eps);
  std::vector<long double> ref_slots(n_slots, 0), ref_rows(n_rowpart, 0);
  std::vector<long double> mag_slots(n_slots, 0), mag_rows(n_rowpart, 0);  // sum of |terms|
  std::vector<long double> sum_m(B * part.segs, 0), n_ind(B * part.segs, 0);
  for (long b = 0; b < B; ++b) {
    bool row_adv_finite = true;
    if (c.broadcast)
      for (int i = 0; i < n; ++i) row_adv_finite &= std::isfinite(to_op<O>(adv[b * n + i]));
    for (long t = 0; t < T; ++t) {
      const long idx = b * T + t;
      const long seg = part.segs > 1 ? t / kBlockTokens : 0;
      const long unit = part.segs > 1 ? b * part.segs + seg : b / part.rows_per_unit;
      const long rp = part.segs > 1 ? unit : b;
      const S* ad = c.broadcast ? adv + b * n : adv + idx * n;
      bool adv_finite = true;
      for (int i = 0; i < n; ++i) adv_finite &= std::isfinite(to_op<O>(ad[i]));
      const O x = to_op<O>(logp[idx]), y = to_op<O>(old_logp[idx]);
      const bool masked = mask[idx] != 0, logp_finite = std::isfinite(x), old_finite = std::isfinite(y);
      const bool valid = masked && logp_finite && old_finite && adv_finite;
      const O ratio = pama::ratio(x, y);
      const bool ind = pama::indicator(ratio, thr);
      const O m = valid ? pama::clipped_ratio(ratio, thr) : O(0);
      const bool weighted = valid && ind;
      if (MODE == kMin) {  // the gradient factor, as specified, in op_t; bitwise
        const O s_ref = valid ? token_rule<O>(ad, n) : O(0);
        const O want = weighted ? static_cast<O>(s_ref * ratio) : O(0);
        const O got = result_factor[0][idx];
        const long double exact = (long double)s_ref * (long double)ratio;
        // one op_t ulp relative (the rounding is at most half of it; long double holds a
        // float product exactly, a double product to 2^-64)
        const long double ulp = ldexpl(fabsl(exact), std::is_same<O, double>::value ? -52 : -23);
        const bool ok = memcmp(&got, &want, sizeof(O)) == 0 && (!weighted || fabsl((long double)got - exact) <= ulp);
        if (!ok) {
          if (n_factor_mismatch++ < 5)
            fprintf(stderr,
                    "token factor [%ld, %ld]: got %.17g, reference %.17g (valid %d, u %.9g, clipped %d, s %.9g)\n", b, t,
                    (double)got, (double)want, (int)valid, (double)ratio, (int)!ind, (double)s_ref);
          g_failed = true;
        }
        ++g_factor_checked;
        g_factor_nonzero += want != O(0);
        g_factor_clipped_zero += valid && !ind;
        g_factor_invalid_zero += !valid;
      }
      long double* slot = &ref_slots[unit * slot_stride];
      long double* slot_mag = &mag_slots[unit * slot_stride];
      slot[0] += valid && !ind;
      slot[1] += masked && !logp_finite;
      slot[2] += masked && !old_finite;
      slot[3] += masked && !adv_finite;
      for (int k = 0; k < kCounts; ++k) slot_mag[k] += 1;
      long double* row = &ref_rows[rp * R];
      long double* row_mag = &mag_rows[rp * R];
      row[0] += valid;
      row_mag[0] += 1;
      sum_m[rp] += (long double)(double)m;
      n_ind[rp] += weighted;
      if (c.broadcast) continue;
      O X[kMaxN];
      double I[kMaxN];
      for (int i = 0; i < n; ++i) {
        X[i] = valid ? pama::noon(to_op<O>(ad[i])) : O(0);
        I[i] = weighted ? (double)X[i] : 0.0;
      }
      if (MODE == kMin) {
        const O mn = valid ? token_rule<O>(ad, n) : O(0);
        row[1] += (double)(mn * m);
        row_mag[1] += fabsl((double)(mn * m));
      } else {
        for (int i = 0; i < n; ++i) {
          row[2 + i] += (double)(X[i] * m);
          row_mag[2 + i] += fabsl((double)(X[i] * m));
        }
        if (MODE == kMean)
          for (int i = 0; i < n; ++i) {
            row[2 + n + i] += I[i];
            row_mag[2 + n + i] += fabsl(I[i]);
          }
        if (MODE == kGram)
          for (int i = 0, p = 0; i < n; ++i)
            for (int j = i; j < n; ++j, ++p) {
              slot[kCounts + p] += (long double)I[i] * I[j];
              slot_mag[kCounts + p] += fabsl((long double)I[i] * I[j]);
            }
      }
    }
    if (c.broadcast)  // the sums factor: A_i * sum_t m_t, A_i * #{ind}
      for (long s = 0; s < part.segs; ++s) {
        const long rp = b * part.segs + s;
        const long unit = part.segs > 1 ? rp : b / part.rows_per_unit;
        long double* row = &ref_rows[rp * R];
        long double* row_mag = &mag_rows[rp * R];
        double A[kMaxN];
        for (int i = 0; i < n; ++i) A[i] = row_adv_finite ? (double)pama::noon(to_op<O>(adv[b * n + i])) : 0.0;
        const double mn = row_adv_finite ? (double)token_rule<O>(adv + b * n, n) : 0.0;
        if (MODE == kMin) {
          row[1] = mn * sum_m[rp];
          row_mag[1] = fabsl(row[1]);
        } else {
          for (int i = 0; i < n; ++i) {
            row[2 + i] = A[i] * sum_m[rp];
            row_mag[2 + i] = fabsl(row[2 + i]);
          }
        }
        if (MODE == kMean)
          for (int i = 0; i < n; ++i) {
            row[2 + n + i] = A[i] * n_ind[rp];
            row_mag[2 + n + i] = fabsl(row[2 + n + i]);
          }
        if (MODE == kGram)
          for (int i = 0, p = 0; i < n; ++i)
            for (int j = i; j < n; ++j, ++p) {
              ref_slots[unit * slot_stride + kCounts + p] += (long double)A[i] * A[j] * n_ind[rp];
              mag_slots[unit * slot_stride + kCounts + p] += fabsl((long double)A[i] * A[j] * n_ind[rp]);
            }
      }
  }
  int n_mismatch = 0;
  for (long k = 0; k < n_slots + n_rowpart; ++k) {
    const bool is_slot = k < n_slots;
    const long at = is_slot ? k : k - n_slots;
    const long double want = is_slot ? ref_slots[at] : ref_rows[at];
    const long double tol = 1e-12L * (is_slot ? mag_slots[at] : mag_rows[at]) + 1e-300L;
    const double got = result[0][k];
    if (!std::isfinite(got) || fabsl((long double)got - want) > tol) {
      if (n_mismatch++ < 5)
        fprintf(stderr, "reduce %s %ld: got %.17g, reference %.17Lg\n", is_slot ? "slot" : "row partial", at, got, want);
      g_failed = true;
    }
  }

  // 2. finalise on the schedule-0 result
  memcpy(slots, result[0].data(), n_slots * sizeof(double));
  memcpy(rowpart, result[0].data() + n_slots, n_rowpart * sizeof(double));
  const int mean_grans[3] = {kSequence, kBatchMean, kSequenceGram};
  const int gran = MODE == kGram ? kBatch : (MODE == kMin ? kToken : mean_grans[rng() % 3]);
  const int agg = rng() & 1;
  if (std::is_same<O, double>::value)
    check_finalise<double>(c, gran, agg, part, slots, slot_stride, rowpart);
  else
    check_finalise<float>(c, gran, agg, part, slots, slot_stride, rowpart);
  free(logp); free(old_logp); free(adv); free(mask); free(slots); free(rowpart); free(factor);
}

template <class S, class O>
void check_mode(const Config& c) {
  if (c.mode == kGram) check_config<S, O, kGram>(c);
  else if (c.mode == kMean) check_config<S, O, kMean>(c);
  else check_config<S, O, kMin>(c);
}

bool parse(const std::string& line, Config* c) {
  std::istringstream in(line);
  std::string mode, layout;
  int force_any = 0;
  if (!(in >> c->dtype >> mode >> layout >> force_any >> c->B >> c->T >> c->n >> c->seed)) return false;
  c->line = line;
  c->force_any = force_any != 0;
  if (mode == "gram") c->mode = kGram;
  else if (mode == "mean") c->mode = kMean;
  else if (mode == "min") c->mode = kMin;
  else return false;
  if (layout != "btn" && layout != "bn") return false;
  c->broadcast = layout == "bn";
  const bool dtype_ok = c->dtype == "f64" || c->dtype == "f32" || c->dtype == "bf16" || c->dtype == "f16";
  return dtype_ok && c->B >= 0 && c->T >= 0 && c->n >= 1 && c->n <= kMaxN;
}

}  // namespace

int main() {
  long n_configs = 0, n_failed = 0;
  std::string line;
  while (std::getline(std::cin, line)) {
    if (line.empty() || line[0] == '#') continue;
    Config c;
    if (!parse(line, &c)) {
      fprintf(stderr, "bad config line: %s\n", line.c_str());
      return 2;
    }
    fprintf(stderr, "config: %s\n", line.c_str());
    emu::schedule_rng.seed(c.seed);
    g_failed = false;
    if (c.dtype == "f64") check_mode<double, double>(c);
    else if (c.dtype == "f32") check_mode<float, float>(c);
    else if (c.dtype == "bf16") check_mode<__nv_bfloat16, float>(c);
    else check_mode<__half, float>(c);
    ++n_configs;
    n_failed += g_failed;
    printf("%s %s\n", g_failed ? "FAIL" : "ok", line.c_str());
    fflush(stdout);
  }
  printf("summary configs=%ld failed=%ld finalise_smem_checked=%ld finalise_sequence_gram_checked=%ld "
         "factor_checked=%ld factor_nonzero=%ld factor_clipped_zero=%ld factor_invalid_zero=%ld\n",
         n_configs, n_failed, g_smem_checked, g_seqgram_checked, g_factor_checked, g_factor_nonzero,
         g_factor_clipped_zero, g_factor_invalid_zero);
  return n_failed ? 1 : 0;
}
