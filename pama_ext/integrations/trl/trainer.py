"""``PAMAGRPOTrainer``: TRL's ``GRPOTrainer`` with one objective per reward function.

What changes against ``GRPOTrainer`` (three overridden methods, everything else is TRL's):

* ``_calculate_rewards``: unchanged, but its ``[B, N]`` rewards (every process's rows,
  before TRL sums them) are kept for the next method.
* ``_generate_and_score_completions``: TRL's, then its scalar advantage is replaced by the
  ``[B, N]`` per-objective advantages (``advantages.py``). TRL's buffering, shuffling and
  splitting into micro-batches work on any leading batch dimension, so the per-objective
  advantages travel through ``num_iterations`` and gradient accumulation as TRL's did.
* ``_compute_loss``: PAMA's Noon loss (``pama_ext``'s op) or MORLHF's linear loss in place of
  TRL's surrogate, with TRL's KL term, normalisers and metrics (``loss.py``). The loss is one
  function of the [B, T] log-probabilities (``_policy_loss``), fed either by TRL's forward
  (its fused LM head returns the log-probabilities) or, with ``use_fused_linear=True``, by
  ``pama_ext.fused_linear.fused_linear_logp_loss`` on the last hidden states and the LM head.

``use_fused_linear=True``: the policy's forward (the one TRL patches with its fused LM head)
is wrapped once more (``_install_fused_forward``). ``_compute_loss`` leaves a request (the
loss as a function of the log-probabilities, ``logits_to_keep``, the temperature) and calls
TRL's own ``_get_per_token_logps_and_entropies``, so the model inputs are built exactly as
TRL builds them (ids, attention mask, labels, the multimodal keys, autocast). The wrapped
forward takes the request, runs the backbone (``model.base_model``, as TRL's head does: no LM
head), shifts as TRL shifts (the hidden state at position ``p`` predicts the token at
``p + 1``; the last ``logits_to_keep`` predictions are the completion's), and calls
``fused_linear_logp_loss`` with the LM head's ``weight``/``bias`` inside the model's forward,
so DDP / ZeRO-3 / FSDP see a forward that produced the loss. The per-token entropy is not
computed there (it needs each token's whole distribution): the ``entropy`` metric is not
logged in this mode.

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
``aux_loss_enabled``, ``router_aux_loss_coef``, ``current_gradient_accumulation_steps``,
``temperature``; with ``use_fused_linear``, ``trl.trainer.utils.add_fused_lm_head``'s forward
keywords (``fused_lm_head``, ``labels``) and ``FusedCausalLMOutput``.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from accelerate.utils import is_peft_model
from torch import Tensor, nn
from trl import GRPOTrainer
from trl.trainer.utils import FusedCausalLMOutput, maybe_gather_lm_head_ctx, nanmax, nanmin

from pama_ext.fused_linear import fused_linear_logp_loss
from pama_ext.preference import scale_advantages
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


# config fields by which models scale or soft-cap their logits after the LM head (TRL's fused
# head applies them; fused_linear_logp_loss computes plain `hidden @ weight.T + bias`)
_LOGIT_TRANSFORMS = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def _is_adapter_layer(module) -> bool:
    """A PEFT tuner layer (LoRA & co. wrap the original layer as ``base_layer``)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        BaseTunerLayer = ()
    return isinstance(module, BaseTunerLayer) or hasattr(module, "base_layer")


def _unwrapped(model):
    return model.get_base_model() if is_peft_model(model) else model


def check_fused_lm_head(model) -> None:
    """Refuse, naming ``use_fused_linear``, a model whose logits ``fused_linear_logp_loss``
    cannot reproduce from its last hidden states and ``get_output_embeddings()``."""
    what = "PAMAGRPOTrainer: use_fused_linear=True"
    fix = "or set use_fused_linear=False"
    base = _unwrapped(model)
    name = type(base).__name__
    get = getattr(base, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise ValueError(
            f"{what} computes the loss from the LM head given by the model's get_output_embeddings(), but "
            f"{name}.get_output_embeddings() {'returned None' if callable(get) else 'does not exist'}: use a "
            f"causal LM with an output embedding (LM head) {fix}"
        )
    if _is_adapter_layer(head):
        raise ValueError(
            f"{what}: the LM head of {name} carries a PEFT adapter ({type(head).__name__}); the fused loss "
            "multiplies the hidden states by `lm_head.weight` directly, so the adapter would be ignored and never "
            f"trained. Remove 'lm_head' from the adapter's target_modules {fix}"
        )
    weight = getattr(head, "weight", None)
    if not isinstance(head, nn.Linear) or not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise ValueError(
            f"{what} needs an LM head that is a torch.nn.Linear with a floating weight (logits = hidden @ weight.T "
            f"+ bias); {name}.get_output_embeddings() is a {type(head).__name__}"
            f"{'' if weight is None or not isinstance(weight, Tensor) else f' with a {weight.dtype} weight'} {fix}"
        )
    config = getattr(base, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    transforms = {k: getattr(text, k, None) for k in _LOGIT_TRANSFORMS}
    transforms = {k: v for k, v in transforms.items() if v is not None and v != 1}
    if getattr(text, "final_logit_softcapping", None) is not None:
        transforms["final_logit_softcapping"] = text.final_logit_softcapping
    if transforms:
        named = ", ".join(f"{k}={v}" for k, v in transforms.items())
        raise ValueError(
            f"{what}: {name}'s config scales or soft-caps the logits after the LM head ({named}), which the fused "
            f"loss does not apply {fix}"
        )


@dataclass
class _FusedRequest:
    """What the next ``fused_lm_head=True`` forward of the policy computes instead of TRL's head."""

    loss_of_logp: Callable[[Tensor], Tensor]
    logits_to_keep: int
    temperature: float
    cast_lm_head_to_fp32: bool
    loss: Optional[Tensor] = None  # set by the forward


class _FusedSlot:
    """Holds the pending request between ``_compute_loss`` and the wrapped forward."""

    request: Optional[_FusedRequest] = None


def _install_fused_forward(model, slot: _FusedSlot) -> None:
    """Wrap ``model.forward`` (TRL's fused-head forward): a ``fused_lm_head=True`` call made
    while ``slot`` holds a request runs ``_fused_linear_forward``; every other call is TRL's."""
    previous = model.forward
    text = model.config.get_text_config()
    # the backbone, as TRL's fused head finds it (before transformers 5, vision-language models
    # expose their language backbone as `model`)
    import transformers
    from packaging.version import Version

    backbone = "base_model"
    if text is not model.config and Version(transformers.__version__) < Version("5.0.0"):
        backbone = "model"

    @functools.wraps(type(model).forward)  # the original signature: `generate` checks its kwargs against it
    def forward(self, *args, fused_lm_head=False, labels=None, **kwargs):
        request = slot.request if fused_lm_head else None
        if request is None:
            return previous(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
        slot.request = None  # this call only
        return _fused_linear_forward(self, getattr(self, backbone), request, labels, args, kwargs)

    model.forward = types.MethodType(forward, model)


def _fused_linear_forward(model, backbone, request: _FusedRequest, labels, args, kwargs):
    """The backbone, then ``fused_linear_logp_loss`` on the completion positions' hidden states."""
    if labels is None or kwargs.get("shift_labels") is not None:
        raise RuntimeError("PAMAGRPOTrainer: use_fused_linear expects TRL's `labels` (no `shift_labels`)")
    kwargs["use_cache"] = False
    hidden = backbone(*args, **kwargs).last_hidden_state
    t = request.logits_to_keep
    # TRL scores hidden[:, :-1] against labels[:, 1:] and keeps the last t columns
    hidden = hidden[:, -t - 1 : -1]
    head = model.get_output_embeddings()
    weight, bias = head.weight, head.bias
    hidden = hidden.to(weight.device)  # a model split over devices may end elsewhere than its head
    targets = labels[:, -t:].to(weight.device)
    mask = targets != -100
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        DTensor = ()
    if isinstance(weight, DTensor):  # FSDP2: the full head, as TRL's fused head gathers it
        weight = weight.full_tensor()
        bias = None if bias is None else bias.full_tensor()
    if request.cast_lm_head_to_fp32:
        hidden = hidden.float()

    def loss_of_logp(logp: Tensor) -> Tensor:
        # TRL's log-probabilities are 0 where the label is -100 (padding after the completion)
        return request.loss_of_logp(logp.masked_fill(~mask, 0.0))

    # outside autocast: the head in the promoted dtype of hidden and weight (float32 with mixed
    # precision's float32 weights), and the loss of logp in float32, as on TRL's path
    with torch.autocast(hidden.device.type, enabled=False), maybe_gather_lm_head_ctx(weight, bias):
        loss, logp = fused_linear_logp_loss(
            hidden, weight, targets, mask, loss_of_logp, bias=bias, temperature=request.temperature
        )
    request.loss = loss
    return FusedCausalLMOutput(loss=loss, log_probs=logp.masked_fill(~mask, 0.0), label_mask=mask)


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
        if args.use_fused_linear and isinstance(model, nn.Module):
            check_fused_lm_head(model)  # before TRL's own checks: the error names use_fused_linear
        super().__init__(model, reward_funcs, args, *rest, **kwargs)
        self._pama_fused = None  # the slot of the wrapped forward (use_fused_linear)
        if args.use_fused_linear:
            check_fused_lm_head(self.model)  # a model loaded from a path, or wrapped by TRL (peft_config)
            if self.aux_loss_enabled:
                raise ValueError(
                    "PAMAGRPOTrainer: use_fused_linear=True does not add the Mixture-of-Experts router's auxiliary "
                    f"loss (router_aux_loss_coef={self.router_aux_loss_coef}): set router_aux_loss_coef=0.0 or "
                    "use_fused_linear=False"
                )
            self._pama_fused = _FusedSlot()
            _install_fused_forward(_unwrapped(self.model), self._pama_fused)  # the model TRL gave its fused head
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
        if self.args.objective_combiner == "pama" and self.args.objective_preference is not None:
            # steerable PAMA is PAMA on the preference-scaled advantages (pama_ext/preference.py):
            # scaled here, the step statistics, the loss and the metrics all see the same ones
            adv = scale_advantages(adv, self._pama_preference.to(torch.float64))
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
            # TRL's log-probabilities (its own chunked LM head), also with use_fused_linear: no
            # gradient is needed here, and _compute_loss runs this before its fused request
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
        mode = "train" if train else "eval"
        mask = _loss_mask(inputs)
        advantages = inputs["advantages"]
        if advantages.dim() != 2 or advantages.shape[1] != len(self.reward_funcs):
            raise RuntimeError(
                f"PAMAGRPOTrainer: expected per-objective advantages [B, {len(self.reward_funcs)}], got "
                f"{list(advantages.shape)}"
            )
        # the step's weights first (batch-level granularities): their statistics pass may run the
        # model (no grad, TRL's log-probabilities), which must not happen inside the fused forward
        weights = None
        if self.args.objective_combiner == "pama" and self.args.objective_granularity in STATISTICS_GRANULARITIES:
            weights = self._step_weights(inputs, train)
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
        parts = {}

        def loss_of_logp(logp: Tensor) -> Tensor:
            loss, parts["metrics"] = self._policy_loss(logp, inputs, mask, norm, weights)
            return loss

        if self.args.use_fused_linear:
            loss = self._fused_linear_loss(model, inputs, loss_of_logp)
            entropies = aux_loss = None  # not computed by the fused pass (aux loss: refused at construction)
        else:
            logp, entropies, aux_loss = self._policy_logps(
                model, inputs, compute_entropy=True, compute_aux_loss=self.aux_loss_enabled
            )
            loss = loss_of_logp(logp)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        self._log_step_metrics(mode, mask, *parts["metrics"], entropies)
        return loss

    def _policy_loss(self, logp: Tensor, inputs, mask: Tensor, norm, weights: Optional[Tensor]):
        """The micro-batch's loss as a function of its [B, T] log-probabilities ``logp``, and
        the detached ``(ratio, s, w, kl)`` its metrics need. Both paths of ``_compute_loss``
        (TRL's log-probabilities, or ``fused_linear_logp_loss``'s) call this one function."""
        advantages = inputs["advantages"]
        old = inputs.get("old_per_token_logps")
        old = logp.detach() if old is None else old  # on-policy: TRL's shortcut, u = 1
        # the ratio and the KL first, as TRL builds them (the same graph, the same gradient bits)
        ratio = torch.exp(logp - old)
        kl = None
        if self.beta != 0.0:
            kl = kl_per_token(logp, inputs["ref_per_token_logps"], ratio, self.args.use_bias_correction_kl)
        per_token = None  # per-token terms TRL aggregates with the loss type's normaliser
        if self.args.objective_combiner == "pama":
            loss, s, w = pama_policy_loss(
                logp, old, advantages, mask, norm, clip_eps=self.epsilon_high,
                granularity=self.args.objective_granularity, weights=weights,
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
        return loss, (ratio.detach(), s, w, None if kl is None else kl.detach())

    def _fused_linear_loss(self, model, inputs, loss_of_logp: Callable[[Tensor], Tensor]) -> Tensor:
        """``loss_of_logp`` of the policy's log-probabilities through ``fused_linear_logp_loss``:
        TRL's own forward call (``_policy_logps``), answered by the wrapped forward."""
        request = _FusedRequest(
            loss_of_logp,
            logits_to_keep=inputs["completion_ids"].size(1),
            temperature=self.temperature,
            cast_lm_head_to_fp32=bool(self.args.cast_lm_head_to_fp32),
        )
        self._pama_fused.request = request
        try:
            self._policy_logps(model, inputs)  # one forward (no batch_size: the whole micro-batch)
        finally:
            self._pama_fused.request = None
        if request.loss is None:
            raise RuntimeError(
                "PAMAGRPOTrainer: use_fused_linear=True but the model's forward did not reach the fused loss; "
                "was the policy's forward replaced after the trainer was built?"
            )
        return request.loss

    # ------------------------------------------------------------------ metrics
    @torch.no_grad()
    def _log_step_metrics(self, mode, mask, ratio, s, w, kl, entropies) -> None:
        """TRL's loss metrics (kl, entropy, clip ratios) with the combined advantage ``s``, and
        the objectives' mean weights and the zero-advantage fraction: one all-reduce of sums.
        ``entropies`` None (``use_fused_linear``): no ``entropy`` metric."""
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
                        (entropies.detach() * m).sum() if entropies is not None else m.new_zeros(()),
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
        if entropies is not None:
            metrics["entropy"].append(means[5])
        for name, value in zip(self.reward_func_names, means[6:]):
            metrics[f"objectives/{name}/weight"].append(value)
        per_row = torch.stack([(low * m).sum(-1), (high * m).sum(-1)], dim=1) / m.sum(-1, keepdim=True)
        per_row = self.accelerator.gather(per_row)
        metrics["clip_ratio/low_min"].append(nanmin(per_row[:, 0]).item())
        metrics["clip_ratio/high_max"].append(nanmax(per_row[:, 1]).item())
