"""``python -m pama_ext.examples.trl_grpo`` runs end to end (2 steps, a short warm-up) and
writes TRL's logs, the curves, the summary and the plot; ``--model`` / ``--prompts`` work."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("matplotlib")

import trl_tiny as tiny  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NAMES = ["positivity", "brevity", "diversity"]


def _rows(path: Path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_example_runs_two_steps(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pama_ext.examples.trl_grpo", "--steps", "2", "--warmup-steps", "3", "--batch", "8",
           "--max-completion-length", "8", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "mean reward (and weight)" in proc.stdout
    for f in ("curves.csv", "summary.json", "objectives.png", "initial_policy/config.json"):
        assert (out / f).exists(), f
    rows = _rows(out / "curves.csv")
    assert [r["method"] for r in rows] == ["pama", "pama", "linear", "linear"]
    for r in rows:
        ws = [float(r[f"{n}/weight"]) for n in NAMES]
        assert sum(ws) == pytest.approx(1.0, abs=1e-5)
    for method in ("pama", "linear"):
        logs = json.loads((out / method / "log_history.json").read_text())
        assert any("objectives/brevity/weight" in h and "rewards/brevity/mean" in h for h in logs)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["last_quarter_means"]) == {"pama", "linear"}


def test_example_with_model_and_prompts(tmp_path):
    from pama_ext.examples.trl_grpo.cli import main

    model_dir = tiny.saved_model(str(tmp_path / "model"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a b\n\nc d\ne f\n")
    out = tmp_path / "out"
    main(["--model", model_dir, "--prompts", str(prompts), "--steps", "1", "--methods", "pama_token",
          "--batch", "8", "--max-completion-length", "4", "--out", str(out)])
    assert not (out / "initial_policy").exists()  # the given checkpoint, no warm-up
    rows = _rows(out / "curves.csv")
    assert [r["method"] for r in rows] == ["pama_token"]
    with pytest.raises(SystemExit, match="unknown method"):
        main(["--methods", "pama,mgda", "--out", str(out)])
