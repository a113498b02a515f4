"""Fused linear + log-probability + PAMA loss: the loss from the last hidden states and the
LM head, chunk by chunk, without the B x T x V logits (``loss.py`` says how)."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

from torch import Tensor

import torch

from .loss import FusedLinearLoss, _Passes, default_chunk_size, logp_pass
from .validation import PAMA_LOSS_KEYWORDS, check_inputs, check_options, check_logp_inputs

__all__ = [
    "fused_linear_pama_loss",
    "fused_linear_pama_loss_and_logp",
    "fused_linear_logp_loss",
    "fused_linear_logp",
    "PAMA_LOSS_KEYWORDS",
    "default_chunk_size",
]


def fused_linear_pama_loss_and_logp(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    ref_logp: Optional[Tensor] = None,
    kl_coef: float = 0.0,
    chunk_size: Optional[int] = None,
    **pama_loss_keywords,
) -> Tuple[Tensor, Tensor]:
    """``fused_linear_pama_loss`` and the [B, T] log-probabilities it computed on the way
    (detached, float32 or float64): for logging and the next epoch's ``old_logp``, no second pass."""
    opt = check_options(pama_loss_keywords, temperature, kl_coef, chunk_size)
    x = check_inputs(hidden, weight, targets, old_logp, advantages, mask, bias, ref_logp, opt.kl_coef)
    return FusedLinearLoss.apply(x.hidden, x.weight, x.bias, x, opt, None)


def fused_linear_pama_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    ref_logp: Optional[Tensor] = None,
    kl_coef: float = 0.0,
    chunk_size: Optional[int] = None,
    **pama_loss_keywords,
) -> Tensor:
    """``pama_loss`` of the log-probabilities of ``targets`` under the LM head, fused with it.

    Equal in value and gradients (w.r.t. ``hidden``, ``weight``, ``bias``) to
    ``pama_loss(log_softmax((hidden @ weight.T + bias) / temperature).gather(-1, targets), ...)``
    plus, when ``kl_coef > 0``, ``kl_coef`` times the masked mean of the k3 estimator
    ``exp(ref_logp - logp) - (ref_logp - logp) - 1``; but the logits are computed
    ``chunk_size`` rows (token positions) at a time and never held whole.

    Args:
        hidden: [B, T, H] last hidden states (floating; the gradient flows into them).
        weight: [V, H] the LM head (tied embeddings welcome; no gradient if it needs none).
        targets: [B, T] token ids in [0, V) at masked positions (others are ignored).
        old_logp, advantages, mask: as in ``pama_loss``.
        bias: [V] or None. temperature: logits are divided by it (> 0).
        ref_logp: [B, T] reference log-probabilities, needed when ``kl_coef > 0``.
        chunk_size: rows per chunk (default: about H * B * T / V rows, a power of two).
        **pama_loss_keywords: ``clip_eps``, ``granularity``, ``loss_agg``, ``backend``,
            ``nonfinite``, passed to ``pama_loss`` (``backend`` also picks the per-chunk
            log-softmax kernels: Triton for CUDA tensors when installed, else PyTorch).

    ``granularity="token"`` (the default) runs in one pass over the chunks (three matmuls
    per chunk, as unfused); the others in two (four). One host synchronisation checks the
    target ids; ``nonfinite="raise"`` adds the finiteness checks' syncs, as in ``pama_loss``.
    """
    return fused_linear_pama_loss_and_logp(
        hidden, weight, targets, old_logp, advantages, mask, bias=bias, temperature=temperature,
        ref_logp=ref_logp, kl_coef=kl_coef, chunk_size=chunk_size, **pama_loss_keywords,
    )[0]


def fused_linear_logp_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    mask: Tensor,
    loss_of_logp: Callable[[Tensor], Tensor],
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    """Any loss of the [B, T] log-probabilities of ``targets``, fused with the LM head.

    ``loss_of_logp(logp)`` (logp [B, T] float32, or float64 for float64 inputs, requiring
    grad) returns a 0-dim loss; it may read anything else it needs from its closure, and is
    called once. Two passes over the chunks (four matmuls per chunk): the log-probabilities,
    then, with ``dL/dlogp`` from autograd of ``loss_of_logp``, the gradients. Returns
    ``(loss, logp)`` (``logp`` detached). This is how the TRL integration fuses its own
    normalisers and combiners; ``fused_linear_pama_loss`` is the PAMA loss through it (one
    pass for ``token``).
    """
    if not callable(loss_of_logp):
        raise TypeError(f"fused_linear_logp_loss: `loss_of_logp` must be callable, got {type(loss_of_logp).__name__}")
    opt = check_options({"backend": backend, "nonfinite": "mask"}, temperature, 0.0, chunk_size)
    x = check_logp_inputs("fused_linear_logp_loss", hidden, weight, targets, mask, bias)
    return FusedLinearLoss.apply(x.hidden, x.weight, x.bias, x, opt, loss_of_logp)


@torch.no_grad()
def fused_linear_logp(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    mask: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
) -> Tensor:
    """[B, T] log-probabilities of ``targets`` under the LM head, chunk by chunk, no gradient
    (rollout scoring: the old and reference policies' log-probabilities). Float32, or
    float64 for float64 inputs; positions outside ``mask`` hold the log-probability of id 0."""
    opt = check_options({"backend": backend}, temperature, 0.0, chunk_size)
    x = check_logp_inputs("fused_linear_logp", hidden, weight, targets, mask, bias)
    logp, _ = logp_pass(_Passes(x, opt, False, False, False))
    return logp.view(x.batch, x.time)
