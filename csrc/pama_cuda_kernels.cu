// pama_cuda_kernels.cu: the fused PAMA CUDA kernels (plain CUDA, no torch headers).
//
// Contract: csrc/README.md; launchers: pama_cuda_kernels.h. The per-token maths, Theorem 1
// and the exact min-norm solver come from pama_math.h (shared with the CPU kernels).
//
// Forward, two kernels, no host synchronisation:
//   1. reduce: one block per unit. A unit is a group of whole rows (T <= kBlockTokens) or one
//      kBlockTokens-token segment of a row (T > kBlockTokens), as on the CPU, so a unit never
//      crosses a sequence. Per row piece the block accumulates M_b, S_{b,i}, Q_{b,i}, Smin_b in
//      double in a fixed order and writes them to its own row-partial slot (for `token` also
//      the per-token gradient factor f_t = s_t u_t 1[u_t <= 1+eps], the [B, T] weights, each
//      element written once by the thread of its token); the Gram upper
//      triangle and the counts are reduced once per unit into the unit's slot. Short rows are
//      reduced several at a time (group_sum); N outside 1, 2, 3, 4, 8 goes through the
//      shared-memory tile kernel reduce_kernel_any.
//   2. finalise: one block. Sums unit slots and row segments in a fixed order, computes M,
//      the non-empty rows, the weights (min_norm_weights / theorem1; the solver's scratch in
//      shared memory where the device allows; for `sequence_gram` the Gram of the per-row
//      means Q_b / M_b, summed over rows in a fixed order), row scales, the loss and the
//      statistics.
// Non-finite inputs under nonfinite="mask": an invalid token's (or sequence's) advantages are
// replaced by 0 with a select before any product, so a dropped token contributes exactly 0,
// never inf * 0 = NaN.
// Every sum has a fixed order that depends only on (B, T, N): no float atomics, so equal
// inputs give bitwise-equal outputs.
// Backward: one elementwise kernel (grid-stride over tokens).
#include "pama_cuda_kernels.h"

#include <atomic>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "pama_math.h"

namespace pama_cuda {
namespace {

static_assert(kMaxN == PAMA_MAX_N, "kMaxN must equal PAMA_MAX_N");
constexpr int kWarps = kThreads / 32;
constexpr int kCounts = 4;  // clipped, nonfinite logp, nonfinite old_logp, nonfinite advantages
constexpr int kLoadAhead = 4;  // tokens of a thread whose loads are issued together (tokens_ahead)

enum Mode : int { kGram = 0, kMean = 1, kMin = 2 };

__host__ __device__ inline int tri_size(int n) { return n * (n + 1) / 2; }
// per-row layout (double): [M_b, Smin_b, S_{b,0..n-1}, Q_{b,0..n-1}]
__host__ __device__ inline int row_stride(int n) { return 2 + 2 * n; }

struct Partition {
  int64_t rows_per_unit;  // T <= kBlockTokens: whole rows per unit
  int64_t segs;           // T > kBlockTokens: segments per row (1 otherwise)
  int64_t units;
};

__host__ __device__ inline Partition make_partition(int64_t B, int64_t T) {
  Partition p;
  if (T > kBlockTokens) {
    p.segs = (T + kBlockTokens - 1) / kBlockTokens;
    p.rows_per_unit = 1;
    p.units = B * p.segs;
  } else {
    p.segs = 1;
    const int64_t t = T > 0 ? T : 1;
    p.rows_per_unit = kBlockTokens / t > 0 ? kBlockTokens / t : 1;
    p.units = (B + p.rows_per_unit - 1) / p.rows_per_unit;
  }
  return p;
}

// ------------------------------------------------------------------------------ loads
template <typename op_t, typename scalar_t>
__device__ inline op_t ld(const scalar_t* p, int64_t i) {
  return static_cast<op_t>(p[i]);
}
template <>
__device__ inline float ld<float, __nv_bfloat16>(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}
template <>
__device__ inline float ld<float, __half>(const __half* p, int64_t i) {
  return __half2float(p[i]);
}

template <typename scalar_t, typename op_t>
__device__ inline scalar_t st(op_t x) {
  return static_cast<scalar_t>(x);
}
template <>
__device__ inline __nv_bfloat16 st<__nv_bfloat16, float>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ inline __half st<__half, float>(float x) {
  return __float2half_rn(x);
}

// ------------------------------------------------------------------------------ reductions
// Fixed-order warp sum (tree over lanes 16, 8, 4, 2, 1): the result in lane 0 is the same
// for the same inputs on every run.
__device__ inline double warp_sum(double v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Block sum of K values per thread (kThreads threads): results in out[0..K) (shared),
// valid after the call for every thread. sm: kWarps * K doubles of shared memory.
// First stage of block_sum / group_sum: each warp's sum of each value to sm[warp * K + k],
// then a barrier. Every thread of the block must call it.
template <int K>
__device__ inline void warp_sums_to_shared(const double (&v)[K], double* sm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const double w = warp_sum(v[k]);
    if (lane == 0) sm[warp * K + k] = w;
  }
  __syncthreads();
}

template <int K>
__device__ inline void block_sum(const double (&v)[K], double* sm, double* out) {
  warp_sums_to_shared<K>(v, sm);
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    double s = 0.0;
    for (int w = 0; w < kWarps; ++w) s += sm[w * K + k];
    out[k] = s;
  }
  __syncthreads();
}

// ------------------------------------------------------------------------------ reduce kernel
struct ReduceArgs {
  const void* logp;
  const void* old_logp;
  const void* adv;
  const uint8_t* mask;
  int64_t B, T;
  int n;
  double one_plus_eps;
  Partition part;
  double* slots;    // [units, slot_stride]: counts[4], Gram upper triangle (Mode kGram)
  int slot_stride;
  double* rowpart;  // [B * segs, row_stride]
  // kMin (granularity "token") only, else null: op_t [B, T], every element written once, the
  // per-token gradient factor f_t = token_factor(...) (csrc/README.md): the forward's weights
  void* factor;
};

// Row piece (b, t0, t1) of unit u, and its row-partial index.
__device__ inline bool piece_of(const ReduceArgs& a, int64_t u, int64_t k, int64_t* b, int64_t* t0, int64_t* t1,
                                int64_t* rp) {
  if (a.part.segs > 1) {
    if (k > 0) return false;
    *b = u / a.part.segs;
    const int64_t s = u % a.part.segs;
    *t0 = s * kBlockTokens;
    *t1 = *t0 + kBlockTokens < a.T ? *t0 + kBlockTokens : a.T;
    *rp = u;
    return true;
  }
  const int64_t r = u * a.part.rows_per_unit + k;
  if (k >= a.part.rows_per_unit || r >= a.B) return false;
  *b = r;
  *t0 = 0;
  *t1 = a.T;
  *rp = r;
  return true;
}

// Per-token terms shared by the reduce kernels. Returns validity; fills u-derived terms.
template <typename op_t>
struct Tok {
  bool masked, flp, folp, valid, ind;
  op_t u;  // the ratio exp(logp - old_logp) (any value for an invalid token)
  op_t m;  // valid ? min(u, 1+eps) : 0
  op_t w;  // valid & ind ? 1 : 0
};

// granularity "token": the gradient factor f_t = s_t * u_t of a valid token with
// u_t <= 1+eps, else 0 (masked out, dropped non-finite, clipped), formed and stored in op_t.
// A select, not a product with the indicator: u = inf gives 0, never inf * 0 = NaN. mn is the
// token's pama::token_min (0 for an invalid token).
template <typename op_t>
__device__ inline op_t token_factor(const Tok<op_t>& k, op_t mn) {
  return (k.valid && k.ind) ? static_cast<op_t>(mn * k.u) : op_t(0);
}

// the terms of a token from its loaded logp x, old_logp y and mask
template <typename op_t>
__device__ inline Tok<op_t> token_terms_of(op_t x, op_t y, bool masked, bool fa, op_t thr) {
  Tok<op_t> k;
  k.masked = masked;
  k.flp = pama::pisfinite(x);
  k.folp = pama::pisfinite(y);
  k.valid = k.masked && k.flp && k.folp && fa;
  const op_t u = pama::ratio(x, y);
  k.u = u;
  k.ind = pama::indicator(u, thr);
  k.m = k.valid ? pama::clipped_ratio(u, thr) : op_t(0);
  k.w = (k.valid && k.ind) ? op_t(1) : op_t(0);
  return k;
}

template <typename scalar_t, typename op_t>
__device__ inline Tok<op_t> token_terms(const ReduceArgs& a, int64_t idx, bool fa, op_t thr) {
  return token_terms_of(ld<op_t>(static_cast<const scalar_t*>(a.logp), idx),
                        ld<op_t>(static_cast<const scalar_t*>(a.old_logp), idx), a.mask[idx] != 0, fa, thr);
}

// What a token's terms are formed from: logp, old_logp, mask and (NA > 0) its NA advantages
template <typename op_t, int NA>
struct TokIn {
  op_t x, y;
  bool masked;
  op_t A[NA > 0 ? NA : 1];
};
template <typename scalar_t, typename op_t, int NA>
__device__ inline TokIn<op_t, NA> load_token(const ReduceArgs& a, int64_t idx) {
  TokIn<op_t, NA> in;
  in.x = ld<op_t>(static_cast<const scalar_t*>(a.logp), idx);
  in.y = ld<op_t>(static_cast<const scalar_t*>(a.old_logp), idx);
  in.masked = a.mask[idx] != 0;
#pragma unroll
  for (int i = 0; i < NA; ++i) in.A[i] = ld<op_t>(static_cast<const scalar_t*>(a.adv), idx * NA + i);
  return in;
}

// A thread's tokens t = first, first + G, ... < t1, kLoadAhead at a time: load(t) for every
// token of a step, then use(t, loaded) for each in token order. One token a step left a warp
// with one load of each input in flight, and the reduce kernels bound by memory latency; the
// order of the sums is the same as one token at a time.
template <typename In, typename Load, typename Use>
__device__ inline void tokens_ahead(int64_t first, int64_t t1, int G, Load load, Use use) {
  for (int64_t tb = first; tb < t1; tb += static_cast<int64_t>(kLoadAhead) * G) {
    In in[kLoadAhead] = {};
#pragma unroll
    for (int s = 0; s < kLoadAhead; ++s) {
      const int64_t t = tb + static_cast<int64_t>(s) * G;
      if (t < t1) in[s] = load(t);  // predicated: rows shorter than 4 G load nothing extra
    }
#pragma unroll
    for (int s = 0; s < kLoadAhead; ++s) {
      const int64_t t = tb + static_cast<int64_t>(s) * G;
      if (t >= t1) break;
      use(t, in[s]);
    }
  }
}

// ---- several short rows per block (issue 10, defect 4)
// A row piece is reduced by an aligned group of G threads, G = the smallest power of two
// >= the row length (at most kThreads), so that a block holding many short rows reduces
// kThreads / G of them at once instead of one after another with most threads idle. G
// depends only on T: the summation order stays a function of (B, T, N).
__host__ __device__ inline int group_threads(int64_t len) {
  int g = 1;
  while (g < kThreads && g < len) g <<= 1;
  return g;
}

struct UnitRows {
  int64_t nrows;  // row pieces of the unit
  int G;          // threads per row piece
  int per_round;  // row pieces reduced at once (kThreads / G)
};

__device__ inline UnitRows unit_rows(const ReduceArgs& a, int64_t u) {
  UnitRows r;
  if (a.part.segs > 1) {
    r.nrows = 1;
    r.G = kThreads;
  } else {
    const int64_t left = a.B - u * a.part.rows_per_unit;
    r.nrows = left < a.part.rows_per_unit ? left : a.part.rows_per_unit;
    r.G = group_threads(a.T);
  }
  r.per_round = kThreads / r.G;
  return r;
}

// Fixed-order sum of K values over every aligned group of G threads (G a power of two,
// 1..kThreads); the group's first thread (threadIdx.x % G == 0) gets the sums in v.
//   G <= 32: shuffle tree with offsets G/2, ..., 1 inside the warp (no shared memory);
//   G > 32: full warp tree, then the group's warps in order (sm: kWarps * K doubles). For
//   G = kThreads this is exactly block_sum's order.
// Every thread of the block must call it (full-mask shuffles; barriers when G > 32).
template <int K>
__device__ inline void group_sum(double (&v)[K], int G, double* sm) {
  if (G <= 32) {
    for (int off = G >> 1; off > 0; off >>= 1)
#pragma unroll
      for (int k = 0; k < K; ++k) v[k] += __shfl_down_sync(0xffffffffu, v[k], off);
    return;
  }
  warp_sums_to_shared<K>(v, sm);
  if ((threadIdx.x & (G - 1)) == 0) {
    const int warp = threadIdx.x >> 5, nw = G >> 5;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      double s = 0.0;
      for (int w = warp; w < warp + nw; ++w) s += sm[w * K + k];
      v[k] = s;
    }
  }
  __syncthreads();
}

// Upper-triangle pair p (row-major, j >= i) of an n x n matrix -> (i, j).
__device__ inline void pair_of(int p, int n, int* i, int* j) {
  int r = 0, rem = p;
  while (rem >= n - r) {
    rem -= n - r;
    ++r;
  }
  *i = r;
  *j = r + rem;
}

// N known at compile time (NT in 1..8): every accumulator in registers.
template <typename scalar_t, typename op_t, int NT, int MODE>
__global__ void __launch_bounds__(kThreads) reduce_kernel_nt(ReduceArgs a) {
  constexpr int NP = (MODE == kGram) ? NT * (NT + 1) / 2 : 1;
  constexpr int KR = 2 + 2 * NT;       // row values
  constexpr int KU = kCounts + NP;     // unit values
  constexpr int KS = KR > KU ? KR : KU;
  __shared__ double sm[kWarps * KS];
  __shared__ double res[KS];
  const op_t thr = static_cast<op_t>(a.one_plus_eps);
  const int64_t u = blockIdx.x;
  double g[NP];
#pragma unroll
  for (int p = 0; p < NP; ++p) g[p] = 0.0;
  double cnt[kCounts] = {0.0, 0.0, 0.0, 0.0};
  const UnitRows ur = unit_rows(a, u);
  const int gl = threadIdx.x & (ur.G - 1);  // this thread's place in its row group
  for (int64_t k0 = 0; k0 < ur.nrows; k0 += ur.per_round) {  // block-uniform trip count
    int64_t b = 0, t0 = 0, t1 = 0, rp = 0;
    const bool has = k0 + threadIdx.x / ur.G < ur.nrows && piece_of(a, u, k0 + threadIdx.x / ur.G, &b, &t0, &t1, &rp);
    double r[KR];
#pragma unroll
    for (int i = 0; i < KR; ++i) r[i] = 0.0;
    if (has)
      tokens_ahead<TokIn<op_t, NT>>(
          t0 + gl, t1, ur.G, [&](int64_t t) { return load_token<scalar_t, op_t, NT>(a, b * a.T + t); },
          [&](int64_t t, const TokIn<op_t, NT>& in) {
        const int64_t idx = b * a.T + t;
        op_t A[NT];
        bool fa = true;
#pragma unroll
        for (int i = 0; i < NT; ++i) {
          A[i] = in.A[i];
          fa &= pama::pisfinite(A[i]);
        }
        const Tok<op_t> tk = token_terms_of(in.x, in.y, in.masked, fa, thr);
        r[0] += tk.valid ? 1.0 : 0.0;
        cnt[0] += (tk.valid && !tk.ind) ? 1.0 : 0.0;
        cnt[1] += (tk.masked && !tk.flp) ? 1.0 : 0.0;
        cnt[2] += (tk.masked && !tk.folp) ? 1.0 : 0.0;
        cnt[3] += (tk.masked && !fa) ? 1.0 : 0.0;
        // a select, so that a non-finite advantage of an invalid token contributes 0, never
        // inf * 0 = NaN
        if (MODE == kMin) {
          // on the raw advantages: exactly-zero advantages abstain (pama::token_min)
          const op_t mn = tk.valid ? pama::token_min(A, NT) : op_t(0);
          r[1] += static_cast<double>(mn * tk.m);
          if (a.factor != nullptr) static_cast<op_t*>(a.factor)[idx] = token_factor(tk, mn);
        } else {
#pragma unroll
          for (int i = 0; i < NT; ++i) A[i] = tk.valid ? pama::noon(A[i]) : op_t(0);
#pragma unroll
          for (int i = 0; i < NT; ++i) r[2 + i] += static_cast<double>(A[i] * tk.m);
          if (MODE == kMean) {
#pragma unroll
            for (int i = 0; i < NT; ++i) r[2 + NT + i] += static_cast<double>(A[i] * tk.w);
          } else {
            double I[NT];
#pragma unroll
            for (int i = 0; i < NT; ++i) I[i] = static_cast<double>(A[i] * tk.w);
            int p = 0;
#pragma unroll
            for (int i = 0; i < NT; ++i)
#pragma unroll
              for (int j = i; j < NT; ++j, ++p) g[p] += I[i] * I[j];
          }
        }
      });
    group_sum<KR>(r, ur.G, sm);
    if (has && gl == 0)
#pragma unroll
      for (int i = 0; i < KR; ++i) a.rowpart[rp * KR + i] = r[i];
  }
  double uv[KU];
#pragma unroll
  for (int i = 0; i < kCounts; ++i) uv[i] = cnt[i];
#pragma unroll
  for (int p = 0; p < NP; ++p) uv[kCounts + p] = (MODE == kGram) ? g[p] : 0.0;
  block_sum<KU>(uv, sm, res);
  double* slot = a.slots + u * a.slot_stride;
  for (int i = threadIdx.x; i < a.slot_stride; i += kThreads) slot[i] = res[i];
}

// ---- any N (1..64), the runtime-N kernel (issue 10, defect 4)
// The unit is processed in chunks of C = min(kThreads, kTileElems / N) tokens:
//   1. load: all kThreads threads copy the chunk's [C x N] advantage tile (contiguous in
//      memory, so the loads are coalesced and independent) into shared memory with row
//      stride P = N | 1 (odd: a token's row read with stride P by consecutive threads hits
//      distinct banks), and flag tokens holding a non-finite value (sNf: every writer
//      stores the same 1, so the result does not depend on the order);
//   2. token terms: thread j < C handles token j (logp, old_logp, mask, validity, m, the
//      clip indicator; the token-level min for `token`, and its gradient factor, written to
//      ReduceArgs::factor);
//   3. sums: the per-row values (M_b, Smin_b, S_{b,i}, Q_{b,i}) are "items" (row, column,
//      sub-lane): an item sums its column over the tokens j == sub-lane mod `sub` of its row,
//      in token order, and the sub-lanes are then added in order; the Gram pairs are items
//      (pair, sub-lane) the same way, accumulated over the whole unit.
// Rows with T <= C are processed floor(C / T) at a time, each chunk holding whole rows;
// longer rows (or segments) are walked chunk by chunk with one accumulator per item. Every
// order depends only on (B, T, N); no atomics.
constexpr int kTileElems = 2048;  // advantage values per chunk (8 loads per thread)
__host__ __device__ constexpr int any_chunk(int n) { return kTileElems / n < kThreads ? kTileElems / n : kThreads; }
__host__ __device__ constexpr int any_stride(int n) { return n | 1; }
constexpr int any_tile_cap() {
  int m = 0;
  for (int n = 1; n <= kMaxN; ++n) {
    const int c = any_chunk(n) * any_stride(n);
    m = c > m ? c : m;
  }
  return m;
}
constexpr int kTileCap = any_tile_cap();
constexpr int kMaxPairs = kMaxN * (kMaxN + 1) / 2;
constexpr int kPairsPerThread = (kMaxPairs + kThreads - 1) / kThreads;

template <typename scalar_t, typename op_t, int MODE>
__global__ void __launch_bounds__(kThreads) reduce_kernel_any(ReduceArgs a) {
  constexpr int KPT = kPairsPerThread;
  __shared__ op_t sA[kTileCap];                        // raw advantages, [C][P]
  __shared__ op_t sM[kThreads];                        // m_j (0 for an invalid token)
  __shared__ double sMin[MODE == kMin ? kThreads : 1];  // min_i x_i * m_j (token)
  __shared__ double sCb[kThreads];                     // item partials of the sub-lanes
  __shared__ int sNf[kThreads];                        // token j has a non-finite advantage
  __shared__ unsigned char sV[kThreads], sW[kThreads];  // valid, valid & ind
  __shared__ double sm[kWarps * kCounts];
  __shared__ double res[kCounts];
  const int n = a.n, P = any_stride(n), C = any_chunk(n), np = tri_size(n), R = row_stride(n);
  // item columns: 0 -> M_b; token: 1 -> Smin_b; else 1..n -> S_{b,i}, (mean) n+1..2n -> Q_{b,i}
  const int ncol = MODE == kMin ? 2 : (MODE == kGram ? 1 + n : 1 + 2 * n);
  const op_t thr = static_cast<op_t>(a.one_plus_eps);
  const int64_t u = blockIdx.x;
  const int tid = threadIdx.x;
  const scalar_t* adv = static_cast<const scalar_t*>(a.adv);

  // this thread's Gram items (pair p, sub-lane s): item = tid + q * kThreads
  const int gsub = (MODE == kGram && np < kThreads) ? kThreads / np : 1;
  int pi[KPT], pj[KPT], ps[KPT];
  double g[KPT];
#pragma unroll
  for (int q = 0; q < KPT; ++q) {
    g[q] = 0.0;
    pi[q] = pj[q] = -1;
    ps[q] = 0;
    const int item = tid + q * kThreads;
    if (MODE == kGram && item < np * gsub) {
      ps[q] = item / np;
      pair_of(item - ps[q] * np, n, &pi[q], &pj[q]);
    }
  }
  double cnt[kCounts] = {0.0, 0.0, 0.0, 0.0};
  sNf[tid] = 0;
  __syncthreads();

  // value of item column c at chunk position j (every product as in reduce_kernel_nt:
  // x = valid ? max(A, 0) : 0 -- a select, never inf * 0 -- then x * m and x * w in op_t;
  // x * w is x or +0 exactly, written as a select)
  auto col = [&](int c, int j) -> double {
    if (c == 0) return sV[j] ? 1.0 : 0.0;
    if (MODE == kMin) return sMin[j];
    if (c <= n) {
      const op_t x = sV[j] ? pama::noon(sA[j * P + c - 1]) : op_t(0);
      return static_cast<double>(x * sM[j]);
    }
    return sW[j] ? static_cast<double>(pama::noon(sA[j * P + c - 1 - n])) : 0.0;
  };
  // item column -> index in the row layout [M_b, Smin_b, S_0.., Q_0..]
  auto layout = [&](int c) { return (c == 0 || MODE == kMin) ? c : c + 1; };
  // row-layout entries no item writes (zero for this mode)
  auto zero_rows = [&](int64_t rp0, int rows) {
    for (int o = tid; o < rows * R; o += kThreads) {
      const int k = o % R;
      const bool act = k == 0 || (MODE == kMin ? k == 1 : (k >= 2 && (MODE == kMean || k < 2 + n)));
      if (!act) a.rowpart[rp0 * R + o] = 0.0;
    }
  };
  // steps 1 and 2 for the L tokens starting at flat token f0; ends after a barrier
  auto load_chunk = [&](int64_t f0, int L) {
    const scalar_t* src = adv + f0 * n;
    for (int e = tid; e < L * n; e += kThreads) {
      const int j = e / n, i = e - j * n;
      const op_t v = ld<op_t>(src, e);
      sA[j * P + i] = v;
      if (!pama::pisfinite(v)) sNf[j] = 1;
    }
    __syncthreads();
    if (tid < L) {
      const int j = tid;
      const bool fa = sNf[j] == 0;
      sNf[j] = 0;  // ready for the next chunk, whose loads come after two barriers
      const Tok<op_t> tk = token_terms<scalar_t, op_t>(a, f0 + j, fa, thr);
      cnt[0] += (tk.valid && !tk.ind) ? 1.0 : 0.0;
      cnt[1] += (tk.masked && !tk.flp) ? 1.0 : 0.0;
      cnt[2] += (tk.masked && !tk.folp) ? 1.0 : 0.0;
      cnt[3] += (tk.masked && !fa) ? 1.0 : 0.0;
      sV[j] = tk.valid ? 1 : 0;
      sW[j] = (tk.valid && tk.ind) ? 1 : 0;
      sM[j] = tk.m;
      if (MODE == kMin) {  // on the raw advantages: exactly-zero advantages abstain
        op_t key = op_t(0);
        for (int i = 0; i < n; ++i) {
          const op_t k = pama::token_key(sA[j * P + i]);
          key = (i == 0) ? k : pama::pmin(key, k);
        }
        const op_t mn = tk.valid ? pama::token_value(key) : op_t(0);
        sMin[j] = static_cast<double>(mn * tk.m);
        if (a.factor != nullptr) static_cast<op_t*>(a.factor)[f0 + j] = token_factor(tk, mn);
      }
    }
    __syncthreads();
  };
  // Gram items over the chunk's L tokens
  auto gram_chunk = [&](int L) {
    if constexpr (MODE == kGram) {
#pragma unroll
      for (int q = 0; q < KPT; ++q) {
        if (pi[q] < 0) break;
        for (int j = ps[q]; j < L; j += gsub) {
          const double Ii = sW[j] ? static_cast<double>(pama::noon(sA[j * P + pi[q]])) : 0.0;
          const double Ij = sW[j] ? static_cast<double>(pama::noon(sA[j * P + pj[q]])) : 0.0;
          g[q] += Ii * Ij;
        }
      }
    } else {
      (void)L;
    }
  };

  if (a.part.segs == 1 && a.T <= C) {
    // whole rows per chunk: Rc rows at a time, every item complete within its chunk
    const int Tl = static_cast<int>(a.T);
    const int Rc = Tl > 0 ? C / Tl : C;
    const int64_t r0 = u * a.part.rows_per_unit;
    const int64_t left = a.B - r0;
    const int64_t nrows = left < a.part.rows_per_unit ? left : a.part.rows_per_unit;
    for (int64_t g0 = 0; g0 < nrows; g0 += Rc) {
      const int Rg = static_cast<int>(nrows - g0 < Rc ? nrows - g0 : Rc);
      const int64_t rp0 = r0 + g0;
      load_chunk(rp0 * a.T, Rg * Tl);
      gram_chunk(Rg * Tl);
      const int items = Rg * ncol, sub = items < kThreads ? kThreads / items : 1;
      for (int it = tid; it < items * sub; it += kThreads) {  // it < kThreads when sub > 1
        const int s = it / items, o = it - s * items, r = o / ncol, c = o - r * ncol;
        double acc = 0.0;
        for (int t = s; t < Tl; t += sub) acc += col(c, r * Tl + t);
        if (sub == 1)
          a.rowpart[(rp0 + r) * R + layout(c)] = acc;
        else
          sCb[it] = acc;
      }
      zero_rows(rp0, Rg);
      __syncthreads();  // sCb complete; the tile may be reloaded
      if (sub > 1) {
        for (int o = tid; o < items; o += kThreads) {
          double s = sCb[o];
          for (int k = 1; k < sub; ++k) s += sCb[k * items + o];
          a.rowpart[(rp0 + o / ncol) * R + layout(o % ncol)] = s;
        }
        __syncthreads();  // sCb free again
      }
    }
  } else {
    // long rows / segments: one piece at a time, chunk by chunk; ncol <= 129 items, so each
    // thread owns at most one (column c, sub-lane s) accumulator
    const UnitRows ur = unit_rows(a, u);
    const int sub = kThreads / ncol;
    const int s = tid / ncol, c = tid - s * ncol;
    const bool mine = tid < ncol * sub;
    for (int64_t k = 0; k < ur.nrows; ++k) {
      int64_t b = 0, t0 = 0, t1 = 0, rp = 0;
      piece_of(a, u, k, &b, &t0, &t1, &rp);
      double acc = 0.0;
      for (int64_t c0 = t0; c0 < t1; c0 += C) {
        const int L = static_cast<int>(t1 - c0 < C ? t1 - c0 : C);
        load_chunk(b * a.T + c0, L);
        gram_chunk(L);
        if (mine)
          for (int j = s; j < L; j += sub) acc += col(c, j);
        __syncthreads();  // the tile may be reloaded
      }
      if (mine) sCb[tid] = acc;
      zero_rows(rp, 1);
      __syncthreads();
      for (int o = tid; o < ncol; o += kThreads) {
        double v = sCb[o];
        for (int q = 1; q < sub; ++q) v += sCb[q * ncol + o];
        a.rowpart[rp * R + layout(o)] = v;
      }
      __syncthreads();
    }
  }
  block_sum<kCounts>(cnt, sm, res);
  double* slot = a.slots + u * a.slot_stride;
  if (tid < kCounts) slot[tid] = res[tid];
  if (MODE == kGram) {
    if (gsub == 1) {
#pragma unroll
      for (int q = 0; q < KPT; ++q)
        if (pi[q] >= 0) slot[kCounts + tid + q * kThreads] = g[q];
    } else {
      if (pi[0] >= 0) sCb[tid] = g[0];  // item = tid = s * np + p (np * gsub <= kThreads)
      __syncthreads();
      for (int p = tid; p < np; p += kThreads) {
        double v = sCb[p];
        for (int q = 1; q < gsub; ++q) v += sCb[q * np + p];
        slot[kCounts + p] = v;
      }
    }
  }
}

// Sequence-level advantages [B, N]: A is constant along the row, so the sums factor:
// S_i = A_i sum_t m_t, Q_i = A_i #{ind}, G_ij += A_i A_j #{ind}, Smin = s sum_t m_t
// (s = pama::token_min of the raw advantages: exactly-zero advantages abstain; computed in
// op_t before the token loop, which writes the token factor f_t = token_factor(s, u_t)).
// A row whose advantages are not all finite has no valid token (sum_t m_t = #{ind} = 0);
// its A is taken as 0 (a select) so that it contributes exactly 0, as if masked out, and
// never inf * 0 = NaN (issue 10, defect 3). Rows are reduced by groups of threads
// (group_sum); the Gram is summed per pair, one thread per pair, over the unit's rows in
// order, from the rows' #{ind} kept in shared memory.
template <typename scalar_t, typename op_t, int MODE>
__global__ void __launch_bounds__(kThreads) reduce_kernel_bc(ReduceArgs a) {
  __shared__ double sm[kWarps * kCounts];
  __shared__ double res[kCounts];
  __shared__ double sNi[MODE == kGram ? kBlockTokens : 1];  // #{ind} of each row piece
  const int n = a.n, np = tri_size(n);
  const op_t thr = static_cast<op_t>(a.one_plus_eps);
  const int64_t u = blockIdx.x;
  const int R = row_stride(n);
  const scalar_t* adv = static_cast<const scalar_t*>(a.adv);
  double cnt[kCounts] = {0.0, 0.0, 0.0, 0.0};
  const UnitRows ur = unit_rows(a, u);  // nrows <= kBlockTokens
  const int gl = threadIdx.x & (ur.G - 1);
  for (int64_t k0 = 0; k0 < ur.nrows; k0 += ur.per_round) {  // block-uniform trip count
    const int64_t k = k0 + threadIdx.x / ur.G;
    int64_t b = 0, t0 = 0, t1 = 0, rp = 0;
    const bool has = k < ur.nrows && piece_of(a, u, k, &b, &t0, &t1, &rp);
    const scalar_t* ar = adv + b * n;
    bool fa = true;
    op_t key = op_t(0);  // token: min of pama::token_key over the raw advantages
    if (has)
      for (int i = 0; i < n; ++i) {  // independent loads
        const op_t x = ld<op_t>(ar, i);
        fa &= pama::pisfinite(x);
        if (MODE == kMin) {
          const op_t ki = pama::token_key(x);
          key = (i == 0) ? ki : pama::pmin(key, ki);
        }
      }
    // token: the row's s (exactly-zero advantages abstain, pama::token_min), in op_t as the
    // per-token factor needs it; 0 for a non-finite row
    const op_t mn = (MODE == kMin && fa) ? pama::token_value(key) : op_t(0);
    op_t* const fo = MODE == kMin ? static_cast<op_t*>(a.factor) : nullptr;
    double v[3] = {0.0, 0.0, 0.0};  // M, sum m, #ind
    if (has)
      tokens_ahead<TokIn<op_t, 0>>(
          t0 + gl, t1, ur.G, [&](int64_t t) { return load_token<scalar_t, op_t, 0>(a, b * a.T + t); },
          [&](int64_t t, const TokIn<op_t, 0>& in) {
        const Tok<op_t> tk = token_terms_of(in.x, in.y, in.masked, fa, thr);
        if (fo != nullptr) fo[b * a.T + t] = token_factor(tk, mn);
        v[0] += tk.valid ? 1.0 : 0.0;
        v[1] += static_cast<double>(tk.m);
        v[2] += (tk.valid && tk.ind) ? 1.0 : 0.0;
        cnt[0] += (tk.valid && !tk.ind) ? 1.0 : 0.0;
        cnt[1] += (tk.masked && !tk.flp) ? 1.0 : 0.0;
        cnt[2] += (tk.masked && !tk.folp) ? 1.0 : 0.0;
        cnt[3] += (tk.masked && !fa) ? 1.0 : 0.0;
      });
    group_sum<3>(v, ur.G, sm);
    if (has && gl == 0) {
      const double sum_m = v[1], ni = v[2];
      double* row = a.rowpart + rp * R;
      row[0] = v[0];
      for (int i = 0; i < n; ++i) {
        const op_t x = ld<op_t>(ar, i);
        const double A = fa ? static_cast<double>(pama::noon(x)) : 0.0;
        row[2 + i] = (MODE == kMin) ? 0.0 : A * sum_m;
        row[2 + n + i] = (MODE == kMean) ? A * ni : 0.0;
      }
      row[1] = (MODE == kMin) ? static_cast<double>(mn) * sum_m : 0.0;
      if (MODE == kGram) sNi[k] = ni;
    }
  }
  block_sum<kCounts>(cnt, sm, res);  // its barriers also publish sNi
  double* slot = a.slots + u * a.slot_stride;
  if (threadIdx.x < kCounts) slot[threadIdx.x] = res[threadIdx.x];
  if (MODE == kGram)
    for (int p = threadIdx.x; p < np; p += kThreads) {
      int i, j;
      pair_of(p, n, &i, &j);
      double s = 0.0;
      for (int64_t k = 0; k < ur.nrows; ++k) {
        const double ni = sNi[k];
        if (!(ni > 0.0)) continue;  // no valid token (masked out, or non-finite A): adds 0
        int64_t b, t0, t1, rp;
        piece_of(a, u, k, &b, &t0, &t1, &rp);
        const scalar_t* ar = adv + b * n;  // all finite: the row has a valid token
        const double Ai = static_cast<double>(pama::noon(ld<op_t>(ar, i)));
        const double Aj = static_cast<double>(pama::noon(ld<op_t>(ar, j)));
        s += Ai * Aj * ni;
      }
      slot[kCounts + p] = s;
    }
}

// ------------------------------------------------------------------------------ finalise kernel
struct FinaliseArgs {
  int64_t B;
  int n;
  int gran, agg;
  Partition part;
  const double* slots;
  int slot_stride;
  const double* rowpart;  // [B * segs, R]
  double* G;              // n * n
  double* cvec;           // n (batch / batch_mean / sequence_gram weights in double)
  pama::MinNormScratch* mn_scratch;
  bool smem_solver;       // G, cvec and the solver scratch in dynamic shared memory instead
  void* loss;
  void* weights;  // [N] or [B, N] (sequence); null for token (its [B, T] factor is the reduce's)
  void* row_scale;
  double* stats;
};

constexpr int kFWarps = kFinaliseThreads / 32;

// Fixed-order sum over the block of one value per thread: thread t's partial (its own
// strided items, in order) -> warp tree -> warps in order. Every thread gets the result.
__device__ inline double fblock_sum(double v, double* sm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) sm[warp] = v;
  __syncthreads();
  double s = 0.0;
  for (int w = 0; w < kFWarps; ++w) s += sm[w];
  __syncthreads();
  return s;
}

// total of row b's value k over its segments (in segment order)
__device__ inline double row_value(const FinaliseArgs& a, int64_t b, int k) {
  const int R = row_stride(a.n);
  double s = 0.0;
  for (int64_t s_ = 0; s_ < a.part.segs; ++s_) s += a.rowpart[(b * a.part.segs + s_) * R + k];
  return s;
}

template <typename acc_t>
__global__ void __launch_bounds__(kFinaliseThreads) finalise_kernel(FinaliseArgs a) {
  __shared__ double sm[kFWarps];
  __shared__ double q[kCounts + kMaxN * (kMaxN + 1) / 2];  // unit totals (counts, Gram)
  __shared__ double am[kMaxN];                           // batch_mean: a_i sums
  __shared__ double cw[kMaxN];                           // batch / batch_mean / sequence_gram weights (double)
  __shared__ double scal[4];                             // objective, kkt
  const int n = a.n;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nq = kCounts + ((a.gran == kBatch) ? tri_size(n) : 0);
  // 1. unit totals: quantity k by warp (k mod warps); lanes take units strided, warp tree.
  for (int k = warp; k < nq; k += kFWarps) {
    double s = 0.0;
    for (int64_t u = lane; u < a.part.units; u += 32) s += a.slots[u * a.slot_stride + k];
    s = warp_sum(s);
    if (lane == 0) q[k] = s;
  }
  // batch_mean: a_i = sum_b Q_{b,i}, same pattern over rows
  if (a.gran == kBatchMean)
    for (int i = warp; i < n; i += kFWarps) {
      double s = 0.0;
      for (int64_t b = lane; b < a.B; b += 32) s += row_value(a, b, 2 + n + i);
      s = warp_sum(s);
      if (lane == 0) am[i] = s;
    }
  // sequence_gram: each response counts once. G_ij = sum_b v_{b,i} v_{b,j}, v_b = Q_b / M_b
  // (0 for a row without a valid token), into the Gram slots of q: pair (i, j >= i) by warp,
  // lanes take rows strided, warp tree (the same fixed order as the unit totals)
  if (a.gran == kSequenceGram)
    for (int p = warp; p < tri_size(n); p += kFWarps) {
      int i = 0, jj = p;
      while (jj >= n - i) {  // pair p of the row-major upper triangle -> (i, j)
        jj -= n - i;
        ++i;
      }
      const int j = i + jj;
      double s = 0.0;
      for (int64_t b = lane; b < a.B; b += 32) {
        const double mb = row_value(a, b, 0);
        if (mb > 0.0) s += (row_value(a, b, 2 + n + i) / mb) * (row_value(a, b, 2 + n + j) / mb);
      }
      s = warp_sum(s);
      if (lane == 0) q[kCounts + p] = s;
    }
  // 2. M and the non-empty rows
  double m_part = 0.0, ne_part = 0.0;
  for (int64_t b = threadIdx.x; b < a.B; b += kFinaliseThreads) {
    const double mb = row_value(a, b, 0);
    m_part += mb;
    ne_part += mb > 0.0 ? 1.0 : 0.0;
  }
  __syncthreads();
  const double M = fblock_sum(m_part, sm);
  const double nonempty = fblock_sum(ne_part, sm);
  // 3. the solve on N numbers. The batch solve (pama::min_norm_weights, the same code as
  // the CPU kernel) runs in one thread, but on shared memory when it fits (smem_solver,
  // decided by the launcher from the device's opt-in limit): the Wolfe iterations then
  // touch on-chip memory only, instead of global scratch (issue 10, defect 4). The Gram is
  // unpacked by the whole block first.
  static_assert(sizeof(pama::MinNormScratch) % sizeof(double) == 0, "G must stay 8-byte aligned");
  extern __shared__ double dyn[];  // [MinNormScratch | G n*n | cvec n] when smem_solver
  pama::MinNormScratch* const mns = a.smem_solver ? reinterpret_cast<pama::MinNormScratch*>(dyn) : a.mn_scratch;
  double* const G = a.smem_solver ? dyn + sizeof(pama::MinNormScratch) / sizeof(double) : a.G;
  double* const cvec = a.smem_solver ? G + n * n : a.cvec;
  const bool gram_solve = a.gran == kBatch || a.gran == kSequenceGram;
  if (gram_solve) {
    for (int e = threadIdx.x; e < n * n; e += kFinaliseThreads) {
      const int r = e / n, c = e - r * n;
      const int i = r < c ? r : c, j = r < c ? c : r;
      G[e] = q[kCounts + i * n - i * (i - 1) / 2 + (j - i)];  // pair (i, j >= i), row-major
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    scal[0] = scal[1] = 0.0;
    if (gram_solve) {
      pama::min_norm_weights(G, n, cvec, mns);
      double obj = 0.0, kkt = 0.0;
      pama::quad_objective_kkt(G, n, cvec, &obj, &kkt);
      scal[0] = obj;
      scal[1] = kkt;
      for (int i = 0; i < n; ++i) cw[i] = cvec[i];
    } else if (a.gran == kBatchMean) {
      double av[kMaxN];
      for (int i = 0; i < n; ++i) av[i] = M > 0.0 ? am[i] / M : 0.0;
      pama::theorem1(av, n, cvec);
      double s = 0.0;
      for (int i = 0; i < n; ++i) s += cvec[i] * av[i];
      scal[0] = s * s;
      for (int i = 0; i < n; ++i) cw[i] = cvec[i];
    }
  }
  __syncthreads();
  if (gram_solve || a.gran == kBatchMean)
    for (int i = threadIdx.x; i < n; i += kFinaliseThreads) static_cast<acc_t*>(a.weights)[i] = static_cast<acc_t>(cw[i]);
  // 4. per row: row scale, (sequence) weights, the loss term with the rounded outputs
  double loss_part = 0.0, obj_part = 0.0;
  acc_t* rs_out = static_cast<acc_t*>(a.row_scale);
  for (int64_t b = threadIdx.x; b < a.B; b += kFinaliseThreads) {
    const double mb = row_value(a, b, 0);
    double r;
    if (a.agg == kTokenMean)
      r = M > 0.0 ? 1.0 / M : 0.0;
    else
      r = mb > 0.0 ? 1.0 / (nonempty * mb) : 0.0;
    const acc_t r_acc = static_cast<acc_t>(r);
    rs_out[b] = r_acc;
    double v = 0.0;
    if (a.gran == kToken) {
      v = row_value(a, b, 1);
    } else if (a.gran == kSequence) {
      double av[kMaxN], c[kMaxN];
      for (int i = 0; i < n; ++i) av[i] = mb > 0.0 ? row_value(a, b, 2 + n + i) / mb : 0.0;
      pama::theorem1(av, n, c);
      double s = 0.0;
      acc_t* w = static_cast<acc_t*>(a.weights) + b * n;
      for (int i = 0; i < n; ++i) {
        s += c[i] * av[i];
        const acc_t ci = static_cast<acc_t>(c[i]);
        w[i] = ci;
        v += static_cast<double>(ci) * row_value(a, b, 2 + i);
      }
      if (mb > 0.0) obj_part += s * s;
    } else {
      for (int i = 0; i < n; ++i) v += static_cast<double>(static_cast<acc_t>(cw[i])) * row_value(a, b, 2 + i);
    }
    loss_part += static_cast<double>(r_acc) * v;
  }
  const double loss_sum = fblock_sum(loss_part, sm);
  const double obj_sum = fblock_sum(obj_part, sm);
  if (threadIdx.x == 0) {
    double loss = -loss_sum;
    if (loss == 0.0) loss = 0.0;  // no -0.0
    *static_cast<acc_t*>(a.loss) = static_cast<acc_t>(loss);
    double objective = scal[0];
    if (a.gran == kSequence) objective = nonempty > 0.0 ? obj_sum / nonempty : 0.0;
    if (a.gran == kToken) objective = 0.0;
    a.stats[0] = M;
    a.stats[1] = q[0];
    a.stats[2] = q[1];
    a.stats[3] = q[2];
    a.stats[4] = q[3];
    a.stats[5] = objective;
    a.stats[6] = gram_solve ? scal[1] : 0.0;
    a.stats[7] = nonempty;
  }
}

// ------------------------------------------------------------------------------ backward kernel
struct BackwardArgs {
  const void* logp;
  const void* old_logp;
  const void* adv;
  const uint8_t* mask;
  void* grad;
  int64_t B, T;
  int n;
  double one_plus_eps;
  const void* weights;
  bool weights_per_row;
  const void* row_scale;
  const double* grad_loss;
};

template <typename scalar_t, typename op_t, int NT, bool BC, bool TOKEN>
__global__ void __launch_bounds__(kThreads) backward_kernel(BackwardArgs a) {
  const int n = NT > 0 ? NT : a.n;
  const op_t thr = static_cast<op_t>(a.one_plus_eps);
  const int64_t total = a.B * a.T;
  const double go = *a.grad_loss;
  const op_t* wt = static_cast<const op_t*>(a.weights);
  const op_t* rs = static_cast<const op_t*>(a.row_scale);
  const scalar_t* ad = static_cast<const scalar_t*>(a.adv);
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t b = idx / a.T;
    const op_t x = ld<op_t>(static_cast<const scalar_t*>(a.logp), idx);
    const op_t y = ld<op_t>(static_cast<const scalar_t*>(a.old_logp), idx);
    const op_t u = pama::ratio(x, y);
    const scalar_t* ar = BC ? ad + b * n : ad + idx * n;
    const op_t* c = TOKEN ? nullptr : wt + (a.weights_per_row ? b * n : 0);
    bool fa = true;
    op_t s = op_t(0);
#pragma unroll
    for (int i = 0; i < (NT > 0 ? NT : kMaxN); ++i) {
      if (NT == 0 && i >= n) break;
      const op_t v = ld<op_t>(ar, i);
      fa = fa && pama::pisfinite(v);
      if (TOKEN) {  // the min of pama::token_key over the raw advantages
        const op_t k = pama::token_key(v);
        s = (i == 0) ? k : pama::pmin(s, k);
      } else {
        const op_t A = pama::noon(v);
        s = (i == 0) ? c[0] * A : s + c[i] * A;
      }
    }
    // token: exactly-zero advantages abstain (pama::token_min); +inf (all abstain) -> 0
    if (TOKEN) s = pama::token_value(s);
    // coef = -grad_out * r_b rounded once to op_t (the reference's order ((-g r) s) u)
    const op_t coef = static_cast<op_t>(-(go * static_cast<double>(rs[b])));
    const bool ok = a.mask[idx] != 0 && pama::pisfinite(x) && pama::pisfinite(y) && fa && pama::indicator(u, thr);
    static_cast<scalar_t*>(a.grad)[idx] = st<scalar_t, op_t>(ok ? (coef * s) * u : op_t(0));
  }
}

// ------------------------------------------------------------------------------ dispatch
template <typename F>
cudaError_t dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case kFloat64: return f(double(), double());
    case kFloat32: return f(float(), float());
    case kBFloat16: return f(__nv_bfloat16(), float());
    case kFloat16: return f(__half(), float());
  }
  return cudaErrorInvalidValue;
}

inline size_t align_up(size_t x) { return (x + 255) / 256 * 256; }

struct Workspace {
  double* slots;
  double* rowpart;
  double* G;
  double* cvec;
  pama::MinNormScratch* mn;
  int slot_stride;
};

Workspace carve(void* base, int64_t B, int64_t T, int n, Gran gran, size_t* total) {
  const Partition p = make_partition(B, T);
  Workspace w;
  w.slot_stride = kCounts + ((gran == kBatch) ? tri_size(n) : 0);
  char* c = static_cast<char*>(base);
  size_t off = 0;
  w.slots = reinterpret_cast<double*>(c + off);
  off += align_up(sizeof(double) * static_cast<size_t>(p.units) * w.slot_stride);
  w.rowpart = reinterpret_cast<double*>(c + off);
  off += align_up(sizeof(double) * static_cast<size_t>(B * p.segs) * row_stride(n));
  w.G = reinterpret_cast<double*>(c + off);
  off += align_up(sizeof(double) * n * n);
  w.cvec = reinterpret_cast<double*>(c + off);
  off += align_up(sizeof(double) * n);
  w.mn = reinterpret_cast<pama::MinNormScratch*>(c + off);
  off += align_up(sizeof(pama::MinNormScratch));
  if (total) *total = off;
  return w;
}

template <typename scalar_t, typename op_t, int MODE>
void launch_reduce(const ReduceArgs& ra, bool bc, int n, unsigned grid, cudaStream_t stream) {
  if (bc) {
    reduce_kernel_bc<scalar_t, op_t, MODE><<<grid, kThreads, 0, stream>>>(ra);
    return;
  }
  switch (n) {
    case 1: reduce_kernel_nt<scalar_t, op_t, 1, MODE><<<grid, kThreads, 0, stream>>>(ra); return;
    case 2: reduce_kernel_nt<scalar_t, op_t, 2, MODE><<<grid, kThreads, 0, stream>>>(ra); return;
    case 3: reduce_kernel_nt<scalar_t, op_t, 3, MODE><<<grid, kThreads, 0, stream>>>(ra); return;
    case 4: reduce_kernel_nt<scalar_t, op_t, 4, MODE><<<grid, kThreads, 0, stream>>>(ra); return;
    case 8: reduce_kernel_nt<scalar_t, op_t, 8, MODE><<<grid, kThreads, 0, stream>>>(ra); return;
    default: reduce_kernel_any<scalar_t, op_t, MODE><<<grid, kThreads, 0, stream>>>(ra); return;
  }
}

template <typename scalar_t, typename op_t, bool TOKEN>
void launch_bwd(const BackwardArgs& ba, bool bc, int n, unsigned grid, cudaStream_t stream) {
  if (bc) {
    backward_kernel<scalar_t, op_t, 0, true, TOKEN><<<grid, kThreads, 0, stream>>>(ba);
    return;
  }
  switch (n) {
    case 1: backward_kernel<scalar_t, op_t, 1, false, TOKEN><<<grid, kThreads, 0, stream>>>(ba); return;
    case 2: backward_kernel<scalar_t, op_t, 2, false, TOKEN><<<grid, kThreads, 0, stream>>>(ba); return;
    case 3: backward_kernel<scalar_t, op_t, 3, false, TOKEN><<<grid, kThreads, 0, stream>>>(ba); return;
    case 4: backward_kernel<scalar_t, op_t, 4, false, TOKEN><<<grid, kThreads, 0, stream>>>(ba); return;
    case 8: backward_kernel<scalar_t, op_t, 8, false, TOKEN><<<grid, kThreads, 0, stream>>>(ba); return;
    default: backward_kernel<scalar_t, op_t, 0, false, TOKEN><<<grid, kThreads, 0, stream>>>(ba); return;
  }
}

// The batch solve's scratch goes to dynamic shared memory (103,448 bytes for any N: the
// MinNormScratch struct has fixed kMaxN-sized arrays; 121,288 with the static shared
// memory) when the device allows it (sm_80: 163 KB, sm_90: 227 KB per block with opt-in);
// otherwise (sm_86 / sm_89 / sm_120, 99 KB) the global workspace is used as before.
// The decision is taken once per device and cached: the probe's four runtime calls are not
// repeated on every forward, and the pending-error state is cleared only after the probe's
// own failure (never someone else's unchecked launch error). No synchronisation.
template <typename acc_t>
size_t finalise_dynamic_smem_bytes() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> state[kMaxDevices];  // per device: 0 unknown, 1 shared memory, -1 global scratch
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) {
    (void)cudaGetLastError();  // our own failed query: use the global scratch
    return 0;
  }
  const size_t want = sizeof(pama::MinNormScratch) + sizeof(double) * (kMaxN * kMaxN + kMaxN);
  int s = state[dev].load(std::memory_order_acquire);
  if (s == 0) {
    int optin = 0;
    cudaFuncAttributes attr;
    const bool ok = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) == cudaSuccess &&
                    cudaFuncGetAttributes(&attr, finalise_kernel<acc_t>) == cudaSuccess &&
                    want + attr.sharedSizeBytes <= static_cast<size_t>(optin) &&
                    cudaFuncSetAttribute(finalise_kernel<acc_t>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(want)) == cudaSuccess;
    if (!ok) (void)cudaGetLastError();  // only the probe's own failure
    s = ok ? 1 : -1;
    state[dev].store(s, std::memory_order_release);
  }
  return s > 0 ? want : 0;
}

template <typename acc_t>
cudaError_t launch_finalise(FinaliseArgs fa, Gran gran, cudaStream_t stream) {
  // n <= 2: closed forms, no scratch used
  const size_t dyn = ((gran == kBatch || gran == kSequenceGram) && fa.n >= 3) ? finalise_dynamic_smem_bytes<acc_t>() : 0;
  fa.smem_solver = dyn > 0;
  finalise_kernel<acc_t><<<1, kFinaliseThreads, dyn, stream>>>(fa);
  return cudaGetLastError();
}

}  // namespace

size_t forward_workspace_bytes(int64_t B, int64_t T, int n, Gran gran) {
  size_t total = 0;
  carve(nullptr, B, T, n, gran, &total);
  return total;
}

cudaError_t launch_forward(const Inputs& in, Gran gran, Agg agg, const ForwardOutputs& out, void* workspace,
                           cudaStream_t stream) {
  if (in.n < 1 || in.n > kMaxN || in.B < 0 || in.T < 0) return cudaErrorInvalidValue;
  const Partition part = make_partition(in.B, in.T);
  if (part.units > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const Workspace w = carve(workspace, in.B, in.T, in.n, gran, nullptr);
  const int mode = gran == kBatch ? kGram : (gran == kToken ? kMin : kMean);
  if (part.units > 0) {
    // token: the reduce kernel writes the [B, T] gradient factor straight into the weights
    ReduceArgs ra{in.logp, in.old_logp, in.adv, in.mask, in.B, in.T, in.n, 1.0 + in.clip_eps, part, w.slots,
                  w.slot_stride, w.rowpart, gran == kToken ? out.weights : nullptr};
    const unsigned grid = static_cast<unsigned>(part.units);
    cudaError_t e = dispatch_dtype(in.dtype, [&](auto s, auto o) {
      using scalar_t = decltype(s);
      using op_t = decltype(o);
      if (mode == kGram)
        launch_reduce<scalar_t, op_t, kGram>(ra, in.broadcast, in.n, grid, stream);
      else if (mode == kMean)
        launch_reduce<scalar_t, op_t, kMean>(ra, in.broadcast, in.n, grid, stream);
      else
        launch_reduce<scalar_t, op_t, kMin>(ra, in.broadcast, in.n, grid, stream);
      return cudaGetLastError();
    });
    if (e != cudaSuccess) return e;
  }
  // finalise never touches the weights for token (the reduce kernel wrote them)
  FinaliseArgs fa{in.B, in.n, static_cast<int>(gran), static_cast<int>(agg), part, w.slots, w.slot_stride,
                  w.rowpart, w.G, w.cvec, w.mn, false, out.loss, gran == kToken ? nullptr : out.weights,
                  out.row_scale, out.stats};
  if (in.dtype == kFloat64)
    return launch_finalise<double>(fa, gran, stream);
  return launch_finalise<float>(fa, gran, stream);
}

cudaError_t launch_backward(const Inputs& in, Gran gran, const double* grad_loss, const void* weights,
                            const void* row_scale, void* grad, cudaStream_t stream) {
  if (in.n < 1 || in.n > kMaxN || in.B < 0 || in.T < 0) return cudaErrorInvalidValue;
  const int64_t total = in.B * in.T;
  if (total == 0) return cudaSuccess;
  BackwardArgs ba{in.logp, in.old_logp, in.adv, in.mask, grad, in.B, in.T, in.n, 1.0 + in.clip_eps,
                  weights, gran == kSequence, row_scale, grad_loss};
  int64_t blocks = (total + kThreads - 1) / kThreads;
  if (blocks > 65535LL * 16) blocks = 65535LL * 16;  // grid-stride beyond
  const unsigned grid = static_cast<unsigned>(blocks);
  const bool token = gran == kToken;
  return dispatch_dtype(in.dtype, [&](auto s, auto o) {
    using scalar_t = decltype(s);
    using op_t = decltype(o);
    if (token)
      launch_bwd<scalar_t, op_t, true>(ba, in.broadcast, in.n, grid, stream);
    else
      launch_bwd<scalar_t, op_t, false>(ba, in.broadcast, in.n, grid, stream);
    return cudaGetLastError();
  });
}

int compiled_cuda_version() { return CUDART_VERSION; }

}  // namespace pama_cuda
