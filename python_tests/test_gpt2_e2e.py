"""End to end: a tiny transformers GPT-2 policy (built from a config, no downloads) trained for a
few PPO steps with two programmatic rewards through pama_ext.PAMA wrapping torch.optim.AdamW
with an LR scheduler and gradient accumulation; a run checkpointed in the middle and resumed
ends with exactly the parameters of the uninterrupted run."""

from __future__ import annotations

import io

import pytest
import torch

import pama_ext

transformers = pytest.importorskip("transformers")

VOCAB, PROMPT, RESPONSE, BATCH = 100, 4, 12, 8
EOS = 0
STEPS, CKPT_AT, EPOCHS, MICRO = 4, 2, 2, 2


def make_policy(seed: int):
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=PROMPT + RESPONSE,
        n_embd=64,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=EOS,
        eos_token_id=EOS,
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg)


def make_training(seed: int):
    policy = make_policy(seed)
    base = torch.optim.AdamW(policy.parameters(), lr=3e-3, weight_decay=0.01)
    opt = pama_ext.PAMA(base, num_objectives=2, granularity="batch")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return policy, opt, sched


def response_logp(policy, seqs):
    """log pi(response token | prefix), [B, RESPONSE]."""
    logits = policy(input_ids=seqs).logits[:, PROMPT - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, seqs[:, PROMPT:, None])[..., 0]


@torch.no_grad()
def rollout(policy, step: int):
    """Sample BATCH responses with a generator seeded by the step (so a resumed run samples the same)."""
    gen = torch.Generator().manual_seed(1000 + step)
    seqs = torch.randint(1, VOCAB, (BATCH, PROMPT), generator=gen)
    done = torch.zeros(BATCH, dtype=torch.bool)
    mask = torch.zeros(BATCH, RESPONSE, dtype=torch.bool)
    for t in range(RESPONSE):
        logits = policy(input_ids=seqs).logits[:, -1].float()
        tok = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)[:, 0]
        tok = torch.where(done, torch.full_like(tok, EOS), tok)
        mask[:, t] = ~done
        done = done | (tok == EOS)
        seqs = torch.cat([seqs, tok[:, None]], dim=1)
    return seqs, mask


def rewards(seqs, mask):
    """Two conflicting programmatic rewards: share of low ids (< 50), share of high ids (>= 50)."""
    resp = seqs[:, PROMPT:]
    n = mask.sum(1).clamp_min(1)
    low = ((resp < 50) & (resp != EOS) & mask).sum(1) / n
    high = ((resp >= 50) & mask).sum(1) / n
    return torch.stack([low, high], dim=1).float()


def whiten(r):
    return (r - r.mean(0)) / (r.std(0) + 1e-6)


def ppo_step(policy, opt, sched, step: int, log: list):
    seqs, mask = rollout(policy, step)
    adv = whiten(rewards(seqs, mask))  # [B, 2] sequence-level advantages, per objective
    with torch.no_grad():
        old_logp = response_logp(policy, seqs)
    micro = [slice(i * BATCH // MICRO, (i + 1) * BATCH // MICRO) for i in range(MICRO)]
    for _epoch in range(EPOCHS):
        with torch.no_grad():  # the statistics pass: one set of batch weights for all micro-batches
            for mb in micro:
                opt.accumulate(response_logp(policy, seqs[mb]), old_logp[mb], adv[mb], mask[mb])
        opt.zero_grad(set_to_none=True)
        for mb in micro:
            loss = opt.loss(response_logp(policy, seqs[mb]), old_logp[mb], adv[mb], mask[mb])
            (loss / MICRO).backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        log.append((opt.last_weights.clone(), opt.last_stats, float(loss.detach())))
    sched.step()


def params(policy):
    return [p.detach().clone() for p in policy.parameters()]


def test_gpt2_ppo_checkpoint_resume_equals_uninterrupted(one_thread):
    # uninterrupted
    policy, opt, sched = make_training(seed=0)
    init = params(policy)
    log_full: list = []
    for step in range(STEPS):
        ppo_step(policy, opt, sched, step, log_full)
    final_full = params(policy)

    # interrupted at CKPT_AT, checkpointed, resumed in fresh objects
    policy_a, opt_a, sched_a = make_training(seed=0)
    log_resumed: list = []
    for step in range(CKPT_AT):
        ppo_step(policy_a, opt_a, sched_a, step, log_resumed)
    buf = io.BytesIO()
    torch.save(
        {"model": policy_a.state_dict(), "opt": opt_a.state_dict(), "sched": sched_a.state_dict(), "step": CKPT_AT},
        buf,
    )
    del policy_a, opt_a, sched_a
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    policy_b, opt_b, sched_b = make_training(seed=123)  # a different init: everything must come from the checkpoint
    policy_b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    sched_b.load_state_dict(ckpt["sched"])
    assert opt_b.step_count == CKPT_AT * EPOCHS
    for step in range(ckpt["step"], STEPS):
        ppo_step(policy_b, opt_b, sched_b, step, log_resumed)

    for a, b in zip(params(policy_b), final_full):
        assert torch.equal(a, b)
    assert len(log_full) == len(log_resumed) == STEPS * EPOCHS
    for (wa, _, la), (wb, _, lb) in zip(log_full, log_resumed):
        assert torch.equal(wa, wb) and la == lb
    assert opt_b.param_groups[0]["lr"] == opt.param_groups[0]["lr"]

    # the run trained: parameters moved, weights on the simplex, diagnostics finite
    assert any(not torch.equal(a, b) for a, b in zip(init, final_full))
    for w, st, loss in log_full:
        assert w.shape == (2,) and float(w.sum()) == pytest.approx(1.0, abs=1e-6) and bool((w >= 0).all())
        assert all(bool(torch.isfinite(v)) for v in st) and 0 <= float(st.clip_fraction) <= 1
        assert loss == loss  # not NaN
