"""The loss paths of ``PAMA.loss``, one plain function per combiner (``pama_ext/optim.py``).

``PAMA.loss`` validates its inputs once (``check_loss_inputs``) and its settings are the
optimizer's (``LossSettings``, ``fn="PAMA.loss"``); it picks the combiner's weights source
(a step's accumulated solve, an all-reduced batch solve, or none) and calls one of these
with the validated ``LossInputs``. Nothing here validates again, touches optimizer state or
talks to other ranks except through the MGDA solvers.

Each returns ``(loss, weights, diagnostics)``: the loss to back-propagate, the weights
``PAMA.last_weights`` reports (a tensor, or for ``token`` a function computing them on
first access) and a ``PAMADiagnostics``.

* :func:`pama_fused_loss`: ``pama`` without a step solve: the fused op
  (``functional.loss_and_stats_of``), plus the count of zero combined advantages.
* :func:`solution_loss`: fixed weights from a solve (``statistics.Solution``: the step's
  accumulated ``pama`` solve, or an MGDA solve): ``weighted_noon_loss`` with them.
* :func:`linear_loss`: MORLHF's signed PPO loss with the preference as weights.
* :func:`mgda_ub_loss`, :func:`mgda_loss`: the baselines' solves, then :func:`solution_loss`.
"""

from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from . import functional
from ._validation import LossInputs, LossSettings
from .combine import (
    _acc_dtype,
    _combine,
    fixed_weights_loss_of,
    mgda_solve,
    mgda_ub_solve,
    per_objective_logp_grads,
    row_scale_of,
)
from .reference import token_advantage, valid_tokens
from .statistics import Solution

__all__ = [
    "PAMADiagnostics",
    "pama_fused_loss",
    "solution_loss",
    "linear_loss",
    "mgda_ub_loss",
    "mgda_loss",
]

_DD = torch.float64


class PAMADiagnostics(NamedTuple):
    """Diagnostics of the last ``PAMA.loss`` call, as 0-dim float64 tensors (no host sync)."""

    masked_tokens: Tensor  # valid tokens of this call (this micro-batch, this rank)
    clip_fraction: Tensor  # valid tokens on the clipped branch (no gradient) / masked tokens
    zero_advantage_fraction: Tensor  # valid tokens whose combined advantage s_t is 0 / masked tokens
    objective: Tensor  # the minimised value of the solve (c^T G c, (c.a)^2, ...); 0 for linear
    kkt_residual: Tensor  # max(0, c^T G c - min_j (G c)_j) of a Gram solve; 0 otherwise

    def as_dict(self) -> Dict[str, float]:
        """As Python floats (a host synchronisation for device tensors)."""
        return {k: float(v) for k, v in self._asdict().items()}


#: what every loss path returns: (loss, last weights or a function computing them, diagnostics)
CombinerLoss = Tuple[Tensor, Union[Tensor, Callable[[], Tensor]], PAMADiagnostics]


def _diagnostics(masked: Tensor, clipped: Tensor, zero: Tensor, objective, kkt) -> PAMADiagnostics:
    """0-dim float64 tensors, detached (diagnostics must not keep the autograd graph alive)."""
    m = masked.detach().to(_DD)
    denom = m.clamp_min(1)
    z = torch.zeros((), dtype=_DD, device=m.device)
    as_t = lambda v: z if v is None else torch.as_tensor(v).detach().to(device=m.device, dtype=_DD)  # noqa: E731
    return PAMADiagnostics(
        m, clipped.detach().to(_DD) / denom, zero.detach().to(_DD) / denom, as_t(objective), as_t(kkt)
    )


def _fixed_loss(x: LossInputs, s: LossSettings, weights: Tensor, signed: bool = False):
    w = weights.detach().to(device=x.logp.device).contiguous()
    return fixed_weights_loss_of(x, w, s, signed)


def solution_loss(x: LossInputs, s: LossSettings, sol: Solution) -> CombinerLoss:
    """The Noon loss with a solve's weights held fixed; the solve's objective and KKT residual."""
    w = sol.weights.to(device=x.logp.device, dtype=_acc_dtype(x.logp))
    loss, st = _fixed_loss(x, s, w)
    return loss, w, _diagnostics(st[0], st[1], st[2], sol.objective, sol.kkt_residual)


def pama_fused_loss(x: LossInputs, s: LossSettings) -> CombinerLoss:
    """``pama`` at ``s.granularity`` through the fused op (weights solved on this batch)."""
    with torch.autocast(x.logp.device.type, enabled=False):  # the op's precision is its own
        loss, info = functional.loss_and_stats_of(x, s)
    x = x._replace(logp=x.logp.detach())  # the diagnostics below need no graph
    with torch.no_grad(), torch.autocast(x.logp.device.type, enabled=False):
        # with nonfinite="raise" the op has checked that every masked token is finite
        valid = x.mask if s.nonfinite == "raise" else valid_tokens(x, "mask", s.fn)
        a_raw = x.advantages.to(_acc_dtype(x.logp))
        if s.granularity == "token":
            combined = token_advantage(a_raw)  # exactly-zero advantages abstain
            combined = combined if combined.dim() == 2 else combined[:, None]
        else:
            a = torch.clamp(a_raw, min=0)
            combined = _combine(a, info.weights.to(a.dtype))
        zero = (valid & (combined == 0)).sum()
    stats = info.stats
    diagnostics = _diagnostics(stats[0], stats[1], zero, stats[5], stats[6])
    if s.granularity == "token":  # [B, T, N]: computed when read
        return loss, lambda: functional.weights_of(x, LossSettings("pama_weights", s.clip_eps, "token")), diagnostics
    return loss, info.weights, diagnostics


def linear_loss(x: LossInputs, s: LossSettings, preference: Tensor) -> CombinerLoss:
    """MORLHF: the signed PPO loss of ``sum_i w_i A'_i``, ``w`` = the (checked) preference."""
    w = preference.to(device=x.logp.device, dtype=_acc_dtype(x.logp))
    loss, st = _fixed_loss(x, s, w, signed=True)
    return loss, w, _diagnostics(st[0], st[1], st[2], None, None)


def _require_graph(x: LossInputs, s: LossSettings, combiner: str) -> None:
    if not x.logp.requires_grad:
        raise ValueError(f"{s.fn}: combiner={combiner!r} needs `logp` with a graph (requires_grad)")


def _objective_logp_grads(x: LossInputs, s: LossSettings) -> Tensor:
    valid = valid_tokens(x, s.nonfinite, s.fn)
    return per_objective_logp_grads(x, valid, row_scale_of(valid, s.loss_agg), s.clip_eps)


def mgda_ub_loss(x: LossInputs, s: LossSettings, shared: Optional[Tensor], process_group=None,
                 sync: bool = True) -> CombinerLoss:
    """MGDA-UB: the min-norm point of the per-objective gradients w.r.t. ``shared``."""
    if shared is None:
        raise ValueError(
            f"{s.fn}: combiner='mgda_ub' needs `shared=`: a tensor the policy computed on the way to "
            "`logp` that requires grad (e.g. the last hidden states)"
        )
    _require_graph(x, s, "mgda_ub")
    with torch.autocast(x.logp.device.type, enabled=False):
        sol = mgda_ub_solve(x.logp, shared, _objective_logp_grads(x, s), process_group, sync)
    return solution_loss(x, s, sol)


def mgda_loss(x: LossInputs, s: LossSettings, params: List[Tensor], process_group=None,
              sync: bool = True) -> CombinerLoss:
    """Exact MGDA: the min-norm point of the per-objective gradients w.r.t. ``params``."""
    _require_graph(x, s, "mgda")
    with torch.autocast(x.logp.device.type, enabled=False):
        sol = mgda_solve(x.logp, params, _objective_logp_grads(x, s), process_group, sync)
    return solution_loss(x, s, sol)
