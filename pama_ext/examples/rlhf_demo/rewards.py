"""The demo's objectives: real scorers of generated text, one number per response.

==============  ==========================================================================
``sentiment``   VADER's compound score (``vaderSentiment``) of prompt + response, in [-1, 1]
``length``      the paper's clipped length ``clip(l / L, lo, hi)`` with lo = 0.5, hi = 1.5 as
                on IMDb (``clip(l/140, 70/140, 210/140)``) and L adapted to the output
                budget: ``L = max_new_tokens / 1.5``, so the longest possible answer earns
                ``hi`` and anything up to a third of the budget earns ``lo``. l counts
                response tokens, the end token excluded.
``diversity``   lexical diversity: distinct words / words of the response (type-token ratio,
                punctuation ignored; 0 for an empty response). Repeating "great" raises
                sentiment and length and lowers this.
``conciseness`` ``1 - l / max_new_tokens``: the direct opposite of length.
``reward_model`` a local sequence-classification model (``--reward-model PATH``) applied to
                prompt + response: the logit of its positive label (the single logit of a
                one-label regression head).
==============  ==========================================================================

Every scorer also gives the lower bound the hypervolume is measured from (``None`` for
the reward model, whose logits are unbounded: the report then uses the lowest mean any
evaluation reached).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

OBJECTIVES = ("sentiment", "length", "diversity", "conciseness", "reward_model")
DEFAULT_OBJECTIVES = ("sentiment", "length", "diversity")
LENGTH_LO, LENGTH_HI = 0.5, 1.5
_PUNCT = set(".,!?;:'\"()-")

ScoreFn = Callable[[Sequence[str], Sequence[str], Sequence[int]], List[float]]


@dataclass
class Objective:
    """One objective: ``score(prompts, responses, lengths) -> [B] rewards`` and the lower
    bound used as the hypervolume reference (None: data-dependent)."""

    name: str
    score: ScoreFn
    lower: Optional[float]
    description: str


def _words(text: str) -> List[str]:
    return [w for w in text.lower().split() if w not in _PUNCT]


def lexical_diversity(text: str) -> float:
    words = _words(text)
    return len(set(words)) / len(words) if words else 0.0


def clipped_length(n_tokens: int, scale: float, lo: float = LENGTH_LO, hi: float = LENGTH_HI) -> float:
    return min(max(n_tokens / scale, lo), hi)


def sentiment_objective() -> Objective:
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as exc:  # pragma: no cover - a declared dependency of the demo extra
        raise ImportError(
            "the `sentiment` objective needs the vaderSentiment package: pip install vaderSentiment "
            '(or install pama_ext with the demo extra: pip install -e ".[demo]")'
        ) from exc
    analyzer = SentimentIntensityAnalyzer()

    def score(prompts, responses, lengths):
        return [analyzer.polarity_scores(f"{p} {r}")["compound"] for p, r in zip(prompts, responses)]

    return Objective("sentiment", score, -1.0, "VADER compound of prompt + response, in [-1, 1]")


def length_objective(max_new_tokens: int) -> Objective:
    scale = max_new_tokens / LENGTH_HI

    def score(prompts, responses, lengths):
        return [clipped_length(n, scale) for n in lengths]

    return Objective("length", score, LENGTH_LO, f"clip(l/{scale:g}, {LENGTH_LO:g}, {LENGTH_HI:g}), l in tokens")


def diversity_objective() -> Objective:
    def score(prompts, responses, lengths):
        return [lexical_diversity(r) for r in responses]

    return Objective("diversity", score, 0.0, "distinct words / words of the response")


def conciseness_objective(max_new_tokens: int) -> Objective:
    def score(prompts, responses, lengths):
        return [1.0 - n / max_new_tokens for n in lengths]

    return Objective("conciseness", score, 0.0, f"1 - l/{max_new_tokens}")


class RewardModelScorer:
    """A local ``AutoModelForSequenceClassification`` directory, scored on prompt + response."""

    def __init__(self, path: str, device: torch.device, label: Optional[int] = None, batch_size: int = 64):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        p = Path(path)
        if not p.is_dir():
            raise FileNotFoundError(
                f"--reward-model {path!r}: not a directory (a local sequence-classification checkpoint is expected)"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
        if self.tokenizer.pad_token_id is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(f"--reward-model {path!r}: its tokenizer has neither a pad nor an eos token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(p, local_files_only=True).to(device).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        n = self.model.config.num_labels
        if label is None:
            label = n - 1  # the single logit, or the last label ("POSITIVE" / LABEL_1 by convention)
        if not 0 <= label < n:
            raise ValueError(f"--reward-label {label} is out of range for a reward model with {n} labels")
        self.label = label
        self.device = device
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, prompts, responses, lengths) -> List[float]:
        texts = [f"{p} {r}" for p, r in zip(prompts, responses)]
        out: List[float] = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[i : i + self.batch_size], return_tensors="pt", padding=True, truncation=True, max_length=512
            ).to(self.device)
            logits = self.model(**enc).logits.float()
            out.extend(logits[:, self.label].tolist())
        return out


def build_objectives(
    names: Sequence[str],
    *,
    max_new_tokens: int,
    device: torch.device,
    reward_model: Optional[str] = None,
    reward_label: Optional[int] = None,
) -> List[Objective]:
    """The objectives named in ``names`` (``--objectives``), in that order."""
    if len(names) == 0:
        raise ValueError("--objectives: name at least one objective")
    if len(set(names)) != len(names):
        raise ValueError(f"--objectives: {list(names)} names an objective twice")
    out: List[Objective] = []
    for name in names:
        if name == "sentiment":
            out.append(sentiment_objective())
        elif name == "length":
            out.append(length_objective(max_new_tokens))
        elif name == "diversity":
            out.append(diversity_objective())
        elif name == "conciseness":
            out.append(conciseness_objective(max_new_tokens))
        elif name == "reward_model":
            if reward_model is None:
                raise ValueError("--objectives: `reward_model` needs --reward-model PATH")
            scorer = RewardModelScorer(reward_model, device, reward_label)
            out.append(Objective("reward_model", scorer, None, f"logit {scorer.label} of {reward_model}"))
        else:
            raise ValueError(f"--objectives: unknown objective {name!r}; choose from {', '.join(OBJECTIVES)}")
    if reward_model is not None and "reward_model" not in names:
        raise ValueError("--reward-model was given but `reward_model` is not in --objectives")
    return out


def score_all(objectives: Sequence[Objective], prompts, responses, lengths) -> torch.Tensor:
    """[B, N] float32 rewards, one column per objective."""
    cols = [torch.tensor(o.score(prompts, responses, lengths), dtype=torch.float32) for o in objectives]
    return torch.stack(cols, dim=1)
