"""Three programmatic objectives that conflict, as TRL reward functions (one float per completion).

==============  ==========================================================================
``positivity``  positive minus negative words of the embedded lexicon, at most 4: more
                praise (a longer answer) scores higher
``brevity``     ``1 - words / max_words``: short answers score higher
``diversity``   distinct words / words (0 for an empty answer): repeating "great" lowers it
==============  ==========================================================================
"""

from __future__ import annotations

from typing import Callable, List

from ..rlhf_demo import corpus

_POS, _NEG = set(corpus.POSITIVE), set(corpus.NEGATIVE)
_PUNCT = set(".,!?;:'\"()-")


def _words(text: str) -> List[str]:
    return [w for w in text.lower().split() if w not in _PUNCT]


def positivity(completions, **kwargs) -> List[float]:
    out = []
    for c in completions:
        ws = _words(c)
        out.append(float(min(4, sum(w in _POS for w in ws) - sum(w in _NEG for w in ws))))
    return out


def make_brevity(max_words: int) -> Callable:
    def brevity(completions, **kwargs) -> List[float]:
        return [1.0 - min(len(_words(c)), max_words) / max_words for c in completions]

    return brevity


def diversity(completions, **kwargs) -> List[float]:
    out = []
    for c in completions:
        ws = _words(c)
        out.append(len(set(ws)) / len(ws) if ws else 0.0)
    return out


def reward_functions(max_words: int) -> List[Callable]:
    """The objectives in order; TRL names each by its function's ``__name__``."""
    return [positivity, make_brevity(max_words), diversity]
