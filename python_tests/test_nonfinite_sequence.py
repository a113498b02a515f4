"""nonfinite="mask" with non-finite advantages: such rows / tokens are dropped exactly as if masked out.

Issue 10, defect 3: per-sequence advantages [B, N] holding +inf gave a NaN loss, weights and
objective in the C++ kernel (the per-row sums were formed as ``A_i * sum_m`` with ``sum_m = 0``
for a row whose every token is invalid: inf * 0 = NaN). The documented guard drops a
non-finite token (and, for [B, N] advantages, the whole row) as if it were masked out, on
every backend.

Every test compares a backend on the poisoned inputs (nonfinite="mask") with the same backend
on the clean inputs whose poisoned rows / tokens are masked out (tight tolerance: the kernels
sum the same values), and with the float64 reference (``backend="torch"`` on the upcast clean
inputs, ``conftest.TOLS``): loss, weights, row scales, statistics and the gradient wrt logp.

Backends: those of ``conftest.BACKENDS`` on CPU tensors, ``cuda`` and ``triton`` on CUDA
tensors (skipped without a GPU or when the backend is unavailable).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pama_ext
from conftest import (
    BACKENDS,
    GRANULARITIES,
    LOSS_AGGS,
    TOLS,
    Inputs,
    assert_close_rel,
    loss_and_grad,
    make_inputs,
    upcast,
)

F64 = torch.float64
INF, NAN = math.inf, math.nan
NS = (1, 2, 3, 5)
KINDS = ("+inf", "-inf", "nan", "mixed")
# stats fields equal between the poisoned and the masked-out batch: masked_tokens,
# clipped_tokens, nonempty_rows (2..4 count the poison; 5, 6 are floats, compared with a tolerance)
COUNTS = [0, 1, 7]

CASES = [pytest.param((b, "cpu"), id=f"{b}-cpu") for b in BACKENDS] + [
    pytest.param((b, "cuda"), id=f"{b}-cuda") for b in ("cuda", "triton")
]


@pytest.fixture(params=CASES)
def case(request):
    """(backend, device); GPU cases skip cleanly without a GPU or an available backend."""
    backend, device = request.param
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if backend not in pama_ext.available_backends():
        pytest.skip(f"backend {backend!r} unavailable: {pama_ext.build_info()['unavailable'].get(backend)}")
    return backend, device


def _to(x: Inputs, device: str) -> Inputs:
    return Inputs(*(t.to(device) for t in x))


def _values(kind: str, k: int):
    """The k-th poison value of a kind."""
    if kind == "mixed":
        return (INF, NAN, -INF)[k % 3]
    return {"+inf": INF, "-inf": -INF, "nan": NAN}[kind]


def poison(x: Inputs, kind: str, per_sequence: bool, rows=None):
    """(poisoned inputs, clean inputs with the poisoned rows / tokens masked out, dropped [B, T]).

    [B, N]: rows 0, 2, 3 (or ``rows``) get the poison in one objective (the second row: in all).
    [B, T, N]: a few tokens, each with the poison in one objective (one in all of them); the
    poisoned positions are made masked-in so that they are counted.
    """
    B, T = x.logp.shape
    N = x.advantages.shape[-1]
    adv, mask = x.advantages.clone(), x.mask.clone()
    dropped = torch.zeros(B, T, dtype=torch.bool)
    if per_sequence:
        rows = [r for r in (0, 2, 3) if r < B] if rows is None else rows
        for k, r in enumerate(rows):
            if k == 1:
                adv[r, :] = _values(kind, k)
            else:
                adv[r, k % N] = _values(kind, k)
            dropped[r] = True
    else:
        tokens = [(0, 0), (0, T - 1), (1, T // 2), (3 % B, 1 % T), (B - 1, T - 2)]
        for k, (b, t) in enumerate(tokens):
            mask[b, t] = True
            if k == 2:
                adv[b, t, :] = _values(kind, k)
            else:
                adv[b, t, k % N] = _values(kind, k)
            dropped[b, t] = True
    bad = Inputs(x.logp, x.old_logp, adv, mask)
    clean = Inputs(x.logp, x.old_logp, x.advantages, mask & ~dropped)
    return bad, clean, dropped & mask


def run(x: Inputs, backend, device, granularity, loss_agg, nonfinite):
    loss, grad, st = loss_and_grad(
        _to(x, device), granularity=granularity, loss_agg=loss_agg, backend=backend, nonfinite=nonfinite
    )
    return loss.cpu(), grad.cpu(), st.weights.cpu(), st.row_scale.cpu(), st.stats.cpu()


def check_dropped_like_masked(bad, clean, dropped, backend, device, granularity, loss_agg, what):
    """The poisoned batch under nonfinite="mask" == the clean batch with ``dropped`` masked out."""
    dtype = bad.logp.dtype
    loss, grad, w, r, s = run(bad, backend, device, granularity, loss_agg, "mask")
    for name, t in (("loss", loss), ("grad", grad), ("weights", w), ("row_scale", r), ("stats", s)):
        assert bool(torch.isfinite(t).all()), f"{what}: non-finite {name}: {t}"
    assert torch.equal(grad[dropped], torch.zeros_like(grad[dropped])), f"{what}: gradient at dropped tokens"
    # the statistics count the poison at masked-in positions only, and only as advantages
    n_tok = bad.advantages if bad.advantages.dim() == 3 else bad.advantages[:, None, :].expand(*bad.logp.shape, -1)
    n_bad = float((bad.mask & ~torch.isfinite(n_tok).all(-1)).sum())
    assert s[2:5].tolist() == [0.0, 0.0, n_bad], f"{what}: stats {s.tolist()}"

    # 1) the same backend on the masked-out batch: the same values are summed (tight)
    e_loss, e_grad, e_w, e_r, e_s = run(clean, backend, device, granularity, loss_agg, "raise")
    tight = 1e-13 if dtype == F64 else 1e-6
    assert_close_rel(loss, e_loss, tight, msg=f"{what}: loss vs masked-out")
    assert_close_rel(grad, e_grad, tight, msg=f"{what}: grad vs masked-out")
    assert_close_rel(w, e_w, 0.0, atol=tight, msg=f"{what}: weights vs masked-out")
    assert_close_rel(r, e_r, tight, msg=f"{what}: row_scale vs masked-out")
    assert torch.equal(s[COUNTS], e_s[COUNTS]), f"{what}: stats {s.tolist()} vs {e_s.tolist()}"
    assert_close_rel(s[5], e_s[5], tight, atol=1e-300, msg=f"{what}: objective vs masked-out")
    assert float(s[6]) <= 1e-9 * max(float(s[5]), float(e_s[5])) + 1e-300, f"{what}: kkt residual {s[6]}"

    # 2) the float64 reference on the masked-out batch (rounded inputs, upcast); that is 1) for
    #    backend="torch" on float64 CPU inputs
    if backend == "torch" and device == "cpu" and dtype == F64:
        return loss, grad, w, s
    ref_loss, ref_grad, ref_w, ref_r, ref_s = run(upcast(clean), "torch", "cpu", granularity, loss_agg, "raise")
    loss_rtol, grad_rtol, w_atol = TOLS[dtype]
    assert_close_rel(loss, ref_loss, loss_rtol, msg=f"{what}: loss vs float64 reference")
    assert_close_rel(grad, ref_grad, grad_rtol, msg=f"{what}: grad vs float64 reference")
    assert_close_rel(w, ref_w, 0.0, atol=w_atol, msg=f"{what}: weights vs float64 reference")
    assert_close_rel(r, ref_r, loss_rtol, msg=f"{what}: row_scale vs float64 reference")
    assert torch.equal(s[COUNTS], ref_s[COUNTS]), f"{what}: stats {s.tolist()} vs reference {ref_s.tolist()}"
    assert_close_rel(s[5], ref_s[5], max(loss_rtol, 1e-10), atol=1e-300, msg=f"{what}: objective vs reference")
    return loss, grad, w, s


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("per_sequence", [True, False], ids=["adv_BN", "adv_BTN"])
def test_nonfinite_advantages_dropped_like_masked(case, per_sequence, granularity, dtype):
    backend, device = case
    for N in NS:
        for k, kind in enumerate(KINDS):
            loss_agg = LOSS_AGGS[(k + N) % 2]  # each N and each kind meets both aggregations
            x = make_inputs(5, 9, N, dtype, per_sequence=per_sequence, mask_kind="random", seed=10 * N + k)
            bad, clean, dropped = poison(x, kind, per_sequence)
            what = f"{backend}/{device} N={N} {kind} {loss_agg}"
            check_dropped_like_masked(bad, clean, dropped, backend, device, granularity, loss_agg, what)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("per_sequence", [True, False], ids=["adv_BN", "adv_BTN"])
def test_nonfinite_advantages_long_rows(case, per_sequence, granularity):
    """Rows longer than the C++ kernel's 2048-token block (rows split into segments)."""
    backend, device = case
    if backend == "triton" and device == "cpu":
        pytest.skip("too slow in Triton's interpreter")
    for N, dtype, kind in ((1, torch.float32, "+inf"), (3, F64, "mixed")):
        x = make_inputs(3, 2100, N, dtype, per_sequence=per_sequence, mask_kind="random", seed=7 + N)
        bad, clean, dropped = poison(x, kind, per_sequence)
        check_dropped_like_masked(bad, clean, dropped, backend, device, granularity, "seq_mean_token_mean", f"N={N}")


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("per_sequence", [True, False], ids=["adv_BN", "adv_BTN"])
def test_every_row_nonfinite_gives_zero_loss(case, per_sequence, granularity, dtype):
    """An empty effective mask: loss 0, zero (finite) gradient, as with an empty mask."""
    backend, device = case
    for N in NS:
        for k, kind in enumerate(KINDS):
            loss_agg = LOSS_AGGS[(k + N) % 2]
            x = make_inputs(3, 6, N, dtype, per_sequence=per_sequence, mask_kind="full", seed=N)
            if per_sequence:
                bad, clean, dropped = poison(x, kind, True, rows=[0, 1, 2])
            else:
                adv = x.advantages.clone()
                adv[..., (N - 1) // 2] = _values(kind, 0)
                if kind == "mixed":
                    adv[1, :, :] = NAN
                    adv[2, ::2, -1] = -INF
                bad = x._replace(advantages=adv)
                clean, dropped = x._replace(mask=torch.zeros_like(x.mask)), x.mask.clone()
            what = f"{backend}/{device} N={N} {kind} {loss_agg}"
            loss, grad, w, s = check_dropped_like_masked(
                bad, clean, dropped, backend, device, granularity, loss_agg, what
            )
            assert float(loss) == 0.0 and bool((grad == 0).all()), what
            assert s[0] == 0 and s[7] == 0 and s[4] == 18, (what, s)
            if granularity in ("batch", "batch_mean", "sequence_gram"):
                assert_close_rel(w, torch.full((N,), 1.0 / N), 0.0, atol=1e-7, msg=what)


@pytest.mark.parametrize("backend", BACKENDS)
@given(
    B=st.integers(1, 6),
    T=st.integers(1, 12),
    N=st.sampled_from(NS),
    per_sequence=st.booleans(),
    granularity=st.sampled_from(GRANULARITIES),
    loss_agg=st.sampled_from(LOSS_AGGS),
    dtype=st.sampled_from([F64, torch.float32]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_property_random_poison_dropped_like_masked(
    backend, B, T, N, per_sequence, granularity, loss_agg, dtype, seed, data
):
    """Random poison (+-inf, NaN) at random objectives of random rows / tokens (CPU backends)."""
    x = make_inputs(B, T, N, dtype, per_sequence=per_sequence, mask_kind="random", seed=seed)
    adv = x.advantages.clone()
    flat = adv.view(-1, N)  # [B, N] or [B * T, N]
    n_bad = data.draw(st.integers(1, flat.shape[0]), label="n_bad")
    where = data.draw(st.lists(st.integers(0, flat.shape[0] - 1), min_size=n_bad, max_size=n_bad), label="rows")
    for k, p in enumerate(where):
        objs = data.draw(st.lists(st.integers(0, N - 1), min_size=1, max_size=N), label=f"objs{k}")
        val = data.draw(st.sampled_from([INF, -INF, NAN]), label=f"val{k}")
        flat[p, objs] = val
    bad = x._replace(advantages=adv)
    if per_sequence:
        dropped = (~torch.isfinite(adv).all(-1))[:, None].expand(B, T)
    else:
        dropped = ~torch.isfinite(adv).all(-1)
    clean = Inputs(x.logp, x.old_logp, x.advantages, x.mask & ~dropped)
    check_dropped_like_masked(bad, clean, dropped & x.mask, backend, "cpu", granularity, loss_agg, "property")
