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
* ``granularity="batch"`` or ``"sequence_gram"`` with N > ``ENUM_MAX_N`` (10) objectives:
  the N x N Gram matrix is copied to the host and solved there by the exact Wolfe solver
  (C++ if built, else the reference). For N <= 10 the exact solve runs on the device (support enumeration).
"""

from __future__ import annotations

import os
from typing import Tuple

import numpy as np
import torch
from torch import Tensor

from .. import _ops, reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_GRAN = {"batch": 0, "token": 1, "sequence": 2, "batch_mean": 3, "sequence_gram": 4}
_AGG = {"token_mean": 0, "seq_mean_token_mean": 1}
ENUM_MAX_N = 10  # == kernels.ENUM_MAX_N (kept here so importing ops does not import Triton)
TOKENS_PER_PROGRAM = 2048  # target tokens per program of the token pass
PARTIAL_ROWS = 256  # reduce_rows_kernel writes at most this many partial vectors
N_FIXED_SLOTS = 11

_kernels = None
# launch parameters for the interpreter (candidates_per_program); specialise.record_launches
# switches it off to record the launches a GPU gets
_launch_interpret = INTERPRET


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
# (python_tests/test_triton_aot.py compiles every one of them for sm_90, see specialise.py).
def block_n(n: int) -> int:
    return _next_pow2(n)


def token_chunk(bn: int, gram: bool) -> int:
    """Tokens per step of the token pass, one lane each. Up to N = 8 a lane is one thread
    that holds its objectives' sums (and Gram pairs) in registers: 256 lanes (128 for the
    N = 8 Gram, whose 36 pairs take most of a thread's registers). Above, a lane's sums are
    spread over threads: bounded [BN(, BN), CHUNK] float64 tiles. The Gram's chunks for
    N > 8 are the ones that compile without spills for sm_90 (others of the same size hit
    a Triton 3.6 layout error or spill: python_tests/test_triton_aot.py compiles them all)."""
    if bn <= 8:
        return 128 if gram and bn == 8 else 256
    if gram:
        return 8 if bn <= 32 else 1
    return max(16, min(512, 2048 // bn))


def token_warps(bn: int, gram: bool) -> int:
    """Warps of the token pass: one thread a lane up to N = 8 (see token_chunk)."""
    if bn <= 8:
        return token_chunk(bn, gram) // 32
    if gram:
        return 4 if bn <= 32 else 2
    return num_warps_for(token_chunk(bn, gram) * bn * 2)


def token_unroll(bn: int, packed: bool) -> int:
    """Steps of the token pass unrolled (UNROLL): their loads are in flight together, at the
    price of registers. For sm_90 (ptxas) N <= 4 keeps 2 blocks of 256 threads for `batch`
    at N = 4 (125 registers) with 4 tokens a thread in flight, against 1 block and 1 token
    before; N = 5..7, whose advantages load one by one (not ``packed``), would spill
    (benchmarks/GPU.md, "The token pass")."""
    return 4 if bn <= 4 else 2 if bn == 8 and packed else 1


def adv_vec(n: int, bn: int) -> int:
    """ADV_VEC of the token pass and the backward: BN when a token's N advantages fill a
    whole vector (both advantage strides are then passed divided by it)."""
    return bn if n == bn and bn > 1 else 1


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
    gram = granularity == "batch"  # the token Gram, accumulated by the token pass
    solve = gram or granularity == "sequence_gram"  # a min-norm solve on the Gram slots
    bn = block_n(n)
    ks = N_FIXED_SLOTS + 3 * n + (n * n if solve else 0)
    blk_k = block_k(bn, solve)
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
    vec = adv_vec(n, bn)  # both strides are multiples of n
    thr = 1.0 + float(clip_eps)
    cd = compute_dtype(logp.dtype)

    part = torch.empty((max(1, b * nblk), ks), dtype=f64, device=dev)
    part2 = torch.zeros((n_part2, ks), dtype=f64, device=dev) if b == 0 else torch.empty((n_part2, ks), dtype=f64, device=dev)
    row_m = torch.empty((b,), dtype=f64, device=dev)
    token = granularity == "token"
    weights = torch.empty(_ops.forward_weights_shape(granularity, b, t, n), dtype=acc, device=dev)
    tot = torch.empty((ks,), dtype=f64, device=dev)
    loss = torch.empty((), dtype=acc, device=dev)
    row_scale = torch.empty((b,), dtype=acc, device=dev)
    stats = torch.empty((8,), dtype=f64, device=dev)

    with _Device(logp):
        if b > 0:
            k.reduce_tokens_kernel[(b * nblk,)](
                logp, old_logp, advantages, mask_u8, part, weights if token else part,
                t, n, nblk, nch, stride_ab // vec, stride_at // vec, ks, *split3(thr),
                CD=cd, BN=bn, CHUNK=chunk, UNROLL=token_unroll(bn, vec > 1), ADV_VEC=vec, DO_GRAM=gram, TOKEN_F=token,
                num_warps=token_warps(bn, gram),
            )
            k.reduce_rows_kernel[(n_part2,)](
                part, part2, row_m, weights if granularity == "sequence" else row_m,
                b, n, nblk, ks, rows_per_prog,
                SEQ=granularity == "sequence", SGRAM=granularity == "sequence_gram", BN=bn, BLOCK_K=blk_k,
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
        if solve and n >= 3:
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
            weights if gran in (0, 3, 4) else tot, row_scale, loss, stats,
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
    vec = adv_vec(n, bn)
    blk = backward_block(bn)
    token = granularity == "token"
    weights = weights.to(acc).contiguous()
    grad_loss = grad_loss.to(device=logp.device, dtype=acc).contiguous()
    with _Device(logp):
        k.backward_kernel[(triton_cdiv(total, blk),)](
            grad_loss, logp, old_logp, advantages, mask_u8,
            row_scale if token else weights, row_scale.to(acc).contiguous(), out,
            total, t, n,
            (n if per_seq else t * n) // vec, (0 if per_seq else n) // vec,
            n if granularity == "sequence" else 0,
            *split3(1.0 + float(clip_eps)),
            CD=compute_dtype(logp.dtype), BN=bn, BLOCK=blk, ADV_VEC=vec, TOKEN_MIN=token,
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
    (b, t), n = logp.shape, advantages.shape[-1]
    return (
        logp.new_empty((), dtype=acc),
        logp.new_empty(_ops.forward_weights_shape(granularity, b, t, n), dtype=acc),
        logp.new_empty((b,), dtype=acc),
        logp.new_empty((_ops.N_STATS,), dtype=torch.float64),
    )


@torch.library.register_fake("pama_ext::triton_backward")
def _backward_fake(grad_loss, logp, old_logp, advantages, mask, weights, row_scale, clip_eps, granularity):
    return torch.empty_like(logp)


# The autograd of pama_forward (pama_ext/_ops.py), with this backend's elementwise pass: for
# token it saves only the forward's [B, T] factor and the row scales, and the backward is one
# multiply (reference.token_factor_backward), not backward_kernel (which keeps its token path
# for direct callers of triton_backward).
torch.library.register_autograd(
    "pama_ext::triton_forward",
    _ops.make_backward(torch.ops.pama_ext.triton_backward),
    setup_context=_ops.setup_context,
)


def forward(*args):
    """The ``forward`` of the ``triton`` backend entry (differentiable through the op)."""
    return torch.ops.pama_ext.triton_forward(*args)
