"""Which implementations this install has, and how ``backend="auto"`` chooses among them.

A backend is a name, the device types it runs on, and a ``forward`` callable with the
signature of the ``pama_ext::pama_forward`` op (differentiable through its registered
autograd). Backend modules call ``register`` at import; ``torch`` (the pure-PyTorch
reference in ``reference.py``) is always there and is handled by ``functional.py``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

try:  # the compiled extension is optional: without it pama_ext runs on the PyTorch backend
    _C = importlib.import_module("pama_ext._C")
    _C_ERROR = None
except ImportError as exc:  # exercised by an install with PAMA_EXT_NO_EXT=1
    _C = None
    _C_ERROR = f"{type(exc).__name__}: {exc}"


@dataclass
class Backend:
    name: str
    devices: Tuple[str, ...]  # torch device types it runs on
    priority: int  # higher wins for backend="auto"
    forward: Optional[Callable]  # None when unavailable
    error: Optional[str] = None  # why it is unavailable

    @property
    def available(self) -> bool:
        return self.forward is not None


_REGISTRY: Dict[str, Backend] = {}


def register(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def has_cpp() -> bool:
    """Whether the fused C++ CPU backend is usable."""
    return "cpp" in _REGISTRY and _REGISTRY["cpp"].available


def known_backends() -> Tuple[str, ...]:
    return ("auto", "torch", *_REGISTRY)


def available_backends() -> List[str]:
    """Backends usable in this process, highest priority first (``torch`` always works, last)."""
    ready = sorted((b for b in _REGISTRY.values() if b.available), key=lambda b: -b.priority)
    return [b.name for b in ready] + ["torch"]


def build_info() -> Dict[str, object]:
    """What was compiled into this install, and why a backend is missing if one is."""
    info: Dict[str, object] = {
        "backends": available_backends(),
        "torch_version": torch.__version__,
        "extension": None,
        "extension_error": _C_ERROR,
        "unavailable": {b.name: b.error for b in _REGISTRY.values() if not b.available},
    }
    if _C is not None:
        info["extension"] = dict(_C.build_info())
    return info


def resolve(fn: str, backend: str, device: torch.device) -> str:
    """Map ``backend`` (maybe ``auto``) to a concrete backend for tensors on ``device``."""
    if backend not in known_backends():
        raise ValueError(
            f"{fn}: unknown backend {backend!r}; expected one of {', '.join(map(repr, known_backends()))}"
        )
    if backend == "auto":
        for name in available_backends()[:-1]:
            if device.type in _REGISTRY[name].devices:
                return name
        return "torch"
    if backend == "torch":
        return backend
    entry = _REGISTRY[backend]
    if not entry.available:
        raise RuntimeError(f"{fn}: backend {backend!r} is unavailable in this install: {entry.error}")
    if device.type not in entry.devices:
        raise ValueError(
            f"{fn}: backend {backend!r} runs on {' or '.join(entry.devices)} tensors, but the inputs are on {device}"
        )
    return backend


def forward_of(backend: str) -> Callable:
    return _REGISTRY[backend].forward


# The C++ extension's CPU kernel sits behind the pama_ext::pama_forward op (see _ops.py).
register(
    Backend(
        name="cpp",
        devices=("cpu",),
        priority=10,
        forward=(lambda *args: torch.ops.pama_ext.pama_forward(*args)) if _C is not None else None,
        error=None
        if _C is not None
        else (
            f"the compiled extension pama_ext._C failed to import ({_C_ERROR}); reinstall with "
            "`pip install --no-build-isolation .` or use backend='torch'"
        ),
    )
)

# The CUDA kernels (csrc/pama_cuda_kernels.cu) behind the same op, when the extension was
# built with them (PAMA_EXT_CUDA, setup.py) and a GPU is present.
_HAS_CUDA_KERNELS = _C is not None and hasattr(_C, "pama_forward_cuda")


def _cuda_error() -> Optional[str]:
    if _C is None:
        return f"the compiled extension pama_ext._C failed to import ({_C_ERROR})"
    if not _HAS_CUDA_KERNELS:
        return (
            "pama_ext._C was built without the CUDA kernels (a CPU torch, PAMA_EXT_CUDA=0, or no CUDA "
            "toolkit at build time); rebuild with a CUDA torch: `PAMA_EXT_CUDA=1 pip install "
            "--no-build-isolation .`"
        )
    try:
        if not torch.cuda.is_available():
            return "no CUDA device is available"
    except Exception as exc:  # pragma: no cover - a broken driver counts as no GPU
        return f"torch.cuda.is_available() failed: {exc}"
    return None


_CUDA_ERROR = _cuda_error()
register(
    Backend(
        name="cuda",
        devices=("cuda",),
        priority=20,
        forward=(lambda *args: torch.ops.pama_ext.pama_forward(*args)) if _CUDA_ERROR is None else None,
        error=_CUDA_ERROR,
    )
)
