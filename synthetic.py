"""Synthetic data generated in code: no files, no network.

``synthetic_corpus``: a toy English-like corpus with local syntax and long-range facts
(the ``--preset smoke`` data of benchmark.py). Same interface as the real text splits:
``{"train": [rows], "validation": [rows]}``.
"""

from __future__ import annotations

import random


# Small closed word lists: a few hundred word types, so a ~1000-token BPE vocabulary holds
# nearly every word whole and the corpus tokenizes to about one token per word.
_NAME_HEADS = ("Ma", "Te", "Ro", "Li", "Ka", "Su", "De", "Fi", "No", "Ba", "Ze", "Vi")
_NAME_TAILS = ("rel", "nak", "dor", "mis", "lan", "vet", "sa", "rin", "bo", "tek")
_NAMES = tuple(h + t for h in _NAME_HEADS for t in _NAME_TAILS)  # 120 names
_ROLES = ("keeper", "baker", "guard", "weaver", "healer", "painter", "miller", "smith",
          "hunter", "singer", "teacher", "farmer", "sailor", "potter", "tailor", "brewer",
          "fisher", "carver", "ranger", "scribe")
_PLACES = ("lighthouse", "harbor", "mill", "forest", "tower", "bridge", "market", "garden",
           "castle", "valley", "river", "village", "library", "orchard", "temple",
           "mountain", "island", "meadow", "quarry", "cellar")
_COLORS = ("red", "blue", "green", "yellow", "white", "black", "grey", "brown", "golden",
           "silver", "purple", "orange")
_ANIMALS = ("fox", "cat", "dog", "horse", "goat", "owl", "crow", "hare", "wolf", "bear",
            "duck", "mouse", "deer", "frog", "swan", "pig")
_NOUNS = (("stone", "stones"), ("tree", "trees"), ("cloud", "clouds"), ("lamp", "lamps"),
          ("boat", "boats"), ("road", "roads"), ("child", "children"), ("bell", "bells"),
          ("door", "doors"), ("wind", "winds"), ("letter", "letters"), ("basket", "baskets"),
          ("candle", "candles"), ("window", "windows"), ("field", "fields"), ("song", "songs"),
          ("wall", "walls"), ("cart", "carts"), ("storm", "storms"), ("coin", "coins"))
_ADJS = ("old", "small", "quiet", "bright", "tall", "cold", "warm", "dark", "heavy",
         "gentle", "strange", "empty", "wet", "broken", "shining", "little", "long",
         "distant", "ancient", "narrow", "soft", "loud", "early", "hidden")
_VERBS = (("rests", "rest"), ("shines", "shine"), ("falls", "fall"), ("waits", "wait"),
          ("moves", "move"), ("sings", "sing"), ("turns", "turn"), ("glows", "glow"),
          ("sleeps", "sleep"), ("shakes", "shake"))
_PAST = ("fed", "found", "carried", "painted", "followed", "watched", "counted", "mended",
         "opened", "cleaned", "lifted", "hid")
_PREPS = ("near", "under", "beside", "behind", "above", "across", "along", "inside")
_TIMES = ("in the morning", "at night", "after the rain", "before dawn", "every day",
          "in winter", "by noon", "at dusk")
_NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
            "eleven", "twelve")

SYNTHETIC_TRAIN_DOCS = 300
SYNTHETIC_VAL_DOCS = 30


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _filler(rng: random.Random) -> str:
    """One sentence of local syntax: number agreement (stone rests / stones rest), a/an,
    fixed phrase order, and counting (three, then four, then five)."""
    n_sg, n_pl = rng.choice(_NOUNS)
    v_sg, v_pl = rng.choice(_VERBS)
    adj, adj2 = rng.choice(_ADJS), rng.choice(_ADJS)
    other = rng.choice(_NOUNS)[rng.randrange(2)]
    k = rng.randrange(6)
    if k == 0:
        return f"{_a(adj).capitalize()} {adj} {n_sg} {v_sg} {rng.choice(_PREPS)} the {other} ."
    if k == 1:
        return f"The {n_pl} {v_pl} {rng.choice(_PREPS)} the {adj} {other} {rng.choice(_TIMES)} ."
    if k == 2:
        m_sg, _ = rng.choice(_NOUNS)
        w_sg, _ = rng.choice(_VERBS)
        return f"{rng.choice(_TIMES).capitalize()} , the {n_pl} {v_pl} and the {m_sg} {w_sg} ."
    if k == 3:
        i = rng.randrange(1, len(_NUMBERS) - 2)  # from "two": plural nouns
        return f"There were {_NUMBERS[i]} {n_pl} , then {_NUMBERS[i + 1]} , then {_NUMBERS[i + 2]} ."
    if k == 4:
        return f"The {n_sg} was {adj} , and the {n_pl} were {adj2} ."
    return f"The {adj} {n_sg} {v_sg} {rng.choice(_TIMES)} ."


def _recall(rng: random.Random, who: dict) -> str:
    """A sentence whose key words are fixed only by the document's opening facts."""
    noun = rng.choice(_NOUNS)[0]
    k = rng.randrange(4)
    if k == 0:  # role + place -> name
        return (f"Then the {who['role']} of the {who['place']} came , and so it was "
                f"{who['name']} who {rng.choice(_PAST)} the {noun} .")
    if k == 1:  # name -> role, place, color, animal
        return (f"Later , {who['name']} , the {who['role']} of the {who['place']} , "
                f"{rng.choice(_PAST)} the {who['color']} {who['animal']} .")
    if k == 2:  # color + animal -> name
        return f"Everyone knew that the {who['color']} {who['animal']} belonged to {who['name']} ."
    return f"{who['name']} {rng.choice(_PAST)} the {noun} while the {who['animal']} waited ."  # name -> animal


def _synthetic_doc(rng: random.Random) -> str:
    names = rng.sample(_NAMES, 2)
    roles = rng.sample(_ROLES, 2)
    places = rng.sample(_PLACES, 2)
    colors = rng.sample(_COLORS, 2)
    animals = rng.sample(_ANIMALS, 2)
    people = [dict(name=n, role=r, place=p, color=c, animal=a)
              for n, r, p, c, a in zip(names, roles, places, colors, animals)]
    parts = []
    for p in people:
        parts.append(f"The {p['role']} of the {p['place']} is {p['name']} .")
    for p in people:
        parts.append(f"{p['name']} has {_a(p['color'])} {p['color']} {p['animal']} .")

    def add_filler(min_words: int) -> None:
        n = 0
        while n < min_words:
            s = _filler(rng)
            parts.append(s)
            n += len(s.split())

    # The first recall comes >= 50 words after the facts: beyond the 13-token receptive field
    # of the paper's GAM, well within a 256-token attention window.
    add_filler(50)
    # >= 12 words between recalls keeps the previous recall out of GAM's 13-token reach too
    for i in range(6):
        parts.append(_recall(rng, people[i % 2]))  # each person recalled three times
        add_filler(rng.randint(12, 24))
    return " ".join(parts)


def synthetic_corpus(
    n_train_docs: int = SYNTHETIC_TRAIN_DOCS,
    n_val_docs: int = SYNTHETIC_VAL_DOCS,
    seed: int = 0,
) -> dict[str, list[str]]:
    """A deterministic toy corpus (no files, no network) with local AND long-range structure.

    Each document (one row, ~300 words) opens with facts about two people::

        The smith of the bridge is Telan . The keeper of the mountain is Derel .
        Telan has a black goat . Derel has a green hare .

    then >= 50 words of filler from a small grammar (number agreement "stone rests / stones
    rest", a/an, counting "six , then seven , then eight": learnable from the last few
    tokens), then six recall sentences, alternating between the two people, each followed
    by 12-24 filler words, that restate the facts in new frames::

        Then the smith of the bridge came , and so it was Telan who hid the wall .
        Later , Derel , the keeper of the mountain , painted the green hare .
        Everyone knew that the black goat belonged to Telan .
        Telan fed the stone while the goat waited .

    The recalled name / role / place / color / animal follows only from the opening facts
    (120 names, 20 roles, 20 places, 12 colors, 16 animals, drawn independently per
    document), so a model that sees >= 50 tokens back (attention, Mamba) can predict them
    while one with a 13-token receptive field (the paper's GAM) can only guess. ~6.5% of
    all words are such recalls (a fact word after the opening four sentences).

    Default size, 300 / 30 documents: 89,194 / 8,798 words. The word inventory (~360
    types) fits whole in a 1000-token BPE (actual vocabulary 664), so that is also the
    token count: 347 train and 34 validation blocks of 257. Train and validation use
    separate random streams (validation does not change with ``n_train_docs``); the same
    ``seed`` always gives the same text.
    """
    out = {}
    for split, n in (("train", n_train_docs), ("validation", n_val_docs)):
        # str seeds go through sha512: stable across runs and PYTHONHASHSEED.
        rng = random.Random(f"gam-synthetic:{seed}:{split}")
        out[split] = [_synthetic_doc(rng) for _ in range(n)]
    return out
