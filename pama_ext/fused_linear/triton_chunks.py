"""Per-chunk log-softmax pieces of the fused linear loss as Triton kernels.

The same two functions as ``chunks.py`` (which states the contract), for CUDA tensors (and
CPU tensors through Triton's interpreter when ``TRITON_INTERPRET=1`` was set before this
module was imported). One program per row, looping over the vocabulary in ``BLOCK_V``
columns:

* ``logp_lse``: one read of the row with a running max and a running sum of exponentials
  (an online logsumexp), then the target's logit; ``x`` is only read, so the caller can
  reuse the chunk for the gradient;
* ``grad_logits_``: a second read of the row, the softmax from the given ``lse``, and
  ``g (onehot - softmax) / temperature`` written over the logits when they are float32
  (else into a new float32 buffer), as ``chunks.py`` does.

The per-row maths runs in float32 for float32/bfloat16/float16 logits. float64 logits
(and devices Triton cannot reach) go to the PyTorch functions of ``chunks.py``: float64
is the precision of reference runs, not of training, and keeping it out of the kernels
keeps one compiled variant per training dtype.

Importing this module does not import Triton: the kernel bodies below are plain
functions until the first call, which imports Triton, binds the names they use and
wraps them with ``triton.jit`` (``_kernels``).
"""

from __future__ import annotations

import contextlib
import os
from types import SimpleNamespace
from typing import Tuple

import torch
from torch import Tensor

from . import chunks as torch_chunks

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Columns per step of a row. A constant, not a function of V: the kernels then compile
# once per input dtype for every vocabulary (the vocabularies of real models are all
# larger, so the last, partly masked step costs a few percent at most).
BLOCK_V = 4096
NUM_WARPS = 8

# Launch-time specialisation (see pama_ext/triton_backend/kernels.py): Triton's JIT turns
# an int argument equal to 1 into a compile-time constant, compiles another variant for
# ints divisible by 16 and for 16-byte aligned pointers. V and the row strides vary with
# the model and the chunk (V = 1 and C = 1 happen), and the per-row vectors (targets, lse,
# g) are slices of [B*T] tensors at the chunk's first row, aligned or not depending on the
# chunk size. None of them is specialised: one compiled kernel per logits dtype. The
# alignment would buy nothing anyway: with a row stride of unknown divisibility the
# compiler cannot prove a row's start aligned, so the loads are not vectorised whatever
# x_ptr's alignment, and each program reads one element of the per-row vectors.
# python_tests/test_fused_linear_triton_aot.py checks the variants and compiles them for sm_90.
SHAPE_ARGS = ("V", "stride_x", "stride_out")
POINTERS = ("x_ptr", "out_ptr", "tgt_ptr", "lse_ptr", "g_ptr", "logp_ptr")

# Bound by _import_triton at the first call; the kernel bodies read them as globals.
tl = None
libdevice = None
_sum_combine = None
_elementwise_max = None
USE_LIBDEVICE = None  # tl.constexpr: libdevice's accurate exp/log (not under the interpreter)
_KERNELS = None


def logp_lse_kernel(
    x_ptr,  # [C, V] raw logits, unit column stride
    tgt_ptr,  # [C] target ids
    logp_ptr,  # [C] float32
    lse_ptr,  # [C] float32
    V,
    stride_x,  # elements between rows of x
    inv_t,  # 1 / temperature (float32)
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)  # running max of z
    s = tl.zeros((), dtype=tl.float32)  # running sum of exp(z - ref(m))
    for v0 in range(0, V, BLOCK_V):
        c = v0 + cols
        z = tl.load(x_row + c, mask=c < V, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.reduce(z, 0, _elementwise_max))
        # ref: the max, or 0 while it is infinite (as torch.logsumexp), so that an all -inf
        # prefix leaves s = 0 instead of exp(-inf - -inf) = NaN and a +inf logit gives inf
        ref = tl.where(tl.abs(m_new) < float("inf"), m_new, 0.0)
        if USE_LIBDEVICE:
            s = s * libdevice.exp(m - ref) + tl.reduce(libdevice.exp(z - ref), 0, _sum_combine)
        else:
            s = s * tl.exp(m - ref) + tl.reduce(tl.exp(z - ref), 0, _sum_combine)
        m = m_new
    ref = tl.where(tl.abs(m) < float("inf"), m, 0.0)
    if USE_LIBDEVICE:
        lse = ref + libdevice.log(s)
    else:
        lse = ref + tl.log(s)
    tgt = tl.load(tgt_ptr + row)
    z_t = tl.load(x_row + tgt).to(tl.float32) * inv_t  # the same rounding as z in the loop
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, z_t - lse)


def grad_logits_kernel(
    x_ptr,  # [C, V] raw logits, unit column stride
    out_ptr,  # [C, V] float32, unit column stride; may be x_ptr (each element is read before it is written)
    tgt_ptr,  # [C] target ids
    lse_ptr,  # [C] float32, from logp_lse_kernel
    g_ptr,  # [C] float32: dL/dlogp
    V,
    stride_x,
    stride_out,
    inv_t,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    out_row = out_ptr + row * stride_out
    cols = tl.arange(0, BLOCK_V)
    tgt = tl.load(tgt_ptr + row)
    lse = tl.load(lse_ptr + row)
    gt = tl.load(g_ptr + row) * inv_t
    for v0 in range(0, V, BLOCK_V):
        c = v0 + cols
        inb = c < V
        z = tl.load(x_row + c, mask=inb, other=float("-inf")).to(tl.float32) * inv_t  # p = 0 off the row
        if USE_LIBDEVICE:
            p = libdevice.exp(z - lse)
        else:
            p = tl.exp(z - lse)
        gp = gt * p
        tl.store(out_row + c, tl.where(c == tgt, gt - gp, -gp), mask=inb)


def _import_triton() -> None:
    global tl, libdevice, _sum_combine, _elementwise_max, USE_LIBDEVICE
    import triton.language as language
    from triton.language.extra import libdevice as ld

    # tl.reduce with the standard combine functions, as kernels.py: in the interpreter a
    # numpy reduction rather than a nested device-function call per step
    from triton.language.standard import _elementwise_max as emax
    from triton.language.standard import _sum_combine as ssum

    tl, libdevice, _sum_combine, _elementwise_max = language, ld, ssum, emax
    # tl.exp / tl.log lower to the approximate ex2 / lg2 for float32 on NVIDIA GPUs; the
    # interpreter has no libdevice and uses numpy's
    USE_LIBDEVICE = language.constexpr(not INTERPRET)


def _kernels() -> SimpleNamespace:
    """The jitted kernels, by name (imports Triton on the first call)."""
    global _KERNELS
    if _KERNELS is None:
        import triton

        _import_triton()
        jit = triton.jit(do_not_specialize=list(SHAPE_ARGS), do_not_specialize_on_alignment=list(POINTERS))
        _KERNELS = SimpleNamespace(logp_lse_kernel=jit(logp_lse_kernel), grad_logits_kernel=jit(grad_logits_kernel))
    return _KERNELS


def supports(device) -> bool:
    """Whether the kernels run on tensors of ``device``: CUDA, and CPU under the interpreter."""
    from ..triton_backend import HAS_TRITON

    device = torch.device(device)
    return HAS_TRITON and (device.type == "cuda" or (INTERPRET and device.type == "cpu"))


def _use_torch(x: Tensor) -> bool:
    return x.dtype == torch.float64 or not supports(x.device)


def _unit_columns(x: Tensor) -> Tensor:
    return x if x.stride(1) == 1 or x.shape[1] == 1 else x.contiguous()


def _on_device(x: Tensor):
    # Triton launches on the current CUDA device
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def _inv_t(temperature: float) -> float:
    # z = x * (1 / t): a multiplication per logit instead of a division (torch's CUDA
    # division by a scalar does the same); a float, never an int that Triton would specialise
    return 1.0 / float(temperature)


def logp_lse(x: Tensor, targets: Tensor, temperature: float) -> Tuple[Tensor, Tensor]:
    """(logp [C], lse [C]) of raw logits ``x`` [C, V] and ``targets`` [C] (valid ids)."""
    if _use_torch(x):
        return torch_chunks.logp_lse(x, targets, temperature)
    x = _unit_columns(x)
    c, v = x.shape
    logp = torch.empty(c, dtype=torch.float32, device=x.device)
    lse = torch.empty_like(logp)
    if c:
        k = _kernels()
        with _on_device(x):
            k.logp_lse_kernel[(c,)](
                x, targets.contiguous(), logp, lse, v, x.stride(0), _inv_t(temperature),
                BLOCK_V=BLOCK_V, num_warps=NUM_WARPS,
            )
    return logp, lse


def grad_logits_(x: Tensor, targets: Tensor, lse: Tensor, g: Tensor, temperature: float) -> Tensor:
    """``g (onehot - softmax(x / temperature)) / temperature`` [C, V] in float32 (float64
    for float64 ``x``), over ``x`` itself when it is float32."""
    if _use_torch(x):
        return torch_chunks.grad_logits_(x, targets, lse, g, temperature)
    x = _unit_columns(x)
    c, v = x.shape
    out = x if x.dtype == torch.float32 else torch.empty((c, v), dtype=torch.float32, device=x.device)
    if c:
        k = _kernels()
        with _on_device(x):
            k.grad_logits_kernel[(c,)](
                x, out, targets.contiguous(), lse.to(torch.float32).contiguous(), g.to(torch.float32).contiguous(),
                v, x.stride(0), out.stride(0), _inv_t(temperature),
                BLOCK_V=BLOCK_V, num_warps=NUM_WARPS,
            )
    return out
