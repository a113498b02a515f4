"""Per-objective GAE, whitening and sequence-level advantages (pama_ext.rl.gae).

* ``oracle_gae`` is the spec's closed form written independently of ``gae_reference``:
  compact each row to its masked positions, delta_t = r_t + gamma V_{t+1} - V_t with
  V = 0 past the last one, A_t = sum_l (gamma lam)^l delta_{t+l}, in NumPy float64.
* The C++ kernel is ``pama_ext._C.gae`` when the extension has it; until csrc/gae_cpu.cpp
  is wired into ``pama_ext._C`` the tests build it alone with ``cpp_extension.load``
  (cached in the temp directory: the first run compiles for a minute or two).
  ``test_extension_has_gae`` fails until the wiring is done.
"""

from __future__ import annotations

import math
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pama_ext
import pama_ext.rl.gae as gae_mod
from pama_ext import _backends
from pama_ext.rl import (
    gae_reference,
    per_objective_gae,
    scale_per_objective,
    scores_to_token_rewards,
    sequence_advantages,
    whiten_per_objective,
)
from conftest import assert_close_rel, make_mask

F64 = torch.float64
CSRC = Path(__file__).resolve().parents[1] / "csrc"
_SCRATCH_MODULE = '#include "bindings.h"\n#include "cpu_ops.h"\nPYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("gae", &pama_cpu_ops::gae, py::arg("rewards"), py::arg("values"), py::arg("mask"), py::arg("gamma"), py::arg("lam")); }\n'


# --------------------------------------------------------------------------- helpers
def oracle_gae(rewards, values, mask, gamma, lam):
    """(advantages, returns) in float64 NumPy, from the closed form over compacted rows."""
    r = rewards.detach().to(F64).numpy()
    v = values.detach().to(F64).numpy()
    m = mask.bool().numpy()
    B, T, N = r.shape
    adv = np.zeros((B, T, N))
    ret = np.zeros((B, T, N))
    for b in range(B):
        idx = np.flatnonzero(m[b])
        if idx.size == 0:
            continue
        rr, vv = r[b, idx], v[b, idx]  # [L, N]: the trajectory
        v_next = np.concatenate([vv[1:], np.zeros((1, N))])  # terminal: V = 0 after the last
        delta = rr + gamma * v_next - vv
        L = idx.size
        weights = (gamma * lam) ** np.arange(L, dtype=np.float64)
        for j in range(L):
            a = (weights[: L - j, None] * delta[j:]).sum(axis=0)
            adv[b, idx[j]] = a
            ret[b, idx[j]] = a + vv[j]
    return torch.from_numpy(adv), torch.from_numpy(ret)


def make_gae_inputs(B, T, N, mask_kind="random", dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, N, generator=gen, dtype=F64).to(dtype)
    values = torch.randn(B, T, N, generator=gen, dtype=F64).to(dtype)
    if mask_kind == "holes":  # ragged spans with holes punched in them
        mask = make_mask(B, T, "ragged", gen) & (torch.rand(B, T, generator=gen) < 0.7)
    else:
        mask = make_mask(B, T, mask_kind, gen)
    return rewards, values, mask


def _build_scratch_gae():
    """csrc/gae_cpu.cpp compiled alone into a throw-away module (before it is wired into _C)."""
    from torch.utils.cpp_extension import load

    build = Path(tempfile.gettempdir()) / f"pama_gae_scratch_torch{torch.__version__.replace('+', '_')}"
    build.mkdir(parents=True, exist_ok=True)
    src = build / "gae_module.cpp"
    if not src.exists() or src.read_text() != _SCRATCH_MODULE:  # rewriting would force a rebuild
        src.write_text(_SCRATCH_MODULE)
    module = load(
        name="pama_gae_scratch",
        sources=[str(src), str(CSRC / "gae_cpu.cpp")],
        extra_include_paths=[str(CSRC)],
        extra_cflags=["-O3"],
        build_directory=str(build),
    )
    return module.gae


@pytest.fixture(scope="module")
def cpp_gae():
    """The C++ kernel: pama_ext._C.gae if built in, else the scratch build (skip if no compiler)."""
    if _backends._C is not None and hasattr(_backends._C, "gae"):
        return _backends._C.gae
    try:
        return _build_scratch_gae()
    except Exception as exc:  # no compiler / headers: the C++ path cannot be tested here
        pytest.skip(f"cannot build csrc/gae_cpu.cpp: {type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------- wiring
def test_extension_has_gae():
    """When pama_ext._C is built it must carry the GAE kernel (fails until it is wired in)."""
    if not pama_ext.has_cpp():
        pytest.skip("pama_ext._C is not built")
    assert hasattr(_backends._C, "gae"), (
        "pama_ext._C lacks `gae`: add csrc/gae_cpu.cpp to setup.py and bind pama_cpu_ops::gae "
        "in PYBIND11_MODULE (csrc/bindings.cpp)"
    )
    assert gae_mod.has_cpp_gae()


# --------------------------------------------------------------------------- the reference
@pytest.mark.parametrize("mask_kind", ["full", "ragged", "holes", "random", "empty"])
@pytest.mark.parametrize(
    "seed,gamma,lam", [(0, 1.0, 0.95), (1, 0.9, 0.8), (2, 1.0, 1.0), (3, 0.99, 0.0), (4, 0.0, 0.5)]
)
def test_reference_matches_oracle(mask_kind, seed, gamma, lam):
    r, v, m = make_gae_inputs(4, 23, 3, mask_kind, seed=seed)
    adv, ret = gae_reference(r, v, m, gamma, lam)
    adv_o, ret_o = oracle_gae(r, v, m, gamma, lam)
    assert_close_rel(adv, adv_o, 1e-12, msg="advantages")
    assert_close_rel(ret, ret_o, 1e-12, msg="returns")


@given(
    B=st.integers(1, 4),
    T=st.integers(1, 12),
    N=st.integers(1, 5),
    gamma=st.floats(0.0, 1.0),
    lam=st.floats(0.0, 1.0),
    bits=st.integers(0, 2**48 - 1),
)
def test_reference_matches_oracle_hypothesis(B, T, N, gamma, lam, bits):
    gen = torch.Generator().manual_seed(bits)
    r = torch.randn(B, T, N, generator=gen, dtype=F64)
    v = torch.randn(B, T, N, generator=gen, dtype=F64)
    m = torch.rand(B, T, generator=gen) < 0.6
    adv, ret = per_objective_gae(r, v, m, gamma=gamma, lam=lam, backend="torch")
    adv_o, ret_o = oracle_gae(r, v, m, gamma, lam)
    assert_close_rel(adv, adv_o, 1e-12, atol=1e-12, msg="advantages")
    assert_close_rel(ret, ret_o, 1e-12, atol=1e-12, msg="returns")


def test_hand_checked():
    # one row, one objective, mask [0, 1, 1, 0, 1, 0]: the trajectory is t = 1, 2, 4
    r = torch.tensor([9.0, 1.0, 2.0, 9.0, 3.0, 9.0], dtype=F64)[None, :, None]
    v = torch.tensor([9.0, 0.5, 1.0, 9.0, 2.0, 9.0], dtype=F64)[None, :, None]
    m = torch.tensor([[0, 1, 1, 0, 1, 0]], dtype=torch.bool)
    g, l = 0.5, 0.5
    d4 = 3.0 - 2.0  # terminal: V after t = 4 is 0
    d2 = 2.0 + g * 2.0 - 1.0  # the next token of t = 2 is t = 4, across the hole
    d1 = 1.0 + g * 1.0 - 0.5
    a4, a2 = d4, d2 + g * l * d4
    a1 = d1 + g * l * a2
    adv, ret = per_objective_gae(r, v, m, gamma=g, lam=l)
    expected = torch.tensor([0.0, a1, a2, 0.0, a4, 0.0], dtype=F64)
    assert torch.allclose(adv[0, :, 0], expected, rtol=0, atol=1e-15)
    assert torch.allclose(ret[0, :, 0], torch.where(m[0], expected + v[0, :, 0], 0.0), rtol=0, atol=1e-15)


def test_special_cases():
    r, v, m = make_gae_inputs(3, 9, 2, "full", seed=1)
    # gamma = lam = 1: A_t = reward-to-go - V_t, so returns are the reward-to-go
    adv, ret = per_objective_gae(r, v, m, gamma=1.0, lam=1.0)
    to_go = r.flip(1).cumsum(1).flip(1)
    assert torch.allclose(ret, to_go, atol=1e-12) and torch.allclose(adv, to_go - v, atol=1e-12)
    # lam = 0: one-step TD errors
    adv0, _ = per_objective_gae(r, v, m, gamma=0.9, lam=0.0)
    v_next = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1)
    assert torch.allclose(adv0, r + 0.9 * v_next - v, atol=1e-12)
    # T = 1: A = r - V, returns = r
    adv1, ret1 = per_objective_gae(r[:, :1], v[:, :1], m[:, :1])
    assert torch.allclose(adv1, r[:, :1] - v[:, :1]) and torch.allclose(ret1, r[:, :1])


def test_objectives_are_independent():
    r, v, m = make_gae_inputs(3, 11, 4, "holes", seed=2)
    adv, ret = per_objective_gae(r, v, m)
    for i in range(4):
        a_i, r_i = per_objective_gae(r[..., i : i + 1], v[..., i : i + 1], m)
        assert torch.equal(a_i[..., 0], adv[..., i]) and torch.equal(r_i[..., 0], ret[..., i])


def test_reference_is_differentiable():
    r, v, m = make_gae_inputs(2, 7, 2, "ragged", seed=3)
    v = v.clone().requires_grad_(True)
    adv, _ = per_objective_gae(r, v, m)  # auto: inputs need grad, so the reference runs
    adv.sum().backward()
    assert v.grad is not None and torch.isfinite(v.grad).all()
    assert (v.grad[~m] == 0).all()  # positions outside the trajectory do not matter


# --------------------------------------------------------------------------- the C++ kernel
CPP_TOLS = {torch.float64: 1e-13, torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_kind", ["full", "ragged", "holes", "random", "empty"])
@pytest.mark.parametrize("N", [1, 2, 3, 4, 5, 6, 7, 8, 13])
def test_cpp_matches_reference(cpp_gae, dtype, mask_kind, N):
    T = 1 if N == 7 else 29  # T = 1 once per mask kind and dtype
    r, v, m = make_gae_inputs(5, T, N, mask_kind, dtype, seed=N)
    adv_c, ret_c = cpp_gae(r, v, m, 1.0, 0.95)
    adv_t, ret_t = gae_reference(r, v, m, 1.0, 0.95)
    assert adv_c.dtype == dtype and ret_c.dtype == dtype
    tol = CPP_TOLS[dtype]
    assert_close_rel(adv_c, adv_t, tol, msg=f"advantages {dtype}")
    assert_close_rel(ret_c, ret_t, tol, msg=f"returns {dtype}")
    if dtype in (torch.float64, torch.float32):  # against the oracle too, on the same inputs
        adv_o, ret_o = oracle_gae(r, v, m, 1.0, 0.95)
        o_tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert_close_rel(adv_c, adv_o, o_tol, atol=o_tol, msg="advantages vs oracle")
        assert_close_rel(ret_c, ret_o, o_tol, atol=o_tol, msg="returns vs oracle")


@pytest.mark.parametrize("gamma,lam", [(0.9, 0.8), (1.0, 1.0), (0.0, 0.0), (0.5, 1.0)])
def test_cpp_gamma_lam(cpp_gae, gamma, lam):
    r, v, m = make_gae_inputs(6, 40, 4, "holes", seed=7)
    adv_c, ret_c = cpp_gae(r, v, m, gamma, lam)
    adv_o, ret_o = oracle_gae(r, v, m, gamma, lam)
    assert_close_rel(adv_c, adv_o, 1e-12, atol=1e-12, msg="advantages")
    assert_close_rel(ret_c, ret_o, 1e-12, atol=1e-12, msg="returns")


def test_cpp_long_rows_and_threads(cpp_gae):
    """Long rows, more rows than one work unit; bitwise the same for 1 and 2 threads."""
    r, v, m = make_gae_inputs(70, 600, 3, "ragged", torch.float32, seed=8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpp_gae(r, v, m, 1.0, 0.95)
        torch.set_num_threads(2)
        two = cpp_gae(r, v, m, 1.0, 0.95)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    ref = gae_reference(r, v, m, 1.0, 0.95)
    assert_close_rel(one[0], ref[0], 1e-6, msg="advantages")


@pytest.mark.parametrize("path", ["cpp", "torch"])
def test_nan_outside_mask_does_not_leak(cpp_gae, path):
    r, v, m = make_gae_inputs(4, 15, 3, "holes", seed=9)
    r_nan = torch.where(m[..., None], r, float("nan"))
    v_nan = torch.where(m[..., None], v, float("inf"))
    fn = cpp_gae if path == "cpp" else gae_reference
    adv, ret = fn(r_nan, v_nan, m, 1.0, 0.95)
    adv_ref, ret_ref = gae_reference(r, v, m, 1.0, 0.95)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    assert_close_rel(adv, adv_ref, 1e-13, msg="advantages")
    assert_close_rel(ret, ret_ref, 1e-13, msg="returns")


def test_cpp_empty_shapes(cpp_gae):
    for B, T, N in [(0, 5, 2), (3, 0, 2), (3, 5, 0)]:
        r = torch.zeros(B, T, N)
        adv, ret = cpp_gae(r, r, torch.ones(B, T, dtype=torch.bool), 1.0, 0.95)
        assert adv.shape == (B, T, N) and ret.shape == (B, T, N)
        adv_t, _ = gae_reference(r, r, torch.ones(B, T, dtype=torch.bool), 1.0, 0.95)
        assert adv_t.shape == (B, T, N)


def test_cpp_non_contiguous(cpp_gae):
    r, v, m = make_gae_inputs(4, 12, 6, "random", seed=10)
    r_nc, v_nc = r[:, :, ::2], v.transpose(0, 1).contiguous().transpose(0, 1)[:, :, ::2]
    adv, ret = cpp_gae(r_nc, v_nc, m, 1.0, 0.95)
    adv_t, ret_t = gae_reference(r_nc.contiguous(), v_nc.contiguous(), m, 1.0, 0.95)
    assert torch.allclose(adv, adv_t, rtol=0, atol=1e-13)
    assert torch.allclose(ret, ret_t, rtol=0, atol=1e-13)


def test_cpp_errors(cpp_gae):
    r = torch.zeros(2, 3, 4)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"`values` must have the shape of `rewards`"):
        cpp_gae(r, torch.zeros(2, 3, 5), m, 1.0, 0.95)
    with pytest.raises(ValueError, match=r"`mask` must be \[B, T\]"):
        cpp_gae(r, r, torch.ones(2, 4, dtype=torch.bool), 1.0, 0.95)
    with pytest.raises(ValueError, match=r"`mask` must be bool"):
        cpp_gae(r, r, m.float(), 1.0, 0.95)
    with pytest.raises(ValueError, match=r"`gamma` must be in \[0, 1\]"):
        cpp_gae(r, r, m, 1.5, 0.95)
    with pytest.raises(ValueError, match=r"`rewards` must be \[B, T, N\]"):
        cpp_gae(r[0], r[0], m, 1.0, 0.95)


# --------------------------------------------------------------------------- dispatch
class _Spy:
    def __init__(self, kernel):
        self.kernel, self.calls = kernel, 0

    def __call__(self, *args):
        self.calls += 1
        return self.kernel(*args)


def test_dispatch(cpp_gae, monkeypatch):
    spy = _Spy(cpp_gae)
    monkeypatch.setattr(gae_mod, "_C", types.SimpleNamespace(gae=spy))
    r, v, m = make_gae_inputs(3, 10, 2, "holes", seed=11)
    out = per_objective_gae(r, v, m.to(torch.int64))  # auto on CPU: the kernel; int mask is fine
    assert spy.calls == 1
    ref = gae_reference(r, v, m, 1.0, 0.95)
    assert_close_rel(out.advantages, ref.advantages, 1e-13, msg="auto")
    per_objective_gae(r, v, m, backend="torch")
    assert spy.calls == 1
    per_objective_gae(r, v.requires_grad_(True), m)  # needs a gradient: the reference
    assert spy.calls == 1
    with pytest.raises(ValueError, match="not differentiable"):
        per_objective_gae(r, v, m, backend="cpp")
    with torch.no_grad():
        per_objective_gae(r, v, m, backend="cpp")
    assert spy.calls == 2


def test_dispatch_without_kernel(monkeypatch):
    monkeypatch.setattr(gae_mod, "_C", None)
    r, v, m = make_gae_inputs(2, 5, 2, "full")
    assert not gae_mod.has_cpp_gae()
    adv, _ = per_objective_gae(r, v, m)  # auto falls back to the reference
    assert torch.equal(adv, gae_reference(r, v, m, 1.0, 0.95).advantages)
    with pytest.raises(RuntimeError, match="backend 'cpp' is unavailable"):
        per_objective_gae(r, v, m, backend="cpp")


def test_validation():
    r = torch.zeros(2, 3, 4)
    m = torch.ones(2, 3, dtype=torch.bool)
    fn = per_objective_gae
    with pytest.raises(ValueError, match=r"per_objective_gae: `rewards` must be \[B, T, N\], got \[2, 3\]"):
        fn(r[..., 0], r[..., 0], m)
    with pytest.raises(ValueError, match=r"`values` must have the shape of `rewards` \[2, 3, 4\]"):
        fn(r, r[:, :2], m)
    with pytest.raises(ValueError, match=r"`mask` must have shape \[B, T\] = \[2, 3\], got \[3, 2\]"):
        fn(r, r, m.T)
    with pytest.raises(TypeError, match=r"`rewards` must be float64"):
        fn(r.long(), r, m)
    with pytest.raises(ValueError, match=r"`lam` must be in \[0, 1\]"):
        fn(r, r, m, lam=-0.1)
    with pytest.raises(TypeError, match=r"`gamma` must be a float"):
        fn(r, r, m, gamma=torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'"):
        fn(r, r, m, backend="cuda")
    adv, _ = fn(r, r.double(), m)  # mixed dtypes are promoted
    assert adv.dtype == F64


# --------------------------------------------------------------------------- whitening
def _masked_stats(x, m):
    sel = x[m]  # [M, N]
    return sel.mean(0), sel.var(0, unbiased=True)


@pytest.mark.parametrize("mask_kind", ["ragged", "holes", "full"])
def test_whiten_per_objective(mask_kind):
    r, _, m = make_gae_inputs(6, 20, 3, mask_kind, seed=12)
    scale = torch.tensor([1.0, 100.0, 1e-2], dtype=F64)
    adv = r * scale + torch.tensor([5.0, -3.0, 0.0], dtype=F64)
    w = whiten_per_objective(adv, m)
    mean, var = _masked_stats(w, m)
    assert torch.allclose(mean, torch.zeros(3, dtype=F64), atol=1e-12)
    assert torch.allclose(var, torch.ones(3, dtype=F64), atol=1e-3)  # eps = 1e-8 against var ~1e-4
    assert (w[~m] == 0).all()
    # the explicit formula, objective by objective
    mu, v = _masked_stats(adv, m)
    expected = torch.where(m[..., None], (adv - mu) / torch.sqrt(v + 1e-8), 0.0)
    assert_close_rel(w, expected, 1e-12, msg="whitened")
    # each objective on its own: rescaling one leaves the others untouched
    adv2 = adv.clone()
    adv2[..., 1] *= 1e4
    w2 = whiten_per_objective(adv2, m)
    assert torch.equal(w2[..., 0], w[..., 0]) and torch.equal(w2[..., 2], w[..., 2])
    # shift_mean=False: unit variance, the mean kept
    k = whiten_per_objective(adv, m, shift_mean=False)
    mean_k, var_k = _masked_stats(k, m)
    assert torch.allclose(mean_k, mu, atol=1e-10) and torch.allclose(var_k, var, atol=1e-10)


def test_whiten_edge_cases():
    adv = torch.randn(2, 4, 3, dtype=F64)
    empty = torch.zeros(2, 4, dtype=torch.bool)
    assert torch.equal(whiten_per_objective(adv, empty), torch.zeros_like(adv))
    one = empty.clone()
    one[1, 2] = True  # a single token: variance 0, centred value 0
    w = whiten_per_objective(adv, one)
    assert torch.isfinite(w).all() and (w == 0).all()
    assert torch.equal(whiten_per_objective(adv, one, shift_mean=False)[1, 2], adv[1, 2])
    nan_out = torch.where(one[..., None], adv, float("nan"))  # never read outside the mask
    assert torch.equal(whiten_per_objective(nan_out, one), w)
    # sequence level [B, N] without a mask; low precision keeps its dtype
    seq = torch.randn(16, 2).to(torch.bfloat16)
    ws = whiten_per_objective(seq)
    assert ws.dtype == torch.bfloat16 and ws.shape == (16, 2)
    assert torch.allclose(ws.float().mean(0), torch.zeros(2), atol=2e-2)


@pytest.mark.parametrize("mask_kind", ["ragged", "holes", "full"])
def test_scale_per_objective(mask_kind):
    """x / sd per objective (the same unbiased sd as whitening), not centred: every sign kept,
    the masked mean divided by sd, each objective on its own; a float64 loop as reference."""
    r, _, m = make_gae_inputs(6, 20, 3, mask_kind, seed=14)
    adv = r * torch.tensor([1.0, 100.0, 1e-2], dtype=F64) + torch.tensor([5.0, -3.0, 0.0], dtype=F64)
    out = scale_per_objective(adv, m)
    for i in range(3):
        col = [float(x) for x in adv[..., i][m]]
        mu = sum(col) / len(col)
        sd = math.sqrt(sum((x - mu) ** 2 for x in col) / (len(col) - 1) + 1e-8)
        want = torch.where(m, adv[..., i] / sd, 0.0)
        assert_close_rel(out[..., i], want, 1e-12, msg=f"objective {i}")
    assert bool((out[m].sign() == adv[m].sign()).all()) and (out[~m] == 0).all()
    mean, var = _masked_stats(out, m)
    mu, v = _masked_stats(adv, m)
    assert torch.allclose(var, torch.ones(3, dtype=F64), atol=1e-3)
    assert torch.allclose(mean, mu / torch.sqrt(v + 1e-8), atol=1e-12)
    # the same scale as whitening: scaled minus whitened is the constant mean / sd
    torch.testing.assert_close(out - whiten_per_objective(adv, m), torch.where(m[..., None], mean, 0.0))
    adv2 = adv.clone()
    adv2[..., 1] *= 1e4
    o2 = scale_per_objective(adv2, m)
    assert torch.equal(o2[..., 0], out[..., 0]) and torch.equal(o2[..., 2], out[..., 2])


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 40), st.integers(1, 4), st.floats(-5, 5), st.floats(1e-3, 1e3), st.integers(0, 2**31 - 1))
def test_scale_per_objective_properties(m_count, n, shift, spread, seed):
    """Signs kept, unit sample std (above eps), invariant to a positive rescaling of an objective."""
    g = torch.Generator().manual_seed(seed)
    adv = (torch.randn(m_count, n, generator=g, dtype=F64) * spread + shift)
    out = scale_per_objective(adv)
    assert bool((out.sign() == adv.sign()).all())
    sd = adv.std(0)
    big = sd > 1e-2
    assert torch.allclose(out.std(0)[big], torch.ones(n, dtype=F64)[big], rtol=1e-4)
    torch.testing.assert_close(scale_per_objective(adv * 7.0)[:, big], out[:, big], rtol=1e-6, atol=1e-9)


def test_scale_per_objective_edge_cases():
    adv = torch.randn(2, 4, 3, dtype=F64)
    empty = torch.zeros(2, 4, dtype=torch.bool)
    assert torch.equal(scale_per_objective(adv, empty), torch.zeros_like(adv))
    one = empty.clone()
    one[1, 2] = True  # a single token: variance 0, so x / sqrt(eps)
    torch.testing.assert_close(scale_per_objective(adv, one)[1, 2], adv[1, 2] / 1e-4)
    nan_out = torch.where(one[..., None], adv, float("nan"))  # never read outside the mask
    assert torch.equal(scale_per_objective(nan_out, one), scale_per_objective(adv, one))
    seq = torch.randn(16, 2).add(1).to(torch.bfloat16)
    s = scale_per_objective(seq)
    assert s.dtype == torch.bfloat16 and bool((s.float().sign() == seq.float().sign()).all())


@pytest.mark.parametrize("fn", [whiten_per_objective, scale_per_objective])
def test_per_objective_normalisations_reject_bad_inputs(fn):
    """Each error names the function, the argument and its shape or value."""
    adv = torch.randn(2, 4, 3, dtype=F64)
    name = fn.__name__
    with pytest.raises(ValueError, match=rf"{name}: `mask` must have shape advantages.shape\[:-1\] = \[2, 4\], got \[2, 4, 3\]"):
        fn(adv, torch.ones(2, 4, 3))
    with pytest.raises(ValueError, match=rf"{name}: `advantages` must be \[\.\.\., N\] with at least one batch dimension, got \[3\]"):
        fn(torch.ones(3))
    with pytest.raises(ValueError, match=rf"{name}: `eps` must be a float > 0, got 0.0"):
        fn(adv, eps=0.0)
    with pytest.raises(TypeError, match=name):
        fn(adv.long())


def test_sequence_advantages():
    gen = torch.Generator().manual_seed(13)
    rewards = torch.randn(12, 3, generator=gen, dtype=F64) * torch.tensor([1.0, 10.0, 0.1], dtype=F64)
    batch = sequence_advantages(rewards)
    assert torch.equal(batch, whiten_per_objective(rewards))
    grouped = sequence_advantages(rewards, group_size=4)
    for g in range(3):
        x = rewards[4 * g : 4 * g + 4]
        expected = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=True) + 1e-8)
        assert_close_rel(grouped[4 * g : 4 * g + 4], expected, 1e-12, msg=f"group {g}")
    centred = sequence_advantages(rewards, group_size=4, scale=False)
    assert_close_rel(centred[:4], rewards[:4] - rewards[:4].mean(0), 1e-12, msg="scale=False")
    assert torch.equal(sequence_advantages(rewards, group_size=1), torch.zeros_like(rewards))
    with pytest.raises(ValueError, match=r"B = 12 of `rewards` \[12, 3\] is not a multiple of group_size = 5"):
        sequence_advantages(rewards, group_size=5)
    with pytest.raises(ValueError, match=r"`rewards` must be \[B, N\]"):
        sequence_advantages(rewards[None])


# --------------------------------------------------------------------------- per-token rewards
def test_scores_to_token_rewards():
    mask = torch.tensor([[0, 1, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    scores = torch.tensor([[1.0, -2.0], [3.0, 4.0], [5.0, 6.0]], dtype=F64)
    rw = scores_to_token_rewards(scores, mask)
    expected = torch.zeros(3, 6, 2, dtype=F64)
    expected[0, 4] = scores[0]  # the last masked token, after a hole
    expected[2, 5] = scores[2]  # row 1 is empty: its score has no token
    assert torch.equal(rw, expected)
    kl = torch.full((3, 6), float("nan"), dtype=F64)
    kl[mask] = torch.arange(int(mask.sum()), dtype=F64)
    rk = scores_to_token_rewards(scores, mask, kl=kl, kl_coef=0.2)
    assert torch.isfinite(rk).all()
    penalty = torch.where(mask, -0.2 * kl, 0.0)[..., None]
    assert torch.allclose(rk, expected + penalty, atol=1e-15)
    with pytest.raises(ValueError, match=r"`kl` must have the shape of `mask` \[3, 6\]"):
        scores_to_token_rewards(scores, mask, kl=kl[:, :5], kl_coef=0.1)
    with pytest.raises(ValueError, match=r"`mask` must be \[B, T\] with B = 3"):
        scores_to_token_rewards(scores, mask[:2])


def test_pipeline_into_pama_loss():
    """Scores -> token rewards -> GAE -> whitening -> pama_loss: shapes and finiteness."""
    B, T, N = 4, 9, 3
    gen = torch.Generator().manual_seed(14)
    mask = make_mask(B, T, "ragged", gen)
    rewards = scores_to_token_rewards(torch.randn(B, N, generator=gen), mask)
    values = torch.randn(B, T, N, generator=gen)
    adv, ret = per_objective_gae(rewards, values, mask)
    adv = whiten_per_objective(adv, mask)
    logp = (-torch.rand(B, T, generator=gen)).requires_grad_(True)
    loss = pama_ext.pama_loss(logp, logp.detach(), adv, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert ret.shape == (B, T, N)
