"""reward_consistency_mask: keep a preference pair only when chosen wins on every objective."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pama_ext.rl import reward_consistency_mask


def brute_mask(chosen, rejected, margins):
    return [all(c - r > m for c, r, m in zip(cr, rr, margins)) for cr, rr in zip(chosen, rejected)]


def test_hand_checked():
    chosen = torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [0.5, 9.0], [3.0, 3.0]])
    rejected = torch.tensor([[0.0, 1.0], [1.0, 1.0], [0.0, 2.5], [0.6, -9.0], [2.95, 2.0]])
    # wins both / ties objective 0 / loses objective 1 / loses objective 0 / wins both by >= 0.05
    assert reward_consistency_mask(chosen, rejected).tolist() == [True, False, False, False, True]
    # margin: must win by more than 0.1 on every objective
    assert reward_consistency_mask(chosen, rejected, margin=0.1).tolist() == [True, False, False, False, False]
    # per-objective margins
    m = torch.tensor([0.01, 0.5])
    assert reward_consistency_mask(chosen, rejected, margin=m).tolist() == [True, False, False, False, True]


def test_ties_nan_and_precision():
    chosen = torch.tensor([[1.0], [float("nan")], [1.0]], dtype=torch.float64)
    rejected = torch.tensor([[1.0], [0.0], [float("nan")]], dtype=torch.float64)
    assert reward_consistency_mask(chosen, rejected).tolist() == [False, False, False]
    # exactly at the margin is a tie, not a win
    assert not reward_consistency_mask(torch.tensor([[1.5]]), torch.tensor([[1.0]]), margin=0.5).item()
    # mixed dtypes and integer scores are fine
    assert reward_consistency_mask(torch.tensor([[2, 3]]), torch.tensor([[1.0, 2.0]], dtype=torch.float64)).item()


@given(
    st.integers(1, 4).flatmap(
        lambda n: st.tuples(
            st.lists(st.lists(st.integers(-3, 3), min_size=n, max_size=n), min_size=0, max_size=12),
            st.lists(st.lists(st.integers(-3, 3), min_size=n, max_size=n), min_size=12, max_size=12),
            st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=n, max_size=n),
        )
    )
)
def test_matches_brute_force(case):
    chosen, rejected, margins = case
    n = len(margins)
    rejected = rejected[: len(chosen)]
    c = torch.tensor(chosen, dtype=torch.float32).reshape(-1, n)
    r = torch.tensor(rejected, dtype=torch.float32).reshape(-1, n)
    got = reward_consistency_mask(c, r, margin=torch.tensor(margins))
    assert got.dtype == torch.bool and got.shape == (len(chosen),)
    assert got.tolist() == brute_mask(chosen, rejected, margins)
    # a scalar margin is the same as that margin on every objective
    same = reward_consistency_mask(c, r, margin=margins[0])
    assert same.tolist() == brute_mask(chosen, rejected, [margins[0]] * n)
    # the kept pairs are exactly those whose difference vector is strictly positive beyond the margin
    if len(chosen):
        swapped = reward_consistency_mask(r, c)
        assert not (got & swapped).any()  # a pair cannot be consistent in both directions


def test_validation():
    c = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"`rewards_chosen` must be \[P, N\].*got \[4\]"):
        reward_consistency_mask(c[:, 0], c[:, 0])
    with pytest.raises(ValueError, match=r"`rewards_rejected` must have the shape of `rewards_chosen` \[4, 3\]"):
        reward_consistency_mask(c, torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"`margin` must be a float or a \[N\] = \[3\] tensor, got \[2\]"):
        reward_consistency_mask(c, c, margin=torch.zeros(2))
    with pytest.raises(ValueError, match="`margin` must be >= 0"):
        reward_consistency_mask(c, c, margin=-0.1)
    with pytest.raises(ValueError, match="`margin` must be >= 0"):
        reward_consistency_mask(c, c, margin=torch.tensor([0.0, float("nan"), 0.0]))
    with pytest.raises(TypeError, match="`rewards_rejected` must be a torch.Tensor"):
        reward_consistency_mask(c, [[0.0, 0.0, 0.0]])
