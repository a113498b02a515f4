"""Sufficient statistics of the batch-level PAMA solve: compute, add, all-reduce, solve.

The ``batch``, ``batch_mean`` and ``sequence_gram`` weights depend on the batch only through
sums over its valid tokens or its responses (``shared/PAMA.md``, "Granularity"):

* ``M`` = number of valid tokens (masked, every input finite);
* ``Q_i = sum_t I^(i)_t`` (``batch_mean``: a_i = Q_i / M, then Theorem 1);
* ``G_ij = sum_t I^(i)_t I^(j)_t`` (``batch``: the min-norm point of the N x N Gram), or,
  for ``sequence_gram``, ``G_ij = sum_b v^(i)_b v^(j)_b`` with ``v_b`` response b's mean of
  ``I_t`` over its valid tokens (each response counts once; a response without a valid
  token adds nothing), and the same min-norm solve,

with ``I^(i)_t = max(A'^(i)_t, 0)`` where ``u_t <= 1 + eps`` and 0 where the token is
clipped. Sums add up: the statistics of a batch are the sum of those of its micro-batches,
and of the per-rank shards under data parallelism (for ``sequence_gram`` the terms are
per response, so each micro-batch and each rank must hold whole responses, as they do when
a batch is split by rows). This module computes them
(:func:`batch_statistics`), adds them (``+``), all-reduces them across a process group
(:meth:`BatchStatistics.all_reduce`) and solves once (:meth:`BatchStatistics.solve`). The
loss is then evaluated with the weights held fixed (``pama_ext.weighted_noon_loss``).
``pama_ext.PAMA`` does all of this for you (``accumulate`` / ``solve``); the functions are
public for custom training loops.

The statistics come from one op, ``pama_ext::pama_statistics``: on CPU tensors the fused
op's own reduction pass (the C++ kernel, stopped before the solve), elsewhere
``reference.batch_statistics``. The per-token maths follows ``reference.fused_forward`` exactly (ratio and clip indicator
in the inputs' accumulation precision, float32 or float64; every sum in float64), so
``BatchStatistics.solve`` on the statistics of a whole batch gives the weights of
``pama_ext.pama_weights`` on that batch up to summation-order rounding.

The statistics live in one flat float64 tensor on the inputs' device,
``[M, clipped, Q_1..Q_N, G_11..G_NN]`` (``2 + N + N^2`` numbers): one ``all_reduce``
synchronises a whole batch. Nothing here reads a tensor on the host except ``solve`` for
``granularity="batch"`` / ``"sequence_gram"`` (the exact min-norm solver runs on the CPU,
on N^2 numbers). The vector does not record which Gram it holds: add, all-reduce and solve
statistics computed for one granularity.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import reference
from . import _ops  # noqa: F401  (registers pama_ext::pama_statistics)
from ._backends import _C
from ._validation import MAX_OBJECTIVES, NONFINITE_MODES, check_choice, check_clip_eps, check_loss_inputs

__all__ = ["BatchStatistics", "Solution", "batch_statistics", "solve_gram", "STATISTICS_GRANULARITIES"]

#: the granularities whose weights need batch-level statistics (the others are local)
STATISTICS_GRANULARITIES = ("batch", "batch_mean", "sequence_gram")


class Solution(NamedTuple):
    """Weights found by a solve, with its diagnostics (0-dim float64 tensors)."""

    weights: Tensor  # [N] float64, on the simplex
    objective: Tensor  # the minimised value: c^T G c (batch, sequence_gram), (c . a)^2 (batch_mean)
    kkt_residual: Tensor  # max(0, c^T G c - min_j (G c)_j) for a Gram solve; 0 for Theorem 1


def solve_gram(gram: Tensor) -> Solution:
    """Exact ``argmin_{c in simplex} c^T G c`` of a Gram matrix built by this package.

    Unlike ``pama_ext.min_norm_weights`` this does not validate ``gram`` (it is PSD by
    construction, a sum of outer products); it symmetrises it and calls the C++ solver when
    the extension is built, the reference solver otherwise. The weights come back on
    ``gram``'s device in float64; objective and KKT residual are computed there as tensors.
    """
    g = gram.detach().to(device="cpu", dtype=torch.float64)
    g = 0.5 * (g + g.T)
    c = _C.min_norm_weights(g.contiguous()) if _C is not None else reference.min_norm_weights(g)
    c = c.to(device=gram.device, dtype=torch.float64)
    gd = gram.detach().to(torch.float64)
    gd = 0.5 * (gd + gd.T)
    g_c = gd @ c
    objective = c @ g_c
    kkt = (objective - g_c.min()).clamp_min(0)
    return Solution(c, objective, kkt)


class BatchStatistics:
    """The sums ``[M, clipped, Q (N), G (N x N)]`` of a batch, float64, on one device.

    ``a + b`` (and ``a += b``) adds the statistics of two disjoint sets of tokens;
    ``all_reduce`` sums them over a process group in place; ``solve`` returns the weights.
    """

    __slots__ = ("data", "num_objectives")

    def __init__(self, data: Tensor, num_objectives: int):
        n = int(num_objectives)
        if data.dtype != torch.float64 or data.dim() != 1 or data.numel() != 2 + n + n * n:
            raise ValueError(
                f"BatchStatistics: `data` must be a float64 vector of 2 + N + N^2 = {2 + n + n * n} "
                f"numbers for N = {n}, got {data.dtype} of shape {list(data.shape)}"
            )
        self.data = data
        self.num_objectives = n

    @classmethod
    def zeros(cls, num_objectives: int, device=None) -> "BatchStatistics":
        n = int(num_objectives)
        if not 1 <= n <= MAX_OBJECTIVES:
            raise ValueError(f"BatchStatistics: num_objectives must be in [1, {MAX_OBJECTIVES}], got {n}")
        return cls(torch.zeros(2 + n + n * n, dtype=torch.float64, device=device), n)

    # views into the flat vector
    @property
    def masked_tokens(self) -> Tensor:
        """M: valid (masked and finite) tokens, 0-dim."""
        return self.data[0]

    @property
    def clipped_tokens(self) -> Tensor:
        """Valid tokens whose ratio is above 1 + eps, 0-dim."""
        return self.data[1]

    @property
    def sums(self) -> Tensor:
        """Q: [N], sum over valid tokens of I^(i)_t."""
        n = self.num_objectives
        return self.data[2 : 2 + n]

    @property
    def gram(self) -> Tensor:
        """G: [N, N], sum over valid tokens of I_t I_t^T (``batch``), sum over responses of
        v_b v_b^T (``sequence_gram``), zero if computed for ``batch_mean``."""
        n = self.num_objectives
        return self.data[2 + n :].view(n, n)

    @property
    def device(self) -> torch.device:
        return self.data.device

    def _check_same(self, other: "BatchStatistics") -> None:
        if not isinstance(other, BatchStatistics):
            raise TypeError(f"BatchStatistics: cannot add {type(other).__name__}")
        if other.num_objectives != self.num_objectives:
            raise ValueError(
                f"BatchStatistics: cannot add statistics of N = {other.num_objectives} objectives "
                f"to statistics of N = {self.num_objectives}"
            )

    def __add__(self, other: "BatchStatistics") -> "BatchStatistics":
        self._check_same(other)
        return BatchStatistics(self.data + other.data.to(self.device), self.num_objectives)

    def __iadd__(self, other: "BatchStatistics") -> "BatchStatistics":
        self._check_same(other)
        self.data += other.data.to(self.device)
        return self

    def clone(self) -> "BatchStatistics":
        return BatchStatistics(self.data.clone(), self.num_objectives)

    def all_reduce(self, process_group=None) -> "BatchStatistics":
        """Sum the statistics over ``process_group`` in place (one ``all_reduce``); returns self.

        ``process_group=None`` is the default group. Does nothing when ``torch.distributed``
        is not initialized or the group has one rank.
        """
        from .distributed import all_reduce_sum

        all_reduce_sum(self.data, process_group)
        return self

    def solve(self, granularity: str = "batch") -> Solution:
        """The weights for ``batch`` / ``sequence_gram`` (min-norm point of G) or ``batch_mean``
        (Theorem 1 on Q / M). ``granularity`` must be the one the statistics were computed for."""
        check_choice("BatchStatistics.solve", "granularity", granularity, STATISTICS_GRANULARITIES)
        if granularity in ("batch", "sequence_gram"):
            return solve_gram(self.gram)
        a = self.sums / self.masked_tokens.clamp_min(1)  # a = 0 when M = 0 (uniform weights)
        c = reference.theorem1(a)
        objective = (c @ a) ** 2
        return Solution(c, objective, torch.zeros((), dtype=torch.float64, device=c.device))

    def __repr__(self) -> str:
        return f"BatchStatistics(N={self.num_objectives}, data={self.data})"


@torch.no_grad()
def batch_statistics(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_eps: float = 0.2,
    granularity: str = "batch",
    nonfinite: str = "raise",
) -> BatchStatistics:
    """The sufficient statistics of the ``batch`` / ``batch_mean`` / ``sequence_gram`` solve for
    one (micro-)batch.

    Args are those of ``pama_ext.pama_loss`` (no gradient flows: this is a statistics
    pass). ``granularity="batch"`` fills M, the clipped count, Q and the token Gram G;
    ``"sequence_gram"`` fills M, the clipped count, Q and the Gram of the per-response mean
    vectors (``sum_b v_b v_b^T``; the micro-batch must hold whole responses);
    ``"batch_mean"`` leaves G at zero (it is not needed and costs N^2 per token).
    ``nonfinite="raise"`` raises on a NaN/inf at a masked position (as ``pama_loss``
    does; a host synchronisation), ``"mask"`` drops such tokens.

    Example (gradient accumulation over micro-batches, by hand)::

        st = sum((batch_statistics(*mb) for mb in micro_batches),
                 BatchStatistics.zeros(N))
        weights = st.all_reduce().solve("batch").weights    # all ranks, all micro-batches
        for mb in micro_batches:
            loss = pama_ext.weighted_noon_loss(*mb, weights) / len(micro_batches)
            loss.backward()
    """
    fn = "batch_statistics"
    clip_eps = check_clip_eps(fn, clip_eps)
    check_choice(fn, "granularity", granularity, STATISTICS_GRANULARITIES)
    check_choice(fn, "nonfinite", nonfinite, NONFINITE_MODES)
    x = check_loss_inputs(fn, logp.detach(), old_logp, advantages, mask)
    return statistics_of(x, clip_eps, granularity, nonfinite, fn)


@torch.no_grad()
def statistics_of(x, clip_eps: float, granularity: str, nonfinite: str, fn: str = "batch_statistics") -> BatchStatistics:
    """``batch_statistics`` on inputs already validated (``check_loss_inputs``): the entry
    for callers that validated once (``PAMA``). ``x.logp`` may carry a graph; it is not used."""
    with torch.autocast(x.logp.device.type, enabled=False):
        return _batch_statistics(x._replace(logp=x.logp.detach()), clip_eps, granularity, nonfinite, fn)


def _batch_statistics(x, clip_eps: float, granularity: str, nonfinite: str, fn: str) -> BatchStatistics:
    # one op: the fused CPU kernel's reduction pass, or reference.batch_statistics elsewhere
    data, bad = torch.ops.pama_ext.pama_statistics(x.logp, x.old_logp, x.advantages, x.mask, clip_eps, granularity)
    if nonfinite == "raise":
        reference.raise_nonfinite(bad.tolist(), fn)  # a host synchronisation, as the loss's check
    return BatchStatistics(data, x.advantages.shape[-1])
