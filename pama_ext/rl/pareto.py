"""Pareto tools for comparing policies on N objectives: a non-dominated filter, hypervolume.

Conventions (maximisation unless ``maximize`` says otherwise):

* ``p`` dominates ``q`` when ``p >= q`` on every objective and ``p > q`` on at least one.
  A point never dominates an exact copy of itself, so **duplicates of a non-dominated
  point are all kept** by ``non_dominated`` (a stable, order-independent rule; call
  ``unique`` first if one copy is wanted).
* ``hypervolume(points, ref)`` is the Lebesgue measure of the union of the boxes
  ``[ref, p]`` over the points that strictly dominate ``ref`` on every coordinate; the others
  contribute nothing and are ignored. It is exact up to floating-point rounding (float64):
  D = 2 by a sweep (O(K log K)); D = 3 by slicing along the third objective with every
  slice's 2-D area computed in one vectorised sweep (O(K^2)); D = 4 by slicing along the
  fourth objective with a 3-D volume per slice (O(K^3)). Dominated points are removed
  first. D = 1 is the trivial max; D > 4 raises (the exact problem is #P-hard in D, and
  nothing here is written for it).
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch
from torch import Tensor

MAX_HV_DIM = 4
_CHUNK = 1 << 22  # elements per vectorised block (bounds the memory of the K x K steps)

ArrayLike = Union[Tensor, np.ndarray, Sequence]


def _signs(fn: str, maximize, d: int) -> np.ndarray:
    """+1 for objectives to maximise, -1 for objectives to minimise, shape [d]."""
    if isinstance(maximize, (bool, np.bool_)):
        return np.full(d, 1.0 if maximize else -1.0)
    flags = list(maximize)
    if len(flags) != d or not all(isinstance(f, (bool, np.bool_)) for f in flags):
        raise ValueError(
            f"{fn}: `maximize` must be a bool or a sequence of {d} bools (one per objective), got {maximize!r}"
        )
    return np.where(np.asarray(flags, dtype=bool), 1.0, -1.0)


# --------------------------------------------------------------------------- non-dominated
def non_dominated(points: ArrayLike, maximize: Union[bool, Sequence[bool]] = True) -> Tensor:
    """Bool mask [K]: True for the points no other point dominates.

    Args:
        points: [K, D] (tensor, array or nested sequence).
        maximize: True (all objectives maximised), False (all minimised) or one bool per
            objective.

    Duplicates of a non-dominated point are all kept (see the module docstring). NaN
    raises ``ValueError``; +-inf compare as usual. O(K^2 D) comparisons in NumPy, in
    blocks. The mask is a torch bool tensor on the input's device (CPU for non-tensors).
    """
    fn = "non_dominated"
    device = points.device if isinstance(points, Tensor) else torch.device("cpu")
    p = _as_float64(points)
    if p.ndim != 2:
        raise ValueError(f"{fn}: `points` must be [K, D], got shape {list(p.shape)}")
    if np.isnan(p).any():
        raise ValueError(f"{fn}: `points` {list(p.shape)} contains NaN")
    return torch.from_numpy(_non_dominated(p * _signs(fn, maximize, p.shape[1]))).to(device)


def _non_dominated(q: np.ndarray) -> np.ndarray:
    """Mask of the points of q [K, D] (maximised) that no other point dominates."""
    k, d = q.shape
    dominated = np.zeros(k, dtype=bool)
    block = max(1, _CHUNK // max(1, k))
    for j0 in range(0, k, block):
        cand = q[j0 : j0 + block]  # is any point of q dominating these?
        ge = np.ones((k, cand.shape[0]), dtype=bool)  # q_i >= cand_j everywhere
        gt = np.zeros((k, cand.shape[0]), dtype=bool)  # q_i > cand_j somewhere
        # one objective at a time: 2-D comparisons, no [K, c, D] temporary
        for c in range(d):
            ge &= q[:, None, c] >= cand[None, :, c]
            gt |= q[:, None, c] > cand[None, :, c]
        dominated[j0 : j0 + block] = (ge & gt).any(axis=0)
    return ~dominated


# --------------------------------------------------------------------------- hypervolume
def _hv2(p: np.ndarray) -> float:
    """Area dominated by p [K, 2] (coordinates relative to the reference, all > 0)."""
    order = np.lexsort((-p[:, 1], -p[:, 0]))  # x descending, ties y descending
    x, y = p[order, 0], p[order, 1]
    prev = np.concatenate(([0.0], np.maximum.accumulate(y)[:-1]))
    # walking left, each point adds its strip above the highest y seen so far
    return float(np.sum(x * np.clip(y - prev, 0.0, None)))


def _hv3(p: np.ndarray) -> float:
    """Volume dominated by p [K, 3] (relative to the reference, all > 0).

    Slices along z: with the points sorted by z descending, slice k spans
    [z_{k+1}, z_k] (z_K = 0) and its cross-section is the 2-D area of the first k + 1
    points. All K areas come from one sweep over a [K, K] matrix (row k = the points in
    slice k, in x-descending order), in blocks of rows.
    """
    k = p.shape[0]
    by_z = np.argsort(-p[:, 2], kind="stable")
    z = p[by_z, 2]
    dz = z - np.concatenate((z[1:], [0.0]))
    # x order of the points (descending; ties y descending) and each point's rank in z order
    by_x = np.lexsort((-p[:, 1], -p[:, 0]))
    z_rank = np.empty(k, dtype=np.int64)
    z_rank[by_z] = np.arange(k)
    xs, ys, rank_x = p[by_x, 0], p[by_x, 1], z_rank[by_x]
    volume = 0.0
    rows = max(1, _CHUNK // max(1, k))
    for s0 in range(0, k, rows):
        s = np.arange(s0, min(k, s0 + rows))
        keep = rank_x[None, :] <= s[:, None]  # [rows, K]: point in slice s?
        y = np.where(keep, ys[None, :], 0.0)
        prev = np.concatenate((np.zeros((len(s), 1)), np.maximum.accumulate(y, axis=1)[:, :-1]), axis=1)
        areas = (np.clip(y - prev, 0.0, None) * xs[None, :]).sum(axis=1)
        volume += float(np.dot(areas, dz[s]))
    return volume


def _hv4(p: np.ndarray) -> float:
    """Volume dominated by p [K, 4]: slices along the 4th objective, a 3-D volume each."""
    by_w = np.argsort(-p[:, 3], kind="stable")
    q = p[by_w]
    w = q[:, 3]
    dw = w - np.concatenate((w[1:], [0.0]))
    volume = 0.0
    for s in range(q.shape[0]):
        if dw[s] > 0:  # tied w: the slice is empty, the next one counts these points
            volume += _hv3(q[: s + 1, :3]) * float(dw[s])
    return volume


def hypervolume(
    points: ArrayLike, ref: ArrayLike, maximize: Union[bool, Sequence[bool]] = True
) -> float:
    """Exact hypervolume of ``points`` [K, D] with respect to ``ref`` [D], D in 1..4.

    The measure of the region dominated by at least one point and dominating ``ref``
    (maximisation by default; ``maximize`` as in ``non_dominated``). Points that do not
    strictly beat ``ref`` on every objective are ignored. Computed in float64, returned
    as a Python float (0.0 when no point counts). NaN or inf in ``points`` or ``ref``
    raise ``ValueError``; D > 4 raises ``ValueError``.
    """
    fn = "hypervolume"
    p = _as_float64(points)
    r = _as_float64(ref)
    if p.ndim != 2:
        raise ValueError(f"{fn}: `points` must be [K, D], got shape {list(p.shape)}")
    d = p.shape[1]
    if r.shape != (d,):
        raise ValueError(
            f"{fn}: `ref` must be [D] = [{d}] (the objectives of `points` {list(p.shape)}), got {list(r.shape)}"
        )
    if not 1 <= d <= MAX_HV_DIM:
        raise ValueError(f"{fn}: exact hypervolume is implemented for D = 1..{MAX_HV_DIM} objectives, got D = {d}")
    if not np.isfinite(p).all():
        raise ValueError(f"{fn}: `points` {list(p.shape)} contains NaN or inf")
    if not np.isfinite(r).all():
        raise ValueError(f"{fn}: `ref` contains NaN or inf: {r.tolist()}")
    signs = _signs(fn, maximize, d)
    rel = (p - r) * signs  # the gain over ref, every objective maximised
    rel = rel[(rel > 0).all(axis=1)]
    if rel.shape[0] == 0:
        return 0.0
    if d == 1:
        return float(rel.max())
    if d == 2:
        return _hv2(rel)
    rel = np.unique(rel, axis=0)  # copies add nothing
    rel = rel[_non_dominated(rel)]
    return _hv3(rel) if d == 3 else _hv4(rel)


def _as_float64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)
