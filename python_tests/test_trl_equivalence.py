"""PAMAGRPOTrainer takes exactly TRL's steps where it should.

* ``objective_combiner="linear"`` with a one-hot preference over two reward functions is
  TRL's own ``GRPOTrainer`` given the selected reward function alone: same seed, same
  parameters after several steps, for every supported loss type, with gradient
  accumulation, ``num_iterations > 1`` and ``beta > 0`` (reference model built from a path).
* ``objective_combiner="pama"`` with one reward function is Noon GRPO: TRL's GRPO with its
  advantages clamped at zero (the weights are [1]; the surrogate is pama_ext's op). The two
  compute the same gradient in a different order, so these runs use SGD: Adam's first steps
  (``g / (|g| + eps)``) would blow rounding-level differences of tiny gradients up to
  ``lr``-sized ones. The linear combiner needs no such care: it reproduces TRL's steps
  bitwise.

Tiny CPU runs (``trl_tiny``); no download.
"""

from __future__ import annotations

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import pama_ext  # noqa: E402
from pama_ext.integrations.trl import PAMAGRPOConfig, PAMAGRPOTrainer  # noqa: E402

import trl_tiny as tiny  # noqa: E402


def _close(a: dict, b: dict, atol=1e-6, rtol=1e-5):
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert all(torch.allclose(a[k], b[k], atol=atol, rtol=rtol) for k in a), f"max |diff| = {worst}"


def _moved(trained: dict, tok) -> float:
    init = tiny.model(tok).state_dict()
    return max(float((trained[k] - init[k]).abs().max()) for k in trained)


CASES = {
    "grpo": dict(loss_type="grpo"),
    "bnpo_accum": dict(loss_type="bnpo", gradient_accumulation_steps=2),
    "dapo_accum": dict(loss_type="dapo", gradient_accumulation_steps=2),
    "dr_grpo": dict(loss_type="dr_grpo"),
    "luspo": dict(loss_type="luspo"),
    "grpo_iterations": dict(loss_type="grpo", num_iterations=2, epsilon=0.1, epsilon_high=0.15),
    "dapo_beta": dict(loss_type="dapo", beta=0.1),
    "bnpo_beta_accum": dict(loss_type="bnpo", beta=0.05, gradient_accumulation_steps=2, use_bias_correction_kl=False),
}


def _model_arg(case: dict, tok, tmp_path):
    # with beta > 0 TRL builds its reference model from the policy's path
    return tiny.saved_model(str(tmp_path / "init")) if case.get("beta") else tiny.model(tok)


@pytest.mark.parametrize("name", list(CASES))
def test_linear_one_hot_is_trl_grpo(name, tmp_path):
    case = CASES[name]
    tok = tiny.tokenizer()
    kw = tiny.common_args(str(tmp_path / "out"), **case)
    ref = GRPOTrainer(
        model=_model_arg(case, tok, tmp_path), reward_funcs=[tiny.vowels], args=GRPOConfig(**kw),
        train_dataset=tiny.dataset(), processing_class=tok,
    )
    ref.train()
    ours = PAMAGRPOTrainer(
        model=_model_arg(case, tok, tmp_path),
        reward_funcs=[tiny.brevity, tiny.vowels],
        args=PAMAGRPOConfig(**kw, objective_combiner="linear", objective_preference=[0.0, 1.0]),
        train_dataset=tiny.dataset(),
        processing_class=tok,
    )
    ours.train()
    p_ref, p_ours = tiny.params(ref), tiny.params(ours)
    assert _moved(p_ref, tok) > 1e-3  # the runs did train
    _close(p_ref, p_ours)
    losses = lambda t: [h["loss"] for h in t.state.log_history if "loss" in h]  # noqa: E731
    assert losses(ref) == pytest.approx(losses(ours), rel=1e-4, abs=1e-6)
    logged = [h for h in ours.state.log_history if "objectives/vowels/weight" in h]
    assert logged and all(h["objectives/vowels/weight"] == 1.0 and h["objectives/brevity/weight"] == 0.0 for h in logged)
    if case.get("beta"):
        assert [h["kl"] for h in ref.state.log_history if "kl" in h] == pytest.approx(
            [h["kl"] for h in ours.state.log_history if "kl" in h], rel=1e-4, abs=1e-7
        )


class NoonGRPOTrainer(GRPOTrainer):
    """TRL's GRPO with the advantages clamped at zero: Noon PPO by hand."""

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        out["advantages"] = out["advantages"].clamp(min=0)
        return out


@pytest.mark.parametrize(
    "case",
    [
        dict(loss_type="dapo", gradient_accumulation_steps=2, epsilon_high=0.28, optim="sgd", learning_rate=0.5),
        dict(loss_type="grpo", num_iterations=2, beta=0.05, mask_truncated_completions=True, max_completion_length=12,
             optim="sgd", learning_rate=0.5),
    ],
    ids=["dapo_accum", "grpo_iterations_beta_masked"],
)
def test_pama_one_objective_is_noon_grpo(case, tmp_path):
    tok = tiny.tokenizer()
    kw = tiny.common_args(str(tmp_path / "out"), **case)
    ref = NoonGRPOTrainer(
        model=_model_arg(case, tok, tmp_path), reward_funcs=[tiny.vowels], args=GRPOConfig(**kw),
        train_dataset=tiny.dataset(), processing_class=tok,
    )
    ref.train()
    ours = PAMAGRPOTrainer(
        model=_model_arg(case, tok, tmp_path),
        reward_funcs=[tiny.vowels],
        args=PAMAGRPOConfig(**kw, objective_combiner="pama", objective_granularity=pama_ext.DEFAULT_GRANULARITY),
        train_dataset=tiny.dataset(),
        processing_class=tok,
    )
    ours.train()
    p_ref, p_ours = tiny.params(ref), tiny.params(ours)
    assert _moved(p_ref, tok) > 1e-3
    _close(p_ref, p_ours)
    logged = [h["objectives/vowels/weight"] for h in ours.state.log_history if "objectives/vowels/weight" in h]
    assert logged and all(w == pytest.approx(1.0) for w in logged)
