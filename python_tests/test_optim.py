"""pama_ext.PAMA as a torch.optim.Optimizer: shared param_groups, base optimizers, LR schedulers,
closures, zero_grad, hooks, GradScaler (fp16), bf16 autocast, state_dict round trips."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from conftest import make_inputs
from torch.optim import Optimizer

import pama_ext

N_OBJ = 2
B, T, V, H = 6, 8, 17, 16


class Policy(torch.nn.Module):
    def __init__(self, dtype=torch.float32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(V, H, dtype=dtype)
        self.lin = torch.nn.Linear(H, H, dtype=dtype)
        self.head = torch.nn.Linear(H, V, dtype=dtype)

    def forward(self, tokens):
        h = torch.tanh(self.lin(self.emb(tokens)))
        logits = self.head(h)
        return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[..., None])[..., 0]


def batch(seed=0, n=N_OBJ, mask_kind="ragged"):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, T), generator=g)
    x = make_inputs(B, T, n, dtype=torch.float32, mask_kind=mask_kind, seed=seed)
    with torch.no_grad():
        old = Policy()(tokens) + 0.1 * torch.randn(B, T, generator=g)
    return tokens, old, x.advantages, x.mask


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_params_equal(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# --------------------------------------------------------------------------- optimizer protocol
def test_is_an_optimizer_sharing_the_base_state():
    model = Policy()
    base = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = pama_ext.PAMA(base, N_OBJ)
    assert isinstance(opt, Optimizer)
    assert opt.param_groups is base.param_groups and opt.state is base.state and opt.defaults is base.defaults
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.5})
    assert len(base.param_groups) == 2
    assert "PAMA(num_objectives=2" in repr(opt)
    # load_state_dict of the base replaces its lists: the views follow
    base.load_state_dict(base.state_dict())
    assert opt.param_groups is base.param_groups and opt.state is base.state
    with pytest.raises(TypeError, match="already a PAMA"):
        pama_ext.PAMA(opt, N_OBJ)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        pama_ext.PAMA(model, N_OBJ)


@pytest.mark.parametrize(
    "make_base",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lambda p: torch.optim.AdamW(p, lr=1e-2),
        lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=True),
        lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),
    ],
    ids=["sgd", "adamw", "adamw-foreach", "adamw-fused"],
)
def test_step_equals_the_base_optimizer_on_pama_loss(make_base):
    tokens, old, adv, mask = batch(seed=1)
    m1, m2 = Policy(), Policy()
    o1 = pama_ext.PAMA(make_base(m1.parameters()), N_OBJ)
    o2 = make_base(m2.parameters())
    for _ in range(3):
        l1 = o1.loss(m1(tokens), old, adv, mask)
        o1.zero_grad()
        l1.backward()
        o1.step()
        l2 = pama_ext.pama_loss(m2(tokens), old, adv, mask)
        o2.zero_grad()
        l2.backward()
        o2.step()
        assert torch.equal(l1.detach(), l2.detach())
    assert_params_equal(params_of(m1), params_of(m2))
    assert o1.step_count == 3


def test_lr_scheduler_and_zero_grad():
    tokens, old, adv, mask = batch(seed=2)
    model = Policy()
    opt = pama_ext.PAMA(torch.optim.AdamW(model.parameters(), lr=1.0), N_OBJ)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        for s in range(3):
            opt.zero_grad()
            opt.loss(model(tokens), old, adv, mask).backward()
            opt.step()
            sched.step()
            assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.5 ** (s + 1))
    assert sched.get_last_lr() == [pytest.approx(0.125)]
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and bool((p.grad == 0).all()) for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_step_with_closure():
    tokens, old, adv, mask = batch(seed=3)
    for make in (lambda p: torch.optim.SGD(p, lr=0.1), lambda p: torch.optim.LBFGS(p, lr=0.1, max_iter=3)):
        m1, m2 = Policy(), Policy()
        o1 = pama_ext.PAMA(make(m1.parameters()), N_OBJ)
        o2 = make(m2.parameters())

        def closure1():
            o1.zero_grad()
            loss = o1.loss(m1(tokens), old, adv, mask)
            loss.backward()
            return loss

        def closure2():
            o2.zero_grad()
            loss = pama_ext.pama_loss(m2(tokens), old, adv, mask)
            loss.backward()
            return loss

        out1, out2 = o1.step(closure1), o2.step(closure2)
        assert torch.equal(out1.detach(), out2.detach())
        assert_params_equal(params_of(m1), params_of(m2))


def test_step_hooks_fire():
    tokens, old, adv, mask = batch(seed=4)
    model = Policy()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = pama_ext.PAMA(base, N_OBJ)
    calls = []
    h1 = opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", o)))
    h2 = opt.register_step_post_hook(lambda o, a, k: calls.append(("post", o)))
    h3 = base.register_step_post_hook(lambda o, a, k: calls.append(("base-post", o)))
    opt.loss(model(tokens), old, adv, mask).backward()
    opt.step()
    assert [c[0] for c in calls] == ["pre", "base-post", "post"]
    assert calls[0][1] is opt and calls[1][1] is base
    for h in (h1, h2, h3):
        h.remove()
    opt.step()
    assert len(calls) == 3
    # state_dict hooks
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("sd-pre"))
    opt.register_load_state_dict_post_hook(lambda o: seen.append("load-post"))
    opt.load_state_dict(opt.state_dict())
    assert seen == ["sd-pre", "load-post"]


def test_validation_errors():
    model = Policy()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="unknown combiner"):
        pama_ext.PAMA(base, 2, combiner="nope")
    with pytest.raises(ValueError, match="unknown granularity"):
        pama_ext.PAMA(base, 2, granularity="nope")
    with pytest.raises(ValueError, match="`preference` is for combiner='linear' or 'pama', not 'mgda_ub'"):
        pama_ext.PAMA(base, 2, combiner="mgda_ub", preference=[0.5, 0.5])
    with pytest.raises(ValueError, match="must be > 0 for every objective with combiner 'pama'"):
        pama_ext.PAMA(base, 2, preference=[1.0, 0.0])  # steerable PAMA never trades an objective away
    with pytest.raises(ValueError, match="applies to combiner='pama' only"):
        pama_ext.PAMA(base, 2, combiner="linear", granularity="token")
    with pytest.raises(ValueError, match=r"`preference` must have shape \[N\]"):
        pama_ext.PAMA(base, 2, combiner="linear", preference=[1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="num_objectives"):
        pama_ext.PAMA(base, 0)
    with pytest.raises(ValueError, match="unknown backend"):
        pama_ext.PAMA(base, 2, backend="nope")
    tokens, old, adv, mask = batch(seed=5, n=3)
    opt = pama_ext.PAMA(base, 2)
    with pytest.raises(ValueError, match="num_objectives = 2"):
        opt.loss(model(tokens), old, adv, mask)
    lin = pama_ext.PAMA(base, 3, combiner="linear")
    with pytest.raises(ValueError, match=r"\[B, N\] = \[6, 3\]"):
        lin.loss(model(tokens), old, adv, mask, preference=torch.ones(5, 3))
    with pytest.raises(ValueError, match="`preference` is for combiner='linear' or 'pama', not 'mgda'"):
        pama_ext.PAMA(base, 3, combiner="mgda").loss(model(tokens), old, adv, mask, preference=torch.ones(3))
    with pytest.raises(ValueError, match=r"`preference` must have shape \[N\] = \[3\] or \[B, N\] = \[6, 3\]"):
        pama_ext.PAMA(base, 3).loss(model(tokens), old, adv, mask, preference=torch.ones(2))


def test_deepcopy():
    model = Policy()
    opt = pama_ext.PAMA(torch.optim.AdamW(model.parameters(), lr=1e-3), N_OBJ, granularity="token")
    opt2 = copy.deepcopy(opt)
    assert opt2.granularity == "token" and opt2.optimizer is not opt.optimizer
    assert opt2.param_groups is opt2.optimizer.param_groups


# --------------------------------------------------------------------------- mixed precision
def test_grad_scaler_fp16_cpu():
    """GradScaler with a power-of-two scale: scaled-then-unscaled gradients are exact, so the
    run equals the unscaled one; an inf gradient skips the step and halves the scale."""
    tokens, old, adv, mask = batch(seed=6)
    m1, m2 = Policy(), Policy()
    o1 = pama_ext.PAMA(torch.optim.AdamW(m1.parameters(), lr=1e-2), N_OBJ)
    o2 = pama_ext.PAMA(torch.optim.AdamW(m2.parameters(), lr=1e-2), N_OBJ)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for _ in range(2):
        o1.zero_grad()
        scaler.scale(o1.loss(m1(tokens), old, adv, mask)).backward()
        scaler.step(o1)
        scaler.update()
        o2.zero_grad()
        o2.loss(m2(tokens), old, adv, mask).backward()
        o2.step()
    assert_params_equal(params_of(m1), params_of(m2))
    assert o1.step_count == 2
    # an overflowing gradient: the step is skipped, the scale backs off
    before = params_of(m1)
    o1.zero_grad()
    scaler.scale(o1.loss(m1(tokens), old, adv, mask)).backward()
    next(m1.parameters()).grad.view(-1)[0] = float("inf")
    scaler.step(o1)
    scaler.update()
    assert_params_equal(params_of(m1), before)
    assert o1.step_count == 2 and scaler.get_scale() == 2.0**9
    # fp16 autocast on CPU runs through the same loop
    o1.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = o1.loss(m1(tokens), old, adv, mask)
    scaler.scale(loss).backward()
    scaler.step(o1)
    scaler.update()
    assert o1.step_count == 3 and all(bool(torch.isfinite(p).all()) for p in m1.parameters())


@pytest.mark.parametrize("granularity", ["batch", "token"])
def test_bf16_autocast_cpu(granularity):
    tokens, old, adv, mask = batch(seed=7, mask_kind="full")
    m1, m2 = Policy(), Policy()
    o1 = pama_ext.PAMA(torch.optim.SGD(m1.parameters(), lr=0.1), N_OBJ, granularity=granularity)
    o2 = pama_ext.PAMA(torch.optim.SGD(m2.parameters(), lr=0.1), N_OBJ, granularity=granularity)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = m1(tokens)
        l1 = o1.loss(logp.to(torch.bfloat16), old, adv, mask)  # a bf16 logp, as some policies produce
    l1.backward()
    l2 = o2.loss(m2(tokens), old, adv, mask)
    l2.backward()
    assert torch.isfinite(l1) and abs(float(l1.detach()) - float(l2.detach())) < 0.05 * abs(float(l2.detach())) + 1e-3
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert bool(torch.isfinite(p1.grad).all())
        assert float((p1.grad - p2.grad).norm()) <= 0.1 * float(p2.grad.norm()) + 1e-6
    o1.step()


# --------------------------------------------------------------------------- checkpoints
def _train(model, opt, sched, steps, start=0, accumulate=False):
    for s in range(start, start + steps):
        tokens, old, adv, mask = batch(seed=100 + s)
        if accumulate:
            with torch.no_grad():
                for half in (slice(0, B // 2), slice(B // 2, B)):
                    opt.accumulate(model(tokens[half]), old[half], adv[half], mask[half])
            opt.zero_grad()
            for half in (slice(0, B // 2), slice(B // 2, B)):
                (opt.loss(model(tokens[half]), old[half], adv[half], mask[half]) / 2).backward()
        else:
            opt.zero_grad()
            opt.loss(model(tokens), old, adv, mask).backward()
        opt.step()
        sched.step()


@pytest.mark.parametrize("combiner,granularity,accumulate", [
    ("pama", "batch", False), ("pama", "batch_mean", True), ("pama", "sequence", False), ("linear", "batch", False),
    ("pama", "sequence_gram", True),
])
def test_state_dict_resume_equals_uninterrupted(combiner, granularity, accumulate):
    def make():
        model = Policy(seed=3)
        base = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        kw = {"preference": [0.3, 0.7]} if combiner == "linear" else {"granularity": granularity}
        opt = pama_ext.PAMA(base, N_OBJ, combiner=combiner, **kw)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return model, opt, sched

    m_full, o_full, s_full = make()
    _train(m_full, o_full, s_full, 6, accumulate=accumulate)

    m_a, o_a, s_a = make()
    _train(m_a, o_a, s_a, 3, accumulate=accumulate)
    buf = io.BytesIO()
    torch.save({"model": m_a.state_dict(), "opt": o_a.state_dict(), "sched": s_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    m_b, o_b, s_b = make()
    m_b.load_state_dict(ckpt["model"])
    o_b.load_state_dict(ckpt["opt"])
    s_b.load_state_dict(ckpt["sched"])
    assert o_b.step_count == 3 and o_b.param_groups[0]["lr"] == o_a.param_groups[0]["lr"]
    _train(m_b, o_b, s_b, 3, start=3, accumulate=accumulate)
    assert_params_equal(params_of(m_b), params_of(m_full))
    assert o_b.step_count == 6


def test_state_dict_keeps_an_unfinished_accumulation_and_the_config():
    model = Policy()
    opt = pama_ext.PAMA(torch.optim.SGD(model.parameters(), lr=0.1), N_OBJ, granularity="batch", clip_eps=0.3)
    tokens, old, adv, mask = batch(seed=8)
    with torch.no_grad():
        opt.accumulate(model(tokens), old, adv, mask)
    sd = opt.state_dict()
    assert set(sd) == {"base", "pama"} and sd["pama"]["config"]["clip_eps"] == 0.3
    other = pama_ext.PAMA(torch.optim.SGD(model.parameters(), lr=0.1), N_OBJ, granularity="batch_mean")
    other.load_state_dict(sd)
    assert other.granularity == "batch" and other.clip_eps == 0.3
    assert torch.equal(other.accumulated_statistics.data, opt.accumulated_statistics.data)
    assert torch.equal(other.solve(), opt.solve())
    sd2 = opt.state_dict()  # now with pinned weights
    third = pama_ext.PAMA(torch.optim.SGD(model.parameters(), lr=0.1), N_OBJ)
    third.load_state_dict(sd2)
    l1 = opt.loss(model(tokens), old, adv, mask)
    l2 = third.loss(model(tokens), old, adv, mask)
    assert torch.equal(l1, l2) and torch.equal(opt.last_weights, third.last_weights)
    # mismatches and plain state dicts
    with pytest.raises(ValueError, match="num_objectives=2"):
        pama_ext.PAMA(torch.optim.SGD(model.parameters(), lr=0.1), 3).load_state_dict(sd)
    with pytest.raises(ValueError, match="combiner='pama'"):
        pama_ext.PAMA(torch.optim.SGD(model.parameters(), lr=0.1), 2, combiner="linear").load_state_dict(sd)
    with pytest.warns(UserWarning, match="plain optimizer state dict"):
        third.load_state_dict(sd["base"])


def test_pama_state_dict_beside_a_base_checkpoint():
    """The split form for FSDP / torch.distributed.checkpoint: base state by their helpers,
    PAMA's own state beside it."""
    model = Policy()
    opt = pama_ext.PAMA(torch.optim.AdamW(model.parameters(), lr=1e-2), N_OBJ, granularity="batch_mean")
    tokens, old, adv, mask = batch(seed=9)
    for _ in range(2):
        opt.zero_grad()
        opt.loss(model(tokens), old, adv, mask).backward()
        opt.step()
    with torch.no_grad():
        opt.accumulate(model(tokens), old, adv, mask)
    base_sd, pama_sd = opt.optimizer.state_dict(), opt.pama_state_dict()
    other = pama_ext.PAMA(torch.optim.AdamW(model.parameters(), lr=1e-2), N_OBJ)
    other.optimizer.load_state_dict(base_sd)
    other.load_pama_state_dict(pama_sd)
    assert other.step_count == 2 and other.granularity == "batch_mean"
    assert torch.equal(other.accumulated_statistics.data, opt.accumulated_statistics.data)
    assert torch.equal(other.last_weights, opt.last_weights)
    with pytest.raises(ValueError, match="num_objectives=2"):
        pama_ext.PAMA(torch.optim.AdamW(model.parameters()), 3).load_pama_state_dict(pama_sd)


@pytest.mark.parametrize("combiner, granularity", [("pama", "token"), ("pama", "batch"), ("pama", "sequence"),
                                                   ("pama", "sequence_gram"), ("linear", None), ("mgda_ub", None)])
def test_inputs_are_validated_once_per_call(combiner, granularity, monkeypatch):
    # validate where the public call enters, then trust the validated object: each
    # PAMA.loss / PAMA.accumulate call runs check_loss_inputs exactly once (issue 14)
    import pama_ext._validation as validation
    from pama_ext import combine, functional, optim, statistics

    calls = []
    real = validation.check_loss_inputs

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    for mod in (functional, statistics, combine, optim):
        monkeypatch.setattr(mod, "check_loss_inputs", counting)
    model = Policy()
    tokens, old, adv, mask = batch(seed=3, n=2)
    kw = {"granularity": granularity} if granularity else {}
    opt = pama_ext.PAMA(torch.optim.SGD(model.parameters(), lr=0.1), 2, combiner=combiner, **kw)
    for accumulate in (False, True):
        calls.clear()
        if accumulate:
            with torch.no_grad():
                opt.accumulate(model(tokens), old, adv, mask)
            needs = combiner == "pama" and granularity in ("batch", "sequence_gram")
            assert calls == (["PAMA.accumulate"] if needs else []), calls
            calls.clear()
        h = torch.tanh(model.lin(model.emb(tokens)))  # Policy.forward, keeping the hidden states
        logp = torch.log_softmax(model.head(h).float(), dim=-1).gather(-1, tokens[..., None])[..., 0]
        shared = {"shared": h} if combiner == "mgda_ub" else {}
        opt.loss(logp, old, adv, mask, **shared).backward()
        assert calls == ["PAMA.loss"], calls
        opt.step()
