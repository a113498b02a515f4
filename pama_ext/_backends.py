"""Which implementations this install has, and how ``backend="auto"`` chooses among them."""

from __future__ import annotations

import importlib
from typing import Dict, List

import torch

try:  # the compiled extension is optional: without it pama_ext runs on the PyTorch backend
    _C = importlib.import_module("pama_ext._C")
    _C_ERROR = None
except ImportError as exc:  # exercised by an install with PAMA_EXT_NO_EXT=1
    _C = None
    _C_ERROR = f"{type(exc).__name__}: {exc}"

BACKENDS = ("auto", "torch", "cpp")


def has_cpp() -> bool:
    return _C is not None


def available_backends() -> List[str]:
    """Backends usable in this process, fastest first for CPU tensors (``torch`` always works)."""
    out = []
    if has_cpp():
        out.append("cpp")
    out.append("torch")
    return out


def build_info() -> Dict[str, object]:
    """What was compiled into this install, and why a backend is missing if one is."""
    info: Dict[str, object] = {
        "backends": available_backends(),
        "torch_version": torch.__version__,
        "extension": None,
        "extension_error": _C_ERROR,
    }
    if _C is not None:
        info["extension"] = dict(_C.build_info())
    return info


def resolve(fn: str, backend: str, device: torch.device) -> str:
    """Map ``backend`` (maybe ``auto``) to a concrete backend for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"{fn}: unknown backend {backend!r}; expected one of {', '.join(map(repr, BACKENDS))}")
    if backend == "auto":
        return "cpp" if device.type == "cpu" and has_cpp() else "torch"
    if backend == "cpp":
        if not has_cpp():
            raise RuntimeError(
                f"{fn}: backend 'cpp' needs the compiled extension pama_ext._C, which failed to import "
                f"({_C_ERROR}); reinstall with `pip install --no-build-isolation .` or use backend='torch'"
            )
        if device.type != "cpu":
            raise ValueError(f"{fn}: backend 'cpp' runs on CPU tensors, but the inputs are on {device}")
    return backend
