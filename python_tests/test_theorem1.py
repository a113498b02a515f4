"""Theorem 1 (shared/PAMA.md): the simplex weights minimising (sum_i c_i a_i)^2 for scalars a."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import pama_ext
from pama_ext import theorem1


def t1(values, dtype=torch.float64):
    return theorem1(torch.tensor(values, dtype=dtype))


def s_star(a: np.ndarray) -> float:
    """Projection of 0 onto [min a, max a] (the optimal value of sum c a)."""
    return float(np.clip(0.0, a.min(), a.max()))


def assert_on_simplex(c: torch.Tensor, atol=1e-12):
    assert bool((c >= 0).all()), c
    assert torch.allclose(c.sum(-1), torch.ones((), dtype=c.dtype), rtol=0, atol=atol), c.sum(-1)


# --------------------------------------------------------------------------- the cases
def test_all_positive_is_one_hot_on_argmin():
    c = t1([3.0, 0.5, 2.0, 7.0])
    assert c.tolist() == [0.0, 1.0, 0.0, 0.0]


def test_all_negative_is_one_hot_on_argmax():
    c = t1([-3.0, -0.5, -2.0, -7.0])
    assert c.tolist() == [0.0, 1.0, 0.0, 0.0]


def test_single_objective():
    for v in (2.5, -1.0, 0.0):
        assert t1([v]).tolist() == [1.0]


def test_mixed_with_zeros_is_uniform_over_zeros():
    c = t1([-1.0, 0.0, 2.0, 0.0, 5.0])
    assert c.tolist() == [0.0, 0.5, 0.0, 0.5, 0.0]
    # a zero with only positives (the Noon case: min is 0) and with only negatives
    assert t1([0.0, 1.0, 3.0]).tolist() == [1.0, 0.0, 0.0]
    assert t1([-2.0, 0.0, -1.0]).tolist() == [0.0, 1.0, 0.0]
    assert t1([0.0, 0.0, 0.0]).tolist() == pytest.approx([1 / 3] * 3, abs=1e-15)


def test_strictly_mixed_is_two_point_with_zero_sum():
    a = torch.tensor([0.7, -2.0, 1.5, 3.0, -0.25], dtype=torch.float64)
    c = theorem1(a)
    assert_on_simplex(c)
    # support = {argmin, argmax} only
    assert c.nonzero().flatten().tolist() == [1, 3]
    lo, hi = -2.0, 3.0
    assert float(c[1]) == pytest.approx(hi / (hi - lo), rel=1e-15)
    assert float(c[3]) == pytest.approx(-lo / (hi - lo), rel=1e-15)
    assert abs(float(c @ a)) <= 1e-15 * 3.0


def test_two_point_extreme_ratio():
    a = torch.tensor([-1e-12, 1e12], dtype=torch.float64)
    c = theorem1(a)
    assert_on_simplex(c)
    assert abs(float(c @ a)) <= 1e-15 * 1e12
    assert float(c[0]) == pytest.approx(1.0, rel=1e-15)


@pytest.mark.parametrize(
    "values, expected",
    [
        ([2.0, 1.0, 1.0, 3.0], [0.0, 0.5, 0.5, 0.0]),  # tied argmin
        ([-3.0, -1.0, -1.0, -1.0], [0.0, 1 / 3, 1 / 3, 1 / 3]),  # tied argmax
        ([4.0, 4.0, 4.0, 4.0], [0.25] * 4),  # everything tied
        ([-1.0, -1.0, 2.0], [1 / 3, 1 / 3, 1 / 3]),  # mixed: lo-share 2/3 split over two
        ([-1.0, 3.0, 3.0, -1.0], [3 / 8, 1 / 8, 1 / 8, 3 / 8]),  # both ends tied
    ],
)
def test_ties_split_equally(values, expected):
    c = t1(values)
    assert c.tolist() == pytest.approx(expected, abs=1e-15)
    a = np.asarray(values)
    assert float(c.numpy() @ a) == pytest.approx(s_star(a), abs=1e-15)


def test_batched_leading_dims_match_rowwise():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(3, 4, 6, generator=gen, dtype=torch.float64)
    a[0, 0] = a[0, 0].abs() + 0.1  # all positive
    a[0, 1] = -a[0, 1].abs() - 0.1  # all negative
    a[1, 2, 2] = 0.0  # mixed with a zero
    a[2, 3] = torch.round(a[2, 3])  # ties likely
    c = theorem1(a)
    assert c.shape == a.shape and c.dtype == torch.float64
    assert_on_simplex(c)
    for idx in np.ndindex(3, 4):
        assert torch.equal(c[idx], theorem1(a[idx])), idx
    assert c[0, 0].tolist() == torch.nn.functional.one_hot(a[0, 0].argmin(), 6).double().tolist()
    assert c[0, 1].tolist() == torch.nn.functional.one_hot(a[0, 1].argmax(), 6).double().tolist()


def test_zero_dim_batch_and_low_precision_inputs():
    assert theorem1(torch.zeros(0, 3)).shape == (0, 3)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        c = theorem1(torch.tensor([2.0, -1.0, 0.5], dtype=dt))
        assert c.dtype == torch.float64
        assert c.tolist() == pytest.approx([1 / 3, 2 / 3, 0.0], abs=1e-15)


def test_infinite_values():
    # +inf never wins the argmin while a finite positive value exists
    assert t1([float("inf"), 2.0, 5.0]).tolist() == [0.0, 1.0, 0.0]
    assert t1([float("-inf"), -2.0]).tolist() == [0.0, 1.0]


def test_public_theorem1_is_the_reference():
    a = torch.randn(5, 4, dtype=torch.float64)
    assert torch.equal(pama_ext.theorem1(a), pama_ext.reference.theorem1(a))


# --------------------------------------------------------------------------- properties
finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False).filter(
    lambda x: x == 0 or abs(x) > 1e-100  # no subnormals: scaling them would create zeros
)
# small integers make exact ties and exact zeros common
tie_prone = st.integers(min_value=-3, max_value=3).map(float)
scalars = hnp.arrays(np.float64, st.integers(1, 9), elements=st.one_of(finite, tie_prone))


@given(scalars)
def test_optimal_on_simplex(a):
    c = theorem1(torch.from_numpy(a)).numpy()
    assert c.shape == a.shape
    assert (c >= 0).all() and abs(c.sum() - 1) <= 1e-12
    value = float(c @ a)
    target = s_star(a)
    scale = max(float(np.abs(a).max()), 1e-300)
    # (sum c a)^2 = s*^2, i.e. sum c a = s* (the optimum is the projection of 0)
    assert abs(value - target) <= 1e-12 * scale, (value, target)
    assert value**2 == pytest.approx(target**2, rel=1e-10, abs=1e-24 * scale**2)
    # no simplex vertex does better (brute-force over the vertices and the two-point set)
    assert value**2 <= float((a**2).min()) * (1 + 1e-12) + (1e-12 * scale) ** 2


@given(scalars, st.randoms(use_true_random=False))
def test_permutation_equivariance(a, random):
    perm = list(range(a.shape[0]))
    random.shuffle(perm)
    c = theorem1(torch.from_numpy(a)).numpy()
    c_perm = theorem1(torch.from_numpy(a[perm])).numpy()
    np.testing.assert_allclose(c_perm, c[perm], rtol=0, atol=1e-15)


@given(scalars)
def test_tied_objectives_get_equal_weight(a):
    c = theorem1(torch.from_numpy(a)).numpy()
    for v in np.unique(a):
        members = c[a == v]
        assert np.ptp(members) <= 1e-15, (v, members)


@given(scalars, st.integers(-20, 20))
def test_scale_invariance(a, j):
    k = 2.0**j  # exact scaling: no new ties, no rounding
    c = theorem1(torch.from_numpy(a)).numpy()
    ck = theorem1(torch.from_numpy(a * k)).numpy()
    # the selected support and the two-point shares do not depend on the scale
    np.testing.assert_allclose(ck, c, rtol=0, atol=1e-15)
