"""The Triton kernels (pama_ext/triton_backend) against the float64 reference.

Runs in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, started by
``python_tests/test_triton_interpreter.py``) or compiled on a GPU
(``PAMA_TRITON_TEST_DEVICE=cuda``); see ``conftest.py`` here for the commands.

Every comparison is against ``pama_ext.reference.fused_forward`` / ``fused_backward`` in
float64 on the same (already rounded) inputs: loss, gradient with respect to ``logp``,
weights, ``row_scale`` and the eight statistics. The interpreter is slow (its cost is per
operation), so the shapes are small; they are odd on purpose (T = 1, T = 17, rows shorter
than one block, rows spanning several blocks, N from 1 to 64).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import DEVICE, require_interpreter_or_gpu, Inputs, assert_close_rel, leaf, make_inputs, upcast, with_exact_zeros

require_interpreter_or_gpu()

import pama_ext  # noqa: E402
from pama_ext import reference  # noqa: E402
from pama_ext.triton_backend import ops as tops  # noqa: E402
from oracle import check_backend, reference_oracle, run_backend  # noqa: E402  (python_tests/oracle.py)

F32, F64 = torch.float32, torch.float64
GRANS = pama_ext.GRANULARITIES
AGGS = pama_ext.LOSS_AGGS
EPS = 0.2


def to_dev(x: Inputs) -> Inputs:
    return Inputs(*(t.to(DEVICE) for t in x))


def run_triton(x: Inputs, granularity, loss_agg, **kw):
    """(loss, grad, PamaStats) through the public API with backend='triton', on DEVICE."""
    return run_backend(x, "triton", granularity, loss_agg, device=DEVICE, **kw)


def check_case(x: Inputs, granularity, loss_agg, **kw):
    """backend='triton' on DEVICE against the float64 reference (``python_tests/oracle.py``)."""
    return check_backend(x, "triton", granularity, loss_agg, device=DEVICE, **kw)


# --------------------------------------------------------------------------- every granularity x aggregation
# (B, T, N, mask kind, seed): odd shapes; T = 17 and 40 are no multiple of any block size
CASES = [
    (1, 1, 1, "full", 0),
    (1, 1, 3, "full", 1),
    (3, 17, 2, "ragged", 2),
    (3, 17, 5, "random", 3),
    (4, 9, 8, "ragged", 4),
    (2, 6, 3, "empty", 5),
    (2, 40, 3, "ragged", 6),
    (5, 7, 1, "random", 7),
]


def _case_id(c):
    return f"B{c[0]}T{c[1]}N{c[2]}-{c[3]}"


@pytest.mark.parametrize("per_sequence", [False, True], ids=["adv_BTN", "adv_BN"])
@pytest.mark.parametrize("loss_agg", AGGS)
@pytest.mark.parametrize("granularity", GRANS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_float32_matches_reference(case, granularity, loss_agg, per_sequence):
    B, T, N, mask_kind, seed = case
    x = make_inputs(B, T, N, F32, per_sequence=per_sequence, mask_kind=mask_kind, seed=seed)
    check_case(x, granularity, loss_agg)


@pytest.mark.parametrize("granularity", GRANS)
@pytest.mark.parametrize("case", [(3, 17, 3, "ragged", 21), (2, 9, 5, "random", 22)], ids=_case_id)
def test_float64_matches_reference_tightly(case, granularity):
    """float64 inputs: per-token maths in double too, agreement to ~1e-10."""
    B, T, N, mask_kind, seed = case
    for i, agg in enumerate(AGGS):
        x = make_inputs(B, T, N, F64, per_sequence=bool(i), mask_kind=mask_kind, seed=seed)
        check_case(x, granularity, agg)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_inputs(dtype):
    """16-bit inputs: float32 per-token maths, float64 sums, the gradient in the input dtype."""
    x = make_inputs(3, 17, 3, dtype, mask_kind="ragged", seed=31)
    for g in GRANS:
        check_case(x, g, AGGS[GRANS.index(g) % 2])


# --------------------------------------------------------------------------- token: exact zeros abstain
@pytest.mark.parametrize("nonneg", [False, True], ids=["signed", "nonneg"])
@pytest.mark.parametrize("per_sequence", [False, True], ids=["adv_BTN", "adv_BN"])
@pytest.mark.parametrize("dtype", [F32, F64, torch.bfloat16, torch.float16], ids=str)
def test_token_exact_zeros_match_reference(dtype, per_sequence, nonneg):
    """granularity "token": objectives whose advantage is exactly 0 abstain (forward and
    backward), against the float64 reference, which tests/test_loss_reference.py checks
    against the rule spelled out."""
    for i, (B, T, N, mask_kind, seed) in enumerate([(3, 17, 3, "ragged", 301), (2, 9, 5, "full", 302),
                                                     (1, 4, 1, "full", 303), (2, 40, 8, "random", 304)]):
        x = make_inputs(B, T, N, dtype, per_sequence=per_sequence, mask_kind=mask_kind, seed=seed)
        check_case(with_exact_zeros(x, seed, nonneg=nonneg), "token", AGGS[i % 2])


def test_token_abstain_hand_cases():
    adv = torch.tensor([[[0.0, 2.0, 3.0], [0.0, 0.0, 0.0], [-1.0, 0.0, 5.0], [0.5, 0.5, 0.0],
                         [-0.0, 0.0, 1.5], [-0.0, -0.0, -0.0], [1.0, 2.0, 3.0], [-1.0, -2.0, 0.0]]])
    expected = [2.0, 0.0, 0.0, 0.5, 1.5, 0.0, 1.0, 0.0]
    lp = torch.zeros(1, 8)
    x = Inputs(lp, lp.clone(), adv, torch.ones(1, 8, dtype=torch.bool))
    loss, grad, _ = run_triton(x, "token", "token_mean", grad_out=-8.0)
    assert float(loss) == -sum(expected) / 8
    assert grad.cpu()[0].tolist() == expected


def test_token_rows_spanning_several_blocks_with_zeros(monkeypatch):
    monkeypatch.setattr(tops, "TOKENS_PER_PROGRAM", 16)
    monkeypatch.setattr(tops, "PARTIAL_ROWS", 2)
    x = with_exact_zeros(make_inputs(5, 300, 3, F32, mask_kind="ragged", seed=305), 305, nonneg=True)
    for agg in AGGS:
        check_case(x, "token", agg)


def test_opcheck_token_exact_zeros():
    x = with_exact_zeros(make_inputs(3, 7, 3, F32, mask_kind="random", seed=306), 306, nonneg=True)
    x = to_dev(x)
    torch.library.opcheck(
        torch.ops.pama_ext.triton_forward.default,
        (x.logp.requires_grad_(), x.old_logp, x.advantages, x.mask, EPS, "token", "token_mean", True),
    )
    _, w, rs, _ = torch.ops.pama_ext.triton_forward(*x, EPS, "token", "token_mean", True)
    torch.library.opcheck(
        torch.ops.pama_ext.triton_backward.default,
        (torch.tensor(1.5, device=DEVICE), x.logp.detach(), x.old_logp, x.advantages, x.mask, w, rs, EPS, "token"),
    )


# --------------------------------------------------------------------------- token: the [B, T] gradient factor
# For granularity "token" the forward's ``weights`` is f = s_t u_t 1[u_t <= 1+eps] ([B, T], acc
# dtype, 0 at invalid and clipped tokens) and the autograd backward is one multiply by it
# (reference.token_factor_backward), with no kernel launch.
FACTOR_CASES = [  # (B, T, N, mask kind, seed)
    (1, 1, 1, "full", 401),
    (3, 17, 2, "ragged", 402),
    (2, 9, 3, "random", 403),
    (4, 6, 5, "ragged", 404),
    (2, 11, 8, "full", 405),
]


def _token_factor_and_grad(x: Inputs, loss_agg="token_mean", grad_out=1.0, clip_eps=EPS):
    """triton_forward(token)'s factor and its autograd gradient against reference.fused_forward
    / fused_backward on the same float32 inputs (check_finite False); returns (factor, grad)."""
    from pama_ext.triton_backend import specialise

    xd = to_dev(x)
    lp = leaf(xd.logp)
    loss, f, rs, _st = torch.ops.pama_ext.triton_forward(lp, *xd[1:], clip_eps, "token", loss_agg, False)
    r_loss, r_f, r_rs, _ = reference.fused_forward(*x, clip_eps, "token", loss_agg, False)
    b, t = x.logp.shape
    assert f.shape == r_f.shape == (b, t) and f.dtype == r_f.dtype == F32 and f.device.type == DEVICE
    assert not f.requires_grad and bool(torch.isfinite(f).all())
    f_cpu = f.detach().cpu()
    assert torch.equal(f_cpu == 0, r_f == 0), (f_cpu, r_f)  # the same tokens dropped, clipped, abstaining
    assert_close_rel(f_cpu, r_f, 1e-6, msg="token factor")
    u, ind, _m, _a, valid, _flags = reference._token_terms(x.logp, x.old_logp, x.advantages, x.mask, clip_eps, F32)
    assert bool((f_cpu[~ind] == 0).all())  # invalid and clipped tokens: exactly 0
    assert_close_rel(loss.detach().cpu(), r_loss, 2e-6, atol=1e-30, msg="token loss")
    go = torch.tensor(grad_out, dtype=F32, device=DEVICE)
    with specialise.record_launches() as launches:
        (grad,) = torch.autograd.grad(loss, lp, go)
    assert launches == [], [launch.name for launch in launches]  # one multiply by the factor
    g_ref = reference.fused_backward(go.cpu(), *x, r_f, r_rs, clip_eps, "token")
    assert grad.dtype == x.logp.dtype and grad.shape == (b, t)
    assert_close_rel(grad.cpu(), g_ref, 1e-6, msg="token grad")
    assert bool(torch.isfinite(grad).all())
    # the backward kernel's own token path (direct callers of triton_backward) agrees
    g_kernel = torch.ops.pama_ext.triton_backward(go, xd.logp, *xd[1:], f, rs, clip_eps, "token")
    assert_close_rel(grad.cpu(), g_kernel.cpu(), 1e-6, msg="token grad vs backward_kernel")
    return f_cpu, grad.cpu()


@pytest.mark.parametrize("per_sequence", [False, True], ids=["adv_BTN", "adv_BN"])
@pytest.mark.parametrize("case", FACTOR_CASES, ids=_case_id)
def test_token_factor_matches_reference(case, per_sequence):
    B, T, N, mask_kind, seed = case
    x = make_inputs(B, T, N, F32, per_sequence=per_sequence, mask_kind=mask_kind, seed=seed)
    if seed % 2:
        x = with_exact_zeros(x, seed, nonneg=per_sequence)
    _token_factor_and_grad(x, AGGS[seed % 2], grad_out=(1.0, -2.5)[per_sequence])


def test_token_factor_masked_rows_and_empty_mask():
    x = make_inputs(4, 7, 3, F32, mask_kind="ragged", seed=411)
    assert bool((~x.mask).all(dim=1).any())  # a fully masked row
    f, g = _token_factor_and_grad(x, "seq_mean_token_mean")
    assert bool((f[~x.mask] == 0).all()) and bool((g[~x.mask] == 0).all())
    e = make_inputs(3, 5, 3, F32, mask_kind="empty", seed=412)
    e = e._replace(logp=e.logp.clone().index_fill_(1, torch.tensor([2]), float("nan")))  # unmasked garbage
    for agg in AGGS:
        f, g = _token_factor_and_grad(e, agg)
        assert torch.equal(f, torch.zeros(3, 5)) and torch.equal(g, torch.zeros(3, 5))


@pytest.mark.parametrize("per_sequence", [False, True], ids=["adv_BTN", "adv_BN"])
def test_token_factor_nonfinite_inputs_dropped(per_sequence):
    """check_finite False (nonfinite="mask"): tokens with a non-finite logp / old_logp /
    advantage get factor 0, and u = inf (exp overflow) gives 0, not NaN."""
    x = make_inputs(3, 8, 3, F32, per_sequence=per_sequence, mask_kind="full", seed=421)
    lp, old, adv = x.logp.clone(), x.old_logp.clone(), x.advantages.abs().clone() + 0.1
    lp[0, 1] = float("nan")
    old[1, 5] = float("inf")
    lp[2, 2] = float("-inf")
    if per_sequence:
        adv[1, 2] = float("nan")  # the whole row 1 is dropped
    else:
        adv[2, 6, 0] = -float("inf")
    lp[0, 4], old[0, 4] = 90.0, -5.0  # u = e^95: inf in float32, a valid (clipped) token
    x = Inputs(lp, old, adv, x.mask)
    f, g = _token_factor_and_grad(x, "token_mean", grad_out=3.0)
    dropped = [(0, 1), (1, 5), (2, 2), (0, 4)] + ([(1, j) for j in range(8)] if per_sequence else [(2, 6)])
    for b, t in dropped:
        assert float(f[b, t]) == 0.0 and float(g[b, t]) == 0.0, (b, t)
    assert int((f != 0).sum()) > 0


def test_token_factor_hand_values_and_clipped_tokens():
    """f = s_t u_t exactly where u <= 1 + eps; clipped tokens (u > 1 + eps, also u = inf) are 0."""
    ln = math.log
    lp = torch.tensor([[0.0, ln(1.5), ln(1.1), 100.0, ln(0.5), 0.0]], dtype=F32)
    old = torch.zeros(1, 6)
    adv = torch.tensor([[[2.0, 3.0], [1.0, 4.0], [0.5, 0.0], [1.0, 1.0], [-1.0, 2.0], [0.0, 0.0]]])
    x = Inputs(lp, old, adv, torch.ones(1, 6, dtype=torch.bool))
    f, g = _token_factor_and_grad(x, "token_mean", grad_out=-6.0)
    u2 = float(torch.exp(lp[0, 2].double()))  # 1.1 up to the float32 rounding of ln(1.1)
    assert f[0].tolist() == [2.0, 0.0, pytest.approx(0.5 * u2, rel=1e-6), 0.0, 0.0, 0.0]  # s = 0.5: the zero abstains
    assert g[0].tolist() == f[0].tolist()  # -(g r_b) f with g = -6, r_b = 1/6


def test_token_factor_every_element_written(monkeypatch):
    """Rows of several token blocks (the last one partly out of the row): every [B, T]
    element of the factor is written, the allocation poisoned with NaN beforehand."""
    monkeypatch.setattr(tops, "TOKENS_PER_PROGRAM", 16)  # one chunk per block
    monkeypatch.setattr(tops, "PARTIAL_ROWS", 1)
    x = with_exact_zeros(make_inputs(2, 600, 5, F32, mask_kind="random", seed=431), 431)
    chunk = tops.token_chunk(tops.block_n(5), False)
    assert tops.triton_cdiv(600, chunk) >= 3 and 600 % chunk != 0

    class _PoisonedEmpty:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def empty(shape, *args, **kwargs):
            out = torch.empty(shape, *args, **kwargs)
            return out.fill_(float("nan")) if tuple(shape) == (2, 600) else out

    monkeypatch.setattr(tops, "torch", _PoisonedEmpty())
    _token_factor_and_grad(x, "seq_mean_token_mean")


# --------------------------------------------------------------------------- blocks, rows, widths
def test_rows_spanning_several_blocks(monkeypatch):
    """Rows of several token blocks and groups of several rows per partial vector: the
    fixed-order reductions at every level (small block sizes forced through the module)."""
    monkeypatch.setattr(tops, "TOKENS_PER_PROGRAM", 16)  # one chunk per block
    monkeypatch.setattr(tops, "PARTIAL_ROWS", 2)  # ceil(B / 2) rows per reduce_rows program
    x = make_inputs(5, 600, 3, F32, mask_kind="ragged", seed=41)
    assert tops.triton_cdiv(600, tops.token_chunk(4, True)) >= 3  # >= 3 blocks per row (batch)
    for i, g in enumerate(GRANS):
        check_case(x, g, AGGS[i % 2])


@pytest.mark.parametrize("n", [10, 12, 64])
def test_many_objectives(n):
    """N = 10: the largest on-device support enumeration; N = 12 and 64: the host solve
    (of the token Gram for batch, of the per-response Gram for sequence_gram)."""
    x = make_inputs(2, 5, n, F64, mask_kind="random", seed=50 + n)
    check_case(x, "batch", "token_mean")
    x = make_inputs(n + 3, 5, n, F64, mask_kind="random", seed=50 + n)  # B > N: a full-rank Gram
    check_case(x, "sequence_gram", "seq_mean_token_mean")
    if n == 64:
        for g in ("token", "sequence", "batch_mean"):
            check_case(x, g, "seq_mean_token_mean")


@pytest.mark.parametrize("n", [3, 4, 6, 8])
def test_min_norm_on_device_is_exact(n):
    """The support enumeration reaches the true minimum: the KKT residual is ~0 and the
    combined direction d = sum c_i v_i satisfies <d, v_j> >= ||d||^2 for every j."""
    x = make_inputs(3, 11, n, F64, mask_kind="full", seed=60 + n, noise=0.05)
    _, _, st = check_case(x, "batch", "token_mean")
    xu = upcast(x)
    u = torch.exp(xu.logp - xu.old_logp)
    v = torch.where((u <= 1 + EPS)[..., None], xu.advantages.clamp_min(0), 0.0).reshape(-1, n)
    d = v @ st.weights.cpu().to(F64)
    assert bool(((v.T @ d) >= (d @ d) * (1 - 1e-9) - 1e-12).all())


@pytest.mark.parametrize("n", [3, 4, 6, 8, 12])
def test_sequence_gram_min_norm_is_exact(n):
    """sequence_gram (on the device for N <= 10, on the host above): with v^(i) the [B]
    vector of row means of I^(i), d = sum_i c_i v^(i) satisfies <d, v^(j)> >= ||d||^2."""
    x = make_inputs(9, 13, n, F64, mask_kind="ragged", seed=65 + n, noise=0.05)
    _, _, st = check_case(x, "sequence_gram", "token_mean")
    xu = upcast(x)
    u = torch.exp(xu.logp - xu.old_logp)
    i_adv = torch.where(((u <= 1 + EPS) & xu.mask)[..., None], xu.advantages.clamp_min(0), 0.0)
    v = i_adv.sum(1) / xu.mask.sum(1).clamp_min(1).to(F64)[:, None]  # [B, N]
    d = v @ st.weights.cpu().to(F64)
    assert bool(((v.T @ d) >= (d @ d) * (1 - 1e-9) - 1e-12).all())


def test_duplicate_and_dominated_objectives():
    """Identical advantage columns share their weight (the duplicate rule); an all-negative
    column (a zero vector after the Noon clamp) takes all the weight: objective 0."""
    x = make_inputs(3, 10, 3, F64, mask_kind="full", seed=70)
    adv = torch.cat([x.advantages, x.advantages[..., :1], x.advantages[..., 1:2]], dim=-1)  # N = 5
    x5 = x._replace(advantages=adv)
    _, _, st = check_case(x5, "batch", "token_mean")
    w = st.weights.cpu()
    assert float(w[0]) == pytest.approx(float(w[3]), abs=1e-12) and float(w[1]) == pytest.approx(float(w[4]), abs=1e-12)
    neg = x.advantages.clone()
    neg[..., 2] = -1.0 - neg[..., 2].abs()
    _, _, st = check_case(x._replace(advantages=neg), "batch", "token_mean")
    assert st.weights.cpu().tolist() == pytest.approx([0.0, 0.0, 1.0], abs=1e-12)
    assert st.as_dict()["objective"] == 0.0


@pytest.mark.parametrize("n", [2, 3, 5])
def test_all_advantages_negative_gives_uniform_weights(n):
    x = make_inputs(2, 7, n, F64, mask_kind="full", seed=80 + n)
    x = x._replace(advantages=-x.advantages.abs() - 0.1)
    for g in GRANS:
        loss, grad, st = check_case(x, g, "token_mean")
        assert float(loss) == 0.0 and not bool(grad.any())
        if g in ("batch", "batch_mean", "sequence_gram"):
            assert st.weights.cpu().tolist() == pytest.approx([1.0 / n] * n)


# --------------------------------------------------------------------------- contract details
@pytest.mark.parametrize("loss_agg", AGGS)
@pytest.mark.parametrize("granularity", GRANS)
def test_empty_mask_zero_loss_zero_grad(granularity, loss_agg):
    x = make_inputs(3, 5, 3, F32, mask_kind="empty", seed=91)
    x = x._replace(logp=x.logp.clone().index_fill_(1, torch.tensor([2]), float("nan")))  # unmasked garbage
    loss, grad, st = check_case(x, granularity, loss_agg)
    assert float(loss) == 0.0 and torch.equal(grad.cpu(), torch.zeros_like(x.logp))
    assert bool(torch.isfinite(st.weights).all()) and bool((st.row_scale == 0).all())


@pytest.mark.parametrize("shape", [(0, 5), (3, 0)], ids=["B0", "T0"])
def test_empty_batch_or_rows(shape):
    b, t = shape
    x = to_dev(Inputs(torch.zeros(b, t), torch.zeros(b, t), torch.ones(b, t, 3), torch.ones(b, t, dtype=torch.bool)))
    for g in GRANS:
        out = torch.ops.pama_ext.triton_forward(*x, EPS, g, "seq_mean_token_mean", True)
        ref = reference.fused_forward(*(v.cpu() for v in x), EPS, g, "seq_mean_token_mean", True)
        for a, r in zip(out, ref):
            assert a.shape == r.shape and torch.allclose(a.cpu().double(), r.double()), (g, a, r)
        grad = torch.ops.pama_ext.triton_backward(out[0].new_ones(()), *x, out[1], out[2], EPS, g)
        assert grad.shape == (b, t)


@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
def test_indicator_is_one_at_the_clip_boundary(dtype):
    """u = 1 + eps exactly is not clipped: exp(ln 2) == 2.0 == 1 + eps with eps = 1."""
    ln2 = math.log(2.0)
    lp = torch.tensor([[ln2, 0.0, ln2 + 0.1]], dtype=dtype)
    assert float(torch.exp(lp[0, 0])) == 2.0
    x = Inputs(lp, torch.zeros(1, 3, dtype=dtype), torch.tensor([[[1.5], [0.5], [2.0]]], dtype=dtype),
               torch.ones(1, 3, dtype=torch.bool))
    for g in GRANS:
        loss, grad, st = run_triton(x, g, "token_mean", clip_eps=1.0)
        assert grad.cpu()[0].tolist() == pytest.approx([-1.5 * 2.0 / 3, -0.5 / 3, 0.0], rel=1e-6)
        assert float(loss) == pytest.approx(-(1.5 * 2.0 + 0.5 + 2.0 * 2.0) / 3, rel=1e-6)
        assert st.as_dict()["clipped_tokens"] == 1.0


@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
def test_ratio_overflow_gives_finite_zero_grad(dtype):
    x = make_inputs(2, 6, 3, F64, mask_kind="full", seed=101)
    lp, old, adv = x.logp.clone(), x.old_logp.clone(), x.advantages.clone()
    old[0, 2], lp[0, 2] = -10.0, 990.0  # u = e^1000: inf in float32 and float64
    old[1, 3], lp[1, 3] = -5.0, 95.0  # u = e^100: inf in float32 only
    x = Inputs(lp.to(dtype), old.to(dtype), adv.to(dtype), x.mask)
    for g in GRANS:
        loss, grad, st = check_case(x, g, "token_mean")
        assert bool(torch.isfinite(grad).all()) and float(grad[0, 2]) == 0.0 and float(grad[1, 3]) == 0.0
        assert st.as_dict()["clipped_tokens"] >= 2


def test_grad_output_is_propagated():
    x = make_inputs(3, 7, 3, F64, mask_kind="full", seed=151)
    for g in GRANS:
        check_case(x, g, "token_mean", grad_out=-2.5)


@pytest.mark.parametrize("which", ["logp", "old_logp", "advantages"])
def test_nonfinite_raise_names_the_argument(which):
    x = make_inputs(3, 8, 3, F32, mask_kind="full", seed=111)
    bad = getattr(x, which).clone()
    bad.view(-1)[7] = float("nan")
    bad_x = x._replace(**{which: bad})
    with pytest.raises(ValueError, match=f"`{which}` has 1 non-finite"):
        run_triton(bad_x, "batch", "token_mean")


@pytest.mark.parametrize("per_sequence", [False, True], ids=["adv_BTN", "adv_BN"])
@pytest.mark.parametrize("granularity", GRANS)
def test_nonfinite_mask_drops_the_tokens_and_counts_them(granularity, per_sequence):
    x = make_inputs(4, 9, 3, F32, per_sequence=per_sequence, mask_kind="full", seed=121)
    lp, old, adv = x.logp.clone(), x.old_logp.clone(), x.advantages.clone()
    lp[0, 1] = float("nan")
    old[2, 5] = float("inf")
    if per_sequence:
        adv[3, 0] = -float("inf")
    else:
        adv[3, 0, 0] = -float("inf")
    bad = Inputs(lp, old, adv, x.mask)
    loss, grad, st = check_case(bad, granularity, "seq_mean_token_mean", nonfinite="mask")
    stats = st.as_dict()
    assert (stats["nonfinite_logp"], stats["nonfinite_old_logp"]) == (1.0, 1.0)
    assert stats["nonfinite_advantages"] == (9.0 if per_sequence else 1.0)
    assert float(grad[0, 1]) == 0.0 and float(grad[2, 5]) == 0.0


def test_deterministic_bitwise():
    x = to_dev(make_inputs(3, 33, 4, F32, mask_kind="ragged", seed=131))
    for g in GRANS:
        a = torch.ops.pama_ext.triton_forward(*x, EPS, g, "token_mean", True)
        b = torch.ops.pama_ext.triton_forward(*x, EPS, g, "token_mean", True)
        for p, q in zip(a, b):
            assert torch.equal(p, q), g
        ga = torch.ops.pama_ext.triton_backward(a[0].new_ones(()), *x, a[1], a[2], EPS, g)
        gb = torch.ops.pama_ext.triton_backward(b[0].new_ones(()), *x, b[1], b[2], EPS, g)
        assert torch.equal(ga, gb), g


def test_agrees_with_the_cpp_backend():
    if "cpp" not in pama_ext.available_backends() or DEVICE != "cpu":
        pytest.skip("compares CPU backends")  # only meaningful under the interpreter on CPU
    x = make_inputs(3, 17, 4, F64, mask_kind="ragged", seed=141)
    for g in GRANS:
        t = torch.ops.pama_ext.triton_forward(*x, EPS, g, "seq_mean_token_mean", True)
        c = torch.ops.pama_ext.pama_forward(*x, EPS, g, "seq_mean_token_mean", True)
        for p, q in zip(t, c):
            assert_close_rel(p, q, 1e-13, atol=1e-15, msg=g)


@pytest.mark.parametrize("granularity", GRANS)
def test_pama_weights(granularity):
    x = make_inputs(3, 9, 4, F32, mask_kind="random", seed=171)
    w = pama_ext.pama_weights(*to_dev(x), granularity=granularity, backend="triton")
    expected = reference.pama_weights(*upcast(x), EPS, granularity)
    assert w.dtype == F32 and w.device.type == DEVICE
    assert_close_rel(w, expected, 0.0, atol=1e-5, msg=granularity)


def test_non_contiguous_inputs():
    x = make_inputs(4, 12, 3, F32, mask_kind="random", seed=161)
    lp_nc = x.logp.T.contiguous().T
    adv_nc = torch.zeros(4, 12, 6)[..., ::2]
    adv_nc.copy_(x.advantages)
    a = run_triton(x, "batch", "token_mean")
    b = run_triton(Inputs(lp_nc, x.old_logp, adv_nc, x.mask), "batch", "token_mean")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --------------------------------------------------------------------------- registration
def test_backend_is_registered_for_this_device():
    assert "triton" in pama_ext.available_backends()
    assert DEVICE in pama_ext._backends._REGISTRY["triton"].devices
    for op in ("triton_forward", "triton_backward"):
        key = "CPU" if DEVICE == "cpu" else "CUDA"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pama_ext::{op}", key), op


@pytest.mark.parametrize("granularity", GRANS)
def test_opcheck_forward(granularity):
    x = to_dev(make_inputs(3, 7, 3, F32, per_sequence=granularity == "sequence", mask_kind="random", seed=181))
    torch.library.opcheck(
        torch.ops.pama_ext.triton_forward.default,
        (x.logp.requires_grad_(), x.old_logp, x.advantages, x.mask, EPS, granularity, "token_mean", True),
    )


@pytest.mark.parametrize("granularity", ["batch", "sequence", "token", "sequence_gram"])
def test_opcheck_backward(granularity):
    x = to_dev(make_inputs(3, 7, 3, F32, mask_kind="random", seed=182))
    _, w, rs, _ = torch.ops.pama_ext.triton_forward(*x, EPS, granularity, "seq_mean_token_mean", True)
    torch.library.opcheck(
        torch.ops.pama_ext.triton_backward.default,
        (torch.tensor(1.5, device=DEVICE), x.logp, x.old_logp, x.advantages, x.mask, w, rs, EPS, granularity),
    )


@pytest.mark.parametrize("granularity", ["batch", "sequence", "sequence_gram", "token"])
def test_torch_compile_fullgraph(granularity):
    """pama_loss(backend='triton') inside torch.compile(fullgraph=True): the op is opaque to
    dynamo (traced through its fake kernel), forward and backward match eager."""
    torch._dynamo.reset()
    x = to_dev(make_inputs(3, 11, 3, F32, mask_kind="ragged", seed=191))

    def f(lp, old, adv, mask):
        loss, st = pama_ext.pama_loss_and_stats(lp, old, adv, mask, granularity=granularity,
                                                backend="triton", nonfinite="mask")
        return loss * 2.0, st.weights

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    lp1, lp2 = leaf(x.logp), leaf(x.logp)
    l1, w1 = f(lp1, *x[1:])
    l2, w2 = compiled(lp2, *x[1:])
    (g1,) = torch.autograd.grad(l1, lp1)
    (g2,) = torch.autograd.grad(l2, lp2)
    assert torch.equal(l1, l2) and torch.equal(w1, w2) and torch.equal(g1, g2)


def test_auto_never_picks_triton_over_a_faster_backend():
    """auto: triton has priority 5, below cpp (10) and cuda (20)."""
    entry = pama_ext._backends._REGISTRY["triton"]
    assert entry.priority == 5
    chosen = pama_ext._backends.resolve("pama_loss", "auto", torch.device(DEVICE))
    faster = [b for b in pama_ext.available_backends()
              if b != "torch" and DEVICE in pama_ext._backends._REGISTRY[b].devices
              and pama_ext._backends._REGISTRY[b].priority > 5]
    assert chosen == (faster[0] if faster else "triton")


@pytest.mark.skipif(DEVICE != "cuda", reason="host synchronisation is a GPU notion")
def test_no_host_sync_on_cuda():
    x = to_dev(make_inputs(4, 300, 4, F32, mask_kind="ragged", seed=201))
    for g in GRANS:
        lp = leaf(x.logp)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss = pama_ext.pama_loss(lp, *x[1:], granularity=g, backend="triton", nonfinite="mask")
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        assert bool(torch.isfinite(lp.grad).all())


if os.environ.get("PAMA_TRITON_TEST_LARGE") == "1":  # GPU-only: realistic sizes

    @pytest.mark.parametrize("granularity", GRANS)
    @pytest.mark.parametrize("case", [(64, 1024, 2), (16, 4096, 8), (1000, 100, 3)], ids=lambda c: f"B{c[0]}T{c[1]}N{c[2]}")
    def test_large_matches_reference(case, granularity):
        B, T, N = case
        x = make_inputs(B, T, N, F32, mask_kind="ragged", seed=B + T + N)
        check_case(x, granularity, AGGS[N % 2])


@pytest.mark.parametrize("granularity", GRANS)
@pytest.mark.parametrize("per_sample", [False, True], ids=["pref_N", "pref_BN"])
def test_preference_is_the_contract_on_scaled_advantages(granularity, per_sample):
    # steerable PAMA (pama_ext/preference.py): the Triton backend with a preference equals the
    # float64 reference on the advantages scaled by p_max / p_i; uniform is plain PAMA exactly
    from pama_ext.preference import scale_advantages

    x = make_inputs(3, 11, 3, dtype=F32, seed=31, mask_kind="ragged")
    pref = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.4, 0.4, 0.2]]) if per_sample else torch.tensor([0.6, 0.3, 0.1])
    xs = upcast(x)
    scaled = xs._replace(advantages=scale_advantages(xs.advantages, pref.to(torch.float64)))
    check_case(x, granularity, "token_mean", preference=pref.to(DEVICE),
               expected=reference_oracle(scaled, granularity, "token_mean"))
    xd = to_dev(x)
    lp1, lp2 = leaf(xd.logp), leaf(xd.logp)
    plain = pama_ext.pama_loss(lp1, xd.old_logp, xd.advantages, xd.mask, granularity=granularity, backend="triton")
    uniform = pama_ext.pama_loss(lp2, xd.old_logp, xd.advantages, xd.mask, granularity=granularity, backend="triton",
                                 preference=[1.0, 1.0, 1.0])
    assert torch.equal(plain, uniform)
