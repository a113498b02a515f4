"""``pama_ext.PAMA``: a drop-in ``torch.optim.Optimizer`` for multi-objective PPO.

``PAMA`` wraps any base optimizer (AdamW, SGD, a fused or 8-bit optimizer) and adds the
multi-objective part of the update: ``opt.loss(...)`` turns N per-objective advantages into
the loss to back-propagate, with PAMA's weights (or a baseline's); ``opt.step()`` is the base
optimizer's step. Everything else is the base optimizer's: ``PAMA`` shares its
``param_groups``, ``state`` and ``defaults`` (live views, not copies), so LR schedulers,
``step(closure)``, ``zero_grad(set_to_none=...)``, step hooks, ``torch.amp.GradScaler``
(fp16) and bf16 autocast keep working.

Usage (one PPO minibatch per optimizer step)::

    base = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    opt = pama_ext.PAMA(base, num_objectives=2)        # combiner="pama", granularity=pama_ext.DEFAULT_GRANULARITY
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for batch in minibatches:
        logp = policy_logprobs(policy, batch)          # [B, T], requires grad
        loss = opt.loss(logp, batch.old_logp, batch.advantages, batch.mask)  # adv [B,T,N] / [B,N]
        opt.zero_grad()
        loss.backward()
        opt.step(); sched.step()
        opt.last_weights, opt.last_stats                # tensors: no host sync until read

Gradient accumulation (micro-batches; one set of ``batch`` / ``batch_mean`` /
``sequence_gram`` weights for the whole step, equal to the weights of the concatenated
batch; for ``sequence_gram`` each micro-batch holds whole responses)::

    with torch.no_grad():                              # a statistics pass: cheap, no graph
        for mb in micro_batches:
            opt.accumulate(policy_logprobs(policy, mb), mb.old_logp, mb.advantages, mb.mask)
    opt.solve()                                        # optional: the first loss() solves
    for mb in micro_batches:
        loss = opt.loss(policy_logprobs(policy, mb), mb.old_logp, mb.advantages, mb.mask)
        (loss / len(micro_batches)).backward()
    opt.step()                                         # releases the step's weights
                                                       # (zero_grad does not)

The weights depend on the current policy through the clip indicator ``u_t <= 1 + eps``, so
the statistics pass needs ``logp`` under the parameters of this step: one extra no-grad
forward per micro-batch (cheaper than the forward + backward that follows). When the
policy has not moved since the rollout (the first PPO epoch, ``logp == old_logp``) pass
``old_logp`` as ``logp`` and skip that forward (``benchmarks/OPTIMIZER.md``: the statistics
pass costs under 1% of a GPT-2 step, the extra forward about 40%). A caller who accepts an
approximation may also pass the detached ``logp`` of the previous epoch's forward (the clip
indicator then lags one optimizer step). ``accumulate`` after a ``solve`` starts a
new accumulation (so a step skipped by ``GradScaler`` does not mix two steps). With the
per-micro-batch ``token_mean`` loss, ``sum_k loss_k / K`` has the gradient of the whole
batch when every micro-batch holds the same number of masked tokens (as in every PPO
trainer that averages micro-batch losses). ``accumulate`` is a no-op for granularities and
combiners whose weights need no batch statistics (``token``, ``sequence``, ``linear``;
``mgda_ub`` and ``mgda`` solve per ``loss`` call), so one loop serves every combiner.

Data parallelism: with ``torch.distributed`` initialized, ``batch`` / ``batch_mean`` /
``sequence_gram`` statistics (and the Gram of ``mgda_ub``) are all-reduced (SUM) over ``process_group``
(default: the default group) before the solve, so every rank uses the weights of the
global batch: one all-reduce of ``2 + N + N^2`` float64 numbers per ``loss`` call, or per
``solve`` when accumulating. Every rank must therefore call ``loss`` (or ``solve``) the same
number of times. The loss itself stays the per-rank ``token_mean`` (DDP averages the
per-rank gradients, which is the global token mean when the ranks hold equally many masked
tokens). Nothing depends on the parameter layout: DDP and FSDP work unchanged (``mgda``
excepted, see below). ``sync_statistics=False`` disables the collective.

Combiners (one call, ``opt.loss(logp, old_logp, advantages, mask, *, shared=None,
preference=None)``, for all of them):

=========== ===================================================================================
``pama``    Noon PPO with PAMA's weights at ``granularity`` (``pama_ext.DEFAULT_GRANULARITY``
            by default: ``token``, Theorem 1 per token, where objectives whose advantage is
            exactly 0 abstain: a token is reinforced when no objective's advantage is negative
            and at least one is positive, by the smallest positive one; ``sequence``, ``batch``,
            ``batch_mean``, ``sequence_gram``: the min-norm point of the Gram
            in which each response counts once): the fused op ``pama_ext.pama_loss``; with
            accumulation or a process group, the statistics pass + one solve +
            ``weighted_noon_loss`` with those weights (backward: the fused kernel). Extra
            cost: an elementwise count of zero combined advantages for the diagnostics.
``linear``  MORLHF: ``s_t = sum_i w_i A'_i`` with signed advantages and the standard PPO clip
            (no Noon clamp). ``w`` = ``preference`` of the constructor ([N], default uniform
            1/N, used as given) or of the call: [N], or [B, N] per-sample (prompt-dependent)
            preferences. ``last_weights`` is the preference used.
``mgda_ub`` MGDA-UB (Sener & Koltun): pass ``shared=`` a tensor the policy computed on the way
            to ``logp`` (e.g. the last hidden states, [B, T, H]; it must require grad). Cost:
            N extra vector-Jacobian products from ``logp`` back to ``shared`` (through the LM
            head and log-softmax only), an N x N Gram of N x |shared| numbers, one solve.
``mgda``    Exact MGDA over all parameters of the optimizer: N extra backward passes through
            the whole model (graph retained) and N x d gradient memory, then the final
            ``loss.backward()``: about N + 1 times the backward work of ``pama``. For
            benchmarks and Pareto-stationarity checks on small models. Under DDP the
            per-objective gradients are averaged over the group (N x d communication;
            tested with DDP on gloo); FSDP's sharded parameters are not supported.
=========== ===================================================================================

For ``mgda_ub`` and ``mgda`` the weights are found inside ``loss`` (the per-objective
gradients are taken with ``torch.autograd.grad``, which leaves ``.grad`` untouched), and the
returned loss is ``sum_i c_i L^(i)`` (``weighted_noon_loss`` with those weights), so the
caller's ``loss.backward(); opt.step()`` applies exactly ``sum_i c_i grad L^(i)``.

Diagnostics: ``opt.last_weights`` (shaped as ``pama_ext.pama_weights`` returns them: [N],
[B, N] for ``sequence`` and per-sample preferences, [B, T, N] for ``token``, computed on
first access) and ``opt.last_stats`` (a ``PAMADiagnostics`` of 0-dim float64 tensors:
masked tokens, clip fraction, fraction of valid tokens whose combined advantage is exactly 0,
the solver's objective and KKT residual). Reading them is the caller's choice.

Checkpoints: ``opt.state_dict()`` is ``{"base": base.state_dict(), "pama": {...}}`` (config,
step count, accumulated statistics and pinned weights of an unfinished step, last weights);
``load_state_dict`` restores both, so a resumed run continues exactly as an uninterrupted
one. A plain base-optimizer state dict (no ``"pama"`` key) is loaded into the base optimizer.
Under FSDP or ``torch.distributed.checkpoint``, whose optimizer-state helpers expect a plain
optimizer, pass them ``opt.optimizer`` and save ``opt.pama_state_dict()`` beside it
(``opt.load_pama_state_dict`` restores it).

Step hooks registered on ``PAMA`` fire around ``PAMA.step``; hooks registered on the base
optimizer fire around its own step (global hooks fire for both). ``GradScaler``: use
``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()``; it unscales the shared
``param_groups`` and calls ``PAMA.step`` only for finite gradients.

Layout: this module is the optimizer protocol (construction, ``step``, ``zero_grad``,
``accumulate`` / ``solve``, checkpoints) and ``PAMA.loss``'s dispatch; the combiners' loss
paths are plain functions in ``pama_ext/combiner_losses.py`` (with ``PAMADiagnostics``,
re-exported here).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any, Callable, Dict, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import combiner_losses, functional
from .reference import DEFAULT_GRANULARITY
from ._validation import (
    GRANULARITIES,
    LOSS_AGGS,
    MAX_OBJECTIVES,
    NONFINITE_MODES,
    LossInputs,
    LossSettings,
    check_choice,
    check_clip_eps,
    check_loss_inputs,
)
from .combiner_losses import PAMADiagnostics
from .distributed import is_distributed
from .statistics import STATISTICS_GRANULARITIES, BatchStatistics, Solution, statistics_of
from .preference import check_preference, scale_advantages

__all__ = ["PAMA", "PAMADiagnostics", "COMBINERS"]

COMBINERS = ("pama", "linear", "mgda_ub", "mgda")
_STATE_VERSION = 1
_DD = torch.float64


def _shared_with_base(name: str) -> property:
    """A live view of the base optimizer's attribute ``name`` (read and assigned through),
    so LR schedulers and checkpoints that touch ``opt.param_groups`` reach the base's."""
    return property(
        lambda self: getattr(self.optimizer, name),
        lambda self, value: setattr(self.optimizer, name, value),
        doc=f"The base optimizer's ``{name}``.",
    )


class PAMA(Optimizer):
    """Wrap ``optimizer`` so that ``opt.loss(...)`` gives the multi-objective PPO loss.

    Args:
        optimizer: the base ``torch.optim.Optimizer`` (its ``param_groups`` are shared).
        num_objectives: N, the number of objectives (advantages' last dimension).
        clip_eps: PPO clip range.
        granularity: one of ``pama_ext.GRANULARITIES``; None (default): ``pama_ext.DEFAULT_GRANULARITY``:
            ``token`` (per token; objectives whose advantage is exactly 0 abstain: a token is
            reinforced when no objective's advantage is negative and at least one is positive,
            by the smallest positive one), ``sequence``, ``batch``, ``batch_mean`` or
            ``sequence_gram`` (one weight vector from the min-norm point of the Gram of the
            per-response mean advantage vectors: each response counts once, so accumulation
            and data parallelism sum per-response terms; ``combiner="pama"`` only; see
            ``pama_ext.pama_loss``).
        combiner: ``pama`` (default), ``linear``, ``mgda_ub`` or ``mgda`` (module docstring).
        preference: ``linear`` and ``pama``: the default preference vector [N] (uniform if
            None). ``linear``: the weights of MORLHF's sum (entries >= 0). ``pama``: steers
            the Pareto point towards the objectives it weights (every entry > 0; PAMA on the
            preference-scaled advantages ``A_i p_max / p_i``, ``pama_ext/preference.py``);
            uniform is plain PAMA, exactly.
        loss_agg: ``token_mean`` (default) or ``seq_mean_token_mean``.
        backend: the fused op's backend for ``pama`` (``auto``, ``cpp``, ``torch``).
        nonfinite: ``raise`` (default) or ``mask``, as in ``pama_ext.pama_loss``.
        process_group: the group batch statistics are all-reduced over; None = the default
            group whenever ``torch.distributed`` is initialized.
        sync_statistics: set False to never all-reduce (each rank solves on its shard).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        num_objectives: int,
        *,
        clip_eps: float = 0.2,
        granularity: Optional[str] = None,
        combiner: str = "pama",
        preference: Optional[Union[Tensor, list, tuple]] = None,
        loss_agg: str = "token_mean",
        backend: str = "auto",
        nonfinite: str = "raise",
        process_group=None,
        sync_statistics: bool = True,
    ) -> None:
        fn = "PAMA"
        if isinstance(optimizer, PAMA):
            raise TypeError(f"{fn}: `optimizer` is already a PAMA optimizer; wrap its base optimizer instead")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{fn}: `optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(num_objectives, bool) or not isinstance(num_objectives, int):
            raise TypeError(f"{fn}: `num_objectives` must be an int, got {type(num_objectives).__name__}")
        if not 1 <= num_objectives <= MAX_OBJECTIVES:
            raise ValueError(f"{fn}: `num_objectives` must be in [1, {MAX_OBJECTIVES}], got {num_objectives}")
        self.clip_eps = check_clip_eps(fn, clip_eps)
        if granularity is not None and combiner != "pama":
            raise ValueError(
                f"{fn}: granularity={granularity!r} applies to combiner='pama' only; "
                f"combiner={combiner!r} has its own (leave granularity unset)"
            )
        granularity = DEFAULT_GRANULARITY if granularity is None else granularity
        check_choice(fn, "granularity", granularity, GRANULARITIES)
        check_choice(fn, "combiner", combiner, COMBINERS)
        check_choice(fn, "loss_agg", loss_agg, LOSS_AGGS)
        check_choice(fn, "nonfinite", nonfinite, NONFINITE_MODES)
        check_choice(fn, "backend", backend, functional._backends.known_backends())
        if preference is not None and combiner not in ("linear", "pama"):
            raise ValueError(f"{fn}: `preference` is for combiner='linear' or 'pama', not {combiner!r}")
        self.optimizer = optimizer
        self.num_objectives = num_objectives
        self.granularity = granularity
        self.combiner = combiner
        self.loss_agg = loss_agg
        self.backend = backend
        self.nonfinite = nonfinite
        self.process_group = process_group
        self.sync_statistics = bool(sync_statistics)
        self.preference = self._check_preference(fn, preference, per_sample_ok=False, combiner=combiner)
        # torch.optim.Optimizer's bookkeeping, without re-registering the parameters
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True
        # PAMA's own state
        self._step_count = 0
        self._accumulated: Optional[BatchStatistics] = None
        self._pinned: Optional[Solution] = None
        self._last_weights: Union[None, Tensor, Callable[[], Tensor]] = None
        self._last_stats: Optional[PAMADiagnostics] = None

    # ------------------------------------------------------------------ shared with the base
    param_groups = _shared_with_base("param_groups")
    state = _shared_with_base("state")
    defaults = _shared_with_base("defaults")

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Optional[Callable[[], Any]] = None):
        """The base optimizer's step; then the step's accumulated statistics are released."""
        out = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        self._step_count += 1
        self.reset_accumulation()
        return out

    def __getstate__(self) -> Dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._patch_step_function()

    def __repr__(self) -> str:
        extra = f", preference={self.preference.tolist()}" if self.combiner in ("linear", "pama") else ""
        return (
            f"PAMA(num_objectives={self.num_objectives}, combiner={self.combiner!r}, "
            f"granularity={self.granularity!r}, clip_eps={self.clip_eps}, loss_agg={self.loss_agg!r}{extra},\n"
            f"     base={self.optimizer!r})"
        )

    # ------------------------------------------------------------------ diagnostics
    @property
    def last_weights(self) -> Optional[Tensor]:
        """The weights of the last ``loss`` call (see the module docstring for shapes)."""
        if callable(self._last_weights):
            self._last_weights = self._last_weights()
        return self._last_weights

    @property
    def last_stats(self) -> Optional[PAMADiagnostics]:
        """``PAMADiagnostics`` of the last ``loss`` call (0-dim float64 tensors)."""
        return self._last_stats

    @property
    def step_count(self) -> int:
        """How many times ``step`` ran (restored by ``load_state_dict``)."""
        return self._step_count

    # ------------------------------------------------------------------ helpers
    def _check_preference(self, fn: str, preference, per_sample_ok: bool, batch: Optional[int] = None,
                          combiner: Optional[str] = None):
        n = self.num_objectives
        combiner = self.combiner if combiner is None else combiner
        if preference is None:
            return torch.full((n,), 1.0 / n, dtype=_DD)
        if combiner == "pama":  # > 0 everywhere, normalised (pama_ext/preference.py)
            return check_preference(fn, preference, n, batch if per_sample_ok else None)
        p = torch.as_tensor(preference)
        if not p.is_floating_point():
            p = p.to(_DD)
        ok = p.shape == (n,) or (per_sample_ok and p.dim() == 2 and p.shape[1] == n and p.shape[0] == batch)
        if not ok:
            want = f"[N] = [{n}]" + (f" or [B, N] = [{batch}, {n}]" if per_sample_ok else "")
            raise ValueError(f"{fn}: `preference` must have shape {want}, got {list(p.shape)}")
        return p.detach()

    def _pama_advantages(self, fn: str, advantages: Tensor, preference) -> Tensor:
        """``pama``: the advantages scaled by the call's preference, else the constructor's
        (unchanged when that is uniform: plain PAMA, no copy)."""
        if preference is not None:
            p = self._check_preference(fn, preference, per_sample_ok=True, batch=advantages.shape[0])
        else:
            p = self.preference
            if bool((p == p[0]).all()):  # a CPU tensor: no device sync
                return advantages
        return scale_advantages(advantages, p)

    def _sync(self) -> bool:
        return self.sync_statistics and is_distributed(self.process_group)

    def _check_n(self, fn: str, advantages: Tensor) -> None:
        if isinstance(advantages, Tensor) and advantages.shape[-1:] != (self.num_objectives,):
            raise ValueError(
                f"{fn}: `advantages` {list(advantages.shape)} must have N = num_objectives = "
                f"{self.num_objectives} in the last dimension"
            )

    @property
    def _needs_statistics(self) -> bool:
        return self.combiner == "pama" and self.granularity in STATISTICS_GRANULARITIES

    # ------------------------------------------------------------------ accumulation
    def accumulate(self, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
                   preference: Optional[Tensor] = None) -> None:
        """Add one micro-batch's statistics to this step's (no gradient, no graph).

        For ``pama`` with ``batch`` / ``batch_mean`` / ``sequence_gram`` (micro-batches of
        whole responses); a no-op for every other combiner or granularity (their weights
        need no batch statistics). After a ``solve`` (or the first ``loss`` that solved),
        ``accumulate`` starts a new step's accumulation. ``preference``: as in ``loss`` (pass
        the same one to both).
        """
        fn = "PAMA.accumulate"
        self._check_n(fn, advantages)
        if not self._needs_statistics:
            return
        # validated once here; the statistics pass trusts it
        x = check_loss_inputs(fn, logp.detach(), old_logp, advantages, mask)
        x = x._replace(advantages=self._pama_advantages(fn, x.advantages, preference))
        if self._pinned is not None:
            self.reset_accumulation()
        st = statistics_of(x, self.clip_eps, self.granularity, self.nonfinite, fn)
        if self._accumulated is None:
            self._accumulated = st
        else:
            self._accumulated += st

    def solve(self) -> Optional[Tensor]:
        """All-reduce the accumulated statistics (when distributed) and solve once.

        The weights (returned, [N] float64) are used by every ``loss`` call until ``step``
        (or ``reset_accumulation``). Returns None when nothing needs solving (combiners or
        granularities without batch statistics). Raises if nothing was accumulated.
        """
        if not self._needs_statistics:
            return None
        if self._pinned is not None:
            return self._pinned.weights
        if self._accumulated is None:
            raise RuntimeError("PAMA.solve: no statistics accumulated; call opt.accumulate(...) first")
        if self._sync():
            self._accumulated.all_reduce(self.process_group)
        self._pinned = self._accumulated.solve(self.granularity)
        return self._pinned.weights

    def reset_accumulation(self) -> None:
        """Drop the accumulated statistics and the step's pinned weights."""
        self._accumulated = None
        self._pinned = None

    @property
    def accumulated_statistics(self) -> Optional[BatchStatistics]:
        """The ``BatchStatistics`` accumulated for this step (all-reduced once solved)."""
        return self._accumulated

    # ------------------------------------------------------------------ the loss
    def loss(
        self,
        logp: Tensor,
        old_logp: Tensor,
        advantages: Tensor,
        mask: Tensor,
        *,
        shared: Optional[Tensor] = None,
        preference: Optional[Tensor] = None,
    ) -> Tensor:
        """The loss to call ``.backward()`` on, for this optimizer's combiner.

        Args:
            logp, old_logp, advantages, mask: as in ``pama_ext.pama_loss``; ``advantages``
                has N = ``num_objectives`` in its last dimension.
            shared: ``mgda_ub`` only (required there): a tensor in the graph of ``logp``
                that requires grad, e.g. the last hidden states.
            preference: ``linear`` or ``pama``: [N] or per-sample [B, N] preference for this
                call (default: the constructor's). With a batch-level ``pama`` granularity,
                pass the same one to ``accumulate``.
        """
        fn = "PAMA.loss"
        self._check_n(fn, advantages)
        if shared is not None and self.combiner != "mgda_ub":
            raise ValueError(f"{fn}: `shared` is for combiner='mgda_ub', not {self.combiner!r}")
        if preference is not None and self.combiner not in ("linear", "pama"):
            raise ValueError(f"{fn}: `preference` is for combiner='linear' or 'pama', not {self.combiner!r}")
        # validated once, where the call enters; everything below trusts ``x``
        x = check_loss_inputs(fn, logp, old_logp, advantages, mask)
        s = self._settings(fn)
        if self.combiner == "pama":
            x = x._replace(advantages=self._pama_advantages(fn, x.advantages, preference))
            sol = self._step_solution(x, s)
            out = combiner_losses.pama_fused_loss(x, s) if sol is None else combiner_losses.solution_loss(x, s, sol)
        elif self.combiner == "linear":
            w = self.preference if preference is None else self._check_preference(
                fn, preference, per_sample_ok=True, batch=x.logp.shape[0])
            out = combiner_losses.linear_loss(x, s, w)
        elif self.combiner == "mgda_ub":
            out = combiner_losses.mgda_ub_loss(x, s, shared, self.process_group, self.sync_statistics)
        else:
            params = [p for group in self.param_groups for p in group["params"]]
            out = combiner_losses.mgda_loss(x, s, params, self.process_group, self.sync_statistics)
        loss, self._last_weights, self._last_stats = out
        return loss

    def _settings(self, fn: str) -> LossSettings:
        """This optimizer's loss settings (checked by the constructor / ``load_state_dict``)."""
        return LossSettings(fn, self.clip_eps, self.granularity, self.loss_agg, self.backend, self.nonfinite)

    def _step_solution(self, x: LossInputs, s: LossSettings) -> Optional[Solution]:
        """``pama``'s weights when they come from a batch solve rather than the fused op: this
        step's accumulated statistics (solved once), or, distributed without accumulation,
        this batch's statistics all-reduced over the group. None: the fused op solves."""
        if not self._needs_statistics:
            return None
        if self._pinned is not None or self._accumulated is not None:  # this step's weights
            self.solve()
            return self._pinned
        if self._sync():  # distributed, no accumulation: this batch's global statistics
            st = statistics_of(x, s.clip_eps, s.granularity, s.nonfinite, s.fn)
            return st.all_reduce(self.process_group).solve(self.granularity)
        return None

    # ------------------------------------------------------------------ checkpoints
    def _config(self) -> Dict[str, Any]:
        return {
            "num_objectives": self.num_objectives,
            "combiner": self.combiner,
            "granularity": self.granularity,
            "clip_eps": self.clip_eps,
            "loss_agg": self.loss_agg,
            "preference": self.preference.clone(),
        }

    def pama_state_dict(self) -> Dict[str, Any]:
        """PAMA's own state alone: config, step count, an unfinished step's accumulated
        statistics and pinned weights, the last weights. Small tensors and Python values.

        For checkpoint tools that handle the base optimizer's state themselves (FSDP's
        ``FSDP.optim_state_dict``, ``torch.distributed.checkpoint``'s
        ``get_optimizer_state_dict``): give them ``opt.optimizer`` and save this next to it.
        """
        last = self._last_weights if isinstance(self._last_weights, Tensor) else None
        return {
            "version": _STATE_VERSION,
            "config": self._config(),
            "step": self._step_count,
            "accumulated": None if self._accumulated is None else self._accumulated.data.clone(),
            "pinned": None if self._pinned is None else tuple(t.clone() for t in self._pinned),
            "last_weights": None if last is None else last.detach().clone(),
        }

    def state_dict(self) -> Dict[str, Any]:
        """``{"base": base.state_dict(), "pama": pama_state_dict()}``."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        sd = {"base": self.optimizer.state_dict(), "pama": self.pama_state_dict()}
        for hook in self._optimizer_state_dict_post_hooks.values():
            out = hook(self, sd)
            if out is not None:
                sd = out
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore the base optimizer's state and PAMA's (see ``state_dict``).

        ``num_objectives`` and ``combiner`` must match this optimizer's; ``clip_eps``,
        ``granularity``, ``loss_agg`` and ``preference`` are restored from the checkpoint
        (as a base optimizer restores ``lr`` from its param groups).
        """
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = hook(self, state_dict)
            if out is not None:
                state_dict = out
        if "pama" not in state_dict:
            if "state" in state_dict and "param_groups" in state_dict:
                warnings.warn(
                    "PAMA.load_state_dict: a plain optimizer state dict (no 'pama' entry); "
                    "loading it into the base optimizer, PAMA's own state is left as is",
                    stacklevel=2,
                )
                self.optimizer.load_state_dict(state_dict)
                return
            raise ValueError("PAMA.load_state_dict: expected a dict with 'base' and 'pama' entries")
        self._check_pama_state(state_dict["pama"])
        self.optimizer.load_state_dict(state_dict["base"])
        self.load_pama_state_dict(state_dict["pama"])
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _check_pama_state(self, pama_state: Dict[str, Any]) -> None:
        cfg = pama_state["config"]
        for key in ("num_objectives", "combiner"):
            if cfg[key] != getattr(self, key):
                raise ValueError(
                    f"PAMA.load_state_dict: the checkpoint has {key}={cfg[key]!r}, this optimizer "
                    f"{key}={getattr(self, key)!r}"
                )

    def load_pama_state_dict(self, pama_state: Dict[str, Any]) -> None:
        """Restore what ``pama_state_dict`` saved (the base optimizer's state is left alone)."""
        self._check_pama_state(pama_state)
        cfg = pama_state["config"]
        self.granularity = cfg["granularity"]
        self.clip_eps = float(cfg["clip_eps"])
        self.loss_agg = cfg["loss_agg"]
        self.preference = torch.as_tensor(cfg["preference"], dtype=_DD).clone()
        self._step_count = int(pama_state["step"])
        acc = pama_state.get("accumulated")
        self._accumulated = None if acc is None else BatchStatistics(acc.clone(), self.num_objectives)
        pinned = pama_state.get("pinned")
        self._pinned = None if pinned is None else Solution(*(t.clone() for t in pinned))
        last = pama_state.get("last_weights")
        self._last_weights = None if last is None else last.clone()
        self._last_stats = None
