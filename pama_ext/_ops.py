"""``torch.library`` registration of the fused PAMA op: schema, kernels, fake, autograd.

One schema per op, one kernel per backend (the pytorch/extension-cpp layout). The schemas
are defined whether or not the extension was built, so that other backends (Triton,
CUDA) can register kernels on the same ops; the CPU kernel comes from ``pama_ext._C``.

``pama_forward`` is the one reduction pass plus the solve (see csrc/README.md);
``pama_backward`` is the one elementwise pass; ``pama_statistics`` is the reduction pass
alone, returning the batch statistics it accumulates (``pama_ext.statistics``). Autograd connects them, saving only the
inputs and the tiny ``weights`` / ``row_scale`` outputs; for ``token`` the forward's
``weights`` is the [B, T] gradient factor and the backward is one multiply by it
(``reference.token_factor_backward``), not a second pass over the inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from ._backends import _C

_lib = torch.library.Library("pama_ext", "DEF")
_lib.define(
    "pama_forward(Tensor logp, Tensor old_logp, Tensor advantages, Tensor mask, float clip_eps, "
    "str granularity, str loss_agg, bool check_finite) -> (Tensor, Tensor, Tensor, Tensor)"
)
_lib.define(
    "pama_backward(Tensor grad_loss, Tensor logp, Tensor old_logp, Tensor advantages, Tensor mask, "
    "Tensor weights, Tensor row_scale, float clip_eps, str granularity) -> Tensor"
)

_lib.define(
    "pama_statistics(Tensor logp, Tensor old_logp, Tensor advantages, Tensor mask, float clip_eps, "
    "str granularity) -> (Tensor, Tensor)"
)

N_STATS = 8


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- fake (meta) kernels
def forward_weights_shape(granularity: str, b: int, t: int, n: int) -> tuple:
    """The fused forward's ``weights`` output, in every backend: [N] (batch, batch_mean,
    sequence_gram), [B, N] (sequence), and for token the [B, T] per-token gradient factor
    (csrc/README.md)."""
    return {"batch": (n,), "batch_mean": (n,), "sequence_gram": (n,), "sequence": (b, n), "token": (b, t)}[granularity]


@torch.library.register_fake("pama_ext::pama_forward")
def _forward_fake(logp, old_logp, advantages, mask, clip_eps, granularity, loss_agg, check_finite):
    acc = _acc_dtype(logp)
    (b, t), n = logp.shape, advantages.shape[-1]
    return (
        logp.new_empty((), dtype=acc),
        logp.new_empty(forward_weights_shape(granularity, b, t, n), dtype=acc),
        logp.new_empty((b,), dtype=acc),
        logp.new_empty((N_STATS,), dtype=torch.float64),
    )


@torch.library.register_fake("pama_ext::pama_backward")
def _backward_fake(grad_loss, logp, old_logp, advantages, mask, weights, row_scale, clip_eps, granularity):
    return torch.empty_like(logp)


@torch.library.register_fake("pama_ext::pama_statistics")
def _statistics_fake(logp, old_logp, advantages, mask, clip_eps, granularity):
    n = advantages.shape[-1]
    return logp.new_empty((2 + n + n * n,), dtype=torch.float64), logp.new_empty((3,), dtype=torch.float64)


# --------------------------------------------------------------------------- fallback kernels
# The reference implementation serves any device without a dedicated kernel, so the op is
# usable (and checkable with opcheck) everywhere; device kernels below take precedence.
@torch.library.impl(_lib, "pama_forward", "CompositeExplicitAutograd")
def _forward_reference(logp, old_logp, advantages, mask, clip_eps, granularity, loss_agg, check_finite):
    return reference.fused_forward(logp, old_logp, advantages, mask, clip_eps, granularity, loss_agg, check_finite)


@torch.library.impl(_lib, "pama_backward", "CompositeExplicitAutograd")
def _backward_reference(grad_loss, logp, old_logp, advantages, mask, weights, row_scale, clip_eps, granularity):
    return reference.fused_backward(
        grad_loss, logp, old_logp, advantages, mask, weights, row_scale, clip_eps, granularity
    )


@torch.library.impl(_lib, "pama_statistics", "CompositeExplicitAutograd")
def _statistics_reference(logp, old_logp, advantages, mask, clip_eps, granularity):
    return reference.batch_statistics(logp, old_logp, advantages, mask, clip_eps, granularity)


# --------------------------------------------------------------------------- CPU kernels (C++)
if _C is not None:

    @torch.library.impl(_lib, "pama_forward", "CPU")
    def _forward_cpu(logp, old_logp, advantages, mask, clip_eps, granularity, loss_agg, check_finite):
        return tuple(
            _C.pama_forward(logp, old_logp, advantages, mask, clip_eps, granularity, loss_agg, check_finite)
        )

    @torch.library.impl(_lib, "pama_backward", "CPU")
    def _backward_cpu(grad_loss, logp, old_logp, advantages, mask, weights, row_scale, clip_eps, granularity):
        return _C.pama_backward(
            grad_loss, logp, old_logp, advantages, mask, weights, row_scale, clip_eps, granularity
        )


if _C is not None and hasattr(_C, "pama_statistics"):

    @torch.library.impl(_lib, "pama_statistics", "CPU")
    def _statistics_cpu(logp, old_logp, advantages, mask, clip_eps, granularity):
        # the forward's reduction pass, stopped before the solve
        return tuple(_C.pama_statistics(logp, old_logp, advantages, mask, clip_eps, granularity))


# --------------------------------------------------------------------------- CUDA kernels
# Built only when torch has CUDA (setup.py, PAMA_EXT_CUDA); csrc/pama_cuda.cpp. No host
# synchronisation, except check_finite=True, which reads the three non-finite counts to raise
# the contract's ValueError (nonfinite="mask" is synchronisation-free). That read and the
# raise happen here, in Python, as in the Triton backend, not in the C++ glue: on the first
# H200 run the C++ raise after its device-to-host read crashed the process (a segfault,
# benchmarks/results/gpu_check_H200_run1.json) where a ValueError was due.
if _C is not None and hasattr(_C, "pama_forward_cuda"):

    @torch.library.impl(_lib, "pama_forward", "CUDA")
    def _forward_cuda(logp, old_logp, advantages, mask, clip_eps, granularity, loss_agg, check_finite):
        out = tuple(_C.pama_forward_cuda(logp, old_logp, advantages, mask, clip_eps, granularity, loss_agg))
        if check_finite:
            reference.raise_nonfinite(out[3][2:5].tolist())  # stats: counts of logp, old_logp, advantages
        return out

    @torch.library.impl(_lib, "pama_backward", "CUDA")
    def _backward_cuda(grad_loss, logp, old_logp, advantages, mask, weights, row_scale, clip_eps, granularity):
        return _C.pama_backward_cuda(
            grad_loss, logp, old_logp, advantages, mask, weights, row_scale, clip_eps, granularity
        )


# --------------------------------------------------------------------------- autograd
def setup_context(ctx, inputs, output):
    """Autograd context of a fused forward (this op and the Triton backend's): only the loss
    is differentiable (without mark_non_differentiable the weights/stats a caller keeps for
    logging would carry a grad_fn and keep the batch's saved inputs alive). ``token`` saves
    its [B, T] gradient factor and the row scales, nothing else; the other granularities
    save the inputs and the tiny weights / row scales."""
    logp, old_logp, advantages, mask, clip_eps, granularity, _loss_agg, _check = inputs
    _loss, weights, row_scale, stats = output
    ctx.mark_non_differentiable(weights, row_scale, stats)
    # no zero-filled gradients for the non-differentiable outputs: for `token` that would be a
    # [B, T] fill in every backward
    ctx.set_materialize_grads(False)
    if granularity == "token":
        ctx.save_for_backward(weights, row_scale)
        ctx.grad_dtype = logp.dtype
    else:
        ctx.save_for_backward(logp, old_logp, advantages, mask, weights, row_scale)
    ctx.clip_eps = clip_eps
    ctx.granularity = granularity


def make_backward(backward_op):
    """The autograd backward of a fused forward whose elementwise pass is ``backward_op``."""

    def backward(ctx, grad_loss, _gw, _gr, _gs):
        if grad_loss is None:  # the loss took no part in what is being differentiated
            return None, None, None, None, None, None, None, None
        if ctx.granularity == "token":
            factor, row_scale = ctx.saved_tensors
            grad_logp = reference.token_factor_backward(grad_loss, factor, row_scale, ctx.grad_dtype)
        else:
            logp, old_logp, advantages, mask, weights, row_scale = ctx.saved_tensors
            grad_logp = backward_op(
                grad_loss, logp, old_logp, advantages, mask, weights, row_scale, ctx.clip_eps, ctx.granularity
            )
        return grad_logp, None, None, None, None, None, None, None

    return backward


torch.library.register_autograd(
    "pama_ext::pama_forward", make_backward(torch.ops.pama_ext.pama_backward), setup_context=setup_context
)
