"""The fused linear loss's Triton chunk kernels (``pama_ext/fused_linear/triton_chunks.py``)
compile ahead of time for sm_90 (Hopper), as the JIT specialises them, once per dtype.

As ``test_triton_aot.py`` does for the loss kernels: launches are recorded from the host
code, specialised by Triton's own binder for a CUDA target (``specialise.jit_specialisation``:
an int equal to 1 becomes a compile-time constant, ints divisible by 16 and 16-byte aligned
pointers get a divisibility attribute, except for the arguments in the kernel's
``do_not_specialize`` lists) and compiled by ``triton.compile`` for
``GPUTarget("cuda", 90, 32)``, down to a cubin, without a GPU. ``specialise.py`` looks the
kernels up by name in the loss kernels' module; here it is pointed at the chunk kernels'
namespace (``triton_chunks._kernels``), whose names are distinct.

* ``test_import_does_not_import_triton``: importing ``triton_chunks`` (and ``supports``)
  leaves Triton unimported, in a fresh worker process.
* ``test_shape_arguments_and_pointers_are_not_specialised``: a launch with C = 1 and V = 1
  keeps V and the strides as runtime i32 and its pointers without an alignment attribute;
  without the kernel's lists the same launch would make V and the stride constants.
* ``test_shape_sweep_is_one_variant_per_kernel_and_dtype``: the host code's launches for
  C = 1..1024 rows, V = 1..128256 columns (sizes divisible by 16 among them), both
  temperatures, chunks starting at unaligned rows and logits that are a slice of a wider
  buffer compile one variant per kernel and dtype (float32, bfloat16); without the lists
  the sweep would compile many.
* ``test_real_launches_are_the_swept_variants``: real calls of ``fused_linear_pama_loss(...,
  backend="triton")`` (forward and backward, token and batch granularity, C = 1, V = 1,
  multiples of 16, V > one block), run by the interpreter in a worker process, launch
  exactly those variants.
* ``test_kernels_compile_for_sm90``: each variant compiles to a cubin.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

KERNELS = ("logp_lse_kernel", "grad_logits_kernel")
DTYPES = ("torch.float32", "torch.bfloat16")
ARCH = 90
SWEEP_C = (1, 2, 3, 16, 17, 64, 100, 257, 1024)
SWEEP_V = (1, 2, 5, 16, 127, 128, 1000, 4096, 4099, 32000, 50257, 128256)
MAX_ELEMENTS = 1 << 22  # of one swept chunk's logits (the recorder zero-fills them)
# the real calls: (B, T, H, V, chunk_size), chunk_size None is the default
REAL_SHAPES = ((1, 1, 8, 1, None), (2, 8, 16, 32, 16), (3, 7, 8, 37, 5), (1, 3, 4, 4099, 1))


def _compiled_mode():
    os.environ.pop("TRITON_INTERPRET", None)  # compiled mode (libdevice exp/log), whatever the caller set


def _interpreter_mode():
    os.environ["TRITON_INTERPRET"] = "1"  # before the worker imports Triton


def _specialise():
    """``specialise`` resolving kernel names in the chunk kernels' namespace (in a worker)."""
    from pama_ext.fused_linear import triton_chunks
    from pama_ext.triton_backend import specialise

    specialise._kernels_module = triton_chunks._kernels
    return specialise


@contextlib.contextmanager
def _recorded(execute: bool):
    """The chunk kernels' launches inside the block, as ``specialise.record_launches`` records
    the loss kernels' (``execute=False``: nothing runs, the outputs read as zeros)."""
    from pama_ext.fused_linear import triton_chunks

    specialise = _specialise()
    kernels = triton_chunks._kernels()
    recorder = specialise._Recorder(kernels, execute)
    triton_chunks._KERNELS = recorder
    try:
        yield recorder.launches
    finally:
        triton_chunks._KERNELS = kernels


def _sweep_launches():
    """(In the TRITON_INTERPRET=1 worker: the host code takes CPU tensors.) The launches of
    ``logp_lse`` and ``grad_logits_`` over the sweep, recorded without running a kernel."""
    import torch

    from pama_ext.fused_linear import triton_chunks

    out = []
    i = 0
    for dtype in (torch.float32, torch.bfloat16):
        for c in SWEEP_C:
            for v in SWEEP_V:
                if c * v > MAX_ELEMENTS:
                    continue
                i += 1
                lo = (0, 1, 3, 16)[i % 4]  # the chunk's first row in the [B*T] vectors
                temperature = (1.0, 0.7)[i % 2]
                if i % 3 == 0:  # the rows of a wider buffer
                    x = torch.empty((c, v + 3), dtype=dtype)[:, :v]
                else:
                    x = torch.empty((c, v), dtype=dtype)
                targets = torch.zeros(lo + c, dtype=torch.long)[lo:]
                g = torch.zeros(lo + c, dtype=torch.float32)[lo:]
                with _recorded(execute=False) as launches:
                    _logp, lse = triton_chunks.logp_lse(x, targets, temperature)
                    lse = torch.zeros(lo + c, dtype=torch.float32)[lo:]
                    triton_chunks.grad_logits_(x, targets, lse, g, temperature)
                out += [(str(dtype), c, v, launch) for launch in launches]
    return out


KERNEL_V_ARG = {"logp_lse_kernel": 4, "grad_logits_kernel": 5}  # position of V in the arguments


def _real_launches():
    """(In the TRITON_INTERPRET=1 worker.) ``fused_linear_pama_loss(..., backend="triton")``,
    forward and backward, run by the interpreter: [(dtype name, C, V, Launch)]."""
    import torch

    import pama_ext

    out = []
    for i, (b, t, h, v, chunk) in enumerate(REAL_SHAPES * 2):
        dtype = (torch.float32, torch.bfloat16)[i // len(REAL_SHAPES)]
        g = torch.Generator().manual_seed(i)
        hidden = torch.randn(b, t, h, generator=g).to(dtype).requires_grad_(True)
        weight = (0.5 * torch.randn(v, h, generator=g)).to(dtype).requires_grad_(True)
        targets = torch.randint(0, v, (b, t), generator=g)
        mask = torch.ones(b, t, dtype=torch.bool)
        old = torch.full((b, t), -0.5 - float(torch.tensor(v).log()))
        adv = torch.randn(b, t, 2, generator=g)
        with _recorded(execute=True) as launches:
            loss = pama_ext.fused_linear_pama_loss(
                hidden, weight, targets, old, adv, mask, granularity=("token", "batch")[i % 2],
                temperature=(1.0, 0.7)[i % 2], chunk_size=chunk, backend="triton",
            )
            loss.backward()
        assert torch.isfinite(loss).item(), (i, loss)
        assert all(torch.isfinite(p.grad.float()).all().item() for p in (hidden, weight)), i
        out += [(str(dtype), launch.grid[0], launch.args[KERNEL_V_ARG[launch.name]], launch) for launch in launches]
    return out


def _import_is_lazy() -> bool:
    """(In a fresh worker.) Importing triton_chunks and asking ``supports`` import no Triton."""
    import sys

    from pama_ext.fused_linear import triton_chunks

    assert triton_chunks.supports("cpu") and triton_chunks.supports("cuda")
    return "triton" not in sys.modules


def _interpreter_work():
    """(In the TRITON_INTERPRET=1 worker.) Real calls, then the sweep grouped by JIT key,
    with and without the kernels' do_not_specialize lists."""
    lazy = _import_is_lazy()
    specialise = _specialise()
    real = _real_launches()
    sweep = collections.defaultdict(dict)
    without = collections.defaultdict(set)
    for dtype, _c, _v, launch in _sweep_launches():
        sweep[launch.name, dtype].setdefault(specialise.jit_key(launch, arch=ARCH), launch)
        without[launch.name, dtype].add(specialise.jit_key(launch, respect_do_not_specialize=False, arch=ARCH))
    real_keys = [(dtype, c, v, launch, specialise.jit_key(launch, arch=ARCH)) for dtype, c, v, launch in real]
    return real_keys, dict(sweep), {k: len(s) for k, s in without.items()}, lazy


def _compile(launch):
    """Compile one launch as the JIT would on sm_90 (in a worker process); None or the error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pama_ext.fused_linear import triton_chunks

    spec = _specialise().jit_specialisation(launch, arch=ARCH)
    try:
        compiled = triton.compile(
            ASTSource(getattr(triton_chunks._kernels(), launch.name), spec.signature, constexprs=spec.constexprs,
                      attrs=spec.attrs),
            target=GPUTarget("cuda", ARCH, 32),
            options=spec.options,
        )
    except Exception as exc:  # the compiler's message, shortened
        return f"{launch.name} {spec.signature}:\n{type(exc).__name__}: {str(exc)[-1500:]}"
    if not compiled.asm.get("cubin"):
        return f"{launch.name} {spec.signature}: no cubin"
    return None


@pytest.fixture(scope="module")
def interpreter():
    """One worker with TRITON_INTERPRET=1; its work starts at once, in the background."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_interpreter_mode) as ex:
        yield ex.submit(_interpreter_work)


@pytest.fixture(scope="module")
def pool():
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)), mp_context=ctx,
                             initializer=_compiled_mode) as ex:
        yield ex


@pytest.fixture
def chunk_specialise(monkeypatch):
    """``specialise`` pointed at the chunk kernels in this process, restored afterwards."""
    from pama_ext.fused_linear import triton_chunks
    from pama_ext.triton_backend import specialise

    monkeypatch.setattr(specialise, "_kernels_module", triton_chunks._kernels)
    return specialise


def test_import_does_not_import_triton(interpreter):
    """Checked first thing in the fresh worker: Triton is imported at the first kernel call."""
    assert interpreter.result()[-1], "importing pama_ext.fused_linear.triton_chunks imported triton"


def test_shape_arguments_and_pointers_are_not_specialised(interpreter, chunk_specialise):
    real, _sweep, _without, _lazy = interpreter.result()
    ones = {launch.name: launch for _d, c, v, launch, _k in real if c == 1 and v == 1}
    assert set(ones) == set(KERNELS), "no real launch with C = 1 and V = 1"
    for name, launch in ones.items():
        spec = chunk_specialise.jit_specialisation(launch, arch=ARCH)
        raw = chunk_specialise.jit_specialisation(launch, respect_do_not_specialize=False, arch=ARCH)
        shapes = [a for a in ("V", "stride_x", "stride_out") if a in spec.signature]
        assert all(spec.signature[a] == "i32" for a in shapes), spec.signature
        assert [a for a, ty in spec.signature.items() if ty == "constexpr"] == ["BLOCK_V"], spec.signature
        assert spec.signature["inv_t"] == "fp32", spec.signature
        assert not any(spec.attrs.values()), spec.attrs  # no divisibility attribute anywhere
        assert all(raw.signature[a] == "constexpr" for a in shapes), raw.signature  # what the lists prevent
        assert any(raw.attrs.values()), raw.attrs


def test_shape_sweep_is_one_variant_per_kernel_and_dtype(interpreter):
    _real, sweep, without, _lazy = interpreter.result()
    assert set(sweep) == {(k, d) for k in KERNELS for d in DTYPES}, sorted(sweep)
    counts = {k: len(v) for k, v in sweep.items()}
    assert all(n == 1 for n in counts.values()), f"compiled variants per (kernel, dtype) over the sweep: {counts}"
    assert all(n > 3 for n in without.values()), f"the sweep no longer varies the specialisations: {without}"


def test_real_launches_are_the_swept_variants(interpreter):
    real, sweep, _without, _lazy = interpreter.result()
    assert {(launch.name, d) for d, *_rest, launch, _k in real} == set(sweep)
    assert any(c % 16 == 0 and v % 16 == 0 for _d, c, v, _l, _k in real), "no real launch with sizes divisible by 16"
    assert any(v > 4096 for _d, _c, v, _l, _k in real), "no real launch with V over one block"
    stray = [(launch.name, d, c, v) for d, c, v, launch, key in real if key not in sweep[launch.name, d]]
    assert not stray, f"real launches that compile another variant than the sweep's: {stray[:4]}"


def test_kernels_compile_for_sm90(interpreter, pool):
    _real, sweep, _without, _lazy = interpreter.result()
    launches = [launch for variants in sweep.values() for launch in variants.values()]
    errors = [e for e in pool.map(_compile, launches) if e]
    assert not errors, (
        f"{len(errors)} of {len(launches)} variants fail to compile for sm_{ARCH}:\n" + "\n\n".join(errors[:2])
    )
