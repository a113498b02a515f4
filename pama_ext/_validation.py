"""Argument checks: every error names the bad argument and the shapes involved.

The checks only read metadata (shapes, dtypes, devices), so they cost no host
synchronisation and trace under ``torch.compile``.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch
from torch import Tensor

from .reference import DEFAULT_GRANULARITY, GRANULARITIES, LOSS_AGGS

MAX_OBJECTIVES = 64
NONFINITE_MODES = ("raise", "mask")
_FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _shape(x: Tensor) -> str:
    return "[" + ", ".join(str(d) for d in x.shape) + "]"


def check_choice(fn: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{fn}: unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}")


def check_clip_eps(fn: str, clip_eps) -> float:
    # numbers.Real admits numpy scalars; a tensor is refused (reading it would sync a GPU)
    if isinstance(clip_eps, bool) or not isinstance(clip_eps, numbers.Real):
        raise TypeError(f"{fn}: `clip_eps` must be a positive float, got {type(clip_eps).__name__}")
    clip_eps = float(clip_eps)
    if not clip_eps > 0 or clip_eps == float("inf"):
        raise ValueError(f"{fn}: `clip_eps` must be a finite float > 0, got {clip_eps}")
    return clip_eps


class LossSettings(NamedTuple):
    """The keyword settings of one loss / weights call, checked once where the public call
    enters (``check_settings``) and passed inward next to the ``LossInputs``."""

    fn: str  # the public name, for error messages
    clip_eps: float
    granularity: str = DEFAULT_GRANULARITY
    loss_agg: str = "token_mean"
    backend: str = "auto"  # resolved later, against the inputs' device
    nonfinite: str = "raise"


def check_settings(fn: str, clip_eps, granularity: str = DEFAULT_GRANULARITY, loss_agg: str = "token_mean",
                   backend: str = "auto", nonfinite: str = "raise") -> LossSettings:
    """The common keywords of the loss functions, checked (``clip_eps``, then the choices)."""
    clip_eps = check_clip_eps(fn, clip_eps)
    check_choice(fn, "granularity", granularity, GRANULARITIES)
    check_choice(fn, "loss_agg", loss_agg, LOSS_AGGS)
    check_choice(fn, "nonfinite", nonfinite, NONFINITE_MODES)
    return LossSettings(fn, clip_eps, granularity, loss_agg, backend, nonfinite)


def _check_tensor(fn: str, name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: `{name}` must be a torch.Tensor, got {type(x).__name__}")


def _check_float(fn: str, name: str, x: Tensor) -> None:
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{fn}: `{name}` must be float32, bfloat16, float16 or float64, got {x.dtype} "
            f"with shape {_shape(x)}"
        )


class LossInputs(NamedTuple):
    """Inputs normalised for the kernels: one floating dtype, contiguous, bool mask."""

    logp: Tensor
    old_logp: Tensor
    advantages: Tensor
    mask: Tensor


def check_loss_inputs(fn: str, logp, old_logp, advantages, mask) -> LossInputs:
    for name, x in (("logp", logp), ("old_logp", old_logp), ("advantages", advantages), ("mask", mask)):
        _check_tensor(fn, name, x)
    for name, x in (("logp", logp), ("old_logp", old_logp), ("advantages", advantages)):
        _check_float(fn, name, x)
    if mask.is_complex():
        raise TypeError(f"{fn}: `mask` must be bool, integer or floating, got {mask.dtype} with shape {_shape(mask)}")
    if logp.dim() != 2:
        raise ValueError(f"{fn}: `logp` must have shape [B, T], got {_shape(logp)}")
    b, t = logp.shape
    for name, x in (("old_logp", old_logp), ("mask", mask)):
        if x.shape != logp.shape:
            raise ValueError(
                f"{fn}: `{name}` must have the shape of `logp` {_shape(logp)} ([B, T]), got {_shape(x)}"
            )
    ok = (advantages.dim() == 3 and advantages.shape[:2] == (b, t)) or (
        advantages.dim() == 2 and advantages.shape[0] == b
    )
    if not ok:
        raise ValueError(
            f"{fn}: `advantages` must have shape [B, T, N] (per token) or [B, N] (per sequence) "
            f"with B, T = {b}, {t} from `logp` {_shape(logp)}, got {_shape(advantages)}"
        )
    n = advantages.shape[-1]
    if n == 0:
        raise ValueError(f"{fn}: `advantages` has N = 0 objectives (shape {_shape(advantages)}); N must be >= 1")
    if n > MAX_OBJECTIVES:
        raise ValueError(
            f"{fn}: `advantages` has N = {n} objectives (shape {_shape(advantages)}); at most {MAX_OBJECTIVES} are supported"
        )
    for name, x in (("old_logp", old_logp), ("advantages", advantages), ("mask", mask)):
        if x.device != logp.device:
            raise ValueError(f"{fn}: `{name}` is on {x.device} but `logp` is on {logp.device}; all inputs must share a device")
    dtype = torch.promote_types(torch.promote_types(logp.dtype, old_logp.dtype), advantages.dtype)
    # PPO never differentiates through the anchor policy or the advantages: detach them so
    # a graph left attached by the caller is not kept alive (documented: d/dlogp only).
    return LossInputs(
        logp.to(dtype).contiguous(),
        old_logp.detach().to(dtype).contiguous(),
        advantages.detach().to(dtype).contiguous(),
        (mask.detach() != 0).contiguous() if mask.dtype != torch.bool else mask.detach().contiguous(),
    )


def check_gram(fn: str, gram) -> Tensor:
    _check_tensor(fn, "gram", gram)
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"{fn}: `gram` must be a square N x N matrix, got shape {_shape(gram)}")
    n = gram.shape[0]
    if n == 0 or n > MAX_OBJECTIVES:
        raise ValueError(f"{fn}: `gram` must be N x N with 1 <= N <= {MAX_OBJECTIVES}, got shape {_shape(gram)}")
    _check_float(fn, "gram", gram)
    g = gram.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(g).all()):
        raise ValueError(f"{fn}: `gram` {_shape(gram)} has non-finite entries")
    scale = float(g.abs().max())
    asym = float((g - g.T).abs().max())
    if asym > 1e-6 * scale:
        raise ValueError(f"{fn}: `gram` {_shape(gram)} is not symmetric (max |G - G^T| = {asym:.3g})")
    if n > 1 and scale > 0:
        low = float(torch.linalg.eigvalsh(0.5 * (g + g.T)).min())
        if low < -1e-8 * scale:
            raise ValueError(
                f"{fn}: `gram` {_shape(gram)} is not positive semi-definite (smallest eigenvalue {low:.3g})"
            )
    elif n == 1 and float(g[0, 0]) < 0:
        raise ValueError(f"{fn}: `gram` {_shape(gram)} is not positive semi-definite (G[0, 0] < 0)")
    return g


def check_scalars(fn: str, a) -> Tensor:
    _check_tensor(fn, "a", a)
    _check_float(fn, "a", a)
    if a.dim() == 0 or a.shape[-1] == 0:
        raise ValueError(f"{fn}: `a` must have a non-empty last dimension (the N objectives), got shape {_shape(a)}")
    if bool(torch.isnan(a).any()):
        raise ValueError(f"{fn}: `a` {_shape(a)} contains NaN")
    return a
