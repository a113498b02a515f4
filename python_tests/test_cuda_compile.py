"""CPU CI for the CUDA sources: every csrc/*.cu compiles with `nvcc -c` for sm_80 and sm_90,
and csrc/pama_cuda_kernels.h is includable by a host compiler. Skipped when nvcc is absent
(no GPU is needed: this only compiles).

PAMA_NVCC_ARCHS (default "80,90") selects the architectures.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


NVCC = _nvcc()
CU_FILES = sorted(glob.glob(os.path.join(CSRC, "*.cu")))
# the defines torch.utils.cpp_extension passes to nvcc (no implicit half / bfloat16
# conversions or operators): the kernels must compile under them, as in a CUDAExtension build
TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]
ARCHS = [a.strip() for a in os.environ.get("PAMA_NVCC_ARCHS", "80,90").split(",") if a.strip()]

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")


def _cuda_include():
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             os.path.dirname(os.path.dirname(os.path.realpath(NVCC))), "/usr/local/cuda"]
    for home in homes:
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
            return os.path.join(home, "include")
    pytest.skip("CUDA include directory (cuda_runtime_api.h) not found")


def test_there_are_cuda_sources():
    assert any(f.endswith("pama_cuda_kernels.cu") for f in CU_FILES)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", CU_FILES, ids=os.path.basename)
def test_nvcc_compiles(src, arch, tmp_path):
    out = tmp_path / (os.path.basename(src) + f".sm{arch}.o")
    cmd = [NVCC, "-c", "-std=c++17", "-O3", f"-arch=sm_{arch}", "-I", CSRC, "-Werror", "all-warnings",
           *TORCH_NVCC_DEFINES, src, "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert out.exists() and out.stat().st_size > 0


def test_kernel_header_is_host_includable(tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    src = tmp_path / "host_include.cpp"
    src.write_text(
        '#include "pama_cuda_kernels.h"\n'
        "int main() {\n"
        "  pama_cuda::Inputs in{};\n"
        "  (void)in;\n"
        "  return pama_cuda::kMaxN == 64 ? 0 : 1;\n"
        "}\n"
    )
    cmd = [cxx, "-std=c++17", "-Wall", "-Werror", "-fsyntax-only", "-I", CSRC, "-I", _cuda_include(), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
