"""The exact min-norm solver: c* = argmin over the simplex of c^T G c (public API, every backend)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pama_ext
from conftest import BACKENDS, brute_force_min_norm


def solve(G: np.ndarray, backend: str) -> np.ndarray:
    c = pama_ext.min_norm_weights(torch.from_numpy(np.ascontiguousarray(G)), backend=backend)
    assert c.dtype == torch.float64 and c.shape == (G.shape[0],)
    return c.numpy()


def make_V(rng, N, k, spread=0.0, scale=1.0, kind="gauss"):
    """N advantage vectors in R^k (rows); spread = log10 range of the per-objective scales."""
    V = rng.standard_normal((N, k)) + rng.standard_normal(k) * rng.uniform(0, 2)
    if kind == "noon":  # nonnegative and sparse, like Noon-clamped advantages with clipping
        V = np.maximum(V, 0) * (rng.uniform(size=V.shape) < 0.7)
    if spread:
        V = V * 10 ** rng.uniform(-spread / 2, spread / 2, size=(N, 1))
    return V * scale


def gram(V):
    G = V @ V.T
    return 0.5 * (G + G.T)


def assert_simplex(c, atol=1e-12):
    assert np.all(np.isfinite(c)), c
    assert c.min() >= 0, c
    assert abs(c.sum() - 1) <= atol, c.sum()


def assert_kkt(G, c, rtol=1e-10, active=1e-9):
    """(Gc)_j >= c^T G c - tol for every j, and = on the support (c_j > active)."""
    scale = float(np.diag(G).max())
    Gc = G @ c
    obj = float(c @ Gc)
    tol = rtol * scale
    assert Gc.min() >= obj - tol, f"KKT: min_j (Gc)_j = {Gc.min():.6g} < c'Gc = {obj:.6g} - {tol:.3g}"
    support = c > active
    gap = np.abs(Gc[support] - obj).max()
    assert gap <= tol, f"KKT: |(Gc)_j - c'Gc| = {gap:.3g} > {tol:.3g} on the support"


@pytest.fixture(params=BACKENDS, scope="module")
def mn_backend(request):
    return request.param


# --------------------------------------------------------------------------- small cases
@pytest.mark.parametrize("g", [0.0, 1e-30, 2.5, 1e30])
def test_single_objective(mn_backend, g):
    assert solve(np.array([[g]]), mn_backend).tolist() == [1.0]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64])
def test_zero_gram_is_uniform(mn_backend, n):
    np.testing.assert_allclose(solve(np.zeros((n, n)), mn_backend), np.full(n, 1.0 / n), rtol=0, atol=1e-15)


def two_closed_form(G):
    g11, g12, g22 = G[0, 0], G[0, 1], G[1, 1]
    den = g11 + g22 - 2 * g12
    g = min(max((g22 - g12) / den, 0.0), 1.0)
    return np.array([g, 1 - g])


def test_two_objectives_closed_form(mn_backend):
    rng = np.random.default_rng(2)
    for _ in range(50):
        V = make_V(rng, 2, int(rng.integers(2, 6)), spread=2)
        G = gram(V)
        c = solve(G, mn_backend)
        assert_simplex(c)
        np.testing.assert_allclose(c, two_closed_form(G), rtol=0, atol=1e-12)


def test_two_objectives_interior_value(mn_backend):
    # v1 = (1, 0), v2 = (0, 2): g = 4 / 5
    c = solve(np.array([[1.0, 0.0], [0.0, 4.0]]), mn_backend)
    np.testing.assert_allclose(c, [0.8, 0.2], rtol=0, atol=1e-15)


def test_two_objectives_clipping(mn_backend):
    # v2 = 0.5 v1: the shorter one wins outright, g = -1 clipped to 0
    c = solve(np.array([[1.0, 0.5], [0.5, 0.25]]), mn_backend)
    assert c.tolist() == [0.0, 1.0]
    # v1 = 0.5 v2: g = 2 clipped to 1
    c = solve(np.array([[0.25, 0.5], [0.5, 1.0]]), mn_backend)
    assert c.tolist() == [1.0, 0.0]
    # one zero vector: all the weight on it
    assert solve(np.array([[0.0, 0.0], [0.0, 3.0]]), mn_backend).tolist() == [1.0, 0.0]


@pytest.mark.parametrize("scale", [1e-8, 1.0, 1e8])
def test_two_objectives_identical_vectors_split_half(mn_backend, scale):
    G = np.full((2, 2), 3.0 * scale)  # v1 == v2: denominator exactly 0
    assert solve(G, mn_backend).tolist() == [0.5, 0.5]
    v = np.array([1.0, 2.0, 3.0]) * np.sqrt(scale)
    G = gram(np.stack([v, v * (1 + 1e-15)]))  # denominator ~ 0 (rounding only)
    np.testing.assert_allclose(solve(G, mn_backend), [0.5, 0.5], rtol=0, atol=1e-15)


def test_low_precision_gram_accepted(mn_backend):
    rng = np.random.default_rng(5)
    G = gram(make_V(rng, 5, 7))
    g32 = torch.from_numpy(G).float()
    c = pama_ext.min_norm_weights(g32, backend=mn_backend)
    assert c.dtype == torch.float64
    assert_kkt(g32.double().numpy(), c.numpy(), rtol=1e-9)


# --------------------------------------------------------------------------- exactness, N <= 7
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 7),
    k=st.integers(1, 8),
    spread=st.sampled_from([0.0, 2.0, 6.0]),
    log_scale=st.integers(-8, 8),
    kind=st.sampled_from(["gauss", "noon"]),
)
def test_exact_against_brute_force(mn_backend, seed, n, k, spread, log_scale, kind):
    rng = np.random.default_rng(seed)
    G = gram(make_V(rng, n, k, spread, 10.0 ** (log_scale / 2), kind))
    c = solve(G, mn_backend)
    assert_simplex(c)
    obj = float(c @ G @ c)
    best, _ = brute_force_min_norm(G)
    scale = float(np.diag(G).max())
    # the solver's value is the exact minimum within floating-point noise
    assert obj <= best + 1e-10 * best + 1e-13 * scale, (obj, best, scale)
    assert obj >= best - 1e-10 * best - 1e-13 * scale, (obj, best, scale)


def test_exact_three_objectives_known_answer(mn_backend):
    # equilateral triangle around the origin: the min-norm point is the origin, c uniform
    V = np.array([[1.0, 0.0], [-0.5, np.sqrt(3) / 2], [-0.5, -np.sqrt(3) / 2]])
    c = solve(gram(V), mn_backend)
    np.testing.assert_allclose(c, [1 / 3] * 3, rtol=0, atol=1e-12)
    # a triangle away from the origin whose nearest point is an edge midpoint
    V = np.array([[1.0, 1.0], [-1.0, 1.0], [0.0, 3.0]])
    c = solve(gram(V), mn_backend)
    np.testing.assert_allclose(c, [0.5, 0.5, 0.0], rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- KKT, N up to 64
KKT_CASES = [
    # (n, k, spread, log10 overall scale, kind)
    (3, 1, 0, 0, "gauss"),
    (3, 2, 0, -8, "noon"),
    (8, 3, 2, 8, "gauss"),
    (8, 20, 0, 0, "noon"),
    (16, 8, 4, -4, "gauss"),
    (17, 17, 0, 3, "noon"),
    (32, 5, 2, 0, "noon"),
    (33, 64, 2, -8, "gauss"),
    (48, 47, 0, 8, "gauss"),
    (64, 1, 0, 0, "gauss"),
    (64, 10, 4, 0, "noon"),
    (64, 63, 2, -6, "gauss"),
    (64, 128, 0, 6, "noon"),
    (64, 200, 6, 0, "gauss"),
]


@pytest.mark.parametrize("n, k, spread, log_scale, kind", KKT_CASES)
def test_kkt_certificate(mn_backend, n, k, spread, log_scale, kind):
    rng = np.random.default_rng(n * 1000 + k)
    V = make_V(rng, n, k, spread, 10.0 ** (log_scale / 2), kind)
    G = gram(V)
    c = solve(G, mn_backend)
    assert_simplex(c)
    assert_kkt(G, c)


@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(3, 64),
    rank_frac=st.floats(0.05, 2.0),
    spread=st.sampled_from([0.0, 3.0, 8.0]),
    log_scale=st.integers(-16, 16),
    kind=st.sampled_from(["gauss", "noon"]),
)
def test_kkt_certificate_random(mn_backend, seed, n, rank_frac, spread, log_scale, kind):
    rng = np.random.default_rng(seed)
    k = max(1, int(rank_frac * n))
    V = make_V(rng, n, k, spread, 10.0 ** (log_scale / 2), kind)
    G = gram(V)
    c = solve(G, mn_backend)
    assert_simplex(c)
    assert_kkt(G, c)
    # non-conflict: d = sum_i c_i v_i has <d, v_j> >= ||d||^2 for every objective j
    d = c @ V
    tol = 1e-10 * float(np.diag(G).max())
    assert (V @ d).min() >= d @ d - tol


@pytest.mark.parametrize("n, k", [(3, 2), (5, 5), (12, 4), (40, 100), (64, 3)])
def test_non_conflict(mn_backend, n, k):
    rng = np.random.default_rng(7 + n)
    V = make_V(rng, n, k, kind="noon")
    c = solve(gram(V), mn_backend)
    d = c @ V
    scale = float(np.einsum("ij,ij->i", V, V).max())
    assert (V @ d).min() >= d @ d - 1e-10 * scale
    assert d @ d <= float(np.einsum("ij,ij->i", V, V).min()) * (1 + 1e-12)  # no worse than a vertex


# --------------------------------------------------------------------------- invariances
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 24), data=st.data())
def test_permutation_equivariance_full_rank(mn_backend, seed, n, data):
    rng = np.random.default_rng(seed)
    V = make_V(rng, n, n + 3, spread=1.0)  # generic, k > n: G full rank, c* unique
    G = gram(V)
    perm = np.asarray(data.draw(st.permutations(range(n))))
    c = solve(G, mn_backend)
    c_perm = solve(G[np.ix_(perm, perm)], mn_backend)
    np.testing.assert_allclose(c_perm, c[perm], rtol=0, atol=1e-8)


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(3, 40), data=st.data())
def test_permutation_equivariance_singular(mn_backend, seed, n, data):
    rng = np.random.default_rng(seed)
    k = data.draw(st.integers(1, n - 1))
    V = make_V(rng, n, k)
    G = gram(V)
    perm = np.asarray(data.draw(st.permutations(range(n))))
    c = solve(G, mn_backend)
    c_perm = solve(G[np.ix_(perm, perm)], mn_backend)
    scale = float(np.diag(G).max())
    # c* need not be unique, but the objective and the min-norm vector d are
    assert abs(c_perm @ G[np.ix_(perm, perm)] @ c_perm - c @ G @ c) <= 1e-10 * scale
    d, d_perm = c @ V, c_perm @ V[perm]
    assert np.linalg.norm(d_perm - d) <= 1e-5 * np.sqrt(scale)


@pytest.mark.parametrize("k_scale", [1e-8, 1e-3, 7.3, 1e8])
@pytest.mark.parametrize("n", [2, 3, 6, 20])
def test_scale_invariance(mn_backend, n, k_scale):
    rng = np.random.default_rng(100 + n)
    V = make_V(rng, n, n + 2, spread=1.0)  # full rank
    G = gram(V)
    c = solve(G, mn_backend)
    ck = solve(k_scale * G, mn_backend)
    np.testing.assert_allclose(ck, c, rtol=0, atol=1e-9)
    # rank-deficient: the objective scales by k and d by sqrt(k)
    W = make_V(rng, n, max(1, n // 2))
    H = gram(W)
    c, ck = solve(H, mn_backend), solve(k_scale * H, mn_backend)
    scale = float(np.diag(H).max())
    assert abs(ck @ H @ ck - c @ H @ c) <= 1e-10 * scale
    assert np.linalg.norm(ck @ W - c @ W) <= 1e-5 * np.sqrt(scale)


@pytest.mark.parametrize("n, which", [(3, 0), (3, 1), (6, 1), (10, 0), (30, 2)])
def test_duplicated_objective_shares_its_weight(mn_backend, n, which):
    rng = np.random.default_rng(n + 31 * which)
    V = rng.standard_normal((n, n + 2))  # full rank: c unique (and spread over objectives)
    G = gram(V)
    c = solve(G, mn_backend)
    # duplicate an objective that carries weight (else the claim is vacuous)
    dup = int(np.argsort(-c)[which])
    assert c[dup] > 1e-3, c
    V2 = np.vstack([V, V[dup : dup + 1]])  # objective `dup` appears twice (rows dup and n)
    G2 = gram(V2)
    c2 = solve(G2, mn_backend)
    assert_simplex(c2)
    scale = float(np.diag(G).max())
    assert abs(c2 @ G2 @ c2 - c @ G @ c) <= 1e-10 * scale
    np.testing.assert_allclose(c2 @ V2, c @ V, rtol=0, atol=1e-6 * np.sqrt(scale))
    assert abs(c2[dup] - c2[n]) <= 1e-12, (c2[dup], c2[n])
    assert abs(c2[dup] + c2[n] - c[dup]) <= 1e-7, (c2[dup] + c2[n], c[dup])
    others = [i for i in range(n) if i != dup]
    np.testing.assert_allclose(c2[others], c[others], rtol=0, atol=1e-7)


def test_many_duplicates_and_zero_vectors(mn_backend):
    rng = np.random.default_rng(9)
    base = make_V(rng, 4, 6)
    V = np.vstack([base, base[1], base[1], base[3]])  # objective 1 three times, 3 twice
    G = gram(V)
    c = solve(G, mn_backend)
    assert_simplex(c)
    assert_kkt(G, c)
    assert np.ptp(c[[1, 4, 5]]) <= 1e-12 and np.ptp(c[[3, 6]]) <= 1e-12
    # a zero advantage vector is the min-norm point: all the weight on it
    V = np.vstack([base, np.zeros(6)])
    c = solve(gram(V), mn_backend)
    np.testing.assert_allclose(c, [0, 0, 0, 0, 1], rtol=0, atol=1e-12)


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs two backends to compare")
@pytest.mark.parametrize("n, k", [(3, 5), (7, 2), (20, 30), (64, 70), (64, 16)])
def test_backends_agree(n, k):
    rng = np.random.default_rng(n * k)
    V = make_V(rng, n, k, spread=2.0)
    G = gram(V)
    cs = {b: solve(G, b) for b in BACKENDS}
    scale = float(np.diag(G).max())
    objs = [c @ G @ c for c in cs.values()]
    assert max(objs) - min(objs) <= 1e-10 * scale
    if k > n:  # unique minimiser
        ref = cs["torch"]
        for b, c in cs.items():
            np.testing.assert_allclose(c, ref, rtol=0, atol=1e-8, err_msg=b)
