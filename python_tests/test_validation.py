"""Bad inputs: every error names the bad argument (and the shapes, where shapes are involved)."""

from __future__ import annotations

import re

import pytest
import torch

import pama_ext
from pama_ext import _backends
from conftest import BACKENDS, make_inputs

F64 = torch.float64


def good(B=2, T=3, N=2, dtype=F64):
    x = make_inputs(B, T, N, dtype, mask_kind="full", seed=0)
    return dict(logp=x.logp, old_logp=x.old_logp, advantages=x.advantages, mask=x.mask)


def call(fn, args, **kwargs):
    return fn(args["logp"], args["old_logp"], args["advantages"], args["mask"], **kwargs)


LOSS_FNS = [pama_ext.pama_loss, pama_ext.pama_loss_and_stats, pama_ext.pama_weights]
FN_IDS = ["pama_loss", "pama_loss_and_stats", "pama_weights"]


def expect(exc, fn, args, *fragments, **kwargs):
    """fn(args) raises exc whose message contains every fragment (literally)."""
    with pytest.raises(exc) as info:
        call(fn, args, **kwargs)
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"
    return msg


@pytest.fixture(params=LOSS_FNS, ids=FN_IDS)
def fn(request):
    return request.param


# --------------------------------------------------------------------------- positive controls
@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
def test_good_inputs_pass(fn, backend):
    call(fn, good(), backend=backend)
    call(fn, good(N=64), backend=backend)  # the largest N allowed
    args = good()
    args["advantages"] = args["advantages"][:, 0, :]  # [B, N]
    call(fn, args, backend=backend)


# --------------------------------------------------------------------------- shapes
def test_old_logp_shape_mismatch(fn):
    args = good()
    args["old_logp"] = torch.zeros(2, 4, dtype=F64)
    expect(ValueError, fn, args, "old_logp", "[2, 3]", "[2, 4]")


def test_mask_shape_mismatch(fn):
    args = good()
    args["mask"] = torch.ones(3, 3, dtype=torch.bool)
    expect(ValueError, fn, args, "mask", "[2, 3]", "[3, 3]")
    args["mask"] = torch.ones(2, 3, 1, dtype=torch.bool)
    expect(ValueError, fn, args, "mask", "[2, 3]", "[2, 3, 1]")


@pytest.mark.parametrize(
    "shape",
    [(3, 3, 2), (2, 4, 2), (1, 3, 2), (3, 2), (6,), (2, 3, 2, 1)],
    ids=["wrong_B", "wrong_T", "B_too_small", "BN_wrong_B", "1d", "4d"],
)
def test_advantages_wrong_shape(fn, shape):
    args = good()
    args["advantages"] = torch.zeros(shape, dtype=F64)
    shape_str = "[" + ", ".join(map(str, shape)) + "]"
    expect(ValueError, fn, args, "advantages", shape_str, "[2, 3]")


@pytest.mark.parametrize("shape", [(6,), (2, 3, 1), ()], ids=["1d", "3d", "0d"])
def test_logp_not_2d(fn, shape):
    args = good()
    args["logp"] = torch.zeros(shape, dtype=F64)
    shape_str = "[" + ", ".join(map(str, shape)) + "]"
    expect(ValueError, fn, args, "logp", shape_str)


@pytest.mark.parametrize("per_sequence", [False, True])
def test_zero_objectives(fn, per_sequence):
    args = good()
    args["advantages"] = torch.zeros((2, 0) if per_sequence else (2, 3, 0), dtype=F64)
    expect(ValueError, fn, args, "advantages", "N = 0", "[2, 0]" if per_sequence else "[2, 3, 0]")


@pytest.mark.parametrize("n", [65, 200])
def test_too_many_objectives(fn, n):
    args = good()
    args["advantages"] = torch.zeros(2, 3, n, dtype=F64)
    expect(ValueError, fn, args, "advantages", f"[2, 3, {n}]", "64")


# --------------------------------------------------------------------------- dtypes and types
@pytest.mark.parametrize("name", ["logp", "old_logp", "advantages"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64], ids=str)
def test_non_float_inputs(fn, name, dtype):
    args = good()
    args[name] = args[name].to(dtype)
    shape = "[" + ", ".join(map(str, args[name].shape)) + "]"
    expect(TypeError, fn, args, f"`{name}`", str(dtype), shape)


def test_complex_mask(fn):
    args = good()
    args["mask"] = args["mask"].to(torch.complex64)
    expect(TypeError, fn, args, "`mask`", "complex64")


def test_complex_mask_message_has_shape(fn):
    # _validation.py promises "every error names the bad argument and the shapes involved"
    args = good()
    args["mask"] = args["mask"].to(torch.complex64)
    expect(TypeError, fn, args, "`mask`", "[2, 3]")


@pytest.mark.parametrize("name", ["logp", "old_logp", "advantages", "mask"])
def test_not_a_tensor(fn, name):
    args = good()
    args[name] = args[name].tolist()
    expect(TypeError, fn, args, f"`{name}`", "list")


# --------------------------------------------------------------------------- devices
@pytest.mark.parametrize("name", ["old_logp", "advantages", "mask"])
def test_inputs_on_different_devices(fn, name):
    args = good()
    args[name] = torch.empty(args[name].shape, dtype=args[name].dtype, device="meta")
    expect(ValueError, fn, args, f"`{name}`", "meta", "cpu")


def test_logp_on_other_device(fn):
    args = good()
    args["logp"] = torch.empty(2, 3, dtype=F64, device="meta")
    msg = expect(ValueError, fn, args, "meta", "cpu")
    assert re.search(r"`(old_logp|advantages|mask)`", msg), msg


# --------------------------------------------------------------------------- scalar options
@pytest.mark.parametrize("eps", [0.0, -0.1, float("nan"), float("inf"), float("-inf")])
def test_clip_eps_bad_value(fn, eps):
    expect(ValueError, fn, good(), "clip_eps", clip_eps=eps)


@pytest.mark.parametrize("eps", ["0.2", None, True, [0.2]], ids=["str", "None", "bool", "list"])
def test_clip_eps_bad_type(fn, eps):
    expect(TypeError, fn, good(), "clip_eps", clip_eps=eps)


def test_clip_eps_int_accepted(fn):
    call(fn, good(), clip_eps=1)


@pytest.mark.parametrize("value", ["Batch", "tokens", "", "mgda"])
def test_unknown_granularity(fn, value):
    expect(ValueError, fn, good(), "granularity", repr(value), granularity=value)


@pytest.mark.parametrize("value", ["mean", "sum", "seq_mean"])
def test_unknown_loss_agg(value):
    for f in (pama_ext.pama_loss, pama_ext.pama_loss_and_stats):
        expect(ValueError, f, good(), "loss_agg", repr(value), loss_agg=value)


@pytest.mark.parametrize("value", ["gpu", "cuda:0", "Torch", "CPP"])  # cuda and triton are registered backends
def test_unknown_backend(fn, value):
    expect(ValueError, fn, good(), "backend", repr(value), backend=value)


@pytest.mark.parametrize("value", ["ignore", "zero", "Raise"])
def test_unknown_nonfinite(value):
    for f in (pama_ext.pama_loss, pama_ext.pama_loss_and_stats):
        expect(ValueError, f, good(), "nonfinite", repr(value), nonfinite=value)


# --------------------------------------------------------------------------- missing extension
def _replace_cpp(monkeypatch, forward, error=None):
    entry = _backends._REGISTRY["cpp"]
    fake = _backends.Backend(entry.name, entry.devices, entry.priority, forward, error)
    monkeypatch.setitem(_backends._REGISTRY, "cpp", fake)


def test_cpp_backend_unavailable(monkeypatch, fn):
    _replace_cpp(monkeypatch, None, "the compiled extension pama_ext._C failed to import; use backend='torch'")
    assert not pama_ext.has_cpp()
    assert "cpp" not in pama_ext.available_backends()
    expect(RuntimeError, fn, good(), "pama_ext._C", "backend='torch'", backend="cpp")
    call(fn, good(), backend="auto")  # auto falls back to torch
    with pytest.raises(RuntimeError, match=re.escape("pama_ext._C")):
        pama_ext.min_norm_weights(torch.eye(3, dtype=F64), backend="cpp")
    assert "cpp" not in pama_ext.build_info()["backends"]
    assert "pama_ext._C" in pama_ext.build_info()["unavailable"]["cpp"]


def test_cpp_backend_needs_cpu_tensors(monkeypatch, fn):
    _replace_cpp(monkeypatch, lambda *a: None)  # pretend the extension is there
    args = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in good().items()}
    expect(ValueError, fn, args, "cpp", "meta", backend="cpp")


# --------------------------------------------------------------------------- gram
@pytest.mark.parametrize(
    "gram, fragments",
    [
        (torch.zeros(2, 3, dtype=F64), ["gram", "square", "[2, 3]"]),
        (torch.zeros(3, dtype=F64), ["gram", "[3]"]),
        (torch.zeros(2, 2, 2, dtype=F64), ["gram", "[2, 2, 2]"]),
        (torch.zeros(0, 0, dtype=F64), ["gram", "[0, 0]"]),
        (torch.eye(65, dtype=F64), ["gram", "[65, 65]", "64"]),
        (torch.tensor([[1.0, 0.5], [0.2, 1.0]], dtype=F64), ["gram", "symmetric", "[2, 2]"]),
        (torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=F64), ["gram", "positive semi-definite", "[2, 2]"]),
        (torch.tensor([[-1.0]], dtype=F64), ["gram", "positive semi-definite", "[1, 1]"]),
        (-torch.eye(3, dtype=F64), ["gram", "positive semi-definite", "[3, 3]"]),
        (torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]], dtype=F64), ["gram", "non-finite", "[2, 2]"]),
        (torch.tensor([[float("inf"), 0.0], [0.0, 1.0]], dtype=F64), ["gram", "non-finite", "[2, 2]"]),
    ],
    ids=["2x3", "1d", "3d", "N0", "N65", "asym", "indefinite", "neg1x1", "negdef", "nan", "inf"],
)
@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
def test_bad_gram(gram, fragments, backend):
    with pytest.raises(ValueError) as info:
        pama_ext.min_norm_weights(gram, backend=backend)
    for frag in fragments:
        assert frag in str(info.value), (frag, str(info.value))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool], ids=str)
def test_gram_integer_dtype(dtype):
    with pytest.raises(TypeError, match="gram"):
        pama_ext.min_norm_weights(torch.eye(3).to(dtype))


def test_gram_not_a_tensor():
    with pytest.raises(TypeError, match="gram"):
        pama_ext.min_norm_weights([[1.0, 0.0], [0.0, 1.0]])


def test_gram_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        pama_ext.min_norm_weights(torch.eye(3, dtype=F64), backend="gpu")


def test_gram_tolerances_accept_rounding_noise():
    # accumulation noise far below the tolerances is accepted (symmetrised by the solver)
    g = torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 1.0], [0.0, 1.0, 2.0]], dtype=F64)
    g[0, 1] += 1e-12
    c = pama_ext.min_norm_weights(g)
    assert abs(float(c.sum()) - 1) < 1e-12
    # a rank-deficient PSD matrix (smallest eigenvalue ~ -1e-16) is accepted
    v = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    pama_ext.min_norm_weights(v @ v.T)


# --------------------------------------------------------------------------- theorem1
@pytest.mark.parametrize(
    "a, fragments",
    [
        (torch.tensor([1.0, float("nan"), 2.0]), ["NaN", "[3]"]),
        (torch.tensor([[1.0, 2.0], [float("nan"), 0.0]]), ["NaN", "[2, 2]"]),
        (torch.zeros(3, 0), ["`a`", "[3, 0]"]),
        (torch.zeros(0), ["`a`", "[0]"]),
        (torch.tensor(1.0), ["`a`", "[]"]),
    ],
    ids=["nan", "nan2d", "empty_last", "empty", "0d"],
)
def test_theorem1_bad_input(a, fragments):
    with pytest.raises(ValueError) as info:
        pama_ext.theorem1(a)
    for frag in fragments:
        assert frag in str(info.value), (frag, str(info.value))


def test_theorem1_bad_type():
    with pytest.raises(TypeError, match="`a`"):
        pama_ext.theorem1(torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="`a`"):
        pama_ext.theorem1([1.0, 2.0])
