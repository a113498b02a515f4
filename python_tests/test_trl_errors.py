"""Bad configurations of the TRL integration fail at construction, naming the setting."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")

from trl import GRPOConfig  # noqa: E402

import pama_ext  # noqa: E402
from pama_ext.integrations.trl import PAMAGRPOConfig, PAMAGRPOTrainer  # noqa: E402
from pama_ext.integrations.trl import _version  # noqa: E402

import trl_tiny as tiny  # noqa: E402


def _config(tmp_path, **kw):
    return PAMAGRPOConfig(**tiny.common_args(str(tmp_path), **kw))


@pytest.mark.parametrize(
    "kw, names",
    [
        (dict(objective_combiner="mgda"), ["objective_combiner", "'mgda'"]),
        (dict(objective_granularity="tokens"), ["objective_granularity", "'tokens'"]),
        (dict(objective_normalization="std"), ["objective_normalization", "'std'"]),
        (dict(objective_preference=[0.5, 0.0]), ["objective_preference", "> 0", "'pama'"]),
        (dict(objective_combiner="linear", objective_granularity="token"), ["objective_granularity", "'pama'"]),
        (dict(objective_combiner="linear", objective_preference=[]), ["objective_preference"]),
        (dict(objective_combiner="linear", objective_preference=[1.0, float("nan")]), ["objective_preference"]),
        (dict(loss_type="cispo"), ["loss_type='cispo'"]),
        (dict(loss_type="sapo"), ["loss_type='sapo'"]),
        (dict(loss_type="vespo"), ["loss_type='vespo'"]),
        (dict(importance_sampling_level="sequence"), ["importance_sampling_level='sequence'"]),
        (dict(top_entropy_quantile=0.2), ["top_entropy_quantile=0.2"]),
        (dict(off_policy_mask_threshold=0.5), ["off_policy_mask_threshold=0.5"]),
        (dict(delta=1.5), ["delta=1.5"]),
        (dict(entropy_coef=0.01), ["entropy_coef=0.01"]),
        (dict(use_adaptive_entropy=True), ["use_adaptive_entropy=True"]),
        (dict(multi_objective_aggregation="normalize_then_sum"), ["multi_objective_aggregation"]),
        (dict(reward_weights=[1.0, 2.0]), ["reward_weights", "objective_preference"]),
        (
            dict(objective_granularity="batch", steps_per_generation=1, gradient_accumulation_steps=2),
            ["steps_per_generation=1", "gradient_accumulation_steps=2"],
        ),
        (dict(loss_type="sapo", delta=2.0), ["loss_type='sapo'", "delta=2.0"]),  # every bad setting is named
    ],
)
def test_bad_config_names_the_setting(kw, names, tmp_path):
    with pytest.raises(ValueError) as err:
        _config(tmp_path, **kw)
    for name in names:
        assert name in str(err.value)


def test_vllm_importance_sampling_is_refused(tmp_path):
    # the check itself (building a vLLM config needs vLLM only when the trainer starts)
    from pama_ext.integrations.trl.config import check_supported

    args = _config(tmp_path)
    args.use_vllm, args.vllm_importance_sampling_correction = True, True
    with pytest.raises(ValueError, match="vllm_importance_sampling_correction"):
        check_supported(args)
    args.vllm_importance_sampling_correction = False
    check_supported(args)


def test_local_granularity_allows_any_accumulation(tmp_path):
    local = [g for g in pama_ext.GRANULARITIES if g not in pama_ext.statistics.STATISTICS_GRANULARITIES]
    for g in local:
        _config(tmp_path, objective_granularity=g, steps_per_generation=1, gradient_accumulation_steps=2)


def test_preference_of_the_wrong_length(tmp_path):
    tok = tiny.tokenizer()
    args = _config(tmp_path, objective_combiner="linear", objective_preference=[0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match="objective_preference has 3 weights but there are 2 reward functions"):
        PAMAGRPOTrainer(
            model=tiny.model(tok), reward_funcs=[tiny.vowels, tiny.brevity], args=args,
            train_dataset=tiny.dataset(), processing_class=tok,
        )


def test_plain_grpo_config_is_refused(tmp_path):
    tok = tiny.tokenizer()
    with pytest.raises(TypeError, match="PAMAGRPOConfig"):
        PAMAGRPOTrainer(
            model=tiny.model(tok), reward_funcs=[tiny.vowels], args=GRPOConfig(**tiny.common_args(str(tmp_path))),
            train_dataset=tiny.dataset(), processing_class=tok,
        )


def test_settings_edited_after_construction_are_checked(tmp_path):
    tok = tiny.tokenizer()
    args = _config(tmp_path)
    args.loss_type = "cispo"
    with pytest.raises(ValueError, match="loss_type='cispo'"):
        PAMAGRPOTrainer(
            model=tiny.model(tok), reward_funcs=[tiny.vowels], args=args, train_dataset=tiny.dataset(), processing_class=tok
        )


def test_untested_trl_version_is_refused(monkeypatch):
    import trl

    monkeypatch.setattr(trl, "__version__", "1.17.0")
    monkeypatch.delenv(_version.ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(ImportError, match=r"trl>=1\.16,<1\.17.*1\.17\.0|1\.17\.0.*pama_ext\[trl\]"):
        _version.check_trl_version()
    monkeypatch.setenv(_version.ALLOW_UNTESTED_ENV, "1")
    with pytest.warns(RuntimeWarning, match="1.17.0"):
        assert _version.check_trl_version() == "1.17.0"
