"""Per-objective group-relative advantages (GRPO): no value heads, one advantage per response.

GRPO (Shao et al. 2024, DeepSeekMath) samples G responses per prompt and scores each
response by how it compares with the others in its group. With N objectives each one is
normalised on its own (shared/PAMA.md: the comparison across objectives must not be
decided by reward scale), giving the [B, N] sequence-level advantages PAMA's loss
broadcasts over each response's tokens.

Conventions (those of TRL's ``GRPOTrainer``, so results carry over):

* ``scores`` is [B, N] with the G responses of one prompt in consecutive rows
  (B = number of prompts x G).
* ``A_b = (r_b - mean of b's group) / (std + eps)`` per objective, where std is the
  unbiased (Bessel-corrected) standard deviation of b's group (``scale="group"``, TRL's
  default), of the whole batch (``scale="batch"``), or 1 (``scale="none"``: centring only).
  ``eps = 1e-4`` as in TRL: a group whose responses all score the same gets advantage 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

SCALES = ("group", "batch", "none")


def group_advantages(scores: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """[B, N] per-objective advantages of ``scores`` [B, N] (or [B] for one objective), the
    responses of a prompt in consecutive groups of ``group_size`` rows."""
    fn = "group_advantages"
    if not isinstance(scores, Tensor) or scores.dim() not in (1, 2) or not scores.is_floating_point():
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"{fn}: `scores` must be a float tensor [B, N] or [B], got {shape}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"{fn}: `group_size` must be an int >= 1, got {group_size!r}")
    if scores.shape[0] % group_size:
        raise ValueError(
            f"{fn}: `scores` has {scores.shape[0]} rows, not a multiple of group_size={group_size} "
            "(each prompt's responses must fill one group)"
        )
    if scale not in SCALES:
        raise ValueError(f"{fn}: `scale` must be one of {SCALES}, got {scale!r}")
    x = scores if scores.dim() == 2 else scores[:, None]
    b, n = x.shape
    groups = x.reshape(b // group_size, group_size, n)
    centred = (groups - groups.mean(dim=1, keepdim=True)).reshape(b, n)
    if scale == "group":
        std = groups.std(dim=1, keepdim=True).expand_as(groups).reshape(b, n) if group_size > 1 else torch.zeros_like(x)
        centred = centred / (std + eps)
    elif scale == "batch":
        std = x.std(dim=0, keepdim=True) if b > 1 else torch.zeros_like(x[:1])
        centred = centred / (std + eps)
    return centred if scores.dim() == 2 else centred[:, 0]
