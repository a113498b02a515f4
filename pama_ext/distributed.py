"""Data parallelism: which process group PAMA synchronises over, and the one collective it uses.

PAMA's batch-level weights (``granularity="batch"``, ``"batch_mean"`` and
``"sequence_gram"``, and the Gram of ``mgda_ub``) are functions of sums over tokens (over
responses for ``sequence_gram``, whose Gram is ``sum_b v_b v_b^T``; each rank holds whole
responses), so every rank all-reduces (SUM) its local sums before solving and all ranks then use identical weights: the weights of the global
batch (``shared/PAMA.md``, "Data parallelism"). The statistics are N + 2 + N^2 float64
numbers: one small collective per optimizer step, whatever the model size.

Which group:

* ``process_group=None`` (the default): the default (world) group whenever
  ``torch.distributed`` is available and initialized, no communication otherwise. A
  one-rank group also skips the collective.
* any ``ProcessGroup`` (from ``torch.distributed.new_group``): that group, e.g. the
  data-parallel group of a model-parallel (tensor/pipeline) layout.
* ``sync_statistics=False`` in ``pama_ext.PAMA``: never communicate (each rank solves on
  its own shard; weights differ between ranks).

The collective runs on the statistics' device: CUDA tensors under NCCL, CPU tensors under
gloo. Nothing here depends on how parameters are laid out, so the same code runs under
DDP, FSDP (1 and 2) and plain ``all_reduce``-your-own-gradients loops: the statistics come
from ``logp``, never from parameters. (The exception is ``combiner="mgda"``, see
``pama_ext.optim``.)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["is_distributed", "world_size", "all_reduce_sum", "all_reduce_mean"]


def is_distributed(process_group=None) -> bool:
    """True when ``torch.distributed`` is initialized and the group has more than one rank."""
    return world_size(process_group) > 1


def world_size(process_group=None) -> int:
    """Ranks in ``process_group`` (default group for None); 1 when not initialized."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size(process_group)


def all_reduce_sum(tensor: Tensor, process_group=None) -> Tensor:
    """In-place SUM over the group (a no-op on one rank or without ``torch.distributed``)."""
    if is_distributed(process_group):
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM, group=process_group)
    return tensor


def all_reduce_mean(tensor: Tensor, process_group=None) -> Tensor:
    """In-place mean over the group (what DDP does to gradients)."""
    n = world_size(process_group)
    if n > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM, group=process_group)
        tensor.div_(n)
    return tensor


def rank(process_group: Optional[object] = None) -> int:
    """This process's rank in the group (0 without ``torch.distributed``)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 0
    return torch.distributed.get_rank(process_group)
