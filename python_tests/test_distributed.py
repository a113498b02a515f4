"""Data parallelism: 2 processes, gloo backend, CPU, each rank holding different data.

One spawn (module fixture) runs every scenario and saves what each rank saw; the tests
compare it with single-process runs on the concatenated batch:

* the weights of ``batch`` / ``batch_mean`` / ``sequence_gram`` are identical on both ranks
  and equal those of the whole batch (ragged masks: the ranks hold different numbers of tokens);
* under DDP, the parameters after a step equal a single-process step on the whole batch
  when every rank holds the same number of masked tokens;
* gradient accumulation and distribution together; an explicit ``process_group``;
  ``sync_statistics=False``; ``mgda_ub`` and ``mgda`` weights.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import pama_ext

WORLD = 2
B_GLOBAL, T, N_OBJ, V, H = 8, 6, 3, 11, 8
pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


class Policy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(0.5 * torch.randn(V, H, generator=g, dtype=torch.float64))
        self.w = torch.nn.Parameter(0.5 * torch.randn(H, H, generator=g, dtype=torch.float64))
        self.head = torch.nn.Parameter(0.5 * torch.randn(H, V, generator=g, dtype=torch.float64))

    def forward(self, tokens):
        h = torch.tanh(self.emb[tokens] @ self.w)
        return torch.log_softmax(h @ self.head, dim=-1).gather(-1, tokens[..., None])[..., 0], h


def global_batch(mask_kind: str):
    """tokens, old_logp, advantages [B, T, N], mask of the whole batch; rank r holds rows
    [r * B/2, (r + 1) * B/2)."""
    g = torch.Generator().manual_seed(42)
    tokens = torch.randint(0, V, (B_GLOBAL, T), generator=g)
    with torch.no_grad():
        logp, _ = Policy()(tokens)
    old = logp + 0.25 * torch.randn(B_GLOBAL, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B_GLOBAL, T, N_OBJ, generator=g, dtype=torch.float64) + torch.tensor([-0.3, 0.0, 0.3], dtype=torch.float64)
    if mask_kind == "full":
        mask = torch.ones(B_GLOBAL, T, dtype=torch.bool)
    elif mask_kind == "balanced":  # ragged rows, but both halves hold the same number of tokens
        lengths = torch.tensor([6, 2, 4, 3, 5, 3, 1, 6])
        assert int(lengths[:4].sum()) == int(lengths[4:].sum())
        mask = torch.arange(T)[None, :] < lengths[:, None]
    else:  # ragged: the ranks hold different numbers of tokens
        lengths = torch.tensor([6, 1, 2, 0, 6, 5, 4, 6])
        mask = torch.arange(T)[None, :] < lengths[:, None]
    return tokens, old, adv, mask


def shard(t, rank):
    n = B_GLOBAL // WORLD
    return t[rank * n : (rank + 1) * n]


def _gathered(x: torch.Tensor):
    out = [torch.empty_like(x) for _ in range(WORLD)]
    dist.all_gather(out, x.contiguous())
    return out


def _worker(rank: int, init_file: str, out_dir: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    res = {}
    try:
        # 1. weights of batch / batch_mean / sequence_gram, ragged (unequal token counts), default group
        for gran in ("batch", "batch_mean", "sequence_gram"):
            tokens, old, adv, mask = (shard(t, rank) for t in global_batch("ragged"))
            model = Policy()
            opt = pama_ext.PAMA(torch.optim.SGD(model.parameters(), lr=0.5), N_OBJ, granularity=gran)
            opt.loss(model(tokens)[0], old, adv, mask)
            res[f"weights_{gran}"] = _gathered(opt.last_weights)
            res[f"local_M_{gran}"] = opt.last_stats.masked_tokens.clone()
        # 2. DDP step, equal token counts per rank
        for gran in ("batch", "batch_mean", "sequence_gram"):
            tokens, old, adv, mask = (shard(t, rank) for t in global_batch("balanced"))
            model = torch.nn.parallel.DistributedDataParallel(Policy())
            opt = pama_ext.PAMA(torch.optim.SGD(model.parameters(), lr=0.5), N_OBJ, granularity=gran)
            loss = opt.loss(model(tokens)[0], old, adv, mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
            res[f"ddp_params_{gran}"] = [p.detach().clone() for p in model.module.parameters()]
            res[f"ddp_weights_{gran}"] = _gathered(opt.last_weights)
        # 3. accumulation (2 micro-batches per rank) + distribution: one all-reduce per step
        tokens, old, adv, mask = (shard(t, rank) for t in global_batch("ragged"))
        model = Policy()
        opt = pama_ext.PAMA(torch.optim.SGD(model.parameters(), lr=0.5), N_OBJ, granularity="batch")
        with torch.no_grad():
            for r in (slice(0, 2), slice(2, 4)):
                opt.accumulate(model(tokens[r])[0], old[r], adv[r], mask[r])
        opt.solve()
        for r in (slice(0, 2), slice(2, 4)):
            opt.loss(model(tokens[r])[0], old[r], adv[r], mask[r])
            res.setdefault("accum_weights", []).append(_gathered(opt.last_weights))
        # 3b. the same for sequence_gram (micro-batches of whole responses, unequal lengths)
        opt = pama_ext.PAMA(torch.optim.SGD(model.parameters(), lr=0.5), N_OBJ, granularity="sequence_gram")
        with torch.no_grad():
            for r in (slice(0, 1), slice(1, 4)):
                opt.accumulate(model(tokens[r])[0], old[r], adv[r], mask[r])
        opt.solve()
        for r in (slice(0, 1), slice(1, 4)):
            opt.loss(model(tokens[r])[0], old[r], adv[r], mask[r])
            res.setdefault("accum_weights_sequence_gram", []).append(_gathered(opt.last_weights))
        # 4. an explicit process group; and sync_statistics=False
        group = dist.new_group(list(range(WORLD)))
        opt = pama_ext.PAMA(torch.optim.SGD(model.parameters(), lr=0.5), N_OBJ, granularity="batch", process_group=group)
        opt.loss(model(tokens)[0], old, adv, mask)
        res["group_weights"] = _gathered(opt.last_weights)
        opt = pama_ext.PAMA(torch.optim.SGD(model.parameters(), lr=0.5), N_OBJ, granularity="batch", sync_statistics=False)
        opt.loss(model(tokens)[0], old, adv, mask)
        res["local_weights"] = opt.last_weights.clone()
        # 5. mgda_ub (Gram summed over ranks) and mgda (per-objective gradients averaged), equal counts
        tokens, old, adv, mask = (shard(t, rank) for t in global_batch("balanced"))
        for combiner in ("mgda_ub", "mgda"):
            model = torch.nn.parallel.DistributedDataParallel(Policy())
            opt = pama_ext.PAMA(torch.optim.SGD(model.parameters(), lr=0.5), N_OBJ, combiner=combiner)
            logp, h = model(tokens)
            loss = opt.loss(logp, old, adv, mask, shared=h if combiner == "mgda_ub" else None)
            opt.zero_grad()
            loss.backward()
            opt.step()
            res[f"{combiner}_weights"] = _gathered(opt.last_weights)
            res[f"{combiner}_params"] = [p.detach().clone() for p in model.module.parameters()]
        # 6. two loss calls before a step, no accumulation: each uses its own batch's weights
        model = Policy()
        opt = pama_ext.PAMA(torch.optim.SGD(model.parameters(), lr=0.5), N_OBJ, granularity="batch")
        for kind in ("ragged", "balanced"):
            tokens, old, adv, mask = (shard(t, rank) for t in global_batch(kind))
            opt.loss(model(tokens)[0], old, adv, mask)
            res[f"second_call_{kind}"] = _gathered(opt.last_weights)
    finally:
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _run_workers(tmp, timeout_s: float = 180.0):
    """Start the ranks (fork where available: no second import of torch, seconds saved on a busy
    machine; the workers run single-threaded, so no OpenMP pool is used after the fork), join
    with a deadline so that a hang fails the test instead of blocking the suite."""
    import multiprocessing
    import time

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    # the first Optimizer() imports torch._dynamo (seconds): do it once, before the fork
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    ctx = torch.multiprocessing.start_processes(
        _worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=False, start_method=method
    )
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"distributed workers did not finish in {timeout_s} s")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    _run_workers(tmp)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def single_process(mask_kind, granularity="batch", combiner="pama", step=False):
    tokens, old, adv, mask = global_batch(mask_kind)
    model = Policy()
    opt = pama_ext.PAMA(torch.optim.SGD(model.parameters(), lr=0.5), N_OBJ, granularity=granularity if combiner == "pama" else None, combiner=combiner)
    logp, h = model(tokens)
    loss = opt.loss(logp, old, adv, mask, shared=h if combiner == "mgda_ub" else None)
    if step:
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt.last_weights, [p.detach() for p in model.parameters()]


def assert_identical_on_ranks(gathered):
    for g in gathered[1:]:
        assert torch.equal(g, gathered[0])


@pytest.mark.parametrize("granularity", ["batch", "batch_mean", "sequence_gram"])
def test_weights_identical_and_equal_to_the_whole_batch(ranks, granularity):
    for r in range(WORLD):
        assert_identical_on_ranks(ranks[r][f"weights_{granularity}"])
    assert float(ranks[0][f"local_M_{granularity}"]) != float(ranks[1][f"local_M_{granularity}"])
    w_single, _ = single_process("ragged", granularity)
    torch.testing.assert_close(ranks[0][f"weights_{granularity}"][0], w_single, rtol=0, atol=1e-12)


@pytest.mark.parametrize("granularity", ["batch", "batch_mean", "sequence_gram"])
def test_ddp_step_equals_single_process_step(ranks, granularity):
    w_single, p_single = single_process("balanced", granularity, step=True)
    for r in range(WORLD):
        assert_identical_on_ranks(ranks[r][f"ddp_weights_{granularity}"])
        torch.testing.assert_close(ranks[r][f"ddp_weights_{granularity}"][0], w_single, rtol=0, atol=1e-12)
        for p, q in zip(ranks[r][f"ddp_params_{granularity}"], p_single):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("granularity", ["batch", "sequence_gram"])
def test_accumulation_with_distribution(ranks, granularity):
    w_single, _ = single_process("ragged", granularity)
    key = "accum_weights" if granularity == "batch" else f"accum_weights_{granularity}"
    assert len(ranks[0][key]) == 2
    for r in range(WORLD):
        for gathered in ranks[r][key]:
            assert_identical_on_ranks(gathered)
            torch.testing.assert_close(gathered[0], w_single, rtol=0, atol=1e-12)
    if granularity == "sequence_gram":  # not batch's weights: the lengths are ragged
        assert not torch.allclose(w_single, single_process("ragged", "batch")[0], rtol=0, atol=1e-6)


def test_explicit_group_and_local_solve(ranks):
    w_single, _ = single_process("ragged")
    for r in range(WORLD):
        assert_identical_on_ranks(ranks[r]["group_weights"])
        torch.testing.assert_close(ranks[r]["group_weights"][0], w_single, rtol=0, atol=1e-12)
        tokens, old, adv, mask = (shard(t, r) for t in global_batch("ragged"))
        w_local = pama_ext.pama_weights(Policy()(tokens)[0].detach(), old, adv, mask, granularity="batch")
        torch.testing.assert_close(ranks[r]["local_weights"], w_local, rtol=0, atol=1e-12)
    assert not torch.allclose(ranks[0]["local_weights"], ranks[1]["local_weights"])


@pytest.mark.parametrize("combiner", ["mgda_ub", "mgda"])
def test_mgda_baselines_distributed(ranks, combiner):
    w_single, p_single = single_process("balanced", combiner=combiner, step=True)
    for r in range(WORLD):
        assert_identical_on_ranks(ranks[r][f"{combiner}_weights"])
        torch.testing.assert_close(ranks[r][f"{combiner}_weights"][0], w_single, rtol=1e-9, atol=1e-10)
        for p, q in zip(ranks[r][f"{combiner}_params"], p_single):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_each_loss_call_solves_its_own_batch(ranks):
    for kind in ("ragged", "balanced"):
        w_single, _ = single_process(kind)
        for r in range(WORLD):
            assert_identical_on_ranks(ranks[r][f"second_call_{kind}"])
            torch.testing.assert_close(ranks[r][f"second_call_{kind}"][0], w_single, rtol=0, atol=1e-12)
    assert not torch.allclose(ranks[0]["second_call_ragged"][0], ranks[0]["second_call_balanced"][0])
