"""The main job's preference sweeps and reward consistency sampling, as units
(``pama_ext/examples/rlhf_demo/steering.py``): the preference grids, Spearman's rank
correlation, the consistency mask, and the analysis of traced fronts."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from pama_ext.examples.rlhf_demo import steering  # noqa: E402


def test_auto_preferences():
    two = steering.auto_preferences(2)
    assert two == [(0.1, 0.9), (0.3, 0.7), (0.5, 0.5), (0.7, 0.3), (0.9, 0.1)]
    three = steering.auto_preferences(3)
    assert len(three) == 7 and len(set(three)) == 7
    for p in three + steering.auto_preferences(4):
        assert min(p) > 0 and math.isclose(sum(p), 1.0)


def test_parse_preferences():
    assert steering.parse_preferences("2,2;1,3", 2) == [(0.5, 0.5), (0.25, 0.75)]
    for bad, match in (("1,2,3", "3 entries for 2"), ("1,0", "> 0"), ("x,y", "not a comma-separated"), (";", "no preference")):
        with pytest.raises(ValueError, match=match):
            steering.parse_preferences(bad, 2)


@pytest.mark.parametrize(
    "x, y, want",
    [([1, 2, 3, 4], [10, 20, 30, 40], 1.0), ([1, 2, 3, 4], [4, 3, 2, 1], -1.0), ([1, 2, 3], [5, 5, 5], None),
     ([1, 2, 3, 4], [1, 3, 2, 4], 0.8), ([1, 2, 2, 3], [1, 2, 3, 4], 0.9486832980505138)],
)
def test_spearman(x, y, want):
    got = steering.spearman(x, y)
    assert got == want if want is None else got == pytest.approx(want)


def test_consistency_keeps_responses_that_agree_across_objectives():
    scores = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # batch baseline (0.5, 0.5): rows 0 (all above) and 1 (all below) agree
    assert steering.consistency_keep(scores, None).tolist() == [True, True, False, False]
    # groups of 2: group 0 = rows 0, 1 (mean 0.5, 0.5); group 1 = rows 2, 3 (mean 0.5, 0.5)
    assert steering.consistency_keep(scores, 2).tolist() == [True, True, False, False]
    # a tie with the baseline is not agreement
    assert steering.consistency_keep(torch.tensor([[1.0, 0.5], [0.0, 0.5]]), None).tolist() == [False, False]


def _run(family, seed, pref, point):
    return {"family": family, "seed": seed, "preference": list(pref), "final": {"rewards": list(point)}}


def test_analyse_fronts():
    prefs = [(0.9, 0.1), (0.5, 0.5), (0.1, 0.9)]
    runs = []
    for seed in (0, 1):
        # pama follows the preference and dominates linear's points; linear is flat
        for p in prefs:
            runs.append(_run("pama", seed, p, (1 + p[0], 1 + p[1])))
            runs.append(_run("linear", seed, p, (1.2, 1.2)))
    out = steering.analyse_fronts(["a", "b"], [0.0, 0.0], runs)
    pama, lin = out["pama"], out["linear"]
    assert pama["median_spearman"] == {"a": pytest.approx(1.0), "b": pytest.approx(1.0)}
    assert lin["median_spearman"] == {"a": None, "b": None}
    # HV of {(1.9, 1.1), (1.5, 1.5), (1.1, 1.9)} from (0, 0): 1.9*1.1 + 1.5*0.4 + 1.1*0.4
    assert pama["median_front_hypervolume"] == pytest.approx(1.9 * 1.1 + 0.4 * 1.5 + 0.4 * 1.1)
    assert lin["median_front_hypervolume"] == pytest.approx(1.44)
    assert pama["front_hv_wins_vs_linear"] == 2 and pama["seeds_compared"] == 2
    assert list(pama["median_points"]) == ["0.9/0.1", "0.5/0.5", "0.1/0.9"]
    assert "fronts" not in steering.fronts_table(["a", "b"], out)  # a table, not a repr
