"""Every Triton kernel compiles ahead of time for sm_90 (Hopper), without a GPU.

``triton.compile`` with a ``GPUTarget("cuda", 90, 32)`` runs the whole pipeline (TTIR,
TTGIR, LLVM IR, PTX, and a cubin from the ptxas bundled with Triton), so a kernel that
the interpreter runs but the compiler rejects fails here, on a CPU-only CI.

The specialisations are ``pama_ext.triton_backend.ops.specialisations()``: every
(signature, constexprs, num_warps) the host code launches, for 1 <= N <= 64, every
granularity and every input dtype (float32, float64, bfloat16, float16); 16-bit inputs
share the float32 constexprs and are compiled for three block widths (``_selected``). The
compiles run in parallel worker processes; Triton's on-disk cache makes reruns fast.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

KERNELS = [
    "reduce_tokens_kernel",
    "reduce_rows_kernel",
    "reduce_total_kernel",
    "support_candidates_kernel",
    "finalize_kernel",
    "backward_kernel",
]
ARCH = 90


def _encode(const: dict) -> dict:
    """constexprs with Triton dtypes as names (picklable)."""
    import triton.language as tl

    return {k: ("tl." + v.name if isinstance(v, tl.dtype) else v) for k, v in const.items()}


def _compile(name: str, sig: dict, const: dict, num_warps: int):
    """Compile one specialisation (in a worker process); return None or the error text."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pama_ext.triton_backend import kernels

    const = {k: (tl.dtype(v[3:]) if isinstance(v, str) and v.startswith("tl.") else v) for k, v in const.items()}
    try:
        compiled = triton.compile(
            ASTSource(getattr(kernels, name), sig, constexprs=const),
            target=GPUTarget("cuda", ARCH, 32),
            options={"num_warps": num_warps},
        )
    except Exception as exc:  # the compiler's message, shortened
        return f"{name} {const} {sig} num_warps={num_warps}: {type(exc).__name__}: {str(exc)[-1500:]}"
    if not compiled.asm.get("cubin"):
        return f"{name} {const}: no cubin"
    return None


@pytest.fixture(scope="module")
def specs():
    os.environ.pop("TRITON_INTERPRET", None)  # compiled mode (libdevice exp), whatever the caller set
    from pama_ext.triton_backend import ops

    return ops.specialisations()


@pytest.fixture(scope="module")
def pool():
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no inherited state
    with ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)), mp_context=ctx) as ex:
        yield ex


def test_specialisations_cover_every_kernel(specs):
    assert sorted(specs) == sorted(KERNELS)
    from pama_ext.triton_backend import ops

    block_ns = {c["BN"] for _, c, _ in specs["reduce_tokens_kernel"]}
    assert block_ns == {ops.block_n(n) for n in range(1, 65)} == {1, 2, 4, 8, 16, 32, 64}
    dtypes = {s["logp_ptr"] for s, _, _ in specs["backward_kernel"]}
    assert dtypes == {"*fp32", "*fp64", "*bf16", "*fp16"}


HALF_PTRS = ("*bf16", "*fp16")
HALF_BLOCK_NS = (1, 8, 64)


def _selected(name, items):
    """Every specialisation, except that 16-bit inputs (the same constexprs as float32: the
    dtype only changes the loads' conversion) are compiled for BN in HALF_BLOCK_NS only."""
    return [
        (sig, const, warps)
        for sig, const, warps in items
        if sig.get("logp_ptr") not in HALF_PTRS or const["BN"] in HALF_BLOCK_NS
    ]


@pytest.mark.parametrize("name", KERNELS)
def test_kernel_compiles_for_sm90(name, specs, pool):
    items = _selected(name, specs[name])
    assert items, name
    futures = [pool.submit(_compile, name, sig, _encode(const), warps) for sig, const, warps in items]
    errors = [e for e in (f.result() for f in futures) if e]
    assert not errors, f"{len(errors)} of {len(items)} specialisations of {name} fail to compile:\n" + "\n\n".join(errors[:3])
