"""One comparison of a loss backend against a float64 oracle, shared by the reference tests
(``test_loss_reference.py``) and the Triton kernel tests (``triton_interp/``).

* ``reference_oracle``: what a backend must reproduce, in float64 on the same (already
  rounded) inputs, from ``pama_ext.reference.fused_forward`` / ``fused_backward``. A test
  may bring its own oracle instead (``test_loss_reference.py`` spells the contract out
  independently of ``pama_ext.reference``) as an ``Expected``.
* ``run_backend``: loss, gradient with respect to ``logp`` and ``PamaStats`` through the
  public ``pama_ext.pama_loss_and_stats`` with one backend, the inputs on ``device``.
* ``assert_matches``: dtypes, shapes and device of the result, then value, gradient,
  weights and row scale within the dtype's tolerances (``conftest.TOLS``), the counting
  statistics exactly, the solve's objective to 1e-5 and its KKT residual ~0.
* ``check_backend``: the three in one call, optionally also ``pama_ext.pama_weights``
  against the weights the loss used (per-token weights against the oracle's).

Imported as ``oracle`` from test modules here and in ``triton_interp/`` (both directories
are on ``sys.path`` under pytest's default import mode). The helpers it takes from
``conftest`` are the same objects in both places (``triton_interp/conftest.py`` re-exports
this directory's).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import pytest
import torch
from torch import Tensor

import pama_ext
from pama_ext import reference
from conftest import CLIP_EPS, TOLS, Inputs, assert_close_rel, leaf, upcast

F64 = torch.float64
#: the statistics a backend must count exactly (the others are floating-point results)
COUNT_FIELDS = ("masked_tokens", "clipped_tokens", "nonfinite_logp", "nonfinite_old_logp",
                "nonfinite_advantages", "nonempty_rows")


class Expected(NamedTuple):
    """The float64 oracle's answer for one call."""

    loss: Tensor  # 0-dim
    grad: Tensor  # [B, T]: grad_out * d loss / d logp
    weights: Tensor  # as PamaStats.weights ([0] for token)
    row_scale: Tensor  # [B]
    stats: dict  # STATS_FIELDS -> float
    token_weights: Optional[Tensor] = None  # token: the [B, T, N] weights of pama_weights (None: the reference's)


def reference_oracle(x: Inputs, granularity: str, loss_agg: str, clip_eps: float = CLIP_EPS,
                     nonfinite: str = "raise", grad_out: float = 1.0) -> Expected:
    """``pama_ext.reference``'s fused forward and backward in float64 on ``x``'s values."""
    xu = upcast(x)
    loss, w, rs, stats = reference.fused_forward(*xu, clip_eps, granularity, loss_agg, nonfinite == "raise")
    grad = reference.fused_backward(torch.tensor(grad_out, dtype=F64), *xu, w, rs, clip_eps, granularity)
    if granularity == "token":  # the op's [B, T] factor is its backward's; PamaStats reports [0]
        w = w.new_zeros(0)
    return Expected(loss, grad, w, rs, dict(zip(pama_ext.STATS_FIELDS, stats.tolist())))


def run_backend(x: Inputs, backend: str, granularity: str, loss_agg: str = "token_mean", *,
                clip_eps: float = CLIP_EPS, nonfinite: str = "raise", grad_out: Optional[float] = None,
                preference=None, device: str = "cpu"):
    """(loss, grad wrt logp, PamaStats) of ``pama_ext.pama_loss_and_stats`` with ``backend``,
    the inputs moved to ``device``; ``grad_out`` (default 1) seeds the backward."""
    xd = Inputs(*(t.to(device) for t in x))
    lp = leaf(xd.logp)
    loss, st = pama_ext.pama_loss_and_stats(
        lp, xd.old_logp, xd.advantages, xd.mask, clip_eps=clip_eps, granularity=granularity,
        loss_agg=loss_agg, backend=backend, nonfinite=nonfinite, preference=preference,
    )
    go = None if grad_out is None else torch.tensor(grad_out, dtype=loss.dtype, device=device)
    (grad,) = torch.autograd.grad(loss, lp, grad_outputs=go)
    return loss.detach(), grad, st


def assert_matches(actual, expected: Expected, x: Inputs, tag: str, device: str = "cpu") -> None:
    """``actual`` = (loss, grad, PamaStats) of a backend on ``x`` agrees with ``expected``
    within the tolerances of ``x.logp``'s dtype (``conftest.TOLS``)."""
    loss, grad, st = actual
    dtype = x.logp.dtype
    loss_rtol, grad_rtol, w_atol = TOLS[dtype]
    acc = F64 if dtype == F64 else torch.float32
    assert loss.shape == () and loss.dtype == acc, tag
    assert grad.dtype == dtype and grad.shape == x.logp.shape and grad.device.type == device, tag
    assert st.weights.dtype == acc and st.row_scale.dtype == acc, tag
    assert st.stats.dtype == F64 and st.stats.shape == (len(pama_ext.STATS_FIELDS),), tag
    assert st.weights.shape == expected.weights.shape, (tag, st.weights.shape, expected.weights.shape)
    assert_close_rel(loss, expected.loss, loss_rtol, atol=1e-300, msg=f"loss {tag}")
    assert_close_rel(grad, expected.grad, grad_rtol, msg=f"grad {tag}")
    assert_close_rel(st.weights, expected.weights, 0.0, atol=w_atol, msg=f"weights {tag}")
    assert_close_rel(st.row_scale, expected.row_scale, 1e-6 if dtype != F64 else 1e-14, msg=f"row_scale {tag}")
    stats = st.as_dict()
    assert list(stats) == list(pama_ext.STATS_FIELDS), tag
    for key in COUNT_FIELDS:
        assert stats[key] == expected.stats[key], (tag, key, stats[key], expected.stats[key])
    assert stats["objective"] == pytest.approx(expected.stats["objective"], rel=1e-5, abs=1e-300), tag
    # the solve's KKT residual is ~0 (relative to the Gram's scale) and never negative
    assert 0.0 <= stats["kkt_residual"] <= 1e-9 * max(1.0, stats["objective"]) + 1e-12, tag


def assert_pama_weights_match(x: Inputs, backend: str, granularity: str, st, expected: Expected, tag: str,
                              clip_eps: float = CLIP_EPS, device: str = "cpu") -> None:
    """``pama_ext.pama_weights`` agrees with the weights the loss used (``st``); for ``token``
    with the per-token weights of ``expected`` (default: ``pama_ext.reference``'s)."""
    xd = Inputs(*(t.to(device) for t in x))
    w = pama_ext.pama_weights(*xd, clip_eps=clip_eps, granularity=granularity, backend=backend)
    w_atol = TOLS[x.logp.dtype][2]
    if granularity == "token":
        want = expected.token_weights
        if want is None:
            want = reference.pama_weights(*upcast(x), clip_eps, "token")
        b, t = x.logp.shape
        assert w.shape == (b, t, x.advantages.shape[-1]), tag
        assert_close_rel(w, want, 0.0, atol=w_atol, msg=f"pama_weights {tag}")
    else:
        assert w.shape == st.weights.shape, tag
        assert_close_rel(w, st.weights, 0.0, atol=w_atol, msg=f"pama_weights {tag}")


def check_backend(x: Inputs, backend: str, granularity: str, loss_agg: str = "token_mean", *,
                  clip_eps: float = CLIP_EPS, nonfinite: str = "raise", grad_out: Optional[float] = None,
                  preference=None, device: str = "cpu", expected: Optional[Expected] = None,
                  pama_weights: bool = False):
    """Run ``backend`` on ``x`` and compare it with ``expected`` (default: ``reference_oracle``
    on the same inputs and options); ``pama_weights``: also check ``pama_ext.pama_weights``.
    Returns the backend's (loss, grad, PamaStats)."""
    if expected is None:
        expected = reference_oracle(x, granularity, loss_agg, clip_eps, nonfinite, 1.0 if grad_out is None else grad_out)
    actual = run_backend(x, backend, granularity, loss_agg, clip_eps=clip_eps, nonfinite=nonfinite,
                         grad_out=grad_out, preference=preference, device=device)
    b, t, n = x.logp.shape[0], x.logp.shape[1], x.advantages.shape[-1]
    tag = f"{backend}/{granularity}/{loss_agg}/{x.logp.dtype}/B{b}T{t}N{n}"
    assert_matches(actual, expected, x, tag, device)
    if pama_weights:
        assert_pama_weights_match(x, backend, granularity, actual[2], expected, tag, clip_eps, device)
    return actual
