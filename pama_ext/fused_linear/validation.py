"""Argument checks of ``fused_linear_pama_loss``: done once, where the public call enters.

Every error names the bad argument and the shapes involved. One host synchronisation: the
target ids at masked positions are checked against the vocabulary (an out-of-range id
would otherwise be a device-side assert on a GPU, or a silent wrong gather).
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .._validation import (
    GRANULARITIES,
    LOSS_AGGS,
    NONFINITE_MODES,
    _check_float,
    _check_tensor,
    _shape,
    check_choice,
    check_clip_eps,
)
from ..reference import DEFAULT_GRANULARITY

FN = "fused_linear_pama_loss"
#: the keywords of ``pama_loss`` that ``fused_linear_pama_loss`` passes through
PAMA_LOSS_KEYWORDS = ("clip_eps", "granularity", "loss_agg", "backend", "nonfinite", "preference")


class LossOptions(NamedTuple):
    clip_eps: float
    granularity: str
    loss_agg: str
    backend: str
    nonfinite: str
    temperature: float
    kl_coef: float
    chunk_size: Optional[int]

    def pama_keywords(self) -> dict:
        return dict(
            clip_eps=self.clip_eps,
            granularity=self.granularity,
            loss_agg=self.loss_agg,
            backend=self.backend,
            nonfinite=self.nonfinite,
        )


class FusedInputs(NamedTuple):
    """Validated inputs: ``hidden`` flattened to [B*T, H], ``targets`` [B*T] int64 with the
    ids of masked-out positions replaced by 0 (they are never used), ``mask`` bool [B, T]."""

    hidden: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    targets: Tensor
    old_logp: Tensor
    advantages: Tensor
    mask: Tensor
    ref_logp: Optional[Tensor]
    batch: int
    time: int


def _check_real(name: str, value, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{FN}: `{name}` must be a float, got {type(value).__name__}")
    value = float(value)
    ok = value > 0 if positive else value >= 0
    if not ok or value == float("inf") or value != value:
        raise ValueError(f"{FN}: `{name}` must be a finite float {'> 0' if positive else '>= 0'}, got {value}")
    return value


def check_options(keywords: dict, temperature, kl_coef, chunk_size) -> LossOptions:
    unknown = sorted(set(keywords) - set(PAMA_LOSS_KEYWORDS))
    if unknown:
        raise TypeError(
            f"{FN}: unexpected keyword argument(s) {', '.join(map(repr, unknown))}; the pama_loss keywords "
            f"it passes through are {', '.join(map(repr, PAMA_LOSS_KEYWORDS))}"
        )
    granularity = keywords.get("granularity", DEFAULT_GRANULARITY)
    loss_agg = keywords.get("loss_agg", "token_mean")
    nonfinite = keywords.get("nonfinite", "raise")
    check_choice(FN, "granularity", granularity, GRANULARITIES)
    check_choice(FN, "loss_agg", loss_agg, LOSS_AGGS)
    check_choice(FN, "nonfinite", nonfinite, NONFINITE_MODES)
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
            raise TypeError(f"{FN}: `chunk_size` must be None or an int >= 1, got {type(chunk_size).__name__}")
        if chunk_size < 1:
            raise ValueError(f"{FN}: `chunk_size` must be None or an int >= 1, got {chunk_size}")
        chunk_size = int(chunk_size)
    return LossOptions(
        clip_eps=check_clip_eps(FN, keywords.get("clip_eps", 0.2)),
        granularity=granularity,
        loss_agg=loss_agg,
        backend=keywords.get("backend", "auto"),
        nonfinite=nonfinite,
        temperature=_check_real("temperature", temperature, positive=True),
        kl_coef=_check_real("kl_coef", kl_coef, positive=False),
        chunk_size=chunk_size,
    )


def _check_head(fn: str, hidden, weight, targets, mask, bias, check_ids: bool = True):
    """The LM-head inputs: shapes, dtypes, devices, and (``check_ids``) the target ids (one sync)."""
    for name, x in (("hidden", hidden), ("weight", weight), ("targets", targets), ("mask", mask)):
        _check_tensor(fn, name, x)
    if bias is not None:
        _check_tensor(fn, "bias", bias)
    if hidden.dim() != 3:
        raise ValueError(f"{fn}: `hidden` must have shape [B, T, H], got {_shape(hidden)}")
    if not hidden.is_floating_point():
        raise TypeError(f"{fn}: `hidden` must be floating (the last hidden states), got {hidden.dtype} with shape {_shape(hidden)}")
    _check_float(fn, "hidden", hidden)
    _check_float(fn, "weight", weight)
    b, t, h = hidden.shape
    if weight.dim() != 2 or weight.shape[1] != h:
        raise ValueError(f"{fn}: `weight` must have shape [V, H] with H = {h} from `hidden` {_shape(hidden)}, got {_shape(weight)}")
    v = weight.shape[0]
    if v == 0:
        raise ValueError(f"{fn}: `weight` {_shape(weight)} has an empty vocabulary (V = 0)")
    if bias is not None:
        _check_float(fn, "bias", bias)
        if bias.shape != (v,):
            raise ValueError(f"{fn}: `bias` must have shape [V] = [{v}] from `weight` {_shape(weight)}, got {_shape(bias)}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"{fn}: `targets` must hold integer token ids (int64), got {targets.dtype} with shape {_shape(targets)}")
    for name, x in (("targets", targets), ("mask", mask)):
        if x.shape != (b, t):
            raise ValueError(f"{fn}: `{name}` must have shape [B, T] = [{b}, {t}] from `hidden` {_shape(hidden)}, got {_shape(x)}")
    if mask.is_complex():
        raise TypeError(f"{fn}: `mask` must be bool, integer or floating, got {mask.dtype} with shape {_shape(mask)}")
    for name, x in (("weight", weight), ("targets", targets), ("mask", mask), ("bias", bias)):
        if x is not None and x.device != hidden.device:
            raise ValueError(f"{fn}: `{name}` is on {x.device} but `hidden` is on {hidden.device}; all inputs must share a device")
    mask_b = mask.detach() != 0 if mask.dtype != torch.bool else mask.detach()
    tg = targets.detach().to(torch.int64)
    if check_ids:
        tg = checked_target_ids(fn, tg, mask_b, v)
    return mask_b.contiguous(), tg.reshape(b * t).contiguous(), b, t


def checked_target_ids(fn: str, tg: Tensor, mask_b: Tensor, v: int) -> Tensor:
    """``tg`` with every masked id checked to lie in [0, V) (one host sync), and the ids at
    masked-out positions (padding, -100 labels), which are never used, replaced by 0."""
    bad = mask_b & ((tg < 0) | (tg >= v))
    n_bad = int(bad.sum())  # the documented host synchronisation
    if n_bad:
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{fn}: `targets` {_shape(tg)} has {n_bad} id(s) outside [0, V) = [0, {v}) at masked positions "
            f"(first at [b, t] = {list(first)}: {int(tg[first])})"
        )
    return torch.where(mask_b, tg, torch.zeros((), dtype=torch.int64, device=tg.device))


def check_logp_inputs(fn: str, hidden, weight, targets, mask, bias, check_ids: bool = True) -> FusedInputs:
    """The inputs of ``fused_linear_logp_loss`` and ``fused_linear_logp`` (no advantages)."""
    mask_b, tg, b, t = _check_head(fn, hidden, weight, targets, mask, bias, check_ids)
    return FusedInputs(hidden.reshape(b * t, -1), weight, bias, tg, None, None, mask_b, None, b, t)


def check_inputs(hidden, weight, targets, old_logp, advantages, mask, bias, ref_logp, kl_coef: float,
                 check_ids: bool = True) -> FusedInputs:
    """``fused_linear_pama_loss``'s inputs; ``check_ids=False`` leaves the target-id check
    (the one host sync) to the op, so that the metadata checks trace under torch.compile."""
    mask_b, tg, b, t = _check_head(FN, hidden, weight, targets, mask, bias, check_ids)
    for name, x in (("old_logp", old_logp), ("advantages", advantages), ("ref_logp", ref_logp)):
        if x is not None:
            _check_tensor(FN, name, x)
            _check_float(FN, name, x)
            if x.device != hidden.device:
                raise ValueError(f"{FN}: `{name}` is on {x.device} but `hidden` is on {hidden.device}; all inputs must share a device")
    if old_logp.shape != (b, t):
        raise ValueError(f"{FN}: `old_logp` must have shape [B, T] = [{b}, {t}] from `hidden` {_shape(hidden)}, got {_shape(old_logp)}")
    ok = (advantages.dim() == 3 and advantages.shape[:2] == (b, t)) or (advantages.dim() == 2 and advantages.shape[0] == b)
    if not ok:
        raise ValueError(
            f"{FN}: `advantages` must have shape [B, T, N] (per token) or [B, N] (per sequence) with "
            f"B, T = {b}, {t} from `hidden` {_shape(hidden)}, got {_shape(advantages)}"
        )
    if ref_logp is not None:
        if ref_logp.shape != (b, t):
            raise ValueError(f"{FN}: `ref_logp` must have shape [B, T] = [{b}, {t}] from `hidden` {_shape(hidden)}, got {_shape(ref_logp)}")
    elif kl_coef > 0:
        raise ValueError(f"{FN}: `kl_coef` = {kl_coef} > 0 needs `ref_logp` [B, T] (the reference policy's log-probabilities)")
    return FusedInputs(
        hidden=hidden.reshape(b * t, -1),
        weight=weight,
        bias=bias,
        targets=tg,
        old_logp=old_logp.detach(),
        advantages=advantages.detach(),
        mask=mask_b,
        ref_logp=None if ref_logp is None else ref_logp.detach(),
        batch=b,
        time=t,
    )
