"""``PAMAGRPOConfig``: TRL's ``GRPOConfig`` plus the multi-objective settings, validated once.

Every ``GRPOConfig`` field keeps its meaning. The new fields say how the reward functions
(one objective each) become per-objective advantages and how the loss combines them. TRL
options that change the per-token loss in ways PAMA does not define are refused here, at
construction, with an error that names them (``check_supported``): a silently ignored
option would train something other than what the user asked for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

from trl import GRPOConfig

import pama_ext
from pama_ext.statistics import STATISTICS_GRANULARITIES

#: ``objective_combiner`` values: PAMA's weights (Noon PPO) or a fixed preference (MORLHF)
COMBINERS = ("pama", "linear")
#: ``objective_normalization`` values, as TRL's ``scale_rewards`` (None: follow ``scale_rewards``)
NORMALIZATIONS = ("group", "batch", "none")
#: TRL loss types that are the clipped surrogate with some normaliser: PAMA replaces the
#: surrogate by its Noon form and keeps the normaliser. cispo, sapo and vespo replace the
#: clipped surrogate itself (clipped weights times log-probs, soft gates, gamma weights).
SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


@dataclass
class PAMAGRPOConfig(GRPOConfig):
    r"""``GRPOConfig`` for ``PAMAGRPOTrainer``: each reward function is one objective.

    Parameters added to [`~trl.GRPOConfig`]:
        objective_combiner (`str`, defaults to `"pama"`):
            `"pama"`: Noon PPO (negative advantages clamped to zero) with PAMA's weights
            (`pama_ext`'s fused op). `"linear"`: MORLHF, the signed advantages combined with
            the fixed `objective_preference`, TRL's own clipped surrogate.
        objective_granularity (`str` or `None`, defaults to `pama_ext.DEFAULT_GRANULARITY`):
            where PAMA solves for the weights (`pama_ext.GRANULARITIES`). Batch-level ones
            (`pama_ext.statistics.STATISTICS_GRANULARITIES`) are solved once per optimizer step
            over all its micro-batches and all processes. `"pama"` only.
        objective_preference (`list[float]` or `None`, defaults to uniform):
            one weight per reward function. `"linear"`: the weights of the sum, used as given.
            `"pama"`: steers PAMA's Pareto point towards the preferred objectives (every
            entry > 0; PAMA on the advantages scaled by `p_max / p_i`, see
            `pama_ext/preference.py`); uniform is plain PAMA.
        objective_normalization (`str` or `None`, defaults to `scale_rewards`):
            how each reward function's rewards become its advantage: minus the group mean,
            divided by the group's std (`"group"`), the whole generation batch's std
            (`"batch"`) or nothing (`"none"`), exactly as TRL's `scale_rewards` does for the
            single combined reward.
        use_fused_linear (`bool`, defaults to `False`):
            compute the loss from the policy's last hidden states and its LM head with
            `pama_ext.fused_linear.fused_linear_logp_loss` (chunk by chunk, the loss's gradient
            folded into the head's backward): the same loss and gradients up to float rounding.
            The per-token `entropy` metric is then not logged (it needs the full distribution,
            which the fused pass never holds). The model's LM head must be a plain linear layer
            (`get_output_embeddings()`, no PEFT adapter on it) whose logits are neither scaled
            nor soft-capped by the config, and a Mixture-of-Experts model must not add the
            router's auxiliary loss: checked when the trainer is built.
    """

    objective_combiner: str = field(
        default="pama",
        metadata={"help": "How the per-objective advantages are combined: 'pama' or 'linear'.", "choices": COMBINERS},
    )
    objective_granularity: Optional[str] = field(
        default=None,
        metadata={"help": "PAMA's granularity (pama_ext.GRANULARITIES); None: pama_ext.DEFAULT_GRANULARITY."},
    )
    objective_preference: Optional[List[float]] = field(
        default=None,
        metadata={"help": "One weight per reward function (default uniform): linear's weights, or pama's steering."},
    )
    objective_normalization: Optional[str] = field(
        default=None,
        metadata={"help": "Per-objective advantage scaling: 'group', 'batch' or 'none'; None: as scale_rewards."},
    )
    use_fused_linear: bool = field(
        default=False,
        metadata={
            "help": "Compute the loss from the last hidden states and the LM head, chunk by chunk "
            "(pama_ext.fused_linear), never holding the logits; same results up to float rounding. "
            "The per-token entropy metric is not logged."
        },
    )

    def __post_init__(self):
        super().__post_init__()  # TRL's own checks first; it also turns scale_rewards=True/False into names
        resolve_and_check(self)


def resolve_and_check(args) -> None:
    """Fill the defaults of the objective settings and refuse what cannot be honoured."""
    _check_objective_settings(args)
    check_supported(args)


def _check_objective_settings(args) -> None:
    if args.objective_combiner not in COMBINERS:
        raise ValueError(
            f"PAMAGRPOConfig: objective_combiner must be one of {list(COMBINERS)}, got {args.objective_combiner!r}"
        )
    if args.objective_combiner == "pama":
        if args.objective_granularity is None:
            args.objective_granularity = pama_ext.DEFAULT_GRANULARITY
        if args.objective_granularity not in pama_ext.GRANULARITIES:
            raise ValueError(
                f"PAMAGRPOConfig: objective_granularity must be one of {list(pama_ext.GRANULARITIES)}, "
                f"got {args.objective_granularity!r}"
            )
    elif args.objective_granularity is not None:
        raise ValueError(
            "PAMAGRPOConfig: objective_granularity applies to objective_combiner='pama' only, "
            f"not {args.objective_combiner!r} (leave it unset)"
        )
    if args.objective_preference is not None:
        pref = list(args.objective_preference)
        if not pref or not all(isinstance(p, (int, float)) and math.isfinite(p) for p in pref):
            raise ValueError(
                f"PAMAGRPOConfig: objective_preference must be a non-empty list of finite numbers, got {pref!r}"
            )
        if args.objective_combiner == "pama" and min(pref) <= 0:
            raise ValueError(
                f"PAMAGRPOConfig: objective_preference must be > 0 for every reward function with "
                f"objective_combiner='pama' (got {pref!r}): PAMA steers towards the preferred objectives but "
                "never trades one away; use a small positive share, or objective_combiner='linear' to drop one"
            )
        args.objective_preference = [float(p) for p in pref]
    if not isinstance(args.use_fused_linear, bool):
        raise ValueError(f"PAMAGRPOConfig: use_fused_linear must be True or False, got {args.use_fused_linear!r}")
    if args.objective_normalization is None:
        args.objective_normalization = args.scale_rewards
    if args.objective_normalization not in NORMALIZATIONS:
        raise ValueError(
            f"PAMAGRPOConfig: objective_normalization must be one of {list(NORMALIZATIONS)}, "
            f"got {args.objective_normalization!r}"
        )


def check_supported(args) -> None:
    """Raise one ValueError naming every TRL setting this integration cannot honour."""
    bad = []
    if args.loss_type not in SUPPORTED_LOSS_TYPES:
        bad.append(
            f"loss_type={args.loss_type!r} (it replaces the clipped surrogate; supported: {list(SUPPORTED_LOSS_TYPES)})"
        )
    if args.importance_sampling_level != "token":
        bad.append(
            f"importance_sampling_level={args.importance_sampling_level!r} (PAMA's clip indicator and weights are per token)"
        )
    if args.use_vllm and args.vllm_importance_sampling_correction:
        bad.append("vllm_importance_sampling_correction=True with use_vllm=True (a per-token loss correction)")
    # (the two entropy settings below would also need the full per-token distribution, which
    # use_fused_linear never holds: refused for every combination, they need no second check)
    if args.top_entropy_quantile < 1.0:
        bad.append(f"top_entropy_quantile={args.top_entropy_quantile} (entropy masking of the per-token loss)")
    if args.off_policy_mask_threshold is not None:
        bad.append(f"off_policy_mask_threshold={args.off_policy_mask_threshold} (masks sequences by advantage sign)")
    if args.delta is not None:
        bad.append(f"delta={args.delta} (two-sided clipping of the ratio)")
    if args.entropy_coef != 0.0 or args.use_adaptive_entropy:
        bad.append(
            f"entropy_coef={args.entropy_coef} / use_adaptive_entropy={args.use_adaptive_entropy} "
            "(the entropy bonus is not implemented by this integration)"
        )
    if args.multi_objective_aggregation != "sum_then_normalize":
        bad.append(
            f"multi_objective_aggregation={args.multi_objective_aggregation!r} (the objectives are combined by "
            "objective_combiner; set objective_normalization for the per-objective scaling)"
        )
    if args.reward_weights is not None:
        bad.append(
            "reward_weights (the objectives are combined by objective_combiner: use objective_preference with "
            "objective_combiner='linear')"
        )
    if args.objective_combiner == "pama" and args.objective_granularity in STATISTICS_GRANULARITIES:
        generate_every = args.steps_per_generation * args.num_iterations
        if generate_every % args.gradient_accumulation_steps != 0:
            bad.append(
                f"steps_per_generation={args.steps_per_generation} x num_iterations={args.num_iterations} not a "
                f"multiple of gradient_accumulation_steps={args.gradient_accumulation_steps} with "
                f"objective_granularity={args.objective_granularity!r} (the step's weights are solved over all its "
                "micro-batches, which must come from one generation batch)"
            )
    if bad:
        raise ValueError("PAMAGRPOConfig: unsupported setting(s) for PAMAGRPOTrainer: " + "; ".join(bad))
