"""Build decisions of setup.py, as pure functions of the environment and the torch install.

setup.py loads this file by path (it must not import the ``pama_ext`` package, whose
``__init__`` imports the compiled extension being built), so this module imports nothing
from pama_ext and nothing heavier than the standard library. Unit-tested in
python_tests/test_cuda_build.py.

Switches:
    PAMA_EXT_CUDA=auto|0|1   auto (default): CUDA kernels iff torch has CUDA and a CUDA
                             toolkit (CUDA_HOME / nvcc) is found; 0: never; 1: required (a
                             clear error when torch has no CUDA or no toolkit is found)
    TORCH_CUDA_ARCH_LIST     architectures, default "8.0;9.0" (A100 sm_80, H100/H200 sm_90)
    NVCC_THREADS=N           nvcc --threads N (parallel compilation of the arch list)
    MAX_JOBS=N               parallel compile jobs (honoured by torch's BuildExtension)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Mapping, Optional

DEFAULT_ARCH_LIST = "8.0;9.0"


class BuildConfigError(ValueError):
    """A build request that cannot be honoured (setup.py turns it into sys.exit(message))."""


@dataclass
class CudaDecision:
    build: bool  # build the CUDA kernels
    reason: str  # why (printed by setup.py)
    arch_list: str = ""  # TORCH_CUDA_ARCH_LIST used ("" when not building CUDA)
    nvcc_flags: List[str] = field(default_factory=list)
    define_macros: List[tuple] = field(default_factory=list)


def cuda_mode(env: Mapping[str, str]) -> str:
    mode = env.get("PAMA_EXT_CUDA", "auto").strip().lower() or "auto"
    aliases = {"true": "1", "yes": "1", "on": "1", "false": "0", "no": "0", "off": "0"}
    mode = aliases.get(mode, mode)
    if mode not in ("auto", "0", "1"):
        raise BuildConfigError(f"pama_ext: PAMA_EXT_CUDA must be auto, 0 or 1, got {env.get('PAMA_EXT_CUDA')!r}")
    return mode


def arch_names(arch_list: str) -> List[str]:
    """'8.0;9.0+PTX' -> ['sm_80', 'sm_90'] (what build_info reports)."""
    out = []
    for item in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        base = item.split("+")[0]
        out.append("sm_" + base.replace(".", ""))
    return out


def nvcc_threads_flags(env: Mapping[str, str]) -> List[str]:
    value = env.get("NVCC_THREADS", "").strip()
    if not value:
        return []
    if not value.isdigit() or int(value) < 1:
        raise BuildConfigError(f"pama_ext: NVCC_THREADS must be a positive integer, got {value!r}")
    return ["--threads", value]


def decide_cuda(
    env: Mapping[str, str],
    torch_version: str,
    torch_cuda: Optional[str],
    cuda_home: Optional[str],
) -> CudaDecision:
    """Whether to build the CUDA kernels, and with what flags.

    ``torch_cuda`` is ``torch.version.cuda`` (None for a CPU wheel); ``cuda_home`` is
    ``torch.utils.cpp_extension.CUDA_HOME`` (None when no toolkit was found).
    Raises BuildConfigError for PAMA_EXT_CUDA=1 without a CUDA torch or toolkit.
    """
    mode = cuda_mode(env)
    if mode == "0":
        return CudaDecision(False, "PAMA_EXT_CUDA=0: CPU kernels only")
    if not torch_cuda:
        if mode == "1":
            raise BuildConfigError(
                f"pama_ext: PAMA_EXT_CUDA=1 asks for the CUDA kernels, but the installed torch "
                f"{torch_version} has no CUDA (torch.version.cuda is None). Install a CUDA build of "
                "torch first (e.g. `pip install torch --index-url https://download.pytorch.org/whl/cu128`, "
                "matching your driver), then rebuild with `pip install --no-build-isolation .`; or "
                "unset PAMA_EXT_CUDA (auto) / set PAMA_EXT_CUDA=0 for the CPU-only extension"
            )
        return CudaDecision(False, f"torch {torch_version} has no CUDA: CPU kernels only")
    if not cuda_home:
        if mode == "1":
            raise BuildConfigError(
                f"pama_ext: PAMA_EXT_CUDA=1 asks for the CUDA kernels, but no CUDA toolkit was found "
                f"(torch {torch_version} is built for CUDA {torch_cuda}): install the CUDA toolkit "
                "(nvcc) and set CUDA_HOME, or set PAMA_EXT_CUDA=0"
            )
        return CudaDecision(False, f"torch has CUDA {torch_cuda} but no CUDA toolkit (CUDA_HOME) was found: CPU only")
    arch_list = env.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_ARCH_LIST
    archs = arch_names(arch_list)
    # no -std here: torch.utils.cpp_extension adds the standard its headers need
    flags = ["-O3"] + nvcc_threads_flags(env)
    # The list is joined with '.', not ',': torch's BuildExtension passes define_macros to
    # nvcc as -DNAME=VALUE and nvcc splits an option value at commas, so "sm_80,sm_90" would
    # also define a macro `sm_90` and break <nv/target> (included by cuda_bf16.h). No quotes
    # or spaces either (they do not survive every build-command quoting). bindings.cpp
    # stringifies the list for build_info and splits it at '.'.
    macros = [("PAMA_WITH_CUDA", None), ("PAMA_CUDA_ARCHS", ".".join(archs))]
    check_macros(macros)
    return CudaDecision(True, f"CUDA kernels for {' '.join(archs)} (torch CUDA {torch_cuda})", arch_list, flags, macros)


# characters a -DNAME=VALUE cannot carry through nvcc (',' splits the option) or through
# the shell / ninja quoting of the build command
_MACRO_FORBIDDEN = set(",; \t\"'\\$`")


def check_macros(macros) -> None:
    """Raise BuildConfigError for a macro value that nvcc or the build command would mangle."""
    for name, value in macros:
        bad = sorted(set(str(value or "")) & _MACRO_FORBIDDEN)
        if bad:
            raise BuildConfigError(f"pama_ext: macro {name}={value!r} contains {bad}, which nvcc or the build command would split")
