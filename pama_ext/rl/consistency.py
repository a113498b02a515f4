"""Reward-consistency filtering of preference pairs for multi-objective alignment.

The data-centric view of multi-objective alignment: a preference pair whose chosen
response loses on some objective pulls that objective backwards, so training on such
pairs trades the objectives off against each other. Keeping only the pairs where the
chosen response wins on every objective (reward consistency) leaves data on which no
objective conflicts with the label.
"""

from __future__ import annotations

import numbers
from typing import Union

import torch
from torch import Tensor


def _shape(x: Tensor) -> str:
    return "[" + ", ".join(str(d) for d in x.shape) + "]"


def reward_consistency_mask(
    rewards_chosen: Tensor, rewards_rejected: Tensor, *, margin: Union[float, Tensor] = 0.0
) -> Tensor:
    """Bool [P]: True where the chosen response beats the rejected one on every objective.

    Args:
        rewards_chosen: [P, N] the N reward models' scores of each pair's chosen response.
        rewards_rejected: [P, N] the same for the rejected response.
        margin: how much the chosen response must win by, a float >= 0 or a [N] tensor
            (one margin per objective, e.g. each reward model's noise level).

    Pair p is kept iff ``chosen[p, i] - rejected[p, i] > margin_i`` for every objective i.
    The inequality is strict: a tie (difference exactly ``margin``, e.g. equal scores
    with ``margin=0``) is not a win, so the pair is dropped. NaN scores never win. The
    differences are taken in float64 (float32 inputs do not round a small win to a tie).
    """
    fn = "reward_consistency_mask"
    for name, x in (("rewards_chosen", rewards_chosen), ("rewards_rejected", rewards_rejected)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{fn}: `{name}` must be a torch.Tensor, got {type(x).__name__}")
        if x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{fn}: `{name}` must hold real numbers, got {x.dtype} with shape {_shape(x)}")
    if rewards_chosen.dim() != 2:
        raise ValueError(f"{fn}: `rewards_chosen` must be [P, N] (pairs, objectives), got {_shape(rewards_chosen)}")
    if rewards_rejected.shape != rewards_chosen.shape:
        raise ValueError(
            f"{fn}: `rewards_rejected` must have the shape of `rewards_chosen` {_shape(rewards_chosen)} "
            f"([P, N]), got {_shape(rewards_rejected)}"
        )
    if rewards_rejected.device != rewards_chosen.device:
        raise ValueError(
            f"{fn}: `rewards_rejected` is on {rewards_rejected.device} but `rewards_chosen` is on "
            f"{rewards_chosen.device}"
        )
    n = rewards_chosen.shape[1]
    if isinstance(margin, Tensor):
        if margin.dim() > 1 or (margin.dim() == 1 and margin.shape[0] != n):
            raise ValueError(f"{fn}: `margin` must be a float or a [N] = [{n}] tensor, got {_shape(margin)}")
        m = margin.to(device=rewards_chosen.device, dtype=torch.float64)
    elif isinstance(margin, numbers.Real) and not isinstance(margin, bool):
        m = torch.tensor(float(margin), dtype=torch.float64, device=rewards_chosen.device)
    else:
        raise TypeError(f"{fn}: `margin` must be a float or a [N] tensor, got {type(margin).__name__}")
    if not bool((m >= 0).all()):  # NaN fails too; [N] numbers, so the host read is cheap
        raise ValueError(f"{fn}: `margin` must be >= 0, got {margin}")
    diff = rewards_chosen.to(torch.float64) - rewards_rejected.to(torch.float64)
    return (diff > m).all(dim=1)
