"""The fused linear + log-probability + PAMA loss: the B x T x V logits never exist.

Rows are the B*T token positions, processed in chunks of ``chunk_size`` rows; a chunk's
logits ``x = h_c W^T (+ b)`` are C x V and live only while the chunk is processed.

* **Two passes** (``logp_pass`` then ``backprop_pass``; every granularity, and any loss of
  the log-probabilities): the forward computes each row's ``logp`` and ``lse``, one matmul
  per chunk, and keeps only those two numbers per row. The loss is then ordinary autograd
  code on the [B, T] ``logp`` (``pama_loss`` and the k3 KL term: every granularity,
  aggregation and ``nonfinite`` rule exactly as unfused). Its backward hands
  ``g = dL/dlogp`` to the second pass, which recomputes each chunk's logits and forms
  ``dL/dx = g (onehot - softmax) / tau``, ``dL/dh = dL/dx W``, ``dL/dW += dL/dx^T h``:
  four matmuls per chunk against the unfused path's three.
* **One pass** (``token_pass``; ``granularity="token"``, the default): a token's
  ``dL/dlogp`` needs only its own logp and the loss normaliser, and the normaliser (masked
  tokens, per row for ``seq_mean_token_mean``) is known from the mask before any logit, so
  each chunk's gradient is formed right after its logp: three matmuls per chunk, as
  unfused. The gradients are kept until backward, which scales them by the incoming
  gradient (as Liger-Kernel's fused linear losses do). The normaliser assumes that every
  logit row is finite; that is checked after the pass (one sync), and the rare call with
  an inf/NaN hidden state is redone with those rows dropped (or raises, ``nonfinite``).

``op.py`` wraps both as ``torch.library`` ops.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from .. import reference
from ..functional import pama_loss
from . import chunks as torch_chunks
from .validation import FusedInputs, LossOptions


#: the smallest default chunk: the chunk's matmuls are [C, H] x [H, V]; below about 512 rows
#: they run at a fraction of the peak on CPU (measured: 32 rows 0.2x, 128 rows 0.4x, 512 rows
#: 1x of 1024 rows' rate at H 512, V 32768), and 512 x V floats is small next to B x T x V
MIN_DEFAULT_CHUNK = 512


def default_chunk_size(rows: int, hidden: int, vocab: int) -> int:
    """A chunk's logits hold about as many numbers as the hidden states (rows x H), in a
    power of two of rows, at least ``MIN_DEFAULT_CHUNK`` (or all rows)."""
    target = max(MIN_DEFAULT_CHUNK, 1 << max(0, math.ceil(rows * hidden / max(vocab, 1)) - 1).bit_length())
    return max(1, min(rows, target))


def chunk_ops(backend: str, device: torch.device):
    """The per-chunk log-softmax kernels: Triton on CUDA tensors when it is installed (or
    with ``backend="triton"``), else PyTorch."""
    want_triton = backend == "triton" or (backend in ("auto", "cuda") and device.type == "cuda")
    if want_triton:
        from ..triton_backend import HAS_TRITON

        if HAS_TRITON:
            from . import triton_chunks

            if triton_chunks.supports(device):
                return triton_chunks
    return torch_chunks


def kl_k3(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    """Masked mean of ``exp(ref - logp) - (ref - logp) - 1`` (differentiable in ``logp``);
    tokens whose ``ref_logp`` or ``logp`` is non-finite leave the mean (``nonfinite="raise"``
    has raised before: ``raise_nonfinite_ref``)."""
    ref = ref_logp.to(logp.dtype)
    valid = mask & torch.isfinite(ref) & torch.isfinite(logp)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    d = torch.where(valid, ref - logp, zero)
    k3 = torch.where(valid, torch.exp(d) - d - 1, zero)
    return k3.sum() / valid.sum().clamp_min(1)


def raise_nonfinite_ref(ref_logp: Tensor, mask: Tensor) -> None:
    """``nonfinite="raise"``: a non-finite ``ref_logp`` at a masked position (one sync)."""
    bad = int((mask & ~torch.isfinite(ref_logp)).sum())
    if bad:
        raise ValueError(
            f"fused_linear_pama_loss: `ref_logp` has {bad} non-finite value(s) at masked positions; "
            "pass nonfinite='mask' to drop such tokens instead"
        )


def logp_loss(logp: Tensor, x: FusedInputs, opt: LossOptions) -> Tensor:
    """The loss as a function of the [B, T] log-probabilities: ``pama_loss`` (+ the KL term)."""
    loss = pama_loss(logp, x.old_logp, x.advantages, x.mask, **opt.pama_keywords())
    if opt.kl_coef > 0:
        loss = loss + opt.kl_coef * kl_k3(logp, x.ref_logp, x.mask)
    return loss


class _Passes:
    """The chunked matmuls shared by both structures."""

    def __init__(self, x: FusedInputs, opt: LossOptions, need_h: bool, need_w: bool, need_b: bool):
        # of ``opt`` only temperature, chunk_size and backend are read here
        self.x, self.opt = x, opt
        rows, h = x.hidden.shape
        self.rows = rows
        self.chunk = opt.chunk_size or default_chunk_size(rows, h, x.weight.shape[0])
        self.ops = chunk_ops(opt.backend, x.hidden.device)
        need_b = bool(need_b and x.bias is not None)
        self.acc = torch_chunks.acc_dtype(torch.promote_types(x.hidden.dtype, x.weight.dtype))
        self.need_h, self.need_w, self.need_b = need_h, need_w, need_b
        self.grad_h = torch.zeros_like(x.hidden) if need_h else None
        # dW accumulates over chunks in float32 (float64) whatever the weight's dtype
        self.grad_w = torch.zeros(x.weight.shape, dtype=self.acc, device=x.weight.device) if need_w else None
        self.grad_b = torch.zeros(x.weight.shape[0], dtype=self.acc, device=x.weight.device) if need_b else None

    def ranges(self):
        for lo in range(0, self.rows, self.chunk):
            yield lo, min(lo + self.chunk, self.rows)

    def logits(self, lo: int, hi: int) -> Tensor:
        x = self.x
        h = x.hidden[lo:hi]
        w = x.weight
        if h.dtype != w.dtype:  # mixed dtypes: compute in the promoted one, as `hidden @ weight.T` would refuse to
            dt = torch.promote_types(h.dtype, w.dtype)
            h, w = h.to(dt), w.to(dt)
        if x.bias is None:
            return h @ w.T
        return torch.addmm(x.bias.to(h.dtype), h, w.T)

    def logp_lse(self, lo: int, hi: int, logits: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        logits = self.logits(lo, hi) if logits is None else logits
        return self.ops.logp_lse(logits, self.x.targets[lo:hi], self.opt.temperature)

    def backprop(self, lo: int, hi: int, lse: Tensor, g: Tensor, zero_rows: Optional[Tensor] = None,
                 logits: Optional[Tensor] = None) -> None:
        """Add chunk [lo, hi)'s contribution to the gradients, given its dL/dlogp ``g``.

        ``zero_rows`` [hi - lo] bool: rows whose logits are not finite (an inf/NaN hidden
        state). They contribute nothing (their g is 0 whatever the loss); without this their
        0 * NaN softmax would poison every gradient, as it does unfused. ``logits``: the
        chunk's logits when the caller still has them (one pass); consumed here."""
        if not (self.need_h or self.need_w or self.need_b):
            return
        x = self.x
        logits = self.logits(lo, hi) if logits is None else logits
        d = self.ops.grad_logits_(logits, x.targets[lo:hi], lse, g, self.opt.temperature)
        if zero_rows is not None:
            d = torch.where(zero_rows[:, None], torch.zeros((), dtype=d.dtype, device=d.device), d)
        if self.need_b:
            self.grad_b += d.sum(0)
        cd = torch.promote_types(x.hidden.dtype, x.weight.dtype)  # the matmuls' dtype, as unfused
        if self.need_h:
            self.grad_h[lo:hi] = d.to(cd) @ x.weight.to(cd)
        if self.need_w:
            h = x.hidden[lo:hi].to(cd)
            if zero_rows is not None:  # 0 * inf in d^T h would be NaN
                h = torch.where(zero_rows[:, None], torch.zeros((), dtype=h.dtype, device=h.device), h)
            if cd == self.acc:
                self.grad_w.addmm_(d.T, h)
            else:  # a reduced-precision product, accumulated in float32
                self.grad_w += d.T.to(cd) @ h

    def grads(self):
        x = self.x
        gw = self.grad_w.to(x.weight.dtype) if self.need_w else None
        gb = self.grad_b.to(x.bias.dtype) if self.need_b else None
        return self.grad_h, gw, gb


def logp_pass(p: _Passes) -> Tuple[Tensor, Tensor]:
    """Pass 1: every row's (logp, lse), [B*T] each."""
    logp = torch.empty(p.rows, dtype=p.acc, device=p.x.hidden.device)
    lse = torch.empty_like(logp)
    for lo, hi in p.ranges():
        logp[lo:hi], lse[lo:hi] = p.logp_lse(lo, hi)
    return logp, lse


def backprop_pass(p: _Passes, lse: Tensor, g: Tensor) -> None:
    """Pass 2: the gradients of ``sum_r g_r logp_r`` (``g`` [B*T]) into ``p``'s buffers.
    Rows whose logits are not finite contribute nothing (one sync finds them)."""
    g = g.reshape(-1).to(p.acc)
    bad = ~torch.isfinite(lse)
    bad_chunks = set((bad.nonzero().flatten() // p.chunk).tolist())  # empty unless inf/NaN came in
    for k, (lo, hi) in enumerate(p.ranges()):
        p.backprop(lo, hi, lse[lo:hi], g[lo:hi], bad[lo:hi] if k in bad_chunks else None)


def raise_nonfinite_logp(logp: Tensor, mask: Tensor) -> None:
    bad = int((mask & ~torch.isfinite(logp)).sum())
    if bad:
        raise ValueError(
            f"fused_linear_pama_loss: the log-probabilities computed from `hidden` and `weight` (and `bias`) "
            f"are non-finite at {bad} masked position(s); check them for inf/NaN, or pass nonfinite='mask' "
            "to drop such tokens"
        )


def _one_pass(p: _Passes, dropped: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """(loss, logp [B*T], lse [B*T]) of the ``token`` loss; its gradients into ``p``.
    ``dropped`` [B*T] bool: rows known to have non-finite logits, left out of the loss, the
    normalisers and the gradients; None: every row assumed finite."""
    x, opt = p.x, p.opt
    b, t = x.batch, x.time
    acc = p.acc
    adv = reference.per_token(x.advantages, (b, t)).reshape(b * t, -1)
    old = x.old_logp.reshape(-1)
    mask = x.mask.reshape(-1)
    valid = mask & torch.isfinite(old) & torch.isfinite(adv).all(-1)
    if dropped is not None:
        valid = valid & ~dropped
    row_scale = reference._row_scale(valid.view(b, t).to(torch.float64).sum(1), opt.loss_agg)
    r = row_scale[:, None].expand(b, t).reshape(-1).to(acc)
    if opt.kl_coef > 0:
        ref = x.ref_logp.reshape(-1).to(acc)
        kl_valid = mask & torch.isfinite(ref)
        if dropped is not None:
            kl_valid = kl_valid & ~dropped
        kl_scale = opt.kl_coef / kl_valid.sum().clamp_min(1).to(acc)
    zero = torch.zeros((), dtype=acc, device=x.hidden.device)
    logp = torch.empty(p.rows, dtype=acc, device=x.hidden.device)
    lse_all = torch.empty_like(logp)
    loss = torch.zeros((), dtype=torch.float64, device=x.hidden.device)
    kl_sum = torch.zeros((), dtype=torch.float64, device=x.hidden.device)
    for lo, hi in p.ranges():
        logits = p.logits(lo, hi)
        lp, lse = p.logp_lse(lo, hi, logits)
        logp[lo:hi], lse_all[lo:hi] = lp, lse
        v = valid[lo:hi]
        u, ind, m, _a, _v, _ = reference._token_terms(lp[None], old[lo:hi][None], adv[lo:hi][None], v[None], opt.clip_eps, acc)
        s = reference._token_s(adv[lo:hi][None], v[None], acc)[0]
        rc = r[lo:hi]
        loss -= (rc * s * m[0]).to(torch.float64).sum()
        g = -rc * s * torch.where(ind[0], u[0], zero)
        if opt.kl_coef > 0:
            kv = kl_valid[lo:hi]
            d = torch.where(kv, ref[lo:hi] - lp, zero)
            ed = torch.exp(d)
            kl_sum += torch.where(kv, ed - d - 1, zero).to(torch.float64).sum()
            g = g + torch.where(kv, kl_scale * (1 - ed), zero)
        p.backprop(lo, hi, lse, g, None if dropped is None else dropped[lo:hi], logits=logits)
        del logits
    if opt.kl_coef > 0:
        loss = loss + kl_sum * kl_scale.to(torch.float64)
    return loss.to(acc), logp, lse_all


def token_pass(x: FusedInputs, opt: LossOptions, need) -> Tuple[Tensor, Tensor, tuple]:
    """(loss, logp [B, T], (dL/dhidden [B*T, H], dL/dweight, dL/dbias)) of the ``token`` loss
    in one pass; a gradient None when not needed. ``nonfinite="raise"`` raises on a
    non-finite ``old_logp``/``advantages``/``ref_logp`` or logit row at a masked position."""
    mask = x.mask.reshape(-1)
    if opt.nonfinite == "raise":
        old_ok = torch.isfinite(x.old_logp)
        adv_ok = torch.isfinite(reference.per_token(x.advantages, (x.batch, x.time))).all(-1)
        reference.raise_nonfinite([0, int((x.mask & ~old_ok).sum()), int((x.mask & ~adv_ok).sum())])
        if opt.kl_coef > 0:
            raise_nonfinite_ref(x.ref_logp, x.mask)
    p = _Passes(x, opt, *need)
    loss, logp, lse = _one_pass(p, None)
    bad = ~(torch.isfinite(lse) & torch.isfinite(logp))
    if bool(bad.any()):  # the one sync of the default path
        if opt.nonfinite == "raise":
            raise_nonfinite_logp(logp, mask)
        p = _Passes(x, opt, *need)
        loss, logp, lse = _one_pass(p, bad)
    return loss, logp.view(x.batch, x.time), p.grads()
