"""Synthetic data generated in code: no files, no network.

``synthetic_corpus``: a toy English-like corpus with local syntax and long-range facts
(the ``--preset smoke`` data of benchmark.py). Same interface as the real text splits:
``{"train": [rows], "validation": [rows]}``.

``mqar``: multi-query associative recall as defined by Zoology (Arora et al., 2023), as
token tensors with next-token targets (``-100`` where nothing is scored), and
``recall_accuracy``: accuracy at the query positions, overall and split by whether the
key-value pair lies within a model's receptive field. See the MQAR section below.
"""

from __future__ import annotations

import hashlib
import random

import torch


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


# =========================================================================================
# MQAR: multi-query associative recall (Zoology, Arora, Eyuboglu et al., arXiv:2312.04927)
# =========================================================================================
#
# Our own implementation of the task as the HazyResearch/zoology generator defines it
# (``zoology/data/associative_recall.py::_mqar``); same layout and distributions, a
# different random stream (one seeded torch.Generator per (seed, split) here).

MQAR_SPLITS = ("train", "validation", "test")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _split_generator(seed: int, split: str) -> torch.Generator:
    """A torch.Generator seeded from (seed, split) through sha256: independent, stable streams."""
    digest = hashlib.sha256(f"gam-mqar:{seed}:{split}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _distinct_rows(n: int, k: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """(n, k) ids from range(size), distinct within each row, a uniformly random ordered k-subset.

    Floyd's algorithm (a uniform k-subset in k steps, vectorised over rows), then a random
    order within each row: O(n k^2) work whatever ``size`` is.
    """
    out = torch.empty(n, k, dtype=torch.long)
    for i, j in enumerate(range(size - k, size)):
        t = torch.randint(0, j + 1, (n,), generator=gen)                     # uniform on 0..j
        taken = (out[:, :i] == t[:, None]).any(dim=1)                        # (n,)
        out[:, i] = torch.where(taken, torch.full_like(t, j), t)
    order = torch.rand(n, k, generator=gen).argsort(dim=1)                   # random order per row
    return out.gather(1, order)


def mqar_gap_probs(space: int, power_a: float = 0.01) -> torch.Tensor:
    """p(gap = g) for g = 0..space-1: proportional to a * (g+1)^(a-1) (Zoology's power law)."""
    g = torch.arange(1, space + 1, dtype=torch.float64)
    p = power_a * g ** (power_a - 1.0)
    return p / p.sum()


def _check_mqar_args(num_examples, vocab_size, seq_len, num_kv_pairs, power_a, seed, split) -> None:
    """mqar's arguments make a well-defined task: a ValueError naming the fix otherwise."""
    if not _is_int(num_examples) or num_examples < 1:
        raise ValueError(f"num_examples must be a positive integer, got {num_examples!r}")
    for name, value in (("vocab_size", vocab_size), ("seq_len", seq_len), ("num_kv_pairs", num_kv_pairs)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not _is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if split not in MQAR_SPLITS:
        raise ValueError(f"split must be one of {MQAR_SPLITS}, got {split!r}")
    if isinstance(power_a, bool) or not isinstance(power_a, (int, float)) or not 0.0 < power_a < float("inf"):
        raise ValueError(f"power_a must be a finite number > 0 (1.0: uniform gaps), got {power_a!r}")
    P, T, V = num_kv_pairs, seq_len, vocab_size
    n_keys = V // 2 - 1  # keys 1..V//2-1
    if n_keys < P:
        raise ValueError(
            f"vocab_size={V} is too small for num_kv_pairs={P}: keys come from 1..{V // 2 - 1} "
            f"({n_keys} ids) and must be distinct; need vocab_size >= {2 * P + 2}"
        )
    if T % 2:
        raise ValueError(f"seq_len must be even (queries sit at even offsets, as Zoology), got {T}")
    if T < 4 * P:
        raise ValueError(
            f"seq_len={T} is too short for num_kv_pairs={P}: the kv section takes 2P={2 * P} tokens and "
            f"the P queries need P even offsets after it; need seq_len >= 4P = {4 * P}"
        )


def mqar(
    num_examples: int,
    *,
    vocab_size: int,
    seq_len: int,
    num_kv_pairs: int,
    power_a: float = 0.01,
    seed: int = 0,
    split: str = "train",
) -> dict[str, torch.Tensor]:
    """Multi-query associative recall examples, as defined by Zoology (``_mqar``).

    Each example (length ``seq_len`` = T, P = ``num_kv_pairs``)::

        position:  0  1  2  3  ...  2P-2 2P-1 | 2P ......................... T-1
        inputs:    k1 v1 k2 v2 ...  kP   vP   | each key once more as a query, at an even
                                              | offset 2*gap of this section; random tokens
                                              | everywhere else
        targets:   -100 everywhere except at a query position q, where targets[q] is the
                   value paired with the key inputs[q] (next-token prediction: having read
                   the query key, predict its value)

    - Keys are P distinct ids from the first half of the vocabulary without 0,
      ``1 .. V//2 - 1``; values are P distinct ids from the second half, ``V//2 .. V-1``;
      the order of the pairs is random.
    - Gaps: the query section has ``space = (T - 2P) // 2`` even offsets. The gaps of keys
      1..P are drawn one after the other without replacement (so key 1 is drawn from the
      whole power law, key 2 from what remains, ... as numpy's ``choice(replace=False, p=p)``)
      with p(gap = g) proportional to ``a * (g+1)^(a-1)``, a = ``power_a`` (0.01: close to
      1/(g+1), short gaps far more likely; a = 1: uniform). Query of key i at
      ``2P + 2 * gap_i``.
    - Every other position of the query section (odd offsets, unused even offsets) holds
      a uniform random token from ``0 .. V-1`` (Zoology's ``random_non_queries=True``);
      such a token may equal a key of the example by chance; it is not scored.

    Returns a dict of LongTensors of shape (num_examples, T):

    - ``inputs``: the token ids.
    - ``targets``: the paired value at the P query positions, ``-100`` elsewhere; so
      ``model(inputs, targets)`` (mean cross-entropy over non-ignored positions) is the
      loss on query answers only.
    - ``distances``: at a query position q, ``q - (position of its key in the kv section)``
      (always >= 2; the value sits at key + 1, i.e. ``q - distance + 1``); ``-1`` elsewhere.

    Deterministic: the same arguments always give the same tensors. Each ``split`` draws
    from its own stream (a torch.Generator seeded from sha256 of ``(seed, split)``), so
    train and validation are independent and the validation set does not change with the
    number of training examples. (Draws are vectorised over the examples, so a different
    ``num_examples`` gives a different set, not a prefix of a longer one.)

    Differences from Zoology's code (none changes the task's distribution): our random
    stream; no ``vocab_size > seq_len`` requirement (it plays no role in the task).
    """
    _check_mqar_args(num_examples, vocab_size, seq_len, num_kv_pairs, power_a, seed, split)
    P, T, V = num_kv_pairs, seq_len, vocab_size
    n_keys, n_values = V // 2 - 1, V - V // 2  # keys 1..V//2-1, values V//2..V-1
    N, space = num_examples, (T - 2 * P) // 2
    gen = _split_generator(seed, split)

    keys = 1 + _distinct_rows(N, P, n_keys, gen)                             # (N, P) in 1..V//2-1
    values = V // 2 + _distinct_rows(N, P, n_values, gen)                    # (N, P) in V//2..V-1
    # Successive weighted draws without replacement = top-P of log p + Gumbel noise, in order.
    log_p = mqar_gap_probs(space, power_a).log()                             # (space,)
    u = torch.rand(N, space, generator=gen, dtype=torch.float64).clamp_(min=1e-300)
    gaps = (log_p - (-u.log()).log()).argsort(dim=1, descending=True)[:, :P]  # (N, P), in draw order

    inputs = torch.randint(0, V, (N, T), generator=gen)                      # random fill everywhere
    inputs[:, 0:2 * P:2] = keys
    inputs[:, 1:2 * P:2] = values
    query_pos = 2 * P + 2 * gaps                                             # (N, P)
    inputs.scatter_(1, query_pos, keys)
    targets = torch.full((N, T), -100, dtype=torch.long)
    targets.scatter_(1, query_pos, values)
    distances = torch.full((N, T), -1, dtype=torch.long)
    key_pos = 2 * torch.arange(P).expand(N, P)                               # key i at 2i
    distances.scatter_(1, query_pos, query_pos - key_pos)
    return {"inputs": inputs, "targets": targets, "distances": distances}


def mqar_splits(
    num_train: int,
    num_validation: int,
    *,
    vocab_size: int,
    seq_len: int,
    num_kv_pairs: int,
    power_a: float = 0.01,
    seed: int = 0,
) -> dict[str, dict[str, torch.Tensor]]:
    """``{"train": mqar(...), "validation": mqar(...)}`` from the two independent streams."""
    kw = dict(vocab_size=vocab_size, seq_len=seq_len, num_kv_pairs=num_kv_pairs, power_a=power_a, seed=seed)
    return {"train": mqar(num_train, split="train", **kw),
            "validation": mqar(num_validation, split="validation", **kw)}


def recall_accuracy(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    distances: torch.Tensor,
    receptive_field: int | None = None,
) -> dict:
    """Accuracy at the query positions (``targets != -100``), overall and split by distance.

    predictions: (N, T) predicted ids (argmax of the logits at each position);
    targets, distances: as returned by ``mqar``.

    A model whose output at position q depends on positions ``q-R+1 .. q`` only
    (receptive field R: GAM's ``N_LAYER * (k-1) + 1``) can answer a query only if it sees
    both the key (at ``q - d``, d = distance) and its value (at ``q - d + 1``), i.e. if
    ``d <= R - 1``: "within" the receptive field. ``d >= R``: "beyond" (the value may
    still be visible when d = R, but not which key it belongs to): such a model can only
    guess there.

    Returns a JSON-able dict of counts and accuracies (None when a group is empty):
    ``recall_accuracy``, ``recall_correct``, ``recall_count``, and with ``receptive_field``
    also ``receptive_field`` and ``recall_{accuracy,correct,count}_{within,beyond}_rf``.
    Counts are returned so that results of several batches can be summed.
    """
    for name, t in (("predictions", predictions), ("targets", targets), ("distances", distances)):
        if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor (argmax ids for predictions)")
    if not (predictions.shape == targets.shape == distances.shape):
        raise ValueError(
            f"predictions, targets and distances must have one shape, got {tuple(predictions.shape)}, "
            f"{tuple(targets.shape)}, {tuple(distances.shape)}"
        )
    if receptive_field is not None and (not _is_int(receptive_field) or receptive_field < 1):
        raise ValueError(f"receptive_field must be a positive integer or None, got {receptive_field!r}")
    query = targets != -100
    if bool((distances[query] < 1).any()):
        raise ValueError("every query position (targets != -100) needs a distance >= 1")
    correct = (predictions == targets) & query

    def group(mask: torch.Tensor) -> tuple[float | None, int, int]:
        n, c = int(mask.sum()), int((correct & mask).sum())
        return (c / n if n else None), c, n

    out = {}
    out["recall_accuracy"], out["recall_correct"], out["recall_count"] = group(query)
    if receptive_field is not None:
        out["receptive_field"] = receptive_field
        within = query & (distances <= receptive_field - 1)
        for name, mask in (("within", within), ("beyond", query & ~within)):
            (out[f"recall_accuracy_{name}_rf"], out[f"recall_correct_{name}_rf"],
             out[f"recall_count_{name}_rf"]) = group(mask)
    return out
