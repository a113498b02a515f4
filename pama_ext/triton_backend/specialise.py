"""What Triton's JIT compiles for the launches the host code (``ops.py``) makes, without a
GPU: for python_tests/test_triton_aot.py and benchmarks/triton_variants.py, not for the
loss path.

At a launch Triton's JIT specialises the arguments (triton/runtime/jit.py: the binder of
``create_function_from_signature``, ``native_specialize_impl``, ``_pack_args``): an int
equal to 1 becomes a compile-time constant, an int or a pointer divisible by 16 gets a
divisibility attribute, unless the kernel lists the argument in ``do_not_specialize``
(``do_not_specialize_on_alignment``). Each distinct result is a separate compile. The
helpers below record the launches the host code of ops.py really makes and apply Triton's own
binder to them for a CUDA target, so python_tests/test_triton_aot.py compiles exactly
what the JIT would compile on an sm_90 GPU, and counts how many variants a shape sweep
produces (benchmarks/triton_variants.py prints the counts).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Dict, Iterator, List, NamedTuple

import torch
from torch import Tensor

from . import ops

USER_INPUTS = ("logp_ptr", "old_ptr", "adv_ptr", "mask_ptr", "grad_ptr")


class TensorArg:
    """A tensor argument as the launch-time specialisation sees it: its dtype and address."""

    __slots__ = ("dtype", "ptr")

    def __init__(self, dtype: torch.dtype, ptr: int):
        self.dtype = dtype
        self.ptr = int(ptr)

    def data_ptr(self) -> int:
        return self.ptr

    def __getstate__(self):
        return (self.dtype, self.ptr)

    def __setstate__(self, state):
        self.dtype, self.ptr = state

    def __repr__(self):
        return f"TensorArg({self.dtype}, ptr % 16 = {self.ptr % 16})"


class Launch(NamedTuple):
    """One kernel launch: kernel name, grid, positional arguments (tensors as ``TensorArg``)
    and keyword arguments (constexprs and launch options such as ``num_warps``)."""

    name: str
    grid: tuple
    args: tuple
    kwargs: dict


def _describe(x):
    return TensorArg(x.dtype, x.data_ptr()) if isinstance(x, Tensor) else x


class _RecordedKernel:
    def __init__(self, recorder: "_Recorder", name: str, fn):
        self.recorder, self.name, self.fn = recorder, name, fn

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            rec = self.recorder
            rec.launches.append(
                Launch(self.name, tuple(grid), tuple(map(_describe, args)), {k: _describe(v) for k, v in kwargs.items()})
            )
            if rec.execute:
                return self.fn[grid](*args, **kwargs)
            # not run: the kernel's outputs (every tensor but the user's inputs) read as zeros
            for pname, a in zip(_param_names(self.fn), args):
                if isinstance(a, Tensor) and pname not in USER_INPUTS:
                    a.zero_()
            return None

        return launch


_PARAM_NAMES: dict = {}


def _param_names(fn) -> tuple:
    if fn.fn not in _PARAM_NAMES:
        _PARAM_NAMES[fn.fn] = tuple(inspect.signature(fn.fn).parameters)
    return _PARAM_NAMES[fn.fn]


class _Recorder:
    """Stands in for the kernels module while ``record_launches`` is active."""

    def __init__(self, kernels, execute: bool):
        self._kernels, self.execute, self.launches = kernels, execute, []

    def __getattr__(self, name):
        value = getattr(self._kernels, name)
        return _RecordedKernel(self, name, value) if name.endswith("_kernel") else value


@contextlib.contextmanager
def record_launches(execute: bool = True, gpu_launch: bool = True) -> Iterator[List[Launch]]:
    """Record every kernel launch of the host code (``forward_impl`` / ``backward_impl``,
    called directly or through the ops) inside the ``with`` block, in a list of ``Launch``.

    ``execute=False``: nothing runs (no GPU or interpreter needed); the kernels' output
    tensors are zero-filled instead, so the host code's reads of them (``check_finite``,
    the host solve for N > ENUM_MAX_N) stay defined. ``gpu_launch``: the launch parameters
    a GPU gets, also under the interpreter (which otherwise takes every support of
    ``support_candidates_kernel`` in one program). Not thread-safe; for tests and tools."""
    saved = (ops._kernels, ops._launch_interpret)
    rec = _Recorder(_kernels_module(), execute)
    ops._kernels = rec
    if gpu_launch:
        ops._launch_interpret = False
    try:
        yield rec.launches
    finally:
        ops._kernels, ops._launch_interpret = saved


def _kernels_module():
    from . import kernels

    return kernels


def host_launches(dtype: torch.dtype, n: int, granularity: str, b: int = 3, t: int = 37,
                  loss_agg: str = "token_mean", per_token_advantages: bool = True,
                  backward: bool = True) -> List[Launch]:
    """The launches (GPU launch parameters) of one forward, and backward, of the host code
    on [b, t] inputs with n objectives, without running a kernel."""
    logp = torch.empty((b, t), dtype=dtype)  # never read: only shapes, dtypes and addresses matter
    adv = torch.empty((b, t, n) if per_token_advantages else (b, n), dtype=dtype)
    mask = torch.empty((b, t), dtype=torch.bool)
    with record_launches(execute=False) as launches:
        _loss, weights, row_scale, _stats = ops.forward_impl(logp, logp, adv, mask, 0.2, granularity, loss_agg, True)
        if backward:
            grad = torch.ones((), dtype=ops.acc_dtype(dtype))
            ops.backward_impl(grad, logp, logp, adv, mask, weights, row_scale, 0.2, granularity)
    return launches


class Specialisation(NamedTuple):
    key: str  # JITFunction.run's cache key: one compiled kernel per distinct key
    signature: dict  # argument name -> Triton type, "constexpr" for specialised constants
    constexprs: dict  # (argument index,) -> value
    attrs: dict  # (argument index,) -> [["tt.divisibility", 16]]
    options: dict  # compile options (num_warps, ...)


_BINDERS: dict = {}


def _jit_function(name: str, respect_do_not_specialize: bool = True):
    """The kernel as a ``JITFunction`` (also under the interpreter, where ``triton.jit``
    gives an ``InterpretedFunction``), optionally without its ``do_not_specialize`` lists."""
    from triton.runtime.jit import JITFunction

    fn = getattr(_kernels_module(), name)
    if isinstance(fn, JITFunction) and respect_do_not_specialize:
        return fn
    if isinstance(fn, JITFunction):
        kw = {"debug": fn.debug, "noinline": fn.noinline}
        dns, dnsoa = fn.do_not_specialize, fn.do_not_specialize_on_alignment
    else:  # InterpretedFunction: the decorator's arguments are in .kwargs
        kw = {k: v for k, v in fn.kwargs.items() if k not in ("do_not_specialize", "do_not_specialize_on_alignment")}
        dns = fn.kwargs.get("do_not_specialize") or []
        dnsoa = fn.kwargs.get("do_not_specialize_on_alignment") or []
    if respect_do_not_specialize:
        kw.update(do_not_specialize=dns, do_not_specialize_on_alignment=dnsoa)
    return JITFunction(fn.fn, **kw)


def _binder(name: str, respect_do_not_specialize: bool, arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    ck = (name, respect_do_not_specialize, arch)
    if ck not in _BINDERS:
        fn = _jit_function(name, respect_do_not_specialize)
        backend = make_backend(GPUTarget("cuda", arch, 32))
        _BINDERS[ck] = (fn, backend, create_function_from_signature(fn.signature, fn.params, backend))
    return _BINDERS[ck]


def _bind(launch: Launch, respect_do_not_specialize: bool, arch: int):
    """``JITFunction.run`` up to its cache look-up: the bound arguments, the specialisation
    and the cache key."""
    from triton import knobs
    from triton.runtime.jit import compute_cache_key

    fn, backend, binder = _binder(launch.name, respect_do_not_specialize, arch)
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    key = launch.name + ":" + compute_cache_key({}, specialization, options)
    return fn, backend, kwargs, bound_args, specialization, options, key


def jit_key(launch: Launch, respect_do_not_specialize: bool = True, arch: int = 90) -> str:
    """The JIT's cache key of ``launch`` on a CUDA device of compute capability ``arch``:
    launches with the same key share one compiled kernel (see ``jit_specialisation``)."""
    return _bind(launch, respect_do_not_specialize, arch)[-1]


def jit_specialisation(launch: Launch, respect_do_not_specialize: bool = True, arch: int = 90) -> Specialisation:
    """What ``JITFunction.run`` compiles for ``launch`` on a CUDA device of compute
    capability ``arch``: Triton's own binder and ``_pack_args`` (not a re-implementation of
    its rules), so the emulation follows the installed Triton. ``respect_do_not_specialize
    = False`` emulates the kernels without their ``do_not_specialize`` lists."""
    fn, backend, kwargs, bound_args, specialization, options, key = _bind(launch, respect_do_not_specialize, arch)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return Specialisation(key, signature, constexprs, attrs, dict(options.__dict__))


def specialisations(ns=range(1, 65), dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16),
                    granularities=tuple(ops._GRAN), respect_do_not_specialize: bool = True) -> Dict[str, Dict[str, Launch]]:
    """The distinct sm_90 specialisations (``{kernel: {key: launch}}``) the host code
    launches for every N in ``ns``, dtype and granularity: what the AOT test compiles."""
    out: Dict[str, Dict[str, Launch]] = {}
    for dtype in dtypes:
        for n in ns:
            for gran in granularities:
                for launch in host_launches(dtype, n, gran):
                    key = jit_key(launch, respect_do_not_specialize)
                    out.setdefault(launch.name, {}).setdefault(key, launch)
    return out
