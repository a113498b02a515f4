"""Fused linear + log-probability + PAMA loss: the loss from the last hidden states and the
LM head, chunk by chunk, without the B x T x V logits (``loss.py`` says how, ``op.py``
registers the ops).

* ``fused_linear_pama_loss`` / ``fused_linear_pama_loss_and_logp``: ``pama_loss`` fused with
  the LM head (one pass for ``token``, two otherwise);
* ``fused_linear_logp_loss``: any loss of the log-probabilities, fused (two passes);
* ``fused_linear_logp``: the log-probabilities alone, no gradient (rollout scoring).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from .loss import default_chunk_size, logp_loss
from .op import fused_linear_logp_op, fused_linear_pama_token_op
from ..preference import with_preference
from .validation import FN, PAMA_LOSS_KEYWORDS, check_inputs, check_logp_inputs, check_options

__all__ = [
    "fused_linear_pama_loss",
    "fused_linear_pama_loss_and_logp",
    "fused_linear_logp_loss",
    "fused_linear_logp",
    "PAMA_LOSS_KEYWORDS",
    "default_chunk_size",
]


def _needs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]):
    grad = torch.is_grad_enabled()
    return (grad and hidden.requires_grad, grad and weight.requires_grad,
            grad and bias is not None and bias.requires_grad)


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
    x = check_inputs(hidden, weight, targets, old_logp, advantages, mask, bias, ref_logp, opt.kl_coef, check_ids=False)
    # steerable PAMA is PAMA on the scaled advantages (pama_ext/preference.py)
    x = with_preference(FN, x, pama_loss_keywords.get("preference"))
    targets = targets.to(torch.int64)
    if opt.granularity == "token":
        loss, logp, _, _, _ = fused_linear_pama_token_op(
            hidden, weight, bias, targets, x.old_logp, x.advantages, x.mask, x.ref_logp, opt.temperature,
            opt.kl_coef, opt.chunk_size, opt.clip_eps, opt.loss_agg, opt.backend, opt.nonfinite,
            *_needs(hidden, weight, bias),
        )
        return loss, logp.detach()
    logp, _ = fused_linear_logp_op(hidden, weight, bias, targets, x.mask, opt.temperature, opt.chunk_size, opt.backend,
                                   opt.nonfinite == "raise", "fused_linear_pama_loss",
                                   x.ref_logp if opt.kl_coef > 0 else None)
    return logp_loss(logp, x, opt), logp.detach()


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
        chunk_size: rows per chunk (default ``default_chunk_size``: about B*T*H/V rows, a
            power of two, at least 512).
        **pama_loss_keywords: ``clip_eps``, ``granularity``, ``loss_agg``, ``backend``,
            ``nonfinite``, ``preference``, as in ``pama_loss`` (``backend`` also picks the per-chunk
            log-softmax kernels: Triton for CUDA tensors when installed, else PyTorch).
            ``nonfinite="mask"`` also drops tokens whose logits are not finite (an inf/NaN
            hidden state); their rows get a zero gradient.

    ``granularity="token"`` (the default) runs in one pass over the chunks (three matmuls
    per chunk, as unfused); the others in two (four). Host synchronisations: one to check
    the target ids, one to look for non-finite logit rows, plus those ``pama_loss`` makes.
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

    ``loss_of_logp(logp)`` gets logp [B, T] (float32, or float64 for float64 inputs; in the
    graph of ``hidden``/``weight``/``bias``) and returns a 0-dim loss, written with ordinary
    autograd ops; it may read anything else from its closure and is called once. Two passes
    over the chunks (four matmuls per chunk): the log-probabilities in the forward, the
    gradients in the backward from ``dL/dlogp``. Returns ``(loss, logp)`` (``logp``
    detached). The TRL integration fuses its own normalisers and combiners this way.
    """
    if not callable(loss_of_logp):
        raise TypeError(f"fused_linear_logp_loss: `loss_of_logp` must be callable, got {type(loss_of_logp).__name__}")
    opt = check_options({"backend": backend}, temperature, 0.0, chunk_size)
    x = check_logp_inputs("fused_linear_logp_loss", hidden, weight, targets, mask, bias, check_ids=False)
    logp, _ = fused_linear_logp_op(hidden, weight, bias, targets.to(torch.int64), x.mask, opt.temperature,
                                   opt.chunk_size, opt.backend, False, "fused_linear_logp_loss")
    loss = loss_of_logp(logp)
    if not (isinstance(loss, Tensor) and loss.dim() == 0):
        got = f"a tensor of shape {list(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
        raise TypeError(f"fused_linear_logp_loss: `loss_of_logp` must return a 0-dim tensor, got {got}")
    return loss, logp.detach()


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
    x = check_logp_inputs("fused_linear_logp", hidden, weight, targets, mask, bias, check_ids=False)
    with torch.no_grad():
        logp, _ = fused_linear_logp_op(hidden, weight, bias, targets.to(torch.int64), x.mask, opt.temperature,
                                       opt.chunk_size, opt.backend, False, "fused_linear_logp")
    return logp
