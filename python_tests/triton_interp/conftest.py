"""Configuration of the Triton kernel tests (``interp_triton_vs_reference.py``).

These tests run the Triton backend's kernels against the float64 reference. They are not
part of the plain ``pytest`` run (the module is named ``interp_*.py``, which the default
``python_files`` pattern does not match): ``python_tests/test_triton_interpreter.py`` runs
them in a subprocess with ``TRITON_INTERPRET=1`` (Triton's interpreter, CPU tensors)::

    TRITON_INTERPRET=1 python -m pytest python_tests/triton_interp -q -p no:cacheprovider -o "python_files=interp_*.py"

and on a GPU machine the same tests run compiled, on CUDA tensors::

    PAMA_TRITON_TEST_DEVICE=cuda python -m pytest python_tests/triton_interp -q -p no:cacheprovider -o "python_files=interp_*.py"

The helpers of ``python_tests/conftest.py`` (inputs, tolerances) are loaded from that file
under another module name and re-exported here: pytest imports every ``conftest.py`` as
module ``conftest``, so from a test module here ``from conftest import ...`` means this file.
The comparison against the float64 oracle is ``python_tests/oracle.py``, shared with
``python_tests/test_loss_reference.py``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

DEVICE = os.environ.get("PAMA_TRITON_TEST_DEVICE", "cpu")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def require_interpreter_or_gpu() -> None:
    """Called at the top of each interp_*.py module: on CPU tensors the kernels run only
    through Triton's interpreter; refuse before the module imports Triton without it (a
    compiled launch on a CPU tensor would fail obscurely). Not at conftest import, which a
    plain `pytest` run does while collecting python_tests/."""
    if DEVICE == "cpu" and not INTERPRET:
        raise RuntimeError(
            "these tests run the Triton kernels on CPU tensors through Triton's interpreter: set "
            "TRITON_INTERPRET=1 (python_tests/test_triton_interpreter.py does), or "
            "PAMA_TRITON_TEST_DEVICE=cuda on a GPU machine"
        )


_spec = importlib.util.spec_from_file_location("pama_tests_common", Path(__file__).resolve().parent.parent / "conftest.py")
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)

Inputs = _common.Inputs
TOLS = _common.TOLS
CLIP_EPS = _common.CLIP_EPS
assert_close_rel = _common.assert_close_rel
make_inputs = _common.make_inputs
with_exact_zeros = _common.with_exact_zeros
upcast = _common.upcast
leaf = _common.leaf

# the interp modules import python_tests/oracle.py (``from oracle import ...``): pytest put
# python_tests/ on sys.path when it loaded the conftest there; appended here if it did not
_TESTS_DIR = str(Path(__file__).resolve().parent.parent)
if _TESTS_DIR not in sys.path:
    sys.path.append(_TESTS_DIR)


def pytest_configure(config):
    # the interpreter's own numpy use (scalar conversions, overflow in exp by design)
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:triton.runtime.interpreter")
    config.addinivalue_line("filterwarnings", "ignore::RuntimeWarning:triton.runtime.interpreter")


def pytest_report_header(config):
    return f"pama_ext Triton kernel tests: device={DEVICE}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"


@pytest.fixture(scope="session")
def device() -> str:
    return DEVICE
