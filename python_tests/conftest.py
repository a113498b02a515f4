"""Shared fixtures and helpers of the pama_ext test-suite.

* ``BACKENDS``: the loss/weights backends usable in this process (``pama_ext.available_backends()``),
  so every backend-parametrised test covers ``cpp`` as soon as the extension is built.
* ``make_inputs``: deterministic PPO-like inputs (ratios straddling 1 +- eps, advantages of
  both signs, several mask layouts), already rounded to the requested dtype.
* ``with_exact_zeros``: the same inputs with exact zeros (+0.0, -0.0, whole columns) in the
  advantages, the cases where ``token``'s objectives abstain.
* ``upcast``: the same (rounded) inputs in float64, for comparisons against the float64
  reference computed on exactly the values the low-precision backend saw.
* ``python_tests/oracle.py``: one backend call compared with a float64 oracle (loss,
  gradient, weights, statistics), for the reference and the Triton kernel tests.
* hypothesis profile ``ci`` (deadline=None, modest max_examples), registered and loaded.
  ``HYPOTHESIS_PROFILE=dev`` selects a longer run.
"""

from __future__ import annotations

import itertools
import math
import os
from typing import NamedTuple

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

import pama_ext

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=20,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# the tests here build CPU tensors: keep the backends that run on CPU (GPU backends have
# their own test files, which skip cleanly without a GPU)
BACKENDS = [
    b for b in pama_ext.available_backends() if b == "torch" or "cpu" in pama_ext._backends._REGISTRY[b].devices
]
GRANULARITIES = tuple(pama_ext.GRANULARITIES)
LOSS_AGGS = tuple(pama_ext.LOSS_AGGS)
FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
MASK_KINDS = ("full", "ragged", "empty", "random")
CLIP_EPS = 0.2

assert "torch" in BACKENDS, "the pure-PyTorch backend must always be available"
assert set(GRANULARITIES) == {"batch", "token", "sequence", "batch_mean", "sequence_gram"}
assert set(LOSS_AGGS) == {"token_mean", "seq_mean_token_mean"}


class Inputs(NamedTuple):
    logp: torch.Tensor
    old_logp: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor

    def args(self, logp=None):
        """Positional arguments of pama_loss, optionally with another (leaf) ``logp``."""
        return (self.logp if logp is None else logp, self.old_logp, self.advantages, self.mask)


def make_mask(B: int, T: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """[B, T] bool mask.

    full: all ones. empty: all zeros. random: Bernoulli(0.6), at least one token set.
    ragged: each row is one contiguous response span (a random prompt offset, then a random
    length); with B >= 2 at least one row is empty and at least one is not.
    """
    if kind == "full":
        return torch.ones(B, T, dtype=torch.bool)
    if kind == "empty":
        return torch.zeros(B, T, dtype=torch.bool)
    if kind == "random":
        m = torch.rand(B, T, generator=gen) < 0.6
        m.view(-1)[int(torch.randint(0, B * T, (1,), generator=gen))] = True
        return m
    if kind == "ragged":
        m = torch.zeros(B, T, dtype=torch.bool)
        lengths = torch.randint(0, T + 1, (B,), generator=gen)
        lengths[0] = max(1, int(lengths[0]))  # never an all-empty "ragged" batch
        if B >= 2:
            lengths[int(torch.randint(1, B, (1,), generator=gen))] = 0  # some row empty
        for b in range(B):
            length = int(lengths[b])
            start = int(torch.randint(0, T - length + 1, (1,), generator=gen))
            m[b, start : start + length] = True
        return m
    raise ValueError(f"unknown mask kind {kind!r}")


def make_inputs(
    B: int,
    T: int,
    N: int,
    dtype: torch.dtype = torch.float64,
    per_sequence: bool = False,
    mask_kind: str = "ragged",
    seed: int = 0,
    clip_eps: float = CLIP_EPS,
    noise: float = 0.25,
    margin: float = 0.0,
) -> Inputs:
    """Deterministic PPO-like inputs rounded to ``dtype``.

    logp in [-4, 0); old_logp = logp + noise, so u = exp(logp - old_logp) straddles
    [1 - eps, 1 + eps] with a fair share of tokens clipped (u > 1 + eps). advantages are
    [B, T, N] (or [B, N] with ``per_sequence``) of both signs (each objective gets its own
    offset so the objectives disagree). ``margin`` > 0 keeps every |u - (1 + eps)| above it
    (for finite-difference checks, the clip indicator being discontinuous).
    """
    gen = torch.Generator().manual_seed(seed)
    logp = -4.0 * torch.rand(B, T, generator=gen, dtype=torch.float64)
    delta = noise * torch.randn(B, T, generator=gen, dtype=torch.float64)
    if margin > 0:
        ln_hi = float(np.log1p(clip_eps))
        close = (delta - ln_hi).abs() < margin  # u near 1 + eps
        away = torch.where(delta >= ln_hi, 2 * margin, -2 * margin)
        delta = torch.where(close, ln_hi + away, delta)
    old_logp = logp - delta  # u = exp(delta)
    shape = (B, N) if per_sequence else (B, T, N)
    offsets = torch.linspace(-0.5, 0.5, N, dtype=torch.float64) if N > 1 else torch.zeros(1, dtype=torch.float64)
    adv = torch.randn(*shape, generator=gen, dtype=torch.float64) + offsets
    mask = make_mask(B, T, mask_kind, gen)
    return Inputs(logp.to(dtype), old_logp.to(dtype), adv.to(dtype), mask)


def with_exact_zeros(x: Inputs, seed: int, frac: float = 0.3, nonneg: bool = False) -> Inputs:
    """``x`` with exact zeros mixed into the advantages: a random ``frac`` of the entries
    (+0.0 or -0.0), one whole objective column (N >= 2), and the first token (or row) all
    zero; ``nonneg``: |A| first, so that the zeros decide many tokens."""
    gen = torch.Generator().manual_seed(seed)
    adv = x.advantages.clone()
    if nonneg:
        adv = adv.abs()
    sel = torch.rand(adv.shape, generator=gen) < frac
    sign = torch.where(torch.rand(adv.shape, generator=gen) < 0.5, 1.0, -1.0).to(adv.dtype)
    adv = torch.where(sel, 0.0 * sign, adv)  # 0.0 * -1.0 = -0.0
    n = adv.shape[-1]
    if n >= 2:
        adv[..., int(torch.randint(0, n, (1,), generator=gen))] = -0.0
    adv.view(-1, n)[0] = 0.0
    return x._replace(advantages=adv)


def upcast(x: Inputs) -> Inputs:
    """The same (already rounded) values in float64."""
    return Inputs(*(t.to(torch.float64) if t.is_floating_point() else t for t in x))


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def loss_and_grad(x: Inputs, **kwargs):
    """(loss, grad wrt logp, PamaStats) of pama_ext.pama_loss_and_stats on ``x``."""
    lp = leaf(x.logp)
    loss, st = pama_ext.pama_loss_and_stats(lp, x.old_logp, x.advantages, x.mask, **kwargs)
    (grad,) = torch.autograd.grad(loss, lp, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(lp)
    return loss.detach(), grad, st


def assert_close_rel(actual, expected, rtol, atol=0.0, msg=""):
    """|actual - expected| <= atol + rtol * max|expected| elementwise (scale-aware), no NaN."""
    a = torch.as_tensor(actual).detach().to(torch.float64).cpu()
    e = torch.as_tensor(expected).detach().to(torch.float64).cpu()
    assert a.shape == e.shape, f"{msg}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert bool(torch.isfinite(a).all()), f"{msg}: non-finite values in {a}"
    scale = float(e.abs().max()) if e.numel() else 0.0
    err = float((a - e).abs().max()) if a.numel() else 0.0
    assert err <= atol + rtol * scale, f"{msg}: max abs error {err:.3g} > {atol:.3g} + {rtol:.3g} * {scale:.3g}"


# Tolerances of a low-precision backend against the float64 reference on the same rounded
# inputs: (loss rtol, grad rtol, weights atol). Per-token maths runs in float32 for every
# non-float64 dtype and every sum in double; the gradient is rounded to logp's dtype.
TOLS = {
    torch.float64: (1e-10, 1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5, 1e-5),
    torch.float16: (2e-5, 2e-3, 1e-5),
    torch.bfloat16: (2e-5, 1.6e-2, 1e-5),
}


@pytest.fixture(params=BACKENDS, scope="module")
def backend(request):
    return request.param


@pytest.fixture
def one_thread():
    """One intra-op thread: the end-to-end models are tiny, so more threads only add
    synchronisation (and much of it when other jobs share the cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def brute_force_min_norm(G: np.ndarray):
    """The exact oracle of the min-norm solvers: ``(min over the simplex of c^T G c, argmin c)``
    by enumerating every support and solving its bordered KKT system (N <= ~8)."""
    n = G.shape[0]
    best, arg = math.inf, None
    for k in range(1, n + 1):
        for S in itertools.combinations(range(n), k):
            idx = list(S)
            K = np.zeros((k + 1, k + 1))
            K[:k, :k] = G[np.ix_(idx, idx)]
            K[:k, k] = 1.0
            K[k, :k] = 1.0
            rhs = np.zeros(k + 1)
            rhs[k] = 1.0
            try:
                mu = np.linalg.solve(K, rhs)[:k]
            except np.linalg.LinAlgError:
                continue
            if not np.all(np.isfinite(mu)) or mu.min() < -1e-12:
                continue
            mu = np.clip(mu, 0.0, None)
            mu /= mu.sum()
            c = np.zeros(n)
            c[idx] = mu
            val = float(c @ G @ c)
            if val < best:
                best, arg = val, c
    return best, arg


def load_build_config():
    """pama_ext/_build_config.py loaded by path, as setup.py loads it (not through the
    pama_ext package, whose __init__ imports the compiled extension)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "pama_ext" / "_build_config.py"
    spec = importlib.util.spec_from_file_location("_pama_tests_build_config", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod
