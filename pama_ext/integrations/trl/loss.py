"""The per-micro-batch loss of ``PAMAGRPOTrainer``: TRL's normalisers around pama_ext's op.

TRL's supported loss types differ only in how the sum of per-token losses is normalised
(``GRPOTrainer._compute_loss``), gradient accumulation included. ``Normaliser`` applies each
to per-token terms with TRL's own arithmetic (``aggregate``), and writes it as
``factor * L_agg`` where ``L_agg`` is pama_ext's ``token_mean`` or ``seq_mean_token_mean``
aggregation: that is how the fused op, which knows only those two, gives TRL's
normalisation exactly (a scalar factor leaves its gradient exact).

* ``pama_policy_loss``: Noon PPO with PAMA's weights through ``pama_ext`` (the fused op for
  local granularities, ``weighted_noon_loss`` with the step's solved weights for batch-level
  ones). Under Noon ``min(u s, clip(u, 1-eps_low, 1+eps_high) s) = s min(u, 1+eps_high)`` for
  ``s >= 0``, so only ``epsilon_high`` enters (``clip_eps``).
* ``linear_policy_loss``: MORLHF, ``s = sum_i w_i A_i`` signed, TRL's own two-sided clipped
  surrogate (``epsilon_low`` / ``epsilon_high``), so a one-hot preference is TRL's GRPO.
* ``kl_per_token``: TRL's k3 estimator of KL(pi || pi_ref), times the ratio when
  ``use_bias_correction_kl``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

import pama_ext


@dataclass
class Normaliser:
    """TRL's normaliser of one micro-batch, as TRL's arithmetic (``aggregate``) and as
    (``loss_agg``, ``factor``) for pama_ext's aggregations."""

    loss_type: str
    loss_agg: str  # pama_ext's aggregation that, times ``factor``, is TRL's
    factor: Tensor  # 0-dim
    divisor: Optional[Tensor]  # bnpo: masked tokens; dr_grpo: B x max length; dapo: TRL's normalizer
    accumulation: float  # TRL's divisor for gradient accumulation (1 in evaluation)

    def aggregate(self, per_token: Tensor, mask: Tensor) -> Tensor:
        """A per-token term (the KL, the linear surrogate) aggregated with TRL's own arithmetic,
        operation for operation: the linear combiner then reproduces TRL's steps bitwise (Adam
        turns rounding-level differences of small gradients into visible parameter differences)."""
        x = per_token * mask
        if self.loss_type == "grpo":
            return (x.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / self.accumulation
        if self.loss_type == "luspo":
            return x.sum(-1).mean() / self.accumulation
        if self.loss_type == "dapo":  # TRL divides by its normalizer only (accumulation is inside it)
            return x.sum() / self.divisor
        return x.sum() / self.divisor / self.accumulation  # bnpo, dr_grpo


def trl_normaliser(
    loss_type: str,
    mask: Tensor,
    *,
    accumulation: float,
    max_completion_length: int,
    num_items_in_batch: Optional[Tensor],
    num_processes: int,
    steps_per_generation: int,
    train: bool,
) -> Normaliser:
    """TRL 1.16's normaliser of ``loss_type`` for this micro-batch (``mask`` [B, T]).

    ``accumulation`` is TRL's divisor for gradient accumulation (the step's micro-batches
    in training, 1 in evaluation). ``factor`` turns pama_ext's aggregation into TRL's:
    ``token_mean`` divides by the M masked tokens, so a token-sum type with divisor D is
    ``token_mean * M / D``; ``seq_mean_token_mean`` averages over the B' non-empty rows where
    TRL's ``grpo`` averages over all B rows, hence ``B' / B``.
    """
    b = mask.shape[0]
    m_b = mask.sum(-1).to(torch.float32)
    m = m_b.sum()
    if loss_type == "grpo":  # mean over all rows of each row's token mean (an empty row counts 0)
        nonempty = (m_b > 0).sum().to(torch.float32)
        return Normaliser(loss_type, "seq_mean_token_mean", nonempty / (b * accumulation), None, accumulation)
    if loss_type == "luspo":  # per-row token sums, mean over rows
        return Normaliser(loss_type, "token_mean", m / (b * accumulation), None, accumulation)
    if loss_type == "bnpo":  # tokens of this micro-batch
        divisor = mask.sum().clamp(min=1.0)
        total = divisor * accumulation
    elif loss_type == "dr_grpo":  # a constant: rows x max_completion_length
        divisor = torch.tensor(float(b * max_completion_length), device=mask.device)
        total = divisor * accumulation
    elif loss_type == "dapo":  # tokens of the whole generation batch, per process and accumulation window
        divisor = num_items_in_batch.clamp(min=1.0) / num_processes
        if train:
            divisor = divisor * accumulation / steps_per_generation
        total = divisor
    else:
        raise ValueError(f"PAMAGRPOTrainer: unsupported loss_type {loss_type!r}")
    return Normaliser(loss_type, "token_mean", m / total, divisor, accumulation)


def kl_per_token(logp: Tensor, ref_logp: Tensor, ratio: Tensor, bias_correction: bool) -> Tensor:
    """TRL's per-token KL term (k3), times the importance ``ratio`` with ``use_bias_correction_kl``.

    Written as TRL writes it (``ref - logp`` twice, the ratio tensor shared with the
    surrogate): the same autograd graph accumulates the gradient in the same order."""
    kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
    if bias_correction:
        kl = kl * ratio
    return kl


def broadcast_weights(weights: Tensor, shape: Tuple[int, int, int]) -> Tensor:
    """Weights [N], [B, N] or [B, T, N] as [B, T, N] (for logging and the combined advantage)."""
    b, t, n = shape
    if weights.dim() == 1:
        return weights.view(1, 1, n).expand(b, t, n)
    if weights.dim() == 2:
        return weights[:, None, :].expand(b, t, n)
    return weights


def pama_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    norm: Normaliser,
    *,
    clip_eps: float,
    granularity: str,
    weights: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Noon-PPO loss of the PAMA-combined advantage, TRL-normalised.

    ``weights``: the step's solved weights [N] for batch-level granularities (held fixed);
    None: the fused op solves them on this micro-batch (local granularities).
    Returns ``(loss, s, w)``: ``s`` [B, T] the combined advantage, ``w`` [B, T, N] the weights
    each token used (both detached, for the metrics).
    """
    b, t = logp.shape
    n = advantages.shape[-1]
    if weights is not None:
        w = weights.to(device=logp.device, dtype=torch.float32)
        loss = pama_ext.weighted_noon_loss(
            logp, old_logp, advantages, mask, w, clip_eps=clip_eps, loss_agg=norm.loss_agg
        )
    else:
        loss, info = pama_ext.pama_loss_and_stats(
            logp, old_logp, advantages, mask, clip_eps=clip_eps, granularity=granularity, loss_agg=norm.loss_agg
        )
        w = info.weights
        if w.numel() == 0:  # the fused op returns no per-token weights (token granularity)
            w = pama_ext.pama_weights(
                logp.detach(), old_logp, advantages, mask, clip_eps=clip_eps, granularity=granularity
            )
    w = broadcast_weights(w.detach().to(torch.float32), (b, t, n))
    s = (torch.clamp(advantages.detach().to(torch.float32), min=0)[:, None, :] * w).sum(-1)
    return loss * norm.factor, s, w


def linear_policy_loss(
    ratio: Tensor, advantages: Tensor, preference: Tensor, *, epsilon_low: float, epsilon_high: float
) -> Tuple[Tensor, Tensor]:
    """MORLHF's per-token loss ``-min(u s, clip(u, 1-eps_low, 1+eps_high) s)`` with
    ``s = sum_i w_i A_i`` (signed) and ``u`` = ``ratio`` [B, T], written as TRL writes its
    surrogate. Returns ``(per_token [B, T], s [B, 1])``."""
    s = (advantages * preference.to(advantages)).sum(-1, keepdim=True)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    return -torch.min(ratio * s, clipped * s), s.detach()
