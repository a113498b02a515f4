"""N value heads on a ``transformers`` causal LM: one value function per objective.

PAMA's per-objective GAE needs V^(i) for every objective i (shared/PAMA.md: "N value
heads"). ``MultiHeadValueModel`` wraps any ``AutoModelForCausalLM`` and puts the N heads
on the last hidden state; the body is shared by the policy and all the critics, as in
TRL's ``AutoModelForCausalLMWithValueHead`` (there with one head).

The N heads are the N rows of one ``nn.Linear(hidden, N)``: N independent linear heads
evaluated in one matmul. They are zero-initialised, so every value starts at 0 and the
first advantages are plain reward-to-go rather than the noise of a random head.

On disk (``save_pretrained``): the LM's own ``save_pretrained`` files, plus
``value_heads.safetensors`` (``value_heads.pt`` when safetensors is not installed) and
``value_heads_config.json``. ``from_pretrained`` restores both, and the LM directory
stays loadable by ``AutoModelForCausalLM.from_pretrained`` alone.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

try:
    import safetensors.torch as _safetensors
except ImportError:  # pragma: no cover - transformers itself depends on safetensors
    _safetensors = None

HEADS_CONFIG = "value_heads_config.json"
HEADS_SAFETENSORS = "value_heads.safetensors"
HEADS_TORCH = "value_heads.pt"
_FORMAT = "pama_ext.MultiHeadValueModel"
_FORMAT_VERSION = 1


class ValueHeadOutput(NamedTuple):
    """``logits`` [B, T, vocab] of the LM and ``values`` [B, T, N], one value per objective."""

    logits: Tensor
    values: Tensor


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"MultiHeadValueModel: `model` must be a transformers model with a config, got {type(model)}")
    # multimodal configs keep the language model's sizes in a text sub-config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text, "hidden_size", None)
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"MultiHeadValueModel: cannot read hidden_size from {type(config).__name__}")
    return size


def _check_num_objectives(num_objectives) -> int:
    if isinstance(num_objectives, bool) or not isinstance(num_objectives, int) or num_objectives < 1:
        raise ValueError(f"MultiHeadValueModel: `num_objectives` must be an int >= 1, got {num_objectives!r}")
    return num_objectives


class MultiHeadValueModel(nn.Module):
    """A causal LM with N value heads: ``forward`` returns ``(logits, values [B, T, N])``.

    Args:
        model: an ``AutoModelForCausalLM`` (anything whose forward accepts
            ``output_hidden_states=True`` and returns ``logits`` and ``hidden_states``).
        num_objectives: N, the number of value heads.
        objective_names: optional N names, saved with the heads (for logs and checks).
        head_dtype: dtype of the heads (default float32: values are regression outputs,
            kept in full precision even on a bfloat16 body; the hidden state is cast).

    ``values[b, t]`` is computed from the hidden state at position t, i.e. after reading
    tokens 0..t: the value of the state in which token t + 1 is generated, the position
    whose logits score token t + 1. Align values with per-token log-probabilities the way
    the logits are aligned (drop the last position, keep the response positions).
    ``state_dict`` holds the LM under ``model.`` and the heads under ``value_heads.``, so
    the wrapper trains, checkpoints and moves (``.to``) like any module.
    """

    def __init__(
        self,
        model: nn.Module,
        num_objectives: int,
        *,
        objective_names: Optional[Sequence[str]] = None,
        head_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        n = _check_num_objectives(num_objectives)
        if objective_names is not None:
            objective_names = [str(x) for x in objective_names]
            if len(objective_names) != n:
                raise ValueError(
                    f"MultiHeadValueModel: `objective_names` has {len(objective_names)} names for "
                    f"num_objectives = {n}"
                )
        hidden = _hidden_size(model)
        first = next(model.parameters(), None)
        device = first.device if first is not None else None
        self.model = model
        self.num_objectives = n
        self.objective_names = objective_names
        self.value_heads = nn.Linear(hidden, n, device=device, dtype=head_dtype)
        nn.init.zeros_(self.value_heads.weight)
        nn.init.zeros_(self.value_heads.bias)

    @property
    def config(self):
        """The LM's config."""
        return self.model.config

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None, **kwargs):
        """Run the LM once: ``ValueHeadOutput(logits, values)``; kwargs go to the LM.

        ``use_cache`` defaults to False (training needs no cache; ``generate`` has its own).
        """
        kwargs.pop("output_hidden_states", None)
        kwargs.pop("return_dict", None)
        kwargs.setdefault("use_cache", False)
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, return_dict=True, **kwargs
        )
        hidden = out.hidden_states[-1]  # the final hidden state, after the last norm
        values = self.value_heads(hidden.to(self.value_heads.weight.dtype))
        return ValueHeadOutput(out.logits, values)

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        """The LM's ``generate`` (the heads take no part in sampling)."""
        return self.model.generate(*args, **kwargs)

    # ------------------------------------------------------------------ save / load
    def _heads_config(self) -> Dict[str, Any]:
        return {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "num_objectives": self.num_objectives,
            "hidden_size": self.value_heads.in_features,
            "objective_names": self.objective_names,
            "head_dtype": str(self.value_heads.weight.dtype).replace("torch.", ""),
        }

    def save_pretrained(self, save_directory: str, *, safe_serialization: bool = True, **kwargs) -> None:
        """Write the LM (``model.save_pretrained(save_directory, **kwargs)``) and the heads.

        The heads go to ``value_heads.safetensors`` (``value_heads.pt`` with
        ``safe_serialization=False`` or without safetensors) beside a small JSON config.
        With ``is_main_process=False`` (a kwarg of transformers) nothing of the heads is
        written, as for the LM.
        """
        os.makedirs(save_directory, exist_ok=True)
        self.model.save_pretrained(save_directory, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.value_heads.state_dict().items()}
        use_safetensors = safe_serialization and _safetensors is not None
        # only one weights file may exist, or from_pretrained could read a stale one
        stale = HEADS_TORCH if use_safetensors else HEADS_SAFETENSORS
        if os.path.exists(os.path.join(save_directory, stale)):
            os.remove(os.path.join(save_directory, stale))
        if use_safetensors:
            _safetensors.save_file(state, os.path.join(save_directory, HEADS_SAFETENSORS), metadata={"format": "pt"})
        else:
            torch.save(state, os.path.join(save_directory, HEADS_TORCH))
        with open(os.path.join(save_directory, HEADS_CONFIG), "w") as f:
            json.dump(self._heads_config(), f, indent=2)

    @classmethod
    def from_pretrained(
        cls, pretrained_path: str, *, model: Optional[nn.Module] = None, **model_kwargs
    ) -> "MultiHeadValueModel":
        """Load what ``save_pretrained`` wrote.

        Args:
            pretrained_path: the directory.
            model: an LM already loaded (e.g. wrapped with adapters); by default
                ``AutoModelForCausalLM.from_pretrained(pretrained_path, **model_kwargs)``.
            model_kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (dtype,
                device_map, ...).

        The heads keep the dtype they were saved in and go to the LM's device.
        """
        config_path = os.path.join(pretrained_path, HEADS_CONFIG)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(
                f"MultiHeadValueModel.from_pretrained: no {HEADS_CONFIG} in {pretrained_path!r} "
                "(not written by MultiHeadValueModel.save_pretrained?)"
            )
        with open(config_path) as f:
            cfg = json.load(f)
        if cfg.get("format") != _FORMAT:
            raise ValueError(f"MultiHeadValueModel.from_pretrained: {config_path} has format {cfg.get('format')!r}")
        safe_path = os.path.join(pretrained_path, HEADS_SAFETENSORS)
        torch_path = os.path.join(pretrained_path, HEADS_TORCH)
        if os.path.isfile(safe_path):
            if _safetensors is None:
                raise ImportError(f"MultiHeadValueModel.from_pretrained: reading {safe_path} needs safetensors")
            state = _safetensors.load_file(safe_path)
        elif os.path.isfile(torch_path):
            state = torch.load(torch_path, map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(
                f"MultiHeadValueModel.from_pretrained: no {HEADS_SAFETENSORS} or {HEADS_TORCH} in {pretrained_path!r}"
            )
        if model is None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(pretrained_path, **model_kwargs)
        hidden = _hidden_size(model)
        weight = state.get("weight")
        n = cfg["num_objectives"]
        if weight is None or tuple(weight.shape) != (n, hidden):
            got = None if weight is None else list(weight.shape)
            raise ValueError(
                f"MultiHeadValueModel.from_pretrained: the saved heads have weight shape {got}, expected "
                f"[num_objectives, hidden_size] = [{n}, {hidden}] for this model"
            )
        wrapper = cls(model, n, objective_names=cfg.get("objective_names"), head_dtype=weight.dtype)
        wrapper.value_heads.load_state_dict(state)
        return wrapper


def add_value_heads(model: nn.Module, num_objectives: int, **kwargs) -> MultiHeadValueModel:
    """``MultiHeadValueModel(model, num_objectives, **kwargs)``: N value heads on ``model``."""
    return MultiHeadValueModel(model, num_objectives, **kwargs)
