"""Steerable PAMA (``preference=`` with the pama combiner; ``pama_ext/preference.py``).

Contract, for every backend and granularity: a uniform preference is plain PAMA exactly;
a preference is PAMA on the advantages scaled by ``p_max / p_i``. Properties (hypothesis):
the combined advantage conflicts with no objective (token: positive only where no
advantage is negative; batch: ``<d, v_j> >= (p_j / p_max) ||d||^2``); for two orthogonal
objectives the min-norm direction is ``p_1 v_1 + p_2 v_2``; the weight an objective gets
never falls when its preference rises. Plus errors, the PAMA optimizer and the fused
linear loss with a preference.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pama_ext
from pama_ext.preference import preference_scale, scale_advantages

from conftest import BACKENDS, GRANULARITIES, LOSS_AGGS, make_inputs, upcast


def _inputs(seed, per_seq=False, B=4, T=6, N=3, dtype=torch.float64):
    return make_inputs(B, T, N, dtype=dtype, seed=seed, mask_kind="ragged", per_sequence=per_seq)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("per_seq", [False, True])
def test_uniform_preference_is_plain_pama_exactly(backend, granularity, per_seq):
    x = _inputs(1, per_seq, dtype=torch.float32)
    for agg in LOSS_AGGS:
        kw = dict(granularity=granularity, loss_agg=agg, backend=backend)
        lp = x.logp.clone().requires_grad_(True)
        a, sa = pama_ext.pama_loss_and_stats(*x.args(lp), **kw)
        (ga,) = torch.autograd.grad(a, lp)
        lp2 = x.logp.clone().requires_grad_(True)
        b, sb = pama_ext.pama_loss_and_stats(*x.args(lp2), preference=[1 / 3] * 3, **kw)
        (gb,) = torch.autograd.grad(b, lp2)
        assert torch.equal(a, b) and torch.equal(ga, gb) and torch.equal(sa.weights, sb.weights)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("preference", [[0.6, 0.3, 0.1], "per_sample"])
def test_preference_is_pama_on_scaled_advantages(backend, granularity, preference):
    x = _inputs(2, per_seq=granularity != "token")
    if preference == "per_sample":
        preference = torch.softmax(torch.randn(x.logp.shape[0], 3, generator=torch.Generator().manual_seed(3)), -1)
    p = torch.as_tensor(preference, dtype=torch.float64)
    p = p / p.sum(-1, keepdim=True)
    scaled = scale_advantages(x.advantages, p)
    lp = x.logp.clone().requires_grad_(True)
    got = pama_ext.pama_loss(*x.args(lp), granularity=granularity, backend=backend, preference=preference)
    (g_got,) = torch.autograd.grad(got, lp)
    lp0 = x.logp.clone().requires_grad_(True)
    want = pama_ext.pama_loss(lp0, x.old_logp, scaled, x.mask, granularity=granularity, backend="torch")
    (g_want,) = torch.autograd.grad(want, lp0)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)


def test_scale_is_pmax_over_p():
    p = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]], dtype=torch.float64)
    torch.testing.assert_close(preference_scale(p), torch.tensor([[1.0, 2.0, 2.0], [8.0, 8.0, 1.0]], dtype=torch.float64))
    assert torch.equal(preference_scale(torch.full((4,), 0.25, dtype=torch.float64)), torch.ones(4, dtype=torch.float64))


prefs = st.lists(st.floats(0.02, 1.0), min_size=2, max_size=4)


@given(p=prefs, seed=st.integers(0, 10_000))
def test_token_combined_advantage_conflicts_with_no_objective(p, seed):
    n = len(p)
    g = torch.Generator().manual_seed(seed)
    adv = torch.randn(5, 7, n, generator=g, dtype=torch.float64)
    adv[adv.abs() < 0.2] = 0.0  # exact zeros abstain
    pt = torch.tensor(p, dtype=torch.float64) / sum(p)
    s = pama_ext.reference.token_advantage(scale_advantages(adv, pt))
    # positive only where no objective's advantage is negative, and then at most every
    # positive objective's scaled advantage; a preferred objective is taken at its own scale
    assert bool((s[(adv < 0).any(-1)] == 0).all())
    assert bool((s >= 0).all())
    pos = (s > 0)
    bound = torch.where(adv > 0, adv * preference_scale(pt), torch.full_like(adv, float("inf"))).amin(-1)
    torch.testing.assert_close(s[pos], bound[pos], rtol=1e-15, atol=0)


@given(p=prefs, seed=st.integers(0, 10_000), granularity=st.sampled_from(["batch", "sequence_gram"]))
def test_min_norm_direction_conflicts_with_no_objective(p, seed, granularity):
    n = len(p)
    x = make_inputs(6, 9, n, dtype=torch.float64, seed=seed, mask_kind="random")
    pt = torch.tensor(p, dtype=torch.float64) / sum(p)
    c = pama_ext.pama_weights(*x.args(), granularity=granularity, preference=pt, backend="torch")
    # the solve's vectors: I(A') per token (batch) or per-row mean (sequence_gram)
    scaled = scale_advantages(x.advantages, pt)
    u = torch.exp(x.logp - x.old_logp)
    ind = (u <= 1.2) & x.mask
    i_adv = torch.where(ind[..., None], scaled.clamp_min(0), torch.zeros(()))
    if granularity == "batch":
        vecs = i_adv.reshape(-1, n)
    else:
        m = x.mask.sum(1).clamp_min(1)
        vecs = i_adv.sum(1) / m[:, None]
    d = vecs @ c
    dd = float(d @ d)
    raw = vecs / preference_scale(pt)  # v_j = v'_j p_j / p_max
    for j in range(n):
        assert float(d @ raw[:, j]) >= (float(pt[j] / pt.max())) * dd - 1e-9 * (1 + dd)


@pytest.mark.parametrize("p1", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_orthogonal_objectives_follow_the_preference_ray(p1):
    # two objectives rewarding disjoint tokens with equal norms: d is proportional to
    # p_1 v_1 + p_2 v_2, i.e. the effective weights c'_i p_max / p_i are in ratio p_1 : p_2
    B, T = 2, 4
    adv = torch.zeros(B, T, 2, dtype=torch.float64)
    adv[0, :, 0] = 1.0
    adv[1, :, 1] = 1.0
    logp = torch.zeros(B, T, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    p = torch.tensor([p1, 1 - p1], dtype=torch.float64)
    c = pama_ext.pama_weights(logp, logp, adv, mask, granularity="batch", preference=p)
    eff = c * preference_scale(p)
    torch.testing.assert_close(eff[0] / eff[1], p[0] / p[1])


@given(seed=st.integers(0, 10_000), granularity=st.sampled_from(["batch", "sequence_gram", "batch_mean"]))
def test_weight_never_falls_when_its_preference_rises(seed, granularity):
    x = make_inputs(5, 8, 2, dtype=torch.float64, seed=seed, mask_kind="random")
    effective = []
    for p1 in (0.1, 0.3, 0.5, 0.7, 0.9):
        p = torch.tensor([p1, 1 - p1], dtype=torch.float64)
        c = pama_ext.pama_weights(*x.args(), granularity=granularity, preference=p)
        e = c * preference_scale(p)
        effective.append(float(e[0] / e.sum()))
    assert all(b >= a - 1e-9 for a, b in zip(effective, effective[1:])), effective


@pytest.mark.parametrize(
    "preference, error, match",
    [
        ([0.5, 0.5, 0.0], ValueError, r"must be > 0 for every objective with combiner 'pama' \(smallest entry 0\)"),
        ([0.5, 0.5], ValueError, r"`preference` must have shape \[N\] = \[3\] or \[B, N\] = \[4, 3\], got \[2\]"),
        ([0.5, float("nan"), 0.2], ValueError, r"non-finite"),
        ([0.5, -0.1, 0.6], ValueError, r"must be > 0"),
        (torch.ones(3, 3), ValueError, r"got \[3, 3\]"),
        (torch.ones(3, dtype=torch.complex64), TypeError, r"real numbers"),
    ],
)
def test_bad_preferences(preference, error, match):
    x = _inputs(4)
    with pytest.raises(error, match=match):
        pama_ext.pama_loss(*x.args(), preference=preference)


@pytest.mark.parametrize("granularity", ["token", "batch"])
def test_optimizer_preference_equals_the_functional(granularity):
    x = _inputs(5, dtype=torch.float32)
    w = torch.nn.Parameter(x.logp.clone())
    opt = pama_ext.PAMA(torch.optim.SGD([w], lr=0.1), 3, granularity=granularity, preference=[0.7, 0.2, 0.1])
    assert "preference=[0.7" in repr(opt)
    loss = opt.loss(w, x.old_logp, x.advantages, x.mask)
    want = pama_ext.pama_loss(x.logp, x.old_logp, x.advantages, x.mask, granularity=granularity,
                              preference=[0.7, 0.2, 0.1])
    torch.testing.assert_close(loss, want)
    # a per-call preference overrides the constructor's; accumulate takes the same one
    per_call = torch.tensor([0.2, 0.2, 0.6])
    opt.accumulate(x.logp, x.old_logp, x.advantages, x.mask, preference=per_call)
    loss2 = opt.loss(w, x.old_logp, x.advantages, x.mask, preference=per_call)
    want2 = pama_ext.pama_loss(x.logp, x.old_logp, x.advantages, x.mask, granularity=granularity, preference=per_call)
    torch.testing.assert_close(loss2, want2)
    with pytest.raises(ValueError, match="must be > 0"):
        pama_ext.PAMA(torch.optim.SGD([w], lr=0.1), 3, preference=[1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="combiner='linear' or 'pama', not 'mgda_ub'"):
        pama_ext.PAMA(torch.optim.SGD([w], lr=0.1), 3, combiner="mgda_ub", preference=[0.2, 0.3, 0.5])


def test_optimizer_checkpoint_keeps_the_preference():
    w = torch.nn.Parameter(torch.zeros(2, 3))
    a = pama_ext.PAMA(torch.optim.SGD([w], lr=0.1), 2, preference=[0.8, 0.2])
    b = pama_ext.PAMA(torch.optim.SGD([w], lr=0.1), 2)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.preference, torch.tensor([0.8, 0.2], dtype=torch.float64))


def test_fused_linear_loss_takes_the_preference():
    from pama_ext.fused_linear.reference import unfused_linear_pama_loss

    g = torch.Generator().manual_seed(6)
    B, T, H, V = 2, 5, 6, 17
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, H, generator=g, dtype=torch.float64)
    tg = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    old = torch.full((B, T), -2.8, dtype=torch.float64)
    adv = torch.randn(B, T, 2, generator=g, dtype=torch.float64)
    for granularity in ("token", "batch"):
        kw = dict(granularity=granularity, preference=[0.8, 0.2])
        got = pama_ext.fused_linear_pama_loss(h, W, tg, old, adv, mask, chunk_size=3, **kw)
        want = unfused_linear_pama_loss(h, W, tg, old, adv, mask, **kw)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got, h)[0], torch.autograd.grad(want, h)[0])
