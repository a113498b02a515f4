"""benchmarks/gpu_check.sh, the first-GPU-run command, keeps working: its --dry-run runs the
whole flow on CPU (build check, test collection, the sanitizer workload on the C++ kernel,
the raise paths, the benchmark through Triton's interpreter, the optimizer benchmark on a
tiny GPT-2, the report) and must end with a JSON whose every stage passed.
The report's goal arithmetic is checked on hand-made benchmark rows."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def _report_module():
    spec = importlib.util.spec_from_file_location("gpu_check_report", ROOT / "benchmarks" / "gpu_check_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.skipif(not (HAS_TRITON and HAS_TRANSFORMERS), reason="the test extras (triton, transformers) are missing")
def test_gpu_check_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PAMA_TRITON_TEST_DEVICE")}
    env.update(OUT=str(tmp_path), PYTHON=sys.executable, TMPDIR=str(tmp_path))
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["ok"] and report["dry_run"] and not report["failed"]
    stages = {s["stage"]: s["status"] for s in report["stages"]}
    for name in ("build", "build_info", "tests_cuda", "tests_triton", "sanitize_flow", "bench_goal", "kernel_profile",
                 "raise_paths_cpp", "optimizer", "fused_linear"):
        assert stages.get(name) == "ok", (name, stages)
    assert stages["sanitizer"] == "SKIP"
    assert report["bench"]["bench_goal"]["results"], report["bench"]
    assert "host_overhead" in report["bench"]["bench_goal"]["meta"]
    assert report["optimizer"]["results"]["N=2"]["pama"]["ratio_to_noon_min"] > 0
    assert report["fused_linear"]["ratios"]["token"]["peak_memory"] > 0
    assert (tmp_path / "gpu_check_log.txt").stat().st_size > 0
    assert "== gpu_check summary (DRY RUN" in proc.stdout


def test_gpu_check_rejects_unknown_arguments():
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--fast"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--fast" in proc.stderr


def _row(n, impls):
    return {"size": "16M", "N": n, "dtype": "bf16", "impls": impls}


def test_report_goals_prefer_device_time_and_compare_calls():
    rep = _report_module()
    bench = {
        "bench_goal": {"results": [_row(4, {
            "cuda": {"min_ms": 0.5, "frac_of_copy_bw": 0.25, "graph_frac_of_copy_bw": 0.8, "no_sync": "ok"},
            "triton": {"min_ms": 1.0, "frac_of_copy_bw": 0.1, "graph_error": "RuntimeError: sync", "no_sync": "syncs: x"},
            "eager": {"min_ms": 3.0, "frac_of_copy_bw": 0.04},
            "compiled": {"min_ms": 1.2, "frac_of_copy_bw": 0.1},
        })]},
        "bench_n_sweep": {"results": [
            _row(4, {"cuda": {"graph_frac_of_copy_bw": 0.8, "frac_of_copy_bw": 0.2}}),
            _row(5, {"cuda": {"graph_frac_of_copy_bw": 0.4, "frac_of_copy_bw": 0.1}}),
        ]},
    }
    g = rep.goals(bench)
    cuda, triton = g["cuda"], g["triton"]
    assert cuda["frac_of_copy_bw"] == 0.8 and cuda["frac_of_copy_bw_call"] == 0.25
    assert cuda["x_eager"] == pytest.approx(6.0) and cuda["x_compiled"] == pytest.approx(2.4)
    assert cuda["meets"] == {"frac_of_copy_bw": True, "x_eager": True, "x_compiled": True, "no_sync": True, "n_spread": False}
    assert cuda["n_sweep_worst_vs_n4"] == pytest.approx(2.0)
    assert triton["frac_of_copy_bw"] == 0.1 and "graph_error" in triton
    assert triton["meets"]["no_sync"] is False and triton["meets"]["x_eager"] is False


def test_report_fails_on_failed_skipped_for_time_or_erroring_stages(tmp_path):
    rep = _report_module()
    (tmp_path / "stages.tsv").write_text("build\tok\t0\t60\t\nsanitizer\tSKIP\t-\t0\tcompute-sanitizer refuses this device\n")
    assert rep.main(["--logs", str(tmp_path), "--out", str(tmp_path / "a.json")]) == 0
    with open(tmp_path / "stages.tsv", "a") as f:
        f.write("bench_grid\tSKIP\t-\t0\tbudget spent\n")
    assert rep.main(["--logs", str(tmp_path), "--out", str(tmp_path / "b.json")]) == 1
    assert json.loads((tmp_path / "b.json").read_text())["failed"] == ["bench_grid"]
    (tmp_path / "stages.tsv").write_text("build\tok\t0\t60\t\n")
    (tmp_path / "bench_x.json").write_text(json.dumps({"results": [_row(2, {"cuda": {"error": "OutOfMemoryError: x"}})]}))
    assert rep.main(["--logs", str(tmp_path), "--out", str(tmp_path / "c.json")]) == 1


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="the test extras (transformers) are missing")
def test_gpu_check_only_reruns_the_selected_stages(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PAMA_TRITON_TEST_DEVICE")}
    env.update(OUT=str(tmp_path), PYTHON=sys.executable, TMPDIR=str(tmp_path), GPU_CHECK_ONLY="raise opt")
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    ran = {s["stage"] for s in report["stages"] if s["status"] == "ok"}
    assert ran == {"build", "build_info", "raise_paths_cpp", "optimizer"}, report["stages"]
    skipped = {s["stage"]: s["why"] for s in report["stages"] if s["status"] == "SKIP"}
    assert skipped["tests_cuda"] == skipped["bench_goal"] == "not in GPU_CHECK_ONLY"
    assert report["ok"]  # a stage left out on request is not a failure
