"""One PPO run of the demo: rollouts from a causal LM, N objective scores, a KL penalty to
the reference policy, per-objective GAE on N value heads, and ``pama_ext.PAMA`` (with the
method's combiner) as the optimizer.

The loop follows shared/PAMA.md: every objective's per-token reward is its score on the
last response token plus the KL penalty ``-beta (logp_old - logp_ref)`` on every token
(beta adapted towards a target KL, as in Ziegler et al. / TRL); GAE per objective with
gamma = 1, lambda = 0.95 and value targets taken before any normalisation; each objective's
advantages divided by their own standard deviation over the batch's response tokens, not
centred (``whiten="scale"``: the Noon clamp then cuts at the critic's zero; "centre" also
subtracts the mean, as TRL's masked_whiten does); then ``epochs`` PPO epochs
in which ``opt.loss`` combines the N advantages (PAMA, MORLHF's linear scalarisation or
MGDA-UB) and the N value heads regress their returns.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from transformers import DynamicCache

import pama_ext
from pama_ext.fused_linear import fused_linear_logp, fused_linear_logp_loss
from pama_ext.reference import token_advantage, token_weights
from pama_ext.rl import (MultiHeadValueModel, group_advantages, per_objective_gae, scale_per_objective,
                         scores_to_token_rewards, whiten_per_objective)

from .policy import encode_texts, positions
from .rewards import Objective, score_all
from .steering import consistency_keep, steerable

# name -> PAMA keyword arguments. "pama": the library's default (pama_ext.PAMA with no
# granularity given: pama_ext.DEFAULT_GRANULARITY); "pama_<granularity>": PAMA at that
# granularity ("token": Theorem 1 on each token's scalars; "sequence": Theorem 1 on each
# response's mean advantages; "batch": the min-norm point of the token-weighted Gram;
# "sequence_gram": of the Gram in which each response counts once; "batch_mean": Theorem 1
# on the batch means); "linear": MORLHF (uniform preference, signed PPO clip); "mgda_ub":
# the min-norm point of the per-objective gradients w.r.t. the last hidden states; "mgda":
# the exact one over all parameters (N extra backward passes).
METHODS: Dict[str, Dict[str, str]] = {
    "pama": {"combiner": "pama"},
    **{f"pama_{g}": {"combiner": "pama", "granularity": g} for g in pama_ext.GRANULARITIES},
    "linear": {"combiner": "linear"},
    # an ablation: MORLHF's uniform weights on the Noon-clamped advantages (the surrogate is
    # then Noon PPO's), which separates what the clamp does from what PAMA's weights do
    "noon_linear": {"combiner": "linear"},
    # an experiment (benchmarks/FIDELITY.md): Theorem 1 on each token's signed advantages,
    # without the Noon clamp: s_t = the projection of 0 onto [min_i A_i, max_i A_i] (up only
    # when every objective's advantage is positive, down only when every one is negative),
    # under the standard signed PPO clip
    "pama_token_signed": {"combiner": "linear"},
    # the experiment (benchmarks/FIDELITY.md) that became the library's token rule: objectives
    # whose advantage is exactly 0 abstain (pama_ext.reference.token_advantage), run through
    # the linear combiner so that it did not depend on the kernels; kept to reproduce the page
    "pama_token_abstain": {"combiner": "linear"},
    "mgda_ub": {"combiner": "mgda_ub"},
    "mgda": {"combiner": "mgda"},
}
# the library's default against the paper's two baselines; `pama_batch` (the first default)
# and the other granularities on request: four methods made the main job's fresh-machine
# time pass 6 minutes (README, "Two commands")
DEFAULT_METHODS = ("pama", "linear", "mgda_ub")
ESTIMATORS = ("gae", "grpo")
KL_PENALTIES = ("reward", "loss", "shared")
WHITENINGS = ("centre", "scale")


@dataclass
class PPOConfig:
    batch: int = 32  # prompts (one response each) per rollout
    max_new_tokens: int = 30
    epochs: int = 4  # PPO epochs per rollout
    micro_batches: int = 1  # gradient accumulation: one optimizer step per epoch
    lr: float = 1e-3
    clip_eps: float = 0.2
    vf_coef: float = 0.5
    value_clip: float = 0.2
    kl_coef: float = 0.2  # the spec: beta 0.2 ...
    target_kl: float = 3.0  # ... adapted towards a target KL of 3 (per response, summed over tokens)
    # samples over which beta may move by 20% (Ziegler et al.'s controller). Their 10000 is
    # sized for runs of many thousands of samples; a run of 40 rollouts of 32 is 1280, in which
    # 10000 lets beta move by 2.6% at most: beta fixed in effect, not adapted as the spec says.
    # 256 lets it move by up to 2.5% a rollout (a factor e over such a run): the methods that
    # stay below the target get a smaller beta, down to 0.073 in 40 rollouts
    # (benchmarks/FIDELITY.md, "The KL controller")
    kl_horizon: int = 256
    gamma: float = 1.0
    lam: float = 0.95
    max_grad_norm: float = 1.0
    backend: str = "auto"
    # "gae": per-token GAE on N value heads (PPO, the spec); "grpo": group_size samples per
    # prompt, each objective's score normalised within its group (advantages [B, N], no
    # value heads)
    estimator: str = "gae"
    group_size: int = 4
    # where the KL to the reference goes: "reward" (the spec's: -beta KL_t in every objective's
    # per-token reward; under grpo its sum over the response in every objective's sequence
    # reward; beta adapted towards target_kl) or "loss" (loss_kl_coef times the k3 estimate,
    # a term of its own beside the combined surrogate, as TRL's GRPO does) or "shared" (grpo
    # only: -beta times the response's KL, centred in its group, added to every objective's
    # advantage after its group normalisation, so that one beta weighs the KL the same in
    # every objective whatever the spread of its scores; beta adapted as for "reward")
    kl_penalty: str = "reward"
    loss_kl_coef: float = 0.04
    # gae: how each objective's advantages are normalised over the batch before the Noon
    # clamp: "scale" (divided by the std, not centred: the sign stays the critic's, so the
    # clamp cuts at "better than the value head expected"; benchmarks/FIDELITY.md, "Centring
    # before the clamp") or "centre" (mean 0, std 1, TRL's and verl's masked_whiten). grpo
    # ignores it: its group mean is its baseline
    whiten: str = "scale"
    # compute the training log-probabilities and the loss from the last hidden states and
    # the LM head chunk by chunk (pama_ext.fused_linear): the B x T x V logits never exist
    fused_linear: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


class AdaptiveKL:
    """beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon) (Ziegler et al. 2019)."""

    def __init__(self, init: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target > 0:
            err = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + err * n / self.horizon


@dataclass
class Rollout:
    """A batch of prompts and sampled responses: token ids, masks, decoded texts."""

    prompts: List[str]
    prompt_ids: Tensor  # [B, P] left-padded
    prompt_mask: Tensor  # [B, P] long
    responses: Tensor  # [B, T]
    response_mask: Tensor  # [B, T] bool: the response tokens, end token included
    texts: List[str]
    lengths: List[int]  # response tokens before the end token
    sample_logp: Optional[Tensor] = None  # [B, T] log-prob of each token when it was sampled

    @property
    def sequences(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.responses], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask, self.response_mask.long()], dim=1)

    def rows(self, idx: slice) -> "Rollout":
        return Rollout(
            self.prompts[idx], self.prompt_ids[idx], self.prompt_mask[idx], self.responses[idx],
            self.response_mask[idx], self.texts[idx], self.lengths[idx],
            None if self.sample_logp is None else self.sample_logp[idx],
        )


def banned_logits(tokenizer, vocab_size: int, device) -> Tensor:
    """-inf on the pad and unknown tokens (when they are not the end token): the policy never
    samples them, and the training log-probabilities use the same renormalised distribution."""
    bias = torch.zeros(vocab_size, device=device)
    for tid in {tokenizer.pad_token_id, tokenizer.unk_token_id} - {tokenizer.eos_token_id, None}:
        if tid < vocab_size:
            bias[tid] = -math.inf
    return bias


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, gen: torch.Generator, banned: Tensor) -> Rollout:
    """Sample one response per prompt (temperature 1, KV cache, left padding)."""
    device = banned.device
    prompt_ids, prompt_mask = encode_texts(tokenizer, prompts, device, add_eos=False)
    eos = tokenizer.eos_token_id
    B = prompt_ids.shape[0]
    attn = prompt_mask
    # transformers' cache object (the `cache=` argument; `past_key_values` is deprecated
    # from 5.24 and goes in 5.40): the model extends it in place at every step
    cache = DynamicCache(config=model.config)
    out = model(input_ids=prompt_ids, attention_mask=attn, position_ids=positions(attn), cache=cache, use_cache=True)
    logits = out.logits[:, -1].float()
    next_pos = positions(attn)[:, -1] + 1
    done = torch.zeros(B, dtype=torch.bool, device=device)
    toks, live, lps = [], [], []
    for _ in range(max_new_tokens):
        logprobs = torch.log_softmax(logits + banned, dim=-1)
        tok = torch.multinomial(logprobs.exp(), 1, generator=gen)[:, 0]
        tok = torch.where(done, torch.full_like(tok, eos), tok)
        toks.append(tok)
        lps.append(logprobs.gather(-1, tok[:, None])[:, 0])
        live.append(~done)
        done = done | (tok == eos)
        if bool(done.all()):
            break
        attn = torch.cat([attn, torch.ones(B, 1, dtype=attn.dtype, device=device)], dim=1)
        out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos[:, None], cache=cache, use_cache=True)
        logits = out.logits[:, -1].float()
        next_pos = next_pos + 1
    responses = torch.stack(toks, dim=1)
    mask = torch.stack(live, dim=1)
    ended = ((responses == eos) & mask).any(dim=1)
    lengths = (mask.sum(1) - ended.long()).tolist()
    texts = [
        tokenizer.decode(responses[i, :n].tolist(), skip_special_tokens=True).strip() for i, n in enumerate(lengths)
    ]
    return Rollout(list(prompts), prompt_ids, prompt_mask, responses, mask, texts, lengths, torch.stack(lps, dim=1))


def forward(vmodel: MultiHeadValueModel, ro: Rollout, banned: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``(logp [B, T], values [B, T, N], hidden [B, L, H])`` of the response tokens.

    The logits at position P + t - 1 score response token t; the value at that position is
    the value of the state in which token t is generated (MultiHeadValueModel's alignment).
    ``hidden`` is the last hidden state, the shared representation of MGDA-UB.
    """
    seqs, attn = ro.sequences, ro.attention_mask
    P, T = ro.prompt_ids.shape[1], ro.responses.shape[1]
    out = vmodel.model(
        input_ids=seqs, attention_mask=attn, position_ids=positions(attn), output_hidden_states=True, use_cache=False
    )
    hidden = out.hidden_states[-1]
    values = vmodel.value_heads(hidden[:, P - 1 : P + T - 1].to(vmodel.value_heads.weight.dtype))
    return response_logp(out.logits, ro, banned), values.float(), hidden


def forward_hidden(vmodel: MultiHeadValueModel, ro: Rollout) -> Tuple[Tensor, Tensor]:
    """``(hidden [B, T, H], values [B, T, N])`` at the positions that score the response
    tokens, from the backbone alone: no LM head, so no logits (``--fused-linear``)."""
    seqs, attn = ro.sequences, ro.attention_mask
    P, T = ro.prompt_ids.shape[1], ro.responses.shape[1]
    out = vmodel.model.base_model(input_ids=seqs, attention_mask=attn, position_ids=positions(attn), use_cache=False)
    hidden = out.last_hidden_state[:, P - 1 : P + T - 1]
    values = vmodel.value_heads(hidden.to(vmodel.value_heads.weight.dtype))
    return hidden, values.float()


def _head(model, banned: Tensor) -> Tuple[Tensor, Tensor]:
    """The LM head's weight and its bias with the sampler's renormalisation ``banned`` added."""
    head = model.get_output_embeddings()
    return head.weight, banned if head.bias is None else head.bias + banned


@torch.no_grad()
def forward_fused(vmodel: MultiHeadValueModel, ro: Rollout, banned: Tensor) -> Tuple[Tensor, Tensor]:
    """``(logp, values)`` as ``forward`` gives them, with the log-probabilities computed from
    the last hidden states chunk by chunk (rollout scoring under ``--fused-linear``)."""
    hidden, values = forward_hidden(vmodel, ro)
    weight, bias = _head(vmodel.model, banned)
    return fused_linear_logp(hidden, weight, ro.responses, ro.response_mask, bias=bias), values


def fused_policy_loss(vmodel: MultiHeadValueModel, ro: Rollout, banned: Tensor, mask: Tensor,
                      loss_of_logp: Callable[[Tensor], Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """``(loss, logp, values)``: ``loss_of_logp`` of the response log-probabilities, fused with
    the LM head (the sampler's renormalisation ``banned`` is the head's bias)."""
    hidden, values = forward_hidden(vmodel, ro)
    weight, bias = _head(vmodel.model, banned)
    loss, logp = fused_linear_logp_loss(hidden, weight, ro.responses, mask, loss_of_logp, bias=bias)
    return loss, logp, values


def response_logp(logits: Tensor, ro: Rollout, banned: Tensor) -> Tensor:
    """[B, T] log-probabilities of the response tokens from the logits of the whole sequence
    (position P + t - 1 scores response token t), under the sampler's renormalisation."""
    P, T = ro.prompt_ids.shape[1], ro.responses.shape[1]
    logits = logits[:, P - 1 : P + T - 1].float() + banned
    return torch.log_softmax(logits, dim=-1).gather(-1, ro.responses[..., None])[..., 0]


def mean_weights(w: Tensor, mask: Tensor) -> List[float]:
    """The step's weights as one [N] list: as they are for ``batch`` combiners, the mean over
    the response tokens of per-token weights [B, T, N] (``pama_token``)."""
    w = w.detach()
    if w.dim() == 3:
        w = w[mask] if bool(mask.any()) else w.reshape(-1, w.shape[-1])
    elif w.dim() == 2:
        w = w[mask.any(1)] if bool(mask.any()) else w
    return (w.mean(0) if w.dim() == 2 else w).tolist()


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float) -> Tensor:
    """PPO's clipped value loss, mean over the response tokens and the N heads."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    err = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2).mean(-1)
    m = mask.to(err.dtype)
    return 0.5 * (err * m).sum() / m.sum().clamp_min(1)


def evaluate(model, tokenizer, objectives: Sequence[Objective], prompts: Sequence[str], samples: int, seed: int,
             max_new_tokens: int, banned: Tensor, batch: int = 128) -> Tuple[List[float], List[dict]]:
    """Mean reward per objective over ``samples`` responses to every held-out prompt, sampled
    with a generator seeded by ``seed`` (the same for every method), and the samples."""
    gen = torch.Generator(device=banned.device).manual_seed(seed)
    todo = [p for p in prompts for _ in range(samples)]
    rows: List[Tensor] = []
    examples: List[dict] = []
    for i in range(0, len(todo), batch):
        ro = generate(model, tokenizer, todo[i : i + batch], max_new_tokens, gen, banned)
        r = score_all(objectives, ro.prompts, ro.texts, ro.lengths)
        rows.append(r)
        for p, t, rr in zip(ro.prompts, ro.texts, r.tolist()):
            examples.append({"prompt": p, "response": t, "rewards": dict(zip([o.name for o in objectives], rr))})
    return torch.cat(rows).mean(0).tolist(), examples


def train(
    method: str,
    seed: int,
    initial_model,
    tokenizer,
    objectives: Sequence[Objective],
    train_prompts: Sequence[str],
    eval_fn: Callable[[torch.nn.Module], Tuple[List[float], List[dict]]],
    cfg: PPOConfig,
    steps: int,
    eval_every: int,
    device: torch.device,
    on_step: Optional[Callable[[dict], None]] = None,
    initial_eval: Optional[List[float]] = None,
    preference: Optional[Sequence[float]] = None,
    consistency: bool = False,
) -> dict:
    """Train a copy of ``initial_model`` with ``method`` for ``steps`` rollouts; return the
    history (train rewards, weights, KL, losses per step; held-out rewards every
    ``eval_every`` steps and at the end) and the final samples. ``initial_eval``: the
    held-out rewards of ``initial_model`` when the caller has them (the evaluation seed is
    the same for every run, so they are the same for every method and seed).
    ``preference``: ``pama*`` and ``linear`` only: steerable PAMA's or MORLHF's preference.
    ``consistency``: train only on the responses whose scores agree across objectives
    (reward consistency sampling, ``steering.consistency_keep``)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if preference is not None and not steerable(method):
        raise ValueError(f"method {method!r} takes no preference (steerable: pama, pama_<granularity>, linear)")
    if cfg.estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {cfg.estimator!r}; choose from {', '.join(ESTIMATORS)}")
    grpo = cfg.estimator == "grpo"
    if cfg.kl_penalty not in KL_PENALTIES:
        raise ValueError(f"unknown kl_penalty {cfg.kl_penalty!r}; choose from {', '.join(KL_PENALTIES)}")
    kl_in_loss = cfg.kl_penalty == "loss"
    if cfg.kl_penalty == "shared" and not grpo:
        raise ValueError("kl_penalty 'shared' is for the grpo estimator (a sequence-level KL beside group-normalised "
                         "advantages); under gae use 'reward' or 'loss'")
    if cfg.whiten not in WHITENINGS:
        raise ValueError(f"unknown whiten {cfg.whiten!r}; choose from {', '.join(WHITENINGS)}")
    # MGDA-UB differentiates each objective's loss through the graph from the hidden states to
    # logp, which the fused loss does not build: that baseline always runs unfused
    fused = cfg.fused_linear and method != "mgda_ub"
    if grpo and cfg.batch % cfg.group_size:
        raise ValueError(f"batch {cfg.batch} is not a multiple of group_size {cfg.group_size}")
    n = len(objectives)
    torch.manual_seed(seed)
    policy = MultiHeadValueModel(copy.deepcopy(initial_model), n, objective_names=[o.name for o in objectives])
    policy.to(device).train()
    ref = initial_model.eval()  # the frozen reference: never trained (the policy is a copy), only run under no_grad
    banned = banned_logits(tokenizer, policy.config.vocab_size, device)
    base = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    opt = pama_ext.PAMA(base, num_objectives=n, clip_eps=cfg.clip_eps, backend=cfg.backend, **METHODS[method],
                        **({} if preference is None else {"preference": list(preference)}))
    kl_ctl = AdaptiveKL(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
    rng = random.Random(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    history: List[dict] = []
    evals: List[dict] = []

    def run_eval(step: int):
        policy.eval()
        means, examples = eval_fn(policy.model)
        policy.train()
        evals.append({"step": step, "rewards": means})
        return examples

    if initial_eval is None:
        run_eval(0)
    else:
        evals.append({"step": 0, "rewards": list(initial_eval)})
    for step in range(1, steps + 1):
        if grpo:  # group_size responses to each of batch / group_size prompts, a group in consecutive rows
            prompts = [p for p in (rng.choice(train_prompts) for _ in range(cfg.batch // cfg.group_size))
                       for _ in range(cfg.group_size)]
        else:
            prompts = [rng.choice(train_prompts) for _ in range(cfg.batch)]
        policy.eval()
        ro = generate(policy.model, tokenizer, prompts, cfg.max_new_tokens, gen, banned)
        policy.train()
        scores = score_all(objectives, ro.prompts, ro.texts, ro.lengths).to(device)
        mask = ro.response_mask
        with torch.no_grad():
            if fused:
                old_logp, old_values = forward_fused(policy, ro, banned)
                ref_logp = forward_ref_fused(ref, ro, banned)
            else:
                old_logp, old_values, _ = forward(policy, ro, banned)
                ref_logp = forward_ref(ref, ro, banned)
            kl = torch.where(mask, old_logp - ref_logp, torch.zeros((), device=device))
            if grpo:
                # the spec's per-token KL penalty summed over the response (gamma = 1) is a
                # sequence reward of its own: -beta KL_b in every objective, before the group norm
                if cfg.kl_penalty == "shared":  # normalise the scores alone, then one KL term for all
                    kl_centred = group_advantages(kl.sum(1), cfg.group_size, scale="none")  # [B], group mean 0
                    adv = group_advantages(scores, cfg.group_size) - kl_ctl.value * kl_centred[:, None]
                else:
                    seq_rewards = scores if kl_in_loss else scores - kl_ctl.value * kl.sum(1, keepdim=True)
                    adv = group_advantages(seq_rewards, cfg.group_size)  # [B, N]
            else:
                rewards = scores_to_token_rewards(scores, mask, kl=None if kl_in_loss else kl, kl_coef=kl_ctl.value)
                gae = per_objective_gae(rewards, old_values, mask, gamma=cfg.gamma, lam=cfg.lam)
                adv = (whiten_per_objective(gae.advantages, mask) if cfg.whiten == "centre"
                       else scale_per_objective(gae.advantages, mask))
        kept = None
        if consistency:  # reward consistency sampling: drop the responses whose objectives disagree
            keep = consistency_keep(scores, cfg.group_size if grpo else None)
            kept = float(keep.double().mean())
            mask = mask & keep[:, None]
        signed_w = None
        if method == "noon_linear":
            adv = adv.clamp_min(0)
        elif method == "pama_token_signed":
            signed_w = pama_ext.theorem1(adv).to(adv.dtype)  # per token (gae) or per response (grpo)
            adv = n * signed_w * adv  # linear's uniform 1/n preference then gives sum_i w_i A_i
        elif method == "pama_token_abstain":  # the experiment that became the library's token rule
            signed_w = token_weights(adv).to(adv.dtype)
            adv = token_advantage(adv)[..., None].expand_as(adv).contiguous()  # linear's average of n equal columns
        K = cfg.micro_batches
        micro = [slice(k * cfg.batch // K, (k + 1) * cfg.batch // K) for k in range(K)]
        weights = []
        for epoch in range(cfg.epochs):
            if K > 1:
                with torch.no_grad():  # PAMA's statistics pass: one set of batch weights for the step
                    for mb in micro:
                        if epoch == 0:
                            logp_mb = old_logp[mb]
                        else:
                            logp_mb = (forward_fused if fused else forward)(policy, ro.rows(mb), banned)[0]
                        opt.accumulate(logp_mb, old_logp[mb], adv[mb], mask[mb])
            opt.zero_grad(set_to_none=True)
            for mb in micro:
                sub = ro.rows(mb)

                def policy_terms(logp, shared=None):
                    pol = opt.loss(logp, old_logp[mb], adv[mb], mask[mb], shared=shared)
                    kl_term = cfg.loss_kl_coef * k3_kl(logp, ref_logp[mb], mask[mb]) if kl_in_loss else None
                    return pol, kl_term

                if fused:
                    parts = {}

                    def loss_of_logp(logp):
                        parts["pol"], parts["kl"] = policy_terms(logp)
                        return parts["pol"] if parts["kl"] is None else parts["pol"] + parts["kl"]

                    main, _, values = fused_policy_loss(policy, sub, banned, mask[mb], loss_of_logp)
                    pol, kl_term = parts["pol"], parts["kl"]  # for the record; the gradient is main's
                    aux = torch.zeros((), device=device)
                else:
                    logp, values, hidden = forward(policy, sub, banned)
                    pol, kl_term = policy_terms(logp, hidden if method == "mgda_ub" else None)
                    main = pol
                    aux = torch.zeros((), device=device)
                    if kl_term is not None:
                        aux = aux + kl_term
                if not grpo:
                    vl = value_loss(values, old_values[mb], gae.returns[mb], mask[mb], cfg.value_clip)
                    aux = aux + cfg.vf_coef * vl
                ((main + aux) / K).backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            w_step = opt.last_weights if signed_w is None else signed_w[micro[-1]]
            weights.append(mean_weights(w_step, mask[micro[-1]]))  # the last micro-batch's
            opt.step()
        seq_kl = float((kl.sum(1)).mean())
        if not kl_in_loss:  # the KL coefficient in the loss is fixed
            kl_ctl.update(seq_kl, cfg.batch)
        rec = {
            "step": step,
            "rewards": scores.mean(0).tolist(),
            "weights": [sum(c) / len(c) for c in zip(*weights)],
            "kl": seq_kl,
            "kl_coef": cfg.loss_kl_coef if kl_in_loss else kl_ctl.value,
            "policy_loss": float(pol.detach()),
            **({"kl_loss": float(kl_term.detach())} if kl_in_loss else {}),
            **({} if grpo else {"value_loss": float(vl.detach())}),
            "response_tokens": float(mask.sum(1).float().mean()),
            **({} if kept is None else {"consistency_kept": kept}),
        }
        history.append(rec)
        examples = None
        if step % eval_every == 0 or step == steps:
            examples = run_eval(step)
            rec["eval"] = evals[-1]["rewards"]
        if on_step is not None:
            on_step(rec)
    return {"method": method, "seed": seed, "history": history, "evals": evals, "samples": examples or [],
            "preference": None if preference is None else list(preference), "consistency": consistency}


def k3_kl(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    """GRPO's KL penalty: the mean over response tokens of exp(r) - r - 1, r = logp_ref - logp
    (Schulman's k3 estimator of KL(pi || pi_ref): unbiased, never negative)."""
    r = torch.where(mask, ref_logp - logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    per_token = torch.expm1(r) - r
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1)


def forward_ref(ref, ro: Rollout, banned: Tensor) -> Tensor:
    """[B, T] log-probabilities of the response tokens under the reference policy (a bare LM)."""
    attn = ro.attention_mask
    out = ref(input_ids=ro.sequences, attention_mask=attn, position_ids=positions(attn), use_cache=False)
    return response_logp(out.logits, ro, banned)


@torch.no_grad()
def forward_ref_fused(ref, ro: Rollout, banned: Tensor) -> Tensor:
    """``forward_ref`` from the reference's last hidden states, chunk by chunk."""
    attn = ro.attention_mask
    P, T = ro.prompt_ids.shape[1], ro.responses.shape[1]
    out = ref.base_model(input_ids=ro.sequences, attention_mask=attn, position_ids=positions(attn), use_cache=False)
    weight, bias = _head(ref, banned)
    return fused_linear_logp(out.last_hidden_state[:, P - 1 : P + T - 1], weight, ro.responses, ro.response_mask, bias=bias)
