"""pama_loss / pama_weights: every backend against a float64 oracle, and the loss's properties.

The oracle below is written from shared/PAMA.md and csrc/README.md independently of
``pama_ext.reference`` (it only borrows the two solvers, which test_theorem1.py and
test_min_norm.py check on their own): per-token ratio, clip indicator, Noon advantages,
weights at the granularity, combined advantage, and the explicit gradient
dL/dlogp_t = -r_b s_t u_t 1[u_t <= 1 + eps]. ``python_tests/oracle.py`` compares a backend
with it (the comparison the Triton kernel tests use against ``pama_ext.reference``).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pama_ext
from pama_ext import reference
from conftest import (
    BACKENDS,
    CLIP_EPS,
    FLOAT_DTYPES,
    GRANULARITIES,
    LOSS_AGGS,
    Inputs,
    assert_close_rel,
    leaf,
    loss_and_grad,
    make_inputs,
    upcast,
    with_exact_zeros,
)
from oracle import Expected, check_backend

F64 = torch.float64


# --------------------------------------------------------------------------- the oracle
def token_rule(A: torch.Tensor) -> torch.Tensor:
    """s_t of ``token`` on raw advantages [..., N], spelled out: objectives whose advantage is
    exactly 0 abstain. 0 if some A_i < 0; else the smallest positive A_i; 0 if all are 0."""
    pos = A > 0
    smallest_pos = torch.where(pos, A, math.inf).amin(-1)
    reinforced = ~(A < 0).any(-1) & pos.any(-1)
    return torch.where(reinforced, smallest_pos, 0.0)


def token_rule_weights(A: torch.Tensor) -> torch.Tensor:
    """The per-token weights of ``token``: equal shares over the negative objectives if any,
    else over the positive ones equal to the smallest positive, else 1/N (all exactly 0)."""
    A = A.to(F64)
    neg, pos = A < 0, A > 0
    at_min = pos & (A == token_rule(A)[..., None])
    sel = torch.where(neg.any(-1, keepdim=True), neg,
                      torch.where(pos.any(-1, keepdim=True), at_min, torch.ones_like(neg))).to(F64)
    return sel / sel.sum(-1, keepdim=True)


def oracle(x: Inputs, granularity: str, loss_agg: str, clip_eps: float = CLIP_EPS) -> dict:
    """Loss, gradient, weights, row scale and statistics in float64, written out plainly."""
    lp, old, adv, mask = upcast(x)
    mask = mask.bool()
    B, T = lp.shape
    N = adv.shape[-1]
    A = adv if adv.dim() == 3 else adv[:, None, :].expand(B, T, N)
    fin_lp, fin_old, fin_adv = torch.isfinite(lp), torch.isfinite(old), torch.isfinite(A).all(-1)
    valid = mask & fin_lp & fin_old & fin_adv
    u = torch.exp(torch.where(valid, lp, 0.0) - torch.where(valid, old, 0.0))
    ind = (u <= 1 + clip_eps) & valid
    a_noon = torch.where(valid[..., None], A, 0.0).clamp_min(0.0)
    i_adv = a_noon * ind[..., None]
    m = torch.where(valid, torch.clamp(u, max=1 + clip_eps), 0.0)
    m_b = valid.sum(1).to(F64)
    big_m = float(m_b.sum())
    objective, kkt = 0.0, 0.0
    if granularity == "batch":
        flat = i_adv.reshape(-1, N)
        gram = flat.T @ flat
        w = reference.min_norm_weights(gram)
        s = a_noon @ w
        objective = float(w @ gram @ w)
        kkt = max(0.0, objective - float((gram @ w).min()))
    elif granularity == "sequence_gram":
        # each response once: row means of I (0 for empty rows), their N x N Gram
        v = i_adv.sum(1) / m_b.clamp_min(1)[:, None]
        gram = v.T @ v
        w = reference.min_norm_weights(gram)
        s = a_noon @ w
        objective = float(w @ gram @ w)
        kkt = max(0.0, objective - float((gram @ w).min()))
    elif granularity == "batch_mean":
        a = i_adv.sum((0, 1)) / max(big_m, 1.0)
        w = pama_ext.theorem1(a)
        s = a_noon @ w
        objective = float(w @ a) ** 2
    elif granularity == "sequence":
        a = i_adv.sum(1) / m_b.clamp_min(1)[:, None]
        w = pama_ext.theorem1(a)
        s = (a_noon * w[:, None, :]).sum(-1)
        nonempty = m_b > 0
        objective = float(((w * a).sum(-1) ** 2)[nonempty].mean()) if bool(nonempty.any()) else 0.0
    else:
        w = torch.zeros(0, dtype=F64)
        s = token_rule(torch.where(valid[..., None], A, 0.0))
    if loss_agg == "token_mean":
        row_scale = torch.full((B,), 1.0 / big_m if big_m > 0 else 0.0, dtype=F64)
    else:
        n_rows = int((m_b > 0).sum())
        row_scale = torch.where(m_b > 0, 1.0 / (max(n_rows, 1) * m_b.clamp_min(1)), 0.0)
    loss = -(row_scale[:, None] * s * m).sum()
    grad = -row_scale[:, None] * s * torch.where(ind, u, 0.0)
    stats = {
        "masked_tokens": big_m,
        "clipped_tokens": float((valid & ~ind).sum()),
        "nonfinite_logp": float((mask & ~fin_lp).sum()),
        "nonfinite_old_logp": float((mask & ~fin_old).sum()),
        "nonfinite_advantages": float((mask & ~fin_adv).sum()),
        "objective": objective,
        "kkt_residual": kkt,
        "nonempty_rows": float((m_b > 0).sum()),
    }
    return dict(loss=loss, grad=grad, weights=w, row_scale=row_scale, stats=stats, s=s, valid=valid)


def check_against_oracle(x: Inputs, backend: str, granularity: str, loss_agg: str, clip_eps=CLIP_EPS):
    """``backend`` against the oracle above (``python_tests/oracle.py`` compares), and
    ``pama_weights`` against the weights the loss used (per token: the rule spelled out)."""
    ref = oracle(x, granularity, loss_agg, clip_eps)
    token_weights = None
    if granularity == "token":
        b, t = x.logp.shape
        token_weights = token_rule_weights(x.advantages if x.advantages.dim() == 3
                                           else x.advantages[:, None, :].expand(b, t, -1))
    expected = Expected(ref["loss"], ref["grad"], ref["weights"], ref["row_scale"], ref["stats"], token_weights)
    return check_backend(x, backend, granularity, loss_agg, clip_eps=clip_eps, expected=expected, pama_weights=True)


# (B, T, N, mask kind, seed): odd shapes, every mask layout
CASES_F64 = [
    (1, 1, 1, "full", 0),
    (1, 1, 3, "full", 1),
    (3, 17, 2, "ragged", 2),
    (3, 17, 5, "random", 3),
    (4, 9, 8, "ragged", 4),
    (2, 6, 3, "empty", 5),
    (5, 7, 3, "full", 6),
    (6, 4, 5, "random", 7),
]
CASES_LOW = [
    (3, 17, 3, "ragged", 11),
    (4, 9, 5, "random", 12),
    (1, 1, 2, "full", 13),
    (2, 33, 8, "full", 14),
]


def _case_id(c):
    return f"B{c[0]}T{c[1]}N{c[2]}-{c[3]}"


@pytest.mark.parametrize("per_sequence", [False, True], ids=["adv_BTN", "adv_BN"])
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("case", CASES_F64, ids=_case_id)
def test_float64_matches_oracle(backend, case, granularity, loss_agg, per_sequence):
    B, T, N, mask_kind, seed = case
    x = make_inputs(B, T, N, F64, per_sequence=per_sequence, mask_kind=mask_kind, seed=seed)
    check_against_oracle(x, backend, granularity, loss_agg)


@pytest.mark.parametrize("per_sequence", [False, True], ids=["adv_BTN", "adv_BN"])
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("case", CASES_LOW, ids=_case_id)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES[1:], ids=str)
def test_low_precision_matches_oracle_on_rounded_inputs(backend, dtype, case, granularity, loss_agg, per_sequence):
    B, T, N, mask_kind, seed = case
    x = make_inputs(B, T, N, dtype, per_sequence=per_sequence, mask_kind=mask_kind, seed=seed)
    check_against_oracle(x, backend, granularity, loss_agg)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_reference_autograd_matches_fused_backward(granularity):
    """The two forms inside reference.py agree (autograd of the loss vs the explicit backward)."""
    x = make_inputs(4, 11, 4, F64, mask_kind="ragged", seed=21)
    for agg in LOSS_AGGS:
        lp = leaf(x.logp)
        loss, w, rs, _ = reference.pama_loss_and_stats(lp, *x[1:], CLIP_EPS, granularity, agg, True)
        (g_auto,) = torch.autograd.grad(loss, lp)
        f_loss, f_w, f_rs, _ = reference.fused_forward(*x, CLIP_EPS, granularity, agg, True)
        g_fused = reference.fused_backward(torch.ones((), dtype=F64), *x, f_w, f_rs, CLIP_EPS, granularity)
        assert_close_rel(f_loss, loss, 1e-12, msg="loss")
        assert_close_rel(g_fused, g_auto, 1e-12, msg="grad")


def test_auto_backend_is_the_first_available():
    x = make_inputs(3, 8, 3, torch.float32, seed=4)
    auto = loss_and_grad(x, backend="auto")
    first = loss_and_grad(x, backend=BACKENDS[0])
    assert torch.equal(auto[0], first[0]) and torch.equal(auto[1], first[1])


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.int64, torch.uint8])
def test_non_bool_masks(backend, mask_dtype):
    x = make_inputs(3, 10, 3, F64, mask_kind="random", seed=8)
    y = x._replace(mask=x.mask.to(mask_dtype) * 3)  # nonzero means "in"
    a, b = loss_and_grad(x, backend=backend), loss_and_grad(y, backend=backend)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs two backends to compare")
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_backends_agree_float32(granularity):
    x = make_inputs(8, 64, 4, torch.float32, mask_kind="ragged", seed=77)
    outs = {b: loss_and_grad(x, granularity=granularity, backend=b) for b in BACKENDS}
    ref = outs["torch"]
    for b, (loss, grad, st) in outs.items():
        assert_close_rel(loss, ref[0], 1e-5, msg=b)
        assert_close_rel(grad, ref[1], 1e-5, msg=b)
        assert_close_rel(st.weights, ref[2].weights, 0.0, atol=1e-5, msg=b)


# --------------------------------------------------------------------------- N = 1 is Noon PPO
def noon_ppo(lp, old, adv, mask, eps=CLIP_EPS):
    """Plain single-objective Noon PPO, token-mean aggregation."""
    mask = mask.to(lp.dtype)
    u = torch.exp(lp - old)
    big_m = mask.sum()
    return -(mask * adv.clamp_min(0) * torch.minimum(u, torch.tensor(1 + eps, dtype=lp.dtype))).sum() / big_m


@pytest.mark.parametrize("per_sequence", [False, True], ids=["adv_BTN", "adv_BN"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_single_objective_is_noon_ppo(backend, granularity, per_sequence):
    x = make_inputs(4, 13, 1, F64, per_sequence=per_sequence, mask_kind="ragged", seed=31)
    B, T = x.logp.shape
    adv = x.advantages[..., 0] if not per_sequence else x.advantages[:, :1].expand(B, T)
    lp = leaf(x.logp)
    expected = noon_ppo(lp, x.old_logp, adv, x.mask)
    (g_expected,) = torch.autograd.grad(expected, lp)
    loss, grad, st = loss_and_grad(x, granularity=granularity, backend=backend)
    assert_close_rel(loss, expected, 1e-12, msg="loss")
    assert_close_rel(grad, g_expected, 1e-12, msg="grad")
    assert not bool(torch.equal(grad, torch.zeros_like(grad)))  # the case is not vacuous
    if granularity != "token":
        assert st.weights.reshape(-1).tolist() == [1.0] * st.weights.numel()


@pytest.mark.parametrize("n_copies", [2, 3, 5])
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_identical_objectives_equal_single_objective(backend, granularity, loss_agg, n_copies):
    x = make_inputs(3, 11, 1, F64, mask_kind="ragged", seed=41)
    xn = x._replace(advantages=x.advantages.repeat(1, 1, n_copies))
    one = loss_and_grad(x, granularity=granularity, loss_agg=loss_agg, backend=backend)
    many = loss_and_grad(xn, granularity=granularity, loss_agg=loss_agg, backend=backend)
    assert_close_rel(many[0], one[0], 1e-12, msg="loss")
    assert_close_rel(many[1], one[1], 1e-12, msg="grad")
    if granularity != "token":  # identical objectives share the weight equally
        assert_close_rel(many[2].weights, torch.full_like(many[2].weights, 1 / n_copies), 0.0, atol=1e-12)


# --------------------------------------------------------------------------- token granularity
def test_token_granularity_hand_case(backend):
    adv = torch.tensor([[[1.0, 2.0], [1.0, -1.0], [-1.0, -2.0], [3.0, 0.5]]], dtype=F64)
    lp = torch.zeros(1, 4, dtype=F64)
    old = torch.zeros(1, 4, dtype=F64)  # u = 1 everywhere
    mask = torch.ones(1, 4, dtype=torch.bool)
    x = Inputs(lp, old, adv, mask)
    loss, grad, st = loss_and_grad(x, granularity="token", backend=backend)
    # s_t = min_i max(A_i, 0) = [1, 0, 0, 0.5]: reinforced only where every advantage is > 0
    assert float(loss) == pytest.approx(-(1.0 + 0.5) / 4, rel=1e-15)
    assert grad[0].tolist() == pytest.approx([-1.0 / 4, 0.0, 0.0, -0.5 / 4], rel=1e-15)
    w = pama_ext.pama_weights(*x, granularity="token", backend=backend)
    assert w.tolist() == [[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.0, 1.0]]]


@pytest.mark.parametrize("per_sequence", [False, True], ids=["adv_BTN", "adv_BN"])
def test_token_granularity_explicit_gradient(backend, per_sequence):
    x = make_inputs(5, 12, 3, F64, per_sequence=per_sequence, mask_kind="random", seed=51)
    x = x._replace(advantages=x.advantages + 0.7)  # enough tokens with every advantage > 0
    B, T = x.logp.shape
    A = x.advantages if not per_sequence else x.advantages[:, None, :].expand(B, T, -1)
    s = A.clamp_min(0).amin(-1)
    u = torch.exp(x.logp - x.old_logp)
    mask = x.mask.to(F64)
    big_m = mask.sum()
    expected_grad = -(mask / big_m) * s * u * (u <= 1 + CLIP_EPS)
    expected_loss = -(mask * s * torch.clamp(u, max=1 + CLIP_EPS)).sum() / big_m
    loss, grad, _ = loss_and_grad(x, granularity="token", backend=backend)
    assert_close_rel(loss, expected_loss, 1e-12, msg="loss")
    assert_close_rel(grad, expected_grad, 1e-12, msg="grad")
    # only tokens whose every advantage is positive (and unclipped) get a gradient
    all_pos = (A > 0).all(-1) & x.mask & (u <= 1 + CLIP_EPS)
    assert torch.equal(grad != 0, all_pos)
    assert bool(all_pos.any()) and bool((x.mask & ~all_pos).any())


ZERO_CASES = [
    (1, 1, 1, "full", 60),
    (1, 1, 3, "full", 61),
    (3, 17, 2, "ragged", 62),
    (3, 17, 5, "random", 63),
    (4, 9, 8, "full", 64),
    (5, 7, 3, "ragged", 65),
]


@pytest.mark.parametrize("nonneg", [False, True], ids=["signed", "nonneg"])
@pytest.mark.parametrize("per_sequence", [False, True], ids=["adv_BTN", "adv_BN"])
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("case", ZERO_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_token_exact_zeros_match_oracle(backend, dtype, case, loss_agg, per_sequence, nonneg):
    """Exact zeros (+0.0, -0.0, whole zero columns, all-zero tokens) abstain; every backend
    against the float64 oracle (which spells the rule out)."""
    B, T, N, mask_kind, seed = case
    x = make_inputs(B, T, N, dtype, per_sequence=per_sequence, mask_kind=mask_kind, seed=seed)
    x = with_exact_zeros(x, seed, nonneg=nonneg)
    check_against_oracle(x, backend, "token", loss_agg)


@given(
    B=st.integers(1, 5),
    T=st.integers(1, 9),
    N=st.integers(1, 6),
    per_sequence=st.booleans(),
    mask_kind=st.sampled_from(["full", "ragged", "empty", "random"]),
    frac=st.sampled_from([0.0, 0.2, 0.5, 1.0]),
    nonneg=st.booleans(),
    dtype=st.sampled_from(FLOAT_DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_token_exact_zeros_property(B, T, N, per_sequence, mask_kind, frac, nonneg, dtype, seed):
    """Every backend against the oracle on advantages with exact zeros in a random subset."""
    x = make_inputs(B, T, N, dtype, per_sequence=per_sequence, mask_kind=mask_kind, seed=seed)
    x = with_exact_zeros(x, seed, frac=frac, nonneg=nonneg)
    for backend in BACKENDS:
        check_against_oracle(x, backend, "token", "token_mean")


def token_s(adv: torch.Tensor, backend: str) -> torch.Tensor:
    """s_t as a backend computes it, read off the gradient: u = 1, full mask, token_mean,
    so dL/dlogp_t = -s_t / M (exact up to the rounding of 1/M)."""
    B, T = adv.shape[0], (adv.shape[1] if adv.dim() == 3 else 3)
    lp = torch.zeros(B, T, dtype=adv.dtype)
    x = Inputs(lp, lp.clone(), adv, torch.ones(B, T, dtype=torch.bool))
    loss, grad, _ = loss_and_grad(x, granularity="token", backend=backend)
    s = -grad.to(F64) * (B * T)
    assert_close_rel(loss, -s.sum() / (B * T), 1e-12, msg="loss")
    return s


def test_token_abstain_hand_cases(backend):
    adv = torch.tensor([[[0.0, 2.0, 3.0], [0.0, 0.0, 0.0], [-1.0, 0.0, 5.0], [0.5, 0.5, 0.0],
                         [-0.0, 0.0, 1.5], [-0.0, -0.0, -0.0], [1.0, 2.0, 3.0], [-1.0, -2.0, 0.0]]], dtype=F64)
    s = token_s(adv, backend)
    assert s[0].tolist() == [2.0, 0.0, 0.0, 0.5, 1.5, 0.0, 1.0, 0.0]
    lp = torch.zeros(1, 8, dtype=F64)
    w = pama_ext.pama_weights(lp, lp, adv, torch.ones(1, 8, dtype=torch.bool), granularity="token", backend=backend)
    assert w[0].tolist() == [
        [0.0, 1.0, 0.0],
        [1 / 3, 1 / 3, 1 / 3],
        [1.0, 0.0, 0.0],
        [0.5, 0.5, 0.0],
        [0.0, 0.0, 1.0],
        [1 / 3, 1 / 3, 1 / 3],
        [1.0, 0.0, 0.0],
        [0.5, 0.5, 0.0],
    ]
    # the weights reproduce s_t: sum_i c_i max(A_i, 0) == s_t
    assert torch.equal((w * adv.clamp_min(0)).sum(-1), s)
    # [B, N] advantages broadcast over the tokens of each row
    s_bn = token_s(adv[0], backend)  # 8 rows of 3 tokens
    assert_close_rel(s_bn, s[0][:, None].expand(8, 3), 1e-15)


@given(
    B=st.integers(1, 4),
    T=st.integers(1, 8),
    N=st.integers(1, 6),
    frac=st.sampled_from([0.0, 0.3, 0.7]),
    nonneg=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_token_abstain_properties(B, T, N, frac, nonneg, seed):
    """s_t > 0 only when no advantage is negative; s_t <= every positive advantage; the
    weights reproduce s_t; without exact zeros, s_t = min_i max(A_i, 0) (the old rule)."""
    x = with_exact_zeros(make_inputs(B, T, N, F64, seed=seed), seed, frac=frac, nonneg=nonneg)
    A = x.advantages
    for backend in BACKENDS:
        s = token_s(A, backend)
        assert bool((s >= 0).all())
        assert not bool(((s > 0) & (A < 0).any(-1)).any())
        assert bool((torch.where(A > 0, A, math.inf) * (1 + 1e-14) >= s[..., None]).all())
        # s_t > 0 exactly when no negative and at least one positive
        assert torch.equal(s > 0, ~(A < 0).any(-1) & (A > 0).any(-1))
        w = pama_ext.pama_weights(*x, granularity="token", backend=backend)
        assert_close_rel((w * A.clamp_min(0)).sum(-1), s, 1e-15)
        assert_close_rel(w.sum(-1), torch.ones_like(s), 1e-15)
        nz = make_inputs(B, T, N, F64, seed=seed).advantages
        nz = torch.where(nz == 0, 1e-3, nz)  # no exact zeros: the old rule, bit for bit
        if nonneg:
            nz = nz.abs()
        assert_close_rel(token_s(nz, backend), torch.clamp(nz, min=0).amin(-1), 1e-15)
        assert torch.equal(reference.token_advantage(nz), torch.clamp(nz, min=0).amin(-1))


# --------------------------------------------------------------------------- sequence_gram granularity
def row_means_of_i(x: Inputs, clip_eps: float = CLIP_EPS) -> torch.Tensor:
    """V [B, N]: row b's mean over its valid tokens of I^(i)_t (0 for a row with none), float64."""
    o = oracle(x, "token", "token_mean", clip_eps)  # only for `valid`
    lp, old, adv, _ = upcast(x)
    B, T = lp.shape
    A = adv if adv.dim() == 3 else adv[:, None, :].expand(B, T, adv.shape[-1])
    valid = o["valid"]
    u = torch.exp(torch.where(valid, lp, 0.0) - torch.where(valid, old, 0.0))
    ind = valid & (u <= 1 + clip_eps)
    i_adv = torch.where(ind[..., None], A, 0.0).clamp_min(0.0)
    return i_adv.sum(1) / valid.sum(1).clamp_min(1).to(F64)[:, None]


@given(
    B=st.integers(1, 7),
    T=st.integers(1, 12),
    N=st.integers(1, 7),
    per_sequence=st.booleans(),
    mask_kind=st.sampled_from(["full", "ragged", "empty", "random"]),
    shift=st.sampled_from([-1.0, 0.0, 0.7]),
    seed=st.integers(0, 2**31 - 1),
)
def test_sequence_gram_combined_direction_conflicts_with_no_objective(B, T, N, per_sequence, mask_kind, shift, seed):
    """d = sum_i c_i v^(i) (v^(i): the [B] row means of objective i) has <d, v^(j)> >= ||d||^2
    for every objective j (the min-norm certificate), on every backend."""
    x = make_inputs(B, T, N, F64, per_sequence=per_sequence, mask_kind=mask_kind, seed=seed)
    x = x._replace(advantages=x.advantages + shift)
    V = row_means_of_i(x)
    scale = float((V * V).sum(0).max())
    for b in BACKENDS:
        c = pama_ext.pama_weights(*x, granularity="sequence_gram", backend=b)
        assert c.shape == (N,) and c.dtype == F64, b
        assert float(c.min()) >= 0.0 and abs(float(c.sum()) - 1.0) <= 1e-12, (b, c)
        d = V @ c
        dd = float(d @ d)
        assert float((V.T @ d).min()) >= dd - 1e-10 * scale - 1e-300, (b, (V.T @ d).tolist(), dd)
        # and no better point on the simplex: d is the min-norm point of the row-mean vectors
        best = reference.min_norm_weights(V.T @ V)
        assert dd <= float((V @ best) @ (V @ best)) + 1e-12 * scale + 1e-300, b


@pytest.mark.parametrize("per_sequence", [False, True], ids=["adv_BTN", "adv_BN"])
@pytest.mark.parametrize("N", [2, 3, 5])
def test_sequence_gram_equals_batch_for_equal_lengths_and_constant_rows(backend, N, per_sequence):
    """Every row with the same number of valid tokens and I constant within each row: the
    batch Gram is that length times the sequence Gram, so the weights (and loss) are batch's."""
    B, T, L = 6, 9, 5
    x = make_inputs(B, T, N, F64, per_sequence=True, mask_kind="full", seed=17 + N)
    adv = x.advantages + 0.3  # [B, N], mostly positive: a non-trivial min-norm point
    if not per_sequence:
        adv = adv[:, None, :].expand(B, T, N).contiguous()  # per-token, constant along each row
    lp = x.logp
    old = lp + 0.05  # u = exp(-0.05) < 1 + eps everywhere: no token clipped, I_t = max(A_t, 0)
    g = torch.Generator().manual_seed(N)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):  # L valid tokens per row, at different positions
        mask[b, torch.randperm(T, generator=g)[:L]] = True
    y = Inputs(lp, old, adv, mask)
    loss_b, grad_b, st_b = loss_and_grad(y, granularity="batch", backend=backend)
    loss_s, grad_s, st_s = loss_and_grad(y, granularity="sequence_gram", backend=backend)
    assert_close_rel(st_s.weights, st_b.weights, 0.0, atol=1e-12, msg="weights")
    assert not bool(torch.allclose(st_s.weights, torch.full((N,), 1.0 / N, dtype=F64)))  # not vacuous
    assert_close_rel(loss_s, loss_b, 1e-10, msg="loss")
    assert_close_rel(grad_s, grad_b, 1e-10, msg="grad")
    # the objectives differ by the factor L (G_batch = L * G_sequence)
    assert st_b.as_dict()["objective"] == pytest.approx(L * st_s.as_dict()["objective"], rel=1e-10)


def test_sequence_gram_counts_each_response_once(backend):
    """Stretching one response (more tokens with the same I) moves `batch`'s weights towards
    the objectives that response favours; `sequence_gram`'s do not move."""
    N, B, T = 2, 4, 40
    adv = torch.tensor([[2.0, 0.1], [0.2, 1.0], [0.1, 1.5], [0.3, 1.2]], dtype=F64)  # row 0 favours objective 0
    lp = torch.full((B, T), -1.0, dtype=F64)
    old = lp.clone()  # u = 1: nothing clipped
    short = torch.arange(T)[None, :] < torch.tensor([4, 4, 4, 4])[:, None]
    long = torch.arange(T)[None, :] < torch.tensor([40, 4, 4, 4])[:, None]
    w = {}
    for name, mask in (("short", short), ("long", long)):
        for gran in ("batch", "sequence_gram"):
            w[name, gran] = pama_ext.pama_weights(lp, old, adv, mask, granularity=gran, backend=backend)
    assert_close_rel(w["long", "sequence_gram"], w["short", "sequence_gram"], 0.0, atol=1e-12, msg="sequence_gram")
    assert_close_rel(w["short", "batch"], w["short", "sequence_gram"], 0.0, atol=1e-12, msg="equal lengths")
    # the long response's objective 0 has a larger norm in the token Gram: the min-norm point
    # moves towards objective 1, the objective whose advantages sit on the short answers
    assert float(w["long", "batch"][1]) > float(w["short", "batch"][1]) + 0.05


# --------------------------------------------------------------------------- invariances
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_objective_permutation_invariance(backend, granularity, loss_agg):
    x = make_inputs(4, 15, 5, F64, mask_kind="ragged", seed=61)
    perm = torch.tensor([3, 0, 4, 2, 1])
    xp = x._replace(advantages=x.advantages[..., perm])
    a = loss_and_grad(x, granularity=granularity, loss_agg=loss_agg, backend=backend)
    b = loss_and_grad(xp, granularity=granularity, loss_agg=loss_agg, backend=backend)
    assert_close_rel(b[0], a[0], 1e-10, msg="loss")
    assert_close_rel(b[1], a[1], 1e-10, msg="grad")
    if granularity != "token":
        assert_close_rel(b[2].weights, a[2].weights[..., perm], 0.0, atol=1e-9, msg="weights")


@pytest.mark.parametrize("k", [0.5, 3.0, 1e3])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_advantage_scaling(backend, granularity, k):
    x = make_inputs(4, 10, 3, F64, mask_kind="ragged", seed=71)
    xk = x._replace(advantages=x.advantages * k)
    a = loss_and_grad(x, granularity=granularity, backend=backend)
    b = loss_and_grad(xk, granularity=granularity, backend=backend)
    assert_close_rel(b[0], k * a[0], 1e-10, msg="loss")
    assert_close_rel(b[1], k * a[1], 1e-10, msg="grad")
    assert_close_rel(b[2].weights, a[2].weights, 0.0, atol=1e-9, msg="weights")
    wa = pama_ext.pama_weights(*x, granularity=granularity, backend=backend)
    wb = pama_ext.pama_weights(*xk, granularity=granularity, backend=backend)
    assert_close_rel(wb, wa, 0.0, atol=1e-9, msg="pama_weights")


# --------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_empty_mask_zero_loss_zero_grad(backend, granularity, loss_agg, dtype):
    x = make_inputs(3, 5, 3, dtype, mask_kind="empty", seed=81)
    # garbage at the unmasked positions must not leak into the result
    x = x._replace(logp=x.logp.clone().index_fill_(1, torch.tensor([2]), float("nan")))
    loss, grad, st = loss_and_grad(x, granularity=granularity, loss_agg=loss_agg, backend=backend)
    assert float(loss) == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))
    assert bool(torch.isfinite(st.weights).all())
    stats = st.as_dict()
    assert stats["masked_tokens"] == 0 and stats["nonempty_rows"] == 0
    for name in ("nonfinite_logp", "nonfinite_old_logp", "nonfinite_advantages", "objective"):
        assert stats[name] == 0.0


@pytest.mark.parametrize("per_sequence", [False, True], ids=["adv_BTN", "adv_BN"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_seq_mean_token_mean_ignores_empty_rows(backend, granularity, per_sequence):
    x = make_inputs(6, 9, 3, F64, per_sequence=per_sequence, mask_kind="ragged", seed=91)
    mask = x.mask.clone()
    mask[1] = False
    mask[4] = False
    mask[0, :5] = True  # make sure some rows are non-empty
    mask[3, 2:] = True
    x = x._replace(mask=mask)
    keep = mask.any(1)
    assert int(keep.sum()) in range(2, 6)
    xs = Inputs(*(t[keep] for t in x))
    full = loss_and_grad(x, granularity=granularity, loss_agg="seq_mean_token_mean", backend=backend)
    sub = loss_and_grad(xs, granularity=granularity, loss_agg="seq_mean_token_mean", backend=backend)
    assert_close_rel(full[0], sub[0], 1e-12, msg="loss")
    assert_close_rel(full[1][keep], sub[1], 1e-12, msg="grad")
    assert torch.equal(full[1][~keep], torch.zeros_like(full[1][~keep]))
    assert full[2].row_scale[~keep].tolist() == [0.0] * int((~keep).sum())
    # mean over the non-empty rows of each row's token mean
    ref = oracle(x, granularity, "seq_mean_token_mean")
    m_b = x.mask.sum(1).to(F64)
    u = torch.exp(x.logp - x.old_logp)
    per_row = (ref["s"] * torch.clamp(u, max=1 + CLIP_EPS) * x.mask).sum(1)
    expected = -(per_row[keep] / m_b[keep]).mean()
    assert_close_rel(full[0], expected, 1e-12, msg="explicit seq-mean")


@pytest.mark.parametrize("delta", [100.0, 1000.0])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_ratio_overflow_gives_finite_zero_grad(backend, granularity, dtype, delta):
    """u = exp(logp - old_logp) overflowing (to inf in float32, and in float64 at 1000):
    the token is clipped, its gradient is 0 (not NaN), the loss finite."""
    x = make_inputs(2, 6, 3, F64, mask_kind="full", seed=101)
    lp, old, adv = x.logp.clone(), x.old_logp.clone(), x.advantages.clone()
    old[0, 2] = -10.0
    lp[0, 2] = -10.0 + delta  # u = e^delta
    old[1, 3] = -5.0
    lp[1, 3] = -5.0 + delta
    adv[1, 3] = torch.tensor([-1.0, 0.5, 2.0])  # s_t = 0 at this token under `token`
    x = Inputs(lp.to(dtype), old.to(dtype), adv.to(dtype), x.mask)
    loss, grad, st = check_against_oracle(x, backend, granularity, "token_mean")
    assert bool(torch.isfinite(loss)), loss
    assert bool(torch.isfinite(grad).all()), grad
    assert float(grad[0, 2]) == 0.0 and float(grad[1, 3]) == 0.0
    assert st.as_dict()["clipped_tokens"] >= 2


# --------------------------------------------------------------------------- non-finite inputs
def _poison(x: Inputs, which: str, value: float, where=(1, 3)):
    t = getattr(x, which).clone()
    if which == "advantages":
        t[where + (1,) if t.dim() == 3 else where[:1] + (1,)] = value
    else:
        t[where] = value
    return x._replace(**{which: t})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("which", ["logp", "old_logp", "advantages"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_nonfinite_raise_names_the_argument(backend, granularity, which, value):
    x = make_inputs(3, 8, 3, torch.float32, mask_kind="full", seed=111)
    bad = _poison(x, which, value)
    with pytest.raises(ValueError) as info:
        pama_ext.pama_loss(*bad, granularity=granularity, backend=backend)
    msg = str(info.value)
    assert which in msg, msg
    others = {"logp": ("old_logp", "advantages"), "old_logp": ("advantages",), "advantages": ("old_logp",)}
    for other in others[which]:  # names the offending argument, not another one
        assert other not in msg, msg
    # the default is "raise"
    with pytest.raises(ValueError, match=which):
        pama_ext.pama_loss_and_stats(*bad, granularity=granularity, backend=backend, nonfinite="raise")


def test_nonfinite_raise_order_logp_first(backend):
    x = make_inputs(3, 8, 3, F64, mask_kind="full", seed=112)
    bad = _poison(_poison(_poison(x, "advantages", math.nan, (0, 1)), "old_logp", math.inf, (2, 2)), "logp", math.nan, (1, 7))
    with pytest.raises(ValueError) as info:
        pama_ext.pama_loss(*bad, backend=backend)
    assert "logp" in str(info.value) and "old_logp" not in str(info.value)
    bad = _poison(_poison(x, "advantages", math.nan, (0, 1)), "old_logp", math.inf, (2, 2))
    with pytest.raises(ValueError, match="old_logp"):
        pama_ext.pama_loss(*bad, backend=backend)


@pytest.mark.parametrize("per_sequence", [False, True], ids=["adv_BTN", "adv_BN"])
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_nonfinite_mask_drops_exactly_those_tokens(backend, granularity, loss_agg, dtype, per_sequence):
    x = make_inputs(4, 9, 3, dtype, per_sequence=per_sequence, mask_kind="ragged", seed=121)
    mask = x.mask.clone()
    mask[0, :4] = True
    mask[2, 3:8] = True
    mask[3, :] = True
    x = x._replace(mask=mask)
    bad = _poison(x, "logp", math.nan, (0, 1))
    bad = _poison(bad, "old_logp", math.inf, (2, 5))
    bad = _poison(bad, "advantages", -math.inf, (3, 0))
    bad = _poison(bad, "logp", math.inf, (1, 8))  # at an unmasked position (maybe): never counted
    # the same batch with those tokens masked out (and finite values there)
    dropped = torch.zeros_like(mask)
    dropped[0, 1] = dropped[2, 5] = True
    if per_sequence:
        dropped[3, :] = True  # a [B, N] advantage poisons its whole row
    else:
        dropped[3, 0] = True
    dropped &= mask
    clean = x._replace(mask=mask & ~dropped)
    loss, grad, st = loss_and_grad(bad, granularity=granularity, loss_agg=loss_agg, backend=backend, nonfinite="mask")
    e_loss, e_grad, e_st = loss_and_grad(clean, granularity=granularity, loss_agg=loss_agg, backend=backend)
    assert bool(torch.isfinite(loss)) and bool(torch.isfinite(grad).all())
    assert_close_rel(loss, e_loss, 1e-6 if dtype != F64 else 1e-13, msg="loss")
    assert_close_rel(grad, e_grad, 1e-6 if dtype != F64 else 1e-13, msg="grad")
    assert torch.equal(grad[dropped], torch.zeros_like(grad[dropped]))
    assert_close_rel(st.weights, e_st.weights, 0.0, atol=1e-6, msg="weights")
    stats, e_stats = st.as_dict(), e_st.as_dict()
    assert stats["nonfinite_logp"] == 1.0 + float(mask[1, 8])
    assert stats["nonfinite_old_logp"] == 1.0
    assert stats["nonfinite_advantages"] == float(dropped[3].sum())
    assert stats["masked_tokens"] == e_stats["masked_tokens"] == float((mask & ~dropped).sum()) - float(mask[1, 8])


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_nonfinite_at_unmasked_positions_is_ignored(backend, granularity):
    x = make_inputs(3, 8, 3, F64, mask_kind="full", seed=131)
    mask = x.mask.clone()
    mask[0, 2] = mask[1, 5] = mask[2, 0] = False
    x = x._replace(mask=mask)
    bad = _poison(_poison(_poison(x, "logp", math.nan, (0, 2)), "old_logp", -math.inf, (1, 5)), "advantages", math.nan, (2, 0))
    loss, grad, st = loss_and_grad(bad, granularity=granularity, backend=backend)  # nonfinite="raise"
    e_loss, e_grad, _ = loss_and_grad(x, granularity=granularity, backend=backend)
    assert bool(torch.isfinite(grad).all())
    assert_close_rel(loss, e_loss, 1e-14, msg="loss")
    assert_close_rel(grad, e_grad, 1e-14, msg="grad")
    stats = st.as_dict()
    assert stats["nonfinite_logp"] == stats["nonfinite_old_logp"] == stats["nonfinite_advantages"] == 0.0


# --------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("per_sequence", [False, True], ids=["adv_BTN", "adv_BN"])
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_gradcheck(backend, granularity, loss_agg, per_sequence):
    x = make_inputs(3, 5, 3, F64, per_sequence=per_sequence, mask_kind="full", seed=141, margin=1e-3)
    mask = x.mask.clone()
    mask[1, 2:] = False  # ragged, and row 2 empty
    mask[2] = False
    x = x._replace(mask=mask)
    u = torch.exp(x.logp - x.old_logp)
    assert bool(((u - (1 + CLIP_EPS)).abs() > 5e-4).all())
    assert bool(((u > 1 + CLIP_EPS) & x.mask).any()) and bool(((u < 1 + CLIP_EPS) & x.mask).any())

    def f(lp):
        return pama_ext.pama_loss(lp, x.old_logp, x.advantages, x.mask,
                                  granularity=granularity, loss_agg=loss_agg, backend=backend)

    assert torch.autograd.gradcheck(f, (leaf(x.logp),), eps=1e-6, atol=1e-9, rtol=1e-6)


@pytest.mark.parametrize("per_sequence", [False, True], ids=["adv_BTN", "adv_BN"])
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_gradcheck_token_exact_zeros(backend, loss_agg, per_sequence):
    x = make_inputs(4, 6, 3, F64, per_sequence=per_sequence, mask_kind="full", seed=142, margin=1e-3)
    x = with_exact_zeros(x, 142, frac=0.4, nonneg=True)
    A = x.advantages if not per_sequence else x.advantages[:, None, :].expand(4, 6, -1)
    assert bool(((A == 0).any(-1) & (A > 0).any(-1)).any())  # abstentions that matter

    def f(lp):
        return pama_ext.pama_loss(lp, x.old_logp, x.advantages, x.mask,
                                  granularity="token", loss_agg=loss_agg, backend=backend)

    assert torch.autograd.gradcheck(f, (leaf(x.logp),), eps=1e-6, atol=1e-9, rtol=1e-6)


# --------------------------------------------------------------------------- more contract details
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
def test_indicator_is_one_at_the_clip_boundary(backend, dtype):
    """u = 1 + eps exactly is not clipped (the paper's I(A)): exp(ln 2) == 2.0 == 1 + eps."""
    ln2 = math.log(2.0)
    lp = torch.tensor([[ln2, 0.0, ln2 + 0.1]], dtype=dtype)
    assert float(torch.exp(lp[0, 0].to(dtype))) == 2.0
    old = torch.zeros(1, 3, dtype=dtype)
    adv = torch.tensor([[[1.5], [0.5], [2.0]]], dtype=dtype)
    x = Inputs(lp, old, adv, torch.ones(1, 3, dtype=torch.bool))
    for g in GRANULARITIES:
        loss, grad, st = loss_and_grad(x, clip_eps=1.0, granularity=g, backend=backend)
        assert grad[0].tolist() == pytest.approx([-1.5 * 2.0 / 3, -0.5 / 3, 0.0], rel=1e-6)
        assert float(loss) == pytest.approx(-(1.5 * 2.0 + 0.5 + 2.0 * 2.0) / 3, rel=1e-6)
        assert st.as_dict()["clipped_tokens"] == 1.0


def test_grad_output_is_propagated(backend):
    x = make_inputs(3, 7, 3, F64, mask_kind="full", seed=151)
    x = x._replace(advantages=x.advantages + 1.0)
    for g in GRANULARITIES:
        lp = leaf(x.logp)
        loss = pama_ext.pama_loss(lp, *x[1:], granularity=g, backend=backend)
        (g1,) = torch.autograd.grad(loss, lp, retain_graph=True)
        (g3,) = torch.autograd.grad(loss, lp, grad_outputs=torch.tensor(-2.5, dtype=F64))
        assert_close_rel(g3, -2.5 * g1, 1e-14, msg=g)
        assert bool((g1 != 0).any())


def test_non_contiguous_inputs(backend):
    x = make_inputs(4, 12, 3, F64, mask_kind="random", seed=161)
    # transposed / strided views holding the same values
    lp_nc = x.logp.T.contiguous().T
    old_nc = torch.zeros(4, 24, dtype=F64)[:, ::2]
    old_nc.copy_(x.old_logp)
    adv_nc = torch.zeros(4, 12, 6, dtype=F64)[..., ::2]
    adv_nc.copy_(x.advantages)
    mask_nc = x.mask.T.contiguous().T
    assert not (lp_nc.is_contiguous() or old_nc.is_contiguous() or adv_nc.is_contiguous() or mask_nc.is_contiguous())
    for g in GRANULARITIES:
        a = loss_and_grad(x, granularity=g, backend=backend)
        b = loss_and_grad(Inputs(lp_nc, old_nc, adv_nc, mask_nc), granularity=g, backend=backend)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), g
        assert b[1].shape == (4, 12)


def test_mixed_input_dtypes_promote(backend):
    x = make_inputs(3, 9, 3, torch.float32, mask_kind="ragged", seed=171)
    mixed = x._replace(advantages=x.advantages.to(F64))
    loss, grad, _ = loss_and_grad(mixed, granularity="batch", backend=backend)
    assert loss.dtype == F64 and grad.dtype == torch.float32  # computed in float64, grad in logp's dtype
    ref = oracle(x, "batch", "token_mean")
    assert_close_rel(loss, ref["loss"], 1e-12, msg="loss")
    assert_close_rel(grad, ref["grad"], 1e-6, msg="grad")


@given(
    B=st.integers(1, 5),
    T=st.integers(1, 12),
    N=st.integers(1, 6),
    per_sequence=st.booleans(),
    mask_kind=st.sampled_from(["full", "ragged", "empty", "random"]),
    granularity=st.sampled_from(GRANULARITIES),
    loss_agg=st.sampled_from(LOSS_AGGS),
    clip_eps=st.sampled_from([0.05, 0.2, 0.5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_shapes_match_oracle(B, T, N, per_sequence, mask_kind, granularity, loss_agg, clip_eps, seed):
    x = make_inputs(B, T, N, F64, per_sequence=per_sequence, mask_kind=mask_kind, seed=seed, clip_eps=clip_eps)
    for b in BACKENDS:
        check_against_oracle(x, b, granularity, loss_agg, clip_eps=clip_eps)


# (B, T, N, mask kind, dtype): long rows (several 2048-token blocks per row), every
# N-specialised kernel width (1, 2, 4, 8) and the generic path (3, 16, 64)
LARGE_CASES = [
    (2, 4500, 4, "ragged", F64),
    (1, 4100, 1, "full", torch.float32),
    (3, 900, 2, "random", F64),
    (1, 2100, 8, "full", torch.float32),
    (64, 20, 3, "ragged", torch.float32),
    (2, 300, 16, "random", F64),
    (1, 300, 64, "full", F64),
]


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("case", LARGE_CASES, ids=lambda c: f"B{c[0]}T{c[1]}N{c[2]}-{c[3]}-{str(c[4])[6:]}")
def test_large_batches_match_oracle(backend, case, granularity):
    B, T, N, mask_kind, dtype = case
    x = make_inputs(B, T, N, dtype, mask_kind=mask_kind, seed=B * T + N)
    agg = LOSS_AGGS[(B + N) % 2]
    check_against_oracle(x, backend, granularity, agg)
