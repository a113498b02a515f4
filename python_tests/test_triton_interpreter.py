"""The Triton backend in the normal test run: its kernel tests under the interpreter, and
the import without Triton.

* ``test_triton_kernels_under_the_interpreter`` runs ``python_tests/triton_interp`` in a
  subprocess with ``TRITON_INTERPRET=1`` (it must be set before Triton is imported, so not
  in this process): every granularity and aggregation, odd shapes, empty and ragged masks,
  compared with the float64 reference; opcheck and torch.compile of the Triton ops.
* ``test_import_without_triton``: ``import pama_ext`` with Triton hidden works, and the
  backend says why it is unavailable.
* ``test_import_does_not_import_triton``: Triton is imported lazily, at the first call.
* ``test_gpu_benchmark_dry_run``: ``benchmarks/bench_gpu_loss.py --dry-run`` (tiny sizes on
  CPU through the interpreter) runs end to end, so the GPU benchmark stays runnable.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import pama_ext

ROOT = Path(__file__).resolve().parent.parent
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _run(code: str, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PAMA_TRITON_TEST_DEVICE")}
    env.update(extra)
    return env


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (it is in the `test` extras)")
def test_triton_kernels_under_the_interpreter():
    cmd = [
        sys.executable, "-m", "pytest", "python_tests/triton_interp", "-q", "-p", "no:cacheprovider",
        "-o", "python_files=interp_*.py", "-o", "addopts=",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=1200)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"interpreter tests failed (exit {proc.returncode}):\n{tail}"
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail


def test_import_without_triton():
    proc = _run(
        """
        import sys

        class HideTriton:
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ModuleNotFoundError("No module named 'triton' (hidden by the test)")
                return None

        sys.meta_path.insert(0, HideTriton())
        import torch
        import pama_ext
        assert "triton" not in sys.modules
        assert "triton" not in pama_ext.available_backends(), pama_ext.available_backends()
        reason = pama_ext.build_info()["unavailable"]["triton"]
        assert "Triton is not installed" in reason, reason
        lp = torch.zeros(2, 3, requires_grad=True)
        args = (lp, torch.zeros(2, 3), torch.ones(2, 3, 2), torch.ones(2, 3, dtype=torch.bool))
        try:
            pama_ext.pama_loss(*args, backend="triton")
        except RuntimeError as exc:
            assert "unavailable" in str(exc) and "Triton is not installed" in str(exc), exc
        else:
            raise AssertionError("backend='triton' without Triton must raise")
        loss = pama_ext.pama_loss(*args)  # auto still works
        loss.backward()
        print("OK")
        """,
        env=_env(TRITON_INTERPRET="1"),
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_import_does_not_import_triton():
    proc = _run(
        """
        import sys
        import pama_ext
        assert "triton" not in sys.modules, "import pama_ext imported triton"
        assert "pama_ext.triton_backend.kernels" not in sys.modules
        print("OK")
        """,
        env=_env(),
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_backend_registration_in_this_process():
    import torch

    entry = pama_ext._backends._REGISTRY["triton"]
    assert entry.priority == 5
    assert "triton" in pama_ext._backends.known_backends()
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert entry.devices == ("cuda", "cpu") and entry.available
    else:
        assert entry.devices == ("cuda",)
        assert entry.available == torch.cuda.is_available(), entry.error
        if not entry.available:
            assert "no CUDA device" in entry.error
            with pytest.raises(RuntimeError, match="unavailable"):
                pama_ext.pama_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2, 2),
                                   torch.ones(1, 2, dtype=torch.bool), backend="triton")
    # the ops are defined whenever Triton is installed (schemas as pama_forward/pama_backward)
    fwd = torch.ops.pama_ext.triton_forward.default._schema
    ref = torch.ops.pama_ext.pama_forward.default._schema
    assert [a.type for a in fwd.arguments] == [a.type for a in ref.arguments]
    assert [r.type for r in fwd.returns] == [r.type for r in ref.returns]
    bwd = torch.ops.pama_ext.triton_backward.default._schema
    ref_b = torch.ops.pama_ext.pama_backward.default._schema
    assert [a.type for a in bwd.arguments] == [a.type for a in ref_b.arguments]


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_gpu_benchmark_dry_run(tmp_path):
    import json

    out = tmp_path / "dry.json"
    cmd = [sys.executable, "benchmarks/bench_gpu_loss.py", "--dry-run", "--ns", "3", "--dtypes", "fp32",
           "--impls", "triton,torch,eager,compiled", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads(out.read_text())
    (row,) = report["results"]
    assert set(row["impls"]) == {"triton", "torch", "eager", "compiled"}, row
    for name, entry in row["impls"].items():
        assert "error" not in entry, (name, entry)
        for key, err in entry.items():
            if key.endswith("_vs_triton"):
                assert err < 1e-5, (name, key, err)
    # and without a GPU the real run stops with a clear message
    if not __import__("torch").cuda.is_available():
        proc = subprocess.run([sys.executable, "benchmarks/bench_gpu_loss.py"], cwd=ROOT, env=_env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0 and "no CUDA device" in proc.stderr, proc.stderr[-2000:]
