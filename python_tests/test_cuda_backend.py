"""The CUDA kernels (csrc/pama_cuda_kernels.cu) behind pama_ext::pama_forward / pama_backward.

GPU-only: skipped cleanly without a CUDA device or without an extension built with the CUDA
kernels (PAMA_EXT_CUDA=1). On a GPU machine:

    python -m pytest -q python_tests/test_cuda_backend.py
    compute-sanitizer --tool memcheck  python -m pytest -q python_tests/test_cuda_backend.py -k "not compile"
    compute-sanitizer --tool racecheck python -m pytest -q python_tests/test_cuda_backend.py -k "not compile"

Covers: every granularity x loss_agg x dtype (per-token and per-sequence advantages, N
through the specialised widths and the runtime-N kernel, rows split into segments) against
the float64 reference on the same rounded inputs; bitwise determinism across runs; agreement
with the CPU kernel; no host synchronisation with nonfinite="mask"; the check_finite error;
empty inputs; opcheck on CUDA tensors; torch.compile(fullgraph=True); for granularity
"token", the [B, T] per-token gradient factor returned as weights (every reduce kernel, every
dtype) against the reference, masked-out, dropped and clipped tokens exactly 0.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TOLS, assert_close_rel, make_inputs, upcast, with_exact_zeros
from torch.library import opcheck

import pama_ext
from pama_ext import _backends, reference

HAS_KERNELS = _backends._C is not None and hasattr(_backends._C, "pama_forward_cuda")
HAS_GPU = torch.cuda.is_available()

pytestmark = [
    pytest.mark.skipif(not HAS_GPU, reason="no CUDA device"),
    pytest.mark.skipif(
        not HAS_KERNELS, reason="pama_ext._C was built without the CUDA kernels (build with PAMA_EXT_CUDA=1)"
    ),
]

DEV = "cuda"
GRANS = pama_ext.GRANULARITIES
AGGS = pama_ext.LOSS_AGGS
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _cuda(x):
    return type(x)(*(t.to(DEV) for t in x))


def _fwd(x, gran, agg, check=False):
    return torch.ops.pama_ext.pama_forward(*x, 0.2, gran, agg, check)


def _bwd(x, w, rs, gran, g=1.0):
    go = torch.tensor(g, dtype=rs.dtype, device=x.logp.device)
    return torch.ops.pama_ext.pama_backward(go, *x, w, rs, 0.2, gran)


def _check_against_reference(x, gran, agg, dtype):
    loss_rtol, grad_rtol, w_atol = TOLS[dtype]
    xc = _cuda(x)
    loss, w, rs, st = _fwd(xc, gran, agg)
    ref = reference.fused_forward(*upcast(x), 0.2, gran, agg, False)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == acc and w.dtype == acc and rs.dtype == acc and st.dtype == torch.float64
    assert loss.device.type == "cuda" and w.device.type == "cuda"
    assert_close_rel(loss, ref[0], loss_rtol, atol=1e-12, msg=f"loss {gran} {agg} {dtype}")
    assert_close_rel(w, ref[1], 0.0, atol=w_atol, msg=f"weights {gran} {dtype}")
    assert_close_rel(rs, ref[2], 1e-6 if dtype != torch.float64 else 1e-12, msg="row_scale")
    # counts exactly; objective / kkt to the solve's precision
    assert torch.equal(st[[0, 1, 2, 3, 4, 7]].cpu(), ref[3][[0, 1, 2, 3, 4, 7]].cpu()), (st, ref[3])
    assert_close_rel(st[5:7], ref[3][5:7], 1e-5 if dtype != torch.float64 else 1e-9, atol=1e-9, msg="objective/kkt")
    g = _bwd(xc, w, rs, gran, 1.5)
    g_ref = reference.fused_backward(
        torch.tensor(1.5, dtype=torch.float64), *upcast(x), ref[1], ref[2], 0.2, gran
    )
    assert g.dtype == dtype and g.shape == x.logp.shape
    assert_close_rel(g, g_ref, grad_rtol, msg=f"grad {gran} {agg} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("per_sequence", [False, True], ids=["token_adv", "seq_adv"])
def test_against_float64_reference(gran, agg, dtype, per_sequence):
    x = make_inputs(5, 37, 3, dtype=dtype, per_sequence=per_sequence, seed=1)
    _check_against_reference(x, gran, agg, dtype)


# N: every specialised width (1, 2, 3, 4, 8), the runtime-N kernel (5, 17, 64);
# T: rows grouped in one unit, and rows split into several 2048-token segments.
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 17, 64])
@pytest.mark.parametrize("shape", [(7, 300), (2, 5000)], ids=["rows", "segments"])
@pytest.mark.parametrize("gran", GRANS)
def test_widths_and_segments(n, shape, gran):
    b, t = shape
    x = make_inputs(b, t, n, dtype=torch.float32, mask_kind="random", seed=n)
    _check_against_reference(x, gran, "seq_mean_token_mean", torch.float32)


@pytest.mark.parametrize("mask_kind", ["full", "empty", "random", "ragged"])
def test_mask_layouts(mask_kind):
    x = make_inputs(6, 50, 4, dtype=torch.float64, mask_kind=mask_kind, seed=3)
    for gran in GRANS:
        _check_against_reference(x, gran, "token_mean", torch.float64)


def test_empty_inputs():
    for b, t in [(0, 5), (3, 0)]:
        x = make_inputs(max(b, 1), max(t, 1), 3, dtype=torch.float32)
        x = type(x)(*(v[:b, :t] if v.dim() >= 2 else v for v in x))
        x = type(x)(*(v.contiguous() for v in x))
        for gran in GRANS:
            loss, w, rs, st = _fwd(_cuda(x), gran, "token_mean")
            assert float(loss) == 0.0 and float(st[0]) == 0.0
            g = _bwd(_cuda(x), w, rs, gran)
            assert g.shape == (b, t)


@pytest.mark.parametrize("gran", GRANS)
def test_bitwise_deterministic(gran):
    x = _cuda(make_inputs(64, 3000, 4, dtype=torch.bfloat16, seed=5))
    outs = [_fwd(x, gran, "seq_mean_token_mean") for _ in range(3)]
    grads = [_bwd(x, o[1], o[2], gran) for o in outs]
    for o, g in zip(outs[1:], grads[1:]):
        for a, b in zip(o, outs[0]):
            assert torch.equal(a, b)
        assert torch.equal(g, grads[0])


@pytest.mark.parametrize("gran", GRANS)
def test_matches_cpu_kernel(gran):
    if not pama_ext.has_cpp():
        pytest.skip("no CPU kernel")
    x = make_inputs(9, 700, 3, dtype=torch.float32, seed=7)
    cpu = _fwd(x, gran, "token_mean")
    gpu = _fwd(_cuda(x), gran, "token_mean")
    assert_close_rel(gpu[0], cpu[0], 1e-6, msg="loss")
    # token: the [B, T] factor, products of float32 ratios (CPU and GPU exp may differ by an ulp)
    assert_close_rel(gpu[1], cpu[1], 1e-6 if gran == "token" else 0.0, atol=1e-6, msg="weights")
    assert torch.equal(gpu[3][[0, 1, 2, 3, 4, 7]].cpu(), cpu[3][[0, 1, 2, 3, 4, 7]])


def test_nonfinite_masked_and_raised():
    x = make_inputs(4, 40, 3, dtype=torch.float32, mask_kind="full", seed=2)
    lp = x.logp.clone()
    lp[1, 3] = float("nan")
    adv = x.advantages.clone()
    adv[2, 5, 1] = float("inf")
    y = type(x)(lp, x.old_logp, adv, x.mask)
    with pytest.raises(ValueError, match="`logp` has 1 non-finite"):
        _fwd(_cuda(y), "batch", "token_mean", check=True)
    for gran in GRANS:
        _check_against_reference(y, gran, "token_mean", torch.float32)
        _, _, _, st = _fwd(_cuda(y), gran, "token_mean")
        assert st[2].item() == 1 and st[4].item() == 1


def test_no_host_sync_with_nonfinite_mask():
    x = _cuda(make_inputs(16, 256, 4, dtype=torch.float32, seed=4))
    lp = x.logp.detach().clone().requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for gran in GRANS:
            for agg in AGGS:
                loss = pama_ext.pama_loss(
                    lp, x.old_logp, x.advantages, x.mask, granularity=gran, loss_agg=agg,
                    backend="cuda", nonfinite="mask",
                )
                loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(lp.grad).all()


def test_auto_picks_cuda():
    assert pama_ext.available_backends()[0] == "cuda"
    x = _cuda(make_inputs(3, 20, 2, dtype=torch.float32))
    a = pama_ext.pama_loss(*x, backend="auto")
    b = pama_ext.pama_loss(*x, backend="cuda")
    assert torch.equal(a, b)


def test_build_info_reports_cuda():
    ext = pama_ext.build_info()["extension"]
    assert "cuda" in ext["backends"]
    assert ext["cuda"] and ext["cuda"]["archs"]


@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("per_sequence", [False, True])
def test_opcheck_cuda(gran, per_sequence):
    x = _cuda(make_inputs(3, 9, 3, dtype=torch.float32, per_sequence=per_sequence))
    lp = x.logp.clone().requires_grad_(True)
    opcheck(torch.ops.pama_ext.pama_forward.default, (lp, *x[1:], 0.2, gran, "token_mean", True))
    with torch.no_grad():
        _, w, rs, _ = _fwd(x, gran, "token_mean")
    opcheck(
        torch.ops.pama_ext.pama_backward.default,
        (torch.tensor(1.5, device=DEV), *x, w, rs, 0.2, gran),
    )


def test_compile_fullgraph():
    x = _cuda(make_inputs(8, 64, 3, dtype=torch.float32))

    def f(lp, old, adv, mask):
        return pama_ext.pama_loss(lp, old, adv, mask, backend="cuda", nonfinite="mask")

    cf = torch.compile(f, fullgraph=True)
    lp1 = x.logp.clone().requires_grad_(True)
    lp2 = x.logp.clone().requires_grad_(True)
    l1 = f(lp1, *x[1:])
    l2 = cf(lp2, *x[1:])
    l1.backward()
    l2.backward()
    assert torch.equal(l1, l2)
    assert torch.equal(lp1.grad, lp2.grad)


# --- issue 10, defect 3: non-finite per-sequence advantages under nonfinite="mask" -------------
# A [B, N] row holding +inf / -inf / nan must be dropped exactly as if the row were masked out
# (the kernels used to build its sums as A_i * 0 = inf * 0 = NaN). Compared against the same
# inputs with that row's mask cleared and its advantages replaced by finite values: equal
# loss, weights, row scales, objective and gradient (and the reference agrees). The
# backend-generic cases (N = 1, 2, 3, 5, through pama_loss) are in test_nonfinite_sequence.py;
# these add the kernel paths: N = 8 (specialised), 16 (runtime N), rows split into segments.
@pytest.mark.parametrize("n", [2, 3, 5, 8, 16])
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
def test_nonfinite_sequence_advantages_masked_out(n, gran, bad):
    for b, t in [(6, 37), (3, 2100)]:  # rows grouped in one unit; rows split into segments
        x = make_inputs(b, t, n, dtype=torch.float32, per_sequence=True, mask_kind="full", seed=11 + n)
        adv = x.advantages.clone()
        adv[1, n - 1] = bad
        adv[b - 1, 0] = bad
        y = type(x)(x.logp, x.old_logp, adv, x.mask)
        mask = x.mask.clone()
        mask[1] = False
        mask[b - 1] = False
        z = type(x)(x.logp, x.old_logp, x.advantages, mask)  # the same rows masked out instead
        for agg in AGGS:
            loss, w, rs, st = _fwd(_cuda(y), gran, agg)
            loss_z, w_z, rs_z, st_z = _fwd(_cuda(z), gran, agg)
            assert torch.isfinite(loss).all() and torch.isfinite(w).all() and torch.isfinite(st).all()
            assert torch.equal(loss, loss_z), (gran, agg, bad, loss, loss_z)
            assert torch.equal(rs, rs_z)
            assert torch.equal(w, w_z)  # sequence: the dropped rows get theorem1 of zeros either way
            assert torch.equal(st[[0, 1, 2, 3, 5, 6, 7]], st_z[[0, 1, 2, 3, 5, 6, 7]])
            assert st[4].item() == 2 * t and st_z[4].item() == 0  # the dropped tokens are counted
            g = _bwd(_cuda(y), w, rs, gran, 1.5)
            g_z = _bwd(_cuda(z), w_z, rs_z, gran, 1.5)
            assert torch.equal(g, g_z)
            ref = reference.fused_forward(*upcast(y), 0.2, gran, agg, False)
            assert_close_rel(loss, ref[0], 2e-5, atol=1e-12, msg=f"loss {gran} {agg}")
            assert_close_rel(w, ref[1], 0.0, atol=1e-5, msg=f"weights {gran}")


# --- issue 10, defect 4: the runtime-N kernel (N outside 1, 2, 3, 4, 8), short and long rows ----
# T < the block / chunk (several rows per chunk), T = 1, T spanning several chunks, segments.
@pytest.mark.parametrize("n", [5, 6, 7, 16, 33, 64])
@pytest.mark.parametrize("shape", [(9, 1), (40, 3), (13, 29), (5, 200), (3, 700), (2, 4200)],
                         ids=["T1", "T3", "T29", "T200", "T700", "segments"])
@pytest.mark.parametrize("gran", GRANS)
def test_runtime_n_rows(n, shape, gran):
    b, t = shape
    x = make_inputs(b, t, n, dtype=torch.float32, mask_kind="random", seed=100 + n + t)
    for agg in AGGS:
        _check_against_reference(x, gran, agg, torch.float32)


@pytest.mark.parametrize("n", [5, 16, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_runtime_n_dtypes(n, dtype):
    x = make_inputs(11, 45, n, dtype=dtype, mask_kind="ragged", seed=n)
    for gran in GRANS:
        _check_against_reference(x, gran, "token_mean", dtype)


# per-token advantages with non-finite entries through the runtime-N kernel and the
# specialised ones: the token is dropped (counted in stats[4]), nothing turns into NaN
@pytest.mark.parametrize("n", [3, 5, 8, 16, 64])
def test_nonfinite_token_advantages_runtime_n(n):
    x = make_inputs(7, 90, n, dtype=torch.float32, mask_kind="full", seed=n)
    adv = x.advantages.clone()
    adv[0, 3, 0] = float("inf")
    adv[3, 50, n - 1] = float("-inf")
    adv[6, 89, n // 2] = float("nan")
    y = type(x)(x.logp, x.old_logp, adv, x.mask)
    for gran in GRANS:
        _check_against_reference(y, gran, "seq_mean_token_mean", torch.float32)
        _, _, _, st = _fwd(_cuda(y), gran, "token_mean")
        assert st[4].item() == 3


# sequence-level advantages, short rows (several rows per group of threads) and every width
@pytest.mark.parametrize("n", [1, 3, 5, 16, 64])
@pytest.mark.parametrize("shape", [(300, 1), (50, 7), (9, 130), (2, 2500)], ids=["T1", "T7", "T130", "segments"])
def test_sequence_advantages_short_rows(n, shape):
    b, t = shape
    x = make_inputs(b, t, n, dtype=torch.float32, per_sequence=True, mask_kind="random", seed=n + t)
    for gran in GRANS:
        _check_against_reference(x, gran, "seq_mean_token_mean", torch.float32)


@pytest.mark.parametrize("n", [5, 16, 64])
@pytest.mark.parametrize("per_sequence", [False, True], ids=["token_adv", "seq_adv"])
def test_runtime_n_bitwise_deterministic(n, per_sequence):
    x = _cuda(make_inputs(33, 300, n, dtype=torch.float32, per_sequence=per_sequence, seed=n))
    for gran in GRANS:
        outs = [_fwd(x, gran, "token_mean") for _ in range(3)]
        for o in outs[1:]:
            for a, b in zip(o, outs[0]):
                assert torch.equal(a, b), gran


@pytest.mark.parametrize("gran", GRANS)
def test_preference_is_the_contract_on_scaled_advantages(gran):
    # steerable PAMA on the CUDA kernels: the float64 reference on the scaled advantages
    from pama_ext.preference import scale_advantages

    x = make_inputs(4, 37, 3, dtype=torch.float32, seed=41, mask_kind="ragged")
    pref = torch.tensor([0.6, 0.3, 0.1])
    xc = _cuda(x)
    lp = xc.logp.clone().requires_grad_(True)
    loss = pama_ext.pama_loss(lp, xc.old_logp, xc.advantages, xc.mask, granularity=gran, backend="cuda", preference=pref)
    (grad,) = torch.autograd.grad(loss, lp)
    xs = upcast(x)
    lp0 = xs.logp.clone().requires_grad_(True)
    want = reference.pama_loss(lp0, xs.old_logp, scale_advantages(xs.advantages, pref.double()), xs.mask, 0.2, gran)
    (gwant,) = torch.autograd.grad(want, lp0)
    assert_close_rel(loss.cpu().double(), want, TOLS[torch.float32][0], msg="loss")
    assert_close_rel(grad.cpu().double(), gwant, TOLS[torch.float32][1], msg="grad")


# --- granularity "token": the forward's weights are the [B, T] per-token gradient factor ----------
# f[b, t] = s_t * u_t for a valid token with u_t <= 1+eps, else exactly 0 (masked out, dropped
# non-finite input, clipped), s_t the zero-abstaining min of the raw advantages, formed in the
# acc dtype. Through reduce_kernel_nt (N = 1, 3, 8), reduce_kernel_any (N = 5, 64) and
# reduce_kernel_bc ([B, N] advantages), rows grouped and split into segments, every dtype.
# The reference runs on the same (rounded) inputs in the same acc precision. Tokens whose ratio
# lies within 1e-5 of 1 + eps (after the rounding to dtype) are masked out, so that CPU and GPU
# exp (which may differ by an ulp or two) cannot disagree on the clip indicator.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 3, 5, 8, 64])
@pytest.mark.parametrize("per_sequence", [False, True], ids=["token_adv", "seq_adv"])
@pytest.mark.parametrize("shape", [(7, 300), (3, 4200)], ids=["rows", "segments"])
def test_token_factor_against_reference(dtype, n, per_sequence, shape):
    b, t = shape
    x = make_inputs(b, t, n, dtype=dtype, per_sequence=per_sequence, mask_kind="random", seed=7 * n + t,
                    margin=1e-3)
    # exact zeros: abstaining objectives decide some tokens (row 0 of [B, N] advantages: s = 0);
    # N = 3, 8 per token: advantages of both signs (s = 0 at a negative one)
    x = with_exact_zeros(x, seed=n + b, nonneg=per_sequence or n not in (3, 8))
    lp, old, adv, mask = x.logp.clone(), x.old_logp.clone(), x.advantages.clone(), x.mask.clone()
    near_clip = (torch.exp(lp.double() - old.double()) - 1.2).abs() < 1e-5
    mask &= ~near_clip
    mask[0, 1:4] = True  # the dropped tokens below
    lp[0, 1] = float("nan")  # dropped under nonfinite="mask": factor 0
    old[0, 2] = float("inf")
    if per_sequence:
        adv[b - 1, n - 1] = float("-inf")  # the whole row dropped
    else:
        adv[0, 3, n - 1] = float("inf")
    x = type(x)(lp, old, adv, mask)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    _, f, rs, st = _fwd(_cuda(x), "token", "token_mean")
    assert f.shape == (b, t) and f.dtype == acc and f.device.type == DEV and f.is_contiguous()
    ref = reference.fused_forward(*x, 0.2, "token", "token_mean", False)[1]
    assert ref.shape == (b, t) and ref.dtype == acc
    f = f.cpu()
    assert torch.isfinite(f).all()
    # exactly +0 wherever the token is masked out, dropped or clipped (and wherever s_t = 0)
    u = torch.exp(x.logp.double() - x.old_logp.double())
    a = x.advantages.double()
    fin_adv = torch.isfinite(a).all(-1)
    fin_adv = fin_adv[:, None].expand(b, t) if per_sequence else fin_adv
    valid = x.mask & torch.isfinite(x.logp.double()) & torch.isfinite(x.old_logp.double()) & fin_adv
    clipped = valid & (u > 1.2)
    zero = ~valid | clipped | (ref == 0)
    assert clipped.any() and (~valid).any() and (valid & ~clipped & (ref != 0)).any()
    assert torch.equal(f[zero], torch.zeros_like(f[zero])) and not torch.signbit(f[zero]).any(), (
        f"non-zero factor at {zero.logical_and(f != 0).nonzero()[:5].tolist()}")
    assert torch.equal(f == 0, ref == 0)
    # elsewhere s_t * u_t, within a few acc ulps of the reference's (exp may differ by an ulp)
    rel = ((f.double() - ref.double()).abs() / ref.double().abs().clamp_min(1e-300))[~zero]
    assert float(rel.max()) <= 8 * torch.finfo(acc).eps, float(rel.max())
    # the loss uses the same s_t and u_t: Smin = sum_t s_t min(u, 1+eps); the statistics agree
    assert st[4].item() == float((x.mask & ~fin_adv).sum())


@pytest.mark.parametrize("per_sequence", [False, True], ids=["token_adv", "seq_adv"])
def test_token_factor_overflowed_ratio_is_zero(per_sequence):
    # finite logp / old_logp whose difference overflows exp: u = inf is clipped and its factor
    # is 0 (a select, never inf * 0 = NaN); u = 0 gives 0 as well
    x = make_inputs(3, 40, 3, dtype=torch.float32, per_sequence=per_sequence, mask_kind="full", seed=9)
    lp, old = x.logp.clone(), x.old_logp.clone()
    lp[1, 4], old[1, 4] = 0.0, -200.0  # u = exp(200) = inf in float32
    lp[2, 7], old[2, 7] = -200.0, 0.0  # u = 0
    x = type(x)(lp, old, x.advantages, x.mask)
    _, f, _, st = _fwd(_cuda(x), "token", "token_mean")
    f = f.cpu()
    assert torch.isfinite(f).all() and f[1, 4].item() == 0.0 and f[2, 7].item() == 0.0
    assert not torch.signbit(f[1, 4]) and st[1].item() >= 1
    ref = reference.fused_forward(*x, 0.2, "token", "token_mean", False)[1]
    assert torch.equal(f == 0, ref == 0)
    assert_close_rel(f, ref, 8 * torch.finfo(torch.float32).eps)
