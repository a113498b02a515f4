"""``fused_linear_pama_loss`` against the unfused float64 formulation.

The oracle is ``pama_ext.fused_linear.reference.unfused_linear_pama_loss``: the whole
B x T x V logits, ``log_softmax``, ``gather``, ``pama_loss`` (+ the k3 KL term), autograd.
Inputs are made in float64 (or rounded to the low-precision dtype and upcast for the
oracle), and the fused op must give the same value and the same three gradients (hidden,
weight, bias) for every granularity and aggregation, both structures (one pass for
``token``, two otherwise), ragged masks, chunk sizes that do not divide B*T, odd V, tied
weights, bf16, temperature, the KL term; plus gradcheck, the logp variant, the generic
``fused_linear_logp_loss``, non-finite hidden states, errors and torch.compile.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pama_ext
from pama_ext.fused_linear import default_chunk_size, fused_linear_logp_loss
from pama_ext.fused_linear.reference import unfused_linear_pama_loss, unfused_logp

from conftest import GRANULARITIES, LOSS_AGGS, make_mask

F = pama_ext.fused_linear_pama_loss


def make_case(B=3, T=7, H=12, V=53, N=3, *, seed=0, dtype=torch.float64, mask_kind="ragged", per_seq=False,
              bias=True, kl=False):
    """Float64 leaves (rounded through ``dtype``), targets, and PPO-like old/ref logps."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(torch.float64)

    h = rnd(B, T, H)
    w = rnd(V, H, scale=0.5)
    b = rnd(V, scale=0.3) if bias else None
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = make_mask(B, T, mask_kind, g)
    with torch.no_grad():
        lp = unfused_logp(h, w, targets, mask, b)
    # ratios straddle 1 +- 0.2 so that both sides of the clip are exercised
    old = (lp + torch.empty(B, T, dtype=torch.float64).uniform_(-0.4, 0.4, generator=g)).to(dtype).to(torch.float64)
    adv = rnd(B, N) if per_seq else rnd(B, T, N)
    ref = (lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).to(dtype).to(torch.float64) if kl else None
    return dict(hidden=h, weight=w, bias=b, targets=targets, old_logp=old, advantages=adv, mask=mask, ref_logp=ref)


def leaves(case, dtype=torch.float64):
    out = dict(case)
    for k in ("hidden", "weight", "bias"):
        if out[k] is not None:
            out[k] = out[k].to(dtype, copy=True).requires_grad_(True)
    for k in ("old_logp", "advantages", "ref_logp"):
        if out[k] is not None:
            out[k] = out[k].to(dtype)
    return out


def run(fn, case, **kw):
    args = (case["hidden"], case["weight"], case["targets"], case["old_logp"], case["advantages"], case["mask"])
    loss = fn(*args, bias=case["bias"], ref_logp=case["ref_logp"], **kw)
    wrt = [case[k] for k in ("hidden", "weight", "bias") if case[k] is not None]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True) if loss.requires_grad else [None] * len(wrt)
    grads = [torch.zeros_like(x) if gr is None else gr for x, gr in zip(wrt, grads)]
    return loss.detach(), grads


def assert_match(case, fused_kw, ref_kw=None, *, dtype=torch.float64, rtol=1e-10, atol=1e-12):
    ref_kw = fused_kw if ref_kw is None else ref_kw
    ref_kw = {k: v for k, v in ref_kw.items() if k != "chunk_size"}
    l0, g0 = run(unfused_linear_pama_loss, leaves(case), **ref_kw)
    l1, g1 = run(F, leaves(case, dtype), **fused_kw)
    torch.testing.assert_close(l1.to(torch.float64), l0, rtol=rtol, atol=atol)
    for name, a, b in zip(("hidden", "weight", "bias"), g1, g0):
        torch.testing.assert_close(a.to(torch.float64), b, rtol=rtol, atol=atol, msg=lambda m: f"d/d{name}: {m}")


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("per_seq", [False, True], ids=["adv_BTN", "adv_BN"])
def test_every_granularity_and_aggregation(granularity, loss_agg, per_seq):
    case = make_case(per_seq=per_seq, seed=hash((granularity, loss_agg, per_seq)) % 1000)
    assert_match(case, dict(granularity=granularity, loss_agg=loss_agg, chunk_size=5))


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 20, 21, 1000, None])
@pytest.mark.parametrize("granularity", ["token", "batch"])
def test_chunk_sizes_that_do_not_divide(chunk_size, granularity):
    # B*T = 21: 4, 5 and 20 leave a short last chunk; 1000 is one chunk
    case = make_case(B=3, T=7, seed=3)
    assert_match(case, dict(granularity=granularity, chunk_size=chunk_size))


@pytest.mark.parametrize("V", [1, 2, 97, 1031])
@pytest.mark.parametrize("mask_kind", ["full", "ragged", "random", "empty"])
def test_odd_vocabularies_and_masks(V, mask_kind):
    case = make_case(B=4, T=5, H=6, V=V, mask_kind=mask_kind, seed=V)
    assert_match(case, dict(chunk_size=3))
    assert_match(case, dict(granularity="sequence_gram", chunk_size=3))


def test_empty_mask_is_zero_loss_and_zero_gradients():
    case = make_case(mask_kind="empty")
    l1, g1 = run(F, leaves(case), chunk_size=4)
    assert float(l1) == 0.0
    assert all(float(g.abs().max()) == 0.0 for g in g1)


@pytest.mark.parametrize("granularity", ["token", "sequence", "batch"])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_kl_term_and_temperature(granularity, temperature):
    case = make_case(kl=True, seed=11)
    assert_match(case, dict(granularity=granularity, kl_coef=0.05, temperature=temperature, chunk_size=6))


def test_kl_term_is_the_masked_mean_of_k3():
    case = make_case(kl=True, seed=5, mask_kind="random")
    lc = leaves(case)
    with_kl, _ = run(F, lc, kl_coef=0.3)
    without, _ = run(F, lc)
    logp = unfused_logp(case["hidden"], case["weight"], case["targets"], case["mask"], case["bias"])
    d = case["ref_logp"] - logp
    k3 = (torch.exp(d) - d - 1)[case["mask"]].mean()
    torch.testing.assert_close(with_kl - without, 0.3 * k3)


def test_tied_weights_sum_both_gradients():
    # the LM head is the embedding: hidden states are computed from it, so dW has two paths
    V, H, B, T = 41, 8, 2, 6
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(V, H, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=g)
    proj = torch.randn(H, H, generator=g, dtype=torch.float64) * 0.3
    targets = torch.roll(ids, -1, dims=1)
    mask = torch.ones(B, T, dtype=torch.bool)
    old = torch.full((B, T), -math.log(V), dtype=torch.float64)
    adv = torch.randn(B, T, 2, generator=g, dtype=torch.float64)

    def grads(fn):
        w = emb.clone().requires_grad_(True)
        hidden = torch.tanh(w[ids] @ proj)
        loss = fn(hidden, w, targets, old, adv, mask, granularity="batch", **({"chunk_size": 5} if fn is F else {}))
        return torch.autograd.grad(loss, w)[0]

    torch.testing.assert_close(grads(F), grads(unfused_linear_pama_loss), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("granularity", ["token", "batch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_reduced_precision_against_float64(granularity, dtype):
    # inputs rounded to dtype, oracle in float64 on the same values; the fused op keeps the
    # log-softmax in float32, so the error is the low-precision matmuls'
    case = make_case(B=4, T=9, H=32, V=211, dtype=dtype, seed=7, kl=True)
    tol = {torch.float32: (1e-4, 1e-6), torch.bfloat16: (5e-2, 2e-3), torch.float16: (1e-2, 5e-4)}[dtype]
    l1, g1 = run(F, leaves(case, dtype), granularity=granularity, kl_coef=0.02, chunk_size=8)
    l0, g0 = run(unfused_linear_pama_loss, leaves(case), granularity=granularity, kl_coef=0.02)
    assert l1.dtype == torch.float32
    torch.testing.assert_close(l1.double(), l0, rtol=tol[0], atol=tol[1])
    for a, b in zip(g1, g0):
        assert a.dtype == dtype
        scale = float(b.abs().max()) + 1e-30
        assert float((a.double() - b).abs().max()) <= tol[0] * scale + tol[1], (dtype, granularity)


@pytest.mark.parametrize("granularity", ["token", "sequence", "batch"])
def test_gradcheck(granularity):
    case = make_case(B=2, T=3, H=4, V=7, seed=13, kl=True)
    # old_logp far from logp: every ratio well inside or outside the clip, so the loss is
    # smooth at the point (the indicator does not flip under gradcheck's perturbation)
    lc = leaves(case)
    lc["old_logp"] = lc["old_logp"].detach() - 0.05

    def f(h, w, b):
        return F(h, w, lc["targets"], lc["old_logp"], lc["advantages"], lc["mask"], bias=b, ref_logp=lc["ref_logp"],
                 kl_coef=0.1, granularity=granularity, chunk_size=2)

    assert torch.autograd.gradcheck(f, (lc["hidden"], lc["weight"], lc["bias"]), eps=1e-6, atol=1e-7)


@given(
    B=st.integers(1, 4), T=st.integers(1, 6), H=st.integers(1, 5), V=st.integers(1, 40), N=st.integers(1, 4),
    chunk=st.integers(1, 30), granularity=st.sampled_from(GRANULARITIES), loss_agg=st.sampled_from(LOSS_AGGS),
    seed=st.integers(0, 10_000),
)
def test_property_any_shape_matches_unfused(B, T, H, V, N, chunk, granularity, loss_agg, seed):
    case = make_case(B=B, T=T, H=H, V=V, N=N, seed=seed, mask_kind="random")
    assert_match(case, dict(granularity=granularity, loss_agg=loss_agg, chunk_size=chunk), rtol=1e-9, atol=1e-11)


def test_logp_variant_returns_the_log_probabilities_detached():
    case = make_case(seed=4)
    lc = leaves(case)
    loss, logp = pama_ext.fused_linear_pama_loss_and_logp(
        lc["hidden"], lc["weight"], lc["targets"], lc["old_logp"], lc["advantages"], lc["mask"], bias=lc["bias"],
        chunk_size=4)
    assert not logp.requires_grad and logp.shape == lc["targets"].shape
    expected = unfused_logp(case["hidden"], case["weight"], case["targets"], case["mask"], case["bias"])
    torch.testing.assert_close(logp[case["mask"]], expected[case["mask"]])
    torch.testing.assert_close(loss, F(lc["hidden"], lc["weight"], lc["targets"], lc["old_logp"], lc["advantages"],
                                       lc["mask"], bias=lc["bias"]))


def test_weight_without_grad_and_no_bias():
    case = make_case(bias=False, seed=8)
    lc = leaves(case)
    lc["weight"] = lc["weight"].detach()
    loss = F(lc["hidden"], lc["weight"], lc["targets"], lc["old_logp"], lc["advantages"], lc["mask"], chunk_size=3)
    (gh,) = torch.autograd.grad(loss, lc["hidden"])
    # direct comparison with the oracle
    h0 = case["hidden"].clone().requires_grad_(True)
    l0 = unfused_linear_pama_loss(h0, case["weight"], case["targets"], case["old_logp"], case["advantages"], case["mask"])
    torch.testing.assert_close(gh, torch.autograd.grad(l0, h0)[0], rtol=1e-10, atol=1e-12)


def test_generic_logp_loss_matches_autograd_of_the_same_function():
    case = make_case(seed=9)
    lc = leaves(case)
    w_tok = torch.linspace(-1, 1, case["targets"].numel(), dtype=torch.float64).view_as(case["targets"])

    def loss_fn(logp):
        return ((logp * w_tok).exp() * case["mask"]).sum() / 7

    loss, logp = fused_linear_logp_loss(lc["hidden"], lc["weight"], lc["targets"], lc["mask"], loss_fn,
                                        bias=lc["bias"], chunk_size=6)
    g1 = torch.autograd.grad(loss, (lc["hidden"], lc["weight"], lc["bias"]))
    l0c = leaves(case)
    l0 = loss_fn(unfused_logp(l0c["hidden"], l0c["weight"], case["targets"], case["mask"], l0c["bias"]))
    g0 = torch.autograd.grad(l0, (l0c["hidden"], l0c["weight"], l0c["bias"]))
    torch.testing.assert_close(loss, l0.detach())
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_backward_scales_by_the_incoming_gradient():
    case = make_case(seed=10)
    lc = leaves(case)
    args = (lc["hidden"], lc["weight"], lc["targets"], lc["old_logp"], lc["advantages"], lc["mask"])
    g1 = torch.autograd.grad(F(*args, bias=lc["bias"]) * 3.0, lc["hidden"])[0]
    g0 = torch.autograd.grad(F(*args, bias=lc["bias"]), lc["hidden"])[0]
    torch.testing.assert_close(g1, 3.0 * g0)


# ------------------------------------------------------------------ non-finite hidden states
def _with_inf_hidden(where: str):
    case = make_case(B=3, T=5, seed=12, mask_kind="full" if where == "masked" else "ragged")
    pos = (1, 2) if where == "masked" else tuple(int(i) for i in (~case["mask"]).nonzero()[0])
    case["hidden"] = case["hidden"].clone()
    case["hidden"][pos] = float("inf")
    return case, pos


@pytest.mark.parametrize("granularity", ["token", "batch"])
def test_nonfinite_hidden_raises_by_default(granularity):
    case, _ = _with_inf_hidden("masked")
    lc = leaves(case)
    with pytest.raises(ValueError, match="computed from `hidden`.*non-finite at 1 masked"):
        F(lc["hidden"], lc["weight"], lc["targets"], lc["old_logp"], lc["advantages"], lc["mask"],
          granularity=granularity)


@pytest.mark.parametrize("granularity", ["token", "batch"])
@pytest.mark.parametrize("where", ["masked", "unmasked"])
def test_nonfinite_hidden_is_dropped_under_mask(granularity, where):
    # the token leaves the loss as if masked out, and its row contributes no gradient: every
    # gradient stays finite (unfused, log_softmax's backward would spread 0 * NaN over dW)
    case, pos = _with_inf_hidden(where)
    lc = leaves(case)
    loss, grads = run(F, lc, granularity=granularity, nonfinite="mask", chunk_size=4)
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    assert float(grads[0][pos].abs().max()) == 0.0
    clean = dict(case)
    clean["mask"] = case["mask"].clone()
    clean["mask"][pos] = False
    clean["hidden"] = case["hidden"].clone()
    clean["hidden"][pos] = 0.0
    l0, g0 = run(unfused_linear_pama_loss, leaves(clean), granularity=granularity, nonfinite="mask")
    torch.testing.assert_close(loss, l0)
    g0[0][pos] = 0.0
    for a, b in zip(grads, g0):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ errors
def _args(case):
    lc = leaves(case)
    return lc, (lc["hidden"], lc["weight"], lc["targets"], lc["old_logp"], lc["advantages"], lc["mask"])


def test_target_ids_out_of_range_at_masked_positions_raise():
    case = make_case(mask_kind="full")
    case["targets"] = case["targets"].clone()
    case["targets"][1, 3] = 53
    lc, args = _args(case)
    with pytest.raises(ValueError, match=r"`targets` \[3, 7\] has 1 id\(s\) outside \[0, V\) = \[0, 53\).*\[1, 3\]: 53"):
        F(*args)


def test_ignored_ids_at_masked_out_positions_are_fine():
    case = make_case(mask_kind="ragged")
    t = case["targets"].clone()
    t[~case["mask"]] = -100  # Hugging Face's ignore index
    case2 = dict(case, targets=t)
    l1, _ = run(F, leaves(case2))
    l0, _ = run(F, leaves(case))
    torch.testing.assert_close(l1, l0)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: a.update(hidden=a["hidden"][0]), ValueError, r"`hidden` must have shape \[B, T, H\], got \[7, 12\]"),
        (lambda a: a.update(hidden=a["hidden"].detach().long()), TypeError, r"`hidden` must be floating"),
        (lambda a: a.update(weight=a["weight"][:, :5]), ValueError, r"`weight` must have shape \[V, H\] with H = 12"),
        (lambda a: a.update(targets=a["targets"][:, :4]), ValueError, r"`targets` must have shape \[B, T\] = \[3, 7\]"),
        (lambda a: a.update(targets=a["targets"].double()), TypeError, r"`targets` must hold integer token ids"),
        (lambda a: a.update(bias=a["bias"][:9]), ValueError, r"`bias` must have shape \[V\] = \[53\]"),
        (lambda a: a.update(old_logp=a["old_logp"][:2]), ValueError, r"`old_logp` must have shape \[B, T\]"),
        (lambda a: a.update(advantages=a["advantages"][:, :3]), ValueError, r"`advantages` must have shape \[B, T, N\]"),
        (lambda a: a.update(mask=a["mask"].T), ValueError, r"`mask` must have shape \[B, T\]"),
    ],
)
def test_bad_inputs_name_the_argument_and_shape(change, error, match):
    lc = leaves(make_case())
    change(lc)
    with pytest.raises(error, match=match):
        F(lc["hidden"], lc["weight"], lc["targets"], lc["old_logp"], lc["advantages"], lc["mask"], bias=lc["bias"])


@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(kl_coef=0.1), ValueError, r"`kl_coef` = 0.1 > 0 needs `ref_logp`"),
        (dict(kl_coef=-1.0), ValueError, r"`kl_coef` must be a finite float >= 0"),
        (dict(temperature=0.0), ValueError, r"`temperature` must be a finite float > 0"),
        (dict(chunk_size=0), ValueError, r"`chunk_size` must be None or an int >= 1"),
        (dict(chunk_size=2.5), TypeError, r"`chunk_size` must be None or an int"),
        (dict(granularity="tokens"), ValueError, r"unknown granularity 'tokens'"),
        (dict(loss_agg="sum"), ValueError, r"unknown loss_agg 'sum'"),
        (dict(clip=0.2), TypeError, r"unexpected keyword argument\(s\) 'clip'"),
        (dict(clip_eps=-0.2), ValueError, r"`clip_eps` must be a finite float > 0"),
    ],
)
def test_bad_options(kw, error, match):
    lc, args = _args(make_case())
    with pytest.raises(error, match=match):
        F(*args, **kw)


def test_ref_logp_nonfinite_raises_names_it():
    case = make_case(kl=True, mask_kind="full")
    case["ref_logp"] = case["ref_logp"].clone()
    case["ref_logp"][0, 0] = float("nan")
    lc, args = _args(case)
    with pytest.raises(ValueError, match="`ref_logp` has 1 non-finite"):
        F(*args, ref_logp=lc["ref_logp"], kl_coef=0.1)


def test_default_chunk_size():
    # the chunk's logits hold about as many numbers as the hidden states, a power of two of rows
    assert default_chunk_size(8192, 512, 32768) == 512  # 128 by the rule; at least 512 rows
    assert default_chunk_size(16384, 4096, 128256) == 1024
    assert default_chunk_size(65536, 4096, 32000) == 16384
    assert default_chunk_size(10, 4, 1000) == 10  # all rows when fewer than 512


@pytest.mark.parametrize("granularity", ["token", "batch"])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(granularity, compiler):
    # the unfused path compiles whole; so does the fused one: the chunk loops and their host
    # syncs are inside the ops (one pass for token, pass 1 / pass 2 around pama_loss otherwise)
    case = make_case(seed=21, kl=True)
    lc = leaves(case)

    def f(h, w, b):
        return F(h, w, lc["targets"], lc["old_logp"], lc["advantages"], lc["mask"], bias=b, ref_logp=lc["ref_logp"],
                 kl_coef=0.1, granularity=granularity, chunk_size=4)

    torch._dynamo.reset()
    cf = torch.compile(f, backend=compiler, fullgraph=True)
    l1 = cf(lc["hidden"], lc["weight"], lc["bias"])
    g1 = torch.autograd.grad(l1, (lc["hidden"], lc["weight"], lc["bias"]))
    l0, g0 = run(unfused_linear_pama_loss, leaves(case), granularity=granularity, kl_coef=0.1)
    torch.testing.assert_close(l1, l0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b)


def _op_args(case, need=(True, True, True)):
    lc = leaves(case)
    tg = lc["targets"].to(torch.int64)
    return lc, tg


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_logp_ops(bias):
    from torch.library import opcheck

    case = make_case(seed=22, bias=bias)
    lc, tg = _op_args(case)
    args = (lc["hidden"], lc["weight"], lc["bias"], tg, case["mask"], 0.9, 4, "auto", False, "test")
    opcheck(torch.ops.pama_ext.fused_linear_logp.default, args)
    with torch.no_grad():
        logp, lse = torch.ops.pama_ext.fused_linear_logp(*args)
    g = torch.randn_like(logp)
    bargs = (case["hidden"].detach(), case["weight"].detach(), case["bias"].detach() if bias else None, tg,
             case["mask"], lse, g, 0.9, 4, "auto", True, True, bias)
    opcheck(torch.ops.pama_ext.fused_linear_logp_backward.default, bargs)


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_opcheck_token_op(loss_agg):
    from torch.library import opcheck

    case = make_case(seed=23, kl=True, per_seq=True)
    lc, tg = _op_args(case)
    args = (lc["hidden"], lc["weight"], lc["bias"], tg, lc["old_logp"], lc["advantages"], case["mask"], lc["ref_logp"],
            1.0, 0.05, 5, 0.2, loss_agg, "auto", "raise", True, True, True)
    opcheck(torch.ops.pama_ext.fused_linear_pama_token.default, args)


def test_fused_linear_logp_scores_without_gradient():
    case = make_case(seed=14, V=97)
    lc = leaves(case)
    logp = pama_ext.fused_linear.fused_linear_logp(lc["hidden"], lc["weight"], lc["targets"], lc["mask"],
                                                   bias=lc["bias"], temperature=0.8, chunk_size=5)
    assert not logp.requires_grad and logp.dtype == torch.float64
    expected = unfused_logp(case["hidden"], case["weight"], case["targets"], case["mask"], case["bias"], 0.8)
    torch.testing.assert_close(logp[case["mask"]], expected[case["mask"]], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"fused_linear_logp: `targets`"):
        bad = case["targets"].clone()
        bad[case["mask"]] = 97
        pama_ext.fused_linear.fused_linear_logp(lc["hidden"], lc["weight"], bad, lc["mask"])


def test_generic_loss_must_be_a_scalar_tensor():
    lc = leaves(make_case())
    with pytest.raises(TypeError, match=r"must return a 0-dim tensor, got a tensor of shape \[3, 7\]"):
        fused_linear_logp_loss(lc["hidden"], lc["weight"], lc["targets"], lc["mask"], lambda logp: logp)
    with pytest.raises(TypeError, match="`loss_of_logp` must be callable"):
        fused_linear_logp_loss(lc["hidden"], lc["weight"], lc["targets"], lc["mask"], 3.0)
