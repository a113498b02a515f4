"""PAMAGRPOTrainer with several conflicting objectives.

* it trains; every step's weights are on the simplex and logged per reward function,
  with the zero-advantage fraction;
* a batch-level step's weights are the weights of all the step's micro-batches under the
  current policy, also on the steps after the first of a generation (``num_iterations > 1``,
  the policy has moved and some tokens are clipped);
* every granularity of ``pama_ext.GRANULARITIES``, the combiner, the preference and the
  normalisation reach the loss: the trainer's loss equals pama_ext's own loss on the same
  micro-batch.
"""

from __future__ import annotations

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402

import pama_ext  # noqa: E402
from pama_ext.integrations.trl import PAMAGRPOConfig, PAMAGRPOTrainer  # noqa: E402
from pama_ext.integrations.trl.advantages import per_objective_advantages  # noqa: E402
from pama_ext.statistics import STATISTICS_GRANULARITIES  # noqa: E402

import trl_tiny as tiny  # noqa: E402

REWARDS = [tiny.vowels, tiny.brevity, tiny.late]
NAMES = ["vowels", "brevity", "late"]


def _trainer(tmp_path, reward_funcs=REWARDS, **config):
    tok = tiny.tokenizer()
    kw = tiny.common_args(str(tmp_path / "out"))
    kw.update(config)
    return PAMAGRPOTrainer(
        model=tiny.model(tok), reward_funcs=reward_funcs, args=PAMAGRPOConfig(**kw),
        train_dataset=tiny.dataset(), processing_class=tok,
    )


def _record_rewards_and_advantages(trainer):
    """Wrap the rewards and the generation: record [rewards, advantages] of each generation."""
    seen = []
    calc, gen = trainer._calculate_rewards, trainer._generate_and_score_completions

    def rewards(*a, **k):
        r = calc(*a, **k)
        seen.append(r.clone())
        return r

    def generate(inputs):
        out = gen(inputs)
        seen.append(out["advantages"].clone())
        return out

    trainer._calculate_rewards, trainer._generate_and_score_completions = rewards, generate
    return seen


def _record_step_weights(trainer):
    """Wrap the step solve: record (weights, the step's micro-batches, their current logp)."""
    seen = []
    solve = trainer._step_weights

    def recording(inputs, train):
        fresh = trainer._pama_step_weights is None or trainer._pama_step_weights[0] != trainer.state.global_step
        w = solve(inputs, train)
        if fresh and train:
            spg = trainer.args.steps_per_generation
            mbs = [trainer._buffered_inputs[(trainer._step + k) % spg] for k in range(trainer.current_gradient_accumulation_steps)]
            with torch.no_grad():
                logps = [trainer._policy_logps(trainer.model, mb)[0] for mb in mbs]
            seen.append((w.clone(), mbs, logps))
        return w

    trainer._step_weights = recording
    return seen


def _logged(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


def test_conflicting_objectives_train_with_simplex_weights(tmp_path):
    trainer = _trainer(
        tmp_path, objective_granularity="batch", gradient_accumulation_steps=2, max_steps=4, loss_type="dapo", beta=0.0
    )
    seen = _record_step_weights(trainer)
    before = tiny.params(trainer)
    trainer.train()
    after = tiny.params(trainer)
    assert max(float((after[k] - before[k]).abs().max()) for k in after) > 1e-3
    assert len(seen) == 4  # one solve per optimizer step
    for w, _, _ in seen:
        assert w.shape == (3,) and bool((w >= 0).all()) and float(w.sum()) == pytest.approx(1.0, abs=1e-9)
    assert any(float(w.max()) < 1 - 1e-6 for w, _, _ in seen)  # conflicting: not always one objective
    per_name = [_logged(trainer, f"objectives/{n}/weight") for n in NAMES]
    assert all(len(v) == 4 for v in per_name)
    for step, ws in enumerate(zip(*per_name)):
        assert sum(ws) == pytest.approx(1.0, abs=1e-6)
        assert list(ws) == pytest.approx(seen[step][0].tolist(), abs=1e-6)  # the logged weights are the step's
    for n in NAMES:  # next to TRL's reward metrics
        assert len(_logged(trainer, f"rewards/{n}/mean")) == 4
    zero = _logged(trainer, "objectives/zero_advantage_fraction")
    assert len(zero) == 4 and all(0.0 <= z <= 1.0 for z in zero)
    assert all(torch.isfinite(torch.tensor(_logged(trainer, "loss"))))


@pytest.mark.parametrize("granularity", STATISTICS_GRANULARITIES)
def test_step_weights_use_the_current_policy(granularity, tmp_path):
    # num_iterations=2: the second optimizer step of each generation runs after the policy
    # moved; a small epsilon_high and a large learning rate clip some of its tokens
    trainer = _trainer(
        tmp_path, objective_granularity=granularity, gradient_accumulation_steps=2, num_iterations=2,
        max_steps=2, epsilon_high=0.02, learning_rate=0.2,
    )
    seen = _record_step_weights(trainer)
    trainer.train()
    assert len(seen) == 2
    clipped_seen = 0.0
    for w, mbs, logps in seen:
        mask = torch.cat([mb["completion_mask"] for mb in mbs])
        adv = torch.cat([mb["advantages"] for mb in mbs])
        logp = torch.cat(logps)
        old = torch.cat([mb["old_per_token_logps"] for mb in mbs])
        expected = pama_ext.pama_weights(logp, old, adv, mask, clip_eps=0.02, granularity=granularity)
        assert w.tolist() == pytest.approx(expected.tolist(), abs=1e-5)
        clipped_seen += float(((torch.exp(logp - old) > 1.02) & mask.bool()).sum())
    assert clipped_seen > 0  # the off-policy step did see clipped tokens


def _record_losses(trainer, reference):
    """Wrap _compute_loss: record (trainer's loss, reference(logp, inputs)) per micro-batch."""
    out = []
    compute = trainer._compute_loss

    def recording(model, inputs):
        loss = compute(model, inputs)
        with torch.no_grad():
            logp = trainer._policy_logps(trainer.model, inputs)[0]
            out.append((float(loss), float(reference(logp, inputs))))
        return loss

    trainer._compute_loss = recording
    return out


@pytest.mark.parametrize("granularity", pama_ext.GRANULARITIES)
def test_granularity_reaches_the_loss(granularity, tmp_path):
    # bnpo without accumulation is pama_ext's token_mean; on-policy, old_logp = logp
    trainer = _trainer(tmp_path, objective_granularity=granularity, loss_type="bnpo", max_steps=1)
    losses = _record_losses(
        trainer,
        lambda logp, mb: pama_ext.pama_loss(
            logp, logp, mb["advantages"], mb["completion_mask"], granularity=granularity, clip_eps=trainer.epsilon_high
        ),
    )
    trainer.train()
    assert losses
    for got, want in losses:
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7)
    ws = [_logged(trainer, f"objectives/{n}/weight") for n in NAMES]
    assert all(len(v) == 1 for v in ws) and sum(v[0] for v in ws) == pytest.approx(1.0, abs=1e-5)


def test_linear_preference_reaches_the_loss(tmp_path):
    pref = [0.25, 0.6, 0.15]
    trainer = _trainer(tmp_path, objective_combiner="linear", objective_preference=pref, loss_type="bnpo", max_steps=1)
    losses = _record_losses(
        trainer,
        lambda logp, mb: pama_ext.weighted_noon_loss(
            logp, logp, mb["advantages"], mb["completion_mask"], torch.tensor(pref), signed=True, clip_eps=0.2
        ),
    )
    trainer.train()
    for got, want in losses:
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert [_logged(trainer, f"objectives/{n}/weight")[0] for n in NAMES] == pytest.approx(pref)


def test_pama_preference_scales_the_advantages_that_reach_the_loss(tmp_path):
    # steerable PAMA: the trainer's advantages are the group-normalised ones scaled by
    # p_max / p_i, and its loss is pama_ext's loss with that preference
    pref = [0.5, 0.3, 0.2]
    trainer = _trainer(tmp_path, objective_preference=pref, loss_type="bnpo", max_steps=1)
    seen = _record_rewards_and_advantages(trainer)
    losses = _record_losses(
        trainer,
        lambda logp, mb: pama_ext.pama_loss(logp, logp, mb["advantages"], mb["completion_mask"], clip_eps=0.2),
    )
    trainer.train()
    raw = per_objective_advantages(seen[0], 4, "group")
    torch.testing.assert_close(seen[1], raw * torch.tensor([1.0, 5 / 3, 2.5]))
    assert losses
    for got, want in losses:
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_linear_default_preference_is_uniform(tmp_path):
    trainer = _trainer(tmp_path, reward_funcs=REWARDS[:2], objective_combiner="linear", max_steps=1)
    trainer.train()
    assert [_logged(trainer, f"objectives/{n}/weight")[0] for n in NAMES[:2]] == pytest.approx([0.5, 0.5])


@pytest.mark.parametrize("normalization", ["group", "batch", "none"])
def test_normalization_reaches_the_advantages(normalization, tmp_path):
    trainer = _trainer(tmp_path, objective_normalization=normalization, max_steps=1)
    seen = _record_rewards_and_advantages(trainer)
    trainer.train()
    r, adv = seen[0], seen[1]
    grouped = r.view(-1, 4, r.shape[1])
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).view_as(r)
    if normalization == "group":
        want = centred / (grouped.std(dim=1, keepdim=True).repeat_interleave(4, dim=0).view_as(r) + 1e-4)
    elif normalization == "batch":
        want = centred / (r.std(dim=0, keepdim=True) + 1e-4)
    else:
        want = centred
    assert torch.allclose(adv, want, atol=1e-5)
    assert torch.equal(adv, per_objective_advantages(r, 4, normalization))


def test_nan_rewards_give_zero_advantage():
    r = torch.tensor([[1.0, float("nan")], [2.0, 1.0], [3.0, 2.0], [4.0, float("nan")]])
    adv = per_objective_advantages(r, 2, "group")
    assert torch.isfinite(adv).all() and adv[0, 1] == 0 and adv[3, 1] == 0
    assert adv[:, 0].tolist() == pytest.approx(per_objective_advantages(r[:, :1], 2, "group")[:, 0].tolist())


def test_normalization_follows_scale_rewards(tmp_path):
    for scale, want in [(True, "group"), (False, "none"), ("batch", "batch")]:
        args = PAMAGRPOConfig(**tiny.common_args(str(tmp_path)), scale_rewards=scale)
        assert args.objective_normalization == want
    args = PAMAGRPOConfig(**tiny.common_args(str(tmp_path)))
    assert args.objective_granularity == pama_ext.DEFAULT_GRANULARITY and args.objective_combiner == "pama"


def test_evaluate_logs_weights(tmp_path):
    # evaluation: the weights of the evaluation batch alone, logged with the eval_ prefix
    trainer = _trainer(tmp_path, objective_granularity="batch", per_device_eval_batch_size=8)
    trainer.eval_dataset = tiny.dataset(8)
    metrics = trainer.evaluate()
    ws = [metrics[f"eval_objectives/{n}/weight"] for n in NAMES]
    assert sum(ws) == pytest.approx(1.0, abs=1e-5) and all(w >= 0 for w in ws)
    assert 0.0 <= metrics["eval_objectives/zero_advantage_fraction"] <= 1.0
