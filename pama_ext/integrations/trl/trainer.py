"""``PAMAGRPOTrainer``: TRL's ``GRPOTrainer`` with one objective per reward function.

What changes against ``GRPOTrainer`` (three overridden methods, everything else is TRL's):

* ``_calculate_rewards``: unchanged, but its ``[B, N]`` rewards (every process's rows,
  before TRL sums them) are kept for the next method.
* ``_generate_and_score_completions``: TRL's, then its scalar advantage is replaced by the
  ``[B, N]`` per-objective advantages (``advantages.py``). TRL's buffering, shuffling and
  splitting into micro-batches work on any leading batch dimension, so the per-objective
  advantages travel through ``num_iterations`` and gradient accumulation as TRL's did.
* ``_compute_loss``: PAMA's Noon loss (``pama_ext``'s op) or MORLHF's linear loss in place of
  TRL's surrogate, with TRL's KL term, normalisers and metrics (``loss.py``).

Batch-level granularities (``pama_ext.statistics.STATISTICS_GRANULARITIES``) are solved once
per optimizer step: at the step's first micro-batch, the statistics of all its micro-batches
(TRL holds them in ``_buffered_inputs``) are summed, all-reduced over every process and
solved; every micro-batch of the step and every rank then uses those weights. They depend on
the clip indicator ``u <= 1 + epsilon_high`` under the current policy. On the first optimizer
step after a generation the policy has not moved (``u = 1`` for every token), so no forward
pass is needed; on later steps of the same generation (``num_iterations > 1``, or
``steps_per_generation > gradient_accumulation_steps``) one no-grad forward per micro-batch
gives the current log-probabilities.

TRL attributes this relies on (checked against TRL 1.16, ``_version.py``): ``_buffered_inputs``,
``_step``, ``_metrics``, ``_get_per_token_logps_and_entropies``, ``reward_func_names``,
``num_generations(_eval)``, ``epsilon_low/high``, ``beta``, ``loss_type``,
``aux_loss_enabled``, ``router_aux_loss_coef``, ``current_gradient_accumulation_steps``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from trl import GRPOTrainer
from trl.trainer.utils import nanmax, nanmin

from pama_ext.statistics import STATISTICS_GRANULARITIES, BatchStatistics, batch_statistics

from .advantages import per_objective_advantages
from .config import PAMAGRPOConfig, resolve_and_check
from .loss import broadcast_weights, kl_per_token, linear_policy_loss, pama_policy_loss, trl_normaliser

# the optional model inputs TRL's _compute_loss forwards (multimodal models)
_FORWARD_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


def _loss_mask(inputs) -> Tensor:
    mask = inputs["completion_mask"]
    return mask if "tool_mask" not in inputs else mask * inputs["tool_mask"]


def _check_preference_length(preference, n: int) -> None:
    if preference is not None and len(preference) != n:
        raise ValueError(
            f"PAMAGRPOTrainer: objective_preference has {len(preference)} weights but there are {n} reward "
            f"functions (one objective each): give one weight per reward function"
        )


class PAMAGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose reward functions are the objectives of PAMA (or of MORLHF).

    Same arguments as ``trl.GRPOTrainer``; ``args`` must be a ``PAMAGRPOConfig`` (None builds
    a default one). Adds the metrics ``objectives/<reward name>/weight`` (mean weight of that
    objective over the step's tokens) and ``objectives/zero_advantage_fraction`` (tokens whose
    combined advantage is exactly 0: under PAMA, no objective pushes them up).
    """

    def __init__(self, model, reward_funcs=None, args: Optional[PAMAGRPOConfig] = None, *rest, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = PAMAGRPOConfig(f"{str(name).split('/')[-1] or 'model'}-PAMA-GRPO")
        if not isinstance(args, PAMAGRPOConfig):
            raise TypeError(
                f"PAMAGRPOTrainer: `args` must be a PAMAGRPOConfig (a GRPOConfig with the objective settings), "
                f"got {type(args).__name__}"
            )
        resolve_and_check(args)  # again: fields may have been edited since the config was built
        if kwargs.get("environment_factory") is None and reward_funcs is not None:  # fail before loading the model
            _check_preference_length(args.objective_preference, len(reward_funcs) if isinstance(reward_funcs, list) else 1)
        super().__init__(model, reward_funcs, args, *rest, **kwargs)
        n = len(self.reward_funcs)  # environments may have added reward sources
        _check_preference_length(args.objective_preference, n)
        pref = args.objective_preference or [1.0 / n] * n
        self._pama_preference = torch.tensor(pref, dtype=torch.float32, device=self.accelerator.device)
        self._pama_rewards: Optional[Tensor] = None  # [B_all, N] of the batch being scored
        self._pama_rollout_step = -1  # global_step of the last training generation
        self._pama_step_weights = None  # (global_step, [N] weights) of the current optimizer step

    # ------------------------------------------------------------------ advantages
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._pama_rewards = rewards  # gathered over processes, one column per reward function
        return rewards

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        rewards, self._pama_rewards = self._pama_rewards, None
        train = self.model.training
        g = self.num_generations if train else self.num_generations_eval
        adv = per_objective_advantages(rewards, g, self.args.objective_normalization)
        b = output["completion_ids"].shape[0]
        rank = self.accelerator.process_index
        output["advantages"] = adv[rank * b : (rank + 1) * b]  # this process's rows, as TRL slices
        if train:
            self._pama_rollout_step = self.state.global_step
        return output

    # ------------------------------------------------------------------ the weights of a step
    def _policy_logps(self, model, inputs, **kwargs):
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        extra = {k: inputs.get(k) for k in _FORWARD_KEYS}
        return self._get_per_token_logps_and_entropies(model, ids, attn, inputs["completion_ids"].size(1), **kwargs, **extra)

    def _statistics(self, inputs, on_policy: bool) -> BatchStatistics:
        mask = _loss_mask(inputs)
        if on_policy:  # the policy has not moved since the rollout: u = 1, every token unclipped
            logp = old = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        else:
            old = inputs.get("old_per_token_logps")
            if old is None:
                raise RuntimeError("PAMAGRPOTrainer: the policy moved since the rollout but TRL kept no old log-probs")
            with torch.no_grad():
                logp, _, _ = self._policy_logps(self.model, inputs, batch_size=self.args.per_device_train_batch_size)
        return batch_statistics(
            logp, old, inputs["advantages"], mask, clip_eps=self.epsilon_high, granularity=self.args.objective_granularity
        )

    def _step_weights(self, inputs, train: bool) -> Tensor:
        """[N] weights of a batch-level granularity: one solve per optimizer step, all ranks."""
        g = self.args.objective_granularity
        if not train:  # evaluation: this batch alone, generated just now (u = 1)
            return self._statistics(inputs, on_policy=True).solve(g).weights
        step = self.state.global_step
        if self._pama_step_weights is None or self._pama_step_weights[0] != step:
            spg = self.args.steps_per_generation
            batches = [self._buffered_inputs[(self._step + k) % spg] for k in range(self.current_gradient_accumulation_steps)]
            if batches[0] is not inputs:
                raise RuntimeError(
                    "PAMAGRPOTrainer: the micro-batch being trained is not the one TRL buffered for this step; "
                    "was _prepare_inputs overridden?"
                )
            on_policy = self._pama_rollout_step == step
            total = self._statistics(batches[0], on_policy)
            for mb in batches[1:]:
                total += self._statistics(mb, on_policy)
            self._pama_step_weights = (step, total.all_reduce().solve(g).weights)
        return self._pama_step_weights[1]

    # ------------------------------------------------------------------ the loss
    def _compute_loss(self, model, inputs):
        train = self.model.training
        mask = _loss_mask(inputs)
        logp, entropies, aux_loss = self._policy_logps(
            model, inputs, compute_entropy=True, compute_aux_loss=self.aux_loss_enabled
        )
        advantages = inputs["advantages"]
        if advantages.dim() != 2 or advantages.shape[1] != len(self.reward_funcs):
            raise RuntimeError(
                f"PAMAGRPOTrainer: expected per-objective advantages [B, {len(self.reward_funcs)}], got "
                f"{list(advantages.shape)}"
            )
        old = inputs.get("old_per_token_logps")
        old = logp.detach() if old is None else old  # on-policy: TRL's shortcut, u = 1
        accumulation = self.current_gradient_accumulation_steps if train else 1.0
        norm = trl_normaliser(
            self.loss_type,
            mask,
            accumulation=accumulation,
            max_completion_length=self.max_completion_length,
            num_items_in_batch=inputs.get("num_items_in_batch"),
            num_processes=self.accelerator.num_processes,
            steps_per_generation=self.args.steps_per_generation,
            train=train,
        )
        # the ratio and the KL first, as TRL builds them (the same graph, the same gradient bits)
        ratio = torch.exp(logp - old)
        kl = None
        if self.beta != 0.0:
            kl = kl_per_token(logp, inputs["ref_per_token_logps"], ratio, self.args.use_bias_correction_kl)
        per_token = None  # per-token terms TRL aggregates with the loss type's normaliser
        if self.args.objective_combiner == "pama":
            g = self.args.objective_granularity
            weights = self._step_weights(inputs, train) if g in STATISTICS_GRANULARITIES else None
            loss, s, w = pama_policy_loss(
                logp, old, advantages, mask, norm, clip_eps=self.epsilon_high, granularity=g, weights=weights
            )
        else:
            per_token, s = linear_policy_loss(
                ratio, advantages, self._pama_preference, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high
            )
            w = broadcast_weights(self._pama_preference, (*logp.shape, advantages.shape[1]))
            loss = 0.0
        if kl is not None:
            per_token = self.beta * kl if per_token is None else per_token + self.beta * kl
        if per_token is not None:
            loss = loss + norm.aggregate(per_token, mask)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics["train" if train else "eval"]["aux_loss"].append(
                self.accelerator.gather_for_metrics(aux_loss).mean().item()
            )
        self._log_step_metrics("train" if train else "eval", mask, ratio, s, w, entropies, kl)
        return loss

    # ------------------------------------------------------------------ metrics
    @torch.no_grad()
    def _log_step_metrics(self, mode, mask, ratio, s, w, entropies, kl) -> None:
        """TRL's loss metrics (kl, entropy, clip ratios) with the combined advantage ``s``, and
        the objectives' mean weights and the zero-advantage fraction: one all-reduce of sums."""
        m = mask.to(torch.float32)
        s = s.expand_as(m)
        u = ratio.detach()
        low = ((u < 1 - self.epsilon_low) & (s < 0)).to(torch.float32)
        high = ((u > 1 + self.epsilon_high) & (s > 0)).to(torch.float32)
        kl_sum = (kl.detach() * m).sum() if kl is not None else m.new_zeros(())
        sums = torch.cat(
            [
                torch.stack(
                    [
                        m.sum(),
                        ((s == 0).to(torch.float32) * m).sum(),
                        (low * m).sum(),
                        (high * m).sum(),
                        (torch.maximum(low, high) * m).sum(),
                        kl_sum,
                        (entropies.detach() * m).sum(),
                    ]
                ),
                (w * m[..., None]).sum(dim=(0, 1)),
            ]
        )
        sums = self.accelerator.reduce(sums, reduction="sum")
        tokens = sums[0].clamp(min=1.0)
        means = (sums[1:] / tokens).tolist()
        metrics = self._metrics[mode]
        metrics["objectives/zero_advantage_fraction"].append(means[0])
        metrics["clip_ratio/low_mean"].append(means[1])
        metrics["clip_ratio/high_mean"].append(means[2])
        metrics["clip_ratio/region_mean"].append(means[3])
        if kl is not None:
            metrics["kl"].append(means[4])
        metrics["entropy"].append(means[5])
        for name, value in zip(self.reward_func_names, means[6:]):
            metrics[f"objectives/{name}/weight"].append(value)
        per_row = torch.stack([(low * m).sum(-1), (high * m).sum(-1)], dim=1) / m.sum(-1, keepdim=True)
        per_row = self.accelerator.gather(per_row)
        metrics["clip_ratio/low_min"].append(nanmin(per_row[:, 0]).item())
        metrics["clip_ratio/high_max"].append(nanmax(per_row[:, 1]).item())
