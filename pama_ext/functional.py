"""Public functions: the PAMA weights and the fused Noon-PPO/PAMA loss.

``backend`` chooses the implementation: ``"torch"`` (pure PyTorch, ``reference.py``),
``"cpp"`` (the fused C++ CPU op), or ``"auto"`` (the fastest available for the inputs'
device; ``pama_ext.available_backends()`` lists them).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import _backends, _ops, reference  # noqa: F401  (_ops registers the torch.library ops)
from .reference import DEFAULT_GRANULARITY
from .preference import with_preference
from ._validation import LossInputs, LossSettings, check_gram, check_loss_inputs, check_scalars, check_settings


class PamaStats(NamedTuple):
    """Diagnostics of one loss evaluation, as tensors (reading them is the caller's choice).

    ``stats`` holds, in order, ``reference.STATS_FIELDS``: masked tokens M, clipped tokens
    (u > 1 + eps), non-finite logp / old_logp / advantages at masked positions, the
    minimised objective, the KKT residual of the Gram solve (``batch``, ``sequence_gram``),
    non-empty rows.
    """

    weights: Tensor
    row_scale: Tensor
    stats: Tensor

    def as_dict(self) -> dict:
        """The statistics as Python floats (a host synchronisation on GPU tensors)."""
        return dict(zip(reference.STATS_FIELDS, self.stats.tolist()))


def _checked(fn: str, logp, old_logp, advantages, mask, preference, clip_eps, granularity,
             loss_agg: str = "token_mean", backend: str = "auto", nonfinite: str = "raise"):
    """The public boundary, each part checked once: the keywords (``check_settings``), the
    tensors, the preference. Returns the ``(LossInputs, LossSettings)`` passed inward."""
    s = check_settings(fn, clip_eps, granularity, loss_agg, backend, nonfinite)
    return with_preference(fn, check_loss_inputs(fn, logp, old_logp, advantages, mask), preference), s


def pama_loss_and_stats(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_eps: float = 0.2,
    granularity: str = DEFAULT_GRANULARITY,
    loss_agg: str = "token_mean",
    backend: str = "auto",
    nonfinite: str = "raise",
    preference=None,
):
    """``pama_loss`` that also returns the weights and diagnostics (a ``PamaStats``).

    With a ``preference`` the weights are those of the preference-scaled advantages
    ``A_i p_max / p_i`` (on the simplex); the combined advantage is ``sum_i c_i A'_i``."""
    return loss_and_stats_of(*_checked("pama_loss", logp, old_logp, advantages, mask, preference,
                                       clip_eps, granularity, loss_agg, backend, nonfinite))


def loss_and_stats_of(x: LossInputs, s: LossSettings):
    """``pama_loss_and_stats`` on inputs and settings already checked (``check_loss_inputs``,
    ``check_settings``): the entry for callers that validated once (``PAMA``)."""
    backend = _backends.resolve(s.fn, s.backend, x.logp.device)
    forward = reference.pama_loss_and_stats if backend == "torch" else _backends.forward_of(backend)
    loss, weights, row_scale, stats = forward(*x, s.clip_eps, s.granularity, s.loss_agg, s.nonfinite == "raise")
    if s.granularity == "token":  # the [B, T] gradient factor (every backend) is its backward's, not weights
        weights = weights.new_zeros(0)
    return loss, PamaStats(weights, row_scale, stats)


def pama_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_eps: float = 0.2,
    granularity: str = DEFAULT_GRANULARITY,
    loss_agg: str = "token_mean",
    backend: str = "auto",
    nonfinite: str = "raise",
    preference=None,
) -> Tensor:
    """The Noon-PPO loss of the PAMA-combined advantage (a scalar), differentiable in ``logp``.

    Args:
        logp: [B, T] log-probabilities of the sampled tokens under the policy being trained.
        old_logp: [B, T] log-probabilities under the anchor policy (rollout or reference).
        advantages: [B, T, N] per-token or [B, N] per-sequence advantages of N objectives,
            before the Noon clamp (negative values are clamped to zero here).
        mask: [B, T] response-token mask (bool, or numbers where nonzero means "in").
        clip_eps: PPO clip range, > 0.
        granularity: where the weights are solved (default ``pama_ext.DEFAULT_GRANULARITY``,
            ``token``, chosen by benchmarks/FIDELITY.md): ``token`` (Theorem 1 per token;
            objectives whose advantage is exactly 0 abstain: a token is reinforced when no
            objective's advantage is negative and at least one is positive, by the smallest
            positive one), ``sequence`` or ``batch_mean`` (Theorem 1), ``batch`` (min-norm over the batch's advantage vectors), or
            ``sequence_gram`` (min-norm over the Gram of the per-response mean advantage
            vectors: each response counts once, whatever its length).
        loss_agg: ``token_mean`` (divide by the masked tokens) or ``seq_mean_token_mean``.
        backend: ``auto``, ``cpp`` or ``torch``.
        nonfinite: ``raise`` (default): a NaN/inf at a masked position of ``logp``,
            ``old_logp`` or ``advantages`` raises ``ValueError`` naming the argument.
            ``mask``: such tokens are dropped from the loss as if masked out, and counted
            in the statistics of ``pama_loss_and_stats``.
        preference: None (default: today's PAMA), or a preference on the simplex, [N] or
            per sample [B, N], every entry > 0, that moves the solution towards the
            objectives it weights: PAMA on the preference-scaled advantages
            ``A_i p_max / p_i`` (``pama_ext/preference.py``). The combined advantage still
            conflicts with no objective; uniform ``p`` is today's PAMA exactly.

    An empty mask gives a loss of 0 and a zero gradient. The result is float32 (float64
    for float64 inputs); the gradient has the dtype of ``logp``.
    """
    x, s = _checked("pama_loss", logp, old_logp, advantages, mask, preference,
                    clip_eps, granularity, loss_agg, backend, nonfinite)
    return loss_and_stats_of(x, s)[0]


def pama_weights(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_eps: float = 0.2,
    granularity: str = DEFAULT_GRANULARITY,
    backend: str = "auto",
    preference=None,
) -> Tensor:
    """The weights PAMA combines the objectives with (no gradient).

    Shape [N] for ``batch``, ``batch_mean`` and ``sequence_gram``, [B, N] for ``sequence``, [B, T, N] for
    ``token`` (per token; objectives whose advantage is exactly 0 abstain: a token is
    reinforced when no objective's advantage is negative and at least one is positive, by the
    smallest positive one. Weights: split equally over the negative objectives if any, else
    over the positive ones equal to the smallest, else uniform 1/N; so
    ``sum_i c_i max(A_i, 0)`` is the token's combined advantage). Non-finite
    tokens are left out of the statistics, as ``nonfinite="mask"`` does for the loss.
    With a ``preference`` (as in ``pama_loss``) they are the weights of the scaled
    advantages ``A_i p_max / p_i``.
    """
    x, s = _checked("pama_weights", logp, old_logp, advantages, mask, preference, clip_eps, granularity,
                    backend=backend)
    return weights_of(x, s)


def weights_of(x: LossInputs, s: LossSettings):
    """``pama_weights`` on inputs and settings already checked (``check_loss_inputs``,
    ``check_settings``)."""
    backend = _backends.resolve(s.fn, s.backend, x.logp.device)
    with torch.no_grad():
        if s.granularity == "token" or backend == "torch":
            return reference.pama_weights(*x, s.clip_eps, s.granularity)
        _, weights, _, _ = _backends.forward_of(backend)(*x, s.clip_eps, s.granularity, "token_mean", False)
        return weights


def min_norm_weights(gram: Tensor, *, backend: str = "auto") -> Tensor:
    """The c on the probability simplex minimising c^T G c, exactly (float64).

    ``gram`` is N x N symmetric positive semi-definite, 1 <= N <= 64. N = 1: [1]; N = 2:
    the closed form; N >= 3: Wolfe's min-norm-point algorithm. Where the minimiser is not
    unique, objectives with identical advantage vectors share their weight equally, and
    c = 0 gives the uniform vector. Returns float64 on ``gram``'s device.
    """
    fn = "min_norm_weights"
    g = check_gram(fn, gram)
    backend = _backends.resolve(fn, backend, torch.device("cpu"))
    c = _backends._C.min_norm_weights(g) if backend == "cpp" else reference.min_norm_weights(g)
    return c.to(gram.device)


def theorem1(a: Tensor) -> Tensor:
    """Theorem 1 along the last dimension: the simplex weights minimising (sum_i c_i a_i)^2.

    All positive: one-hot on the argmin; all negative: one-hot on the argmax; mixed signs:
    a zero-sum combination (uniform over exact zeros, else two-point on argmin/argmax).
    Exact ties share the weight equally. Returns float64 of ``a``'s shape.
    """
    return reference.theorem1(check_scalars("theorem1", a))
