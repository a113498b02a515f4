"""Batch statistics and gradient accumulation: one set of batch weights over all micro-batches
of a step equals the single-batch result."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_rel, leaf, make_inputs
from hypothesis import given
from hypothesis import strategies as st

import pama_ext
from pama_ext import reference
from pama_ext.statistics import BatchStatistics, batch_statistics, solve_gram

N_OBJ = 3


def split_rows(x, k):
    b = x.logp.shape[0]
    bounds = torch.linspace(0, b, k + 1).round().long().tolist()
    return [type(x)(*(t[lo:hi] for t in x)) for lo, hi in zip(bounds[:-1], bounds[1:])]


def explicit_statistics(x, clip_eps=0.2):
    """M, clipped, Q, G straight from reference._token_terms (float64 inputs)."""
    u, ind, _m, a_noon, valid, _ = reference._token_terms(*x, clip_eps, torch.float64)
    i_adv = torch.where(ind[..., None], a_noon, 0.0).reshape(-1, a_noon.shape[-1])
    return valid.sum(), (valid & ~ind).sum(), i_adv.sum(0), i_adv.T @ i_adv


def explicit_sequence_gram(x, clip_eps=0.2):
    """sum_b v_b v_b^T, v_b = row b's mean of I over its valid tokens (0 for an empty row)."""
    u, ind, _m, a_noon, valid, _ = reference._token_terms(*x, clip_eps, torch.float64)
    i_adv = torch.where(ind[..., None], a_noon, 0.0)
    v = i_adv.sum(1) / valid.sum(1).clamp_min(1).to(torch.float64)[:, None]
    return v.T @ v


@pytest.mark.parametrize("per_sequence", [False, True])
@pytest.mark.parametrize("mask_kind", ["ragged", "random", "full", "empty"])
def test_batch_statistics_against_reference(per_sequence, mask_kind):
    x = make_inputs(7, 11, N_OBJ, per_sequence=per_sequence, mask_kind=mask_kind, seed=1)
    st = batch_statistics(*x)
    m, clipped, q, g = explicit_statistics(x)
    assert float(st.masked_tokens) == float(m) and float(st.clipped_tokens) == float(clipped)
    assert_close_rel(st.sums, q, 1e-14, 0, "Q")
    assert_close_rel(st.gram, g, 1e-14, 0, "G")
    assert bool((batch_statistics(*x, granularity="batch_mean").gram == 0).all())
    sg = batch_statistics(*x, granularity="sequence_gram")
    assert torch.equal(sg.data[: 2 + N_OBJ], st.data[: 2 + N_OBJ])  # M, clipped, Q as for batch
    assert_close_rel(sg.gram, explicit_sequence_gram(x), 1e-14, 0, "sequence Gram")
    with pytest.raises(ValueError, match="unknown granularity"):
        batch_statistics(*x, granularity="token")


@pytest.mark.parametrize("granularity", ["batch", "batch_mean", "sequence_gram"])
@pytest.mark.parametrize("per_sequence", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_solve_equals_pama_weights(granularity, per_sequence, dtype):
    for seed in range(4):
        x = make_inputs(6, 9, N_OBJ, dtype=dtype, per_sequence=per_sequence, seed=seed)
        sol = batch_statistics(*x, granularity=granularity).solve(granularity)
        for backend in pama_ext.available_backends():
            w = pama_ext.pama_weights(*x, granularity=granularity, backend=backend)
            assert_close_rel(sol.weights, w.double(), 0, 1e-6 if dtype == torch.float32 else 1e-12, backend)


def test_non_finite_tokens_in_statistics():
    x = make_inputs(4, 6, 2, seed=2, mask_kind="full")
    adv = x.advantages.clone()
    adv[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="`advantages` has 1 non-finite"):
        batch_statistics(x.logp, x.old_logp, adv, x.mask)
    st = batch_statistics(x.logp, x.old_logp, adv, x.mask, nonfinite="mask")
    mask = x.mask.clone()
    mask[1, 2] = False
    ref = batch_statistics(x.logp, x.old_logp, x.advantages, mask)
    assert torch.equal(st.data, ref.data)


@pytest.mark.parametrize("granularity", ["batch", "batch_mean", "sequence_gram"])
@pytest.mark.parametrize("per_sequence", [False, True])
@pytest.mark.parametrize("k", [2, 3])
def test_functional_accumulation_equals_single_batch(granularity, per_sequence, k):
    x = make_inputs(6, 9, N_OBJ, per_sequence=per_sequence, mask_kind="random", seed=3)
    total = BatchStatistics.zeros(N_OBJ)
    for mb in split_rows(x, k):
        total += batch_statistics(*mb, granularity=granularity)
    whole = batch_statistics(*x, granularity=granularity)
    assert_close_rel(total.data, whole.data, 1e-14, 0, "statistics")
    w = total.solve(granularity).weights
    assert_close_rel(w, pama_ext.pama_weights(*x, granularity=granularity, backend="torch"), 0, 1e-12, "weights")
    # a + b, and all_reduce is a no-op without torch.distributed
    parts = [batch_statistics(*mb, granularity=granularity) for mb in split_rows(x, k)]
    summed = parts[0]
    for p in parts[1:]:
        summed = summed + p
    assert_close_rel(summed.all_reduce().data, whole.data, 1e-14, 0, "a + b")


@pytest.mark.parametrize("granularity", ["batch", "batch_mean", "sequence_gram"])
@pytest.mark.parametrize("per_sequence", [False, True])
def test_optimizer_accumulation_equals_single_batch(granularity, per_sequence):
    """Equal masked tokens per micro-batch (full masks): mean of micro-batch losses has the
    gradient of the whole batch, and the weights are the whole batch's."""
    k = 3
    x = make_inputs(6, 9, N_OBJ, per_sequence=per_sequence, mask_kind="full", seed=4)
    lp_whole = leaf(x.logp)
    opt_whole = pama_ext.PAMA(torch.optim.SGD([lp_whole], lr=1.0), N_OBJ, granularity=granularity)
    loss_whole = opt_whole.loss(lp_whole, *x[1:])
    loss_whole.backward()
    opt_whole.step()

    lp = leaf(x.logp)
    opt = pama_ext.PAMA(torch.optim.SGD([lp], lr=1.0), N_OBJ, granularity=granularity)
    rows = torch.arange(6).chunk(k)
    for r in rows:
        opt.accumulate(lp[r].detach(), x.old_logp[r], x.advantages[r], x.mask[r])
    w = opt.solve()
    assert_close_rel(w, opt_whole.last_weights.double(), 0, 1e-12, "solved weights")
    total = 0.0
    for r in rows:
        loss = opt.loss(lp[r], x.old_logp[r], x.advantages[r], x.mask[r]) / k
        loss.backward()
        total = total + loss.detach()
        assert torch.equal(opt.last_weights, w.to(opt.last_weights.dtype))
    assert_close_rel(total, loss_whole.detach(), 1e-12, 1e-15, "loss")
    assert_close_rel(lp.grad, lp_whole.grad, 1e-12, 1e-15, "grad")
    opt.step()
    assert torch.equal(lp, lp_whole) or float((lp - lp_whole).abs().max()) < 1e-14
    assert opt.accumulated_statistics is None  # released by step


@pytest.mark.parametrize("per_sequence", [False, True])
def test_optimizer_accumulation_sequence_gram_ragged(per_sequence):
    """sequence_gram over micro-batches of whole responses with unequal lengths (and an empty
    row): the accumulated weights are the whole batch's, and differ from batch's (the Gram
    counts responses, not tokens); the loss of each micro-batch uses them."""
    x = make_inputs(7, 11, N_OBJ, per_sequence=per_sequence, mask_kind="ragged", seed=14)
    lp = leaf(x.logp)
    opt = pama_ext.PAMA(torch.optim.SGD([lp], lr=1.0), N_OBJ, granularity="sequence_gram")
    rows = [torch.tensor([0, 1]), torch.tensor([2, 3, 4]), torch.tensor([5, 6])]
    for r in rows:
        opt.accumulate(lp[r].detach(), x.old_logp[r], x.advantages[r], x.mask[r])
    w = opt.solve()
    whole = pama_ext.pama_weights(*x, granularity="sequence_gram", backend="torch")
    assert_close_rel(w, whole, 0, 1e-12, "accumulated vs whole batch")
    for backend in pama_ext.available_backends():
        fused = pama_ext.pama_weights(*x, granularity="sequence_gram", backend=backend)
        assert_close_rel(w, fused.double(), 0, 1e-12, backend)
    batch_w = pama_ext.pama_weights(*x, granularity="batch", backend="torch")
    assert float((w - batch_w).abs().max()) > 1e-3  # the ragged lengths matter
    for r in rows:
        loss = opt.loss(lp[r], x.old_logp[r], x.advantages[r], x.mask[r])
        ref = pama_ext.weighted_noon_loss(x.logp[r], x.old_logp[r], x.advantages[r], x.mask[r], w)
        assert_close_rel(loss.detach(), ref, 1e-12, 1e-15, "loss with the step's weights")
        assert torch.equal(opt.last_weights, w.to(opt.last_weights.dtype))
        assert float(opt.last_stats.objective) == pytest.approx(float(w @ opt.accumulated_statistics.gram @ w))


def test_accumulation_lifecycle():
    x = make_inputs(4, 6, N_OBJ, seed=5)
    lp = leaf(x.logp)
    opt = pama_ext.PAMA(torch.optim.SGD([lp], lr=1.0), N_OBJ, granularity="batch")
    with pytest.raises(RuntimeError, match="no statistics accumulated"):
        opt.solve()
    # loss() solves on its own after accumulate()
    opt.accumulate(*x)
    opt.loss(lp, *x[1:])
    first = opt.last_weights.clone()
    assert opt.solve() is not None and torch.equal(opt.solve().to(first.dtype), first)
    # accumulate after a solve starts a new accumulation (e.g. a step skipped by GradScaler)
    y = make_inputs(4, 6, N_OBJ, seed=6)
    opt.accumulate(*y)
    assert torch.equal(opt.accumulated_statistics.data, batch_statistics(*y).data)
    opt.reset_accumulation()
    assert opt.accumulated_statistics is None
    # without accumulation, loss() is the fused op again
    opt.loss(lp, *x[1:])
    assert_close_rel(opt.last_weights, first, 0, 1e-12, "fused")


@pytest.mark.parametrize("combiner,granularity", [("pama", "token"), ("pama", "sequence"), ("linear", None)])
def test_accumulate_is_a_no_op_where_weights_are_local(combiner, granularity):
    x = make_inputs(4, 6, N_OBJ, seed=7)
    lp = leaf(x.logp)
    opt = pama_ext.PAMA(torch.optim.SGD([lp], lr=1.0), N_OBJ, combiner=combiner, granularity=granularity)
    ref = opt.loss(lp, *x[1:]).detach()
    opt.accumulate(*x)
    assert opt.accumulated_statistics is None and opt.solve() is None
    assert torch.equal(opt.loss(lp, *x[1:]).detach(), ref)


def test_solve_gram_matches_min_norm_weights():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 5, 8):
        v = torch.randn(n, 20, generator=g, dtype=torch.float64).abs()
        gram = v @ v.T
        sol = solve_gram(gram)
        assert_close_rel(sol.weights, pama_ext.min_norm_weights(gram), 0, 1e-12, f"N={n}")
        assert float(sol.kkt_residual) <= 1e-10 * float(gram.diagonal().max())
        assert float(sol.objective) == pytest.approx(float(sol.weights @ gram @ sol.weights))


@given(
    b=st.integers(1, 7),
    t=st.integers(1, 9),
    n=st.integers(1, 5),
    per_sequence=st.booleans(),
    mask_kind=st.sampled_from(["ragged", "random", "full", "empty"]),
    granularity=st.sampled_from(["batch", "batch_mean", "sequence_gram"]),
    cuts=st.lists(st.integers(0, 7), max_size=3),
    seed=st.integers(0, 1000),
)
def test_any_split_gives_the_whole_batch_weights(b, t, n, per_sequence, mask_kind, granularity, cuts, seed):
    x = make_inputs(b, t, n, per_sequence=per_sequence, mask_kind=mask_kind, seed=seed)
    bounds = sorted({0, b, *[min(c, b) for c in cuts]})
    total = BatchStatistics.zeros(n)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        total += batch_statistics(*(v[lo:hi] for v in x), granularity=granularity)
    w = total.solve(granularity).weights
    expect = pama_ext.pama_weights(*x, granularity=granularity, backend="torch")
    assert_close_rel(w, expect, 0, 1e-9, "weights")
    assert float(w.sum()) == pytest.approx(1.0) and bool((w >= 0).all())
