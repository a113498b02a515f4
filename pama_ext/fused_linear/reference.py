"""The unfused formulation ``fused_linear_pama_loss`` must equal: the whole B x T x V logits,
``log_softmax``, ``gather``, then ``pama_loss`` (+ the k3 KL term), differentiated by
autograd. The oracle of the tests and the baseline of the benchmark."""

from __future__ import annotations

import torch
from torch import Tensor

from ..functional import pama_loss
from .loss import kl_k3, raise_nonfinite_ref


def unfused_logp(hidden: Tensor, weight: Tensor, targets: Tensor, mask: Tensor, bias=None, temperature: float = 1.0) -> Tensor:
    """[B, T] log-probabilities of ``targets`` (ids at masked-out positions are ignored)."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    ids = torch.where(mask.bool(), targets.long(), torch.zeros((), dtype=torch.long, device=targets.device))
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, ids[..., None]).squeeze(-1)


def unfused_linear_pama_loss(hidden, weight, targets, old_logp, advantages, mask, *, bias=None, temperature=1.0,
                             ref_logp=None, kl_coef=0.0, **pama_loss_keywords) -> Tensor:
    logp = unfused_logp(hidden, weight, targets, mask, bias, temperature)
    loss = pama_loss(logp, old_logp, advantages, mask, **pama_loss_keywords)
    if kl_coef > 0:
        mask_b = mask.bool()
        if pama_loss_keywords.get("nonfinite", "raise") == "raise":
            raise_nonfinite_ref(ref_logp, mask_b)
        loss = loss + kl_coef * kl_k3(logp, ref_logp, mask_b)
    return loss
