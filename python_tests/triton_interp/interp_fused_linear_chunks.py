"""The Triton chunk kernels of the fused linear loss (``pama_ext/fused_linear/triton_chunks.py``)
against float64.

Runs in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, started by
``python_tests/test_triton_interpreter.py``) or compiled on a GPU
(``PAMA_TRITON_TEST_DEVICE=cuda``); see ``conftest.py`` here for the commands.

* The two kernels against the PyTorch chunk functions (``chunks.py``) run in float64 on the
  same (rounded) logits: C = 1, 3, 17 rows, V = 1, 5, 127, 1000, 4099 columns (one column,
  a row shorter than a block, several blocks with a short last one), temperatures 1 and
  0.7, float32/bfloat16/float16 logits, rows of large magnitude (spread 1e4, offsets of
  +-3e4, one dominant logit), targets at the row's minimum and maximum; a logit row as a
  slice of a wider buffer and a transposed one; rows with infinite and NaN logits.
* The whole ``fused_linear_pama_loss(..., backend="triton")`` (the kernels picked by
  ``chunk_ops``; ``pama_loss``'s own Triton kernels run too) against the unfused float64
  formulation, value and gradients with respect to hidden, weight and bias, for the one-pass
  ``token`` and the two-pass ``batch`` granularity.

Tolerances: a float32 log-softmax of logits z has an absolute error of a few float32 ulps of
``1 + max|z|`` (the rounding of z itself, then lse and z_target - lse); the PyTorch float32
functions measure below 2 ulps on these rows. The kernels must stay within 8.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, require_interpreter_or_gpu, TOLS, assert_close_rel

require_interpreter_or_gpu()

import pama_ext  # noqa: E402
from pama_ext.fused_linear import chunks as torch_chunks  # noqa: E402
from pama_ext.fused_linear import triton_chunks  # noqa: E402
from pama_ext.fused_linear.loss import chunk_ops  # noqa: E402
from pama_ext.fused_linear.reference import unfused_linear_pama_loss  # noqa: E402

F32, F64 = torch.float32, torch.float64
EPS32 = 2.0**-23
ULPS = 8
ROWS = (1, 3, 17)
VOCABS = (1, 5, 127, 1000, 4099)


def make_logits(c: int, v: int, dtype: torch.dtype, seed: int):
    """[c, v] logits in ``dtype`` with rows of different character, and targets [c]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(c, v, generator=g, dtype=F64)
    targets = torch.randint(0, v, (c,), generator=g)
    for r in range(c):
        kind = r % 6
        if kind == 1:  # a spread of 1e4: the softmax is one-hot, exp underflows elsewhere
            x[r] *= 1e4
            targets[r] = int(x[r].argmin())  # logp ~ -1e4
        elif kind == 2:
            x[r] = 3 * x[r] + 3e4  # a large common offset: the max must be subtracted
        elif kind == 3:
            x[r] = 3 * x[r] - 3e4
            targets[r] = int(x[r].argmax())
        elif kind == 4:  # one logit 80 above the rest: the others' exp are ~1e-35
            x[r, int(targets[r])] += 80.0
        elif kind == 5:
            x[r] *= 30.0
    if dtype == torch.float16:  # its range ends at 65504
        x = x.clamp(-6e4, 6e4)
    return x.to(dtype), targets


def row_scale(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """1 + max |z| per row, float64: the scale of a float32 log-softmax's rounding."""
    return 1.0 + (x.to(F64) / temperature).abs().amax(1)


def check_rows(actual, expected, atol_rows, what):
    """|actual - expected| <= atol per row, float64 (and the same shape, no NaN)."""
    a = actual.detach().to(device="cpu", dtype=F64)
    e = expected.to(F64)
    assert a.shape == e.shape, (what, a.shape, e.shape)
    assert bool(torch.isfinite(a).all()), f"{what}: non-finite values"
    err = (a - e).abs()
    tol = atol_rows.reshape(-1, *([1] * (e.dim() - 1)))
    bad = err > tol
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} entries off, worst error / tolerance {float((err / tol).max()):.3g} "
        f"(max error {float(err.max()):.3g})"
    )


@pytest.mark.parametrize("dtype", [F32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunk_kernels_against_float64(dtype, temperature):
    for c in ROWS:
        for v in VOCABS:
            x, targets = make_logits(c, v, dtype, seed=1000 * c + v)
            tag = f"C={c} V={v} T={temperature} {dtype}"
            x64 = x.to(F64)
            r_logp, r_lse = torch_chunks.logp_lse(x64.clone(), targets, temperature)
            g = torch.randn(c, generator=torch.Generator().manual_seed(v), dtype=F64)
            r_d = torch_chunks.grad_logits_(x64.clone(), targets, r_lse, g, temperature)
            scale = row_scale(x, temperature)
            xd = x.to(DEVICE)
            td = targets.to(DEVICE)

            logp, lse = triton_chunks.logp_lse(xd, td, temperature)
            assert logp.dtype == lse.dtype == F32 and logp.device.type == DEVICE, tag
            assert torch.equal(xd.cpu(), x), f"logp_lse changed its input ({tag})"
            check_rows(lse, r_lse, ULPS * EPS32 * scale, f"lse {tag}")
            check_rows(logp, r_logp, ULPS * EPS32 * scale, f"logp {tag}")

            buf = xd.clone()
            d = triton_chunks.grad_logits_(buf, td, lse, g.to(device=DEVICE, dtype=F32), temperature)
            assert d.dtype == F32 and d.shape == (c, v), tag
            if dtype == F32:  # over the logits, as chunks.py
                assert d.data_ptr() == buf.data_ptr(), tag
            else:
                assert torch.equal(buf.cpu(), x), f"grad_logits_ changed a {dtype} input ({tag})"
            # d = g (onehot - p) / t: the error of p (<= 1) scaled by |g| / t
            check_rows(d, r_d, ULPS * EPS32 * scale * (g.abs() / temperature) + 1e-30, f"d {tag}")


def test_strided_and_transposed_logits():
    """A chunk whose rows are a slice of a wider buffer (row stride > V) is read and written
    in place without touching the rest of the buffer; a transposed one (column stride != 1)
    gives the same numbers."""
    c, v, temperature = 5, 1000, 0.7
    x, targets = make_logits(c, v, F32, seed=7)
    r_logp, r_lse = torch_chunks.logp_lse(x.to(F64), targets, temperature)
    g = torch.linspace(-2, 3, c, dtype=F64)
    r_d = torch_chunks.grad_logits_(x.to(F64), targets, r_lse, g, temperature)
    tol = ULPS * EPS32 * row_scale(x, temperature)

    wide = torch.full((c, v + 37), 123.0, dtype=F32)
    wide[:, 11 : 11 + v] = x
    wide = wide.to(DEVICE)
    view = wide[:, 11 : 11 + v]
    assert view.stride() == (v + 37, 1)
    logp, lse = triton_chunks.logp_lse(view, targets.to(DEVICE), temperature)
    check_rows(logp, r_logp, tol, "logp (row stride > V)")
    d = triton_chunks.grad_logits_(view, targets.to(DEVICE), lse, g.to(DEVICE, F32), temperature)
    assert d.data_ptr() == view.data_ptr() and d.stride() == view.stride()
    check_rows(d, r_d, tol * g.abs() / temperature, "d (row stride > V)")
    outside = torch.cat([wide[:, :11], wide[:, 11 + v :]], 1)
    assert bool((outside == 123.0).all()), "grad_logits_ wrote outside the chunk's columns"

    xt = x.T.contiguous().to(DEVICE).T  # column stride C
    assert xt.stride(1) != 1
    logp_t, lse_t = triton_chunks.logp_lse(xt, targets.to(DEVICE), temperature)
    check_rows(logp_t, r_logp, tol, "logp (transposed)")
    d_t = triton_chunks.grad_logits_(xt, targets.to(DEVICE), lse_t, g.to(DEVICE, F32), temperature)
    check_rows(d_t, r_d, tol * g.abs() / temperature, "d (transposed)")


def test_infinite_and_nan_rows_follow_torch():
    """-inf logits (banned tokens) are probabilities 0; a row's lse is -inf / +inf / NaN
    exactly when torch.logsumexp's is (the fused loss finds such rows by ``isfinite(lse)``).
    V = 4099: the first block of row 1 is all -inf, the running sum starts in the second."""
    c, v = 5, 4099
    x, targets = make_logits(c, v, F32, seed=3)
    x[0, ::3] = float("-inf")
    targets[0] = 1
    x[1, :4096] = float("-inf")
    targets[1] = 4097
    x[2] = float("-inf")  # all -inf: lse = -inf
    x[3, 17] = float("inf")  # lse = +inf
    x[4, 5] = float("nan")
    logp, lse = triton_chunks.logp_lse(x.to(DEVICE), targets.to(DEVICE), 1.0)
    r_logp, r_lse = torch_chunks.logp_lse(x.to(F64), targets, 1.0)
    lse, logp = lse.cpu().to(F64), logp.cpu().to(F64)
    tol = ULPS * EPS32 * row_scale(torch.where(torch.isfinite(x), x, 0.0), 1.0)
    check_rows(lse[:2], r_lse[:2], tol[:2], "lse (rows with -inf logits)")
    check_rows(logp[:2], r_logp[:2], tol[:2], "logp (rows with -inf logits)")
    assert lse[2] == float("-inf") and lse[3] == float("inf") and bool(lse[4].isnan()), lse
    assert torch.equal(torch.isfinite(lse), torch.isfinite(r_lse))
    g = torch.ones(2, dtype=F32, device=DEVICE)
    r_d = torch_chunks.grad_logits_(x[:2].to(F64), targets[:2], r_lse[:2], g.cpu().to(F64), 1.0)
    d = triton_chunks.grad_logits_(x[:2].to(DEVICE), targets[:2].to(DEVICE), lse[:2].to(DEVICE, F32), g, 1.0)
    check_rows(d, r_d, tol[:2], "d (rows with -inf logits)")


def test_float64_logits_use_the_torch_functions():
    x, targets = make_logits(3, 127, F64, seed=5)
    logp, lse = triton_chunks.logp_lse(x.to(DEVICE).clone(), targets.to(DEVICE), 0.7)
    r_logp, r_lse = torch_chunks.logp_lse(x.clone(), targets, 0.7)
    assert logp.dtype == F64 and torch.equal(logp.cpu(), r_logp) and torch.equal(lse.cpu(), r_lse)
    g = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    d = triton_chunks.grad_logits_(x.to(DEVICE).clone(), targets.to(DEVICE), lse, g.to(DEVICE), 0.7)
    assert d.dtype == F64 and torch.equal(d.cpu(), torch_chunks.grad_logits_(x.clone(), targets, r_lse, g, 0.7))


def test_supports():
    assert triton_chunks.supports(DEVICE)
    assert triton_chunks.supports(torch.device("cuda", 0))
    assert chunk_ops("triton", torch.device(DEVICE)) is triton_chunks
    assert chunk_ops("torch", torch.device(DEVICE)) is torch_chunks


# --------------------------------------------------------------------------- the whole loss
def loss_case(B, T, H, V, N, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=F64).to(F32)
    weight = (0.5 * torch.randn(V, H, generator=g, dtype=F64)).to(F32)
    bias = (0.3 * torch.randn(V, generator=g, dtype=F64)).to(F32)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.75
    mask[0, 0] = True
    with torch.no_grad():
        lp = torch.log_softmax((hidden.double() @ weight.double().T + bias.double()) / 0.7, -1)
        lp = lp.gather(-1, targets[..., None])[..., 0]
    old = (lp + 0.4 * (2 * torch.rand(B, T, generator=g, dtype=F64) - 1)).to(F32)  # ratios straddle 1 +- 0.2
    adv = torch.randn(B, T, N, generator=g, dtype=F64).to(F32)
    return dict(hidden=hidden, weight=weight, bias=bias, targets=targets, old_logp=old, advantages=adv, mask=mask)


def _loss_and_grads(fn, case, dtype, device, **kw):
    def on(k):
        return case[k].to(device=device, dtype=dtype)

    leaves = [on(k).requires_grad_(True) for k in ("hidden", "weight", "bias")]
    loss = fn(leaves[0], leaves[1], case["targets"].to(device), on("old_logp"), on("advantages"),
              case["mask"].to(device), bias=leaves[2], **kw)
    return loss.detach(), torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("granularity", ["token", "batch"])
@pytest.mark.parametrize("V", [37, 4099])
def test_fused_loss_with_triton_chunks(granularity, V):
    """B*T = 14 rows in chunks of 5 (a short last chunk), temperature 0.7, with bias."""
    case = loss_case(B=2, T=7, H=8, V=V, N=3, seed=V)
    kw = dict(granularity=granularity, temperature=0.7)
    fused = pama_ext.fused_linear_pama_loss
    loss, grads = _loss_and_grads(fused, case, F32, DEVICE, backend="triton", chunk_size=5, **kw)
    r_loss, r_grads = _loss_and_grads(unfused_linear_pama_loss, case, F64, "cpu", **kw)
    loss_rtol, grad_rtol, _ = TOLS[F32]
    assert loss.dtype == F32
    assert_close_rel(loss, r_loss, loss_rtol, atol=1e-7, msg=f"loss {granularity} V={V}")
    for name, a, e in zip(("hidden", "weight", "bias"), grads, r_grads):
        assert a.dtype == F32 and a.device.type == DEVICE
        assert_close_rel(a, e, grad_rtol, msg=f"d/d{name} {granularity} V={V}")
