"""``pama_ext::pama_statistics``: the batch statistics from the fused op's reduction pass.

``PAMA.accumulate`` and ``batch_statistics`` get ``[M, clipped, Q, G]`` from the op. On CPU
tensors that is the C++ forward pass stopped before the solve (the same per-token loops as
the loss, every instruction set), elsewhere ``reference.batch_statistics``. Tested here: the
C++ kernel against the float64-summing reference for every statistics granularity, both
advantage layouts, dtypes, N specialised and generic, rows split into segments, empty rows,
non-finite inputs (dropped and counted), every instruction set; opcheck; the raise contract
through the public call; and that the weights solved from the statistics are the fused
loss's.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.library import opcheck

import pama_ext
from pama_ext import reference
from pama_ext._backends import _C
from pama_ext.statistics import STATISTICS_GRANULARITIES, BatchStatistics, batch_statistics

EPS = 0.2
NO_EXT = os.environ.get("PAMA_EXT_NO_EXT") == "1"
needs_ext = pytest.mark.skipif(NO_EXT, reason="PAMA_EXT_NO_EXT=1: the run without the extension")


def _inputs(b, t, n, dtype=torch.float32, per_sequence=False, seed=0, nonfinite=False):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=g, dtype=torch.float64)
    old = logp + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)  # some clipped tokens
    shape = (b, n) if per_sequence else (b, t, n)
    adv = torch.randn(*shape, generator=g, dtype=torch.float64)
    adv[adv.abs() < 0.2] = 0.0  # exact zeros, as GRPO groups give
    mask = torch.rand(b, t, generator=g) < 0.8
    if b > 1:
        mask[1] = False  # an empty row
    logp, old, adv = logp.to(dtype), old.to(dtype), adv.to(dtype)
    if nonfinite:
        logp[0, 1] = float("nan")
        old[-1, -1] = float("inf")
        if per_sequence:
            adv[-1, 0] = float("inf")
        else:
            adv[0, 2 % t, n - 1] = float("-inf")
        mask[0, 1] = mask[-1, -1] = mask[0, 2 % t] = True
    return logp, old, adv, mask


def _compare(got, want, n):
    (gd, gbad), (wd, wbad) = got, want
    assert gd.dtype == wd.dtype == torch.float64 and gd.shape == wd.shape == (2 + n + n * n,)
    assert torch.equal(gbad, wbad)  # counts: exact
    assert torch.equal(gd[:2], wd[:2])  # M and clipped: exact
    scale = wd[2:].abs().max().clamp_min(1.0)
    # float64 sums of exact products; only the summation order differs
    torch.testing.assert_close(gd[2:], wd[2:], rtol=1e-12, atol=1e-12 * float(scale))


CASES = [  # (B, T): one row of one token, odd shapes, rows split into kBlock segments
    (1, 1), (3, 7), (5, 129), (2, 2500),
]


@needs_ext
@pytest.mark.parametrize("granularity", STATISTICS_GRANULARITIES)
@pytest.mark.parametrize("per_sequence", [False, True])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 16])
@pytest.mark.parametrize("shape", CASES)
def test_cpu_kernel_equals_reference(granularity, per_sequence, n, shape):
    x = _inputs(*shape, n, per_sequence=per_sequence, seed=n)
    got = _C.pama_statistics(*x, EPS, granularity)
    _compare(got, reference.batch_statistics(*x, EPS, granularity), n)
    if granularity == "batch_mean":
        assert not got[0][2 + n:].any()  # no Gram for batch_mean


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("granularity", STATISTICS_GRANULARITIES)
@pytest.mark.parametrize("per_sequence", [False, True])
def test_dtypes_and_nonfinite_inputs(dtype, granularity, per_sequence):
    x = _inputs(4, 33, 3, dtype=dtype, per_sequence=per_sequence, nonfinite=True)
    got = _C.pama_statistics(*x, EPS, granularity)
    want = reference.batch_statistics(*x, EPS, granularity)
    _compare(got, want, 3)
    assert got[1].tolist() == [1.0, 1.0, 1.0 if not per_sequence else float(x[3][-1].sum())]
    assert torch.isfinite(got[0]).all()  # dropped, not propagated


@needs_ext
@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
@pytest.mark.parametrize("n", [4, 8, 17])
def test_every_instruction_set(isa, n, monkeypatch):
    # a set the CPU lacks falls back to the best it has (never SIGILL): still a valid check
    monkeypatch.setenv("PAMA_EXT_CPU_ISA", isa)
    for granularity in STATISTICS_GRANULARITIES:
        x = _inputs(3, 300, n, seed=7)
        _compare(_C.pama_statistics(*x, EPS, granularity), reference.batch_statistics(*x, EPS, granularity), n)


@needs_ext
def test_cpu_tensors_use_the_kernel(monkeypatch):
    # the op's CPU dispatch is the C++ pass: make the reference fail and call the op
    def boom(*a, **k):
        raise AssertionError("the reference ran")

    monkeypatch.setattr(reference, "batch_statistics", boom)
    x = _inputs(3, 9, 2)
    data, bad = torch.ops.pama_ext.pama_statistics(*x, EPS, "batch")
    assert data.shape == (8,) and bad.shape == (3,)


@pytest.mark.parametrize("granularity", STATISTICS_GRANULARITIES)
@pytest.mark.parametrize("per_sequence", [False, True])
def test_opcheck(granularity, per_sequence):
    x = _inputs(3, 7, 3, per_sequence=per_sequence, nonfinite=True)
    opcheck(torch.ops.pama_ext.pama_statistics.default, (*x, EPS, granularity))


@pytest.mark.parametrize("granularity", STATISTICS_GRANULARITIES)
def test_raise_and_mask_through_the_public_call(granularity):
    x = _inputs(4, 33, 3, nonfinite=True)
    with pytest.raises(ValueError, match=r"batch_statistics: `logp` has 1 non-finite value\(s\) at masked positions"):
        batch_statistics(*x, granularity=granularity)
    st = batch_statistics(*x, granularity=granularity, nonfinite="mask")
    clean_mask = x[3].clone()
    clean_mask[0, 1] = clean_mask[-1, -1] = clean_mask[0, 2] = False  # the tokens the rule drops
    clean = [torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0) for v in x[:3]]
    ref = batch_statistics(*clean, clean_mask, granularity=granularity)
    torch.testing.assert_close(st.data, ref.data, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("granularity", ["batch", "sequence_gram", "batch_mean"])
@pytest.mark.parametrize("per_sequence", [False, True])
def test_solved_weights_are_the_fused_losss(granularity, per_sequence):
    # both implementations: the op (the C++ pass on CPU) and the torch one other devices use
    x = _inputs(6, 40, 4, dtype=torch.float64, per_sequence=per_sequence)
    want = pama_ext.pama_weights(*x, granularity=granularity).to(torch.float64)
    st_op = batch_statistics(*x, granularity=granularity)
    st_ref = BatchStatistics(reference.batch_statistics(*x, EPS, granularity)[0], 4)
    for st in (st_op, st_ref):
        torch.testing.assert_close(st.solve(granularity).weights, want, rtol=1e-9, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("granularity", STATISTICS_GRANULARITIES)
@pytest.mark.parametrize("per_sequence", [False, True])
def test_cuda_tensors_give_the_cpu_statistics(granularity, per_sequence):
    # CUDA tensors take the torch implementation, on the device, with no host sync for "mask"
    x = _inputs(5, 300, 4, per_sequence=per_sequence, nonfinite=True)
    data, bad = torch.ops.pama_ext.pama_statistics(*(v.cuda() for v in x), EPS, granularity)
    assert data.is_cuda and bad.is_cuda
    _compare((data.cpu(), bad.cpu()), reference.batch_statistics(*x, EPS, granularity), 4)
    st = batch_statistics(*(v.cuda() for v in x), granularity=granularity, nonfinite="mask")
    torch.testing.assert_close(st.data.cpu(), data.cpu())
