"""``PAMAGRPOConfig(use_fused_linear=True)``: the loss from the last hidden states and the LM
head (``pama_ext.fused_linear.fused_linear_logp_loss``) trains exactly as TRL's log-probabilities
do, up to float rounding; models whose logits it cannot reproduce are refused at construction.

The fused and unfused runs compute the same gradients in a different order (the fused op
sums the LM head's gradient chunk by chunk, TRL's path through its own chunked head), so
the gradients agree to float32 rounding (about 1e-7 relative). The runs use SGD: the
parameters then differ by ``lr`` times the gradients' rounding, ~1e-8 after a few steps, and
the tolerance (``atol=1e-6, rtol=1e-5``) is 100x that, while a real difference in the loss (a
shifted position, a missing KL term, another normaliser) moves them by more than 1e-3. Adam
is avoided as in ``test_trl_equivalence.py``: its first steps ``g / (|g| + eps)`` blow the
rounding of tiny gradients up to ``lr``-sized differences (measured: ~4e-5 with lr 3e-2).

Tiny CPU runs (``trl_tiny``); no download.
"""

from __future__ import annotations

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import pama_ext.integrations.trl.trainer as trainer_module  # noqa: E402
from pama_ext.integrations.trl import PAMAGRPOConfig, PAMAGRPOTrainer  # noqa: E402

import trl_tiny as tiny  # noqa: E402

ATOL, RTOL = 1e-6, 1e-5
SGD = dict(optim="sgd", learning_rate=0.5)
FUSED_OP = trainer_module.fused_linear_logp_loss

CASES = {
    # token granularity: the fused op solves the weights per micro-batch; KL; accumulation
    "pama_token_beta_accum": dict(
        objective_granularity="token", beta=0.05, loss_type="bnpo", gradient_accumulation_steps=2, max_steps=2
    ),
    # batch granularity: the step's weights from the statistics pass, then off-policy steps
    # (num_iterations=2: TRL's old log-probabilities, clipped tokens) with the KL term
    "pama_batch_iterations_beta": dict(
        objective_granularity="batch", beta=0.1, loss_type="dapo", gradient_accumulation_steps=2, num_iterations=2,
        epsilon_high=0.05, max_steps=2,
    ),
    # MORLHF: TRL's two-sided surrogate with a fixed preference, the KL times the ratio
    "linear_beta": dict(objective_combiner="linear", objective_preference=[0.3, 0.7], beta=0.05, loss_type="grpo"),
}


def _train(case: dict, fused: bool, tmp_path, monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return FUSED_OP(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "fused_linear_logp_loss", counting)
    tok = tiny.tokenizer()
    # beta > 0: TRL builds its reference model from the policy's path
    model = tiny.saved_model(str(tmp_path / "init")) if case.get("beta") else tiny.model(tok)
    args = PAMAGRPOConfig(**tiny.common_args(str(tmp_path / "out"), **SGD, **case), use_fused_linear=fused)
    trainer = PAMAGRPOTrainer(
        model=model, reward_funcs=[tiny.vowels, tiny.brevity], args=args, train_dataset=tiny.dataset(),
        processing_class=tok,
    )
    trainer.train()
    return trainer, calls


def _logged(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


@pytest.mark.parametrize("name", list(CASES))
def test_fused_linear_trains_as_unfused(name, tmp_path, monkeypatch):
    case = CASES[name]
    ref, ref_calls = _train(case, False, tmp_path / "unfused", monkeypatch)
    ours, calls = _train(case, True, tmp_path / "fused", monkeypatch)
    assert not ref_calls
    micro_batches = ours.args.max_steps * ours.args.gradient_accumulation_steps
    assert len(calls) == micro_batches  # every micro-batch's loss went through the fused op
    # hidden states [B, T, H] of the completion positions only
    assert all(len(s) == 3 and s[1] <= ours.max_completion_length and s[2] == 16 for s in calls)

    p_ref, p_ours = tiny.params(ref), tiny.params(ours)
    init = tiny.model(tiny.tokenizer()).state_dict()
    assert max(float((p_ref[k] - init[k]).abs().max()) for k in p_ref) > 1e-3  # the runs did train
    worst = max(float((p_ref[k] - p_ours[k]).abs().max()) for k in p_ref)
    assert all(torch.allclose(p_ref[k], p_ours[k], atol=ATOL, rtol=RTOL) for k in p_ref), f"max |diff| = {worst}"

    # the same metrics, but the entropy (the fused pass never holds a token's whole distribution)
    keys = ["loss", "objectives/vowels/weight", "objectives/brevity/weight", "objectives/zero_advantage_fraction",
            "clip_ratio/high_mean", "clip_ratio/low_mean", "clip_ratio/region_mean", "kl"]
    for key in keys:
        assert _logged(ours, key) == pytest.approx(_logged(ref, key), rel=1e-4, abs=1e-6), key
        assert _logged(ours, key), key
    assert _logged(ref, "entropy") and not _logged(ours, "entropy")
    if name == "pama_batch_iterations_beta":
        assert max(_logged(ref, "clip_ratio/high_mean")) > 0  # the off-policy steps clipped tokens


def test_fused_linear_evaluate(tmp_path, monkeypatch):
    # evaluation runs the loss under no_grad: the fused op still computes it (and no gradient)
    losses = {}
    for fused in (False, True):
        tok = tiny.tokenizer()
        args = PAMAGRPOConfig(
            **tiny.common_args(str(tmp_path / str(fused)), per_device_eval_batch_size=8), use_fused_linear=fused
        )
        trainer = PAMAGRPOTrainer(
            model=tiny.model(tok), reward_funcs=[tiny.vowels, tiny.brevity], args=args, train_dataset=tiny.dataset(),
            eval_dataset=tiny.dataset(8), processing_class=tok,
        )
        losses[fused] = trainer.evaluate()
    assert losses[True]["eval_loss"] == pytest.approx(losses[False]["eval_loss"], rel=1e-5, abs=1e-7)
    assert "eval_entropy" in losses[False] and "eval_entropy" not in losses[True]


# --------------------------------------------------------------------------- refusals
class _AdapterHead(nn.Module):
    """Stands in for a PEFT LoRA layer on the LM head (PEFT's tuner layers keep the wrapped
    layer as ``base_layer``), for when ``peft`` is not installed."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, 2, bias=False)
        self.lora_B = nn.Linear(2, base.out_features, bias=False)

    @property
    def weight(self):
        return self.base_layer.weight

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


class _ScaledHead(nn.Module):
    def __init__(self, base: nn.Linear):
        super().__init__()
        self.weight = base.weight

    def forward(self, x):
        return 2.0 * (x @ self.weight.T)


def _no_head(model):
    model.get_output_embeddings = lambda: None
    return model


def _adapter_head(model):
    model.lm_head = _AdapterHead(nn.Linear(model.config.n_embd, model.config.vocab_size, bias=False))
    return model


def _custom_head(model):
    model.lm_head = _ScaledHead(model.lm_head)
    return model


def _softcap(model):
    model.config.final_logit_softcapping = 30.0
    return model


def _logit_scale(model):
    model.config.logit_scale = 0.5
    return model


@pytest.mark.parametrize(
    "edit, names",
    [
        (_no_head, ["use_fused_linear=True", "get_output_embeddings() returned None"]),
        (_adapter_head, ["use_fused_linear=True", "PEFT adapter", "target_modules"]),
        (_custom_head, ["use_fused_linear=True", "torch.nn.Linear", "_ScaledHead"]),
        (_softcap, ["use_fused_linear=True", "final_logit_softcapping=30.0"]),
        (_logit_scale, ["use_fused_linear=True", "logit_scale=0.5"]),
    ],
    ids=["no_output_embeddings", "adapter_on_head", "custom_head", "softcapping", "logit_scale"],
)
def test_fused_linear_refuses_the_model(edit, names, tmp_path):
    tok = tiny.tokenizer()
    args = PAMAGRPOConfig(**tiny.common_args(str(tmp_path)), use_fused_linear=True)
    with pytest.raises(ValueError) as err:
        PAMAGRPOTrainer(
            model=edit(tiny.model(tok)), reward_funcs=[tiny.vowels], args=args, train_dataset=tiny.dataset(),
            processing_class=tok,
        )
    for name in names:
        assert name in str(err.value)
    # the same model is fine unfused (the head's checks are the fused loss's only)
    if edit in (_softcap, _logit_scale):
        PAMAGRPOTrainer(
            model=edit(tiny.model(tok)), reward_funcs=[tiny.vowels],
            args=PAMAGRPOConfig(**tiny.common_args(str(tmp_path))), train_dataset=tiny.dataset(), processing_class=tok,
        )


def test_fused_linear_refuses_a_peft_adapter_on_the_head(tmp_path):
    peft = pytest.importorskip("peft")
    tok = tiny.tokenizer()
    model = peft.get_peft_model(tiny.model(tok), peft.LoraConfig(r=2, target_modules=["lm_head"]))
    args = PAMAGRPOConfig(**tiny.common_args(str(tmp_path)), use_fused_linear=True)
    with pytest.raises(ValueError, match=r"use_fused_linear=True.*PEFT adapter"):
        PAMAGRPOTrainer(
            model=model, reward_funcs=[tiny.vowels], args=args, train_dataset=tiny.dataset(), processing_class=tok
        )


def test_fused_linear_refuses_the_router_aux_loss(tmp_path):
    # a model that returns router logits, with TRL's load-balancing loss switched on
    tok = tiny.tokenizer()
    model = tiny.model(tok)
    model.config.output_router_logits = True
    args = PAMAGRPOConfig(**tiny.common_args(str(tmp_path)), use_fused_linear=True, router_aux_loss_coef=0.01)
    with pytest.raises(ValueError, match=r"use_fused_linear=True.*router_aux_loss_coef=0.01"):
        PAMAGRPOTrainer(
            model=model, reward_funcs=[tiny.vowels], args=args, train_dataset=tiny.dataset(), processing_class=tok
        )


def test_use_fused_linear_must_be_a_bool(tmp_path):
    with pytest.raises(ValueError, match="use_fused_linear must be True or False"):
        PAMAGRPOConfig(**tiny.common_args(str(tmp_path)), use_fused_linear="yes")
    assert PAMAGRPOConfig(**tiny.common_args(str(tmp_path))).use_fused_linear is False
