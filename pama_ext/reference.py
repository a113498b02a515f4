"""Pure-PyTorch definition of PAMA: the readable maths, the fallback backend and the oracle.

Everything here follows ``shared/PAMA.md`` (restated in ``csrc/README.md``) and runs in any
floating dtype, float64 included, on any device. The fused kernels (C++, CUDA, Triton)
are tested against these functions.

Two layers:

* ``theorem1``, ``min_norm_weights``: the closed-form / exact weight solvers.
* ``fused_forward`` / ``fused_backward``: the exact contract of the fused op
  (same inputs, outputs and statistics as ``pama_ext._C.pama_forward``), and
  ``pama_loss``: the same loss written the obvious way, differentiated by autograd.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor

GRANULARITIES = ("batch", "token", "sequence", "batch_mean", "sequence_gram")
# The granularity every public entry point uses when none is given: Theorem 1 on each
# token's scalars, chosen by the fidelity sweep (benchmarks/FIDELITY.md; README, "Decisions").
DEFAULT_GRANULARITY = "token"
LOSS_AGGS = ("token_mean", "seq_mean_token_mean")
STATS_FIELDS = (
    "masked_tokens",
    "clipped_tokens",
    "nonfinite_logp",
    "nonfinite_old_logp",
    "nonfinite_advantages",
    "objective",
    "kkt_residual",
    "nonempty_rows",
)

# Relative tolerances of the solvers (the same numbers as csrc/pama_math.h).
_DEN_TOL = 1e-12  # N = 2: a denominator this small (relative) means v1 == v2
_DUP_TOL = 1e-12  # ||v_i - v_j||^2 this small (relative) means a duplicated objective
_STOP_TOL = 1e-12  # Wolfe: stop when ||x||^2 - min_j <x, v_j> is this small (relative)


# --------------------------------------------------------------------------- Theorem 1
def theorem1(a: Tensor) -> Tensor:
    """Weights c on the simplex minimising (sum_i c_i a_i)^2, along the last dimension.

    All positive: one-hot on the argmin; all negative: one-hot on the argmax; mixed signs:
    uniform over the zeros if there are any, else the two-point solution on
    (argmin, argmax) with sum_i c_i a_i = 0. Exact ties share the weight equally.
    Returns float64.
    """
    a = a.to(torch.float64)
    lo = a.amin(dim=-1, keepdim=True)
    hi = a.amax(dim=-1, keepdim=True)
    at_lo = (a == lo).to(a.dtype)
    at_hi = (a == hi).to(a.dtype)
    at_zero = (a == 0).to(a.dtype)

    def uniform(sel: Tensor) -> Tensor:
        return sel / sel.sum(dim=-1, keepdim=True).clamp_min(1)

    pos = uniform(at_lo)
    neg = uniform(at_hi)
    zero = uniform(at_zero)
    span = (hi - lo).clamp_min(torch.finfo(a.dtype).tiny)
    two_point = uniform(at_lo) * (hi / span) + uniform(at_hi) * (-lo / span)
    mixed = torch.where(at_zero.sum(-1, keepdim=True) > 0, zero, two_point)
    return torch.where(lo > 0, pos, torch.where(hi < 0, neg, mixed))


# --------------------------------------------------------------------------- min-norm
def _split_duplicates(gram: Tensor, c: Tensor) -> Tensor:
    """Objectives with the same advantage vector share their group's weight equally."""
    n = gram.shape[0]
    diag = torch.diagonal(gram)
    dist = diag[:, None] + diag[None, :] - 2 * gram
    scale = torch.maximum(diag[:, None], diag[None, :])
    same = (dist <= _DUP_TOL * scale).tolist()
    group = list(range(n))
    for i in range(n):
        for j in range(i):
            if same[i][j]:
                group[i] = group[j]
                break
    out = c.clone()
    for g in set(group):
        members = [i for i in range(n) if group[i] == g]
        if len(members) > 1:
            out[members] = c[members].sum() / len(members)
    return out


def _affine_minimiser(gs: Tensor) -> Tensor:
    """Weights mu (sum 1) of the min-norm point of the affine hull of the corral."""
    k = gs.shape[0]
    kkt = gs.new_zeros(k + 1, k + 1)
    kkt[:k, :k] = gs
    kkt[:k, k] = 1
    kkt[k, :k] = 1
    rhs = gs.new_zeros(k + 1)
    rhs[k] = 1
    return torch.linalg.solve(kkt, rhs)[:k]


def _wolfe(gram: Tensor) -> Tensor:
    """Wolfe's min-norm-point algorithm over points known only through their Gram matrix."""
    n = gram.shape[0]
    diag = torch.diagonal(gram)
    tol = _STOP_TOL * float(diag.max())
    start = int(torch.argmin(diag))
    corral = [start]
    lam = gram.new_zeros(n)
    lam[start] = 1.0
    for _ in range(50 * n + 50):
        g_lam = gram @ lam
        xx = float(lam @ g_lam)
        j = int(torch.argmin(g_lam))
        if xx - float(g_lam[j]) <= tol or j in corral:
            break
        corral.append(j)
        while True:  # minor cycle: move towards the affine minimiser of the corral
            idx = torch.tensor(corral)
            try:
                mu = _affine_minimiser(gram[idx][:, idx])
            except RuntimeError:  # affinely dependent corral: numerically at the optimum
                corral.pop()
                break
            if bool((mu > 0).all()):
                lam.zero_()
                lam[idx] = mu
                break
            lam_s = lam[idx]
            shrinking = mu <= 0
            theta = float((lam_s[shrinking] / (lam_s[shrinking] - mu[shrinking])).min())
            new = (1 - theta) * lam_s + theta * mu
            # the point(s) that reach zero leave the corral (at least the arg of theta)
            leaving = int(torch.argmin(torch.where(shrinking, new, torch.full_like(new, math.inf))))
            keep = [k for k in range(len(corral)) if k != leaving and new[k] > 0]
            lam.zero_()
            lam[idx[keep]] = new[keep] / new[keep].sum()
            corral = [corral[k] for k in keep]
    return lam


def min_norm_weights(gram: Tensor) -> Tensor:
    """argmin over the simplex of c^T G c, exactly, in float64 (the reference solver)."""
    gram = gram.detach().to(device="cpu", dtype=torch.float64)
    gram = 0.5 * (gram + gram.T)  # symmetrise the accumulation noise
    n = gram.shape[0]
    diag = torch.diagonal(gram)
    if n == 1:
        return gram.new_ones(1)
    if float(diag.max()) <= 0.0:  # every advantage vector is zero: all c are optimal
        return gram.new_full((n,), 1.0 / n)
    if n == 2:
        g11, g12, g22 = float(gram[0, 0]), float(gram[0, 1]), float(gram[1, 1])
        den = g11 + g22 - 2 * g12
        if den <= _DEN_TOL * max(g11, g22):
            return gram.new_full((2,), 0.5)
        g = min(max((g22 - g12) / den, 0.0), 1.0)
        return torch.tensor([g, 1.0 - g], dtype=torch.float64)
    return _split_duplicates(gram, _wolfe(gram))


def kkt_residual(gram: Tensor, c: Tensor) -> float:
    """max(0, c^T G c - min_j (G c)_j): 0 exactly at the simplex-constrained minimum."""
    g_c = gram.to(torch.float64) @ c.to(torch.float64)
    return max(0.0, float(c.to(torch.float64) @ g_c - g_c.min()))


# --------------------------------------------------------------------------- per-token maths
def per_token(advantages: Tensor, shape) -> Tensor:
    """Advantages as [B, T, N]: per-token ones as they are, per-sequence [B, N] broadcast
    over the response (a view, no copy)."""
    b, t = shape
    return advantages if advantages.dim() == 3 else advantages[:, None, :].expand(b, t, -1)


def finite_flags(logp: Tensor, old_logp: Tensor, advantages: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """[B, T] bool: finite logp, finite old_logp, every objective's advantage finite (the
    three counts of the ``nonfinite`` contract, in ``NONFINITE_ARGS`` order)."""
    return (torch.isfinite(logp), torch.isfinite(old_logp),
            torch.isfinite(per_token(advantages, logp.shape)).all(dim=-1))


def _token_terms(logp, old_logp, advantages, mask, clip_eps, acc):
    """Ratio, clip indicator, min(u, 1+eps), Noon advantages and validity, in dtype ``acc``."""
    adv = per_token(advantages, logp.shape)
    finite_lp, finite_old, finite_adv = finite_flags(logp, old_logp, advantages)
    valid = mask & finite_lp & finite_old & finite_adv
    lp = logp.to(acc)
    u = torch.exp(lp - old_logp.to(acc))
    ind = u <= 1 + clip_eps
    m = torch.clamp(u, max=1 + clip_eps)
    a_noon = torch.clamp(adv.to(acc), min=0)
    # zero what invalid tokens carry so that sums over them are exactly 0, never NaN
    a_noon = torch.where(valid[..., None], a_noon, torch.zeros((), dtype=acc))
    m = torch.where(valid, m, torch.zeros((), dtype=acc))
    u = torch.where(valid, u, torch.zeros((), dtype=acc))
    ind = ind & valid
    return u, ind, m, a_noon, valid, (finite_lp, finite_old, finite_adv)


def token_advantage(adv: Tensor) -> Tensor:
    """s_t of ``granularity="token"`` from the raw (un-clamped) advantages ``[..., N]``.

    Objectives whose advantage is exactly 0 (-0.0 included) abstain: s_t = 0 if some
    A_i < 0, else the smallest positive A_i, and 0 when every A_i is 0. Computed as the min
    over i of key(A_i) = A_i (A_i > 0), 0 (A_i < 0), +inf (A_i == 0), with +inf (every
    objective abstains) mapped to 0: the same formula as the kernels (pama_math.h).
    Without exact zeros this is min_i max(A_i, 0) bit for bit.
    """
    zero = torch.zeros((), dtype=adv.dtype, device=adv.device)
    inf = torch.full((), math.inf, dtype=adv.dtype, device=adv.device)
    key = torch.where(adv > 0, adv, torch.where(adv < 0, zero, inf))
    mn = key.amin(dim=-1)
    return torch.where(mn < math.inf, mn, zero)


def token_weights(adv: Tensor) -> Tensor:
    """Per-token weights of ``granularity="token"`` ``[..., N]`` (float64): uniform over the
    objectives with A_i < 0 if any; else uniform over the positive A_i equal to their min;
    else (all exactly 0) uniform 1/N. sum_i c_i max(A_i, 0) == token_advantage(adv)."""
    a = adv.to(torch.float64)
    neg = a < 0
    pos = a > 0
    s = token_advantage(a)
    at_min = pos & (a == s[..., None])
    any_neg = neg.any(dim=-1, keepdim=True)
    any_pos = pos.any(dim=-1, keepdim=True)
    sel = torch.where(any_neg, neg, torch.where(any_pos, at_min, torch.ones_like(neg)))
    sel = sel.to(torch.float64)
    return sel / sel.sum(dim=-1, keepdim=True).clamp_min(1)


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


NONFINITE_ARGS = ("logp", "old_logp", "advantages")


def raise_nonfinite(counts, fn: str = "pama_loss") -> None:
    """The ``nonfinite="raise"`` contract, one message for every backend: a ValueError that
    names the first of logp, old_logp, advantages with non-finite values at masked-in
    positions. ``counts``: those three counts (numbers, already on the host)."""
    for name, bad in zip(NONFINITE_ARGS, counts):
        if bad:
            raise ValueError(
                f"{fn}: `{name}` has {int(bad)} non-finite value(s) at masked positions; "
                "pass nonfinite='mask' to drop such tokens instead"
            )


def valid_tokens(x, nonfinite: str, fn: str) -> Tensor:
    """mask & finite(logp, old_logp, every advantage) of validated ``LossInputs``; with
    ``nonfinite="raise"`` raises if that drops a masked token (one host sync)."""
    flags = finite_flags(x.logp, x.old_logp, x.advantages)
    valid = x.mask & flags[0] & flags[1] & flags[2]
    if nonfinite == "raise" and not bool(torch.equal(valid, x.mask)):  # one check; details if it fails
        raise_nonfinite([int((x.mask & ~ok).sum()) for ok in flags], fn)
    return valid


def _check_finite(mask, finite_flags):
    raise_nonfinite([int((mask & ~ok).sum()) for ok in finite_flags])


def _row_scale(m_b: Tensor, loss_agg: str) -> Tensor:
    if loss_agg == "token_mean":
        total = m_b.sum()
        return torch.where(total > 0, 1 / total.clamp_min(1), 0.0).expand_as(m_b).clone()
    nonempty = (m_b > 0).sum()
    return torch.where(m_b > 0, 1 / (nonempty.clamp_min(1) * m_b.clamp_min(1)), 0.0)


def fused_forward(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    granularity: str,
    loss_agg: str,
    check_finite: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reference of the fused forward: (loss, weights, row_scale, stats); see csrc/README.md."""
    acc = _acc_dtype(logp)
    mask = mask.bool()
    u, ind, m, a_noon, valid, flags = _token_terms(logp, old_logp, advantages, mask, clip_eps, acc)
    if check_finite:
        _check_finite(mask, flags)
    dd = torch.float64  # every sum accumulates in double
    vd = valid.to(dd)
    n = a_noon.shape[-1]
    b = logp.shape[0]
    m_b = vd.sum(dim=1)
    big_m = m_b.sum()
    i_adv = torch.where(ind[..., None], a_noon, torch.zeros((), dtype=acc)).to(dd)
    surr = (a_noon * m[..., None]).to(dd).sum(dim=1)  # S_{b,i}: [B, N]
    objective = 0.0
    kkt = 0.0
    if granularity == "batch":
        flat = i_adv.reshape(-1, n)
        gram = flat.T @ flat
        c = min_norm_weights(gram).to(logp.device)
        weights = c
        objective = float(c @ gram @ c)
        kkt = kkt_residual(gram, c)
    elif granularity == "batch_mean":
        a = i_adv.sum(dim=(0, 1)) / big_m.clamp_min(1)
        weights = theorem1(a)
        objective = float((weights @ a) ** 2)
    elif granularity == "sequence":
        a = i_adv.sum(dim=1) / m_b.clamp_min(1)[:, None]
        weights = theorem1(a)
        nonempty = m_b > 0
        per_row = (weights * a).sum(-1) ** 2
        objective = float(per_row[nonempty].mean()) if bool(nonempty.any()) else 0.0
    elif granularity == "sequence_gram":
        # each response counts once: v_b = row b's masked mean of I (0 for an empty row),
        # G = sum_b v_b v_b^T, then the exact solver of `batch`
        v = i_adv.sum(dim=1) / m_b.clamp_min(1)[:, None]
        gram = v.T @ v
        c = min_norm_weights(gram).to(logp.device)
        weights = c
        objective = float(c @ gram @ c)
        kkt = kkt_residual(gram, c)
    elif granularity == "token":
        weights = None  # the per-token gradient factor, below
    else:
        raise ValueError(f"unknown granularity {granularity!r}")
    row_scale = _row_scale(m_b, loss_agg)
    if granularity == "token":
        s_tok = _token_s(advantages, valid, acc)
        per_row = (s_tok * m).to(dd).sum(dim=1)
        weights = token_factor(s_tok, u, ind)
    elif granularity == "sequence":
        per_row = (weights * surr).sum(-1)
    else:
        per_row = surr @ weights
    loss = -(row_scale * per_row).sum()
    stats = torch.tensor(
        [
            float(big_m),
            float((valid & ~ind).sum()),
            *[float((mask & ~f).sum()) for f in flags],
            objective,
            kkt,
            float((m_b > 0).sum()),
        ],
        dtype=dd,
    )
    return loss.to(acc), weights.to(acc), row_scale.to(acc), stats.to(logp.device)


def _token_s(advantages: Tensor, valid: Tensor, acc: torch.dtype) -> Tensor:
    """token_advantage of the raw advantages in dtype ``acc``, [B, T]; 0 at invalid tokens."""
    s = token_advantage(per_token(advantages, valid.shape).to(acc))
    return torch.where(valid, s, torch.zeros((), dtype=acc, device=s.device))


def token_factor(s: Tensor, u: Tensor, ind: Tensor) -> Tensor:
    """The per-token gradient factor ``f_t = s_t * u_t * 1[u_t <= 1+eps]`` (0 at invalid and
    clipped tokens; a select, so u = inf gives 0), [B, T] in the per-token precision: what the
    fused forward returns as ``weights`` for ``granularity="token"``, so that the backward
    reads 4 bytes a token instead of recomputing s_t from the inputs (csrc/README.md)."""
    return torch.where(ind, s * u, torch.zeros((), dtype=s.dtype, device=s.device))


def token_factor_backward(grad_loss: Tensor, factor: Tensor, row_scale: Tensor, dtype: torch.dtype) -> Tensor:
    """dL/dlogp of ``granularity="token"`` from the forward's factor: ``-(g r_b) f_t``, in the
    factor's precision, written once in ``dtype`` (one elementwise pass on every device, no
    host synchronisation). The autograd of every backend's fused op uses it."""
    acc = factor.dtype
    coef = -(grad_loss.to(acc) * row_scale.to(acc))
    out = torch.empty(factor.shape, dtype=dtype, device=factor.device)
    return torch.mul(factor, coef[:, None], out=out)


def combined_advantage(a_noon: Tensor, weights: Tensor, granularity: str, advantages: Tensor = None) -> Tensor:
    """s_t = sum_i c_i A_i with the weights at the granularity. For ``token`` it is
    ``token_advantage`` of the raw ``advantages`` [B, T, N] (required: the Noon-clamped
    a_noon has lost the signs), zero-abstaining min (see token_advantage)."""
    if granularity == "token":
        if advantages is None:
            raise ValueError("combined_advantage: granularity='token' needs the raw advantages")
        return token_advantage(advantages.to(a_noon.dtype))
    if granularity == "sequence":
        return (a_noon * weights[:, None, :].to(a_noon.dtype)).sum(-1)
    return a_noon @ weights.to(a_noon.dtype)


def fused_backward(
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
    """Reference of the fused backward: dL/dlogp = -g r_b s_t u_t 1[u_t <= 1+eps]."""
    acc = _acc_dtype(logp)
    u, ind, _m, a_noon, valid, _ = _token_terms(logp, old_logp, advantages, mask.bool(), clip_eps, acc)
    if granularity == "token":
        s = _token_s(advantages, valid, acc)
    else:
        s = combined_advantage(a_noon, weights.to(acc), granularity)
    du = torch.where(ind, u, torch.zeros((), dtype=acc))  # a select: u = inf gives 0, not NaN
    grad = -grad_loss.to(acc) * row_scale.to(acc)[:, None] * s * du
    return grad.to(logp.dtype)


# --------------------------------------------------------------------------- the loss, plainly
def pama_weights(logp, old_logp, advantages, mask, clip_eps=0.2, granularity=DEFAULT_GRANULARITY) -> Tensor:
    """The weights PAMA uses: [N] (batch, batch_mean, sequence_gram), [B, N] (sequence), [B, T, N] (token)."""
    with torch.no_grad():
        if granularity == "token":
            return token_weights(per_token(advantages, logp.shape)).to(_acc_dtype(logp))
        _, weights, _, _ = fused_forward(
            logp, old_logp, advantages, mask, clip_eps, granularity, "token_mean", False
        )
        return weights


def pama_loss_and_stats(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    granularity: str = DEFAULT_GRANULARITY,
    loss_agg: str = "token_mean",
    check_finite: bool = True,
):
    """The Noon-PPO loss of the PAMA-combined advantage, written as PPO code would write it.

    Returns ``(loss, weights, row_scale, stats)`` as the fused op does (csrc/README.md; for
    ``token`` the weights are the [B, T] gradient factor, which ``functional`` reports as an
    empty [0]). The weights carry no gradient (the indicator they depend on is piecewise
    constant, so this is the exact gradient almost everywhere); autograd differentiates the
    rest.
    """
    acc = _acc_dtype(logp)
    mask = mask.bool()
    adv = per_token(advantages, logp.shape)
    flags = finite_flags(logp, old_logp, advantages)
    valid = mask & flags[0] & flags[1] & flags[2]
    if check_finite:
        _check_finite(mask, flags)
    with torch.no_grad():
        _, weights, row_scale, stats = fused_forward(
            logp, old_logp, advantages, mask, clip_eps, granularity, loss_agg, False
        )
    zero = torch.zeros((), dtype=acc, device=logp.device)
    if granularity == "token":
        s = _token_s(adv.detach(), valid, acc)
    else:
        a_noon = torch.where(valid[..., None], torch.clamp(adv.detach().to(acc), min=0), zero)
        s = combined_advantage(a_noon, weights, granularity)
    # invalid tokens must not reach the graph: a NaN logp would poison the gradient via 0 * NaN
    lp = torch.where(valid, logp.to(acc), zero)
    old = torch.where(valid, old_logp.detach().to(acc), zero)
    log_ratio = lp - old
    # A clipped token (u > 1+eps) has no gradient and a loss of (1+eps) s whatever u is; cap
    # its log-ratio, detached, so that an overflowing exp cannot turn 0 * inf into NaN.
    clipped_tok = log_ratio.detach() > math.log1p(clip_eps) + 1.0
    log_ratio = torch.where(clipped_tok, log_ratio.detach().clamp(max=30.0), log_ratio)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    token_loss = -torch.minimum(ratio * s, clipped * s)
    loss = (token_loss * row_scale[:, None] * valid).sum()
    return loss, weights, row_scale, stats


def pama_loss(logp, old_logp, advantages, mask, clip_eps=0.2, granularity=DEFAULT_GRANULARITY,
              loss_agg="token_mean", check_finite=True) -> Tensor:
    """The scalar loss of ``pama_loss_and_stats``."""
    return pama_loss_and_stats(
        logp, old_logp, advantages, mask, clip_eps, granularity, loss_agg, check_finite
    )[0]


# --------------------------------------------------------------------------- batch statistics
# Below this many multiply-adds a Gram is summed elementwise instead of by a BLAS GEMM: a
# skinny GEMM ([N, K] x [K, N], N small) gains nothing from threads, and a threaded BLAS call
# on a busy machine can wait milliseconds for its worker threads (measured: 25 ms for
# N = 2, K = 512 on a loaded 2-core VM, against 7 us single-threaded and 40 us elementwise).
_ELEMENTWISE_GRAM_MAX = 1 << 18


def _gram(rows: Tensor, weights: Tensor = None) -> Tensor:
    """sum_k w_k r_k r_k^T of rows [K, N] (float64), elementwise when small, GEMM otherwise."""
    k, n = rows.shape
    if k * n * n <= _ELEMENTWISE_GRAM_MAX:
        left = rows if weights is None else rows * weights[:, None]
        return (left[:, :, None] * rows[:, None, :]).sum(dim=0)
    right = rows if weights is None else rows * weights[:, None]
    return rows.T @ right


def _weighted_sum(rows: Tensor, weights: Tensor = None) -> Tensor:
    """sum_k w_k r_k of rows [K, N], without a BLAS call."""
    return rows.sum(dim=0) if weights is None else (rows * weights[:, None]).sum(dim=0)


def batch_statistics(logp, old_logp, advantages, mask, clip_eps: float, granularity: str) -> Tuple[Tensor, Tensor]:
    """The contract of ``pama_ext::pama_statistics`` (``pama_ext.statistics``): the sufficient
    statistics ``[M, clipped, Q_1..Q_N, G_11..G_NN]`` (float64) of one batch for ``batch``
    (token Gram), ``sequence_gram`` (Gram of the per-response means) or ``batch_mean`` (G = 0),
    over the valid tokens (masked, every input finite), and the non-finite counts of logp,
    old_logp, advantages at masked positions (float64 [3]). Per-token maths in the inputs'
    accumulation precision, sums in float64."""
    acc = _acc_dtype(logp)
    dd = torch.float64
    n = advantages.shape[-1]
    flags = finite_flags(logp, old_logp, advantages)
    nonfinite = torch.stack([(mask & ~ok).sum() for ok in flags]).to(dd)
    valid = mask & flags[0] & flags[1] & flags[2]
    u = torch.exp(logp.to(acc) - old_logp.to(acc))
    ind = (u <= 1 + clip_eps) & valid  # the clip indicator, in the per-token precision
    out = torch.zeros(2 + n + n * n, dtype=dd, device=logp.device)
    m_b = valid.sum(dim=1).to(dd)  # valid tokens per response
    out[0] = valid.sum()
    out[1] = (valid & ~ind).sum()
    zero = torch.zeros((), dtype=acc, device=logp.device)
    a_noon = torch.clamp(advantages.to(acc), min=0)
    if advantages.dim() == 2:
        # per-sequence advantages: I_t = ind_t a_b, so sums over t are counts k_b = sum_t ind_t
        a_b = torch.where(ind.any(dim=1, keepdim=True), a_noon, zero).to(dd)  # drop non-finite rows
        k_b = ind.sum(dim=1).to(dd)
        out[2 : 2 + n] = _weighted_sum(a_b, k_b)
        if granularity == "batch":
            out[2 + n :] = _gram(a_b, k_b).reshape(-1)
        elif granularity == "sequence_gram":  # v_b = a_b k_b / M_b (0 for an empty row)
            out[2 + n :] = _gram(a_b * (k_b / m_b.clamp_min(1))[:, None]).reshape(-1)
    else:
        i_adv = torch.where(ind[..., None], a_noon, zero).to(dd)
        if granularity == "sequence_gram":  # v_b = row b's mean of I over its valid tokens
            out[2 + n :] = _gram(i_adv.sum(dim=1) / m_b.clamp_min(1)[:, None]).reshape(-1)
        i_adv = i_adv.reshape(-1, n)
        out[2 : 2 + n] = _weighted_sum(i_adv)
        if granularity == "batch":
            out[2 + n :] = _gram(i_adv).reshape(-1)
    return out, nonfinite
