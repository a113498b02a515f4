"""torch.library registration: opcheck, torch.compile(fullgraph=True), dispatch, build info."""

import os

import pytest
import torch
from torch.library import opcheck

import pama_ext
from pama_ext import reference

NO_EXT = os.environ.get("PAMA_EXT_NO_EXT") == "1"


def _inputs(b=3, t=7, n=3, dtype=torch.float32, per_sequence=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=g, dtype=torch.float64).to(dtype)
    old = (logp.double() + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)).to(dtype)
    shape = (b, n) if per_sequence else (b, t, n)
    adv = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[0, 0] = True
    return logp.requires_grad_(), old, adv, mask


def test_extension_is_built():
    """CI builds the extension: a silent fallback to the PyTorch backend would hide a broken build."""
    if NO_EXT:
        assert not pama_ext.has_cpp()
        assert pama_ext.available_backends() == ["torch"]
        return
    assert pama_ext.has_cpp(), pama_ext.build_info()["extension_error"]
    info = pama_ext.build_info()
    assert info["backends"][0] == ("cuda" if "cuda" in info["backends"] else "cpp")
    assert "cpu" in info["extension"]["backends"]


def test_cpu_kernel_is_the_extension():
    has_cpu = torch._C._dispatch_has_kernel_for_dispatch_key("pama_ext::pama_forward", "CPU")
    assert has_cpu == pama_ext.has_cpp()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("pama_ext::pama_backward", "CPU") == has_cpu


@pytest.mark.parametrize("granularity", pama_ext.GRANULARITIES)
@pytest.mark.parametrize("loss_agg", pama_ext.LOSS_AGGS)
@pytest.mark.parametrize("per_sequence", [False, True])
def test_opcheck_forward(granularity, loss_agg, per_sequence):
    logp, old, adv, mask = _inputs(per_sequence=per_sequence)
    opcheck(
        torch.ops.pama_ext.pama_forward.default,
        (logp, old, adv, mask, 0.2, granularity, loss_agg, True),
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_opcheck_forward_dtypes(dtype):
    logp, old, adv, mask = _inputs(dtype=dtype)
    opcheck(
        torch.ops.pama_ext.pama_forward.default,
        (logp, old, adv, mask, 0.2, "batch", "token_mean", True),
    )


@pytest.mark.parametrize("granularity", pama_ext.GRANULARITIES)
def test_opcheck_backward(granularity):
    logp, old, adv, mask = _inputs()
    with torch.no_grad():
        _, w, rs, _ = torch.ops.pama_ext.pama_forward(logp, old, adv, mask, 0.2, granularity, "token_mean", True)
    opcheck(
        torch.ops.pama_ext.pama_backward.default,
        (torch.tensor(1.5), logp.detach(), old, adv, mask, w, rs, 0.2, granularity),
    )


@pytest.mark.parametrize("per_sequence", [False, True])
def test_opcheck_token_exact_zeros(per_sequence):
    """granularity "token" with exactly-zero advantages (they abstain): forward and backward."""
    logp, old, adv, mask = _inputs(per_sequence=per_sequence)
    adv = adv.abs().clone()
    adv[..., 0] = 0.0
    adv.view(-1, adv.shape[-1])[1] = -0.0
    opcheck(torch.ops.pama_ext.pama_forward.default, (logp, old, adv, mask, 0.2, "token", "token_mean", True))
    with torch.no_grad():
        _, w, rs, _ = torch.ops.pama_ext.pama_forward(logp, old, adv, mask, 0.2, "token", "token_mean", True)
    opcheck(
        torch.ops.pama_ext.pama_backward.default,
        (torch.tensor(1.5), logp.detach(), old, adv, mask, w, rs, 0.2, "token"),
    )


@pytest.mark.parametrize("per_sequence", [False, True])
@pytest.mark.parametrize("granularity", pama_ext.GRANULARITIES)
def test_gradcheck_through_autograd(granularity, per_sequence):
    """The registered autograd in float64 against finite differences (for ``token`` that is
    the multiply by the forward's [B, T] factor, not the pama_backward op)."""
    logp, old, adv, mask = _inputs(dtype=torch.float64, per_sequence=per_sequence)
    assert torch.autograd.gradcheck(
        lambda lp: torch.ops.pama_ext.pama_forward(lp, old, adv, mask, 0.2, granularity, "seq_mean_token_mean", True)[0],
        (logp,),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_token_autograd_equals_backward_op(dtype):
    """``token``'s autograd (the saved factor) and the op's own backward (s_t recomputed from
    the inputs) give the same gradient: the same products, rounded in another order."""
    logp, old, adv, mask = _inputs(b=5, t=33, n=4, dtype=dtype, seed=3)
    loss, factor, rs, _ = torch.ops.pama_ext.pama_forward(logp, old, adv, mask, 0.2, "token", "token_mean", True)
    assert factor.shape == logp.shape and factor.dtype == loss.dtype and not factor.requires_grad
    (grad,) = torch.autograd.grad(loss * 2.5, logp)
    direct = torch.ops.pama_ext.pama_backward(
        torch.tensor(2.5, dtype=loss.dtype), logp.detach(), old, adv, mask, factor, rs, 0.2, "token"
    )
    assert grad.dtype == dtype and bool((grad[~mask] == 0).all())
    tol = {torch.float64: 1e-15, torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(grad.double(), direct.double(), rtol=tol, atol=tol * float(direct.double().abs().max()))


def test_empty_mask_opcheck():
    logp, old, adv, mask = _inputs()
    opcheck(
        torch.ops.pama_ext.pama_forward.default,
        (logp, old, adv, torch.zeros_like(mask), 0.2, "batch", "seq_mean_token_mean", True),
    )


@pytest.mark.skipif(NO_EXT, reason="this install was built without the extension on purpose")
@pytest.mark.parametrize("granularity", pama_ext.GRANULARITIES)
@pytest.mark.parametrize("loss_agg", pama_ext.LOSS_AGGS)
def test_compile_fullgraph_matches_eager(granularity, loss_agg):
    torch._dynamo.reset()
    logp, old, adv, mask = _inputs(b=4, t=9, n=3)
    backend = "cpp"

    def step(lp, o, a, m):
        # a typical training-step fragment: log-probs from logits, then the PAMA loss
        return pama_ext.pama_loss(lp * 1.0, o, a, m, granularity=granularity, loss_agg=loss_agg, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss_c = compiled(logp, old, adv, mask)
    (grad_c,) = torch.autograd.grad(loss_c, logp)
    loss_e = step(logp, old, adv, mask)
    (grad_e,) = torch.autograd.grad(loss_e, logp)
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(grad_c, grad_e)
    # and both agree with the float64 reference
    ref = reference.pama_loss(logp.double(), old.double(), adv.double(), mask, 0.2, granularity, loss_agg)
    torch.testing.assert_close(loss_c.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(NO_EXT, reason="this install was built without the extension on purpose")
def test_compile_inductor_fullgraph():
    """The default inductor backend (what users get from torch.compile) also traces the op."""
    torch._dynamo.reset()
    logp, old, adv, mask = _inputs(b=2, t=5, n=2)
    fn = torch.compile(lambda *a: pama_ext.pama_loss(*a, backend="cpp"), fullgraph=True)
    loss = fn(logp, old, adv, mask)
    loss.backward()
    ref = reference.pama_loss(logp.detach().double(), old.double(), adv.double(), mask)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(logp.grad).all()


def test_build_info_names_backends():
    info = pama_ext.build_info()
    assert info["backends"][-1] == "torch"
    assert info["torch_version"] == torch.__version__
    assert set(pama_ext.available_backends()) == set(info["backends"])
