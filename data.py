"""Data pipeline for the GAM reproduction: text splits, BPE tokenizer, 257-token blocks.

What the paper (its section 4) and the author's ``benchmark.py`` do, and how this module
reproduces it, in the order the code below follows:

1. Text splits (:func:`load_text_splits`) come from the Hugging Face Hub
   (``Salesforce/wikitext`` ``wikitext-2-raw-v1`` or ``roneneldan/TinyStories``), capped at
   50,000 train / 5,000 validation rows with ``select(range(min(cap, len)))``. The same
   splits can be read from local files (``data_dir``: WikiText ``.raw``, TinyStories
   ``.txt``, or ``.jsonl``) or generated in code (``"synthetic"``, see ``synthetic.py``).
2. A BPE tokenizer (:func:`get_tokenizer`; ``tokenizers``; Whitespace pre-tokenizer;
   ``[UNK] [PAD] [SOS] [EOS]``) is trained per dataset. The paper says "on the training
   corpus"; the reference code trains it on every split, which leaks validation text into
   the vocabulary. We default to the paper (train only); ``train_on="all"`` reproduces the code.
3. Every row is encoded (:func:`encode_splits`) without special tokens, like the reference.
4. All token ids of a split are concatenated (no separators) and cut into non-overlapping
   chunks of ``block_size + 1`` (:class:`TokenBlocks`); the remainder is dropped.
5. :func:`build_loaders` runs 1-4 and wraps the blocks in DataLoaders.

The sources (Hub, local files and their readers) follow, below the pipeline.

Everything the user can fix (missing files, no network, too little data) raises
:class:`DataError` with a one-line message; ``benchmark.py`` turns it into exit code 2.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import re
import sys
from dataclasses import dataclass
from functools import cached_property
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from tokenizers import Tokenizer
from tokenizers.models import BPE
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.trainers import BpeTrainer

from common import atomic_write_text
from synthetic import synthetic_corpus

__all__ = [
    "DataError",
    "HUB_SOURCES",
    "SOURCES",
    "SPECIAL_TOKENS",
    "PreparedData",
    "TokenBlocks",
    "build_loaders",
    "encode_splits",
    "get_tokenizer",
    "load_text_splits",
]


class DataError(Exception):
    """A problem the user can fix (files, network, data size); the message is one line."""


# source name -> (hub path, hub config)
HUB_SOURCES = {
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1"),
    "tinystories": ("roneneldan/TinyStories", None),
}
SOURCES = (*HUB_SOURCES, "synthetic")

SPECIAL_TOKENS = ("[UNK]", "[PAD]", "[SOS]", "[EOS]")
# Bump when anything that changes the trained tokenizer changes (model, pre-tokenizer,
# trainer options, how texts are fed), so that stale cache files are never reused.
TOKENIZER_FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------
# 1. Text splits
# ----------------------------------------------------------------------------------------

def load_text_splits(
    source: str,
    *,
    data_dir: str | os.PathLike | None = None,
    max_train_rows: int | None = 50_000,
    max_val_rows: int | None = 5_000,
) -> dict[str, list[str]]:
    """Return the splits ``train``, ``validation`` (and ``test`` when present), each a list of
    its text rows.

    ``source`` is ``"wikitext2"``, ``"tinystories"`` or ``"synthetic"``. Without
    ``data_dir`` the first two come from the Hugging Face Hub; with ``data_dir`` the splits
    are read from local files instead (rule in :func:`_find_split_files`), and ``source``
    only labels them. Row caps apply to train and validation only, like the reference code;
    ``None`` means no cap.
    """
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r}; choose one of {', '.join(SOURCES)}")
    caps = {"train": max_train_rows, "validation": max_val_rows}
    if source == "synthetic":
        if data_dir is not None:
            raise DataError("the synthetic corpus is generated in code; drop --data-dir or pick another source")
        splits = {name: list(rows) for name, rows in synthetic_corpus().items()}
    elif data_dir is not None:
        splits = _load_local_splits(Path(data_dir), caps)
    else:
        splits = _load_hub_splits(source)
    # Same capping as the reference code: the first `cap` rows (local readers already
    # stopped there; this is then a no-op).
    for name, cap in caps.items():
        if cap is not None:
            splits[name] = splits[name][:cap]
    for name in ("train", "validation"):
        if not any(t.strip() for t in splits[name]):
            where = data_dir if data_dir is not None else source
            raise DataError(f"the {name} split of {where} is empty; provide a {name} file with text in it")
    return splits


# ----------------------------------------------------------------------------------------
# 2. Tokenizer
# ----------------------------------------------------------------------------------------

def get_tokenizer(
    splits: dict[str, list[str]],
    *,
    vocab_size: int = 10_000,
    train_on: str | Sequence[str] = ("train",),
    cache_dir: str | os.PathLike | None = None,
    show_progress: bool | None = None,
) -> Tokenizer:
    """The paper's BPE tokenizer (its section 4), trained on ``train_on`` only.

    ``train_on``: a split name, a list of names, or ``"all"`` (every split: what the
    reference code does). With ``cache_dir`` the trained tokenizer is stored as
    ``cache_dir/tokenizer-<key>.json`` (key: :func:`tokenizer_cache_key`) and reused.
    ``show_progress=None`` shows the trainer's progress bar only on a terminal.
    """
    tok, _, _ = _get_tokenizer_and_path(splits, vocab_size=vocab_size, train_on=train_on,
                                        cache_dir=cache_dir, show_progress=show_progress)
    return tok


def _get_tokenizer_and_path(
    splits: dict[str, list[str]],
    *,
    vocab_size: int,
    train_on: str | Sequence[str],
    cache_dir: str | os.PathLike | None,
    show_progress: bool | None,
) -> tuple[Tokenizer, str | None, list[str]]:
    """:func:`get_tokenizer`, also returning the cache path (or None) and the split names."""
    names = _resolve_train_on(splits, train_on)
    path = None
    if cache_dir is not None:
        key = tokenizer_cache_key(splits, vocab_size=vocab_size, train_on=names)
        path = os.path.join(os.fspath(cache_dir), f"tokenizer-{key}.json")
        if os.path.isfile(path):
            try:
                return Tokenizer.from_file(path), path, names
            except Exception:
                pass  # unreadable (e.g. truncated by hand): retrain and overwrite below
    if show_progress is None:
        show_progress = sys.stderr.isatty()

    def batches() -> Iterator[list[str]]:
        for name in names:
            texts = splits[name]
            for i in range(0, len(texts), 1000):
                yield texts[i:i + 1000]

    n_rows = sum(len(splits[n]) for n in names)
    tok = _train_tokenizer(batches(), n_rows, vocab_size, show_progress)
    if path is not None:
        # Atomic: a concurrent run or a crash never leaves a half-written JSON under the final name.
        atomic_write_text(path, tok.to_str())
    return tok, path, names


def _resolve_train_on(splits: dict[str, list[str]], train_on: str | Sequence[str]) -> list[str]:
    if isinstance(train_on, str):
        names = list(splits) if train_on == "all" else [train_on]
    else:
        names = list(train_on)
    if not names:
        raise DataError("no split selected to train the tokenizer on; use 'train' or 'all'")
    missing = [n for n in names if n not in splits]
    if missing:
        raise DataError(
            f"cannot train the tokenizer on {', '.join(missing)}: the data has only "
            f"{', '.join(splits)}; use 'train' or 'all'"
        )
    # canonical order, so ("validation", "train") and ("train", "validation") share a cache
    return [n for n in splits if n in names]


def tokenizer_cache_key(splits: dict[str, list[str]], *, vocab_size: int, train_on: Sequence[str]) -> str:
    """sha256 over the settings and the exact texts (with their row boundaries) of the
    splits used; never the dataset name, so edited files or other caps retrain."""
    h = hashlib.sha256()
    settings = {
        "format": TOKENIZER_FORMAT_VERSION,
        "model": "BPE",
        "unk": "[UNK]",
        "pre_tokenizer": "Whitespace",
        "special_tokens": list(SPECIAL_TOKENS),
        "vocab_size": int(vocab_size),
        "splits": list(train_on),
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    for name in train_on:
        texts = splits[name]
        h.update(f"\0split:{name}:{len(texts)}\0".encode())
        for t in texts:
            b = t.encode("utf-8")
            h.update(len(b).to_bytes(8, "little"))  # length prefix: ["ab"] != ["a", "b"]
            h.update(b)
    return h.hexdigest()[:20]


def _train_tokenizer(batches: Iterable[list[str]], n_rows: int, vocab_size: int, show_progress: bool) -> Tokenizer:
    tok = Tokenizer(BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    trainer = BpeTrainer(special_tokens=list(SPECIAL_TOKENS), vocab_size=vocab_size,
                         show_progress=show_progress)
    tok.train_from_iterator(batches, trainer=trainer, length=n_rows)
    return tok


# ----------------------------------------------------------------------------------------
# 3. Encoding and 4. blocks
# ----------------------------------------------------------------------------------------

def encode_splits(
    splits: dict[str, list[str]], tokenizer: Tokenizer, names: Sequence[str] | None = None
) -> dict[str, list[list[int]]]:
    """Token ids per row (no special tokens added, like the reference code)."""
    out = {}
    for name in (names if names is not None else list(splits)):
        texts = splits[name]
        ids: list[list[int]] = []
        for i in range(0, len(texts), 10_000):  # bounded memory for the Encoding objects
            ids.extend(e.ids for e in tokenizer.encode_batch(texts[i:i + 10_000]))
        out[name] = ids
    return out


class TokenBlocks(Dataset):
    """Non-overlapping ``block_size + 1`` chunks of the concatenated ids; the remainder is
    dropped. Item i is ``(chunk[:-1], chunk[1:])``: inputs and next-token targets."""

    def __init__(self, ids: Sequence[Sequence[int]] | torch.Tensor, block_size: int = 256):
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.block_size = block_size
        if isinstance(ids, torch.Tensor):
            flat = ids.reshape(-1).to(torch.long)
        else:
            total = sum(len(row) for row in ids)
            flat = torch.from_numpy(np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=total))
        self.n_tokens = int(flat.numel())
        span = block_size + 1
        n_blocks = self.n_tokens // span
        self.n_dropped = self.n_tokens - n_blocks * span
        self.blocks = flat[: n_blocks * span].reshape(n_blocks, span).contiguous()

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.blocks[i]
        return chunk[:-1], chunk[1:]


def _split_blocks(ids: dict[str, list[list[int]]], block_size: int) -> dict[str, TokenBlocks]:
    """Train, validation (and test) blocks. A train or validation split too small for one block
    is an error, since an empty loader would make the epoch's mean loss 0 / 0; such a test
    split is left out (the run reports no test numbers)."""
    blocks = {name: TokenBlocks(rows, block_size) for name, rows in ids.items()}
    if "test" in blocks and len(blocks["test"]) == 0:
        del blocks["test"]
    for name, ds in blocks.items():
        if len(ds) == 0:
            raise DataError(
                f"the {name} split has only {ds.n_tokens} tokens, fewer than one block of "
                f"{block_size + 1}; use more {name} data or a smaller block size"
            )
    return blocks


# ----------------------------------------------------------------------------------------
# 5. Loaders
# ----------------------------------------------------------------------------------------

@dataclass
class PreparedData:
    """One dataset, ready to train on: the loaders, the tokenizer (None for generated ids)
    and the facts about it (``info``: rows, tokens, blocks, vocabulary, tokenizer path...).
    ``test`` is None where the source has no test split (TinyStories, MQAR): there the
    validation split is the only held-out one."""
    train: DataLoader
    validation: DataLoader
    tokenizer: Tokenizer | None
    info: dict
    test: DataLoader | None = None

    def check_token_ids(self) -> None:
        """Every id of every split lies in [0, vocab_size): checked once here, so that the models
        can skip their per-step range checks (a device sync each)."""
        for split, loader in (("train", self.train), ("validation", self.validation), ("test", self.test)):
            if loader is None:
                continue
            lo, hi = int(loader.dataset.blocks.min()), int(loader.dataset.blocks.max())
            if lo < 0 or hi >= self.info["vocab_size"]:
                raise DataError(f"{split} token ids lie in [{lo}, {hi}], outside the tokenizer's "
                                f"[0, {self.info['vocab_size']}); delete the tokenizer cache {self.info['tokenizer_path']}")

    @cached_property
    def fingerprint(self) -> dict:
        """sha256 of the train and validation blocks and of the tokenizer, and the vocabulary
        size: what a run's checkpoints were trained on (--resume refuses other data)."""
        sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
        return {"train": sha(self.train.dataset.blocks.contiguous().numpy()),
                "validation": sha(self.validation.dataset.blocks.contiguous().numpy()),
                "tokenizer": sha(self.tokenizer.to_str().encode("utf-8")) if self.tokenizer else "none (generated ids)",
                "vocab_size": self.info["vocab_size"]}

    def unigram_perplexity(self) -> float:
        """Validation PPL of a model that knows only the train split's token frequencies (add-one):
        the floor any LM must beat (a model at this PPL has learned no context at all)."""
        train, val = self.train.dataset.blocks, self.validation.dataset.blocks
        counts = torch.bincount(train[:, 1:].reshape(-1), minlength=self.info["vocab_size"]).double() + 1.0
        log_p = (counts / counts.sum()).log()
        return math.exp(-log_p[val[:, 1:].reshape(-1)].mean().item())


def build_loaders(
    source: str,
    *,
    data_dir: str | os.PathLike | None = None,
    block_size: int = 256,
    batch_size: int = 32,
    vocab_size: int = 10_000,
    tokenizer_splits: str | Sequence[str] = "train",
    max_train_rows: int | None = 50_000,
    max_val_rows: int | None = 5_000,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    num_workers: int = 0,
    show_progress: bool | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> PreparedData:
    """Text -> tokenizer -> blocks -> loaders (a PreparedData; ``test`` when the source has a
    test split, evaluated like validation).

    The train order is a function of ``(seed, epoch)`` only: the sampler is a
    ``DistributedSampler`` (``rank`` of ``world_size`` replicas) and the caller calls
    ``train_loader.sampler.set_epoch(epoch)`` before each epoch. So the worker count never
    changes the numbers, and a resumed run needs only the epoch index. Validation is
    unshuffled; both keep the last partial batch (``drop_last=False``) like the reference
    code. ``batch_size`` is the global batch: see make_loaders.
    """
    splits = load_text_splits(source, data_dir=data_dir, max_train_rows=max_train_rows,
                              max_val_rows=max_val_rows)
    tokenizer, tok_path, tok_on = _get_tokenizer_and_path(
        splits, vocab_size=vocab_size, train_on=tokenizer_splits, cache_dir=cache_dir,
        show_progress=show_progress)
    names = [n for n in ("train", "validation", "test") if n in splits]
    blocks = _split_blocks(encode_splits(splits, tokenizer, names=names), block_size)

    train_loader, val_loader = make_loaders(blocks["train"], blocks["validation"], batch_size=batch_size,
                                            seed=seed, num_workers=num_workers, rank=rank, world_size=world_size)
    test_loader = None if "test" not in blocks else DataLoader(
        blocks["test"], batch_sampler=ShardedBatches(len(blocks["test"]), batch_size, rank, world_size),
        num_workers=num_workers)
    info = {
        "source": source,
        "data_dir": os.fspath(data_dir) if data_dir is not None else None,
        "rows": {name: len(ds) for name, ds in splits.items()},
        "tokens": {name: ds.n_tokens for name, ds in blocks.items()},
        "blocks": {name: len(ds) for name, ds in blocks.items()},
        "block_size": block_size,
        "vocab_size": tokenizer.get_vocab_size(),
        "vocab_size_requested": vocab_size,
        "tokenizer_path": tok_path,
        "tokenizer_splits": tok_on,
        "max_train_rows": max_train_rows,
        "max_val_rows": max_val_rows,
        "seed": seed,
    }
    return PreparedData(train_loader, val_loader, tokenizer, info, test_loader)


def make_loaders(train: Dataset, validation: Dataset, *, batch_size: int, seed: int,
                 num_workers: int = 0, rank: int = 0, world_size: int = 1) -> tuple[DataLoader, DataLoader]:
    """The train loader (order a function of (seed, epoch): see build_loaders) and the
    unshuffled validation loader of one rank; both keep the last partial batch.

    ``batch_size`` is the global batch. Train: each rank takes every world_size-th index of
    the epoch's permutation, in batches of batch_size / world_size, so step i of the ranks
    together covers exactly the one-process batch i (the sampler pads the last one with
    indices from the epoch's start when the set does not divide by world_size). Validation:
    the one-process batches of batch_size, dealt round-robin (ShardedBatches), no padding.
    """
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} is the global batch: it must be divisible by "
                         f"world_size {world_size}")
    sampler = DistributedSampler(train, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=False)
    # Its own generator: DataLoader draws a worker base seed at every iter(), which must
    # not consume the global RNG that dropout uses.
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train, batch_size=batch_size // world_size, sampler=sampler, generator=generator,
                              drop_last=False, num_workers=num_workers)
    val_loader = DataLoader(validation, batch_sampler=ShardedBatches(len(validation), batch_size, rank, world_size),
                            num_workers=num_workers)
    return train_loader, val_loader


class ShardedBatches(Sampler):
    """The unshuffled batches of ``range(n)`` in size ``batch_size`` (the last one partial),
    batch b to rank ``b % world_size``: the ranks split the validation set exactly, with no
    duplicates, and each evaluates the same batches a single process would."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(self.rank * self.batch_size, self.n, self.world_size * self.batch_size):
            yield list(range(start, min(start + self.batch_size, self.n)))

    def __len__(self) -> int:
        return len(range(self.rank * self.batch_size, self.n, self.world_size * self.batch_size))


class RecallExamples(Dataset):
    """MQAR examples (synthetic.mqar) behind the interface of TokenBlocks: item i is
    ``(inputs[i], targets[i])`` with targets -100 except at the queries; ``blocks`` are the
    token ids; ``distances`` (query minus key position, -1 elsewhere) serve the recall split."""

    def __init__(self, examples: dict[str, torch.Tensor]):
        self.blocks, self.targets, self.distances = examples["inputs"], examples["targets"], examples["distances"]
        self.n_tokens = self.blocks.numel()

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.blocks[i], self.targets[i]


def build_mqar_loaders(*, vocab_size: int, block_size: int, num_kv_pairs: int, num_train: int,
                       num_validation: int, batch_size: int, seed: int = 0, num_workers: int = 0,
                       data_seed: int = 0, rank: int = 0,
                       world_size: int = 1) -> PreparedData:
    """Multi-query associative recall (Zoology's MQAR, see ``synthetic.mqar``) -> a PreparedData without tokenizer or test.

    The examples come from ``data_seed`` (fixed: every model and seed sees the same task);
    ``seed`` orders the training examples, as for text. No tokenizer: ids are the task's."""
    from synthetic import mqar_splits

    try:
        splits = mqar_splits(num_train, num_validation, vocab_size=vocab_size, seq_len=block_size,
                             num_kv_pairs=num_kv_pairs, seed=data_seed)
    except ValueError as e:
        raise DataError(f"mqar: {e}") from None
    sets = {name: RecallExamples(ex) for name, ex in splits.items()}
    train_loader, val_loader = make_loaders(sets["train"], sets["validation"], batch_size=batch_size,
                                            seed=seed, num_workers=num_workers, rank=rank, world_size=world_size)
    info = {"source": "mqar", "data_dir": None, "rows": {n: len(d) for n, d in sets.items()},
            "tokens": {n: d.n_tokens for n, d in sets.items()}, "blocks": {n: len(d) for n, d in sets.items()},
            "block_size": block_size, "vocab_size": vocab_size, "vocab_size_requested": vocab_size,
            "tokenizer_path": None, "tokenizer_splits": None, "num_kv_pairs": num_kv_pairs,
            "queries": {n: int((d.targets != -100).sum()) for n, d in sets.items()},
            "data_seed": data_seed, "seed": seed}
    return PreparedData(train_loader, val_loader, None, info)


# ========================================================================================
# Sources: the Hugging Face Hub
# ========================================================================================

def _load_hub_splits(source: str) -> dict[str, list[str]]:
    path, config = HUB_SOURCES[source]
    hint = "pass --data-dir DIR with local files (see README) or use --preset smoke"
    try:
        import datasets  # here: only the Hub needs it (local files and the generated sets do not)
    except ImportError:
        raise DataError(f"downloading {path} from the Hugging Face Hub needs the datasets package "
                        f"(pip install datasets); or {hint}") from None
    # load_dataset retries a dead connection for ~25 s before giving up; one quick request
    # tells us first. In offline mode load_dataset reads its cache and never connects.
    if not _hub_offline() and not _hub_reachable():
        raise DataError(
            f"could not reach the Hugging Face Hub to download {path} (offline?); {hint}, "
            "or set HF_HUB_OFFLINE=1 if it is already in your Hugging Face cache"
        )
    try:
        dsd = datasets.load_dataset(path, config) if config else datasets.load_dataset(path)
    except (ConnectionError, TimeoutError) as e:
        raise DataError(f"could not download {path} from the Hugging Face Hub (offline?); {hint}") from e
    except OSError as e:  # e.g. DatasetNotFoundError (a FileNotFoundError), disk full
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"could not load {path} from the Hugging Face Hub ({reason}); {hint}") from e
    missing = [s for s in ("train", "validation") if s not in dsd]
    if missing:
        raise DataError(f"{path} on the Hub has no {' or '.join(missing)} split; {hint}")
    # Slicing gives the column as a list in one Arrow conversion; iterating ds["text"] goes row
    # by row through a lazy Column and is ~500x slower on 100k rows.
    return {name: (dsd[name][:]["text"] if len(dsd[name]) else []) for name in ("train", "validation", "test")
            if name in dsd}


def _hub_offline() -> bool:
    import datasets

    return bool(getattr(datasets.config, "HF_HUB_OFFLINE", False))


def _hub_reachable(timeout: float = 5.0) -> bool:
    """One HEAD request to the Hub endpoint (proxy settings honoured); any HTTP answer counts."""
    try:
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session
    except ImportError:  # very old huggingface_hub: let load_dataset find out itself
        return True
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:
        return False
    return True


# ========================================================================================
# Sources: local files (WikiText .raw, TinyStories .txt, .jsonl) and their readers
# ========================================================================================

# The formats users actually have: the official WikiText raw release (one row per line),
# the official TinyStories text files (one row per <|endoftext|>-separated story; plain
# .txt without the marker is read line by line), and JSON lines with a "text" field.
_ACCEPTED_SUFFIXES = (".raw", ".txt", ".jsonl")
_ACCEPTED = ('.raw or .txt (one row per line, or per <|endoftext|>-separated story) '
             'or .jsonl (one {"text": ...} object per line)')
EOT_MARKER = "<|endoftext|>"

# The words that assign a local file to a split (see _find_split_files).
_SPLIT_WORDS = {
    "train": ("train",),
    "validation": ("valid", "validation", "val"),
    "test": ("test",),
}


def _load_local_splits(data_dir: Path, caps: dict[str, int | None]) -> dict[str, list[str]]:
    # Our own readers rather than datasets' load_dataset("text"): that loader cannot reproduce
    # the Hub's wikitext rows (it keeps " \n" where the Hub has ""), cannot split on
    # <|endoftext|>, and writes an Arrow copy of every file into the HF cache.
    files = _find_split_files(data_dir)
    return {name: _read_rows(files[name], caps.get(name)) for name in ("train", "validation", "test")
            if name in files}


def _find_split_files(data_dir: Path) -> dict[str, Path]:
    """Assign the files of ``data_dir`` (not recursive) to splits.

    Rule: a file belongs to a split when its name, cut at ``.``, ``_``, ``-`` and spaces,
    contains the word ``train``; ``valid``, ``validation`` or ``val``; or ``test``. This
    covers WikiText (``wiki.train.raw``, ``wiki.valid.raw``, ``wiki.test.raw``), TinyStories
    (``TinyStories-train.txt``, ``valid_subset.txt``) and plain ``train.jsonl`` /
    ``validation.txt``. Only ``.raw``, ``.txt`` and ``.jsonl`` files are read; a file of
    another format is ignored when its split has an accepted file, and is an error (naming
    the accepted formats) when it is its split's only file, since the user surely meant it.
    Two accepted files for the same split is an error rather than a silent choice.
    """
    if not data_dir.exists():
        raise DataError(f"data directory {data_dir} does not exist; pass --data-dir DIR with the text files")
    if not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir} is a file; pass the directory that holds the split files")
    found: dict[str, list[Path]] = {}
    other_formats: dict[str, list[Path]] = {}
    for p in sorted(data_dir.iterdir()):
        if not p.is_file():
            continue
        accepted = p.suffix.lower() in _ACCEPTED_SUFFIXES
        for split in _splits_named_in(p.stem):
            (found if accepted else other_formats).setdefault(split, []).append(p)
    for split, paths in other_formats.items():
        if split not in found:
            names = ", ".join(p.name for p in paths)
            raise DataError(f"{data_dir} has no {split} file in a format read here (found {names}); "
                            f"convert it to {_ACCEPTED}")
    for split, example in (("train", "wiki.train.raw, train_subset.txt or train.jsonl"),
                           ("validation", "wiki.valid.raw, valid_subset.txt or validation.jsonl")):
        if split not in found:
            raise DataError(f"no {split} file in {data_dir}: expected a file named like {example} ({_ACCEPTED})")
    for split, paths in found.items():
        if len(paths) > 1:
            names = ", ".join(p.name for p in paths)
            raise DataError(f"several {split} files in {data_dir} ({names}); keep exactly one per split")
    return {split: paths[0] for split, paths in found.items()}


def _splits_named_in(stem: str) -> list[str]:
    words = set(re.split(r"[._\-\s]+", stem.lower()))
    return [split for split, keys in _SPLIT_WORDS.items() if words.intersection(keys)]


def _read_rows(path: Path, cap: int | None) -> list[str]:
    try:
        if path.suffix.lower() == ".jsonl":
            return _read_jsonl_rows(path, cap)
        if _file_contains(path, EOT_MARKER.encode()):
            return list(_iter_story_rows(path, cap))
        return list(_iter_line_rows(path, cap))
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from e
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror or e}); check the file and its permissions") from e


def _file_contains(path: Path, needle: bytes) -> bool:
    # mmap.find stops at the first hit (a few hundred bytes into a TinyStories file) and
    # scans a marker-free file at memory speed, without decoding or loading it.
    if path.stat().st_size == 0:
        return False
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        return mm.find(needle) != -1


def _iter_line_rows(path: Path, cap: int | None) -> Iterator[str]:
    """One row per line, exactly as the Hub's wikitext builder made its rows.

    That builder did ``for row in open(file, encoding="utf-8"): yield row if row.strip()
    else ""``: a row KEEPS its trailing "\\n" (train row 1 is " = Valkyria Chronicles III =
    \\n") and whitespace-only lines become "" (row 0). Text mode with the default
    ``newline=None`` splits on "\\n" only (after turning "\\r\\n"/"\\r" into "\\n"), unlike
    ``str.splitlines`` which would also split on \\x0b, \\x1c, \\u2028, ... and change the
    row count. utf-8-sig drops a leading BOM and is otherwise identical to utf-8.
    """
    with open(path, encoding="utf-8-sig") as f:
        for i, line in enumerate(f):
            if cap is not None and i >= cap:
                return
            yield line if line.strip() else ""


def _iter_story_rows(path: Path, cap: int | None) -> Iterator[str]:
    """One row per ``<|endoftext|>``-separated record (official TinyStories .txt format).

    Records are stripped and empty ones skipped. Paragraphs inside a story stay separated by
    the file's single "\\n" (the Hub's parquet uses a blank line); the Whitespace
    pre-tokenizer makes the two identical after tokenization. Streams, so a row cap does
    not read a 2 GB file to the end.
    """
    n = 0
    buf: list[str] = []
    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            head, *rest = line.split(EOT_MARKER)
            buf.append(head)
            for piece in rest:  # each marker closes the current record
                story = "".join(buf).strip()
                buf = [piece]
                if story:
                    yield story
                    n += 1
                    if cap is not None and n >= cap:
                        return
    story = "".join(buf).strip()  # a last record without a closing marker
    if story:
        yield story


def _read_jsonl_rows(path: Path, cap: int | None) -> list[str]:
    """JSON lines: one object per line, its ``text`` field is the row; blank lines skipped.

    Line by line, so a row cap does not parse the rest of a large file."""
    rows: list[str] = []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if cap is not None and len(rows) >= cap:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno} is not valid JSON ({e.msg}); fix or remove it") from e
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f'{path}: line {lineno} has no string "text" field; every line needs one')
            rows.append(record["text"])
    return rows
