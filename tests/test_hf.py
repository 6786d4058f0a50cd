"""Hugging Face transformers: every folder pretrained.save_pretrained writes opens with
AutoModelForCausalLM / AutoTokenizer / pipeline (trust_remote_code, the folder's hf_model.py),
with the logits of pretrained.from_pretrained and the tokens of the repository's generate; the
folders save again through transformers; saving needs no transformers; benchmark.py's exports
open in a fresh process and carry a model card; the README's transformers example runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import BPE
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.trainers import BpeTrainer

import config
import pretrained
from data import SPECIAL_TOKENS
from model_card import model_card, training_command
from pretrained import from_pretrained, save_pretrained
from test_pretrained import CONFIG, MODELS, ids, make_model

transformers = pytest.importorskip("transformers", exc_type=ModuleNotFoundError)
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, pipeline  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FAMILY_MODELS = ["gam", "transformer", "mamba"]  # one model of each family (MODELS has the variants)
TEXT = ["the cat sat on the mat .", "a dog ran to the cat .", "the dog sat on a mat and the cat ran .",
        "cats and dogs ran to the mats .", "the weaver of the tower is mavet . mavet has a cat ."]
PROMPT = "the cat sat on"


def auto_model(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """A BPE tokenizer made as data.py makes them, with exactly CONFIG's vocabulary."""
    tok = Tokenizer(BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    trainer = BpeTrainer(special_tokens=list(SPECIAL_TOKENS), vocab_size=CONFIG["VOCAB_SIZE"], show_progress=False)
    tok.train_from_iterator(TEXT, trainer=trainer)
    assert tok.get_vocab_size() == CONFIG["VOCAB_SIZE"]
    return tok


def saved(tmp_path: Path, name: str, tokenizer: Tokenizer | None = None) -> Path:
    folder = tmp_path / name
    save_pretrained(make_model(name), folder, extra_files={"tokenizer.json": tokenizer.to_str()} if tokenizer else None)
    return folder


@pytest.mark.parametrize("name", list(MODELS))
def test_auto_model_gives_the_logits_of_from_pretrained(tmp_path, name):
    folder = saved(tmp_path, name)
    model, reference = auto_model(folder), from_pretrained(folder)
    assert type(model).__name__ == "GAMReproductionForCausalLM" and not model.training
    assert type(model.lm).__name__ == type(reference).__name__ and model.lm.family_config() == reference.family_config()
    assert model.token_embedding.weight is model.head.weight  # tied after loading, one tensor
    logits = model(ids()).logits
    assert logits.dtype == reference.head.weight.dtype and torch.equal(logits, reference(ids())[0])


def test_the_saved_dtype_is_kept(tmp_path):
    folder = tmp_path / "m"
    save_pretrained(make_model("gam").to(torch.float64), folder)
    model = auto_model(folder)
    assert model.dtype == torch.float64 and torch.equal(model(ids()).logits, from_pretrained(folder)(ids())[0])


@pytest.mark.parametrize("name", list(MODELS))
def test_generate_gives_the_tokens_of_the_repository(tmp_path, name):
    """Greedy, with the decoding state as the cache and re-encoding, past BLOCK_SIZE too (16)."""
    folder = saved(tmp_path, name)
    model, reference = auto_model(folder), from_pretrained(folder)
    prompt = ids(batch=2, length=5)
    expected = reference.generate(prompt, 15, top_k=1)                      # (2, 20)
    for use_cache in (True, False):
        out = model.generate(prompt, max_new_tokens=15, do_sample=False, use_cache=use_cache)
        assert torch.equal(out, expected), use_cache
    torch.manual_seed(0)
    sampled = model.generate(prompt, max_new_tokens=15, do_sample=True, top_k=5, temperature=0.8)
    assert sampled.shape == expected.shape and torch.equal(sampled[:, :5], prompt)
    assert 0 <= int(sampled.min()) and int(sampled.max()) < CONFIG["VOCAB_SIZE"]
    assert torch.equal(model.generate(prompt, max_new_tokens=15, do_sample=True, top_k=1), expected)


def test_the_cache_never_changes_the_tokens(tmp_path):
    """Beam search reorders the sequences between steps: the state then re-encodes (same result)."""
    model = auto_model(saved(tmp_path, "gam"))
    prompt = ids(batch=1, length=4)
    kwargs = dict(max_new_tokens=6, num_beams=3, do_sample=False)
    with_cache, without = (model.generate(prompt, use_cache=u, **kwargs) for u in (True, False))
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_tokenizer_and_pipeline(tmp_path, name, tokenizer):
    folder = saved(tmp_path, name, tokenizer)
    auto_tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    assert isinstance(auto_tokenizer, PreTrainedTokenizerFast)
    assert [auto_tokenizer.unk_token, auto_tokenizer.pad_token, auto_tokenizer.bos_token,
            auto_tokenizer.eos_token] == list(SPECIAL_TOKENS)
    text = " ".join(TEXT) + " zebra"  # an unknown word too
    for tok in (auto_tokenizer, AutoTokenizer.from_pretrained(folder, trust_remote_code=False)):
        assert tok(text).input_ids == tokenizer.encode(text).ids  # no special tokens added, as data.py
    assert auto_tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=True) == tokenizer.decode(
        tokenizer.encode(text).ids)
    generator = pipeline("text-generation", model=str(folder), trust_remote_code=True)
    prompt = torch.tensor([tokenizer.encode(PROMPT).ids])
    expected = from_pretrained(folder).generate(prompt, 16, top_k=1)[0].tolist()
    greedy = generator(PROMPT, max_new_tokens=16, do_sample=False, return_tensors=True)
    assert greedy[0]["generated_token_ids"] == expected
    sampled = generator(PROMPT, max_new_tokens=8, do_sample=True)
    assert sampled[0]["generated_text"].startswith(PROMPT)


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_transformers_save_pretrained_round_trip(tmp_path, name, tokenizer):
    folder = saved(tmp_path, name, tokenizer)
    model = auto_model(folder)
    model.save_pretrained(tmp_path / "again")
    AutoTokenizer.from_pretrained(folder, trust_remote_code=True).save_pretrained(tmp_path / "again")
    again, reference = auto_model(tmp_path / "again"), from_pretrained(folder)
    assert again.token_embedding.weight is again.head.weight
    assert torch.equal(again(ids()).logits, reference(ids())[0])
    assert torch.equal(from_pretrained(tmp_path / "again")(ids())[0], reference(ids())[0])  # still the repository's
    tok = AutoTokenizer.from_pretrained(tmp_path / "again", trust_remote_code=True)
    assert tok(PROMPT).input_ids == tokenizer.encode(PROMPT).ids


def test_labels_give_the_shifted_loss_and_padding_is_refused(tmp_path):
    folder = saved(tmp_path, "gam")
    model, reference = auto_model(folder), from_pretrained(folder)
    x = ids()
    torch.testing.assert_close(model(x, labels=x).loss, reference(x[:, :-1], x[:, 1:])[1])
    mask = torch.ones_like(x)
    assert torch.equal(model(x, attention_mask=mask).logits, model(x).logits)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="padding"):
        model(x, attention_mask=mask)
    model.train()
    assert model.training and model.lm.training and model.blocks[0].training


def test_saving_and_loading_need_no_transformers(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    with pytest.raises(ImportError):
        import transformers  # noqa: F401
    model = make_model("transformer")
    save_pretrained(model, tmp_path / "m", extra_files={"tokenizer.json": tokenizer.to_str()})
    assert {p.name for p in (tmp_path / "m").iterdir()} == {
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", *pretrained.HF_CODE_FILES}
    assert torch.equal(from_pretrained(tmp_path / "m")(ids())[0], model(ids())[0])
    code = (tmp_path / "m" / "baselines.py").read_text()
    assert "from .gam_model import" in code and "\nfrom gam_model import" not in code  # a package inside the folder


def test_config_json_keeps_its_keys_and_names_the_transformers_classes(tmp_path):
    import hf_model

    save_pretrained(make_model("mamba"), tmp_path / "m")
    saved_config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert {"format", "family", "model_config", "family_config", "dtype", "tied_weights"} <= set(saved_config)
    assert saved_config["model_type"] == hf_model.MODEL_TYPE == hf_model.GAMReproductionConfig.model_type
    assert saved_config["format"] == pretrained.PRETRAINED_FORMAT == hf_model.PRETRAINED_FORMAT
    for auto, reference in saved_config["auto_map"].items():
        module, name = reference.split(".")
        assert module == "hf_model" and hasattr(hf_model, name)
    assert saved_config["vocab_size"] == CONFIG["VOCAB_SIZE"] and saved_config["max_position_embeddings"] == 16
    assert set(pretrained.SPECIAL_TOKEN_ROLES.values()) == set(SPECIAL_TOKENS)


def test_a_folder_written_before_the_transformers_files_still_loads(tmp_path):
    """What save_pretrained wrote before: config.json with the repository's keys only, the weights."""
    model = make_model("gam")
    save_pretrained(model, tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    old_keys = ("format", "family", "model_config", "family_config", "dtype", "tied_weights")
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k in old_keys}))
    for name in pretrained.HF_CODE_FILES:
        (tmp_path / "m" / name).unlink()
    assert torch.equal(from_pretrained(tmp_path / "m")(ids())[0], model(ids())[0])


# ---------------------------------------------------------------------------------------------
# benchmark.py's exports


FRESH_PROCESS = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folders, x = json.loads(sys.argv[1]), torch.tensor(json.loads(sys.argv[2]))
out = {}
for folder in folders:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    assert model.token_embedding.weight is model.head.weight
    out[folder] = {"logits": model(x).logits, "ids": tokenizer("the weaver of the tower").input_ids,
                   "greedy": model.generate(x[:1, :8], max_new_tokens=12, do_sample=False)}
assert not any(m in sys.modules for m in ("gam_model", "baselines", "pretrained"))  # the folders' copies only
torch.save(out, sys.argv[3])
"""


def test_the_exports_open_in_a_fresh_process(smoke_run, tmp_path):
    """One process without the repository on its path opens the three exports."""
    folders = [str(smoke_run / "models" / f"synthetic-{m}") for m in ("transformer", "mamba", "gam")]
    vocab, block = from_pretrained(folders[0]).config.VOCAB_SIZE, from_pretrained(folders[0]).config.BLOCK_SIZE
    x = torch.randint(0, vocab, (2, block), generator=torch.Generator().manual_seed(0))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", FRESH_PROCESS, json.dumps(folders), json.dumps(x.tolist()),
                    str(tmp_path / "out.pt")], cwd=tmp_path, env=env, check=True, capture_output=True, text=True)
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    for folder in folders:
        reference = from_pretrained(folder)
        assert torch.equal(out[folder]["logits"], reference(x)[0]), folder
        assert torch.equal(out[folder]["greedy"], reference.generate(x[:1, :8], 12, top_k=1)), folder
        tokenizer = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
        assert out[folder]["ids"] == tokenizer.encode("the weaver of the tower").ids


def front_matter(card: str) -> dict:
    head, _, _ = card.removeprefix("---\n").partition("\n---\n")
    return {key: json.loads(value) for key, value in (line.split(": ", 1) for line in head.splitlines())}


@pytest.mark.parametrize("model_name", ["transformer", "mamba", "gam"])
def test_an_export_has_a_model_card(smoke_run, model_name):
    folder = smoke_run / "models" / f"synthetic-{model_name}"
    record = next(r for r in json.loads((smoke_run / "results.json").read_text()) if r["model"] == model_name)
    card = (folder / "README.md").read_text()
    meta = front_matter(card)
    assert set(meta) == {"library_name", "pipeline_tag", "tags", "datasets", "metrics"}
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert model_name in meta["tags"] and meta["datasets"] == [] and meta["metrics"] == ["perplexity"]
    model = from_pretrained(folder)
    for fact in (f"{model.num_params():,}", type(model).__name__, f"{record['final_val_loss']:.4f}",
                 f"{record['final_val_ppl']:.2f}", record["device_name"], training_command(record),
                 "BPE", "[SOS]"):
        assert fact in card, fact
    assert ("## Receptive field" in card) == (model_name == "gam")
    if model_name == "gam":
        assert f"at most the last **{model.receptive_field} tokens**" in card and "absolute position" in card


def test_the_card_command_trains_the_same_model(smoke_run, tmp_path):
    """The card's command, parsed as benchmark.py parses it, gives the run's settings for this model."""
    record = next(r for r in json.loads((smoke_run / "results.json").read_text()) if r["model"] == "gam")
    argv = training_command(record).split()
    assert argv[:2] == ["python", "benchmark.py"]
    parser = config.build_parser()
    args = parser.parse_args([*argv[2:], "--out-dir", str(tmp_path / "again")])
    cfg = config.resolve_config(args, config.explicit_flags(parser, args))
    keys = [*config.PAPER_HPARAMS, *config.MQAR_HPARAMS, "preset", "mamba_impl"]
    assert {k: getattr(cfg, k) for k in keys} == {k: record["config"][k] for k in keys}
    assert cfg.runs == {"synthetic": ["gam"]}


def test_a_card_shows_test_loss_and_leaves_out_what_the_record_lacks(smoke_run):
    record = next(r for r in json.loads((smoke_run / "results.json").read_text()) if r["model"] == "gam")
    model = from_pretrained(smoke_run / "models" / "synthetic-gam")
    card = model_card({**record, "final_test_loss": 1.5, "final_test_ppl": 4.48}, model)
    assert "| Test | loss 1.5000, PPL 4.48" in card
    bare = model_card({}, model)  # a record without training facts: what the model says, no more
    assert bare.startswith("---\n") and "| Parameters |" in bare and "| Validation |" not in bare


def test_readme_transformers_example_runs(smoke_run, monkeypatch, capsys):
    """The README's transformers block of "Use a trained model" runs as written on an export."""
    section = (REPO / "README.md").read_text().split("## Use a trained model", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```python\n")[1:]]
    snippet = next(b for b in blocks if "AutoModelForCausalLM" in b)
    assert "trust_remote_code=True" in snippet and "runs/smoke/models/synthetic-gam" in snippet
    monkeypatch.chdir(smoke_run.parent.parent)
    exec(compile(snippet, "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out.strip()
    assert out.startswith("The weaver of the tower is") and len(out.split()) > 12
