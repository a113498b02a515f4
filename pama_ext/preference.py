"""Steerable PAMA: a preference vector that moves PAMA's Pareto point (issue 13).

Construction (README, "Steering PAMA with a preference"). Given a preference ``p`` on the
simplex (every entry > 0), PAMA runs unchanged on the *preference-scaled* advantages

    A'_i = A_i * (p_max / p_i)

at every granularity and in every backend. Uniform ``p`` gives factors of exactly 1, so
today's PAMA, bit for bit. Why this steers, and what it keeps:

* ``token`` (Theorem 1 per token): ``s_t = min_i A'_i`` over the objectives that do not
  abstain. This is the weighted-Chebyshev form of Theorem 1. The least preferred
  objectives are relaxed by ``p_max / p_i >= 1``, so the bottleneck is more often a
  preferred objective, at its own scale. Unlike a weighted sum (MORLHF's steering), the
  Chebyshev scalarisation ``max min_i f_i / p_i`` reaches every Pareto-optimal point, also
  on non-convex parts of the front.
* ``batch`` / ``sequence_gram`` (the min-norm point of a Gram): scaling an objective's
  vector up lowers its min-norm weight. For two orthogonal objectives the min-norm point
  of ``{v_1 p_max/p_1, v_2 p_max/p_2}`` is proportional to ``p_1 v_1 + p_2 v_2``, the
  direction on the preference ray.
* ``sequence`` / ``batch_mean``: Theorem 1 on the scaled scalars, as ``token``.

The guarantee is kept for every objective (all preferences are > 0): ``<d, v_j'> >= ||d||^2``
for the scaled vectors, so ``<d, v_j> >= (p_j / p_max) ||d||^2 >= 0`` (batch level), and
``s_t > 0`` only where no objective's advantage is negative (token level). The combined
advantage conflicts with no objective; the preference only chooses where on the front it
goes. The cost is one multiply per advantage: O(N) per token, nothing per batch.

Zero entries are refused. The limit ``p_i -> 0`` keeps objective i as a veto only; the
linear combiner (MORLHF) is the way to drop an objective.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._validation import _shape


def check_preference(fn: str, preference, n: int, batch: Optional[int] = None, *, allow_zero: bool = False,
                     device=None) -> Optional[Tensor]:
    """``preference`` as float64 [N] or [B, N] (None stays None), as given: PAMA reads only
    the ratios ``p_max / p_i``, so a vector on the simplex and any positive multiple of it
    steer alike. Entries must be finite and > 0 (``allow_zero``: >= 0 with a positive sum)."""
    if preference is None:
        return None
    p = preference if isinstance(preference, Tensor) else torch.as_tensor(preference, dtype=torch.float64)
    if p.is_complex() or p.dtype == torch.bool:
        raise TypeError(f"{fn}: `preference` must hold real numbers, got {p.dtype}")
    p = p.detach().to(dtype=torch.float64, device=device if device is not None else p.device)
    ok = p.shape == (n,) or (batch is not None and p.dim() == 2 and p.shape == (batch, n))
    if not ok:
        want = f"[N] = [{n}]" + (f" or [B, N] = [{batch}, {n}]" if batch is not None else "")
        raise ValueError(f"{fn}: `preference` must have shape {want}, got {_shape(p)}")
    # one host read of a few numbers: a preference is a user's setting, not a hot-path tensor
    lo = float(p.min()) if p.numel() else 0.0
    if not bool(torch.isfinite(p).all()):
        raise ValueError(f"{fn}: `preference` {_shape(p)} has non-finite entries")
    if allow_zero:
        if lo < 0 or float(p.sum(-1).min()) <= 0:
            raise ValueError(f"{fn}: `preference` {_shape(p)} must be >= 0 with a positive sum in every row")
    elif lo <= 0:
        raise ValueError(
            f"{fn}: `preference` {_shape(p)} must be > 0 for every objective with combiner 'pama' (smallest "
            f"entry {lo:g}): PAMA never trades an objective away; give an objective you care little about a "
            "small positive share, or use combiner='linear' to drop it"
        )
    return p


def preference_scale(preference: Tensor) -> Tensor:
    """``p_max / p_i`` per objective, float64 of ``preference``'s shape (exactly 1 when uniform)."""
    return preference.amax(-1, keepdim=True) / preference


def scale_advantages(advantages: Tensor, preference: Optional[Tensor]) -> Tensor:
    """The preference-scaled advantages ``A_i * p_max / p_i`` in ``advantages``' dtype.

    ``advantages`` [B, T, N] or [B, N]; ``preference`` [N] or [B, N] (checked), or None
    (returned unchanged)."""
    if preference is None:
        return advantages
    scale = preference_scale(preference).to(device=advantages.device)
    if scale.dim() == 2 and advantages.dim() == 3:
        scale = scale[:, None, :]
    return (advantages.to(torch.float64) * scale).to(advantages.dtype)


def with_preference(fn: str, x, preference):
    """Validated inputs ``x`` (a NamedTuple with ``advantages`` [B, T, N] or [B, N]) with
    their advantages preference-scaled; ``x`` itself when ``preference`` is None."""
    if preference is None:
        return x
    b, n = x.advantages.shape[0], x.advantages.shape[-1]
    p = check_preference(fn, preference, n, b, device=x.advantages.device)
    return x._replace(advantages=scale_advantages(x.advantages, p))
