"""The ``triton`` backend: Triton kernels of the fused PAMA op (CUDA tensors).

Registers backend ``"triton"`` in ``pama_ext._backends`` (priority 5: ``backend="auto"``
picks it for CUDA tensors when no faster backend for CUDA is registered). Importing this
package does not import Triton: availability is decided with ``importlib.util.find_spec``
and Triton is imported at the first call of an op, so ``import pama_ext`` stays fast and
works without Triton installed.

* Triton installed and a CUDA device present: available for ``cuda`` tensors.
* ``TRITON_INTERPRET=1`` in the environment before the import: also for ``cpu`` tensors,
  through Triton's interpreter (slow; the CPU CI's way of running the kernels).
* Otherwise registered as unavailable, with the reason (``pama_ext.build_info()``).

See ``ops.py`` for the ops (``pama_ext::triton_forward`` / ``triton_backward``) and the two
documented host synchronisations, ``kernels.py`` for the kernels.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .._backends import Backend, register

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as absent
        return False


def _cuda_available() -> bool:
    try:
        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - a broken driver counts as no GPU
        return False


HAS_TRITON = _triton_installed()
_forward = None
_error = None
if not HAS_TRITON:
    _error = "Triton is not installed (`pip install triton`); the triton backend needs it"
else:
    from . import ops  # defines the torch.library ops; does not import triton

    _forward = ops.forward
    if not (INTERPRET or _cuda_available()):
        _error = (
            "no CUDA device: the Triton kernels run on CUDA tensors (set TRITON_INTERPRET=1 "
            "before importing pama_ext to run them on CPU tensors through Triton's interpreter)"
        )

register(
    Backend(
        name="triton",
        devices=("cuda", "cpu") if (HAS_TRITON and INTERPRET) else ("cuda",),
        priority=5,
        forward=_forward if _error is None else None,
        error=_error,
    )
)
