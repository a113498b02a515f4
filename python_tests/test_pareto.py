"""Pareto tools (pama_ext.rl.pareto): non-dominated filter and exact hypervolume.

Independent checks written here:
* ``brute_non_dominated``: the definition, pair by pair, in Python.
* ``inclusion_exclusion``: HV = sum over non-empty subsets S of (-1)^(|S|+1) times the
  volume of the box [ref, min over S] (the intersection of the boxes of S); K <= 10.
* ``grid_volume``: for integer coordinates, the number of unit cells of the grid that
  some point dominates (exact in any dimension, ties and duplicates included).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pama_ext.rl import hypervolume, non_dominated


# --------------------------------------------------------------------------- oracles
def brute_non_dominated(points, maximize=True):
    p = [list(map(float, row)) for row in points]
    if not maximize:
        p = [[-x for x in row] for row in p]

    def dominates(a, b):
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [not any(dominates(q, row) for q in p) for row in p]


def inclusion_exclusion(points, ref):
    p = np.asarray(points, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    total = 0.0
    for size in range(1, len(p) + 1):
        for subset in itertools.combinations(range(len(p)), size):
            corner = p[list(subset)].min(axis=0)  # the intersection of the boxes [ref, p]
            total += (-1) ** (size + 1) * float(np.prod(np.clip(corner - r, 0.0, None)))
    return total


def grid_volume(points, ref):
    """Unit cells [c, c+1] (integer corners, c >= ref) dominated by some point."""
    p = np.asarray(points, dtype=np.int64)
    r = np.asarray(ref, dtype=np.int64)
    if len(p) == 0:
        return 0
    hi = p.max(axis=0)
    axes = [np.arange(r[d], max(r[d], hi[d])) for d in range(len(r))]
    cells = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(r))  # lower corners
    covered = (cells[:, None, :] + 1 <= p[None, :, :]).all(-1).any(-1)
    return int(covered.sum())


def int_points(d, max_k=10, hi=6):
    return st.lists(st.lists(st.integers(0, hi), min_size=d, max_size=d), min_size=0, max_size=max_k)


# --------------------------------------------------------------------------- non_dominated
def test_non_dominated_hand():
    pts = [[1, 2], [2, 1], [1, 1], [2, 2], [2, 2], [0, 3]]
    assert non_dominated(pts).tolist() == [False, False, False, True, True, True]  # both copies kept
    assert non_dominated(pts, maximize=False).tolist() == [False, False, True, False, False, True]
    # mixed senses: maximise the first objective, minimise the second
    assert non_dominated(pts, maximize=[True, False]).tolist() == [False, True, False, False, False, False]


@given(st.integers(1, 4).flatmap(lambda d: int_points(d, max_k=12)), st.booleans())
def test_non_dominated_matches_brute_force(points, maximize):
    if not points:
        return
    mask = non_dominated(torch.tensor(points, dtype=torch.float32), maximize=maximize)
    assert mask.dtype == torch.bool
    assert mask.tolist() == brute_non_dominated(points, maximize)


@given(st.integers(2, 4).flatmap(lambda d: int_points(d, max_k=15)))
def test_non_dominated_properties(points):
    if not points:
        return
    p = torch.tensor(points, dtype=torch.float64)
    keep = non_dominated(p)
    assert keep.any()  # a maximum of the first objective (with the best rest) always survives
    kept = p[keep]
    assert non_dominated(kept).all()  # the front is mutually non-dominated
    for q in p[~keep]:  # and every dropped point is dominated by a kept one
        assert (((kept >= q).all(1)) & ((kept > q).any(1))).any()
    perm = torch.randperm(len(p), generator=torch.Generator().manual_seed(0))
    assert torch.equal(non_dominated(p[perm]), keep[perm])


def test_non_dominated_inputs():
    assert non_dominated(torch.zeros(0, 3)).shape == (0,)
    assert non_dominated(np.array([[1.0, float("inf")], [2.0, 0.0]])).tolist() == [True, True]
    big = torch.rand(3000, 3, generator=torch.Generator().manual_seed(1))
    assert non_dominated(big).tolist() == non_dominated(big.numpy()).tolist()
    with pytest.raises(ValueError, match=r"`points` must be \[K, D\]"):
        non_dominated([1.0, 2.0])
    with pytest.raises(ValueError, match="contains NaN"):
        non_dominated([[1.0, float("nan")]])
    with pytest.raises(ValueError, match="`maximize` must be a bool or a sequence of 2 bools"):
        non_dominated([[1.0, 2.0]], maximize=[True])


# --------------------------------------------------------------------------- hypervolume
def test_hypervolume_hand():
    assert hypervolume([[2.0, 3.0]], [0.0, 0.0]) == 6.0
    # two boxes 2x1 and 1x2 overlapping in a 1x1 square
    assert hypervolume([[2.0, 1.0], [1.0, 2.0]], [0.0, 0.0]) == 3.0
    # a staircase: 3 + 2 + 1 cells above the diagonal
    assert hypervolume([[1, 3], [2, 2], [3, 1]], [0, 0]) == 6.0
    assert hypervolume([[1.0, 1.0, 1.0]], [0.0, 0.0, 0.0]) == 1.0
    # three unit-thick slabs of a 2x2x2 cube's corner: 8 - 1 (the missing far corner cube)
    assert hypervolume([[2, 2, 1], [2, 1, 2], [1, 2, 2]], [0, 0, 0]) == 7.0
    assert hypervolume([[2, 2, 2, 2]], [1, 1, 1, 1]) == 1.0
    assert hypervolume([[3, 1, 1, 1], [1, 3, 1, 1]], [0, 0, 0, 0]) == 5.0
    assert hypervolume([[4.0], [2.5]], [1.0]) == 3.0
    # points not beating ref on every coordinate count for nothing
    assert hypervolume([[2.0, 0.0], [-1.0, 5.0]], [0.0, 0.0]) == 0.0
    assert hypervolume(np.zeros((0, 3)), [0, 0, 0]) == 0.0
    # minimisation: the same boxes mirrored
    assert hypervolume([[-2.0, -1.0], [-1.0, -2.0]], [0.0, 0.0], maximize=False) == 3.0


def test_hypervolume_sphere_front():
    """Points on the unit sphere in the positive orthant: below the orthant's volume, close to it."""
    rng = np.random.default_rng(2)
    for d, exact in [(2, math.pi / 4), (3, math.pi / 6), (4, math.pi**2 / 32)]:
        p = np.abs(rng.standard_normal((150, d)))
        p /= np.linalg.norm(p, axis=1, keepdims=True)
        hv = hypervolume(p, np.zeros(d))
        assert 0.5 * exact < hv < exact


@pytest.mark.parametrize("d", [2, 3, 4])
def test_hypervolume_random_vs_inclusion_exclusion(d):
    rng = np.random.default_rng(d)
    for _ in range(10):
        k = int(rng.integers(1, 11))
        p = rng.standard_normal((k, d))
        ref = rng.standard_normal(d) - 1.0
        assert hypervolume(p, ref) == pytest.approx(inclusion_exclusion(p, ref), rel=1e-10, abs=1e-12)


@given(st.integers(2, 4).flatmap(lambda d: st.tuples(int_points(d, max_k=9), st.just(d))))
def test_hypervolume_integer_vs_grid_and_inclusion_exclusion(case):
    points, d = case
    ref = [1] * d
    hv = hypervolume(np.asarray(points, dtype=np.float64).reshape(-1, d), ref)
    assert hv == grid_volume(points, ref)  # integers: exact
    assert hv == pytest.approx(inclusion_exclusion(points, ref), abs=1e-9)


@given(
    st.integers(2, 4).flatmap(
        lambda d: st.lists(
            st.lists(st.floats(-5, 5, allow_nan=False, allow_subnormal=False), min_size=d, max_size=d),
            min_size=1,
            max_size=8,
        )
    ),
    st.randoms(use_true_random=False),
)
def test_hypervolume_properties(points, rnd):
    p = np.asarray(points, dtype=np.float64)
    d = p.shape[1]
    ref = np.full(d, -6.0)
    hv = hypervolume(p, ref)
    assert hv == pytest.approx(inclusion_exclusion(p, ref), rel=1e-9, abs=1e-9)
    # permutation invariance
    perm = list(range(len(p)))
    rnd.shuffle(perm)
    assert hypervolume(p[perm], ref) == pytest.approx(hv, rel=1e-12, abs=1e-12)
    # a dominated point (or a copy) changes nothing; a better point never decreases it
    worse = p[0] - np.array([rnd.uniform(0, 1) for _ in range(d)])
    assert hypervolume(np.vstack([p, worse, p[:1]]), ref) == pytest.approx(hv, rel=1e-12, abs=1e-12)
    better = p[0] + 0.5
    assert hypervolume(np.vstack([p, better]), ref) >= hv
    # only the front matters
    front = p[non_dominated(p).numpy()]
    assert hypervolume(front, ref) == pytest.approx(hv, rel=1e-12, abs=1e-12)
    # scaling one objective (about ref) scales the volume
    scale = np.ones(d)
    scale[d - 1] = 2.5
    assert hypervolume(ref + (p - ref) * scale, ref) == pytest.approx(2.5 * hv, rel=1e-10, abs=1e-10)
    # the objectives are symmetric: permuting the columns (and ref) keeps the volume
    cols = list(range(d))
    rnd.shuffle(cols)
    assert hypervolume(p[:, cols], ref[cols]) == pytest.approx(hv, rel=1e-10, abs=1e-10)


def test_hypervolume_inputs():
    t = torch.tensor([[1.0, 2.0], [2.0, 1.0]])
    assert hypervolume(t, torch.zeros(2)) == 3.0
    with pytest.raises(ValueError, match="D = 1..4 objectives, got D = 5"):
        hypervolume(np.ones((2, 5)), np.zeros(5))
    with pytest.raises(ValueError, match=r"`ref` must be \[D\] = \[2\]"):
        hypervolume(t, [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="contains NaN or inf"):
        hypervolume([[1.0, float("inf")]], [0.0, 0.0])
    with pytest.raises(ValueError, match=r"`points` must be \[K, D\]"):
        hypervolume([1.0, 2.0], [0.0, 0.0])
