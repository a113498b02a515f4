"""Build of pama_ext and its C++ extension ``pama_ext._C``.

Build with the installed torch (the extension is compiled against its headers and ABI):

    pip install --no-build-isolation -e .      # or: pip wheel --no-build-isolation --no-deps .

An isolated build would download a fresh (CUDA) torch into the build environment and
compile against that instead, so always pass --no-build-isolation.

Environment switches:
    PAMA_EXT_NO_EXT=1        skip the compiled extension; the pure-PyTorch package still installs
    PAMA_EXT_CUDA=auto|0|1   CUDA kernels (not part of this build yet; see below)
    MAX_JOBS=N               parallel compile jobs (torch.utils.cpp_extension / ninja)
"""

import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")


def _flag(name: str, default: str) -> str:
    return os.environ.get(name, default).strip().lower()


def _extensions():
    if _flag("PAMA_EXT_NO_EXT", "0") in ("1", "true", "yes", "on"):
        print("pama_ext: PAMA_EXT_NO_EXT=1, building the pure-PyTorch package only", file=sys.stderr)
        return [], {}

    cuda = _flag("PAMA_EXT_CUDA", "auto")
    if cuda not in ("auto", "0", "1"):
        sys.exit(f"pama_ext: PAMA_EXT_CUDA must be auto, 0 or 1, got {cuda!r}")
    # ------------------------------------------------------------------------------------
    # CUDA EXTENSION GOES HERE (later issue): with PAMA_EXT_CUDA=1 (or auto and a CUDA
    # toolchain + CUDA torch), build a CUDAExtension from csrc/pama_cpu.cpp + csrc/*.cu
    # (pama_math.h is already __host__ __device__). Until then:
    #   PAMA_EXT_CUDA=1    -> a clear error (asked for something this build cannot give)
    #   PAMA_EXT_CUDA=auto -> CPU kernels only
    # ------------------------------------------------------------------------------------
    if cuda == "1":
        try:
            import torch

            have = f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})"
        except ImportError:
            have = "no torch installed"
        sys.exit(
            "pama_ext: PAMA_EXT_CUDA=1 was requested, but CUDA kernels are not part of this "
            f"build yet (build environment: {have}); unset it or use PAMA_EXT_CUDA=0/auto to "
            "build the CPU extension"
        )

    from torch.utils.cpp_extension import BuildExtension, CppExtension

    # -O3 for the hot loops; deliberately no -march/-mtune: wheels must run on any x86-64 /
    # aarch64 machine. OpenMP comes from torch's at::parallel_for (its flags are added by
    # CppExtension through torch's own configuration).
    cxx_flags = ["-O3", "-fno-trapping-math", "-fvisibility=hidden"]
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
    ext = CppExtension(
        name="pama_ext._C",
        # pama_cpu.cpp owns PYBIND11_MODULE; the other files register their ops through
        # csrc/bindings.h (gae_cpu.cpp: per-objective GAE for pama_ext.rl)
        sources=[os.path.join(CSRC, "pama_cpu.cpp"), os.path.join(CSRC, "gae_cpu.cpp")],
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"] if sys.platform.startswith("linux") else [],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["pama_ext", "pama_ext.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
