"""Host side of the Triton backend: launches, ``torch.library`` ops, backend registration.

``pama_ext::triton_forward`` / ``pama_ext::triton_backward`` have the schemas of
``pama_forward`` / ``pama_backward`` (``pama_ext/_ops.py``) and the same contract
(``csrc/README.md``). Their kernels are registered for CUDA, and also for CPU when
``TRITON_INTERPRET=1`` is set at import (Triton's interpreter runs the same kernels on CPU
tensors; the CPU CI uses it). Triton itself is imported at the first call, not at import.

Host synchronisation: none on the default path. Two documented exceptions, each one
small device-to-host read:

* ``check_finite=True`` (``pama_loss(nonfinite="raise")``, the default): raising a Python
  ``ValueError`` that names the bad argument needs the three non-finite counts on the
  host. On a GPU use ``nonfinite="mask"`` for a sync-free call (non-finite tokens are then
  dropped and counted in the statistics; read them when convenient).
* ``granularity="batch"`` with N > ``ENUM_MAX_N`` (10) objectives: the N x N Gram matrix
  is copied to the host and solved there by the exact Wolfe solver (C++ if built, else
  the reference). For N <= 10 the exact solve runs on the device (support enumeration).
"""

from __future__ import annotations

import contextlib
import inspect
import os
from typing import Dict, Iterator, List, NamedTuple, Tuple

import numpy as np
import torch
from torch import Tensor

from .. import _ops, reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_GRAN = {"batch": 0, "token": 1, "sequence": 2, "batch_mean": 3}
_AGG = {"token_mean": 0, "seq_mean_token_mean": 1}
ENUM_MAX_N = 10  # == kernels.ENUM_MAX_N (kept here so importing ops does not import Triton)
TOKENS_PER_PROGRAM = 2048  # target tokens per program of the token pass
PARTIAL_ROWS = 256  # reduce_rows_kernel writes at most this many partial vectors
N_FIXED_SLOTS = 11

_kernels = None
_launch_interpret = INTERPRET  # launch parameters for the interpreter (candidates_per_program)


def _k():
    """The kernels module (imports Triton on first use)."""
    global _kernels
    if _kernels is None:
        from . import kernels

        _kernels = kernels
    return _kernels


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


# --------------------------------------------------------------------------- launch parameters
# Every constexpr is a function of (N, granularity, dtype) only, never of B or T, and the
# kernels do not let Triton specialise on the runtime ints that depend on B or T
# (do_not_specialize), so the set of compiled specialisations is small and enumerable
# (python_tests/test_triton_aot.py compiles every one of them for sm_90, see below).
def block_n(n: int) -> int:
    return _next_pow2(n)


def token_chunk(bn: int, gram: bool) -> int:
    """Tokens per inner step of the token pass: bounded register tiles."""
    if gram:  # the [CHUNK, BN, BN] float64 Gram accumulator
        return max(2, min(256, 4096 // (bn * bn)))  # CHUNK = 1 crashes the compiler (fp64, BN = 64)
    return max(16, min(512, 2048 // bn))


def block_k(bn: int, gram: bool) -> int:
    """Width of a statistics vector tile: the layout of the largest N with this BN."""
    return _next_pow2(N_FIXED_SLOTS + 3 * bn + (bn * bn if gram else 0))


def candidates_per_program(bn1: int, n_supports: int = 0, interpret: bool = False) -> int:
    """Supports solved side by side by one program: a [SB, BN1, BN1] float64 tile.

    On the GPU the tile holds 4096 numbers. Under the interpreter one program takes every
    support (the same code with a wider tile): the interpreter's cost is per operation, not
    per element, and 2^N - 1 programs of N = 8..10 would take minutes."""
    if interpret:
        return _next_pow2(n_supports)
    return max(1, 4096 // (bn1 * bn1))


def backward_block(bn: int) -> int:
    return max(64, min(1024, 2048 // bn))


def backward_warps(bn: int) -> int:
    return 8 if backward_block(bn) * bn >= 2048 else 4


def num_warps_for(elems: int) -> int:
    return 8 if elems >= 4096 else 4


def compute_dtype(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _weights_shape(granularity: str, b: int, n: int):
    return {"batch": (n,), "batch_mean": (n,), "sequence": (b, n), "token": (0,)}[granularity]


class _Device:
    """``torch.cuda.device(t.device)`` on CUDA (Triton launches on the current device)."""

    def __init__(self, t: Tensor):
        self.ctx = torch.cuda.device(t.device) if t.device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def _host_min_norm(gram: Tensor) -> Tensor:
    """Exact Wolfe solve on the host for N > ENUM_MAX_N (a documented synchronisation)."""
    from .._backends import _C

    g = gram.detach().to(device="cpu", dtype=torch.float64)
    if _C is not None and hasattr(_C, "min_norm_weights"):
        return _C.min_norm_weights(g)
    return reference.min_norm_weights(g)


def forward_impl(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    granularity: str,
    loss_agg: str,
    check_finite: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    k = _k()
    if granularity not in _GRAN:
        raise ValueError(f"unknown granularity {granularity!r}")
    if loss_agg not in _AGG:
        raise ValueError(f"unknown loss_agg {loss_agg!r}")
    logp = logp.contiguous()
    old_logp = old_logp.contiguous()
    advantages = advantages.contiguous()
    mask_u8 = mask.contiguous().view(torch.uint8) if mask.dtype == torch.bool else (mask != 0).view(torch.uint8)
    b, t = logp.shape
    n = advantages.shape[-1]
    dev = logp.device
    acc = acc_dtype(logp.dtype)
    f64 = torch.float64
    gran = _GRAN[granularity]
    gram = granularity == "batch"
    bn = block_n(n)
    ks = N_FIXED_SLOTS + 3 * n + (n * n if gram else 0)
    blk_k = block_k(bn, gram)
    chunk = token_chunk(bn, gram)
    nch = max(1, min(triton_cdiv(t, chunk), max(1, TOKENS_PER_PROGRAM // chunk)))
    nblk = max(1, triton_cdiv(t, nch * chunk))
    rows_per_prog = max(1, triton_cdiv(b, PARTIAL_ROWS))
    n_part2 = max(1, triton_cdiv(b, rows_per_prog))
    if b * t > 2**31 - 2**16:
        raise ValueError(f"pama_loss[triton]: B * T = {b * t} tokens; the Triton kernels support fewer than 2^31")
    per_seq = advantages.dim() == 2
    stride_ab = n if per_seq else t * n
    stride_at = 0 if per_seq else n
    thr = 1.0 + float(clip_eps)
    cd = compute_dtype(logp.dtype)

    part = torch.empty((max(1, b * nblk), ks), dtype=f64, device=dev)
    part2 = torch.zeros((n_part2, ks), dtype=f64, device=dev) if b == 0 else torch.empty((n_part2, ks), dtype=f64, device=dev)
    row_m = torch.empty((b,), dtype=f64, device=dev)
    weights = torch.empty(_weights_shape(granularity, b, n), dtype=acc, device=dev)
    tot = torch.empty((ks,), dtype=f64, device=dev)
    loss = torch.empty((), dtype=acc, device=dev)
    row_scale = torch.empty((b,), dtype=acc, device=dev)
    stats = torch.empty((8,), dtype=f64, device=dev)

    with _Device(logp):
        if b > 0:
            k.reduce_tokens_kernel[(b * nblk,)](
                logp, old_logp, advantages, mask_u8, part,
                t, n, nblk, nch, stride_ab, stride_at, ks, *split3(thr),
                CD=cd, BN=bn, CHUNK=chunk, DO_GRAM=gram,
                num_warps=num_warps_for(chunk * bn * (bn if gram else 2)),
            )
            k.reduce_rows_kernel[(n_part2,)](
                part, part2, row_m, weights if granularity == "sequence" else row_m,
                b, n, nblk, ks, rows_per_prog,
                SEQ=granularity == "sequence", BN=bn, BLOCK_K=blk_k,
                BLOCK_P=max(1, 4096 // blk_k), BLOCK_J=16, num_warps=4,
            )
        k.reduce_total_kernel[(1,)](
            part2, tot, n_part2, ks, BLOCK_K=min(blk_k, 4096), BLOCK_R=max(1, 4096 // min(blk_k, 4096)),
            num_warps=4,
        )
        if check_finite:  # the counts of non-finite logp, old_logp, advantages: one small read
            reference.raise_nonfinite(tot[2:5].tolist())
        wmode, n_s, bn1 = k.WMODE_CLOSED, 1, 1
        cand, cobj, wgiven = tot, tot, tot
        if gram and n >= 3:
            if n <= ENUM_MAX_N:
                wmode = k.WMODE_CANDIDATES
                n_s = (1 << n) - 1
                bn1 = _next_pow2(n + 1)
                cand = torch.empty((n_s, bn1), dtype=f64, device=dev)
                cobj = torch.empty((n_s,), dtype=f64, device=dev)
                sb = candidates_per_program(bn1, n_s, _launch_interpret)
                k.support_candidates_kernel[(triton_cdiv(n_s, sb),)](
                    tot, cand, cobj, n, n_s, N_FIXED_SLOTS + 3 * n, BN1=bn1, SB=sb, num_warps=8
                )
            else:
                wmode = k.WMODE_GIVEN
                g_off = N_FIXED_SLOTS + 3 * n
                wgiven = _host_min_norm(tot[g_off : g_off + n * n].view(n, n)).to(device=dev, dtype=f64)
        k.finalize_kernel[(1,)](
            tot, row_m, cand, cobj, wgiven,
            weights if gran in (0, 3) else tot, row_scale, loss, stats,
            b, n, n_s, _AGG[loss_agg],
            GRAN=gran, WMODE=wmode, BN=bn, BN1=bn1, BLOCK_S=_next_pow2(n_s), BLOCK_B=1024,
            num_warps=4,
        )
    return loss, weights, row_scale, stats


def backward_impl(
    grad_loss: Tensor,
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    weights: Tensor,
    row_scale: Tensor,
    clip_eps: float,
    granularity: str,
) -> Tensor:
    k = _k()
    logp = logp.contiguous()
    old_logp = old_logp.contiguous()
    advantages = advantages.contiguous()
    mask_u8 = mask.contiguous().view(torch.uint8) if mask.dtype == torch.bool else (mask != 0).view(torch.uint8)
    b, t = logp.shape
    n = advantages.shape[-1]
    acc = acc_dtype(logp.dtype)
    per_seq = advantages.dim() == 2
    out = torch.empty_like(logp)
    total = b * t
    if total == 0:
        return out
    if total > 2**31 - 2**16:
        raise ValueError(f"pama_loss[triton]: B * T = {total} tokens; the Triton kernels support fewer than 2^31")
    bn = block_n(n)
    blk = backward_block(bn)
    token = granularity == "token"
    weights = weights.to(acc).contiguous()
    grad_loss = grad_loss.to(device=logp.device, dtype=acc).contiguous()
    with _Device(logp):
        k.backward_kernel[(triton_cdiv(total, blk),)](
            grad_loss, logp, old_logp, advantages, mask_u8,
            row_scale if token else weights, row_scale.to(acc).contiguous(), out,
            total, t, n,
            n if per_seq else t * n, 0 if per_seq else n,
            n if granularity == "sequence" else 0,
            *split3(1.0 + float(clip_eps)),
            CD=compute_dtype(logp.dtype), BN=bn, BLOCK=blk, TOKEN_MIN=token,
            num_warps=backward_warps(bn),
        )
    return out


def split3(x: float) -> Tuple[float, float, float]:
    """x = hi + mid + lo exactly, each a float32 value.

    Triton passes Python floats to kernels as float32 (and the interpreter ignores a
    float64 annotation), so 1 + clip_eps travels as three float32 numbers that the kernels
    add in float64: hi + mid has at most 48 significant bits, lo the remaining <= 5."""
    hi = float(np.float32(x))
    r = x - hi
    mid = float(np.float32(r))
    lo = float(np.float32(r - mid))
    assert hi + mid + lo == x
    return hi, mid, lo


def triton_cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


# --------------------------------------------------------------------------- the specialisations
# At a launch Triton's JIT specialises the arguments (triton/runtime/jit.py: the binder of
# ``create_function_from_signature``, ``native_specialize_impl``, ``_pack_args``): an int
# equal to 1 becomes a compile-time constant, an int or a pointer divisible by 16 gets a
# divisibility attribute, unless the kernel lists the argument in ``do_not_specialize``
# (``do_not_specialize_on_alignment``). Each distinct result is a separate compile. The
# helpers below record the launches the host code above really makes and apply Triton's own
# binder to them for a CUDA target, so python_tests/test_triton_aot.py compiles exactly
# what the JIT would compile on an sm_90 GPU, and counts how many variants a shape sweep
# produces (benchmarks/triton_variants.py prints the counts).
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
    global _kernels, _launch_interpret
    saved = (_kernels, _launch_interpret)
    rec = _Recorder(_kernels_module(), execute)
    _kernels = rec
    if gpu_launch:
        _launch_interpret = False
    try:
        yield rec.launches
    finally:
        _kernels, _launch_interpret = saved


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
        _loss, weights, row_scale, _stats = forward_impl(logp, logp, adv, mask, 0.2, granularity, loss_agg, True)
        if backward:
            grad = torch.ones((), dtype=acc_dtype(dtype))
            backward_impl(grad, logp, logp, adv, mask, weights, row_scale, 0.2, granularity)
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
                    granularities=tuple(_GRAN), respect_do_not_specialize: bool = True) -> Dict[str, Dict[str, Launch]]:
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


# --------------------------------------------------------------------------- torch.library
_lib = torch.library.Library("pama_ext", "FRAGMENT")
_lib.define(
    "triton_forward(Tensor logp, Tensor old_logp, Tensor advantages, Tensor mask, float clip_eps, "
    "str granularity, str loss_agg, bool check_finite) -> (Tensor, Tensor, Tensor, Tensor)"
)
_lib.define(
    "triton_backward(Tensor grad_loss, Tensor logp, Tensor old_logp, Tensor advantages, Tensor mask, "
    "Tensor weights, Tensor row_scale, float clip_eps, str granularity) -> Tensor"
)

DEVICES = ("cuda", "cpu") if INTERPRET else ("cuda",)
for _key in ("CUDA", "CPU") if INTERPRET else ("CUDA",):
    _lib.impl("triton_forward", forward_impl, _key)
    _lib.impl("triton_backward", backward_impl, _key)

@torch.library.register_fake("pama_ext::triton_forward")
def _forward_fake(logp, old_logp, advantages, mask, clip_eps, granularity, loss_agg, check_finite):
    acc = acc_dtype(logp.dtype)
    b, n = logp.shape[0], advantages.shape[-1]
    return (
        logp.new_empty((), dtype=acc),
        logp.new_empty(_weights_shape(granularity, b, n), dtype=acc),
        logp.new_empty((b,), dtype=acc),
        logp.new_empty((_ops.N_STATS,), dtype=torch.float64),
    )


@torch.library.register_fake("pama_ext::triton_backward")
def _backward_fake(grad_loss, logp, old_logp, advantages, mask, weights, row_scale, clip_eps, granularity):
    return torch.empty_like(logp)


def _setup_context(ctx, inputs, output):
    logp, old_logp, advantages, mask, clip_eps, granularity, _loss_agg, _check = inputs
    _loss, weights, row_scale, stats = output
    ctx.mark_non_differentiable(weights, row_scale, stats)  # only the loss carries a gradient
    ctx.save_for_backward(logp, old_logp, advantages, mask, weights, row_scale)
    ctx.clip_eps = clip_eps
    ctx.granularity = granularity


def _backward(ctx, grad_loss, _gw, _gr, _gs):
    logp, old_logp, advantages, mask, weights, row_scale = ctx.saved_tensors
    grad_logp = torch.ops.pama_ext.triton_backward(
        grad_loss, logp, old_logp, advantages, mask, weights, row_scale, ctx.clip_eps, ctx.granularity
    )
    return grad_logp, None, None, None, None, None, None, None


torch.library.register_autograd("pama_ext::triton_forward", _backward, setup_context=_setup_context)


def forward(*args):
    """The ``forward`` of the ``triton`` backend entry (differentiable through the op)."""
    return torch.ops.pama_ext.triton_forward(*args)
