"""The quickstart example runs end to end and really trains (a few seconds)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import pama_ext
from pama_ext.examples import quickstart

STEPS = 4


def _cpu_backends():
    """Available backends that run the example's CPU tensors (not e.g. 'cuda')."""
    out = []
    for name in pama_ext.available_backends():
        try:
            quickstart.cpu_backend(name)
        except (ValueError, RuntimeError):
            continue
        out.append(name)
    return out


@pytest.fixture(scope="module", params=_cpu_backends())
def run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "summary.json"
    threads = torch.get_num_threads()
    returned = quickstart.main(
        ["--steps", str(STEPS), "--seed", "3", "--backend", request.param, "--out", str(out), "--log-every", "1"]
    )
    assert torch.get_num_threads() == threads, "main() must restore the intra-op thread count"
    return request.param, returned, json.loads(out.read_text())


def test_json_matches_returned_summary(run):
    _, returned, written = run
    assert json.loads(json.dumps(returned)) == written


def test_summary_keys(run):
    backend, _, s = run
    assert set(s) >= {"config", "objectives", "initial", "methods", "seconds"}
    assert s["objectives"] == ["positive", "length", "diversity"]
    assert s["config"]["steps"] == STEPS and s["config"]["seed"] == 3
    assert s["config"]["backend"] == backend == s["config"]["backend_used"]
    assert set(s["methods"]) == {"pama", "linear"}
    for res in s["methods"].values():
        assert set(res) >= {"history", "final", "seconds"}
        assert [h["step"] for h in res["history"]] == list(range(1, STEPS + 1))
        for h in res["history"]:
            assert set(h) >= {"step", "reward", "weights", "loss"}


def test_rewards_finite_and_in_range(run):
    _, _, s = run
    lo = {"positive": 0.0, "length": quickstart.LENGTH_LO, "diversity": 0.0}
    hi = {"positive": 1.0, "length": quickstart.LENGTH_HI, "diversity": 1.0}
    rewards = [s["initial"]] + [r["final"] for r in s["methods"].values()]
    rewards += [h["reward"] for r in s["methods"].values() for h in r["history"]]
    for r in rewards:
        assert set(r) == set(s["objectives"])
        for name, v in r.items():
            assert math.isfinite(v) and lo[name] - 1e-9 <= v <= hi[name] + 1e-9, (name, v)
    for res in s["methods"].values():
        assert all(math.isfinite(h["loss"]) for h in res["history"])


def test_weights_on_simplex(run):
    _, _, s = run
    n = len(s["objectives"])
    for method, res in s["methods"].items():
        for h in res["history"]:
            w = h["weights"]
            assert len(w) == n, method
            assert all(math.isfinite(x) and x >= -1e-9 for x in w), (method, w)
            assert abs(sum(w) - 1.0) <= 1e-6, (method, w)
    assert all(h["weights"] == [1 / n] * n for h in s["methods"]["linear"]["history"])


def test_training_changed_the_policy(run):
    """The final policies score differently from the initial one (same evaluation seed)."""
    _, _, s = run
    for method, res in s["methods"].items():
        moved = max(abs(res["final"][o] - s["initial"][o]) for o in s["objectives"])
        assert moved > 1e-3, f"{method}: final rewards equal the initial policy's {s['initial']}"


def test_methods_share_the_first_batch(run):
    """Same seeds: both methods start from the same policy and sample the same first batch."""
    _, _, s = run
    first = [res["history"][0]["reward"] for res in s["methods"].values()]
    assert first[0] == first[1]


def test_bad_backend_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        quickstart.main(["--steps", "1", "--backend", "no-such-backend"])
    assert "no-such-backend" in capsys.readouterr().err


def test_granularities_run():
    for gran in ("token", "sequence", "batch_mean", "sequence_gram"):
        s = quickstart.main(["--steps", "1", "--granularity", gran, "--batch", "8", "--epochs", "1"])
        assert s["config"]["granularity"] == gran
        for res in s["methods"].values():
            assert all(math.isfinite(v) for v in res["final"].values())
