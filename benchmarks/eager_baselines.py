"""Lean plain-PyTorch eager baselines for the CPU loss benchmark, and the shared inputs.

``lean_pama_loss`` is the fastest eager implementation of the PAMA loss we could write
for ``granularity='batch'``, ``loss_agg='token_mean'`` (float32), to compare the fused C++
op against something better than the library's readable ``torch`` backend
(``pama_ext.reference``). It is the same maths as ``shared/PAMA.md``:

    u = exp(logp - old_logp)                 (the only differentiable path)
    keep = mask & (u <= 1 + eps)             (the clip indicator of I(A))
    A = max(adv, 0)                          (Noon clamp)
    G = (A * keep)^T (A * keep)              (one matmul over the tokens)
    c = pama_ext.min_norm_weights(G)         (the exact solve on the tiny N x N Gram)
    s = A @ c                                (combined advantage)
    loss = -(1/M) sum_mask s * min(u, 1 + eps)

Where it saves work compared with the obvious code:

* The surrogate is linear in ``s`` and ``min(u, 1+eps)`` is constant on clipped tokens, so
  the loss splits into a differentiable part ``-(1/M) sum_keep s_t u_t`` (a single dot
  product with ``u`` in the autograd graph: sub, exp_, dot) and a constant
  ``-(1+eps)/M * c . (sum over clipped tokens of A_t)``. Autograd then builds the gradient
  ``-(1/M) s_t u_t 1[keep]`` with two elementwise passes, nothing of size B*T*N saved.
* Tokens are processed in chunks of ~2M advantage elements (8 MB in float32): a
  temporary of 32 MB or more is mmap'ed fresh by glibc on every call and page-faulted
  in, which on a 1M-token, N = 8 batch costs more than the arithmetic. ``A`` is recomputed
  in the second pass (s = A @ c) rather than stored.

Assumptions (the library checks these; this baseline does not): ``logp``, ``old_logp`` and
``advantages`` are finite everywhere (padding included), ``advantages`` is [B, T, N] and
every tensor is contiguous.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import Tensor

import pama_ext

CHUNK_ELEMS = 1 << 21  # advantage elements per chunk: 8 MB of float32 temporaries


def make_inputs(b: int, t: int, n: int, *, seed: int = 0, dtype=torch.float32) -> Dict[str, Tensor]:
    """Benchmark inputs: ragged rows (each row's response fills 80-100% of T, ~90% on
    average), logp = old_logp + N(0, 0.15^2) so ~10% of tokens have u > 1.2 (clipped),
    independent standard-normal per-token advantages [B, T, N] (about half negative)."""
    g = torch.Generator().manual_seed(seed)
    old_logp = -3.0 * torch.rand(b, t, generator=g) - 0.05
    logp = old_logp + 0.15 * torch.randn(b, t, generator=g)
    advantages = torch.randn(b, t, n, generator=g)
    lengths = torch.randint(int(0.8 * t), t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    return {
        "logp": logp.to(dtype).contiguous(),
        "old_logp": old_logp.to(dtype).contiguous(),
        "advantages": advantages.to(dtype).contiguous(),
        "mask": mask.contiguous(),
    }


def lean_pama_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    chunk_elems: int = CHUNK_ELEMS,
) -> Tensor:
    """PAMA loss, granularity='batch', loss_agg='token_mean', as lean eager PyTorch."""
    b, t, n = advantages.shape
    # differentiable part of the graph: sub -> exp_ (in place, saves its result)
    u = (logp - old_logp.detach()).exp_()
    with torch.no_grad():
        keep = u <= 1 + clip_eps
        keep &= mask
        clipped = mask & ~keep
        m = int(mask.sum())
        inv_m = 1.0 / max(m, 1)
        adv = advantages.detach().view(-1, n)
        keep_flat, clip_flat = keep.view(-1), clipped.view(-1)
        total = adv.shape[0]
        step = max(1, chunk_elems // n)
        gram = adv.new_zeros(n, n)
        sum_clipped = adv.new_zeros(n)
        for lo in range(0, total, step):
            hi = lo + step
            a = adv[lo:hi].clamp_min(0)  # Noon clamp
            sum_clipped += clip_flat[lo:hi].to(a.dtype) @ a
            a.mul_(keep_flat[lo:hi, None])  # I(A): zero where clipped or masked out
            gram += a.T @ a
        c = pama_ext.min_norm_weights(gram.double()).to(adv.dtype)
        w = torch.empty(total, dtype=adv.dtype)
        for lo in range(0, total, step):
            hi = lo + step
            torch.mv(adv[lo:hi].clamp_min(0), c, out=w[lo:hi])
            w[lo:hi].mul_(keep_flat[lo:hi])  # s_t on kept tokens, 0 elsewhere
        w.mul_(inv_m)
        const = (1 + clip_eps) * inv_m * torch.dot(c, sum_clipped)
    return -(torch.dot(w, u.view(-1)) + const)


def _loss_and_grad(fn, inputs: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:
    logp = inputs["logp"].detach().clone().requires_grad_(True)
    loss = fn(logp, inputs["old_logp"], inputs["advantages"], inputs["mask"])
    loss.backward()
    return loss.detach(), logp.grad


def check_lean_against_pama(inputs: Dict[str, Tensor], rtol: float = 1e-4, backend: str = "torch") -> dict:
    """Assert that ``lean_pama_loss`` agrees with ``pama_ext.pama_loss`` (loss and gradient).

    Loss: relative error <= rtol. Gradient: max |g - g_ref| <= rtol * max |g_ref| (an
    elementwise relative error is meaningless where the gradient is ~0). Returns the errors.
    """
    ref_loss, ref_grad = _loss_and_grad(
        lambda lp, old, adv, mask: pama_ext.pama_loss(lp, old, adv, mask, granularity="batch", backend=backend),
        inputs,
    )
    loss, grad = _loss_and_grad(lean_pama_loss, inputs)
    loss_err = abs(float(loss) - float(ref_loss)) / max(abs(float(ref_loss)), 1e-30)
    scale = float(ref_grad.abs().max())
    grad_err = float((grad - ref_grad).abs().max()) / max(scale, 1e-30)
    assert loss_err <= rtol, f"lean eager loss {float(loss)} vs pama_loss[{backend}] {float(ref_loss)}: rel err {loss_err:.3g}"
    assert grad_err <= rtol, f"lean eager grad differs from pama_loss[{backend}]: max err / max |g| = {grad_err:.3g}"
    return {"loss_rel_err": loss_err, "grad_rel_err": grad_err, "backend": backend}
