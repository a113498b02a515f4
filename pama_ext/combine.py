"""Losses with given weights, and the baselines' weight solvers (MGDA-UB, exact MGDA).

* :func:`weighted_noon_loss`: the Noon-PPO loss of the combined advantage
  ``s_t = sum_i w_i max(A'^(i)_t, 0)`` for weights ``w`` you supply ([N], or [B, N] per
  sequence), the weights held fixed (no gradient through them). This is PAMA's loss once
  the weights are known, e.g. solved once over all micro-batches of a step or all ranks
  (``pama_ext.statistics``). Forward is a few elementwise torch ops; backward is the
  fused ``pama_ext::pama_backward`` kernel (the C++ op on CPU). Registered as the
  ``torch.library`` op ``pama_ext::noon_loss_fixed_weights``.
  ``signed=True`` gives the MORLHF baseline instead: no Noon clamp,
  ``s_t = sum_i w_i A'^(i)_t`` and the standard signed PPO clip
  ``-min(u s, clip(u, 1-eps, 1+eps) s)`` (plain autograd).
* :func:`per_objective_logp_grads`: ``dL^(i)/dlogp`` for every objective i, in closed form
  (``-r_b A^(i)_t u_t 1[u_t <= 1+eps]``), the seed of the baselines' per-objective backward
  passes.
* :func:`mgda_ub_solve`: MGDA-UB (Sener & Koltun 2018): per-objective gradients with respect
  to a shared representation ``z`` (N vector-Jacobian products from ``logp`` back to
  ``z``), their N x N Gram, the exact min-norm solver.
* :func:`mgda_solve`: exact MGDA: per-objective gradients with respect to all parameters
  (N backward passes through the whole model, N x d memory), their Gram, the solver.

Each solver returns a ``statistics.Solution``; the loss to back-propagate is then
``weighted_noon_loss(..., weights=solution.weights)``, which equals ``sum_i c_i L^(i)``
exactly (the Noon surrogate is linear in the advantages).
"""

from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch
from torch import Tensor

from . import _ops  # noqa: F401  (registers pama_ext::pama_backward)
from ._validation import LossInputs, LossSettings, _shape, check_loss_inputs, check_settings
from .distributed import all_reduce_mean, all_reduce_sum, is_distributed
from .reference import valid_tokens
from .statistics import Solution, solve_gram

__all__ = [
    "weighted_noon_loss",
    "weighted_noon_loss_and_stats",
    "per_objective_logp_grads",
    "mgda_ub_solve",
    "mgda_solve",
    "COMBINE_STATS_FIELDS",
]

#: the fields of the stats vector of ``weighted_noon_loss_and_stats``
COMBINE_STATS_FIELDS = ("masked_tokens", "clipped_tokens", "zero_advantage_tokens")

_DD = torch.float64


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _combine(adv: Tensor, w: Tensor) -> Tensor:
    """s = sum_i w_i adv_i: [B, T] for per-token advantages, [B, 1] for per-sequence ones."""
    if adv.dim() == 3:
        return adv @ w if w.dim() == 1 else (adv * w[:, None, :]).sum(-1)
    s = adv @ w if w.dim() == 1 else (adv * w).sum(-1)
    return s[:, None]


def row_scale_of(valid: Tensor, loss_agg: str, normalizer: Optional[Tensor] = None) -> Tensor:
    """[B] float64 per-row loss scale: ``1/M`` (token_mean), ``1/(B' M_b)`` (seq_mean_token_mean),
    or ``1/normalizer`` for every row when a normalizer is given (0 when it is 0)."""
    b = valid.shape[0]
    if normalizer is not None:
        norm = torch.as_tensor(normalizer, dtype=_DD, device=valid.device)
        r = torch.where(norm > 0, 1 / norm.clamp_min(1e-300), torch.zeros((), dtype=_DD, device=valid.device))
        return r.expand(b).clone()
    m_b = valid.sum(dim=1).to(_DD)
    if loss_agg == "token_mean":
        total = m_b.sum()
        return torch.where(total > 0, 1 / total.clamp_min(1), 0.0).expand(b).clone()
    nonempty = (m_b > 0).sum()
    return torch.where(m_b > 0, 1 / (nonempty.clamp_min(1) * m_b.clamp_min(1)), 0.0)


# --------------------------------------------------------------------------- the fixed-weights op
# Defined with torch.library.Library (like _ops.py) rather than torch.library.custom_op, whose
# first call imports torch._dynamo (seconds); schema, kernel, fake kernel and autograd.
_lib = torch.library.Library("pama_ext", "FRAGMENT")
_lib.define(
    "noon_loss_fixed_weights(Tensor logp, Tensor old_logp, Tensor advantages, Tensor mask, Tensor weights, "
    "Tensor row_scale, float clip_eps) -> (Tensor, Tensor)"
)


@torch.library.impl(_lib, "noon_loss_fixed_weights", "CompositeExplicitAutograd")
def _noon_loss_fixed_weights(logp, old_logp, advantages, mask, weights, row_scale, clip_eps):
    """(loss, stats[3]) of the Noon loss with given weights; ``mask`` must already exclude
    non-finite tokens. stats = (masked tokens, clipped tokens, tokens with s_t = 0)."""
    acc = _acc_dtype(logp)
    u = torch.exp(logp.to(acc) - old_logp.to(acc))
    m = torch.clamp(u, max=1 + clip_eps)
    s = _combine(torch.clamp(advantages.to(acc), min=0), weights.to(acc))
    zero = torch.zeros((), dtype=acc, device=logp.device)
    per_row = torch.where(mask, s * m, zero).to(_DD).sum(dim=1)
    loss = -(row_scale.to(_DD) * per_row).sum()
    stats = torch.stack(
        [
            mask.sum().to(_DD),
            (mask & (u > 1 + clip_eps)).sum().to(_DD),
            (mask & (s == 0)).sum().to(_DD),
        ]
    )
    return loss.to(acc), stats


@torch.library.register_fake("pama_ext::noon_loss_fixed_weights")
def _noon_loss_fixed_weights_fake(logp, old_logp, advantages, mask, weights, row_scale, clip_eps):
    return logp.new_empty((), dtype=_acc_dtype(logp)), logp.new_empty((3,), dtype=_DD)


def _fixed_setup_context(ctx, inputs, output):
    logp, old_logp, advantages, mask, weights, row_scale, clip_eps = inputs
    ctx.save_for_backward(logp, old_logp, advantages, mask, weights, row_scale)
    ctx.clip_eps = clip_eps
    ctx.granularity = "batch" if weights.dim() == 1 else "sequence"
    ctx.mark_non_differentiable(output[1])


def _fixed_backward(ctx, grad_loss, _grad_stats):
    logp, old_logp, advantages, mask, weights, row_scale = ctx.saved_tensors
    grad_logp = torch.ops.pama_ext.pama_backward(
        grad_loss, logp, old_logp, advantages, mask, weights, row_scale, ctx.clip_eps, ctx.granularity
    )
    return grad_logp, None, None, None, None, None, None


torch.library.register_autograd(
    "pama_ext::noon_loss_fixed_weights", _fixed_backward, setup_context=_fixed_setup_context
)


# --------------------------------------------------------------------------- signed (MORLHF)
def _signed_ppo_loss(x: LossInputs, valid: Tensor, weights: Tensor, row_scale: Tensor, clip_eps: float):
    acc = _acc_dtype(x.logp)
    zero = torch.zeros((), dtype=acc, device=x.logp.device)
    adv = torch.where(
        torch.isfinite(x.advantages), x.advantages.to(acc), zero
    )  # non-finite tokens are invalid anyway; keep NaN out of the product
    s = torch.where(valid, _combine(adv, weights.to(acc)), zero)
    lp = torch.where(valid, x.logp.to(acc), zero)
    old = torch.where(valid, x.old_logp.to(acc), zero)
    log_ratio = lp - old
    lo, hi = 1 - clip_eps, 1 + clip_eps
    with torch.no_grad():
        u = torch.exp(log_ratio)
        clipped = ((s > 0) & (u > hi)) | ((s < 0) & (u < lo))  # the clipped branch: no gradient
    # a token on the clipped branch has a constant loss; cap its detached log-ratio so an
    # overflowing exp cannot produce 0 * inf = NaN in the backward
    log_ratio = torch.where(clipped | (s == 0), log_ratio.detach().clamp(max=30.0), log_ratio)
    ratio = torch.exp(log_ratio)
    per_token = -torch.minimum(ratio * s, torch.clamp(ratio, lo, hi) * s)
    loss = (per_token.to(_DD) * row_scale[:, None] * valid).sum().to(acc)
    stats = torch.stack(
        [valid.sum().to(_DD), (valid & clipped).sum().to(_DD), (valid & (s == 0)).sum().to(_DD)]
    )
    return loss, stats


# --------------------------------------------------------------------------- public
def _check_weights(fn: str, weights, x: LossInputs) -> Tensor:
    if not isinstance(weights, Tensor):
        raise TypeError(f"{fn}: `weights` must be a torch.Tensor, got {type(weights).__name__}")
    if not weights.is_floating_point():
        raise TypeError(f"{fn}: `weights` must be floating point, got {weights.dtype}")
    b, n = x.logp.shape[0], x.advantages.shape[-1]
    if weights.shape not in ((n,), (b, n)):
        raise ValueError(
            f"{fn}: `weights` must have shape [N] = [{n}] or [B, N] = [{b}, {n}] "
            f"(N from `advantages` {_shape(x.advantages)}), got {_shape(weights)}"
        )
    return weights.detach().to(device=x.logp.device).contiguous()


def weighted_noon_loss_and_stats(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    weights: Tensor,
    *,
    clip_eps: float = 0.2,
    loss_agg: str = "token_mean",
    signed: bool = False,
    normalizer=None,
    nonfinite: str = "raise",
) -> Tuple[Tensor, Tensor]:
    """``weighted_noon_loss`` that also returns its statistics: a float64 [3] tensor
    ``(masked_tokens, clipped_tokens, zero_advantage_tokens)`` (``COMBINE_STATS_FIELDS``),
    no gradient. ``masked_tokens`` counts valid tokens; ``clipped_tokens`` those on the
    clipped branch, which get no gradient (Noon: ``u > 1 + eps``; signed: ``u > 1 + eps`` with
    ``s_t > 0`` or ``u < 1 - eps`` with ``s_t < 0``); ``zero_advantage_tokens`` those with
    ``s_t == 0``."""
    fn = "weighted_noon_loss"
    s = check_settings(fn, clip_eps, loss_agg=loss_agg, nonfinite=nonfinite)
    x = check_loss_inputs(fn, logp, old_logp, advantages, mask)
    return fixed_weights_loss_of(x, _check_weights(fn, weights, x), s, signed, normalizer)


def fixed_weights_loss_of(x: LossInputs, w: Tensor, s: LossSettings, signed: bool = False, normalizer=None):
    """``weighted_noon_loss_and_stats`` on inputs and settings already checked
    (``check_loss_inputs``, ``_check_weights``, ``check_settings``; ``s.clip_eps``,
    ``s.loss_agg``, ``s.nonfinite`` and ``s.fn`` are read): the entry for callers that
    validated once (``PAMA``)."""
    with torch.autocast(x.logp.device.type, enabled=False):
        valid = valid_tokens(x, s.nonfinite, s.fn)
        row_scale = row_scale_of(valid, s.loss_agg, normalizer)
        if signed:
            return _signed_ppo_loss(x, valid, w, row_scale, s.clip_eps)
        acc = _acc_dtype(x.logp)
        return torch.ops.pama_ext.noon_loss_fixed_weights(
            x.logp, x.old_logp, x.advantages, valid.contiguous(), w.to(acc), row_scale.to(acc), s.clip_eps
        )


def weighted_noon_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    weights: Tensor,
    *,
    clip_eps: float = 0.2,
    loss_agg: str = "token_mean",
    signed: bool = False,
    normalizer=None,
    nonfinite: str = "raise",
) -> Tensor:
    """The PPO loss of the combined advantage ``s_t = sum_i w_i A_i`` with fixed weights.

    Args:
        logp, old_logp, advantages, mask: as in ``pama_ext.pama_loss`` ([B, T], [B, T],
            [B, T, N] or [B, N], [B, T]); differentiable in ``logp`` only.
        weights: [N] (one vector for the batch) or [B, N] (per sequence / per sample, e.g.
            prompt-dependent preferences). Detached: no gradient flows into the weights.
        clip_eps: PPO clip range.
        loss_agg: ``token_mean`` or ``seq_mean_token_mean``, as in ``pama_loss``.
        signed: False (default): Noon PPO, ``A_i = max(A'_i, 0)`` and the loss
            ``-min(u, 1+eps) s_t`` (the gradient is the fused ``pama_backward`` kernel);
            with ``weights`` = the PAMA weights of the batch this is ``pama_loss`` exactly.
            True: MORLHF, signed advantages and the standard PPO clip
            ``-min(u s, clip(u, 1-eps, 1+eps) s)``.
        normalizer: if given (a number or 0-dim tensor, e.g. the masked tokens of a whole
            accumulated step), the loss is the token sum divided by it instead of
            ``loss_agg``'s normalisation.
        nonfinite: ``raise`` or ``mask``, as in ``pama_loss``.

    With one-hot ``weights = e_i`` the Noon loss is the single-objective surrogate L^(i),
    and the loss is linear in ``weights``: ``weighted_noon_loss(.., w) = sum_i w_i L^(i)``.
    """
    return weighted_noon_loss_and_stats(logp, old_logp, advantages, mask, weights, clip_eps=clip_eps, loss_agg=loss_agg,
                                        signed=signed, normalizer=normalizer, nonfinite=nonfinite)[0]


# --------------------------------------------------------------------------- baselines
def per_objective_logp_grads(x: LossInputs, valid: Tensor, row_scale: Tensor, clip_eps: float) -> Tensor:
    """[N, B, T] in logp's dtype: dL^(i)/dlogp_t = -r_b A^(i)_t u_t 1[u_t <= 1 + eps] (0 if invalid)."""
    acc = _acc_dtype(x.logp)
    zero = torch.zeros((), dtype=acc, device=x.logp.device)
    u = torch.exp(x.logp.detach().to(acc) - x.old_logp.to(acc))
    du = torch.where(valid & (u <= 1 + clip_eps), u, zero) * row_scale.to(acc)[:, None]  # [B, T]
    a = torch.clamp(x.advantages.to(acc), min=0)
    a = torch.where(torch.isfinite(a), a, zero)
    a = a.permute(2, 0, 1) if a.dim() == 3 else a.T[:, :, None]  # [N, B, T] or [N, B, 1]
    return (-(a * du[None])).to(x.logp.dtype)


def _gram_of_rows(rows: Tensor) -> Tensor:
    f = rows.reshape(rows.shape[0], -1).to(_DD)
    return f @ f.T


def mgda_ub_solve(logp: Tensor, shared: Tensor, logp_grads: Tensor, process_group=None, sync: bool = True) -> Solution:
    """MGDA-UB weights: the min-norm point of the per-objective gradients w.r.t. ``shared``.

    ``logp_grads`` [N, B, T] = dL^(i)/dlogp (``per_objective_logp_grads``). Costs N
    vector-Jacobian products from ``logp`` back to ``shared`` (graph retained) and an
    N x N Gram; the Gram is summed over ``process_group`` when distributed (the shared
    representations of different ranks are different samples: their gradients are blocks
    of one long vector, so the Gram of the whole batch is the sum of the per-rank Grams).
    """
    if not isinstance(shared, Tensor) or not shared.requires_grad:
        raise ValueError(
            "combiner='mgda_ub' needs `shared`: a tensor in the graph of `logp` that requires grad "
            "(e.g. the policy's last hidden states)"
        )
    n = logp_grads.shape[0]
    rows = []
    for i in range(n):
        (g,) = torch.autograd.grad(logp, shared, grad_outputs=logp_grads[i].expand_as(logp), retain_graph=True, allow_unused=True)
        rows.append(torch.zeros_like(shared) if g is None else g)
    gram = _gram_of_rows(torch.stack(rows))
    if sync:
        all_reduce_sum(gram, process_group)
    return solve_gram(gram)


def mgda_solve(
    logp: Tensor, params: Iterable[Tensor], logp_grads: Tensor, process_group=None, sync: bool = True
) -> Solution:
    """Exact MGDA weights: the min-norm point of the per-objective gradients of all ``params``.

    N backward passes through the model (graph retained) and N x d memory for the
    per-objective gradients (d = number of parameters); the Gram is accumulated per parameter
    tensor in float64. Under data parallelism the per-objective gradients are averaged over
    ``process_group`` first (what DDP does to ``.grad``; correct for replicated parameters).
    Parameters must be the autograd leaves (plain modules or DDP; not FSDP's sharded flat
    parameters).
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("combiner='mgda' found no parameter that requires grad in the optimizer")
    n = logp_grads.shape[0]
    per_obj = [
        torch.autograd.grad(logp, params, grad_outputs=logp_grads[i].expand_as(logp), retain_graph=True, allow_unused=True)
        for i in range(n)
    ]
    gram = torch.zeros(n, n, dtype=_DD, device=logp.device)
    distributed = sync and is_distributed(process_group)
    for j, p in enumerate(params):
        rows = torch.stack([torch.zeros_like(p) if g[j] is None else g[j] for g in per_obj])
        if distributed:
            all_reduce_mean(rows, process_group)
        gram += _gram_of_rows(rows).to(gram.device)
    return solve_gram(gram)
