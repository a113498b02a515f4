// pama_cpu_kernels.h: the hot loops of the fused CPU op (forward reduction pass, backward
// elementwise pass), written once and compiled once per instruction set.
//
// NOT a normal header: no include guard, no includes. Each pama_cpu_isa_*.cpp includes it once,
// inside its own namespace (pama_cpu::isa_<set>) and under its own `#pragma GCC target`
// (baseline x86-64, AVX2+FMA, AVX-512), after pama_cpu_pass.h, whose definitions it uses
// (Mode, Partition, for_each_piece, kBlock, tri_size, the argument structs, pama_math.h).
// Every function here, the small helpers included, is thus compiled for that instruction set,
// and the dispatcher in pama_cpu.cpp picks one set at run time (ATen's per-ISA compilation
// units). The entry points at the end are what a set exports.
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

#ifdef PAMA_CPU_AVX512
// exp_f32 on 16 lanes, the same operations in the same order (GCC contracts exp_f32's
// multiply-adds into FMAs in this file, so those are written as FMAs here), except the
// scaling by 2^n: one vscalefps computes y * 2^n rounded once, which is what exp_f32's two
// half-multiplies give (the first is exact), for nine instructions less. Same bits for every
// input: python_tests/test_cpu_isa.py runs both on all 2^32 floats (exp_avx512_check.cpp).
inline __m512 exp_f32_x16(__m512 x) {
  const __m512 xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(89.0f));
  const __m512 magic = _mm512_set1_ps(12582912.0f);
  const __m512 k = _mm512_fmadd_ps(xc, _mm512_set1_ps(1.44269504088896341f), magic);
  const __m512 n = _mm512_sub_ps(k, magic);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);  // r - n * -2.12194440e-4
  const __m512 r2 = _mm512_mul_ps(r, r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0f));
  const __m512 e = _mm512_scalef_ps(y, n);
  return _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);  // NaN stays NaN
}

// chunk_ratios' loop for float inputs, 16 tokens at a time; returns how many tokens it did
template <typename Buf>
inline int ratios_x16(const float* lp, const float* olp, int L, Buf& cb) {
  const __m512 zero = _mm512_setzero_ps();
  int j = 0;
  for (; j + 16 <= L; j += 16) {
    const __m512 x = _mm512_loadu_ps(lp + j), y = _mm512_loadu_ps(olp + j);
    // finite(v) as in finite_mask: v - v == 0
    _mm512_storeu_si512(cb.flp + j, _mm512_movm_epi32(_mm512_cmp_ps_mask(_mm512_sub_ps(x, x), zero, _CMP_EQ_OQ)));
    _mm512_storeu_si512(cb.folp + j, _mm512_movm_epi32(_mm512_cmp_ps_mask(_mm512_sub_ps(y, y), zero, _CMP_EQ_OQ)));
    _mm512_storeu_ps(cb.u + j, exp_f32_x16(_mm512_sub_ps(x, y)));
  }
  return j;
}
#endif

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
constexpr int LN = 16;  // 16 lanes: enough independent add chains to hide the add latency
                        // (4 lanes left each objective's sum waiting on one chain: 1.2 ns a token)

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
  int j0 = 0;
#ifdef PAMA_CPU_AVX512
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<op_t, float>) j0 = ratios_x16(lp, olp, L, cb);
#endif
  for (int j = j0; j < L; ++j) {
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

// A W x W block transposed in registers: W rows of W consecutive elements at x (rows
// `stride` elements apart) become W rows at out (`out_stride` apart), by log2(W) rounds of
// interleaving row i with row i + W/2 (a perfect shuffle). GCC vector extensions, so one
// source serves AVX2 and AVX-512 (the baseline build never instantiates it).
template <typename T, int W>
inline void transpose_block(const T* x, int64_t stride, T* out, int out_stride) {
  typedef T vec __attribute__((vector_size(W * sizeof(T))));
  using I = std::conditional_t<sizeof(T) == 8, int64_t, int32_t>;
  typedef I ivec __attribute__((vector_size(W * sizeof(T))));
  ivec lo, hi;  // lo = a0 b0 a1 b1 ..., hi = the same from the upper halves
  for (int k = 0; k < W / 2; ++k) {
    lo[2 * k] = k, lo[2 * k + 1] = k + W;
    hi[2 * k] = k + W / 2, hi[2 * k + 1] = k + W / 2 + W;
  }
  vec r[W], t[W];
#pragma GCC unroll 8
  for (int k = 0; k < W; ++k) std::memcpy(&r[k], x + k * stride, sizeof(vec));
#pragma GCC unroll 3
  for (int round = 1; round < W; round *= 2) {
#pragma GCC unroll 4
    for (int i = 0; i < W / 2; ++i) {
      t[2 * i] = __builtin_shuffle(r[i], r[i + W / 2], lo);
      t[2 * i + 1] = __builtin_shuffle(r[i], r[i + W / 2], hi);
    }
#pragma GCC unroll 8
    for (int k = 0; k < W; ++k) r[k] = t[k];
  }
#pragma GCC unroll 8
  for (int k = 0; k < W; ++k) std::memcpy(out + k * out_stride, &r[k], sizeof(vec));
}

// At[i][j] = ad[j * n + i] for the W columns i0 .. i0 + W - 1 and tokens [0, L)
template <typename T, int W, int CH>
inline void transpose_columns(const T* ad, int n, int i0, int L, T (*At)[CH]) {
  int j = 0;
  for (; j + W <= L; j += W) transpose_block<T, W>(ad + static_cast<int64_t>(j) * n + i0, n, &At[i0][j], CH);
  for (; j < L; ++j)
    for (int i = i0; i < i0 + W; ++i) At[i][j] = ad[static_cast<int64_t>(j) * n + i];
}

// transposed raw advantages At[i][j] = adv[j, i] and their finiteness (per token)
template <typename scalar_t, typename op_t, int NT, typename Buf>
inline void chunk_advantages(const scalar_t* ad, int n_rt, int L, int Lp, Buf& cb, mask_t<op_t>* fa) {
  const int n = NT > 0 ? NT : n_rt;
  if constexpr (NT > 0 || !std::is_same_v<scalar_t, op_t> || kVecDoubles < 4) {
    // N known at compile time: GCC vectorises this with in-register permutes
    for (int j = 0; j < L; ++j)
      for (int i = 0; i < n; ++i) cb.At[i][j] = ld<op_t>(ad, static_cast<int64_t>(j) * n + i);
  } else {
    // runtime N: element by element this took 3 cycles an element (two thirds of the
    // N = 16 passes); W x W blocks are transposed in registers instead, then 4-wide
    // blocks (float) and single columns for what is left
    constexpr int W = 32 / sizeof(op_t);
    int i0 = 0;
    for (; i0 + W <= n; i0 += W) transpose_columns<op_t, W>(ad, n, i0, L, cb.At);
    if constexpr (W == 8)
      for (; i0 + 4 <= n; i0 += 4) transpose_columns<op_t, 4>(ad, n, i0, L, cb.At);
    for (int i = i0; i < n; ++i)
      for (int j = 0; j < L; ++j) cb.At[i][j] = ad[static_cast<int64_t>(j) * n + i];
  }
  for (int i = 0; i < n; ++i)
    for (int j = L; j < Lp; ++j) cb.At[i][j] = op_t(0);
  for (int j = 0; j < Lp; ++j) fa[j] = ~mask_t<op_t>(0);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < Lp; ++j) fa[j] &= finite_mask(cb.At[i][j]);
}

// One row's per-sequence advantages ([B, N] layout): raw[i] as loaded, A[i] Noon-clamped;
// returns the row's finiteness mask. A row with a non-finite advantage has no valid token:
// its A is zeroed with a select, so that products with it are 0, not inf * 0 = NaN (+inf
// survives the Noon clamp), exactly as for a masked-out row.
template <typename scalar_t, typename op_t>
inline mask_t<op_t> row_advantages(const scalar_t* ar, int n, op_t* raw, op_t* A) {
  mask_t<op_t> fa = ~mask_t<op_t>(0);
  for (int i = 0; i < n; ++i) {
    const op_t v = ld<op_t>(ar, i);
    raw[i] = v;
    fa &= finite_mask(v);
    A[i] = pama::noon(v);
  }
  for (int i = 0; i < n; ++i) A[i] = msel0(fa, A[i]);
  return fa;
}

// sum_j (double)(x[j] * y[j]) (product in op_t, as the per-token maths) into LN lanes
template <typename T>
inline void dot_lanes_op(const T* x, const T* y, int Lp, double* acc) {
  for (int j = 0; j < Lp; j += LN)
    for (int l = 0; l < LN; ++l) acc[l] += static_cast<double>(x[j + l] * y[j + l]);
}
template <int V>
inline double vec_sum(const double* x) {  // pairwise, in a fixed order
  if constexpr (V == 1) return x[0];
  else return vec_sum<V / 2>(x) + vec_sum<V / 2>(x + V / 2);
}
inline double lanes_sum(const double* acc) { return vec_sum<LN>(acc); }

// ------------------------------------------------------------------------------ Gram update
// G_ik += sum_j I_i[j] I_k[j] over a chunk, for every pair i <= k (G packed: the upper
// triangle row by row). One dot product at a time costs two vector loads per FMA and is
// bound by loads (measured 27 ns per token for N = 16). Register tiles of TI x TK pairs,
// kVecDoubles lanes each, load TI + TK vectors per TI * TK FMAs; a tile on the diagonal also
// computes a few pairs below it, which are dropped. kVecDoubles / kVecRegs come from the
// instruction set this copy of the file is compiled for (pama_cpu.cpp). Each pair's lanes are
// added in a fixed order, so results stay bitwise reproducible: once per chunk for N known at
// compile time (LANES false); for runtime N (64-token chunks, LANES true) each pair keeps
// its kVecDoubles lanes across the chunks of a piece and they are added once at its end
// (per chunk that was 2.5-3 horizontal sums a token for N = 16, more than its FMAs). The
// lanes are kept tile by tile (gram_tile_lanes), so that a chunk's tile is added to them
// as TI x TK contiguous vectors; in pair order, each pair's index and the tests of which
// pairs a tile holds cost more than its FMAs (about 10 instructions a pair and chunk).
inline int pair_index(int n, int i, int k) { return i * n - i * (i - 1) / 2 + (k - i); }

// One vector register of doubles for this instruction set (GCC vector extension: the code
// below says which values live in registers; plain arrays were left in memory, 4x slower).
typedef double vdouble __attribute__((vector_size(kVecDoubles * sizeof(double))));
inline vdouble vload(const double* p) {
  vdouble v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void vstore(double* p, vdouble v) { std::memcpy(p, &v, sizeof(v)); }

// The tiles of n objectives, in gram_tiles' order: (i0, k0) for i0 = 0, TI, ... and
// k0 = i0, i0 + TK, ... < n.
template <int TI, int TK, typename F>
inline void for_each_tile(int n, F f) {
  int t = 0;
  for (int i0 = 0; i0 < n; i0 += TI)
    for (int k0 = i0; k0 < n; k0 += TK) f(t++, i0, k0);
}
// The pairs (a, b) of tile (i0, k0) that belong to the packed upper triangle: inside n, on
// or above the diagonal (a tile on the diagonal also computes a few below it, rows past n
// repeat row n - 1; those are dropped)
template <int TI, int TK, typename F>
inline void for_each_kept_pair(int n, int i0, int k0, F f) {
  for (int a = 0; a < TI && i0 + a < n; ++a)
    for (int b = 0; b < TK && k0 + b < n; ++b)
      if (k0 + b >= i0 + a) f(a, b);
}
// LANES: the doubles that hold every tile's TI x TK pairs, kVecDoubles lanes each
template <int TI, int TK>
inline int64_t gram_tile_lanes(int n) {
  int64_t tiles = 0;
  for_each_tile<TI, TK>(n, [&](int, int, int) { ++tiles; });
  return tiles * TI * TK * kVecDoubles;
}
// LANES: gram (packed upper triangle) += each pair's lanes, added in a fixed order
template <int TI, int TK>
inline void gram_lanes_to_pairs(const double* G, int n, double* gram) {
  for_each_tile<TI, TK>(n, [&](int t, int i0, int k0) {
    for_each_kept_pair<TI, TK>(n, i0, k0, [&](int a, int b) {
      gram[pair_index(n, i0 + a, k0 + b)] +=
          vec_sum<kVecDoubles>(G + ((static_cast<int64_t>(t) * TI + a) * TK + b) * kVecDoubles);
    });
  });
}

// I: rows of CH doubles, n of them; Lp a multiple of kVecDoubles. G: the packed upper
// triangle, or when LANES the tiles' lanes (gram_tile_lanes). Rows past n are read from
// row n - 1 (a valid address) and their results dropped. Products of two floats are exact in
// double, so FMA contraction does not change any result.
template <int TI, int TK, int CH, bool LANES>
inline void gram_tiles(const double (*I)[CH], int n, int Lp, double* G) {
  constexpr int V = kVecDoubles;
  for_each_tile<TI, TK>(n, [&](int t, int i0, int k0) {
    const double* x[TI];
    const double* y[TK];
    for (int a = 0; a < TI; ++a) x[a] = I[std::min(i0 + a, n - 1)];
    for (int b = 0; b < TK; ++b) y[b] = I[std::min(k0 + b, n - 1)];
    vdouble acc[TI][TK];
#pragma GCC unroll 64
    for (int a = 0; a < TI; ++a)
#pragma GCC unroll 64
      for (int b = 0; b < TK; ++b) acc[a][b] = vdouble{};
    if (TI == TK && k0 == i0) {
      // a tile on the diagonal: y[b] is x[b], so each row is loaded once and the pairs
      // below the diagonal (dropped below) are not computed; the same products in the same
      // order as the general loop, so the same bits (10 FMAs and 4 loads per vector of
      // tokens for a 4 x 4 tile instead of 16 and 8; GCC had found this for N = 4's one
      // tile by itself, not for the diagonal tiles of N = 8 and runtime N)
      for (int j = 0; j < Lp; j += V) {
        vdouble xv[TI];
#pragma GCC unroll 64
        for (int a = 0; a < TI; ++a) xv[a] = vload(x[a] + j);
#pragma GCC unroll 64
        for (int b = 0; b < TK; ++b)
#pragma GCC unroll 64
          for (int a = 0; a <= b && a < TI; ++a) acc[a][b] += xv[a] * xv[b];
      }
    } else {
      for (int j = 0; j < Lp; j += V) {
        vdouble xv[TI];
#pragma GCC unroll 64
        for (int a = 0; a < TI; ++a) xv[a] = vload(x[a] + j);
#pragma GCC unroll 64
        for (int b = 0; b < TK; ++b) {
          const vdouble yv = vload(y[b] + j);
#pragma GCC unroll 64
          for (int a = 0; a < TI; ++a) acc[a][b] += xv[a] * yv;
        }
      }
    }
    if constexpr (LANES) {
      // every accumulator of the tile, the dropped ones too (finite: rows past n repeat
      // row n - 1), with no index or test: gram_lanes_to_pairs picks the pairs at the end
      double* g = G + static_cast<int64_t>(t) * TI * TK * V;
#pragma GCC unroll 64
      for (int a = 0; a < TI; ++a)
#pragma GCC unroll 64
        for (int b = 0; b < TK; ++b) vstore(g + (a * TK + b) * V, vload(g + (a * TK + b) * V) + acc[a][b]);
    } else {
      for_each_kept_pair<TI, TK>(n, i0, k0, [&](int a, int b) {
        double lanes[V];
        std::memcpy(lanes, &acc[a][b], sizeof(lanes));
        G[pair_index(n, i0 + a, k0 + b)] += vec_sum<V>(lanes);
      });
    }
  });
}

// The tile shape for N objectives (NT > 0: known at compile time): one tile of all N x N
// pairs when its accumulators and loads fit the registers; N = 4 in 16 registers: 2 x 4 (16
// FMAs and 12 loads per vector of tokens, against 27 and 18 for 3 x 3 tiles); else the
// largest square tile that fits (4 x 4 in 32 registers, 3 x 3 in 16).
template <int NT>
struct GramTile {
  static constexpr bool whole = NT > 0 && NT * NT + NT + 1 <= kVecRegs;
  static constexpr bool two_by_four = !whole && NT == 4;
  static constexpr int TI = whole ? NT : two_by_four ? 2 : (kVecRegs >= 32 ? 4 : 3);
  static constexpr int TK = whole ? NT : two_by_four ? 4 : TI;
};

// ------------------------------------------------------------------------------ forward pass

// Objective i over a chunk: the Noon clamp (zero for invalid tokens), S_i and Q_i into LN
// lanes each, and for the Gram I_i in double into Id_i. __restrict: three double pointers
// that GCC would otherwise assume may alias, reloading the lanes after every store to Id_i.
template <Mode MODE, typename op_t, typename Buf>
inline void objective_sums(const Buf& cb, int i, int Lp, double* __restrict s_l, double* __restrict q_l,
                           double* __restrict Id_i) {
  for (int j = 0; j < Lp; j += LN)
    for (int l = 0; l < LN; ++l) {
      const op_t x = cb.At[i][j + l];
      const op_t an = msel0(cb.ok[j + l] & mask_of<op_t>(x > op_t(0)), x);
      s_l[l] += static_cast<double>(an * cb.m[j + l]);
      const double id = static_cast<double>(an * cb.w[j + l]);
      q_l[l] += id;
      if constexpr (MODE == Mode::Gram) Id_i[j + l] = id;
    }
}

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
  op_t* const fo = MODE == Mode::Min && a.factor != nullptr ? static_cast<op_t*>(a.factor) + base : nullptr;

  ChunkBuf<op_t, CAP, CH> cb;
  M fa[CH];
  constexpr int GCAP = MODE == Mode::Gram ? CAP : 1;
  double Id[GCAP][CH];  // I_i = ind * A_i in double, for the Gram update
  double accS[CAP][LN] = {}, accQ[CAP][LN] = {}, accMin[LN] = {};
  constexpr int PCAP = MODE == Mode::Gram ? CAP * (CAP + 1) / 2 : 1;
  // the packed upper triangle: one double a pair for N known at compile time (256-token
  // chunks: a horizontal sum per pair and chunk is cheap); for runtime N kVecDoubles lanes a
  // pair, kept across the chunks (gram_tiles) tile by tile, on the heap (up to 2080 pairs)
  double accG_fixed[NT > 0 ? PCAP : 1];
  std::vector<double> accG_heap;
  double* accG = accG_fixed;
  if constexpr (MODE == Mode::Gram) {
    if constexpr (NT == 0) {
      accG_heap.assign(static_cast<size_t>(gram_tile_lanes<GramTile<NT>::TI, GramTile<NT>::TK>(n)), 0.0);
      accG = accG_heap.data();
    } else {
      for (int p = 0; p < npairs; ++p) accG[p] = 0.0;
    }
  }
  int64_t m_cnt = 0, clipped = 0, nf_lp = 0, nf_olp = 0, nf_adv = 0;

  constexpr int PAD = LN > kVecDoubles ? LN : kVecDoubles;  // Lp: a multiple of both
  static_assert(CH % PAD == 0, "chunks hold whole vectors");
  for (int64_t c0 = t0; c0 < t1; c0 += CH) {
    const int L = static_cast<int>(std::min<int64_t>(CH, t1 - c0));
    const int Lp = (L + PAD - 1) / PAD * PAD;
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
      // the clip indicator of a valid token; for token, u selected by it (the factor's u:
      // a select, so that u = inf of a clipped token gives 0, not inf * 0)
      cb.w[j] = msel0(v & ind, MODE == Mode::Min ? u : op_t(1));
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
      if (fo != nullptr)  // the gradient factor s_t * (u_t or 0); mn is finite, >= 0
        for (int j = 0; j < L; ++j) fo[c0 + j] = mn[j] * cb.w[j];
    } else {
      // One loop per objective over the chunk: the Noon clamp (zero for invalid tokens), S_i,
      // and Q_i or, for the Gram, I_i in double (Q_i = sum_t I_i: the statistics' sums, the
      // loss does not need them). Separate loops per quantity re-read the chunk from L1 each.
      for (int i = 0; i < n; ++i) {
        if constexpr (NT > 0) {
          objective_sums<MODE, op_t>(cb, i, Lp, accS[i], accQ[i], Id[MODE == Mode::Gram ? i : 0]);
        } else {
          // runtime N: the lanes copied to locals for the chunk (GCC kept accS[i][l] in memory
          // and vectorised two lanes wide: N = 16 `sequence` 11.6 -> 6.9 ms); the same sums in
          // the same order. Not for N known at compile time, where it was slower.
          double s_l[LN], q_l[LN];
          for (int l = 0; l < LN; ++l) s_l[l] = accS[i][l], q_l[l] = accQ[i][l];
          objective_sums<MODE, op_t>(cb, i, Lp, s_l, q_l, Id[MODE == Mode::Gram ? i : 0]);
          for (int l = 0; l < LN; ++l) accS[i][l] = s_l[l], accQ[i][l] = q_l[l];
        }
      }
      if constexpr (MODE == Mode::Gram) {
        gram_tiles<GramTile<NT>::TI, GramTile<NT>::TK, CH, NT == 0>(Id, n, Lp, accG);
      }
    }
  }
  row[0] += static_cast<double>(m_cnt);
  if constexpr (MODE == Mode::Min) {
    row[1] += lanes_sum(accMin);
  } else {
    for (int i = 0; i < n; ++i) row[2 + i] += lanes_sum(accS[i]);
    for (int i = 0; i < n; ++i) row[2 + n + i] += lanes_sum(accQ[i]);  // 0 unless Mean or Gram
    if constexpr (MODE == Mode::Gram) {
      if constexpr (NT == 0)
        gram_lanes_to_pairs<GramTile<NT>::TI, GramTile<NT>::TK>(accG, n, gram);
      else
        for (int p = 0; p < npairs; ++p) gram[p] += accG[p];
    }
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
  op_t A[PAMA_MAX_N], raw[PAMA_MAX_N];
  const M fa = row_advantages<scalar_t, op_t>(static_cast<const scalar_t*>(a.adv) + b * n, n, raw, A);
  // token: the row's s (exactly-zero advantages abstain) and, when asked, the gradient factor
  const op_t mn = MODE == Mode::Min ? msel0(fa, pama::token_min(raw, n)) : op_t(0);
  op_t* const fo = MODE == Mode::Min && a.factor != nullptr ? static_cast<op_t*>(a.factor) + base : nullptr;
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
      if constexpr (MODE == Mode::Min)
        if (fo != nullptr) fo[c0 + j] = msel0(v & ind, mn * u);
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
    row[1] += static_cast<double>(mn) * sum_m;
  } else {
    for (int i = 0; i < n; ++i) row[2 + i] += static_cast<double>(A[i]) * sum_m;
    for (int i = 0; i < n; ++i) row[2 + n + i] += static_cast<double>(A[i]) * ni;  // Q
    if constexpr (MODE == Mode::Gram) {
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
    op_t A[PAMA_MAX_N], raw[PAMA_MAX_N];
    const M fa = row_advantages<scalar_t, op_t>(static_cast<const scalar_t*>(a.adv) + b * n, n, raw, A);
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
  // token: only a direct call of the pama_backward op comes here (autograd multiplies the
  // factor the forward saved, csrc/README.md), so one loop for every N keeps the build short
  if constexpr (TOKEN) return run_backward_pass(a, p, bwd_piece<scalar_t, op_t, 0, false, TOKEN>);
  switch (a.n) {
    case 1: return run_backward_pass(a, p, bwd_piece<scalar_t, op_t, 1, false, TOKEN>);
    case 2: return run_backward_pass(a, p, bwd_piece<scalar_t, op_t, 2, false, TOKEN>);
    case 3: return run_backward_pass(a, p, bwd_piece<scalar_t, op_t, 3, false, TOKEN>);
    case 4: return run_backward_pass(a, p, bwd_piece<scalar_t, op_t, 4, false, TOKEN>);
    case 8: return run_backward_pass(a, p, bwd_piece<scalar_t, op_t, 8, false, TOKEN>);
    default: return run_backward_pass(a, p, bwd_piece<scalar_t, op_t, 0, false, TOKEN>);
  }
}


// ------------------------------------------------------------------------------ entry points
// This instruction set's passes for a storage dtype (declared in pama_cpu_pass.h); the
// dispatcher in pama_cpu.cpp calls the set it chose for the call.
void forward_pass_entry(Dtype dt, const FwdArgs& a, const Partition& p, bool bc, Mode mode, FwdPass& out) {
  switch (dt) {
    case Dtype::Float: return forward_pass<float, float>(a, p, bc, mode, out);
    case Dtype::Double: return forward_pass<double, double>(a, p, bc, mode, out);
    case Dtype::BFloat16: return forward_pass<c10::BFloat16, float>(a, p, bc, mode, out);
    case Dtype::Half: return forward_pass<c10::Half, float>(a, p, bc, mode, out);
  }
}

void backward_pass_entry(Dtype dt, bool token, const BwdArgs& a, const Partition& p, bool bc) {
  switch (dt) {
    case Dtype::Float: return token ? backward_pass<float, float, true>(a, p, bc) : backward_pass<float, float, false>(a, p, bc);
    case Dtype::Double:
      return token ? backward_pass<double, double, true>(a, p, bc) : backward_pass<double, double, false>(a, p, bc);
    case Dtype::BFloat16:
      return token ? backward_pass<c10::BFloat16, float, true>(a, p, bc)
                   : backward_pass<c10::BFloat16, float, false>(a, p, bc);
    case Dtype::Half:
      return token ? backward_pass<c10::Half, float, true>(a, p, bc) : backward_pass<c10::Half, float, false>(a, p, bc);
  }
}
