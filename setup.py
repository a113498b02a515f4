"""Build of pama_ext and its C++ extension ``pama_ext._C``.

Build with the installed torch (the extension is compiled against its headers and ABI):

    pip install --no-build-isolation -e .      # or: pip wheel --no-build-isolation --no-deps .

An isolated build would download a fresh (CUDA) torch into the build environment and
compile against that instead, so always pass --no-build-isolation.

Environment switches:
    PAMA_EXT_NO_EXT=1        skip the compiled extension; the pure-PyTorch package still installs
    PAMA_EXT_CUDA=auto|0|1   CUDA kernels: auto (default) iff torch has CUDA and a CUDA toolkit
                             is found; 0 never; 1 required (clear error otherwise)
    TORCH_CUDA_ARCH_LIST     CUDA architectures, default "8.0;9.0" (A100, H100/H200)
    NVCC_THREADS=N           nvcc --threads N
    MAX_JOBS=N               parallel compile jobs (torch.utils.cpp_extension / ninja)

The decisions live in pama_ext/_build_config.py (unit-tested). A CUDA wheel for a cluster,
built against the torch the cluster runs, with a toolkit of torch.version.cuda's major version
(no GPU needed; README "CUDA wheel for clusters", benchmarks/CUDA.md):

    CUDA_HOME=/usr/local/cuda-13.0 PAMA_EXT_CUDA=1 MAX_JOBS=8 \
        pip wheel --no-build-isolation --no-deps -w dist_cuda .

.ci/run builds that wheel (torch 2.11.0 = CUDA 13.0, default archs) on every run, and
python_tests/test_cuda_compile.py compiles the .cu sources with this file's own Extension.
"""

import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")


def _flag(name: str, default: str) -> str:
    return os.environ.get(name, default).strip().lower()


def _load_build_config():
    """pama_ext/_build_config.py, loaded by path: importing the pama_ext package here would
    import the extension being built."""
    import importlib.util

    path = os.path.join(HERE, "pama_ext", "_build_config.py")
    spec = importlib.util.spec_from_file_location("_pama_ext_build_config", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _extensions():
    if _flag("PAMA_EXT_NO_EXT", "0") in ("1", "true", "yes", "on"):
        print("pama_ext: PAMA_EXT_NO_EXT=1, building the pure-PyTorch package only", file=sys.stderr)
        return [], {}

    import torch
    from torch.utils import cpp_extension

    cfg = _load_build_config()
    try:
        cuda = cfg.decide_cuda(os.environ, torch.__version__, torch.version.cuda, cpp_extension.CUDA_HOME)
    except cfg.BuildConfigError as exc:
        sys.exit(str(exc))
    print(f"pama_ext: {cuda.reason}", file=sys.stderr)

    # -O3 for the hot loops; deliberately no -march/-mtune: wheels must run on any x86-64 /
    # aarch64 machine (the kernels are written to vectorise on the SSE2/NEON baseline).
    # -fno-trapping-math lets the compiler if-convert and vectorise float compares (it only
    # drops the guarantee about FP exception flags, not IEEE results). -g0 overrides the -g
    # of Python's CFLAGS: debug info made the module 15x larger and the build slower.
    # at::parallel_for is OpenMP in the torch wheels, hence -fopenmp.
    cxx_flags = ["-O3", "-g0", "-fno-trapping-math", "-fvisibility=hidden"]
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
    # bindings.cpp owns PYBIND11_MODULE and binds the CPU ops, which the other files define as
    # plain C++ functions (csrc/cpu_ops.h; pama_cpu.cpp: the fused op's CPU kernels;
    # solvers_cpu.cpp: min_norm_weights and theorem1; gae_cpu.cpp: per-objective GAE for
    # pama_ext.rl); pama_cuda.cpp + pama_cuda_kernels.cu: the CUDA kernels, only in a CUDA
    # build, registered through csrc/bindings.h
    # pama_cpu_isa_*.cpp: the CPU passes per instruction set, separate files so that MAX_JOBS
    # compiles them side by side
    cpu_sources = (
        "bindings.cpp",
        "pama_cpu.cpp",
        "pama_cpu_isa_baseline.cpp",
        "pama_cpu_isa_avx2.cpp",
        "pama_cpu_isa_avx512.cpp",
        "solvers_cpu.cpp",
        "gae_cpu.cpp",
    )
    sources = [os.path.join(CSRC, name) for name in cpu_sources]
    common = dict(
        name="pama_ext._C",
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_link_args=["-fopenmp"] if sys.platform.startswith("linux") else [],
    )
    if cuda.build:
        # CUDAExtension reads the architectures from TORCH_CUDA_ARCH_LIST
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda.arch_list
        ext = cpp_extension.CUDAExtension(
            sources=sources + [os.path.join(CSRC, "pama_cuda.cpp"), os.path.join(CSRC, "pama_cuda_kernels.cu")],
            define_macros=cuda.define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": cuda.nvcc_flags},
            **common,
        )
    else:
        ext = cpp_extension.CppExtension(sources=sources, extra_compile_args={"cxx": cxx_flags}, **common)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["pama_ext", "pama_ext.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
