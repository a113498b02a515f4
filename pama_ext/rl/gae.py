"""Per-objective advantages: GAE with one value head per objective, whitening, sequence level.

shared/PAMA.md, "Per-objective advantages": GAE runs separately for each of the N objectives,
the value targets are taken before whitening, and each objective is whitened on its own
over the batch so that reward scale does not decide the comparison across objectives.

GAE conventions (the contract of the C++ kernel csrc/gae_cpu.cpp too):

* ``rewards`` and ``values`` are [B, T, N]; ``mask`` [B, T] marks the response tokens.
  ``values[b, t, i]`` is objective i's value of the state at token t.
* The trajectory of row b is its masked positions, in order. Positions outside the mask
  (prompt, padding, holes) are not part of it: they are skipped, never read (NaN there is
  harmless), and get advantage 0 and return 0. The "next" token of a masked token is the
  next masked token to its right, even across a hole.
* The value after the last masked token is 0: every response is terminal (as TRL and verl
  do; a truncated response is treated as ended too). There is no bootstrap value.
* Backwards over the trajectory, per objective i:
  ``delta_t = r_t + gamma * V_next - V_t``, ``A_t = delta_t + gamma * lam * A_next``
  (``V_next = A_next = 0`` past the last token); the value targets are ``R_t = A_t + V_t``.
* The recursion runs in float64 for float64 inputs and float32 otherwise (bfloat16 and
  float16 are upcast once and the results rounded back), as the PAMA kernels do.

Whitening (``whiten_per_objective``): each objective separately over the masked tokens of
the batch, ``(x - mean) / sqrt(var + eps)`` with the unbiased (Bessel-corrected) variance,
as TRL's and verl's ``masked_whiten`` do; a single token has variance 0. The statistics are
those of this process's batch: under data parallelism each rank whitens its own shard.
``scale_per_objective`` divides by the same standard deviation without centring, which
keeps the sign the Noon clamp cuts at (the form the main job uses before the clamp).
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .._backends import _C

BACKENDS = ("auto", "cpp", "torch")
_FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


class GAEOutput(NamedTuple):
    """``advantages`` and ``returns`` (value targets, ``advantages + values``), both [B, T, N]."""

    advantages: Tensor
    returns: Tensor


# --------------------------------------------------------------------------- checks
def _shape(x: Tensor) -> str:
    return "[" + ", ".join(str(d) for d in x.shape) + "]"


def _check_unit_interval(fn: str, name: str, x) -> float:
    # a tensor is refused: reading it would synchronise a GPU on every call
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{fn}: `{name}` must be a float in [0, 1], got {type(x).__name__}")
    x = float(x)
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"{fn}: `{name}` must be in [0, 1], got {x}")
    return x


def _check_float(fn: str, name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: `{name}` must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{fn}: `{name}` must be float64, float32, bfloat16 or float16, got {x.dtype} with shape {_shape(x)}"
        )


def _as_bool_mask(fn: str, mask, shape: Tuple[int, ...], device: torch.device, what: str) -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"{fn}: `mask` must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{fn}: `mask` must have shape {what} = {list(shape)}, got {_shape(mask)}")
    if mask.is_complex():
        raise TypeError(f"{fn}: `mask` must be bool, integer or floating, got {mask.dtype} with shape {_shape(mask)}")
    if mask.device != device:
        raise ValueError(f"{fn}: `mask` is on {mask.device} but the inputs are on {device}")
    return mask if mask.dtype == torch.bool else mask != 0


def _check_gae_inputs(fn: str, rewards, values, mask, gamma, lam):
    _check_float(fn, "rewards", rewards)
    _check_float(fn, "values", values)
    if rewards.dim() != 3:
        raise ValueError(f"{fn}: `rewards` must be [B, T, N], got {_shape(rewards)}")
    if values.shape != rewards.shape:
        raise ValueError(
            f"{fn}: `values` must have the shape of `rewards` {_shape(rewards)} ([B, T, N]), got {_shape(values)}"
        )
    if values.device != rewards.device:
        raise ValueError(f"{fn}: `values` is on {values.device} but `rewards` is on {rewards.device}")
    mask = _as_bool_mask(fn, mask, tuple(rewards.shape[:2]), rewards.device, "[B, T]")
    gamma = _check_unit_interval(fn, "gamma", gamma)
    lam = _check_unit_interval(fn, "lam", lam)
    dtype = torch.promote_types(rewards.dtype, values.dtype)
    return rewards.to(dtype), values.to(dtype), mask, gamma, lam


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- GAE
def gae_reference(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> GAEOutput:
    """Per-objective GAE in plain PyTorch: the definition (see the module docstring).

    Vectorised over rows and objectives, a Python loop backwards over T. Differentiable
    (the C++ kernel is not), runs on any device. Inputs must already be checked: [B, T, N]
    rewards and values of one dtype, a [B, T] bool mask.
    """
    B, T, N = rewards.shape
    acc = _acc_dtype(rewards.dtype)
    r, v = rewards.to(acc), values.to(acc)
    m = mask[..., None]  # [B, T, 1]: one mask for all objectives
    gamma_lam = gamma * lam  # one product in double, as the kernel does
    next_v = r.new_zeros(B, N)
    last = r.new_zeros(B, N)
    steps = []
    for t in range(T - 1, -1, -1):
        mt = m[:, t]
        delta = r[:, t] + gamma * next_v - v[:, t]
        a = delta + gamma_lam * last
        # torch.where, not a product with the mask: NaN outside the mask must not leak in
        last = torch.where(mt, a, last)
        next_v = torch.where(mt, v[:, t], next_v)
        steps.append(last)
    adv = torch.stack(steps[::-1], dim=1) if steps else r.new_zeros(B, 0, N)
    zero = adv.new_zeros(())
    ret = torch.where(m, adv + v, zero)
    adv = torch.where(m, adv, zero)
    return GAEOutput(adv.to(rewards.dtype), ret.to(rewards.dtype))


def _cpp_gae():
    """``pama_ext._C.gae`` when the compiled extension has it, else None."""
    return getattr(_C, "gae", None) if _C is not None else None


def has_cpp_gae() -> bool:
    """Whether the C++ GAE kernel is compiled into this install."""
    return _cpp_gae() is not None


def per_objective_gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    backend: str = "auto",
) -> GAEOutput:
    """GAE for each of N objectives at once: ``(advantages, returns)``, both [B, T, N].

    Args:
        rewards: [B, T, N] per-token rewards of the N objectives (e.g. from
            ``scores_to_token_rewards``).
        values: [B, T, N] the N value heads' outputs, e.g. ``MultiHeadValueModel``'s.
        mask: [B, T] response tokens (bool, or numbers where nonzero means "in").
        gamma, lam: discount and GAE lambda in [0, 1] (the paper's setting: 1 and 0.95).
        backend: ``auto`` (the C++ kernel for CPU tensors when it is built and no input
            requires a gradient, else PyTorch), ``cpp`` or ``torch``.

    Conventions (terminal value 0, masked-out positions skipped and zero in the output,
    accumulation dtype) are in the module docstring. ``returns = advantages + values`` are
    the value targets, before any whitening. Outputs have the inputs' (promoted) dtype.
    """
    fn = "per_objective_gae"
    if backend not in BACKENDS:
        raise ValueError(f"{fn}: unknown backend {backend!r}; expected one of {', '.join(map(repr, BACKENDS))}")
    rewards, values, mask, gamma, lam = _check_gae_inputs(fn, rewards, values, mask, gamma, lam)
    needs_grad = torch.is_grad_enabled() and (rewards.requires_grad or values.requires_grad)
    kernel = _cpp_gae()
    if backend == "cpp":
        if kernel is None:
            raise RuntimeError(
                f"{fn}: backend 'cpp' is unavailable: pama_ext._C has no `gae` (extension not built, "
                "or built without csrc/gae_cpu.cpp); use backend='torch'"
            )
        if rewards.device.type != "cpu":
            raise ValueError(f"{fn}: backend 'cpp' runs on cpu tensors, but the inputs are on {rewards.device}")
        if needs_grad:
            raise ValueError(
                f"{fn}: backend 'cpp' is not differentiable but `rewards` or `values` requires grad; "
                "detach them (advantages are targets) or use backend='torch'"
            )
    use_cpp = kernel is not None and backend != "torch" and rewards.device.type == "cpu" and not needs_grad
    if use_cpp:
        adv, ret = kernel(rewards, values, mask, gamma, lam)
        return GAEOutput(adv, ret)
    return gae_reference(rewards, values, mask, gamma, lam)


# --------------------------------------------------------------------------- whitening
def _masked_whiten(x: Tensor, m: Tensor, dims: Tuple[int, ...], mode: str, eps: float) -> Tensor:
    """Normalise ``x`` over ``dims`` where ``m`` (broadcastable to x) is true; 0 elsewhere.
    ``mode``: "centre" ``(x - mean) / sd``; "keep_mean" the same plus the mean (TRL's
    ``shift_mean=False``); "scale" ``x / sd`` (every sign kept). ``sd = sqrt(var + eps)``."""
    acc = _acc_dtype(x.dtype)
    xa = x.to(acc)
    zero = xa.new_zeros(())
    count = m.to(acc).sum(dim=dims, keepdim=True)  # tensors throughout: no host sync
    mean = torch.where(m, xa, zero).sum(dim=dims, keepdim=True) / count.clamp_min(1)
    centred = torch.where(m, xa - mean, zero)
    # unbiased variance; one token (or none) has variance 0 (its centred value is 0 anyway)
    var = (centred * centred).sum(dim=dims, keepdim=True) / (count - 1).clamp_min(1)
    inv_sd = torch.rsqrt(var + eps)
    if mode == "scale":
        out = xa * inv_sd
    else:
        out = centred * inv_sd
        if mode == "keep_mean":
            out = out + mean
    return torch.where(m, out, zero).to(x.dtype)


def _check_eps(fn: str, eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not float(eps) > 0:
        raise ValueError(f"{fn}: `eps` must be a float > 0, got {eps!r}")
    return float(eps)


def _per_objective(fn: str, advantages: Tensor, mask: Optional[Tensor], mode: str, eps) -> Tensor:
    """The public per-objective normalisations' checks, then ``_masked_whiten`` over every
    dimension but the last."""
    _check_float(fn, "advantages", advantages)
    if advantages.dim() < 2:
        raise ValueError(
            f"{fn}: `advantages` must be [..., N] with at least one batch dimension, got {_shape(advantages)}"
        )
    eps = _check_eps(fn, eps)
    lead = tuple(advantages.shape[:-1])
    if mask is None:
        m = torch.ones(lead, dtype=torch.bool, device=advantages.device)
    else:
        m = _as_bool_mask(fn, mask, lead, advantages.device, "advantages.shape[:-1]")
    return _masked_whiten(advantages, m[..., None], tuple(range(advantages.dim() - 1)), mode, eps)


def whiten_per_objective(
    advantages: Tensor, mask: Optional[Tensor] = None, shift_mean: bool = True, eps: float = 1e-8
) -> Tensor:
    """Whiten each objective (the last dimension) separately over the masked entries.

    Args:
        advantages: [..., N], e.g. [B, T, N] token-level or [B, N] sequence-level.
        mask: ``advantages.shape[:-1]`` (e.g. [B, T]), or None for "all entries".
        shift_mean: True: ``(x - mean) / sqrt(var + eps)``. False: the same plus the mean
            added back (scaled to unit variance, mean kept; TRL's ``shift_mean=False``).
        eps: added to the variance.

    Per objective i, over the M masked entries: mean and unbiased variance (divided by
    M - 1; M <= 1 gives variance 0). Masked-out entries are never read and are 0 in the
    output; an empty mask gives all zeros. Statistics accumulate in float32 (float64 for
    float64 input); the result has the input's dtype.
    """
    return _per_objective("whiten_per_objective", advantages, mask, "centre" if shift_mean else "keep_mean", eps)


def scale_per_objective(advantages: Tensor, mask: Optional[Tensor] = None, eps: float = 1e-8) -> Tensor:
    """Divide each objective (the last dimension) by its standard deviation over the masked
    entries, without centring: ``x / sqrt(var + eps)``, every sign kept.

    The form to use before the Noon clamp. The clamp keeps the tokens whose advantage is
    positive, so the zero it cuts at is part of the objective: GAE puts it at the critic's
    value, "better than expected". Centring moves it to the batch mean, which drops about
    half the tokens whatever the critic says; for the signed PPO surrogate a constant shift
    is only a change of baseline, for the clamped one it is not. Scaling alone still does
    what the spec's whitening is for: reward scale does not decide the comparison across
    objectives (benchmarks/FIDELITY.md, "Centring before the clamp").

    Args, statistics, dtypes and masking as ``whiten_per_objective`` (the same unbiased
    variance; a single entry has variance 0, so it is divided by ``sqrt(eps)``).
    """
    return _per_objective("scale_per_objective", advantages, mask, "scale", eps)


def sequence_advantages(
    rewards: Tensor, *, group_size: Optional[int] = None, scale: bool = True, eps: float = 1e-8
) -> Tensor:
    """Sequence-level per-objective advantages [B, N] from sequence rewards [B, N].

    ``group_size=None``: each objective is whitened over the whole batch. ``group_size=G``
    (GRPO-style): rows ``[g*G, (g+1)*G)`` are the G responses to one prompt (B must be a
    multiple of G) and each objective is whitened within each group. The formula is the
    one of ``whiten_per_objective``: ``(r - mean) / sqrt(var + eps)``, unbiased variance
    (a group of one gets 0). ``scale=False`` only subtracts the mean (Dr. GRPO).

    The result can go straight to ``pama_loss`` (a [B, N] advantage is broadcast over each
    response's tokens).
    """
    fn = "sequence_advantages"
    _check_float(fn, "rewards", rewards)
    if rewards.dim() != 2:
        raise ValueError(f"{fn}: `rewards` must be [B, N], got {_shape(rewards)}")
    eps = _check_eps(fn, eps)
    B, N = rewards.shape
    if group_size is None:
        x = rewards[None]  # one group of B
    else:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"{fn}: `group_size` must be a positive int, got {group_size!r}")
        if B % group_size:
            raise ValueError(
                f"{fn}: the batch size B = {B} of `rewards` {_shape(rewards)} is not a multiple of "
                f"group_size = {group_size}"
            )
        x = rewards.reshape(B // group_size, group_size, N)
    m = torch.ones(x.shape[:2] + (1,), dtype=torch.bool, device=rewards.device)
    if scale:
        out = _masked_whiten(x, m, (1,), "centre", eps)
    else:
        xa = x.to(_acc_dtype(x.dtype))
        out = (xa - xa.mean(dim=1, keepdim=True)).to(x.dtype)
    return out.reshape(B, N)


# --------------------------------------------------------------------------- rewards
def scores_to_token_rewards(
    scores: Tensor, mask: Tensor, *, kl: Optional[Tensor] = None, kl_coef: float = 0.0
) -> Tensor:
    """Per-token rewards [B, T, N] for GAE from per-sequence scores [B, N].

    Each objective's score goes on the last masked token of its row (the usual RLHF
    layout); ``kl`` [B, T] (e.g. ``old_logp - ref_logp``) adds ``-kl_coef * kl`` to every
    objective's reward at every masked token, the per-token KL penalty of shared/PAMA.md.
    Rows with an empty mask get no reward (there is no token to carry it). Positions
    outside the mask are 0; ``kl`` is not read there.
    """
    fn = "scores_to_token_rewards"
    _check_float(fn, "scores", scores)
    if scores.dim() != 2:
        raise ValueError(f"{fn}: `scores` must be [B, N], got {_shape(scores)}")
    if not isinstance(mask, Tensor) or mask.dim() != 2 or mask.shape[0] != scores.shape[0]:
        got = _shape(mask) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{fn}: `mask` must be [B, T] with B = {scores.shape[0]} (the rows of `scores`), got {got}")
    B, T = mask.shape
    m = _as_bool_mask(fn, mask, (B, T), scores.device, "[B, T]")
    positions = torch.arange(T, device=m.device).expand(B, T)
    last = torch.where(m, positions, -1).amax(dim=1) if T else torch.full((B,), -1, device=m.device)  # -1: empty
    at_last = (positions == last[:, None]) & m  # [B, T], one True per non-empty row
    rewards = torch.where(at_last[..., None], scores[:, None, :], scores.new_zeros(()))
    if kl is not None:
        _check_float(fn, "kl", kl)
        if kl.shape != mask.shape:
            raise ValueError(f"{fn}: `kl` must have the shape of `mask` {_shape(mask)} ([B, T]), got {_shape(kl)}")
        if not isinstance(kl_coef, numbers.Real) or isinstance(kl_coef, bool):
            raise TypeError(f"{fn}: `kl_coef` must be a float, got {type(kl_coef).__name__}")
        penalty = torch.where(m, -float(kl_coef) * kl.to(rewards.dtype), rewards.new_zeros(()))
        rewards = rewards + penalty[..., None]
    return rewards
