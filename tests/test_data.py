"""Tests for data.py: synthetic corpus, local files, tokenizer + cache, blocks, loaders.

No test touches the network: the Hub is forced offline (env + datasets.config) and the
reachability probe is replaced, so a mistake here fails fast instead of downloading.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import pytest
import torch
from conftest import REPO, shared_data_dir

import data
import synthetic
from data import DataError, TokenBlocks


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)

    def probe(*a, **k):
        raise AssertionError("a test tried to reach the Hugging Face Hub")

    monkeypatch.setattr(data, "_hub_reachable", probe)


def _dd(**splits):
    return {k: list(v) for k, v in splits.items()}


SHARED = shared_data_dir()


# ---------------------------------------------------------------------------------------
# synthetic corpus
# ---------------------------------------------------------------------------------------

def test_synthetic_corpus_is_deterministic_per_seed():
    a = synthetic.synthetic_corpus(20, 5, seed=0)
    b = synthetic.synthetic_corpus(20, 5, seed=0)
    c = synthetic.synthetic_corpus(20, 5, seed=1)
    assert a == b
    assert a["train"] != c["train"] and a["validation"] != c["validation"]
    assert [len(a["train"]), len(a["validation"])] == [20, 5]
    # validation has its own random stream: it must not move when the train size changes
    assert synthetic.synthetic_corpus(7, 5, seed=0)["validation"] == a["validation"]
    assert set(a["train"]).isdisjoint(a["validation"])


def _intro_facts(doc):
    """{role: name}, {name: (color, animal)} and the word count of the opening facts."""
    m = re.match(r"The (\w+) of the (\w+) is (\w+) \. The (\w+) of the (\w+) is (\w+) \. "
                 r"(\w+) has an? (\w+) (\w+) \. (\w+) has an? (\w+) (\w+) \.", doc)
    assert m, doc[:200]
    g = m.groups()
    roles = {g[0]: g[2], g[3]: g[5]}
    pets = {g[6]: (g[7], g[8]), g[9]: (g[10], g[11])}
    return roles, pets, len(m.group(0).split())


def test_synthetic_corpus_has_long_range_recalls():
    docs = synthetic.synthetic_corpus(60, 10, seed=3)["train"]
    far, fact_words, words = 0, 0, 0
    for doc in docs:
        roles, pets, n_intro = _intro_facts(doc)
        w = doc.split()
        first = w.index(next(iter(roles.values())))
        later = [i for i, x in enumerate(w) if x == w[first] and i >= n_intro]
        # the NEXT mention after the opening facts is far, not just some mention
        far += bool(later) and later[0] - first >= 50
        facts = set(roles) | set(roles.values()) | {x for p in pets.values() for x in p}
        fact_words += sum(x in facts for x in w[n_intro:])
        words += len(w)
        # the recalls are consistent with the opening facts (the binding is real)
        for role, name in re.findall(r"Then the (\w+) of the \w+ came , and so it was (\w+) who", doc):
            assert roles[role] == name
        for color, animal, name in re.findall(r"the (\w+) (\w+) belonged to (\w+) \.", doc):
            assert pets[name] == (color, animal)
    assert far / len(docs) >= 0.9
    assert fact_words / words >= 0.04  # a measurable share of tokens is long-range


def test_synthetic_source_default_sizes():
    splits = data.load_text_splits("synthetic")
    assert set(splits) == {"train", "validation"}
    assert all(isinstance(t, str) for t in splits["train"])
    n_train = sum(len(t.split()) for t in splits["train"])
    n_val = sum(len(t.split()) for t in splits["validation"])
    assert 60_000 <= n_train <= 150_000
    assert 20 * 257 <= n_val <= 40 * 257
    capped = data.load_text_splits("synthetic", max_train_rows=10, max_val_rows=3)
    assert (len(capped["train"]), len(capped["validation"])) == (10, 3)
    assert capped["train"] == splits["train"][:10]
    with pytest.raises(DataError):
        data.load_text_splits("synthetic", data_dir="/nonexistent")
    with pytest.raises(DataError, match="unknown data source"):
        data.load_text_splits("wikitext-103")


# ---------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------

TRAIN_TEXT = ["the cat sat on the mat, and the dog sat on the rug."] * 40 + ["a man ran to the tram."] * 20
VAL_ONLY = "zorblax"


def _tok_splits(train=TRAIN_TEXT, val_extra=""):
    return _dd(train=train, validation=[f"{VAL_ONLY} {VAL_ONLY} went home {val_extra}"] * 60)


def test_tokenizer_train_only_does_not_see_validation_words():
    splits = _tok_splits()
    tok_train = data.get_tokenizer(splits, vocab_size=300, cache_dir=None)
    tok_all = data.get_tokenizer(splits, vocab_size=300, train_on="all", cache_dir=None)
    assert tok_train.token_to_id(VAL_ONLY) is None
    assert tok_train.encode(VAL_ONLY).tokens != [VAL_ONLY]
    assert tok_all.token_to_id(VAL_ONLY) is not None
    assert tok_all.encode(VAL_ONLY).tokens == [VAL_ONLY]
    # a list of split names works like "all"
    tok_list = data.get_tokenizer(splits, vocab_size=300, train_on=["validation", "train"], cache_dir=None)
    assert tok_list.get_vocab() == tok_all.get_vocab()
    with pytest.raises(DataError, match="test"):
        data.get_tokenizer(splits, vocab_size=300, train_on="test", cache_dir=None)


def test_tokenizer_special_tokens_and_settings():
    tok = data.get_tokenizer(_tok_splits(), vocab_size=300, cache_dir=None)
    assert [tok.token_to_id(t) for t in ("[UNK]", "[PAD]", "[SOS]", "[EOS]")] == [0, 1, 2, 3]
    # Whitespace pre-tokenizer: punctuation splits off; no special tokens are added
    assert tok.encode("the cat.").tokens == ["the", "cat", "."]
    assert tok.encode("zzz").ids == [0, 0, 0]  # unseen chars: one [UNK] each (fuse_unk off, as the author's tokenizer)
    assert tok.get_vocab_size() <= 300


def test_tokenizer_cache_key_and_reuse(tmp_path, monkeypatch):
    base = _tok_splits()
    key = lambda s, v=300, on=("train",): data.tokenizer_cache_key(s, vocab_size=v, train_on=on)  # noqa: E731
    k0 = key(base)
    assert key(_tok_splits()) == k0  # same content, new list objects -> same key
    assert key(base, v=301) != k0
    assert key(base, on=("train", "validation")) != k0
    assert key(_tok_splits(train=TRAIN_TEXT + ["one more row"])) != k0
    assert key(_tok_splits(train=["ab", "c"])) != key(_tok_splits(train=["a", "bc"]))  # row boundaries count
    # validation text is only part of the key when the tokenizer trains on it
    edited_val = _tok_splits(val_extra="again")
    assert key(edited_val) == k0
    assert key(edited_val, on=("train", "validation")) != key(base, on=("train", "validation"))

    tok = data.get_tokenizer(base, vocab_size=300, cache_dir=tmp_path)
    path = tmp_path / f"tokenizer-{k0}.json"
    assert path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left behind
    mtime = path.stat().st_mtime_ns

    def no_training(*a, **k):
        raise AssertionError("retrained although a cached tokenizer exists")

    monkeypatch.setattr(data, "_train_tokenizer", no_training)
    again = data.get_tokenizer(_tok_splits(), vocab_size=300, cache_dir=tmp_path)
    assert again.get_vocab() == tok.get_vocab()
    assert path.stat().st_mtime_ns == mtime
    with pytest.raises(AssertionError, match="retrained"):  # other settings -> new key -> trains
        data.get_tokenizer(base, vocab_size=301, cache_dir=tmp_path)
    monkeypatch.undo()

    path.write_text("{not json")  # a damaged cache file is replaced, not fatal
    fixed = data.get_tokenizer(base, vocab_size=300, cache_dir=tmp_path)
    assert fixed.get_vocab() == tok.get_vocab()
    assert json.loads(path.read_text())["model"]["type"] == "BPE"


# ---------------------------------------------------------------------------------------
# blocks
# ---------------------------------------------------------------------------------------

def test_token_blocks_chunking():
    rows = [list(range(i * 100, i * 100 + 100)) for i in range(8)]  # 800 ids
    flat = [x for r in rows for x in r]
    ds = TokenBlocks(rows, block_size=256)
    assert len(ds) == 800 // 257 == 3
    assert ds.n_tokens == 800 and ds.n_dropped == 800 - 3 * 257
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.dtype == y.dtype == torch.long
        assert x.shape == y.shape == (256,)
        chunk = flat[i * 257:(i + 1) * 257]  # non-overlapping
        assert x.tolist() == chunk[:-1] and y.tolist() == chunk[1:]
    same = TokenBlocks(torch.tensor(flat), block_size=256)
    assert torch.equal(same.blocks, ds.blocks)
    assert len(TokenBlocks([list(range(256))], block_size=256)) == 0  # 256 < 257
    assert len(TokenBlocks([list(range(257))], block_size=256)) == 1
    assert len(TokenBlocks([[1, 2], [3], [4, 5, 6]], block_size=2)) == 2


def test_encode_splits_matches_per_row_encoding():
    splits = _tok_splits()
    tok = data.get_tokenizer(splits, vocab_size=300, cache_dir=None)
    ids = data.encode_splits(splits, tok)
    assert set(ids) == {"train", "validation"}
    assert ids["train"][0] == tok.encode(TRAIN_TEXT[0]).ids
    assert len(ids["validation"]) == 60


# ---------------------------------------------------------------------------------------
# local files
# ---------------------------------------------------------------------------------------

def test_local_wikitext_raw_rows_are_lines(tmp_path):
    (tmp_path / "wiki.train.raw").write_text(" \n = Title = \n \n Some text , here . \n\n last line \n",
                                             encoding="utf-8")
    (tmp_path / "wiki.valid.raw").write_text(" = V = \n v text \n", encoding="utf-8")
    (tmp_path / "wiki.test.raw").write_text(" t \n", encoding="utf-8")
    s = data.load_text_splits("wikitext2", data_dir=tmp_path)
    # like the Hub builder: the line with its "\n"; whitespace-only lines become ""
    assert s["train"] == ["", " = Title = \n", "", " Some text , here . \n", "", " last line \n"]
    assert s["validation"] == [" = V = \n", " v text \n"]
    assert s["test"] == [" t \n"]
    capped = data.load_text_splits("wikitext2", data_dir=str(tmp_path), max_train_rows=2, max_val_rows=1)
    assert capped["train"] == ["", " = Title = \n"]
    assert len(capped["validation"]) == 1 and len(capped["test"]) == 1  # test is never capped


def test_local_txt_stories_and_bom(tmp_path):
    stories = ("Once there was a cat.\nIt sat.\n<|endoftext|>\nA dog ran.\n<|endoftext|>\n"
               "The end.<|endoftext|>Tail story\n")
    (tmp_path / "train_subset.txt").write_bytes(stories.encode("utf-8"))
    (tmp_path / "valid_subset.txt").write_bytes(b"\xef\xbb\xbfSpot saw a car.\n<|endoftext|>\nBye.\n<|endoftext|>\n")
    s = data.load_text_splits("tinystories", data_dir=tmp_path)
    assert s["train"] == ["Once there was a cat.\nIt sat.", "A dog ran.", "The end.", "Tail story"]
    assert s["validation"] == ["Spot saw a car.", "Bye."]  # BOM stripped
    assert "test" not in s
    assert data.load_text_splits("tinystories", data_dir=tmp_path, max_train_rows=2)["train"] == [
        "Once there was a cat.\nIt sat.", "A dog ran."]


def test_local_jsonl_text_field_per_line(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "first row", "id": 1}\n\n{"text": " second \\n"}\n',
                                          encoding="utf-8")
    (tmp_path / "validation.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "v1"}\n{"text": "v2"}')  # BOM, no final \n
    s = data.load_text_splits("wikitext2", data_dir=tmp_path)
    assert s["train"] == ["first row", " second \n"]  # the field verbatim; blank lines skipped
    assert s["validation"] == ["v1", "v2"]


def test_local_jsonl_cap_stops_reading(tmp_path):
    # Catches: a reader that parses the whole file before capping (slow on a large file).
    (tmp_path / "train.jsonl").write_text('{"text": "a"}\n{"text": "b"}\nnot json at all\n', encoding="utf-8")
    (tmp_path / "valid.jsonl").write_text('{"text": "v"}\n', encoding="utf-8")
    assert data.load_text_splits("wikitext2", data_dir=tmp_path, max_train_rows=2)["train"] == ["a", "b"]
    with pytest.raises(DataError, match="line 3 is not valid JSON"):
        data.load_text_splits("wikitext2", data_dir=tmp_path, max_train_rows=3)


@pytest.mark.parametrize(
    "content, match",
    [
        pytest.param('{"text": "ok"}\n{"text": "oops",\n', "line 2 is not valid JSON", id="broken_line"),
        pytest.param('{"text": "ok"}\n{"body": "no text"}\n', 'line 2 has no string "text" field', id="no_text_field"),
        pytest.param('{"text": 3}\n', 'line 1 has no string "text" field', id="text_not_a_string"),
        pytest.param('["a list"]\n', 'line 1 has no string "text" field', id="not_an_object"),
        pytest.param('[{"text": "a"}, {"text": "b"}]', 'line 1 has no string "text" field', id="json_array_in_jsonl"),
    ],
)
def test_local_jsonl_errors_name_the_line(tmp_path, content, match):
    (tmp_path / "train.jsonl").write_text(content, encoding="utf-8")
    (tmp_path / "valid.txt").write_text("v\n", encoding="utf-8")
    with pytest.raises(DataError, match=match) as e:
        data.load_text_splits("wikitext2", data_dir=tmp_path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("train.json", id="json"),
        pytest.param("train.csv", id="csv"),
        pytest.param("train.parquet", id="parquet"),
        pytest.param("TinyStories-train.txt.gz", id="gzipped_txt"),
        pytest.param("wiki.train.tokens", id="wikitext_tokens"),
    ],
)
def test_unaccepted_format_as_a_splits_only_file_is_an_error_naming_the_formats(tmp_path, name):
    # Catches: such a file read as text (garbage rows), or silently skipped so that the
    # error claims there is no train file at all.
    (tmp_path / name).write_text('[{"text": "a"}]\n', encoding="utf-8")
    (tmp_path / "valid.txt").write_text("v\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        data.load_text_splits("wikitext2", data_dir=tmp_path)
    msg = str(e.value)
    assert f"found {name})" in msg and "train" in msg and "\n" not in msg  # not "train.jsonl"
    assert all(fmt in msg for fmt in (".raw", ".txt", ".jsonl", "<|endoftext|>", '"text"')), msg


def test_unaccepted_format_beside_an_accepted_file_is_ignored(tmp_path):
    # Catches: the extra file counted as a second train file ("several train files").
    (tmp_path / "wiki.train.raw").write_text(" a \n", encoding="utf-8")
    (tmp_path / "wiki.train.json").write_text('[{"text": "not me"}]', encoding="utf-8")
    (tmp_path / "wiki.valid.raw").write_text(" v \n", encoding="utf-8")
    (tmp_path / "valid.parquet").write_bytes(b"PAR1")
    (tmp_path / "README.md").write_text("no split word: never a candidate\n", encoding="utf-8")
    s = data.load_text_splits("wikitext2", data_dir=tmp_path)
    assert s["train"] == [" a \n"] and s["validation"] == [" v \n"]


def test_local_plain_txt_without_marker_is_one_row_per_line(tmp_path):
    (tmp_path / "train.txt").write_text("\ufeffline one\nline two\n", encoding="utf-8")
    (tmp_path / "valid.txt").write_text("v\n", encoding="utf-8")
    s = data.load_text_splits("wikitext2", data_dir=tmp_path)
    assert s["train"] == ["line one\n", "line two\n"]


def test_local_files_errors(tmp_path):
    (tmp_path / "wiki.train.raw").write_text("some words\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        data.load_text_splits("wikitext2", data_dir=tmp_path)
    msg = str(e.value)
    assert "validation" in msg and "wiki.valid.raw" in msg and "valid_subset.txt" in msg
    assert "\n" not in msg

    with pytest.raises(DataError, match="does not exist"):
        data.load_text_splits("wikitext2", data_dir=tmp_path / "missing")

    (tmp_path / "wiki.valid.raw").write_text(" \n\n", encoding="utf-8")
    with pytest.raises(DataError, match="validation split .* is empty"):
        data.load_text_splits("wikitext2", data_dir=tmp_path)

    (tmp_path / "wiki.valid.raw").write_text("fine\n", encoding="utf-8")
    (tmp_path / "train.jsonl").write_text('{"text": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="several train files"):
        data.load_text_splits("wikitext2", data_dir=tmp_path)

    (tmp_path / "train.jsonl").unlink()
    (tmp_path / "wiki.train.raw").write_bytes(b"caf\xe9\n")  # latin-1, not UTF-8
    with pytest.raises(DataError, match="UTF-8"):
        data.load_text_splits("wikitext2", data_dir=tmp_path)


@pytest.mark.skipif(SHARED is None or not (SHARED / "wikitext-2-raw").is_dir(), reason="shared WikiText-2 files absent")
def test_shared_wikitext2_matches_hub_row_counts():
    s = data.load_text_splits("wikitext2", data_dir=SHARED / "wikitext-2-raw")
    assert {k: len(v) for k, v in s.items()} == {"train": 36_718, "validation": 3_760, "test": 4_358}
    assert s["train"][0] == ""
    assert s["train"][1] == " = Valkyria Chronicles III = \n"
    assert s["validation"][1] == " = Homarus gammarus = \n"


@pytest.mark.skipif(SHARED is None or not (SHARED / "tinystories").is_dir(), reason="shared TinyStories files absent")
def test_shared_tinystories_subsets():
    s = data.load_text_splits("tinystories", data_dir=SHARED / "tinystories")
    assert {k: len(v) for k, v in s.items()} == {"train": 2_316, "validation": 1_840}
    assert s["train"][0].startswith("One day, a little girl named Lily found a needle")
    assert s["validation"][0].startswith("Spot. Spot saw the shiny car")
    assert not any("<|endoftext|>" in t for t in s["train"][:50])


# ---------------------------------------------------------------------------------------
# Hub unreachable
# ---------------------------------------------------------------------------------------

def test_hub_unreachable_probe_fails_fast(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(data, "_hub_reachable", lambda *a, **k: False)

    def must_not_load(*a, **k):
        raise AssertionError("load_dataset called although the Hub is unreachable")

    monkeypatch.setattr(datasets, "load_dataset", must_not_load)
    with pytest.raises(DataError) as e:
        data.load_text_splits("tinystories")
    assert "--data-dir" in str(e.value) and "roneneldan/TinyStories" in str(e.value)


def test_hub_connection_error_becomes_data_error(monkeypatch):
    calls = []

    def offline(*a, **k):
        calls.append(a)
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as e:
        data.load_text_splits("wikitext2")
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1")]
    msg = str(e.value)
    assert "--data-dir" in msg and "Salesforce/wikitext" in msg and "\n" not in msg


def test_local_files_need_no_datasets_package(tmp_path, monkeypatch):
    # A GPU image without datasets runs everything from --data-dir: only the Hub imports it.
    for name in ("wiki.train.raw", "wiki.valid.raw", "wiki.test.raw"):
        (tmp_path / name).write_text(" = T = \n some text \n", encoding="utf-8")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    splits = data.load_text_splits("wikitext2", data_dir=tmp_path)
    assert splits == {name: [" = T = \n", " some text \n"] for name in ("train", "validation", "test")}
    with pytest.raises(data.DataError, match=r"needs the datasets package \(pip install datasets\); or pass --data-dir"):
        data.load_text_splits("wikitext2")  # the Hub path does need it


def test_real_offline_mode_gives_data_error(tmp_path):
    # the real datasets code path, in a fresh interpreter with an empty HF cache
    code = textwrap.dedent("""
        import data
        try:
            data.load_text_splits("wikitext2")
        except data.DataError as e:
            print("DATAERROR:", e)
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path),
               HF_DATASETS_CACHE=str(tmp_path / "datasets"), PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert "DATAERROR:" in out.stdout, out.stderr[-2000:]
    assert "--data-dir" in out.stdout


# ---------------------------------------------------------------------------------------
# loaders
# ---------------------------------------------------------------------------------------

def _first_batches(loader, n=3):
    return [x.clone() for x, _ in list(loader)[:n]]


def _loaders(prepared):
    return prepared.train, prepared.validation, prepared.tokenizer, prepared.info


def test_build_loaders_synthetic(tmp_path):
    tl, vl, tok, info = _loaders(data.build_loaders("synthetic", vocab_size=400, batch_size=16, cache_dir=tmp_path, seed=5))
    assert info["source"] == "synthetic" and info["data_dir"] is None
    assert info["rows"] == {"train": synthetic.SYNTHETIC_TRAIN_DOCS, "validation": synthetic.SYNTHETIC_VAL_DOCS}
    assert info["vocab_size"] == tok.get_vocab_size() == 400
    assert info["tokenizer_splits"] == ["train"]
    assert Path(info["tokenizer_path"]).is_file() and Path(info["tokenizer_path"]).parent == tmp_path
    assert 200 <= info["blocks"]["train"] <= 600 and 20 <= info["blocks"]["validation"] <= 40
    for split, loader in (("train", tl), ("validation", vl)):
        assert len(loader.dataset) == info["blocks"][split] == info["tokens"][split] // 257
    x, y = next(iter(tl))
    assert x.shape == y.shape == (16, 256) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.max()) < 400

    # validation is unshuffled and keeps its last partial batch
    vx = torch.cat([b[0] for b in vl])
    assert torch.equal(vx, vl.dataset.blocks[:, :-1])

    # shuffling: a function of (seed, epoch) only, different across seeds and epochs,
    # and the same whatever the worker count
    tl2, _, _, info2 = _loaders(data.build_loaders("synthetic", vocab_size=400, batch_size=16, cache_dir=tmp_path,
                                                   seed=5))
    tl2b = data.build_loaders("synthetic", vocab_size=400, batch_size=16, cache_dir=tmp_path, seed=5,
                              num_workers=2).train
    assert info2["tokenizer_path"] == info["tokenizer_path"]
    epoch0 = _first_batches(tl2)
    assert all(torch.equal(a, b) for a, b in zip(epoch0, _first_batches(tl2b)))
    assert all(torch.equal(a, b) for a, b in zip(epoch0, _first_batches(tl2)))  # no hidden state
    tl2.sampler.set_epoch(1)
    epoch1 = _first_batches(tl2)
    assert not torch.equal(epoch0[0], epoch1[0])
    tl2b.sampler.set_epoch(1)
    assert all(torch.equal(a, b) for a, b in zip(epoch1, _first_batches(tl2b)))
    tl3 = data.build_loaders("synthetic", vocab_size=400, batch_size=16, cache_dir=tmp_path, seed=6).train
    assert not torch.equal(_first_batches(tl3, 1)[0], epoch0[0])
    assert sum(len(b[0]) for b in tl) == len(tl.dataset)  # drop_last=False


def test_build_loaders_too_little_data(tmp_path):
    (tmp_path / "train.txt").write_text("word " * 2000 + "\n", encoding="utf-8")
    (tmp_path / "valid.txt").write_text("word " * 100 + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="validation split has only 100 tokens"):
        data.build_loaders("wikitext2", data_dir=tmp_path, vocab_size=300)
    tl, vl, tok, info = _loaders(data.build_loaders("wikitext2", data_dir=tmp_path, vocab_size=300, block_size=64))
    assert info["blocks"] == {"train": 2000 // 65, "validation": 100 // 65}
    assert info["data_dir"] == str(tmp_path) and info["tokenizer_path"] is None


def test_a_test_split_gets_its_own_unshuffled_loader_and_a_tiny_one_is_left_out(tmp_path):
    words = [f"w{i % 37}" for i in range(3000)]
    (tmp_path / "train.txt").write_text(" ".join(words) + "\n", encoding="utf-8")
    (tmp_path / "valid.txt").write_text(" ".join(words[:700]) + "\n", encoding="utf-8")
    (tmp_path / "test.txt").write_text(" ".join(reversed(words[:900])) + "\n", encoding="utf-8")
    prepared = data.build_loaders("wikitext2", data_dir=tmp_path, vocab_size=300, block_size=64, batch_size=4)
    assert prepared.info["blocks"]["test"] == 900 // 65 == len(prepared.test.dataset)
    # the test text, encoded by the run's tokenizer, in order: the same blocks an independent encoding gives
    ids = prepared.tokenizer.encode(" ".join(reversed(words[:900]))).ids
    expected = torch.tensor(ids[: (len(ids) // 65) * 65]).reshape(-1, 65)
    assert torch.equal(torch.cat([x for x, _ in prepared.test]), expected[:, :-1])
    (tmp_path / "test.txt").write_text("w1 w2\n", encoding="utf-8")  # fewer tokens than one block
    prepared = data.build_loaders("wikitext2", data_dir=tmp_path, vocab_size=300, block_size=64, batch_size=4)
    assert prepared.test is None and "test" not in prepared.info["blocks"]
