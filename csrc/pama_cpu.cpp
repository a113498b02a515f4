// pama_cpu.cpp: the fused PAMA CPU kernels and the pybind11 module pama_ext._C.
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
#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <string>
#include <vector>

#include "bindings.h"
#include "pama_math.h"

namespace {

using at::Tensor;

constexpr int64_t kBlock = 2048;  // tokens per work unit

enum class Gran { Batch, Token, Sequence, BatchMean, SequenceGram };
enum class Agg { TokenMean, SeqMeanTokenMean };
// What the forward pass must accumulate: S + Gram (batch), S + Q (sequence, batch_mean,
// sequence_gram: its Gram is built from the per-row means Q_b / M_b after the pass), Smin (token). Accumulating only what the granularity needs is an optimisation; the
// statistics it does accumulate are the ones the contract defines.
enum class Mode { Gram, Mean, Min };

Gran parse_granularity(const std::string& g) {
  if (g == "batch") return Gran::Batch;
  if (g == "token") return Gran::Token;
  if (g == "sequence") return Gran::Sequence;
  if (g == "batch_mean") return Gran::BatchMean;
  if (g == "sequence_gram") return Gran::SequenceGram;
  TORCH_CHECK_VALUE(false, "pama_loss: unknown granularity '", g,
                    "'; expected one of 'batch', 'token', 'sequence', 'batch_mean', 'sequence_gram'");
  return Gran::Batch;
}

Agg parse_loss_agg(const std::string& a) {
  if (a == "token_mean") return Agg::TokenMean;
  if (a == "seq_mean_token_mean") return Agg::SeqMeanTokenMean;
  TORCH_CHECK_VALUE(false, "pama_loss: unknown loss_agg '", a,
                    "'; expected one of 'token_mean', 'seq_mean_token_mean'");
  return Agg::TokenMean;
}

Mode mode_of(Gran g) {
  switch (g) {
    case Gran::Batch: return Mode::Gram;
    case Gran::Token: return Mode::Min;
    default: return Mode::Mean;
  }
}

// ------------------------------------------------------------------------------ partition
struct Partition {
  int64_t B = 0, T = 0;
  int64_t rows_per_unit = 1;  // T <= kBlock: whole rows per unit
  int64_t segs = 1;           // T > kBlock: segments per row
  int64_t units = 0;
};

Partition make_partition(int64_t B, int64_t T) {
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

// ------------------------------------------------------------------------------ scalar helpers
template <typename op_t, typename scalar_t>
inline op_t ld(const scalar_t* p, int64_t i) {
  return static_cast<op_t>(p[i]);
}

// Lane masks: all ones / all zeros of the width of op_t. Every per-token decision (mask,
// finiteness, clip indicator, Noon clamp) is a bitwise select on these: scalar float
// ternaries compile to branches (x86 has no cmov for xmm registers) that are mispredicted
// about half the time on the random signs and ratios of real data, and the masks let the
// compiler vectorise the token loops (SSE2 baseline, no -march).
template <typename op_t>
using mask_t = std::conditional_t<sizeof(op_t) == 8, uint64_t, uint32_t>;

template <typename op_t>
inline mask_t<op_t> mask_of(bool c) {
  return mask_t<op_t>(0) - static_cast<mask_t<op_t>>(c);
}
template <typename op_t>
inline mask_t<op_t> mask_of_byte(uint8_t c) {  // from a bool stored as a byte (any non-zero is true)
  return mask_t<op_t>(0) - static_cast<mask_t<op_t>>(c != 0);
}
template <typename op_t>
inline mask_t<op_t> bits_of(op_t x) {
  mask_t<op_t> b;
  std::memcpy(&b, &x, sizeof(op_t));
  return b;
}
template <typename op_t>
inline op_t from_bits(mask_t<op_t> b) {
  op_t x;
  std::memcpy(&x, &b, sizeof(op_t));
  return x;
}
template <typename op_t>
inline op_t msel0(mask_t<op_t> m, op_t a) {  // m ? a : 0
  return from_bits<op_t>(bits_of(a) & m);
}
template <typename op_t>
inline op_t msel(mask_t<op_t> m, op_t a, op_t b) {  // m ? a : b
  return from_bits<op_t>((bits_of(a) & m) | (bits_of(b) & ~m));
}
// finite(x) as a mask: x - x is 0 for finite x, NaN for +-inf and NaN
template <typename op_t>
inline mask_t<op_t> finite_mask(op_t x) {
  return mask_of<op_t>((x - x) == op_t(0));
}

// granularity "token" (pama::token_key / token_value as lane-mask selects): the key of a raw
// advantage x is x (x > 0), 0 (x < 0), +inf (x == 0, -0.0 included: the objective abstains)
template <typename op_t>
inline op_t token_key_m(op_t x) {
  return msel(mask_of<op_t>(x > op_t(0)), x, msel0(~mask_of<op_t>(x < op_t(0)), std::numeric_limits<op_t>::infinity()));
}
// s = valid && min key < inf ? min key : 0
template <typename op_t>
inline op_t token_value_m(mask_t<op_t> valid, op_t key_min) {
  return msel0(valid & mask_of<op_t>(key_min < std::numeric_limits<op_t>::infinity()), key_min);
}

// exp for float, branch-free so that the ratio loop vectorises (glibc's expf is a call per
// element). Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, degree-7 polynomial
// (Cephes' expf coefficients), 2^n applied in two halves so that results in the subnormal
// range round once. Error <= 1 ulp (the same class as the Sleef exp torch uses); inf, 0,
// NaN, overflow and underflow are exact.
inline float exp_f32(float x) {
  float xc = x < -104.0f ? -104.0f : x;  // below: rounds to 0; above 89: overflows to inf
  xc = xc > 89.0f ? 89.0f : xc;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const float k = xc * 1.44269504088896341f + magic;
  const float n = k - magic;
  float r = xc - n * 0.693359375f;  // ln 2 = 0.693359375 - 2.12194440e-4 (first part exact)
  r = r - n * -2.12194440e-4f;
  const float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float y = p * r2 + r + 1.0f;
  uint32_t kb;
  std::memcpy(&kb, &k, 4);
  const int32_t ni = static_cast<int32_t>(kb - 0x4B400000u);  // n as an integer
  const int32_t n1 = ni >> 1, n2 = ni - n1;
  y = y * from_bits<float>(static_cast<uint32_t>(n1 + 127) << 23);
  y = y * from_bits<float>(static_cast<uint32_t>(n2 + 127) << 23);
  return msel<float>(mask_of<float>(x != x), x, y);  // NaN stays NaN
}

template <typename op_t>
inline op_t ratio_of(op_t x, op_t y) {
  if constexpr (std::is_same_v<op_t, float>)
    return exp_f32(x - y);
  else
    return pama::ratio(x, y);  // double: std::exp (float64 is the accuracy path)
}

// ------------------------------------------------------------------------------ chunks
// A piece of a row is processed in chunks of kChunk tokens (kChunkGeneric for runtime N,
// whose transposed advantages are larger): first elementwise loops over the chunk (ratios,
// masks, advantages transposed to one contiguous array per objective), then the per-
// objective sums as dot products over the chunk. Sums use LN explicit lanes (vectorisable
// without re-association flags); lanes are combined in a fixed order, so results stay
// bitwise reproducible.
constexpr int kChunk = 256;
constexpr int kChunkGeneric = 64;
constexpr int LN = 4;

template <typename op_t, int CAP, int CH>
struct ChunkBuf {
  op_t u[CH];               // ratios
  mask_t<op_t> flp[CH];     // finite(logp)
  mask_t<op_t> folp[CH];    // finite(old_logp)
  mask_t<op_t> ok[CH];      // valid token
  op_t m[CH];               // valid ? min(u, 1+eps) : 0
  op_t w[CH];               // valid & ind ? 1 : 0
  op_t At[CAP][CH];         // advantages, transposed; Noon-clamped and zeroed when invalid
};

// ratios and finiteness of logp/old_logp for tokens [0, L) of the chunk; pads to Lp with
// neutral tokens (u = 1, marked non-finite so that they are never valid)
template <typename scalar_t, typename op_t, typename Buf>
inline void chunk_ratios(const scalar_t* lp, const scalar_t* olp, int L, int Lp, Buf& cb) {
  for (int j = 0; j < L; ++j) {
    const op_t x = ld<op_t>(lp, j), y = ld<op_t>(olp, j);
    cb.flp[j] = finite_mask(x);
    cb.folp[j] = finite_mask(y);
    cb.u[j] = ratio_of(x, y);
  }
  for (int j = L; j < Lp; ++j) {
    cb.flp[j] = cb.folp[j] = 0;
    cb.u[j] = op_t(1);
  }
}

// transposed raw advantages At[i][j] = adv[j, i] and their finiteness (per token)
template <typename scalar_t, typename op_t, int NT, typename Buf>
inline void chunk_advantages(const scalar_t* ad, int n_rt, int L, int Lp, Buf& cb, mask_t<op_t>* fa) {
  const int n = NT > 0 ? NT : n_rt;
  for (int j = 0; j < L; ++j)
    for (int i = 0; i < n; ++i) cb.At[i][j] = ld<op_t>(ad, static_cast<int64_t>(j) * n + i);
  for (int i = 0; i < n; ++i)
    for (int j = L; j < Lp; ++j) cb.At[i][j] = op_t(0);
  for (int j = 0; j < Lp; ++j) fa[j] = ~mask_t<op_t>(0);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < Lp; ++j) fa[j] &= finite_mask(cb.At[i][j]);
}

// sum_j (double)x[j] * (double)y[j] into LN lanes (Lp is a multiple of LN)
template <typename T>
inline void dot_lanes(const T* x, const T* y, int Lp, double* acc) {
  for (int j = 0; j < Lp; j += LN)
    for (int l = 0; l < LN; ++l) acc[l] += static_cast<double>(x[j + l]) * static_cast<double>(y[j + l]);
}
// sum_j (double)(x[j] * y[j]) (product in op_t, as the per-token maths) into LN lanes
template <typename T>
inline void dot_lanes_op(const T* x, const T* y, int Lp, double* acc) {
  for (int j = 0; j < Lp; j += LN)
    for (int l = 0; l < LN; ++l) acc[l] += static_cast<double>(x[j + l] * y[j + l]);
}
inline double lanes_sum(const double* acc) {
  static_assert(LN == 4, "fixed combination order");
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// ------------------------------------------------------------------------------ forward pass
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
};

// Accumulates tokens [t0, t1) of row b (advantages [B, T, N]) into row (+= [M, Smin, S, Q]),
// gram (+= upper triangle) and cnt (+= [clipped, nf_logp, nf_old, nf_adv]).
// NT: N at compile time (0 = runtime n).
template <typename scalar_t, typename op_t, int NT, Mode MODE>
void fwd_piece(const FwdArgs& a, int64_t b, int64_t t0, int64_t t1, double* row, double* gram, int64_t* cnt) {
  using M = mask_t<op_t>;
  constexpr int CAP = NT > 0 ? NT : PAMA_MAX_N;
  constexpr int CH = NT > 0 ? kChunk : kChunkGeneric;
  const int n = NT > 0 ? NT : a.n;
  const int npairs = tri_size(n);
  const int64_t base = b * a.T;
  const scalar_t* lp = static_cast<const scalar_t*>(a.logp) + base;
  const scalar_t* olp = static_cast<const scalar_t*>(a.old_logp) + base;
  const scalar_t* ad = static_cast<const scalar_t*>(a.adv) + base * n;
  const uint8_t* mk = a.mask + base;
  const op_t thr = static_cast<op_t>(a.one_plus_eps);

  ChunkBuf<op_t, CAP, CH> cb;
  M fa[CH];
  constexpr int GCAP = (MODE == Mode::Gram && !(NT > 0 && NT <= 4)) ? CAP : 1;
  double Id[GCAP][CH];  // I_i = ind * A_i in double, for the Gram dot products
  double accS[CAP][LN] = {}, accQ[CAP][LN] = {}, accMin[LN] = {};
  constexpr int PCAP = MODE == Mode::Gram ? CAP * (CAP + 1) / 2 : 1;
  double accG[PCAP][LN];
  if constexpr (MODE == Mode::Gram)
    for (int p = 0; p < npairs; ++p)
      for (int l = 0; l < LN; ++l) accG[p][l] = 0.0;
  int64_t m_cnt = 0, clipped = 0, nf_lp = 0, nf_olp = 0, nf_adv = 0;

  for (int64_t c0 = t0; c0 < t1; c0 += CH) {
    const int L = static_cast<int>(std::min<int64_t>(CH, t1 - c0));
    const int Lp = (L + LN - 1) / LN * LN;
    chunk_ratios<scalar_t, op_t>(lp + c0, olp + c0, L, Lp, cb);
    chunk_advantages<scalar_t, op_t, NT>(ad + c0 * n, n, L, Lp, cb, fa);
    // per-token masks and counts (counted in the mask width: no widening in the vector loop)
    M c_m = 0, c_clip = 0, c_lp = 0, c_olp = 0, c_adv = 0;
    for (int j = 0; j < L; ++j) {
      const M mt = mask_of_byte<op_t>(mk[c0 + j]);
      const M v = mt & cb.flp[j] & cb.folp[j] & fa[j];
      const op_t u = cb.u[j];
      const M ind = mask_of<op_t>(pama::indicator(u, thr));
      cb.ok[j] = v;
      cb.m[j] = msel0(v, msel(ind, u, thr));
      cb.w[j] = msel0(v & ind, op_t(1));
      c_m += v & 1;
      c_clip += (v & ~ind) & 1;
      c_lp += (mt & ~cb.flp[j]) & 1;
      c_olp += (mt & ~cb.folp[j]) & 1;
      c_adv += (mt & ~fa[j]) & 1;
    }
    m_cnt += c_m;
    clipped += c_clip;
    nf_lp += c_lp;
    nf_olp += c_olp;
    nf_adv += c_adv;
    for (int j = L; j < Lp; ++j) {  // padding: neutral, invalid tokens
      cb.ok[j] = 0;
      cb.m[j] = cb.w[j] = op_t(0);
    }
    if constexpr (MODE == Mode::Min) {
      // s_t on the raw advantages: exactly-zero advantages abstain (pama::token_min)
      op_t mn[CH];
      for (int j = 0; j < Lp; ++j) mn[j] = token_key_m(cb.At[0][j]);
      for (int i = 1; i < n; ++i)
        for (int j = 0; j < Lp; ++j) {
          const op_t k = token_key_m(cb.At[i][j]);
          mn[j] = msel(mask_of<op_t>(k < mn[j]), k, mn[j]);
        }
      for (int j = 0; j < Lp; ++j) mn[j] = token_value_m(cb.ok[j], mn[j]);
      dot_lanes_op(mn, cb.m, Lp, accMin);
    } else {
      // Noon clamp, zero for invalid tokens
      for (int i = 0; i < n; ++i)
        for (int j = 0; j < Lp; ++j) {
          const op_t x = cb.At[i][j];
          cb.At[i][j] = msel0(cb.ok[j] & mask_of<op_t>(x > op_t(0)), x);
        }
      for (int i = 0; i < n; ++i) dot_lanes_op(cb.At[i], cb.m, Lp, accS[i]);
      if constexpr (MODE == Mode::Mean) {
        for (int i = 0; i < n; ++i) dot_lanes_op(cb.At[i], cb.w, Lp, accQ[i]);
      } else if constexpr (NT > 0 && NT <= 4) {
        // small N: one pass over the chunk updates every pair (I loaded once per token,
        // 2 lanes x N(N+1)/2 accumulators stay in registers); products exact in double
        for (int j = 0; j < Lp; j += 2) {
          double I[NT][2];
          for (int i = 0; i < NT; ++i)
            for (int l = 0; l < 2; ++l) I[i][l] = static_cast<double>(cb.At[i][j + l] * cb.w[j + l]);
          int p = 0;
          for (int i = 0; i < NT; ++i)
            for (int k = i; k < NT; ++k, ++p)
              for (int l = 0; l < 2; ++l) accG[p][l] += I[i][l] * I[k][l];
        }
      } else {
        for (int i = 0; i < n; ++i)
          for (int j = 0; j < Lp; ++j) Id[i][j] = static_cast<double>(cb.At[i][j] * cb.w[j]);
        int p = 0;
        for (int i = 0; i < n; ++i)
          for (int k = i; k < n; ++k, ++p) dot_lanes(Id[i], Id[k], Lp, accG[p]);
      }
    }
  }
  row[0] += static_cast<double>(m_cnt);
  if constexpr (MODE == Mode::Min) {
    row[1] += lanes_sum(accMin);
  } else {
    for (int i = 0; i < n; ++i) row[2 + i] += lanes_sum(accS[i]);
    if constexpr (MODE == Mode::Mean)
      for (int i = 0; i < n; ++i) row[2 + n + i] += lanes_sum(accQ[i]);
    if constexpr (MODE == Mode::Gram)
      for (int p = 0; p < npairs; ++p) gram[p] += lanes_sum(accG[p]);
  }
  cnt[0] += clipped;
  cnt[1] += nf_lp;
  cnt[2] += nf_olp;
  cnt[3] += nf_adv;
}

// Sequence-level advantages [B, N]: A is constant along the row, so the sums factor:
// S_i = A_i sum_t m_t, Q_i = A_i #{ind}, G_ij = A_i A_j #{ind}, Smin = min_i A_i sum_t m_t
// (the products formed once in double instead of per token). The token loop is the ratio.
template <typename scalar_t, typename op_t, Mode MODE>
void fwd_piece_bc(const FwdArgs& a, int64_t b, int64_t t0, int64_t t1, double* row, double* gram, int64_t* cnt) {
  using M = mask_t<op_t>;
  const int n = a.n;
  const int64_t base = b * a.T;
  const scalar_t* lp = static_cast<const scalar_t*>(a.logp) + base;
  const scalar_t* olp = static_cast<const scalar_t*>(a.old_logp) + base;
  const uint8_t* mk = a.mask + base;
  const op_t thr = static_cast<op_t>(a.one_plus_eps);
  const scalar_t* ar = static_cast<const scalar_t*>(a.adv) + b * n;
  op_t A[PAMA_MAX_N], raw[PAMA_MAX_N];
  M fa = ~M(0);
  for (int i = 0; i < n; ++i) {
    const op_t v = ld<op_t>(ar, i);
    raw[i] = v;
    fa &= finite_mask(v);
    A[i] = pama::noon(v);
  }
  // A row with a non-finite advantage has no valid token (sum_m = n_ind = 0): zero its
  // advantages with a select, so that the products below are 0, not inf * 0 = NaN (+inf
  // survives the Noon clamp), exactly as for a masked-out row.
  for (int i = 0; i < n; ++i) A[i] = msel0(fa, A[i]);
  ChunkBuf<op_t, 1, kChunk> cb;
  double acc_m[LN] = {};
  int64_t m_cnt = 0, n_ind = 0, nf_lp = 0, nf_olp = 0, nf_adv = 0;
  for (int64_t c0 = t0; c0 < t1; c0 += kChunk) {
    const int L = static_cast<int>(std::min<int64_t>(kChunk, t1 - c0));
    const int Lp = (L + LN - 1) / LN * LN;
    chunk_ratios<scalar_t, op_t>(lp + c0, olp + c0, L, Lp, cb);
    for (int j = L; j < Lp; ++j) cb.m[j] = op_t(0);  // padding
    M c_m = 0, c_ind = 0, c_lp = 0, c_olp = 0, c_adv = 0;
    for (int j = 0; j < L; ++j) {
      const M mt = mask_of_byte<op_t>(mk[c0 + j]);
      const M v = mt & cb.flp[j] & cb.folp[j] & fa;
      const op_t u = cb.u[j];
      const M ind = mask_of<op_t>(pama::indicator(u, thr));
      cb.m[j] = msel0(v, msel(ind, u, thr));
      c_m += v & 1;
      c_ind += (v & ind) & 1;
      c_lp += (mt & ~cb.flp[j]) & 1;
      c_olp += (mt & ~cb.folp[j]) & 1;
      c_adv += (mt & ~fa) & 1;
    }
    m_cnt += c_m;
    n_ind += c_ind;
    nf_lp += c_lp;
    nf_olp += c_olp;
    nf_adv += c_adv;
    for (int j = 0; j < Lp; j += LN)
      for (int l = 0; l < LN; ++l) acc_m[l] += static_cast<double>(cb.m[j + l]);
  }
  const double sum_m = lanes_sum(acc_m);
  const double ni = static_cast<double>(n_ind);
  row[0] += static_cast<double>(m_cnt);
  if constexpr (MODE == Mode::Min) {
    const op_t mn = msel0(fa, pama::token_min(raw, n));  // exactly-zero advantages abstain
    row[1] += static_cast<double>(mn) * sum_m;
  } else {
    for (int i = 0; i < n; ++i) row[2 + i] += static_cast<double>(A[i]) * sum_m;
    if constexpr (MODE == Mode::Mean) {
      for (int i = 0; i < n; ++i) row[2 + n + i] += static_cast<double>(A[i]) * ni;
    } else {
      int k = 0;
      for (int i = 0; i < n; ++i)
        for (int j = i; j < n; ++j, ++k) gram[k] += static_cast<double>(A[i]) * static_cast<double>(A[j]) * ni;
    }
  }
  cnt[0] += m_cnt - n_ind;  // clipped: valid tokens with u > 1 + eps
  cnt[1] += nf_lp;
  cnt[2] += nf_olp;
  cnt[3] += nf_adv;
}

struct FwdPass {
  std::vector<double> rows;   // [B, row_stride]
  std::vector<double> slots;  // [units, slot_stride]
  int slot_stride = 0;
  int gram_off = kCounts;
  int rowpart_off = 0;
};

template <typename Piece>
void run_forward_pass(const FwdArgs& a, const Partition& p, Mode mode, FwdPass& out, Piece piece) {
  const int n = a.n;
  const int R = row_stride(n);
  const int nG = (mode == Mode::Gram) ? tri_size(n) : 0;
  out.gram_off = kCounts;
  out.rowpart_off = kCounts + nG;
  out.slot_stride = kCounts + nG + (p.segs > 1 ? R : 0);
  out.rows.assign(static_cast<size_t>(p.B * R), 0.0);
  out.slots.assign(static_cast<size_t>(p.units * out.slot_stride), 0.0);
  double* rows = out.rows.data();
  double* slots = out.slots.data();
  const int S = out.slot_stride, goff = out.gram_off, roff = out.rowpart_off;
  at::parallel_for(0, p.units, 1, [&](int64_t ub, int64_t ue) {
    for (int64_t u = ub; u < ue; ++u) {
      double* slot = slots + u * S;
      int64_t cnt[4] = {0, 0, 0, 0};
      for_each_piece(p, u, [&](int64_t b, int64_t t0, int64_t t1) {
        double* row = (p.segs > 1) ? slot + roff : rows + b * R;
        piece(a, b, t0, t1, row, slot + goff, cnt);
      });
      for (int k = 0; k < 4; ++k) slot[k] = static_cast<double>(cnt[k]);
    }
  });
  if (p.segs > 1) {  // per-row totals: segments in order
    for (int64_t b = 0; b < p.B; ++b) {
      double* row = rows + b * R;
      for (int64_t s = 0; s < p.segs; ++s) {
        const double* part = slots + (b * p.segs + s) * S + roff;
        for (int k = 0; k < R; ++k) row[k] += part[k];
      }
    }
  }
}

template <typename scalar_t, typename op_t, Mode MODE>
void forward_pass_mode(const FwdArgs& a, const Partition& p, bool bc, FwdPass& out) {
  if (bc) return run_forward_pass(a, p, MODE, out, fwd_piece_bc<scalar_t, op_t, MODE>);
  switch (a.n) {  // small N unrolled at compile time, the rest at run time
    case 1: return run_forward_pass(a, p, MODE, out, fwd_piece<scalar_t, op_t, 1, MODE>);
    case 2: return run_forward_pass(a, p, MODE, out, fwd_piece<scalar_t, op_t, 2, MODE>);
    case 3: return run_forward_pass(a, p, MODE, out, fwd_piece<scalar_t, op_t, 3, MODE>);
    case 4: return run_forward_pass(a, p, MODE, out, fwd_piece<scalar_t, op_t, 4, MODE>);
    case 8: return run_forward_pass(a, p, MODE, out, fwd_piece<scalar_t, op_t, 8, MODE>);
    default: return run_forward_pass(a, p, MODE, out, fwd_piece<scalar_t, op_t, 0, MODE>);
  }
}

template <typename scalar_t, typename op_t>
void forward_pass(const FwdArgs& a, const Partition& p, bool bc, Mode mode, FwdPass& out) {
  switch (mode) {
    case Mode::Gram: return forward_pass_mode<scalar_t, op_t, Mode::Gram>(a, p, bc, out);
    case Mode::Mean: return forward_pass_mode<scalar_t, op_t, Mode::Mean>(a, p, bc, out);
    case Mode::Min: return forward_pass_mode<scalar_t, op_t, Mode::Min>(a, p, bc, out);
  }
}

// ------------------------------------------------------------------------------ backward pass
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

// g_t = -grad * r_b * s_t * (u_t if u_t <= 1+eps else 0) for valid tokens, 0 elsewhere;
// s_t = sum_i c_i A_i (pama::token_min of the raw advantages for token). The indicator is a select, not a product, so
// that u = inf gives 0 and not inf * 0 = NaN.
template <typename scalar_t, typename op_t, int NT, bool BC, bool TOKEN>
void bwd_piece(const BwdArgs& a, int64_t b, int64_t t0, int64_t t1) {
  using M = mask_t<op_t>;
  constexpr int CAP = BC ? 1 : (NT > 0 ? NT : PAMA_MAX_N);
  constexpr int CH = (NT > 0 || BC) ? kChunk : kChunkGeneric;
  const int n = NT > 0 ? NT : a.n;
  const int64_t base = b * a.T;
  const scalar_t* lp = static_cast<const scalar_t*>(a.logp) + base;
  const scalar_t* olp = static_cast<const scalar_t*>(a.old_logp) + base;
  const uint8_t* mk = a.mask + base;
  scalar_t* g = static_cast<scalar_t*>(a.grad) + base;
  const op_t thr = static_cast<op_t>(a.one_plus_eps);
  // coef = -grad_out * r_b: the double product of two op_t values rounded once to op_t is
  // exactly op_t multiplication (the reference's order: ((-g * r) * s) * u).
  const op_t rb = static_cast<const op_t*>(a.row_scale)[b];
  const op_t coef = static_cast<op_t>(-(a.grad_out * static_cast<double>(rb)));
  op_t c[PAMA_MAX_N];
  if constexpr (!TOKEN) {
    const op_t* w = static_cast<const op_t*>(a.weights) + (a.weights_per_row ? b * n : 0);
    for (int i = 0; i < n; ++i) c[i] = w[i];
  }
  ChunkBuf<op_t, CAP, CH> cb;
  if constexpr (BC) {
    const scalar_t* ar = static_cast<const scalar_t*>(a.adv) + b * n;
    op_t A[PAMA_MAX_N], raw[PAMA_MAX_N];
    M fa = ~M(0);
    for (int i = 0; i < n; ++i) {
      const op_t v = ld<op_t>(ar, i);
      raw[i] = v;
      fa &= finite_mask(v);
      A[i] = pama::noon(v);
    }
    // a row with a non-finite advantage is invalid: zero it (a select) so that s stays finite
    for (int i = 0; i < n; ++i) A[i] = msel0(fa, A[i]);
    op_t s = A[0];
    if constexpr (TOKEN) {
      s = msel0(fa, pama::token_min(raw, n));  // exactly-zero advantages abstain
    } else {
      s = c[0] * A[0];
      for (int i = 1; i < n; ++i) s += c[i] * A[i];
    }
    const op_t cs = coef * s;
    for (int64_t c0 = t0; c0 < t1; c0 += CH) {
      const int L = static_cast<int>(std::min<int64_t>(CH, t1 - c0));
      chunk_ratios<scalar_t, op_t>(lp + c0, olp + c0, L, L, cb);
      for (int j = 0; j < L; ++j) {
        const op_t u = cb.u[j];
        const M ok = mask_of_byte<op_t>(mk[c0 + j]) & cb.flp[j] & cb.folp[j] & fa & mask_of<op_t>(pama::indicator(u, thr));
        g[c0 + j] = static_cast<scalar_t>(msel0(ok, cs * u));
      }
    }
  } else {
    const scalar_t* ad = static_cast<const scalar_t*>(a.adv) + base * n;
    M fa[CH];
    op_t s[CH];
    for (int64_t c0 = t0; c0 < t1; c0 += CH) {
      const int L = static_cast<int>(std::min<int64_t>(CH, t1 - c0));
      chunk_ratios<scalar_t, op_t>(lp + c0, olp + c0, L, L, cb);
      chunk_advantages<scalar_t, op_t, NT>(ad + c0 * n, n, L, L, cb, fa);
      if constexpr (TOKEN) {
        // on the raw advantages: exactly-zero advantages abstain (pama::token_min)
        for (int j = 0; j < L; ++j) s[j] = token_key_m(cb.At[0][j]);
        for (int i = 1; i < n; ++i)
          for (int j = 0; j < L; ++j) {
            const op_t k = token_key_m(cb.At[i][j]);
            s[j] = msel(mask_of<op_t>(k < s[j]), k, s[j]);
          }
        for (int j = 0; j < L; ++j) s[j] = token_value_m(fa[j], s[j]);
      } else {
        for (int i = 0; i < n; ++i)  // Noon clamp, zero for tokens with a non-finite advantage
          for (int j = 0; j < L; ++j) cb.At[i][j] = msel0(fa[j] & mask_of<op_t>(cb.At[i][j] > op_t(0)), cb.At[i][j]);
        for (int j = 0; j < L; ++j) s[j] = c[0] * cb.At[0][j];
        for (int i = 1; i < n; ++i)
          for (int j = 0; j < L; ++j) s[j] += c[i] * cb.At[i][j];
      }
      for (int j = 0; j < L; ++j) {
        const op_t u = cb.u[j];
        const M ok = mask_of_byte<op_t>(mk[c0 + j]) & cb.flp[j] & cb.folp[j] & fa[j] & mask_of<op_t>(pama::indicator(u, thr));
        g[c0 + j] = static_cast<scalar_t>(msel0(ok, (coef * s[j]) * u));
      }
    }
  }
}

template <typename Piece>
void run_backward_pass(const BwdArgs& a, const Partition& p, Piece piece) {
  at::parallel_for(0, p.units, 1, [&](int64_t ub, int64_t ue) {
    for (int64_t u = ub; u < ue; ++u)
      for_each_piece(p, u, [&](int64_t b, int64_t t0, int64_t t1) { piece(a, b, t0, t1); });
  });
}

template <typename scalar_t, typename op_t, bool TOKEN>
void backward_pass(const BwdArgs& a, const Partition& p, bool bc) {
  if (bc) return run_backward_pass(a, p, bwd_piece<scalar_t, op_t, 0, true, TOKEN>);
  switch (a.n) {
    case 1: return run_backward_pass(a, p, bwd_piece<scalar_t, op_t, 1, false, TOKEN>);
    case 2: return run_backward_pass(a, p, bwd_piece<scalar_t, op_t, 2, false, TOKEN>);
    case 3: return run_backward_pass(a, p, bwd_piece<scalar_t, op_t, 3, false, TOKEN>);
    case 4: return run_backward_pass(a, p, bwd_piece<scalar_t, op_t, 4, false, TOKEN>);
    case 8: return run_backward_pass(a, p, bwd_piece<scalar_t, op_t, 8, false, TOKEN>);
    default: return run_backward_pass(a, p, bwd_piece<scalar_t, op_t, 0, false, TOKEN>);
  }
}

// ------------------------------------------------------------------------------ checks
void check_inputs(const char* fn, const Tensor& logp, const Tensor& old_logp, const Tensor& advantages,
                  const Tensor& mask) {
  TORCH_CHECK(logp.device().is_cpu() && old_logp.device().is_cpu() && advantages.device().is_cpu() &&
                  mask.device().is_cpu(),
              fn, ": the CPU kernel needs CPU tensors");
  TORCH_CHECK_VALUE(logp.dim() == 2, fn, ": `logp` must be [B, T], got ", logp.sizes());
  TORCH_CHECK_VALUE(old_logp.sizes() == logp.sizes(), fn, ": `old_logp` must have the shape of `logp` ",
                    logp.sizes(), ", got ", old_logp.sizes());
  TORCH_CHECK_VALUE(mask.sizes() == logp.sizes(), fn, ": `mask` must have the shape of `logp` ", logp.sizes(),
                    ", got ", mask.sizes());
  TORCH_CHECK_VALUE(mask.scalar_type() == at::kBool, fn, ": `mask` must be bool, got ", mask.scalar_type());
  const auto st = logp.scalar_type();
  TORCH_CHECK_VALUE(st == at::kDouble || st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, fn,
                    ": `logp` must be float64, float32, bfloat16 or float16, got ", st);
  TORCH_CHECK_VALUE(old_logp.scalar_type() == st && advantages.scalar_type() == st, fn,
                    ": `logp`, `old_logp` and `advantages` must share one dtype");
  const int64_t B = logp.size(0), T = logp.size(1);
  const bool ok_adv = (advantages.dim() == 3 && advantages.size(0) == B && advantages.size(1) == T) ||
                      (advantages.dim() == 2 && advantages.size(0) == B);
  TORCH_CHECK_VALUE(ok_adv, fn, ": `advantages` must be [B, T, N] or [B, N] with [B, T] = ", logp.sizes(),
                    ", got ", advantages.sizes());
  const int64_t n = advantages.size(-1);
  TORCH_CHECK_VALUE(n >= 1 && n <= PAMA_MAX_N, fn, ": the number of objectives N must be in [1, ", PAMA_MAX_N,
                    "], got ", n);
  TORCH_CHECK_VALUE(logp.is_contiguous() && old_logp.is_contiguous() && advantages.is_contiguous() &&
                        mask.is_contiguous(),
                    fn, ": inputs must be contiguous");
}

at::ScalarType acc_dtype_of(const Tensor& logp) {
  return logp.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// ------------------------------------------------------------------------------ ops
std::tuple<Tensor, Tensor, Tensor, Tensor> pama_forward(const Tensor& logp, const Tensor& old_logp,
                                                       const Tensor& advantages, const Tensor& mask,
                                                       double clip_eps, const std::string& granularity,
                                                       const std::string& loss_agg, bool check_finite) {
  check_inputs("pama_forward", logp, old_logp, advantages, mask);
  const Gran gran = parse_granularity(granularity);
  const Agg agg = parse_loss_agg(loss_agg);
  TORCH_CHECK_VALUE(std::isfinite(clip_eps) && clip_eps > 0.0, "pama_loss: clip_eps must be a finite number > 0, got ",
                    clip_eps);
  const int64_t B = logp.size(0), T = logp.size(1);
  const int n = static_cast<int>(advantages.size(-1));
  const bool bc = advantages.dim() == 2;
  const Mode mode = mode_of(gran);
  const Partition part = make_partition(B, T);

  FwdArgs args{logp.data_ptr(), old_logp.data_ptr(), advantages.data_ptr(), reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()),
               T, n, 1.0 + clip_eps};
  FwdPass pass;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logp.scalar_type(), "pama_forward", [&] {
    using op_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    forward_pass<scalar_t, op_t>(args, part, bc, mode, pass);
  });

  // ---- reductions in fixed order
  const int R = row_stride(n);
  double counts[4] = {0, 0, 0, 0};
  for (int64_t u = 0; u < part.units; ++u)
    for (int k = 0; k < 4; ++k) counts[k] += pass.slots[u * pass.slot_stride + k];
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

  const auto acc = acc_dtype_of(logp);
  const auto dopt = at::TensorOptions().dtype(at::kDouble);
  // weights (double) used by the loss after rounding to the acc dtype, so that the loss is
  // exactly -sum_b r_b sum_i c_i S_{b,i} for the returned weights and row scales
  std::vector<double> c;  // [N] or [B, N]
  double objective = 0.0, kkt = 0.0;
  if (gran == Gran::Batch) {
    const int nG = tri_size(n);
    std::vector<double> gu(nG, 0.0);
    for (int64_t u = 0; u < part.units; ++u) {
      const double* g = pass.slots.data() + u * pass.slot_stride + pass.gram_off;
      for (int k = 0; k < nG; ++k) gu[k] += g[k];
    }
    std::vector<double> G(static_cast<size_t>(n) * n);
    for (int i = 0, k = 0; i < n; ++i)
      for (int j = i; j < n; ++j, ++k) G[i * n + j] = G[j * n + i] = gu[k];
    c.resize(n);
    auto sc = std::make_unique<pama::MinNormScratch>();
    pama::min_norm_weights(G.data(), n, c.data(), sc.get());
    pama::quad_objective_kkt(G.data(), n, c.data(), &objective, &kkt);
  } else if (gran == Gran::SequenceGram) {
    // each response counts once: v_b = Q_b / M_b (rows without a valid token contribute
    // nothing), G = sum_b v_b v_b^T (upper triangle, rows in index order), then batch's solver
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
  Tensor row_scale_d = at::empty({B}, dopt);
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
    weights = at::empty({0}, at::TensorOptions().dtype(acc));
  } else {
    Tensor wd = gran == Gran::Sequence ? at::empty({B, n}, dopt) : at::empty({n}, dopt);
    std::copy(c.begin(), c.end(), wd.data_ptr<double>());
    weights = wd.to(acc);
  }
  // loss = -sum_b r_b sum_i c_i S_{b,i}  (or -sum_b r_b Smin_b), with the rounded outputs
  const Tensor rsr = row_scale.to(at::kDouble);
  const Tensor wr = weights.to(at::kDouble);
  const double* r_used = rsr.data_ptr<double>();
  const double* c_used = wr.data_ptr<double>();
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

  Tensor stats = at::empty({8}, dopt);
  double* st = stats.data_ptr<double>();
  st[0] = M;
  st[1] = counts[0];
  st[2] = counts[1];
  st[3] = counts[2];
  st[4] = counts[3];
  st[5] = objective;
  st[6] = kkt;
  st[7] = static_cast<double>(nonempty);
  Tensor loss_t = at::scalar_tensor(loss, dopt).to(acc);
  return {loss_t, weights, row_scale, stats};
}

Tensor pama_backward(const Tensor& grad_loss, const Tensor& logp, const Tensor& old_logp, const Tensor& advantages,
                     const Tensor& mask, const Tensor& weights, const Tensor& row_scale, double clip_eps,
                     const std::string& granularity) {
  check_inputs("pama_backward", logp, old_logp, advantages, mask);
  const Gran gran = parse_granularity(granularity);
  const int64_t B = logp.size(0), T = logp.size(1);
  const int n = static_cast<int>(advantages.size(-1));
  const bool bc = advantages.dim() == 2;
  const auto acc = acc_dtype_of(logp);
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, "pama_backward: grad_loss must hold one value");
  const double go = grad_loss.to(at::kDouble).item<double>();
  // weights and row scales are read in the per-token precision (= the acc dtype)
  const Tensor rsc = row_scale.to(at::kCPU, acc).contiguous();
  TORCH_CHECK_VALUE(rsc.numel() == B, "pama_backward: row_scale must be [B]");
  Tensor wc;
  bool per_row = false;
  if (gran != Gran::Token) {
    wc = weights.to(at::kCPU, acc).contiguous();
    per_row = gran == Gran::Sequence;
    TORCH_CHECK_VALUE(wc.numel() == (per_row ? B * n : n), "pama_backward: weights must be ",
                      per_row ? "[B, N]" : "[N]", " for granularity '", granularity, "'");
  }
  Tensor grad = at::empty_like(logp);
  if (logp.numel() == 0) return grad;
  const Partition part = make_partition(B, T);
  BwdArgs args{logp.data_ptr(), old_logp.data_ptr(), advantages.data_ptr(), reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()),
               grad.data_ptr(), T, n, 1.0 + clip_eps, wc.defined() ? wc.data_ptr() : nullptr, per_row,
               rsc.data_ptr(), go};
  const bool token = gran == Gran::Token;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logp.scalar_type(), "pama_backward", [&] {
    using op_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    if (token)
      backward_pass<scalar_t, op_t, true>(args, part, bc);
    else
      backward_pass<scalar_t, op_t, false>(args, part, bc);
  });
  return grad;
}

// min over the simplex of c^T G c (float64 [N]).
Tensor min_norm_weights_op(const Tensor& gram) {
  TORCH_CHECK_VALUE(gram.dim() == 2 && gram.size(0) == gram.size(1), "min_norm_weights: gram must be [N, N], got ",
                    gram.sizes());
  const int64_t n = gram.size(0);
  TORCH_CHECK_VALUE(n >= 1 && n <= PAMA_MAX_N, "min_norm_weights: N must be in [1, ", PAMA_MAX_N, "], got ", n);
  const Tensor g = gram.to(at::kCPU, at::kDouble).contiguous();
  Tensor c = at::empty({n}, at::TensorOptions().dtype(at::kDouble));
  auto sc = std::make_unique<pama::MinNormScratch>();
  pama::min_norm_weights(g.data_ptr<double>(), static_cast<int>(n), c.data_ptr<double>(), sc.get());
  return c;
}

// The same, with the solver's diagnostics (for tests): (weights, objective, kkt_residual,
// major iterations, minor iterations, status: 0 converged, 1 iteration cap, 2 singular
// bordered system, 3 stalled, 4 trivial case (N <= 2 or G = 0)).
py::tuple min_norm_weights_info_op(const Tensor& gram) {
  Tensor c = min_norm_weights_op(gram);
  const Tensor g = gram.to(at::kCPU, at::kDouble).contiguous();
  const int n = static_cast<int>(g.size(0));
  auto sc = std::make_unique<pama::MinNormScratch>();
  pama::MinNormInfo info;
  std::vector<double> c2(n);
  pama::min_norm_weights(g.data_ptr<double>(), n, c2.data(), sc.get(), &info);
  double obj = 0.0, kkt = 0.0;
  pama::quad_objective_kkt(g.data_ptr<double>(), n, c.data_ptr<double>(), &obj, &kkt);
  return py::make_tuple(c, obj, kkt, info.major_iters, info.minor_iters, info.status);
}

// Theorem 1 along the last dimension (float64, same shape).
Tensor theorem1_op(const Tensor& a) {
  TORCH_CHECK_VALUE(a.dim() >= 1 && a.size(-1) >= 1, "theorem1: expected a tensor [..., N] with N >= 1, got ",
                    a.sizes());
  const Tensor x = a.to(at::kCPU, at::kDouble).contiguous();
  Tensor c = at::empty_like(x);
  const int64_t n = x.size(-1);
  const int64_t rows = n > 0 ? x.numel() / n : 0;
  const double* px = x.data_ptr<double>();
  double* pc = c.data_ptr<double>();
  at::parallel_for(0, rows, 4096, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) pama::theorem1(px + r * n, static_cast<int>(n), pc + r * n);
  });
  return c;
}

py::dict build_info() {
  py::dict d;
  py::list backends;
  backends.append("cpu");
  d["backends"] = backends;
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  d["num_threads"] = at::get_num_threads();
  d["torch_version"] = std::string(TORCH_VERSION);
#ifdef PAMA_WITH_CUDA
  backends.append("cuda");
  {
    py::dict cu;
    const int v = pama_cuda_runtime_version();  // CUDART_VERSION of pama_cuda_kernels.cu
    cu["version"] = std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
#ifdef PAMA_CUDA_ARCHS
#define PAMA_STR_(...) #__VA_ARGS__
#define PAMA_STR(...) PAMA_STR_(__VA_ARGS__)
    const std::string archs = PAMA_STR(PAMA_CUDA_ARCHS);  // "sm_80.sm_90" (setup.py: no commas, nvcc splits -D at them)
#else
    const std::string archs;
#endif
    py::list al;
    for (size_t i = 0; i < archs.size();) {
      size_t j = archs.find('.', i);
      if (j == std::string::npos) j = archs.size();
      if (j > i) al.append(archs.substr(i, j - i));
      i = j + 1;
    }
    cu["archs"] = al;
    d["cuda"] = cu;
  }
#else
  d["cuda"] = py::none();
#endif
  d["max_objectives"] = PAMA_MAX_N;
  d["block_tokens"] = kBlock;
  d["specialised_n"] = py::make_tuple(1, 2, 3, 4, 8);
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pama_ext._C: fused PAMA CPU kernels (see csrc/README.md)";
  m.def("pama_forward", &pama_forward, "one reduction pass + solve: (loss, weights, row_scale, stats)",
        py::arg("logp"), py::arg("old_logp"), py::arg("advantages"), py::arg("mask"), py::arg("clip_eps"),
        py::arg("granularity"), py::arg("loss_agg"), py::arg("check_finite"));
  m.def("pama_backward", &pama_backward, "one elementwise pass: grad_logp", py::arg("grad_loss"), py::arg("logp"),
        py::arg("old_logp"), py::arg("advantages"), py::arg("mask"), py::arg("weights"), py::arg("row_scale"),
        py::arg("clip_eps"), py::arg("granularity"));
  m.def("min_norm_weights", &min_norm_weights_op, "exact argmin over the simplex of c^T G c (float64)",
        py::arg("gram"));
  m.def("_min_norm_weights_info", &min_norm_weights_info_op,
        "min_norm_weights with diagnostics: (weights, objective, kkt_residual, major, minor, status)",
        py::arg("gram"));
  m.def("theorem1", &theorem1_op, "Theorem 1 weights along the last dimension (float64)", py::arg("a"));
  m.def("build_info", &build_info, "what this extension was compiled with");
  // ops of the other source files of the module (csrc/bindings.h)
  register_gae_bindings(m);
#ifdef PAMA_WITH_CUDA
  register_cuda_bindings(m);  // csrc/pama_cuda.cpp (CUDA builds only)
#endif
}
