"""The demo's embedded language: a word-level vocabulary, a generator of short movie reviews
for the supervised warm-up, and the prompts (train and held-out).

Nothing is downloaded. The reviews are made by a small grammar over ~200 English words,
so a policy warmed up on them writes words that VADER knows (``great``, ``boring``,
``not``, ``!``), in sentences of varying length and sentiment: the three objectives have
something to pull on from the first RL step. Every review starts with one of the prompt
openings, so the prompts are in distribution for the warmed-up policy.
"""

from __future__ import annotations

import random
from typing import Dict, List, Sequence, Tuple

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"

NOUNS = (
    "movie film story plot acting cast music ending script dialogue director camera pace "
    "soundtrack hero villain"
).split()
POSITIVE = (
    "great good wonderful excellent beautiful brilliant fun funny amazing perfect nice "
    "fantastic charming lovely enjoyable clever"
).split()
NEGATIVE = (
    "bad boring terrible awful dull poor weak ugly sad stupid disappointing horrible "
    "annoying messy slow predictable"
).split()
NEUTRAL = "long short quiet loud simple strange old new familiar dark".split()
INTENSIFIERS = "very really quite so rather".split()
LIKE_VERBS_POS = "love loved liked enjoyed adored".split()
LIKE_VERBS_NEG = "hate hated disliked".split()
PEOPLE = "everyone friends families kids fans".split()
OPENERS = (
    "the {n}",
    "this {n} was",
    "i thought the {n}",
    "overall the {n}",
    "honestly , the {n}",
    "in my opinion the {n}",
    "to be fair the {n}",
    "my friends said the {n}",
)
FILLER = (
    "and then the story moves on to the next part of the day",
    "the first half takes its time with the people and the town",
    "there is a scene in the middle that goes on for a while",
    "it is the kind of {n} you watch on a rainy evening",
    "some of the {n} reminded me of older films",
    "we saw it last week at the cinema near the station",
)
FUNCTION_WORDS = (
    "the this that it is was were i me my we to of and but so a an in on at for with as "
    "not no too also very really just felt seemed were had have has be been would could "
    "watch watched saw see recommend it's again ever never one two more most least than "
    "at all all time times scene scenes part parts people town day week evening cinema "
    "station middle first half next goes moves takes kind older films rainy last near "
    "while reminded some there its on up out"
).split()
PUNCTUATION = [".", ",", "!"]


def vocabulary() -> List[str]:
    """The demo's vocabulary, specials first (ids 0, 1, 2), then every word once."""
    words: List[str] = [PAD, EOS, UNK]
    seen = set(words)
    groups: Sequence[Sequence[str]] = (
        NOUNS, POSITIVE, NEGATIVE, NEUTRAL, INTENSIFIERS, LIKE_VERBS_POS, LIKE_VERBS_NEG, PEOPLE,
        FUNCTION_WORDS, PUNCTUATION,
    )
    text_groups = [" ".join(OPENERS).replace("{n}", ""), " ".join(FILLER).replace("{n}", "")]
    for group in list(groups) + [t.split() for t in text_groups]:
        for w in group:
            if w not in seen:
                seen.add(w)
                words.append(w)
    return words


def _adjective(rng: random.Random, polarity: str) -> str:
    if polarity == "pos":
        return rng.choice(POSITIVE)
    if polarity == "neg":
        return rng.choice(NEGATIVE)
    return rng.choice(NEUTRAL)


def _sentence(rng: random.Random, polarity: str, start: str = "") -> str:
    """One sentence of the given polarity ('pos', 'neg', 'neu'); ``start`` is an opening
    ending in a noun phrase ("this film was", "the plot") that the sentence continues."""
    n1, n2 = rng.choice(NOUNS), rng.choice(NOUNS)
    adj, adj2 = _adjective(rng, polarity), _adjective(rng, polarity)
    intens = rng.choice(INTENSIFIERS)
    end = "!" if polarity != "neu" and rng.random() < 0.25 else "."
    if start:
        verb = "" if start.endswith(" was") else rng.choice(["was", "is", "felt", "seemed"]) + " "
        tail = rng.choice([f"{verb}{adj}", f"{verb}{intens} {adj}", f"{verb}{adj} and {adj2}"])
        if polarity == "neg" and rng.random() < 0.2:
            tail = f"{verb}not {rng.choice(POSITIVE)} at all"
        return f"{start} {tail} {end}"
    if polarity == "neu":
        return rng.choice(FILLER).format(n=n1) + " ."
    like = rng.choice(LIKE_VERBS_POS if polarity == "pos" else LIKE_VERBS_NEG)
    templates = [
        f"the {n1} was {intens} {adj} {end}",
        f"i {like} the {n1} {end}",
        f"the {n1} and the {n2} were {adj} {end}",
        f"it was a {adj} {n1} {end}",
        f"the {n1} felt {adj} but the {n2} was {_adjective(rng, 'neg' if polarity == 'pos' else 'pos')} {end}",
        f"i would {'recommend' if polarity == 'pos' else 'not recommend'} it to {rng.choice(PEOPLE)} {end}",
        f"the {n1} is {adj} , {intens} {adj2} {end}",
    ]
    return rng.choice(templates)


def opening(rng: random.Random) -> str:
    return rng.choice(OPENERS).format(n=rng.choice(NOUNS))


def review(rng: random.Random) -> str:
    """One review: 1-5 sentences, mostly of one polarity, the first one starting with an
    opening (so every prompt is the start of some review)."""
    polarity = rng.choice(["pos", "neg", "mixed"])
    k = rng.choice([1, 1, 2, 2, 3, 3, 4, 5])
    sentences = []
    for i in range(k):
        p = polarity if polarity != "mixed" else rng.choice(["pos", "neg", "neu"])
        if rng.random() < 0.2:
            p = "neu"
        sentences.append(_sentence(rng, p, start=opening(rng) if i == 0 else ""))
    return " ".join(sentences)


def reviews(n: int, seed: int) -> List[str]:
    rng = random.Random(seed)
    return [review(rng) for _ in range(n)]


def prompts() -> Tuple[List[str], List[str]]:
    """(train prompts, held-out prompts): every opening x noun, split so that the held-out
    set uses nouns the train prompts never open with (the RL step never sees them)."""
    held_nouns = set(NOUNS[::5])  # 3 of 15 nouns
    train, held = [], []
    for o in OPENERS:
        for n in NOUNS:
            (held if n in held_nouns else train).append(o.format(n=n))
    return train, held


def word_counts(texts: Sequence[str]) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for t in texts:
        for w in t.split():
            counts[w] = counts.get(w, 0) + 1
    return counts
