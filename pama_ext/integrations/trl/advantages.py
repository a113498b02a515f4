"""Per-objective GRPO advantages: TRL's group normalisation applied to each reward function.

TRL sums the weighted rewards into one column and normalises that. Here every reward
function's column is normalised on its own, with the very formula TRL applies to the sum
(``GRPOTrainer._generate_and_score_completions``, ``multi_objective_aggregation=
"sum_then_normalize"``), so that one objective alone gives TRL's advantage exactly:

    A_i = (r_i - mean_group(r_i)) / (std(r_i) + 1e-4)

with ``std`` over the group (``"group"``), the whole generation batch (``"batch"``), or no
division (``"none"``); NaN rewards (a reward function returned None) are left out of the
means and give an advantage of 0 for that objective, as TRL does for unscorable rows.
"""

from __future__ import annotations

import torch
from torch import Tensor
from trl.trainer.utils import nanstd

_STD_EPS = 1e-4  # TRL's


def _one_objective(r: Tensor, num_generations: int, normalization: str) -> Tensor:
    """TRL's sum-then-normalize advantage of one reward column ``r`` [B] (B = groups x G)."""
    grouped = r.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations, dim=0)
    adv = r - mean
    if normalization == "group":
        if num_generations > 1:
            std = nanstd(grouped, dim=1).repeat_interleave(num_generations, dim=0)
        else:  # eval with num_generations_eval = 1, as TRL
            std = torch.zeros_like(r)
        adv = adv / (std + _STD_EPS)
    elif normalization == "batch":
        std = nanstd(r).expand_as(r) if r.numel() > 1 else torch.zeros_like(r)
        adv = adv / (std + _STD_EPS)
    elif normalization != "none":
        raise ValueError(f"objective_normalization must be 'group', 'batch' or 'none', got {normalization!r}")
    return adv


def per_objective_advantages(rewards: Tensor, num_generations: int, normalization: str) -> Tensor:
    """``[B, N]`` advantages from ``[B, N]`` rewards (every process's rows, in TRL's order)."""
    if rewards.dim() != 2 or rewards.shape[0] % num_generations != 0:
        raise ValueError(
            f"per_objective_advantages: rewards must be [B, N] with B a multiple of num_generations = "
            f"{num_generations}, got {list(rewards.shape)}"
        )
    cols = [_one_objective(rewards[:, i], num_generations, normalization) for i in range(rewards.shape[1])]
    return torch.nan_to_num(torch.stack(cols, dim=1), nan=0.0)
