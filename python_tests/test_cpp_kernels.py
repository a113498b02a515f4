"""The compiled extension ``pama_ext._C`` tested directly (csrc/README.md is the contract).

* solvers: ``min_norm_weights`` against brute-force support enumeration (N <= 7), the KKT
  certificate up to N = 64 (rank-deficient, full-rank, duplicated objectives, scales from
  1e-8 to 1e8), the N = 1, 2 closed forms, duplicate splitting, G = 0; ``theorem1`` in every
  sign case with ties.
* fused kernels: ``pama_forward`` / ``pama_backward`` against ``pama_ext.reference`` (the
  float64 oracle) and against a small independent float64 computation written here from the
  contract, for every granularity x aggregation, [B, T, N] and [B, N] advantages, ragged and
  empty masks, every floating dtype, both work partitions (rows grouped into blocks, rows
  split into segments); non-finite handling; bitwise determinism across thread counts.

A built package must have the extension: a missing ``pama_ext._C`` fails here, unless the
package was installed with PAMA_EXT_NO_EXT=1 (then the module is skipped).
"""

from __future__ import annotations

import importlib
import itertools
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

if os.environ.get("PAMA_EXT_NO_EXT", "0") == "1":
    pytest.skip("PAMA_EXT_NO_EXT=1: the package was built without pama_ext._C", allow_module_level=True)

# deliberately not importorskip: a silently missing extension would hide a broken build
_C = importlib.import_module("pama_ext._C")
from pama_ext import reference as R  # noqa: E402
from conftest import brute_force_min_norm  # noqa: E402

GRANULARITIES = ("batch", "token", "sequence", "batch_mean", "sequence_gram")
LOSS_AGGS = ("token_mean", "seq_mean_token_mean")
EPS = 0.2
BLOCK = 2048  # kBlock in csrc/pama_cpu_pass.h: rows longer than this are split into segments


# ===================================================================== min-norm solver
def random_vectors(rng, n, d, kind):
    V = rng.standard_normal((n, d))
    if kind == "noon":  # non-negative, sparse: what Noon-clamped, clipped advantages look like
        V = np.maximum(V, 0.0) * (rng.random((n, d)) < 0.7)
    elif kind == "offset":  # far from the origin: the minimum lies on a face, not at 0
        V = V + 3.0 * rng.standard_normal(d)
    elif kind == "scaled":  # objectives of very different scales
        V = V * 10.0 ** rng.uniform(-3, 3, size=(n, 1))
    elif kind == "dup":  # exactly duplicated objectives
        V = V[rng.integers(0, n, size=n)]
    return V


def solve(G: np.ndarray) -> np.ndarray:
    c = _C.min_norm_weights(torch.from_numpy(np.ascontiguousarray(G)))
    assert c.dtype == torch.float64 and c.shape == (G.shape[0],)
    c = c.numpy()
    assert np.all(np.isfinite(c)) and c.min() >= 0.0 and abs(c.sum() - 1.0) < 1e-12
    return c


KINDS = ("gauss", "noon", "offset", "scaled", "dup")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [3, 4, 5, 6, 7])
def test_min_norm_matches_brute_force(n, kind):
    rng = np.random.default_rng(1000 * n + KINDS.index(kind))
    for trial in range(25):
        d = int(rng.integers(1, n + 3))  # d < n: rank-deficient G (more objectives than directions)
        V = random_vectors(rng, n, d, kind) * 10.0 ** rng.uniform(-8, 8)
        G = V @ V.T
        c = solve(G)
        best, _ = brute_force_min_norm(G)
        scale = float(np.diag(G).max())
        obj = float(c @ G @ c)
        assert obj <= best + 1e-12 * scale, (n, kind, trial, obj, best)
        assert obj >= best - 1e-12 * scale  # not below the true minimum (brute force is exact)


@pytest.mark.parametrize("kind", KINDS)
def test_min_norm_kkt_certificate_up_to_64(kind):
    """<d, v_j> >= ||d||^2 for every objective j (Gc >= c^T G c), within 1e-12 of the scale."""
    rng = np.random.default_rng(7 + KINDS.index(kind))
    for n in [3, 5, 8, 9, 16, 31, 48, 64]:
        for d in sorted({1, 2, 3, n // 2 + 1, n, n + 10}):
            V = random_vectors(rng, n, d, kind) * 10.0 ** rng.uniform(-8, 8)
            G = V @ V.T
            c = solve(G)
            gc = G @ c
            obj = float(c @ gc)
            scale = float(np.diag(G).max())
            assert obj - gc.min() <= 2e-12 * scale, (kind, n, d, (obj - gc.min()) / scale)
            # the diagnostics op reports the same certificate
            w, obj2, kkt2, _major, _minor, status = _C._min_norm_weights_info(torch.from_numpy(G))
            assert torch.equal(w, torch.from_numpy(c))
            assert abs(obj2 - obj) <= 1e-12 * scale and kkt2 <= 2e-12 * scale
            assert status in (0, 4), status  # converged (or trivial)


def test_min_norm_closed_forms():
    assert _C.min_norm_weights(torch.tensor([[3.0]])).tolist() == [1.0]
    assert _C.min_norm_weights(torch.zeros(1, 1)).tolist() == [1.0]
    # N = 2: g = (G22 - G12) / (G11 + G22 - 2 G12) clipped to [0, 1]
    for G, expect in [
        ([[1.0, 0.0], [0.0, 1.0]], [0.5, 0.5]),
        ([[4.0, 0.0], [0.0, 1.0]], [0.2, 0.8]),
        ([[1.0, 2.0], [2.0, 5.0]], [1.0, 0.0]),  # clipped: v1 is the min-norm point
        ([[5.0, 2.0], [2.0, 1.0]], [0.0, 1.0]),
        ([[2.0, 2.0], [2.0, 2.0]], [0.5, 0.5]),  # v1 == v2: denominator 0
        ([[0.0, 0.0], [0.0, 0.0]], [0.5, 0.5]),
    ]:
        c = _C.min_norm_weights(torch.tensor(G, dtype=torch.float64))
        assert torch.allclose(c, torch.tensor(expect, dtype=torch.float64), rtol=0, atol=1e-15), (G, c)
    # the denominator test is relative: 1e-12 * max(G11, G22)
    g = torch.tensor([[1e20, 1e20], [1e20, 1e20 + 1e7]], dtype=torch.float64)
    assert _C.min_norm_weights(g).tolist() == [0.5, 0.5]


def test_min_norm_zero_and_uniform_cases():
    for n in [3, 5, 64]:
        c = _C.min_norm_weights(torch.zeros(n, n, dtype=torch.float64))
        assert torch.equal(c, torch.full((n,), 1.0 / n, dtype=torch.float64))
        # all objectives identical: any c is optimal, duplicates share equally -> uniform
        v = torch.randn(1, 7, dtype=torch.float64).expand(n, 7)
        c = _C.min_norm_weights(v @ v.T)
        assert torch.allclose(c, torch.full((n,), 1.0 / n, dtype=torch.float64), rtol=0, atol=1e-15)
    # orthonormal objectives: 1/N each
    assert torch.allclose(_C.min_norm_weights(torch.eye(6)), torch.full((6,), 1 / 6, dtype=torch.float64))


def test_min_norm_duplicates_share_weight():
    rng = np.random.default_rng(3)
    for trial in range(30):
        n_unique, d = int(rng.integers(2, 6)), int(rng.integers(2, 8))
        U = rng.standard_normal((n_unique, d))
        idx = rng.integers(0, n_unique, size=int(rng.integers(n_unique + 1, 12)))
        idx[:n_unique] = np.arange(n_unique)
        V = U[idx]
        c = solve(V @ V.T)
        for u in range(n_unique):
            members = np.flatnonzero(idx == u)
            assert np.ptp(c[members]) <= 1e-15, (idx, c)
        # the same minimum as the problem without the duplicates
        best, _ = brute_force_min_norm(U @ U.T)
        assert abs(float(c @ (V @ V.T) @ c) - best) <= 1e-12 * float((U * U).sum(1).max())
    # permuting the objectives permutes the weights
    V = rng.standard_normal((6, 3))
    V[4] = V[1]
    perm = rng.permutation(6)
    c = solve(V @ V.T)
    cp = solve(V[perm] @ V[perm].T)
    assert np.allclose(cp, c[perm], rtol=0, atol=1e-12)


def test_min_norm_never_nan_on_garbage():
    rng = np.random.default_rng(11)
    for _ in range(200):  # symmetric indefinite matrices: no meaning, but no NaN and on the simplex
        n = int(rng.integers(3, 20))
        A = rng.standard_normal((n, n))
        solve(A + A.T)
    for bad in [math.nan, math.inf, -math.inf]:
        G = torch.eye(4, dtype=torch.float64)
        G[1, 2] = bad
        assert torch.equal(_C.min_norm_weights(G), torch.full((4,), 0.25, dtype=torch.float64))
    for scale in [1e-300, 1e-160, 1e160, 1e300]:  # no overflow in the normalisation
        V = rng.standard_normal((10, 4))
        G = (V @ V.T) * scale
        c = solve(G)
        G1 = V @ V.T
        assert float(c @ G1 @ c - (G1 @ c).min()) <= 2e-12 * float(np.diag(G1).max())


def test_min_norm_matches_reference_solver():
    rng = np.random.default_rng(5)
    for _ in range(50):
        n = int(rng.integers(3, 12))
        V = random_vectors(rng, n, int(rng.integers(2, 15)), "noon")
        G = torch.from_numpy(V @ V.T)
        c_cpp = _C.min_norm_weights(G)
        c_ref = R.min_norm_weights(G)
        scale = float(G.diagonal().max())
        assert abs(float(c_cpp @ G @ c_cpp) - float(c_ref @ G @ c_ref)) <= 2e-12 * scale


def test_min_norm_argument_errors():
    with pytest.raises(ValueError):
        _C.min_norm_weights(torch.zeros(3, 4))
    with pytest.raises(ValueError):
        _C.min_norm_weights(torch.zeros(65, 65))
    with pytest.raises(ValueError):
        _C.min_norm_weights(torch.zeros(0, 0))


# ===================================================================== Theorem 1
def t1(a):
    return _C.theorem1(torch.tensor(a, dtype=torch.float64)).tolist()


def test_theorem1_sign_cases_and_ties():
    assert t1([3.0, 1.0, 2.0]) == [0.0, 1.0, 0.0]  # all positive: argmin
    assert t1([1.0, 3.0, 1.0]) == [0.5, 0.0, 0.5]  # ties split equally
    assert t1([-3.0, -1.0, -2.0]) == [0.0, 1.0, 0.0]  # all negative: argmax
    assert t1([-1.0, -3.0, -1.0, -1.0]) == [1 / 3, 0.0, 1 / 3, 1 / 3]
    assert t1([0.0, 1.0, 0.0, 2.0]) == [0.5, 0.0, 0.5, 0.0]  # zeros present: uniform over them
    assert t1([-1.0, 0.0, 1.0]) == [0.0, 1.0, 0.0]
    assert t1([0.0, 0.0]) == [0.5, 0.5]
    # mixed signs, no zero: two-point solution with sum c_i a_i = 0
    c = t1([-1.0, 3.0])
    assert c == [0.75, 0.25]
    c = t1([-1.0, 3.0, -1.0, 2.0, 3.0])  # ties on both ends
    assert c == [0.375, 0.125, 0.375, 0.0, 0.125]
    assert t1([5.0]) == [1.0] and t1([-5.0]) == [1.0] and t1([0.0]) == [1.0]


def test_theorem1_rowwise_shapes_and_dtypes():
    a = torch.randn(3, 4, 5)
    c = _C.theorem1(a)
    assert c.dtype == torch.float64 and c.shape == a.shape
    for idx in itertools.product(range(3), range(4)):
        assert c[idx].tolist() == t1(a[idx].double().tolist())
    assert _C.theorem1(torch.zeros(0, 3)).shape == (0, 3)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.tensor([[2.0, 1.0, 1.0]], dtype=dt)
        assert _C.theorem1(x).tolist() == [[0.0, 0.5, 0.5]]


@given(
    st.lists(
        st.lists(st.sampled_from([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0]), min_size=1, max_size=9),
        min_size=1,
        max_size=5,
    ).filter(lambda rows: len({len(r) for r in rows}) == 1)
)
def test_theorem1_properties_and_reference(rows):
    a = torch.tensor(rows, dtype=torch.float64)
    c = _C.theorem1(a)
    assert bool((c >= 0).all()) and torch.allclose(c.sum(-1), torch.ones(len(rows), dtype=torch.float64))
    assert torch.allclose(c, R.theorem1(a), rtol=0, atol=1e-15)
    s = (c * a).sum(-1)
    lo, hi = a.min(-1).values, a.max(-1).values
    target = torch.where(lo > 0, lo, torch.where(hi < 0, hi, torch.zeros_like(lo)))
    assert torch.allclose(s, target, rtol=0, atol=1e-14)  # the projection of 0 on [lo, hi]


# ===================================================================== fused kernels
def make_inputs(B, T, N, dtype, *, bc=False, mask_kind="ragged", seed=0, noise=0.3, zeros=False):
    """PPO-like inputs in ``dtype``; ratios straddle 1 + eps but stay clear of it.

    ``zeros``: exact zeros in the advantages (granularity "token": such objectives abstain):
    30 % of the entries (+0.0 and -0.0), one whole objective column (N >= 2), the first
    token (or row) all zero, and every advantage made non-negative when ``seed`` is even.

    u within rounding of 1 + eps could flip the clip indicator between two correct
    implementations (their exp differ by an ulp), so such tokens are moved far from it.
    """
    g = torch.Generator().manual_seed(seed)
    lp = (-4.0 * torch.rand(B, T, generator=g, dtype=torch.float64)).to(dtype)
    delta = noise * torch.randn(B, T, generator=g, dtype=torch.float64)
    olp = (lp.double() - delta).to(dtype)
    d = lp.double() - olp.double()
    near = (d - math.log1p(EPS)).abs() < 2e-3
    olp = torch.where(near, (lp.double() + 0.5).to(dtype), olp)
    shape = (B, N) if bc else (B, T, N)
    offs = torch.linspace(-0.5, 0.5, N, dtype=torch.float64) if N > 1 else torch.zeros(1, dtype=torch.float64)
    adv = (torch.randn(*shape, generator=g, dtype=torch.float64) + offs).to(dtype)
    if zeros:
        if seed % 2 == 0:
            adv = adv.abs()
        sel = torch.rand(shape, generator=g) < 0.3
        sign = torch.where(torch.rand(shape, generator=g) < 0.5, 1.0, -1.0).to(dtype)
        adv = torch.where(sel, 0.0 * sign, adv)  # 0.0 * -1.0 = -0.0
        if N >= 2:
            adv[..., int(torch.randint(0, N, (1,), generator=g))] = -0.0
        adv.view(-1, N)[0] = 0.0
    if mask_kind == "full":
        mask = torch.ones(B, T, dtype=torch.bool)
    elif mask_kind == "empty":
        mask = torch.zeros(B, T, dtype=torch.bool)
    elif mask_kind == "random":
        mask = torch.rand(B, T, generator=g) < 0.6
    else:  # ragged: one response span per row, some rows empty
        mask = torch.zeros(B, T, dtype=torch.bool)
        for b in range(B):
            L = int(torch.randint(0, T + 1, (1,), generator=g))
            s = int(torch.randint(0, T - L + 1, (1,), generator=g))
            mask[b, s : s + L] = True
        if B > 1:
            mask[B // 2] = False
    return lp, olp, adv, mask


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# (loss / weights / row_scale rtol, grad rtol relative to max |grad|) against the reference
# on the same inputs: float32 per-token maths differ by an ulp of exp, the grad is rounded to
# the input dtype.
TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1e-5, 8e-3),
    torch.float16: (1e-5, 1e-3),
}


def close(a, b, rtol, what):
    a64, b64 = a.double(), b.double()
    assert a.shape == b.shape, (what, a.shape, b.shape)
    assert bool(torch.isfinite(a64).all()), (what, a)
    if a.numel() == 0:
        return
    scale = float(b64.abs().max())
    err = float((a64 - b64).abs().max())
    assert err <= rtol * max(scale, 1e-30) + 1e-300, f"{what}: error {err:.3g} vs scale {scale:.3g}"


def check_against_reference(inputs, granularity, loss_agg, dtype):
    lp, olp, adv, mask = inputs
    out = _C.pama_forward(lp, olp, adv, mask, EPS, granularity, loss_agg, True)
    ref = R.fused_forward(lp, olp, adv, mask, EPS, granularity, loss_agg, True)
    rt, gt = TOL[dtype]
    acc = acc_dtype(dtype)
    loss, weights, row_scale, stats = out
    assert loss.dtype == acc and loss.dim() == 0
    assert weights.dtype == acc and row_scale.dtype == acc and stats.dtype == torch.float64
    assert stats.shape == (8,)
    close(loss, ref[0], rt, "loss")
    close(weights, ref[1], max(rt, 1e-7 if acc == torch.float32 else 0), "weights")
    close(row_scale, ref[2], rt, "row_scale")
    assert torch.equal(stats[[0, 1, 2, 3, 4, 7]], ref[3][[0, 1, 2, 3, 4, 7]]), (stats, ref[3])
    scale_obj = max(float(ref[3][5]), 1e-300)
    assert abs(float(stats[5]) - float(ref[3][5])) <= max(rt, 1e-10) * scale_obj + 1e-300
    assert float(stats[6]) <= 1e-9 * max(scale_obj, float(stats[5])) + 1e-300  # kkt residual ~ 0
    # backward: same weights / row scales into both implementations
    go = torch.tensor(0.75, dtype=acc)
    g = _C.pama_backward(go, lp, olp, adv, mask, weights, row_scale, EPS, granularity)
    gr = R.fused_backward(go, lp, olp, adv, mask, weights, row_scale, EPS, granularity)
    assert g.dtype == lp.dtype and g.shape == lp.shape
    close(g, gr, gt, "grad")
    assert bool((g[~mask] == 0).all())
    if granularity == "token":  # autograd's backward: the forward's [B, T] factor times -g r_b
        assert weights.shape == lp.shape
        gf = R.token_factor_backward(go, weights, row_scale, lp.dtype)
        assert gf.dtype == lp.dtype
        close(gf, gr, gt, "grad from the token factor")
        assert bool((weights[~mask] == 0).all()) and bool((gf[~mask] == 0).all())
    return out, g


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bc", [False, True], ids=["BTN", "BN"])
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_fused_matches_reference(granularity, loss_agg, bc, dtype):
    seed = 0
    for N in [1, 2, 3, 4, 5, 8]:
        for (B, T), mask_kind in [((6, 37), "ragged"), ((3, 4500), "random"), ((5, 9), "empty"), ((7, 1), "full")]:
            seed += 1
            inputs = make_inputs(B, T, N, dtype, bc=bc, mask_kind=mask_kind, seed=seed)
            out, g = check_against_reference(inputs, granularity, loss_agg, dtype)
            if mask_kind == "empty":
                assert float(out[0]) == 0.0 and bool((g == 0).all())
                assert out[3].tolist()[:5] == [0.0] * 5 and float(out[3][7]) == 0.0
                if granularity in ("batch", "batch_mean", "sequence_gram"):
                    assert torch.equal(out[1], torch.full((N,), 1.0 / N, dtype=out[1].dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bc", [False, True], ids=["BTN", "BN"])
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_token_exact_zeros_match_reference(loss_agg, bc, dtype):
    """granularity "token" with exact zeros (+0.0, -0.0, zero columns, all-zero tokens): they
    abstain; forward and backward against the reference, every N path (1..5, 8 unrolled, 7 and
    13 at run time) and segmented rows (T > 2048)."""
    seed = 100
    for N in [1, 2, 3, 4, 5, 7, 8, 13]:
        for (B, T), mask_kind in [((6, 37), "ragged"), ((2, 4500), "random"), ((7, 1), "full")]:
            seed += 1
            inputs = make_inputs(B, T, N, dtype, bc=bc, mask_kind=mask_kind, seed=seed, zeros=True)
            check_against_reference(inputs, "token", loss_agg, dtype)


def test_token_abstain_hand_cases_cpp():
    adv = torch.tensor([[[0.0, 2.0, 3.0], [0.0, 0.0, 0.0], [-1.0, 0.0, 5.0], [0.5, 0.5, 0.0],
                         [-0.0, 0.0, 1.5], [-0.0, -0.0, -0.0], [1.0, 2.0, 3.0], [-1.0, -2.0, 0.0]]])
    expected = [2.0, 0.0, 0.0, 0.5, 1.5, 0.0, 1.0, 0.0]
    for dtype in [torch.float64, torch.float32, torch.bfloat16, torch.float16]:
        a = adv.to(dtype)
        lp = torch.zeros(1, 8, dtype=dtype)
        mask = torch.ones(1, 8, dtype=torch.bool)
        loss, w, r, _ = _C.pama_forward(lp, lp, a, mask, EPS, "token", "token_mean", True)
        assert float(loss) == -sum(expected) / 8
        assert w.double().tolist() == [expected], dtype  # the factor s_t u_t, u = 1
        g = _C.pama_backward(torch.tensor(-8.0, dtype=acc_dtype(dtype)), lp, lp, a, mask, w, r, EPS, "token")
        assert g[0].double().tolist() == expected, dtype
        for t in range(8):  # [B, N]: one row per token, broadcast over 4 tokens
            lp4 = torch.zeros(1, 4, dtype=dtype)
            m4 = torch.ones(1, 4, dtype=torch.bool)
            loss, w, r, _ = _C.pama_forward(lp4, lp4, a[:, t], m4, EPS, "token", "token_mean", True)
            assert float(loss) == -expected[t], (dtype, t)
            assert w.double().tolist() == [[expected[t]] * 4], (dtype, t)
            g = _C.pama_backward(torch.tensor(-4.0, dtype=acc_dtype(dtype)), lp4, lp4, a[:, t], m4, w, r, EPS, "token")
            assert g.double().tolist() == [[expected[t]] * 4], (dtype, t)


def independent_forward(lp, olp, adv, mask, granularity, loss_agg):
    """The contract, written directly in float64 (for float64 inputs; no reference.py)."""
    B, T = lp.shape
    A = adv if adv.dim() == 3 else adv[:, None, :].expand(B, T, adv.shape[-1])
    N = A.shape[-1]
    valid = mask & torch.isfinite(lp) & torch.isfinite(olp) & torch.isfinite(A).all(-1)
    raw = torch.where(valid[..., None], A, 0.0)
    u = torch.exp(lp - olp)
    ind = (u <= 1 + EPS) & valid
    A = torch.where(valid[..., None], A.clamp(min=0), 0.0)
    m = torch.where(valid, torch.clamp(u, max=1 + EPS), 0.0)
    I = torch.where(ind[..., None], A, 0.0)
    Mb = valid.sum(1).double()
    M = Mb.sum()
    S = (A * m[..., None]).sum(1)
    if granularity == "batch":
        G = torch.einsum("bti,btj->ij", I, I).numpy()
        if N <= 6:
            _, c = brute_force_min_norm(G)
            c = torch.from_numpy(c) if c is not None and float(np.diag(G).max()) > 0 else torch.full((N,), 1.0 / N)
        else:
            c = torch.from_numpy(solve(G))
        per_row = S @ c.double()
    elif granularity == "sequence_gram":
        V = I.sum(1) / Mb.clamp(min=1)[:, None]  # each response once: its mean I (0 if empty)
        G = (V.T @ V).numpy()
        if N <= 6:
            _, c = brute_force_min_norm(G)
            c = torch.from_numpy(c) if c is not None and float(np.diag(G).max()) > 0 else torch.full((N,), 1.0 / N)
        else:
            c = torch.from_numpy(solve(G))
        per_row = S @ c.double()
    elif granularity == "batch_mean":
        a = I.sum((0, 1)) / max(float(M), 1.0)
        c = R.theorem1(a)
        per_row = S @ c
    elif granularity == "sequence":
        a = I.sum(1) / Mb.clamp(min=1)[:, None]
        c = torch.stack([torch.tensor(t1(row.tolist()), dtype=torch.float64) for row in a]) if B else torch.zeros(0, N)
        per_row = (S * c).sum(-1)
    else:
        # token: exactly-zero advantages abstain; 0 if some A_i < 0 or all are 0
        pos = raw > 0
        s_tok = torch.where(pos, raw, math.inf).amin(-1)
        s_tok = torch.where(~(raw < 0).any(-1) & pos.any(-1), s_tok, 0.0)
        per_row = (s_tok * m).sum(1)
        c = torch.where(ind, s_tok * u, 0.0)  # the weights output: the gradient factor [B, T]
    nonempty = int((Mb > 0).sum())
    if loss_agg == "token_mean":
        r = torch.full((B,), 1.0 / float(M) if M > 0 else 0.0, dtype=torch.float64)
    else:
        r = torch.where(Mb > 0, 1.0 / (max(nonempty, 1) * Mb.clamp(min=1)), 0.0)
    loss = -(r * per_row).sum()
    return loss, c, r, float(M), int((valid & ~(u <= 1 + EPS)).sum()), nonempty


@pytest.mark.parametrize("zeros", [False, True], ids=["nozeros", "zeros"])
@pytest.mark.parametrize("bc", [False, True], ids=["BTN", "BN"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_fused_matches_independent_float64(granularity, bc, zeros):
    if zeros and granularity != "token":
        pytest.skip("exact zeros change only `token` (elsewhere they make the minimiser non-unique)")
    for N, (B, T), seed in [(2, (4, 50), 1), (3, (5, 2100), 2), (4, (3, 7), 3), (6, (9, 33), 4)]:
        for loss_agg in LOSS_AGGS:
            lp, olp, adv, mask = make_inputs(B, T, N, torch.float64, bc=bc, mask_kind="ragged", seed=seed, zeros=zeros)
            loss, w, r, st_ = _C.pama_forward(lp, olp, adv, mask, EPS, granularity, loss_agg, True)
            l2, c2, r2, M, clipped, nonempty = independent_forward(lp, olp, adv, mask, granularity, loss_agg)
            assert abs(float(loss) - float(l2)) <= 1e-11 * max(1.0, abs(float(l2)))
            assert torch.allclose(r, r2, rtol=1e-14, atol=0)
            if granularity == "token":
                assert torch.allclose(w, c2, rtol=1e-14, atol=0), (w, c2)
            else:
                assert torch.allclose(w, c2.double(), rtol=0, atol=1e-9), (w, c2)
            assert st_[0] == M and st_[1] == clipped and st_[7] == nonempty


def test_broadcast_advantages_match_expanded():
    for dtype in (torch.float64, torch.float32):
        lp, olp, adv, mask = make_inputs(6, 3000, 4, dtype, bc=True, mask_kind="random", seed=9)
        full = adv[:, None, :].expand(6, 3000, 4).contiguous()
        rt = 1e-12 if dtype == torch.float64 else 1e-5
        for gran in GRANULARITIES:
            a = _C.pama_forward(lp, olp, adv, mask, EPS, gran, "token_mean", True)
            b = _C.pama_forward(lp, olp, full, mask, EPS, gran, "token_mean", True)
            for x, y, what in zip(a[:3], b[:3], ("loss", "weights", "row_scale")):
                close(x, y, rt, what)
            assert torch.equal(a[3][[0, 1, 2, 3, 4, 7]], b[3][[0, 1, 2, 3, 4, 7]])
            ga = _C.pama_backward(torch.tensor(1.0, dtype=a[0].dtype), lp, olp, adv, mask, a[1], a[2], EPS, gran)
            gb = _C.pama_backward(torch.tensor(1.0, dtype=a[0].dtype), lp, olp, full, mask, a[1], a[2], EPS, gran)
            assert torch.equal(ga, gb)


def test_loss_is_dot_of_returned_weights_and_surrogates():
    """loss = -sum_b r_b sum_i c_i S_{b,i} with the returned (rounded) weights and row scales."""
    lp, olp, adv, mask = make_inputs(5, 300, 3, torch.float32, mask_kind="ragged", seed=4)
    d = [t.double() for t in (lp, olp, adv)]
    u = torch.exp(d[0] - d[1])
    A = d[2].clamp(min=0) * mask[..., None]
    S = (A * u.clamp(max=1 + EPS)[..., None]).sum(1)
    for gran in ("batch", "sequence", "batch_mean", "sequence_gram"):
        for agg in LOSS_AGGS:
            loss, w, r, _ = _C.pama_forward(lp, olp, adv, mask, EPS, gran, agg, True)
            per_row = (S * w.double()).sum(-1) if gran == "sequence" else S @ w.double()
            assert abs(float(loss) + float((r.double() * per_row).sum())) <= 1e-6 * abs(float(loss))


# ===================================================================== non-finite values
def test_check_finite_raises_value_error_naming_first_offender():
    lp, olp, adv, mask = make_inputs(3, 20, 2, torch.float32, mask_kind="full", seed=1)
    bad_lp, bad_olp, bad_adv = lp.clone(), olp.clone(), adv.clone()
    bad_lp[0, 3] = math.nan
    bad_lp[1, 4] = math.inf
    bad_lp[2, 5] = -math.inf
    bad_olp[1, 1] = math.nan
    bad_adv[2, 2, 1] = math.inf
    for args, name, count in [
        ((bad_lp, olp, adv), "logp", 3),
        ((lp, bad_olp, adv), "old_logp", 1),
        ((lp, olp, bad_adv), "advantages", 1),
        ((bad_lp, bad_olp, bad_adv), "logp", 3),
        ((lp, bad_olp, bad_adv), "old_logp", 1),
    ]:
        with pytest.raises(ValueError, match=rf"`{name}` has {count} non-finite value\(s\) at masked positions"):
            _C.pama_forward(*args, mask, EPS, "batch", "token_mean", True)
    # non-finite values at unmasked positions are ignored entirely
    m2 = mask.clone()
    m2[0, 3] = m2[1, 4] = m2[2, 5] = False
    out = _C.pama_forward(bad_lp, olp, adv, m2, EPS, "batch", "token_mean", True)
    assert out[3][2] == 0


@pytest.mark.parametrize("N", [3, 13])  # 13: runtime N (8- and 4-column register transposes, one column)
@pytest.mark.parametrize("bc", [False, True], ids=["BTN", "BN"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_nonfinite_tokens_are_excluded_like_masked_ones(granularity, bc, N):
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        lp, olp, adv, mask = make_inputs(4, 2500, N, dtype, bc=bc, mask_kind="full", seed=2)
        lp, olp, adv = lp.clone(), olp.clone(), adv.clone()
        lp[0, 10] = math.nan
        olp[1, 2200] = -math.inf
        lp[2, 7] = math.inf
        if bc:
            adv[3, 1] = math.nan  # the whole row is invalid
        else:
            adv[3, 5, 2] = math.nan
            adv[3, 9, N - 1] = -math.inf  # the last column: a different transposition path for N = 13
        excluded = mask.clone()
        excluded[0, 10] = excluded[1, 2200] = excluded[2, 7] = False
        if bc:
            excluded[3] = False
        else:
            excluded[3, 5] = excluded[3, 9] = False
        a = _C.pama_forward(lp, olp, adv, mask, EPS, granularity, "seq_mean_token_mean", False)
        b = _C.pama_forward(lp, olp, adv, excluded, EPS, granularity, "seq_mean_token_mean", False)
        for x, y in zip(a[:3], b[:3]):
            assert torch.equal(x, y)
        assert torch.equal(a[3][[0, 1, 5, 6, 7]], b[3][[0, 1, 5, 6, 7]])
        n_adv = 2500 if bc else 2
        assert a[3][2:5].tolist() == [2.0, 1.0, float(n_adv)]
        go = torch.tensor(1.0, dtype=a[0].dtype)
        ga = _C.pama_backward(go, lp, olp, adv, mask, a[1], a[2], EPS, granularity)
        gb = _C.pama_backward(go, lp, olp, adv, excluded, a[1], a[2], EPS, granularity)
        assert torch.equal(ga, gb)
        assert bool(torch.isfinite(ga).all())


def test_overflowing_ratio_gives_zero_gradient_not_nan():
    for dtype in (torch.float32, torch.float16, torch.float64):
        lp = torch.zeros(2, 5, dtype=dtype)
        olp = torch.full((2, 5), -0.1, dtype=dtype)
        big = 1e4 if dtype != torch.float16 else 6e4
        olp[0, 1] = -big  # u = exp(big) = inf
        olp[1, 3] = big  # u = 0
        adv = torch.ones(2, 5, 3, dtype=dtype)
        mask = torch.ones(2, 5, dtype=torch.bool)
        for gran in GRANULARITIES:
            out = _C.pama_forward(lp, olp, adv, mask, EPS, gran, "token_mean", True)
            assert bool(torch.isfinite(out[0])) and out[3][1] == 1.0  # the inf ratio is clipped
            g = _C.pama_backward(torch.tensor(1.0, dtype=out[0].dtype), lp, olp, adv, mask, out[1], out[2], EPS, gran)
            assert bool(torch.isfinite(g).all()) and g[0, 1] == 0 and g[1, 3] == 0
            assert bool((g[0, [0, 2, 3, 4]] < 0).all())
            if gran == "token":  # the factor: 0 for the clipped u = inf, finite everywhere
                assert bool(torch.isfinite(out[1]).all()) and out[1][0, 1] == 0
                assert torch.equal(R.token_factor_backward(torch.tensor(1.0, dtype=out[0].dtype), out[1], out[2], dtype), g)


# ===================================================================== determinism
@pytest.mark.parametrize("shape", [(5, 5000), (3000, 7), (40, 2048)], ids=["segments", "row-groups", "one-block"])
@pytest.mark.parametrize("N", [4, 5])
def test_bitwise_deterministic_across_thread_counts(shape, N):
    B, T = shape
    prev = torch.get_num_threads()
    try:
        for dtype, bc in [(torch.float32, False), (torch.float64, False), (torch.bfloat16, True)]:
            lp, olp, adv, mask = make_inputs(B, T, N, dtype, bc=bc, mask_kind="random", seed=B + N)
            for gran in GRANULARITIES:
                results = []
                for threads in (1, 2, 3):
                    torch.set_num_threads(threads)
                    out = _C.pama_forward(lp, olp, adv, mask, EPS, gran, "seq_mean_token_mean", True)
                    go = torch.tensor(1.0, dtype=out[0].dtype)
                    g = _C.pama_backward(go, lp, olp, adv, mask, out[1], out[2], EPS, gran)
                    results.append((*out, g))
                for other in results[1:]:
                    for x, y in zip(results[0], other):
                        assert torch.equal(x, y), (gran, dtype)
                        xb, yb = x.reshape(-1), y.reshape(-1)  # bit patterns (-0.0 vs 0.0, NaN payloads)
                        assert xb.view(torch.uint8).equal(yb.view(torch.uint8))
    finally:
        torch.set_num_threads(prev)


# ===================================================================== argument handling
def test_argument_errors():
    lp, olp, adv, mask = make_inputs(2, 4, 2, torch.float32, mask_kind="full")
    with pytest.raises(ValueError, match="granularity"):
        _C.pama_forward(lp, olp, adv, mask, EPS, "tokens", "token_mean", True)
    with pytest.raises(ValueError, match="loss_agg"):
        _C.pama_forward(lp, olp, adv, mask, EPS, "batch", "mean", True)
    with pytest.raises(ValueError, match="clip_eps"):
        _C.pama_forward(lp, olp, adv, mask, 0.0, "batch", "token_mean", True)
    with pytest.raises(ValueError):
        _C.pama_forward(lp, olp.double(), adv, mask, EPS, "batch", "token_mean", True)
    with pytest.raises(ValueError):
        _C.pama_forward(lp, olp, adv, mask.float(), EPS, "batch", "token_mean", True)
    with pytest.raises(ValueError):
        _C.pama_forward(lp, olp, torch.zeros(2, 4, 65), mask, EPS, "batch", "token_mean", True)
    with pytest.raises(ValueError):
        _C.pama_backward(torch.tensor(1.0), lp, olp, adv, mask, torch.ones(3), torch.ones(2), EPS, "batch")


def test_zero_sized_batches():
    for B, T in [(0, 5), (3, 0), (0, 0)]:
        lp = torch.zeros(B, T)
        adv = torch.zeros(B, T, 3)
        mask = torch.zeros(B, T, dtype=torch.bool)
        for gran in GRANULARITIES:
            loss, w, r, st_ = _C.pama_forward(lp, lp, adv, mask, EPS, gran, "seq_mean_token_mean", True)
            assert float(loss) == 0.0 and r.shape == (B,) and float(st_.abs().sum()) == 0.0
            g = _C.pama_backward(torch.tensor(1.0), lp, lp, adv, mask, w, r, EPS, gran)
            assert g.shape == (B, T)


def test_build_info():
    info = _C.build_info()
    assert info["backends"][0] == "cpu"
    assert isinstance(info["openmp"], bool)
    if "cuda" not in info["backends"]:  # CPU-only build
        assert info["cuda"] is None
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["max_objectives"] == 64
