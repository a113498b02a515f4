// pama_math.h: the scalar maths of PAMA (../shared/PAMA.md), shared by the CPU kernels
// (pama_cpu.cpp) and, later, the CUDA kernels.
//
// Rules for this header (so that nvcc can compile it for the device):
//   * plain C++, no torch / STL containers / exceptions / dynamic allocation;
//   * every function is PAMA_HD (= __host__ __device__ under nvcc);
//   * fixed-size arrays bounded by PAMA_MAX_N; the large solver scratch is a struct the
//     caller provides (on the host it can live on the stack, on a device in global memory).
#pragma once

#ifdef __CUDACC__
#define PAMA_HD __host__ __device__
#else
#define PAMA_HD
#endif

// <cmath> in every pass: nvcc's host pass (__CUDACC__ without __CUDA_ARCH__) uses std::
#include <cmath>

#define PAMA_MAX_N 64

namespace pama {

// ---------------------------------------------------------------------------------------
// small helpers (std::min/max/isfinite are not all usable in device code)
// ---------------------------------------------------------------------------------------
template <typename T>
PAMA_HD inline T pmin(T a, T b) { return b < a ? b : a; }
template <typename T>
PAMA_HD inline T pmax(T a, T b) { return a < b ? b : a; }
template <typename T>
PAMA_HD inline T pabs(T a) { return a < T(0) ? -a : a; }

PAMA_HD inline bool pisfinite(float x) {
#ifdef __CUDA_ARCH__
  return isfinite(x);
#else
  return std::isfinite(x);
#endif
}
PAMA_HD inline bool pisfinite(double x) {
#ifdef __CUDA_ARCH__
  return isfinite(x);
#else
  return std::isfinite(x);
#endif
}
PAMA_HD inline float pexp(float x) {
#ifdef __CUDA_ARCH__
  return expf(x);
#else
  return std::exp(x);
#endif
}
PAMA_HD inline double pexp(double x) {
#ifdef __CUDA_ARCH__
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

// ---------------------------------------------------------------------------------------
// per-token maths (T = float for 32/16-bit inputs, double for float64)
// ---------------------------------------------------------------------------------------
// u = exp(logp - old_logp). For finite inputs the difference may overflow to +-inf, giving
// u = inf or 0, never NaN: callers rely on that (u = inf is "clipped", gradient 0).
template <typename T>
PAMA_HD inline T ratio(T logp, T old_logp) { return pexp(logp - old_logp); }

// ind = 1[u <= 1 + eps]  (at u = 1 + eps exactly the indicator is 1, as in the paper)
template <typename T>
PAMA_HD inline bool indicator(T u, T one_plus_eps) { return u <= one_plus_eps; }

// m = min(u, 1 + eps): because A >= 0, min(u A, clip(u) A) = A * min(u, 1 + eps).
// Written as a select on the indicator so that u = inf gives 1 + eps.
template <typename T>
PAMA_HD inline T clipped_ratio(T u, T one_plus_eps) { return u <= one_plus_eps ? u : one_plus_eps; }

// Noon clamp A = max(A', 0). For NaN input this returns 0 -- callers exclude non-finite
// tokens before using it, so the choice does not matter.
template <typename T>
PAMA_HD inline T noon(T a) { return a > T(0) ? a : T(0); }

// granularity "token": objectives whose advantage is exactly 0 (-0.0 included) abstain.
//   some a_i < 0: s = 0;  else some a_i > 0: s = min over {i: a_i > 0} of a_i;  else s = 0.
// Computed on the raw (un-clamped) advantages as s = token_value(min_i token_key(a_i)):
// key(a) = a (a > 0), 0 (a < 0), +inf (a == 0: abstains); the min of the keys is +inf only
// when every objective abstains, and token_value maps that to 0. Without exact zeros this is
// min_i noon(a_i), bit for bit. Non-finite input: callers exclude such tokens (select to 0).
template <typename T>
PAMA_HD inline T token_key(T a) { return a > T(0) ? a : (a < T(0) ? T(0) : T(INFINITY)); }
template <typename T>
PAMA_HD inline T token_value(T key_min) { return key_min < T(INFINITY) ? key_min : T(0); }
template <typename T>
PAMA_HD inline T token_min(const T* a, int n) {
  T mn = token_key(a[0]);
  for (int i = 1; i < n; ++i) mn = pmin(mn, token_key(a[i]));
  return token_value(mn);
}

// d loss / d logp for one valid token, up to the factor -grad_out * row_scale:
// s * (u if u <= 1+eps else 0). A select, not a multiplication by the indicator, so that
// u = inf gives 0 and not inf * 0 = NaN.
template <typename T>
PAMA_HD inline T grad_factor(T s, T u, T one_plus_eps) { return u <= one_plus_eps ? s * u : T(0); }

// ---------------------------------------------------------------------------------------
// Theorem 1: argmin over the simplex of (sum_i c_i a_i)^2 for scalars a_1..a_n.
//   lo > 0: uniform over {i: a_i == lo};   hi < 0: uniform over {i: a_i == hi};
//   otherwise if some a_i == 0: uniform over the zeros;
//   else the two-point solution hi/(hi-lo) on the argmin set, -lo/(hi-lo) on the argmax
//   set, each split equally over its ties (exact equality).
// Non-finite input (never produced by the kernels) gives uniform weights, never NaN.
// ---------------------------------------------------------------------------------------
template <typename T>
PAMA_HD inline void theorem1(const T* a, int n, double* c) {
  if (n <= 0) return;
  double lo = (double)a[0], hi = (double)a[0];
  bool finite = true;
  for (int i = 0; i < n; ++i) {
    double v = (double)a[i];
    if (!pisfinite(v)) finite = false;
    lo = pmin(lo, v);
    hi = pmax(hi, v);
  }
  if (!finite) {
    for (int i = 0; i < n; ++i) c[i] = 1.0 / n;
    return;
  }
  if (lo > 0.0 || hi < 0.0) {
    const double target = lo > 0.0 ? lo : hi;
    int k = 0;
    for (int i = 0; i < n; ++i) k += ((double)a[i] == target);
    for (int i = 0; i < n; ++i) c[i] = ((double)a[i] == target) ? 1.0 / k : 0.0;
    return;
  }
  int nz = 0;
  for (int i = 0; i < n; ++i) nz += ((double)a[i] == 0.0);
  if (nz > 0) {
    for (int i = 0; i < n; ++i) c[i] = ((double)a[i] == 0.0) ? 1.0 / nz : 0.0;
    return;
  }
  // lo < 0 < hi: c_lo * lo + c_hi * hi = 0 with c_lo + c_hi = 1.
  int klo = 0, khi = 0;
  for (int i = 0; i < n; ++i) {
    klo += ((double)a[i] == lo);
    khi += ((double)a[i] == hi);
  }
  const double wlo = hi / (hi - lo), whi = -lo / (hi - lo);
  for (int i = 0; i < n; ++i) {
    double v = (double)a[i];
    c[i] = (v == lo) ? wlo / klo : ((v == hi) ? whi / khi : 0.0);
  }
}

// ---------------------------------------------------------------------------------------
// Objective c^T G c and the KKT residual max(0, c^T G c - min_j (G c)_j) for an n x n
// row-major G. At the minimiser over the simplex (G c)_j >= c^T G c for every j.
// ---------------------------------------------------------------------------------------
PAMA_HD inline void quad_objective_kkt(const double* G, int n, const double* c, double* objective,
                                       double* kkt_residual) {
  double obj = 0.0, mn = 0.0;
  for (int j = 0; j < n; ++j) {
    double gj = 0.0;
    for (int i = 0; i < n; ++i) gj += G[j * n + i] * c[i];
    obj += c[j] * gj;
    mn = (j == 0) ? gj : pmin(mn, gj);
  }
  if (objective) *objective = obj;
  if (kkt_residual) *kkt_residual = pmax(0.0, obj - mn);
}

// ---------------------------------------------------------------------------------------
// Exact min-norm point over the simplex in Gram form: c* = argmin_{c in simplex} c^T G c.
// ---------------------------------------------------------------------------------------
struct MinNormScratch {
  double H[PAMA_MAX_N * PAMA_MAX_N];                 // G / max_j G_jj (scale-free, |H_ij| <= 1)
  double K[(PAMA_MAX_N + 1) * (PAMA_MAX_N + 2)];     // bordered system [H_S 1 | 0; 1^T 0 | 1]
  double w[PAMA_MAX_N];                              // H lambda
  double lam[PAMA_MAX_N];                            // current weights (dense, 0 outside S)
  double mu[PAMA_MAX_N + 1];                         // affine minimiser on S (+ multiplier)
  double best[PAMA_MAX_N];                           // best weights seen (guards against stalls)
  double save[PAMA_MAX_N];                           // weights at the start of a major cycle
  int S[PAMA_MAX_N];                                 // corral (indices)
  int group[PAMA_MAX_N];                             // duplicate groups
};

// Diagnostics of the last solve (useful in tests; the kernels ignore them).
struct MinNormInfo {
  int major_iters;
  int minor_iters;
  int status;  // 0 converged, 1 iteration cap, 2 singular bordered system, 3 stalled, 4 trivial
};

namespace detail {

// Solve the bordered system  [H_S 1; 1^T 0] [mu; nu] = [0; 1]  (size k+1) by Gaussian
// elimination with partial pivoting. Its solution mu is the minimiser of ||sum mu_s v_s||^2
// over the affine hull of the corral (sum mu = 1). Returns false when a pivot is tiny,
// i.e. the corral is (numerically) affinely dependent; the caller then stops cleanly.
PAMA_HD inline bool affine_minimiser(const double* H, int n, const int* S, int k, double* K, double* mu) {
  const int m = k + 1, ld = m + 1;  // augmented matrix, row-major, ld columns
  for (int r = 0; r < k; ++r) {
    for (int c = 0; c < k; ++c) K[r * ld + c] = H[S[r] * n + S[c]];
    K[r * ld + k] = 1.0;
    K[r * ld + m] = 0.0;
  }
  for (int c = 0; c < k; ++c) K[k * ld + c] = 1.0;
  K[k * ld + k] = 0.0;
  K[k * ld + m] = 1.0;
  // Entries are bounded by 1 (H is normalised), so an absolute pivot threshold is a
  // relative one. 1e-15 sits just above the rounding noise of an exactly dependent corral.
  const double tiny = 1e-15;
  for (int p = 0; p < m; ++p) {
    int piv = p;
    double best = pabs(K[p * ld + p]);
    for (int r = p + 1; r < m; ++r) {
      double v = pabs(K[r * ld + p]);
      if (v > best) { best = v; piv = r; }
    }
    if (!(best > tiny)) return false;
    if (piv != p)
      for (int c = p; c <= m; ++c) { double t = K[p * ld + c]; K[p * ld + c] = K[piv * ld + c]; K[piv * ld + c] = t; }
    const double inv = 1.0 / K[p * ld + p];
    for (int r = p + 1; r < m; ++r) {
      const double f = K[r * ld + p] * inv;
      if (f == 0.0) continue;
      for (int c = p; c <= m; ++c) K[r * ld + c] -= f * K[p * ld + c];
    }
  }
  for (int r = m - 1; r >= 0; --r) {
    double s = K[r * ld + m];
    for (int c = r + 1; c < m; ++c) s -= K[r * ld + c] * mu[c];
    mu[r] = s / K[r * ld + r];
  }
  for (int r = 0; r < k; ++r)
    if (!pisfinite(mu[r])) return false;
  return true;
}

// Indices with positive weight, in increasing order; returns their number.
PAMA_HD inline int corral_of(const double* lam, int n, int* S) {
  int k = 0;
  for (int j = 0; j < n; ++j)
    if (lam[j] > 0.0) S[k++] = j;
  return k;
}

// Rescale non-negative weights to sum 1 (guards against drift); false if they vanished.
PAMA_HD inline bool normalise(double* lam, int n) {
  double tot = 0.0;
  for (int j = 0; j < n; ++j) tot += lam[j];
  if (!(tot > 0.0) || !pisfinite(tot)) return false;
  for (int j = 0; j < n; ++j) lam[j] /= tot;
  return true;
}

// Safe descent step used where the affine solve cannot be trusted: move weight t from a
// corral vertex a to the target vertex j, with exact line search on
//   f(t) = xx - 2 t (w_a - w_j) + t^2 ||v_a - v_j||^2,  0 <= t <= lam_a,
// choosing the source a with the largest decrease. For two nearly identical vertices
// ||v_a - v_j||^2 ~ 0 and the step swaps them outright, which is exactly what Wolfe's
// ill-conditioned affine solve fails to do.
PAMA_HD inline void pairwise_step(const double* H, int n, double* lam, const double* w, int j) {
  int a = -1;
  double best_dec = 0.0, best_t = 0.0;
  for (int s = 0; s < n; ++s) {
    if (s == j || !(lam[s] > 0.0)) continue;
    const double delta = w[s] - w[j];
    if (!(delta > 0.0)) continue;
    const double d = pmax(0.0, H[s * n + s] + H[j * n + j] - 2.0 * H[s * n + j]);
    double t = lam[s];
    if (d > 0.0 && delta / d < t) t = delta / d;
    const double dec = t * (2.0 * delta - t * d);
    if (a < 0 || dec > best_dec) { a = s; best_dec = dec; best_t = t; }
  }
  if (a < 0) return;
  lam[j] += best_t;
  lam[a] = (best_t == lam[a]) ? 0.0 : lam[a] - best_t;
}

// Wolfe's minor cycles on the corral S (k vertices; when `entering`, S[k-1] is a new
// vertex with weight 0): move to the affine minimiser of the corral, or as far towards it
// as the simplex allows, dropping the blocking vertex, until the minimiser is interior.
// Returns false when the affine solve cannot be trusted (singular bordered system, or the
// entering vertex gets a non-positive weight, impossible in exact arithmetic).
PAMA_HD inline bool minor_cycles(const double* H, int n, int* S, int k, double* lam, double* mu,
                                 double* K, bool entering, int* minor_total, int max_minor) {
  for (int minor = 0;; ++minor) {
    if (++(*minor_total) > max_minor) return false;
    if (!affine_minimiser(H, n, S, k, K, mu)) return false;
    if (entering && minor == 0 && !(mu[k - 1] > 0.0)) return false;
    bool interior = true;
    for (int r = 0; r < k; ++r) interior &= (mu[r] > 0.0);
    if (interior) {
      for (int r = 0; r < k; ++r) lam[S[r]] = mu[r];
      return normalise(lam, n);
    }
    // largest step theta in [0, 1] keeping lam + theta (mu - lam) >= 0; the vertex that
    // blocks it leaves the corral exactly (no 1e-17 leftovers)
    double theta = 1.0;
    int rmin = -1;
    for (int r = 0; r < k; ++r) {
      if (mu[r] <= 0.0) {
        const double l = lam[S[r]], d = l - mu[r];
        const double t = d > 0.0 ? l / d : 0.0;
        if (rmin < 0 || t < theta) { theta = pmin(theta, t); rmin = r; }
      }
    }
    for (int r = 0; r < k; ++r) {
      const double v = (1.0 - theta) * lam[S[r]] + theta * mu[r];
      lam[S[r]] = (r == rmin || v <= 0.0) ? 0.0 : v;
    }
    if (!normalise(lam, n)) return false;
    k = corral_of(lam, n, S);
    if (k <= 1) return true;  // a single vertex is its own affine minimiser
  }
}

// w = H lam restricted to the corral columns; returns lam^T H lam.
PAMA_HD inline double gram_apply(const double* H, int n, const int* S, int k, const double* lam, double* w) {
  for (int j = 0; j < n; ++j) {
    double s = 0.0;
    for (int r = 0; r < k; ++r) s += H[j * n + S[r]] * lam[S[r]];
    w[j] = s;
  }
  double xx = 0.0;
  for (int r = 0; r < k; ++r) xx += lam[S[r]] * w[S[r]];
  return xx;
}

}  // namespace detail

// Duplicate splitting: objectives i, j with G_ii + G_jj - 2 G_ij <= 1e-12 max(G_ii, G_jj)
// have the same advantage vector; they share their group's total weight equally, so the
// returned weights do not depend on which duplicate the solver happened to pick.
// Groups are formed greedily in index order (leader = smallest index).
PAMA_HD inline void split_duplicates(const double* G, int n, double* c, int* group) {
  for (int i = 0; i < n; ++i) group[i] = -1;
  for (int i = 0; i < n; ++i) {
    if (group[i] >= 0) continue;
    group[i] = i;
    int cnt = 1;
    double tot = c[i];
    for (int j = i + 1; j < n; ++j) {
      if (group[j] >= 0) continue;
      const double gii = G[i * n + i], gjj = G[j * n + j];
      if (gii + gjj - 2.0 * G[i * n + j] <= 1e-12 * pmax(gii, gjj)) {
        group[j] = i;
        ++cnt;
        tot += c[j];
      }
    }
    if (cnt > 1) {
      const double share = tot / cnt;
      for (int j = i; j < n; ++j)
        if (group[j] == i) c[j] = share;
    }
  }
}

// min over the simplex of c^T G c, G n x n PSD (row-major, double), 1 <= n <= PAMA_MAX_N.
//   n = 1: [1].  n = 2: the closed form of the spec.  n >= 3: Wolfe's min-norm-point
//   algorithm in Gram form, stopping when ||x||^2 - min_j <x, v_j> <= 1e-12 max_j G_jj
//   (this gap bounds the objective error: f(x) - f* <= 2 gap).
// Then duplicate splitting; all-zero (or non-finite) G gives uniform weights. Never NaN.
PAMA_HD inline void min_norm_weights(const double* G, int n, double* c, MinNormScratch* sc,
                                     MinNormInfo* info = nullptr, bool split = true) {
  if (info) { info->major_iters = 0; info->minor_iters = 0; info->status = 4; }
  if (n <= 0) return;
  if (n == 1) { c[0] = 1.0; return; }
  double dmax = 0.0;
  bool finite = true;
  for (int i = 0; i < n * n; ++i)
    if (!pisfinite(G[i])) finite = false;
  for (int i = 0; i < n; ++i) dmax = pmax(dmax, G[i * n + i]);
  if (!finite || !(dmax > 0.0)) {  // G = 0 (PSD with zero diagonal) or garbage: uniform
    for (int i = 0; i < n; ++i) c[i] = 1.0 / n;
    return;
  }
  if (n == 2) {
    const double g11 = G[0], g12 = 0.5 * (G[1] + G[2]), g22 = G[3];
    const double den = g11 + g22 - 2.0 * g12;
    if (den <= 1e-12 * pmax(g11, g22)) {
      c[0] = c[1] = 0.5;
    } else {
      double g = (g22 - g12) / den;
      g = pmin(1.0, pmax(0.0, g));
      c[0] = g;
      c[1] = 1.0 - g;
    }
    return;
  }

  // --- Wolfe (1976), Gram form, on H = G / dmax so that tolerances are scale-free.
  // x = sum_j lam_j v_j is never formed: w = H lam holds <x, v_j>, xx = ||x||^2.
  double* H = sc->H;
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) H[i * n + j] = (0.5 * G[i * n + j] + 0.5 * G[j * n + i]) / dmax;  // symmetrise; divide (1/dmax may overflow)
  double* lam = sc->lam;
  double* w = sc->w;
  double* mu = sc->mu;
  int* S = sc->S;
  const double tol = 1e-12;

  // start at the vertex of smallest norm
  int j0 = 0;
  for (int j = 1; j < n; ++j)
    if (H[j * n + j] < H[j0 * n + j0]) j0 = j;
  for (int j = 0; j < n; ++j) lam[j] = 0.0;
  lam[j0] = 1.0;
  int k = detail::corral_of(lam, n, S);
  double xx = detail::gram_apply(H, n, S, k, lam, w);
  double best_xx = xx;
  for (int j = 0; j < n; ++j) sc->best[j] = lam[j];

  int status = 1, major = 0, minor_total = 0, stalls = 0;
  // Wolfe terminates finitely in exact arithmetic; the caps only bound a numerical stall.
  const int max_major = 50 * n + 100, max_minor = 100 * n + 100;
  for (; major < max_major && minor_total <= max_minor; ++major) {
    int jm = 0;
    for (int j = 1; j < n; ++j)
      if (w[j] < w[jm]) jm = j;
    if (xx - w[jm] <= tol) {  // converged: this point is certified, prefer it
      for (int j = 0; j < n; ++j) sc->best[j] = lam[j];
      status = 0;
      break;
    }

    // Save the point, then run Wolfe's minor cycles: on corral + jm when jm is outside the
    // corral; on the corral alone when jm is inside it (the previous affine solve was not
    // accurate, or the point came from a pairwise step and is not yet the corral optimum).
    for (int j = 0; j < n; ++j) sc->save[j] = lam[j];
    const bool entering = !(lam[jm] > 0.0);
    if (entering) S[k++] = jm;  // enters with weight 0
    bool ok = detail::minor_cycles(H, n, S, k, lam, mu, sc->K, entering, &minor_total, max_minor);
    if (ok) {
      k = detail::corral_of(lam, n, S);
      // an inaccurate affine solve can move uphill: then take the safe step instead
      ok = detail::gram_apply(H, n, S, k, lam, w) < xx;
    }
    if (!ok) {
      for (int j = 0; j < n; ++j) lam[j] = sc->save[j];
      k = detail::corral_of(lam, n, S);
      detail::gram_apply(H, n, S, k, lam, w);
      detail::pairwise_step(H, n, lam, w, jm);
      // polish: the new corral (e.g. after swapping two near-duplicates) is usually well
      // conditioned, so its affine minimiser is accurate; keep it only if it descends.
      k = detail::corral_of(lam, n, S);
      const double xp = detail::gram_apply(H, n, S, k, lam, w);
      for (int j = 0; j < n; ++j) sc->save[j] = lam[j];
      if (k > 1) {
        bool ok2 = detail::minor_cycles(H, n, S, k, lam, mu, sc->K, false, &minor_total, max_minor);
        if (ok2) {
          k = detail::corral_of(lam, n, S);
          ok2 = detail::gram_apply(H, n, S, k, lam, w) <= xp;
        }
        if (!ok2)
          for (int j = 0; j < n; ++j) lam[j] = sc->save[j];
      }
    }
    k = detail::corral_of(lam, n, S);
    xx = detail::gram_apply(H, n, S, k, lam, w);
    // Every cycle decreases ||x||^2 in exact arithmetic; numerically the decrease can fall
    // below rounding while the corral still improves, so a few non-decreasing cycles are
    // allowed. Ties go to the newer point.
    if (xx <= best_xx) {
      stalls = (xx < best_xx) ? 0 : stalls + 1;
      best_xx = xx;
      for (int j = 0; j < n; ++j) sc->best[j] = lam[j];
    } else {
      ++stalls;
    }
    if (stalls > 3 * n + 10) { status = 3; break; }
  }
  for (int j = 0; j < n; ++j) c[j] = sc->best[j];
  // sum exactly to 1 (protects against drift); all weights are >= 0 here
  double tot = 0.0;
  for (int j = 0; j < n; ++j) tot += c[j];
  if (!(tot > 0.0) || !pisfinite(tot)) {
    for (int j = 0; j < n; ++j) c[j] = 1.0 / n;
  } else {
    for (int j = 0; j < n; ++j) c[j] /= tot;
  }
  if (split) split_duplicates(G, n, c, sc->group);
  if (info) { info->major_iters = major; info->minor_iters = minor_total; info->status = status; }
}

}  // namespace pama
