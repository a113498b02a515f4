"""The combiners of pama_ext.PAMA (pama, linear, mgda_ub, mgda) and weighted_noon_loss, against
float64 references written out plainly here."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import BACKENDS, LOSS_AGGS, assert_close_rel, leaf, make_inputs
from torch.library import opcheck

import pama_ext
from pama_ext import reference

N_OBJ = 3


# --------------------------------------------------------------------------- plain references
def ref_signed_ppo_loss(logp, old_logp, advantages, mask, weights, clip_eps=0.2, loss_agg="token_mean"):
    """MORLHF: standard PPO clip on s_t = sum_i w_i A'_i (no clamp), float64, autograd."""
    b, t = logp.shape
    adv = advantages if advantages.dim() == 3 else advantages[:, None, :].expand(b, t, -1)
    w = weights if weights.dim() == 1 else weights[:, None, :]
    s = (adv * w).sum(-1)
    ratio = torch.exp(logp - old_logp)
    per_tok = -torch.minimum(ratio * s, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * s)
    m = mask.to(torch.float64)
    if loss_agg == "token_mean":
        return (per_tok * m).sum() / m.sum().clamp_min(1)
    m_b = m.sum(1)
    rows = (per_tok * m).sum(1) / m_b.clamp_min(1)
    return rows[m_b > 0].mean() if bool((m_b > 0).any()) else rows.sum() * 0


def ref_noon_objective_loss(logp, old_logp, advantages, mask, i, clip_eps=0.2):
    """L^(i): Noon PPO of objective i alone (token_mean), float64, autograd."""
    b, t = logp.shape
    adv = advantages if advantages.dim() == 3 else advantages[:, None, :].expand(b, t, -1)
    a = adv[..., i].clamp_min(0)
    ratio = torch.exp(logp - old_logp)
    per_tok = -torch.minimum(ratio * a, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * a)
    m = mask.to(torch.float64)
    return (per_tok * m).sum() / m.sum().clamp_min(1)


def brute_min_norm(gram: torch.Tensor) -> torch.Tensor:
    """Exact min-norm point by enumerating supports (float64): an independent check of the solver."""
    import itertools

    n = gram.shape[0]
    best, best_c = float("inf"), None
    for k in range(1, n + 1):
        for sub in itertools.combinations(range(n), k):
            idx = list(sub)
            kkt = torch.zeros(k + 1, k + 1, dtype=torch.float64)
            kkt[:k, :k] = gram[idx][:, idx]
            kkt[:k, k] = 1
            kkt[k, :k] = 1
            rhs = torch.zeros(k + 1, dtype=torch.float64)
            rhs[k] = 1
            try:
                mu = torch.linalg.solve(kkt, rhs)[:k]
            except RuntimeError:
                continue
            if bool((mu >= -1e-12).all()):
                c = torch.zeros(n, dtype=torch.float64)
                c[idx] = mu.clamp_min(0) / mu.clamp_min(0).sum()
                val = float(c @ gram @ c)
                if val < best:
                    best, best_c = val, c
    return best_c


# --------------------------------------------------------------------------- a tiny policy
class TinyPolicy(torch.nn.Module):
    """Embedding -> tanh -> linear head; logp of given tokens, and the hidden states."""

    def __init__(self, vocab=13, hidden=8, dtype=torch.float64, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Parameter(0.5 * torch.randn(vocab, hidden, generator=g, dtype=dtype))
        self.w = torch.nn.Parameter(0.5 * torch.randn(hidden, hidden, generator=g, dtype=dtype))
        self.head = torch.nn.Parameter(0.5 * torch.randn(hidden, vocab, generator=g, dtype=dtype))

    def forward(self, tokens):
        h = torch.tanh(self.emb[tokens] @ self.w)  # [B, T, H]: the shared representation
        logp = torch.log_softmax(h @ self.head, dim=-1).gather(-1, tokens[..., None])[..., 0]
        return logp, h


def policy_batch(B=5, T=7, N=N_OBJ, seed=0, per_sequence=False, mask_kind="ragged"):
    g = torch.Generator().manual_seed(seed + 100)
    policy = TinyPolicy(seed=seed)
    tokens = torch.randint(0, 13, (B, T), generator=g)
    x = make_inputs(B, T, N, per_sequence=per_sequence, mask_kind=mask_kind, seed=seed)
    with torch.no_grad():
        logp, _ = policy(tokens)
    old_logp = logp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    return policy, tokens, old_logp, x.advantages, x.mask


# --------------------------------------------------------------------------- weighted_noon_loss
@pytest.mark.parametrize("granularity", ["batch", "batch_mean", "sequence", "sequence_gram"])
@pytest.mark.parametrize("per_sequence", [False, True])
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_weighted_noon_loss_with_pama_weights_is_pama_loss(granularity, per_sequence, loss_agg):
    for mask_kind in ("ragged", "random", "full"):
        x = make_inputs(6, 9, N_OBJ, per_sequence=per_sequence, mask_kind=mask_kind, seed=3)
        w = pama_ext.pama_weights(*x, granularity=granularity, backend="torch")
        lp1, lp2 = leaf(x.logp), leaf(x.logp)
        ref = reference.pama_loss(lp1, *x[1:], 0.2, granularity, loss_agg)
        ref.backward()
        loss = pama_ext.weighted_noon_loss(lp2, *x[1:], w, loss_agg=loss_agg)
        loss.backward()
        assert_close_rel(loss, ref, 1e-12, 1e-15, "loss")
        assert_close_rel(lp2.grad, lp1.grad, 1e-12, 1e-15, "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weighted_noon_loss_low_precision(dtype):
    x = make_inputs(6, 9, N_OBJ, dtype=dtype, seed=4)
    w = pama_ext.pama_weights(*x, granularity="batch")
    lp = leaf(x.logp)
    loss = pama_ext.weighted_noon_loss(lp, *x[1:], w)
    loss.backward()
    assert loss.dtype == torch.float32 and lp.grad.dtype == dtype
    x64 = [t.double() if t.is_floating_point() else t for t in x]
    lp64 = leaf(x64[0])
    ref = reference.pama_loss(lp64, *x64[1:], 0.2, "batch", "token_mean")
    ref.backward()
    assert_close_rel(loss, ref, 1e-5, 1e-7, "loss")
    assert_close_rel(lp.grad, lp64.grad, 2e-2 if dtype == torch.bfloat16 else 1e-5, 1e-7, "grad")


def test_weighted_noon_loss_is_linear_in_the_weights():
    x = make_inputs(5, 8, N_OBJ, seed=5)
    c = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    total = pama_ext.weighted_noon_loss(*x, c)
    parts = [pama_ext.weighted_noon_loss(*x, torch.eye(N_OBJ, dtype=torch.float64)[i]) for i in range(N_OBJ)]
    assert_close_rel(total, sum(ci * p for ci, p in zip(c, parts)), 1e-13, 0, "linearity")
    for i in range(N_OBJ):
        ref = ref_noon_objective_loss(*x, i)
        assert_close_rel(parts[i], ref, 1e-13, 1e-16, f"L^({i})")


def test_weighted_noon_loss_stats_and_edge_cases():
    x = make_inputs(4, 6, 2, seed=6)
    w = torch.tensor([1.0, 0.0], dtype=torch.float64)
    _, st = pama_ext.weighted_noon_loss_and_stats(*x, w)
    m = x.mask
    u = torch.exp(x.logp - x.old_logp)
    assert st[0] == m.sum() and st[1] == (m & (u > 1.2)).sum()
    assert st[2] == (m & (x.advantages[..., 0] <= 0)).sum()
    # empty mask: loss 0, zero gradient
    lp = leaf(x.logp)
    loss = pama_ext.weighted_noon_loss(lp, x.old_logp, x.advantages, torch.zeros_like(m), w)
    loss.backward()
    assert float(loss.detach()) == 0.0 and bool((lp.grad == 0).all())
    # non-finite: raise by default, dropped with nonfinite="mask"
    bad = x.logp.clone()
    bad[m.nonzero()[0].tolist()[0], m.nonzero()[0].tolist()[1]] = float("nan")
    with pytest.raises(ValueError, match="`logp` has 1 non-finite"):
        pama_ext.weighted_noon_loss(bad, *x[1:], w)
    lp = leaf(bad)
    loss = pama_ext.weighted_noon_loss(lp, *x[1:], w, nonfinite="mask")
    loss.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(lp.grad).all())
    # weights shape
    with pytest.raises(ValueError, match=r"`weights` must have shape \[N\]"):
        pama_ext.weighted_noon_loss(*x, torch.ones(3))


def test_noon_fixed_weights_op_opcheck():
    x = make_inputs(3, 5, 2, seed=7)
    utils = [None, ("test_schema", "test_autograd_registration", "test_faketensor")]
    for w, u in zip((torch.tensor([0.3, 0.7], dtype=torch.float64), torch.rand(3, 2, dtype=torch.float64)), utils):
        args = (leaf(x.logp), x.old_logp, x.advantages, x.mask, w, torch.full((3,), 0.1, dtype=torch.float64), 0.2)
        opcheck(torch.ops.pama_ext.noon_loss_fixed_weights.default, args, **({} if u is None else {"test_utils": u}))


# --------------------------------------------------------------------------- linear (MORLHF)
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("per_sequence", [False, True])
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_linear_signed_ppo_against_reference(per_sample, per_sequence, loss_agg):
    x = make_inputs(6, 8, N_OBJ, per_sequence=per_sequence, seed=9, noise=0.4)
    g = torch.Generator().manual_seed(1)
    w = torch.rand(6, N_OBJ, generator=g, dtype=torch.float64) if per_sample else torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64)
    lp1, lp2 = leaf(x.logp), leaf(x.logp)
    ref = ref_signed_ppo_loss(lp1, *x[1:], w, loss_agg=loss_agg)
    ref.backward()
    loss = pama_ext.weighted_noon_loss(lp2, *x[1:], w, signed=True, loss_agg=loss_agg)
    loss.backward()
    assert_close_rel(loss, ref, 1e-12, 1e-15, "loss")
    assert_close_rel(lp2.grad, lp1.grad, 1e-12, 1e-15, "grad")
    # through PAMA (constructor preference, or per-call [B, N] preferences)
    opt = pama_ext.PAMA(torch.optim.SGD([lp2], lr=0.1), N_OBJ, combiner="linear", loss_agg=loss_agg,
                        preference=None if per_sample else w)
    kw = {"preference": w} if per_sample else {}
    loss2 = opt.loss(leaf(x.logp), *x[1:], **kw)
    assert_close_rel(loss2, ref, 1e-12, 1e-15, "PAMA linear")
    assert opt.last_weights.shape == w.shape and torch.equal(opt.last_weights, w)


def test_linear_default_preference_is_uniform_and_signed():
    x = make_inputs(4, 6, 2, seed=10)
    opt = pama_ext.PAMA(torch.optim.SGD([leaf(x.logp)], lr=0.1), 2, combiner="linear")
    loss = opt.loss(leaf(x.logp), *x[1:])
    ref = ref_signed_ppo_loss(x.logp, *x[1:], torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert_close_rel(loss, ref, 1e-12, 1e-15, "uniform")
    assert torch.equal(opt.last_weights, torch.tensor([0.5, 0.5], dtype=torch.float64))
    # negative advantages matter for linear (no Noon clamp): flipping them changes the loss
    loss_neg = opt.loss(leaf(x.logp), x.old_logp, -x.advantages.abs(), x.mask)
    assert float(loss_neg.detach()) > 0


def test_linear_overflowing_ratio_gives_no_nan():
    x = make_inputs(3, 4, 2, seed=11, mask_kind="full")
    lp = x.logp.clone()
    lp[0, 0] = x.old_logp[0, 0] + 1000.0  # u = inf
    adv = x.advantages.abs()  # positive: the clipped branch
    lp = leaf(lp)
    loss = pama_ext.weighted_noon_loss(lp, x.old_logp, adv, x.mask, torch.tensor([0.5, 0.5], dtype=torch.float64), signed=True)
    loss.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(lp.grad).all()) and float(lp.grad[0, 0]) == 0.0


# --------------------------------------------------------------------------- pama through PAMA
@pytest.mark.parametrize("zeros", [False, True], ids=["nozeros", "zeros"])
@pytest.mark.parametrize("granularity", ["batch", "token", "sequence", "batch_mean", "sequence_gram"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_pama_combiner_is_pama_loss(granularity, backend, zeros):
    if zeros and granularity != "token":
        pytest.skip("exact zeros change only `token`")
    x = make_inputs(6, 9, N_OBJ, seed=12)
    if zeros:  # exact zeros abstain under `token`: a zero column, +-0.0 entries, all-zero tokens
        g = torch.Generator().manual_seed(3)
        adv = x.advantages.abs()
        adv = torch.where(torch.rand(adv.shape, generator=g) < 0.3, -0.0, adv)
        adv[..., 1] = 0.0
        adv[0, :3] = 0.0
        x = x._replace(advantages=adv)
    lp1, lp2 = leaf(x.logp), leaf(x.logp)
    opt = pama_ext.PAMA(torch.optim.SGD([lp1], lr=0.1), N_OBJ, granularity=granularity, backend=backend)
    loss = opt.loss(lp1, *x[1:])
    loss.backward()
    ref, info = pama_ext.pama_loss_and_stats(lp2, *x[1:], granularity=granularity, backend="torch")
    ref.backward()
    assert_close_rel(loss, ref, 1e-12, 1e-15, "loss")
    assert_close_rel(lp1.grad, lp2.grad, 1e-12, 1e-15, "grad")
    w_ref = pama_ext.pama_weights(*x, granularity=granularity, backend="torch")
    assert opt.last_weights.shape == w_ref.shape
    assert_close_rel(opt.last_weights, w_ref, 0, 1e-12, "weights")
    st = opt.last_stats
    m = info.stats[0]
    assert torch.equal(st.masked_tokens, m)
    assert float(st.clip_fraction) == pytest.approx(float(info.stats[1] / m))
    assert float(st.kkt_residual) == pytest.approx(float(info.stats[6]), abs=1e-15)
    # zero-advantage fraction, spelled out
    a = x.advantages.clamp_min(0)
    if granularity == "token":  # exactly-zero advantages abstain
        A = x.advantages
        s = torch.where(A > 0, A, math.inf).amin(-1)
        s = torch.where(~(A < 0).any(-1) & (A > 0).any(-1), s, 0.0)
        if zeros:
            assert bool((x.mask & (s > 0) & (A == 0).any(-1)).any())  # the case is not vacuous
    elif granularity == "sequence":
        s = (a * w_ref[:, None, :]).sum(-1)
    else:
        s = a @ w_ref
    assert float(st.zero_advantage_fraction) == pytest.approx(float((x.mask & (s == 0)).sum() / m))
    for v in st:
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype == torch.float64


# --------------------------------------------------------------------------- mgda_ub, mgda
def _per_objective_grads(policy, tokens, old_logp, adv, mask, wrt):
    grads = []
    for i in range(adv.shape[-1]):
        logp, h = policy(tokens)
        li = ref_noon_objective_loss(logp, old_logp, adv, mask, i)
        target = [h] if wrt == "shared" else list(policy.parameters())
        gs = torch.autograd.grad(li, target, allow_unused=True)
        grads.append(torch.cat([(torch.zeros_like(t) if g is None else g).reshape(-1) for g, t in zip(gs, target)]))
    return torch.stack(grads)


@pytest.mark.parametrize("combiner", ["mgda_ub", "mgda"])
@pytest.mark.parametrize("per_sequence", [False, True])
def test_mgda_combiners_against_explicit_gradients(combiner, per_sequence):
    policy, tokens, old_logp, adv, mask = policy_batch(seed=13, per_sequence=per_sequence)
    f = _per_objective_grads(policy, tokens, old_logp, adv, mask, "shared" if combiner == "mgda_ub" else "params")
    gram = f @ f.T
    c_ref = brute_min_norm(gram)
    opt = pama_ext.PAMA(torch.optim.SGD(policy.parameters(), lr=0.1), N_OBJ, combiner=combiner)
    logp, h = policy(tokens)
    loss = opt.loss(logp, old_logp, adv, mask, **({"shared": h} if combiner == "mgda_ub" else {}))
    for p in policy.parameters():  # the per-objective passes leave .grad alone
        assert p.grad is None
    c = opt.last_weights
    # the min-norm value is unique (the weights may not be): compare c^T G c and the KKT gap
    assert float(c @ gram @ c) == pytest.approx(float(c_ref @ gram @ c_ref), rel=1e-6, abs=1e-14)
    g_c = gram @ c
    assert float(c @ g_c - g_c.min()) <= 1e-9 * float(gram.diagonal().max())
    assert float(opt.last_stats.objective) == pytest.approx(float(c @ gram @ c), rel=1e-9, abs=1e-16)
    # the loss is sum_i c_i L^(i) and its backward is sum_i c_i grad L^(i)
    loss.backward()
    ref = sum(c[i] * ref_noon_objective_loss(policy(tokens)[0], old_logp, adv, mask, i) for i in range(N_OBJ))
    assert_close_rel(loss, ref, 1e-12, 1e-15, "loss")
    full = _per_objective_grads(policy, tokens, old_logp, adv, mask, "params")
    expect = (c[:, None] * full).sum(0)
    got = torch.cat([p.grad.reshape(-1) for p in policy.parameters()])
    assert_close_rel(got, expect, 1e-11, 1e-15, "sum_i c_i grad L^(i)")


def test_mgda_ub_requires_shared():
    policy, tokens, old_logp, adv, mask = policy_batch(seed=14)
    opt = pama_ext.PAMA(torch.optim.SGD(policy.parameters(), lr=0.1), N_OBJ, combiner="mgda_ub")
    logp, h = policy(tokens)
    with pytest.raises(ValueError, match="needs `shared=`"):
        opt.loss(logp, old_logp, adv, mask)
    with pytest.raises(ValueError, match="requires grad"):
        opt.loss(logp, old_logp, adv, mask, shared=h.detach())
    opt2 = pama_ext.PAMA(torch.optim.SGD(policy.parameters(), lr=0.1), N_OBJ)
    with pytest.raises(ValueError, match="`shared` is for combiner='mgda_ub'"):
        opt2.loss(logp, old_logp, adv, mask, shared=h)


def test_all_combiners_one_loop():
    """The same training loop runs every combiner (the uniform usage of PAMA.loss)."""
    for combiner in pama_ext.COMBINERS:
        policy, tokens, old_logp, adv, mask = policy_batch(seed=15)
        gran = {"granularity": "batch"} if combiner == "pama" else {}  # one weight vector [N] for every combiner
        opt = pama_ext.PAMA(torch.optim.AdamW(policy.parameters(), lr=1e-2), N_OBJ, combiner=combiner, **gran)
        before = [p.detach().clone() for p in policy.parameters()]
        for _ in range(2):
            with torch.no_grad():
                opt.accumulate(policy(tokens)[0], old_logp, adv, mask)
            logp, h = policy(tokens)
            loss = opt.loss(logp, old_logp, adv, mask, shared=h if combiner == "mgda_ub" else None)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert opt.step_count == 2
        assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters())), combiner
        w = opt.last_weights
        assert w.shape == (N_OBJ,) and float(w.sum()) == pytest.approx(1.0) and bool((w >= 0).all())
