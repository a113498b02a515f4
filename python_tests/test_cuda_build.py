"""The build decisions of setup.py (pama_ext/_build_config.py): PAMA_EXT_CUDA, the arch
list, NVCC_THREADS, and the message of a CUDA build asked for without a CUDA torch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import load_build_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


bc = load_build_config()


def test_cuda_off_by_switch():
    d = bc.decide_cuda({"PAMA_EXT_CUDA": "0"}, "2.5.0", "12.4", "/usr/local/cuda")
    assert not d.build


def test_auto_without_cuda_torch_builds_cpu_only():
    d = bc.decide_cuda({}, "2.5.0+cpu", None, "/usr/local/cuda")
    assert not d.build and "no CUDA" in d.reason


def test_auto_without_toolkit_builds_cpu_only():
    d = bc.decide_cuda({"PAMA_EXT_CUDA": "auto"}, "2.5.0", "12.4", None)
    assert not d.build and "toolkit" in d.reason


def test_required_without_cuda_torch_is_a_clear_error():
    with pytest.raises(bc.BuildConfigError) as exc:
        bc.decide_cuda({"PAMA_EXT_CUDA": "1"}, "2.5.0+cpu", None, "/usr/local/cuda")
    msg = str(exc.value)
    assert "2.5.0+cpu" in msg and "PAMA_EXT_CUDA=1" in msg and "download.pytorch.org" in msg


def test_required_without_toolkit_is_a_clear_error():
    with pytest.raises(bc.BuildConfigError, match="CUDA_HOME"):
        bc.decide_cuda({"PAMA_EXT_CUDA": "1"}, "2.5.0", "12.4", None)


def test_bad_switch_values():
    with pytest.raises(bc.BuildConfigError, match="auto, 0 or 1"):
        bc.decide_cuda({"PAMA_EXT_CUDA": "maybe"}, "2.5.0", "12.4", "/usr/local/cuda")
    with pytest.raises(bc.BuildConfigError, match="NVCC_THREADS"):
        bc.decide_cuda({"PAMA_EXT_CUDA": "1", "NVCC_THREADS": "x"}, "2.5.0", "12.4", "/usr/local/cuda")


def test_cuda_build_default_archs_and_macros():
    d = bc.decide_cuda({"PAMA_EXT_CUDA": "1"}, "2.5.0", "12.4", "/usr/local/cuda")
    assert d.build and d.arch_list == "8.0;9.0"
    assert ("PAMA_WITH_CUDA", None) in d.define_macros
    # nvcc splits -DNAME=VALUE at commas: a comma-separated list broke every multi-arch build
    assert ("PAMA_CUDA_ARCHS", "sm_80.sm_90") in d.define_macros
    assert not any("," in str(v or "") for _, v in d.define_macros)
    assert "--threads" not in d.nvcc_flags


def test_cuda_build_arch_list_and_threads():
    env = {"TORCH_CUDA_ARCH_LIST": "8.0;8.6;9.0+PTX", "NVCC_THREADS": "4"}
    d = bc.decide_cuda(env, "2.5.0", "12.4", "/usr/local/cuda")
    assert d.build and d.arch_list == "8.0;8.6;9.0+PTX"
    assert bc.arch_names(d.arch_list) == ["sm_80", "sm_86", "sm_90"]
    assert d.nvcc_flags[-2:] == ["--threads", "4"]
    assert ("PAMA_CUDA_ARCHS", "sm_80.sm_86.sm_90") in d.define_macros


def test_macros_that_nvcc_would_split_are_refused():
    with pytest.raises(bc.BuildConfigError, match="PAMA_CUDA_ARCHS"):
        bc.check_macros([("PAMA_CUDA_ARCHS", "sm_80,sm_90")])
    bc.check_macros([("PAMA_WITH_CUDA", None), ("PAMA_CUDA_ARCHS", "sm_80.sm_90")])


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-torch failure path")
def test_setup_py_cuda_required_fails_clearly_on_cpu_torch(tmp_path):
    env = dict(os.environ, PAMA_EXT_CUDA="1")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "setup.py"), "--name"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert "PAMA_EXT_CUDA=1" in proc.stderr and torch.__version__ in proc.stderr


def _documented_arch_lists():
    """The TORCH_CUDA_ARCH_LIST values of benchmarks/CUDA.md's table of architectures."""
    import re

    with open(os.path.join(ROOT, "benchmarks", "CUDA.md")) as f:
        rows = [line for line in f if line.startswith("|") and "TORCH_CUDA_ARCH_LIST" not in line]
    lists = [m for row in rows for m in re.findall(r"`(\d+\.\d+[0-9.;+PTX]*)`", row)]
    assert "8.0;9.0" in lists and len(lists) >= 4, lists
    return lists


@pytest.mark.parametrize("arch_list", _documented_arch_lists())
def test_documented_arch_lists_are_what_torch_compiles(arch_list, monkeypatch):
    # the lists the docs recommend pass setup.py's checks, and build_info's names for them
    # (PAMA_CUDA_ARCHS) are exactly the sm_XY targets torch's -gencode flags compile
    import re

    from torch.utils import cpp_extension

    d = bc.decide_cuda({"PAMA_EXT_CUDA": "1", "TORCH_CUDA_ARCH_LIST": arch_list}, "2.11.0", "13.0", "/usr/local/cuda")
    assert d.build and d.arch_list == arch_list
    macro = dict(d.define_macros)["PAMA_CUDA_ARCHS"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    flags = cpp_extension._get_cuda_arch_flags()
    targets = sorted({m for f in flags for m in re.findall(r"code=(sm_\d+)", f)})
    assert sorted(macro.split(".")) == targets == sorted(bc.arch_names(arch_list)), (macro, flags)
    assert any("code=compute_" in f for f in flags) == ("+PTX" in arch_list)
