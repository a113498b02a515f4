"""CPU CI for the CUDA sources: the .cu files compile through torch's own CUDAExtension +
ninja path, with the Extension that setup.py itself builds (its define_macros, its nvcc
flags, its TORCH_CUDA_ARCH_LIST), without warnings, for the default arch list and for a
single arch; and csrc/pama_cuda_kernels.h is includable by a host compiler. Skipped when
nvcc is absent (no GPU is needed: this only compiles).

How: a subprocess runs setup.py with ``stop_after="init"`` (setup.py's own decisions,
PAMA_EXT_CUDA=1, so nothing here can drift from it), keeps the Extension's .cu sources
(they include no torch header, so the CPU torch of the test venv can drive the build) and
runs its BuildExtension command with the link step turned off. The nvcc command line is
the one torch writes into build.ninja (COMMON_NVCC_FLAGS such as
-D__CUDA_NO_HALF_OPERATORS__, -DTORCH_EXTENSION_NAME, -gencode from TORCH_CUDA_ARCH_LIST,
setup.py's -D macros and -O3). With a CPU torch, ``torch.version.cuda`` is set to the
toolkit's version and ``cpp_extension.CUDA_HOME`` to its root, as a CUDA torch built for
that toolkit would have them. Issue 10 (a comma in a -D value, which nvcc splits into a
second macro that breaks <nv/target>) fails here with "expected an identifier".

The C++ glue (csrc/pama_cuda.cpp, torch headers) needs a CUDA torch: .ci/run builds the
whole CUDA wheel against torch 2.11 (CUDA 13.0) for that.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import load_build_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
CU_FILES = sorted(glob.glob(os.path.join(CSRC, "*.cu")))


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


NVCC = _nvcc()

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")


def _toolkit():
    """(root, "major.minor") of the CUDA toolkit. The root is the TOP= line of nvcc's dry run:
    nvcc may be a wrapper script, so its own path does not tell where the toolkit lies."""
    dry = subprocess.run([NVCC, "--dryrun", "-c", "probe.cu"], capture_output=True, text=True, timeout=120)
    top = re.search(r"^#\$ TOP=(.*)$", dry.stdout + dry.stderr, re.M)
    candidates = [top.group(1).strip()] if top else []
    candidates += [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                   os.path.dirname(os.path.dirname(os.path.realpath(NVCC)))]
    root = next((os.path.realpath(c) for c in candidates
                 if c and os.path.exists(os.path.join(c, "include", "cuda_runtime_api.h"))), None)
    if root is None:
        pytest.skip("CUDA toolkit root (include/cuda_runtime_api.h) not found")
    out = subprocess.run([os.path.join(root, "bin", "nvcc"), "--version"], capture_output=True, text=True, timeout=120)
    version = re.search(r"release (\d+\.\d+)", out.stdout)
    if version is None:
        pytest.skip(f"cannot read the nvcc version: {out.stdout!r}")
    return root, version.group(1)


# Runs in a subprocess (setup.py sets os.environ and imports its build config by path):
# argv = root, build_dir, cuda_home, cuda_version. Prints the Extension's CUDA settings as JSON.
_DRIVER = r"""
import json, os, sys
import setuptools  # first: makes `distutils` setuptools' own copy, the one setup() uses
import distutils.core
import torch
from torch.utils import cpp_extension

root, build_dir, cuda_home, cuda_version = sys.argv[1:5]
if torch.version.cuda is None:
    torch.version.cuda = cuda_version  # a CPU torch, made to look like a CUDA build of this toolkit
cpp_extension.CUDA_HOME = cuda_home
os.chdir(root)
dist = distutils.core.run_setup(os.path.join(root, "setup.py"), script_args=["build_ext"], stop_after="init")
(ext,) = dist.ext_modules
all_sources = list(ext.sources)
ext.sources = [s for s in all_sources if s.endswith(".cu")]

class CompileOnly(dist.cmdclass["build_ext"]):
    # the link needs libtorch_cuda, which a CPU torch lacks; the compile is the real one
    def build_extension(self, ext):
        self.compiler.link_shared_object = lambda *args, **kwargs: None
        super().build_extension(ext)

# as setup.py made it (BuildExtension appends torch's own -D flags to these lists)
decided = {
    "sources": all_sources,
    "define_macros": list(ext.define_macros),
    "nvcc": list(ext.extra_compile_args["nvcc"]),
    "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST"),
}
dist.cmdclass["build_ext"] = CompileOnly
cmd = dist.get_command_obj("build_ext")
cmd.build_temp = build_dir
cmd.build_lib = os.path.join(build_dir, "lib")
cmd.force = 1
cmd.ensure_finalized()
cmd.run()
print("PAMA_EXT_JSON=" + json.dumps(decided))
"""




def test_there_are_cuda_sources():
    assert any(f.endswith("pama_cuda_kernels.cu") for f in CU_FILES)


# None: setup.py's default list (8.0;9.0); "9.0": a single architecture (no separator at all)
@pytest.mark.parametrize("arch_list", [None, "9.0"], ids=["default_archs", "sm_90_only"])
def test_cuda_sources_compile_as_setup_py_builds_them(arch_list, tmp_path):
    import torch

    root, version = _toolkit()
    if torch.version.cuda is not None and torch.version.cuda.split(".")[0] != version.split(".")[0]:
        pytest.skip(f"torch is built for CUDA {torch.version.cuda} but nvcc is {version} (setup.py would refuse too)")
    env = {k: v for k, v in os.environ.items()
           if k not in ("TORCH_CUDA_ARCH_LIST", "NVCC_THREADS", "PAMA_EXT_NO_EXT")}
    env.update(PAMA_EXT_CUDA="1", CUDA_HOME=root, MAX_JOBS=env.get("MAX_JOBS", "2"))
    if arch_list is not None:
        env["TORCH_CUDA_ARCH_LIST"] = arch_list
    build = tmp_path / "build"
    proc = subprocess.run([sys.executable, "-c", _DRIVER, ROOT, str(build), root, version],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    log = f"{proc.stdout}\n{proc.stderr}"
    assert proc.returncode == 0, log
    got = json.loads(re.search(r"^PAMA_EXT_JSON=(.*)$", proc.stdout, re.M).group(1))

    # what setup.py compiled is what _build_config decides for this environment
    bc = load_build_config()
    want = bc.decide_cuda(env, torch.__version__, version, root)
    assert want.build
    assert [tuple(m) for m in got["define_macros"]] == want.define_macros
    assert got["nvcc"] == want.nvcc_flags
    assert got["TORCH_CUDA_ARCH_LIST"] == want.arch_list == (arch_list or bc.DEFAULT_ARCH_LIST)
    # every csrc/*.cu is part of the extension, so this test compiles all of them
    assert sorted(os.path.join(ROOT, s) for s in got["sources"] if s.endswith(".cu")) == CU_FILES

    ninja = (build / "build.ninja").read_text()
    archs = bc.arch_names(want.arch_list)
    assert f"-DPAMA_CUDA_ARCHS={'.'.join(archs)}" in ninja, ninja
    for arch in archs:
        num = arch[len("sm_"):]
        assert f"-gencode=arch=compute_{num},code=sm_{num}" in ninja, ninja
    assert "-D__CUDA_NO_HALF_OPERATORS__" in ninja, ninja
    for cu in CU_FILES:
        obj = build / os.path.relpath(cu, ROOT).replace(".cu", ".o")
        assert obj.exists() and obj.stat().st_size > 0, f"{obj} missing\n{log}"
    # and without a warning from nvcc, ptxas or the host compiler (the kernels are kept clean)
    assert not re.search(r"warning #\d+|ptxas warning|: warning:", log), log


def test_kernel_header_is_host_includable(tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    root, _ = _toolkit()
    src = tmp_path / "host_include.cpp"
    src.write_text(
        '#include "pama_cuda_kernels.h"\n'
        "int main() {\n"
        "  pama_cuda::Inputs in{};\n"
        "  (void)in;\n"
        "  return pama_cuda::kMaxN == 64 ? 0 : 1;\n"
        "}\n"
    )
    cmd = [cxx, "-std=c++17", "-Wall", "-Werror", "-fsyntax-only", "-I", CSRC, "-I", os.path.join(root, "include"), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
