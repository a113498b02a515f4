"""The fused linear loss as ``torch.library`` ops (schema, kernel, fake, autograd).

* ``pama_ext::fused_linear_logp``: hidden states + LM head -> the [B, T] log-probabilities
  of the targets (pass 1). Its backward, ``pama_ext::fused_linear_logp_backward``, is pass 2:
  given ``dL/dlogp`` it recomputes each chunk's logits and returns dL/dhidden, dL/dweight,
  dL/dbias. Any loss written on ``logp`` with ordinary autograd is thereby fused.
* ``pama_ext::fused_linear_pama_token``: the ``token`` loss in one pass, returning the loss,
  ``logp`` and the gradients already formed; its backward scales them.

As opaque ops, the chunk loops and their few host syncs (the target-id check; finding
non-finite rows) stay inside, so ``torch.compile(fullgraph=True)`` traces a training step
that calls ``fused_linear_pama_loss``. A gradient that is not needed (``need_*`` False) is
returned as an empty tensor and never computed.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .chunks import acc_dtype
from .loss import _Passes, backprop_pass, logp_pass, raise_nonfinite_logp, raise_nonfinite_ref, token_pass
from .validation import FusedInputs, LossOptions, checked_target_ids


def _inputs(caller, hidden, weight, bias, targets, mask, old_logp=None, advantages=None, ref_logp=None, check=True):
    b, t, h = hidden.shape
    tg = checked_target_ids(caller, targets, mask, weight.shape[0]) if check else torch.where(
        mask, targets, torch.zeros((), dtype=targets.dtype, device=targets.device))
    return FusedInputs(hidden.reshape(b * t, h), weight, bias, tg.reshape(b * t), old_logp, advantages, mask, ref_logp, b, t)


def _options(temperature, chunk_size, backend, **pama) -> LossOptions:
    defaults = dict(clip_eps=0.2, granularity="token", loss_agg="token_mean", nonfinite="mask", kl_coef=0.0)
    defaults.update(pama)
    return LossOptions(temperature=temperature, chunk_size=chunk_size, backend=backend, **defaults)


def _grads_out(hidden: Tensor, grads) -> Tuple[Tensor, Tensor, Tensor]:
    gh, gw, gb = grads
    empty = lambda: hidden.new_empty(0)  # noqa: E731  (a fresh one each: op outputs may not alias)
    return (empty() if gh is None else gh.view(hidden.shape), empty() if gw is None else gw,
            empty() if gb is None else gb)


def _grads_fake(hidden, weight, bias, need_h, need_w, need_b):
    return (
        torch.empty_like(hidden) if need_h else hidden.new_empty(0),
        torch.empty_like(weight) if need_w else hidden.new_empty(0),
        torch.empty_like(bias) if (need_b and bias is not None) else hidden.new_empty(0),
    )


# --------------------------------------------------------------------------- two passes
@torch.library.custom_op("pama_ext::fused_linear_logp", mutates_args=())
def fused_linear_logp_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, mask: Tensor,
    temperature: float, chunk_size: Optional[int], backend: str, raise_nonfinite: bool, caller: str,
    ref_logp: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """(logp [B, T], lse [B, T]); ``targets`` int64 [B, T] (checked here against V at
    ``mask``), ``mask`` bool [B, T]; ``raise_nonfinite``: a non-finite logp (or
    ``ref_logp``, when given) at a masked position raises, naming ``hidden`` (``ref_logp``)."""
    x = _inputs(caller, hidden, weight, bias, targets, mask)
    if raise_nonfinite and ref_logp is not None:
        raise_nonfinite_ref(ref_logp, mask)
    logp, lse = logp_pass(_Passes(x, _options(temperature, chunk_size, backend), False, False, False))
    logp, lse = logp.view(x.batch, x.time), lse.view(x.batch, x.time)
    if raise_nonfinite:
        raise_nonfinite_logp(logp, mask)
    return logp, lse


@fused_linear_logp_op.register_fake
def _logp_fake(hidden, weight, bias, targets, mask, temperature, chunk_size, backend, raise_nonfinite, caller,
               ref_logp=None):
    acc = acc_dtype(torch.promote_types(hidden.dtype, weight.dtype))
    b, t, _ = hidden.shape
    return hidden.new_empty((b, t), dtype=acc), hidden.new_empty((b, t), dtype=acc)


@torch.library.custom_op("pama_ext::fused_linear_logp_backward", mutates_args=())
def fused_linear_logp_backward_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, mask: Tensor, lse: Tensor,
    grad_logp: Tensor, temperature: float, chunk_size: Optional[int], backend: str,
    need_h: bool, need_w: bool, need_b: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Pass 2: (dL/dhidden, dL/dweight, dL/dbias) of ``sum grad_logp * logp``."""
    x = _inputs("", hidden, weight, bias, targets, mask, check=False)
    p = _Passes(x, _options(temperature, chunk_size, backend), need_h, need_w, need_b)
    backprop_pass(p, lse.reshape(-1), grad_logp)
    return _grads_out(hidden, p.grads())


@fused_linear_logp_backward_op.register_fake
def _logp_backward_fake(hidden, weight, bias, targets, mask, lse, grad_logp, temperature, chunk_size, backend,
                        need_h, need_w, need_b):
    return _grads_fake(hidden, weight, bias, need_h, need_w, need_b)


def _logp_setup(ctx, inputs, output):
    hidden, weight, bias, targets, mask, temperature, chunk_size, backend, _raise, _caller, _ref = inputs
    ctx.save_for_backward(hidden, weight, bias, targets, mask, output[1])
    ctx.options = (temperature, chunk_size, backend)


def _logp_backward(ctx, grad_logp, _grad_lse):
    hidden, weight, bias, targets, mask, lse = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    gh, gw, gb = fused_linear_logp_backward_op(
        hidden, weight, bias, targets, mask, lse, grad_logp.contiguous(), *ctx.options, need_h, need_w,
        bool(need_b and bias is not None))
    return (gh if need_h else None, gw if need_w else None, gb if (need_b and bias is not None) else None,
            None, None, None, None, None, None, None, None)


fused_linear_logp_op.register_autograd(_logp_backward, setup_context=_logp_setup)


# --------------------------------------------------------------------------- one pass (token)
@torch.library.custom_op("pama_ext::fused_linear_pama_token", mutates_args=())
def fused_linear_pama_token_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, old_logp: Tensor, advantages: Tensor,
    mask: Tensor, ref_logp: Optional[Tensor], temperature: float, kl_coef: float, chunk_size: Optional[int],
    clip_eps: float, loss_agg: str, backend: str, nonfinite: str, need_h: bool, need_w: bool, need_b: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, logp [B, T], dL/dhidden, dL/dweight, dL/dbias) of the ``token`` loss."""
    x = _inputs("fused_linear_pama_loss", hidden, weight, bias, targets, mask, old_logp, advantages, ref_logp)
    opt = _options(temperature, chunk_size, backend, clip_eps=clip_eps, loss_agg=loss_agg, nonfinite=nonfinite,
                   kl_coef=kl_coef)
    loss, logp, grads = token_pass(x, opt, (need_h, need_w, bool(need_b and bias is not None)))
    return (loss, logp, *_grads_out(hidden, grads))


@fused_linear_pama_token_op.register_fake
def _token_fake(hidden, weight, bias, targets, old_logp, advantages, mask, ref_logp, temperature, kl_coef, chunk_size,
                clip_eps, loss_agg, backend, nonfinite, need_h, need_w, need_b):
    acc = acc_dtype(torch.promote_types(hidden.dtype, weight.dtype))
    b, t, _ = hidden.shape
    return (hidden.new_empty((), dtype=acc), hidden.new_empty((b, t), dtype=acc),
            *_grads_fake(hidden, weight, bias, need_h, need_w, need_b))


def _token_setup(ctx, inputs, output):
    _loss, _logp, gh, gw, gb = output
    ctx.save_for_backward(gh, gw, gb)
    ctx.need = inputs[-3:]
    ctx.has_bias = inputs[2] is not None


def _token_backward(ctx, grad_loss, _grad_logp, _gh, _gw, _gb):
    gh, gw, gb = ctx.saved_tensors
    need_h, need_w, need_b = ctx.need
    scale = lambda g, need: g * grad_loss.to(g.dtype) if need else None  # noqa: E731
    return (scale(gh, need_h), scale(gw, need_w), scale(gb, need_b and ctx.has_bias), *([None] * 15))


fused_linear_pama_token_op.register_autograd(_token_backward, setup_context=_token_setup)
