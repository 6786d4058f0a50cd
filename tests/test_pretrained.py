"""Saved models: pretrained.save_pretrained / from_pretrained (config.json + model.safetensors) for
the three families, their refusals, and benchmark.py's export (models/<run>/, tokenizer.json,
samples.md), resumed runs included, and the README's "Use a trained model" example."""

import hashlib
import json
import os
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

import benchmark
import config
import runs
import report
from baselines import MambaLM, TransformerLM
from data import PreparedData
from gam_model import CausalLM, GAM_Model, ModelConfig
from pretrained import HF_CODE_FILES, from_pretrained, save_pretrained

REPO = Path(__file__).resolve().parents[1]
CONFIG = dict(VOCAB_SIZE=40, BLOCK_SIZE=16, N_EMBED=16, N_LAYER=2, NUM_MEMORY_SLOTS=8, DROPOUT=0.1)
MODELS = {  # name -> (class, ModelConfig overrides, constructor arguments)
    "gam": (GAM_Model, {}, {}),
    "gam-sum-fusion": (GAM_Model, dict(USE_GATE=False), {}),
    "gam-local-only-k4": (GAM_Model, dict(USE_GATE=False, USE_GLOBAL=False, CONV_KERNEL_SIZE=4), {}),
    "transformer": (TransformerLM, {}, dict(n_head=4, attention="naive")),
    "transformer-conv1": (TransformerLM, {}, dict(n_head=2, attention="sdpa", conv_layers=1)),
    "conv-attention-control": (TransformerLM, {}, dict(n_head=1, conv_layers=1, ffn=False, embedding_std=0.02)),
    "mamba": (MambaLM, {}, dict(d_state=4, d_conv=3, expand=2, impl="torch")),
    "mamba-residual": (MambaLM, {}, dict(d_state=4, expand=2, residual=True, impl="torch")),
}


def make_model(name: str) -> CausalLM:
    """A model whose weights are not what any fresh build would give (so a load that does
    nothing cannot pass): every parameter shifted by seeded noise."""
    cls, overrides, kwargs = MODELS[name]
    torch.manual_seed(0)
    model = cls(ModelConfig(**CONFIG, **overrides), **kwargs)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def ids(batch=2, length=16) -> torch.Tensor:
    return torch.randint(0, CONFIG["VOCAB_SIZE"], (batch, length), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_gives_the_same_class_weights_and_logits(tmp_path, name):
    model = make_model(name)
    save_pretrained(model, tmp_path / "m")
    for expect in (None, type(model), CausalLM):  # any family, the family's class, a base of it
        loaded = from_pretrained(tmp_path / "m", expect=expect)
        assert type(loaded) is type(model) and loaded.config == model.config and not loaded.training
        assert loaded.family_config() == model.family_config()
        assert torch.equal(loaded(ids())[0], model(ids())[0])  # exact: the same weights, the same function
    if isinstance(model, MambaLM):
        assert loaded.implementation == "mamba-torch-chunked"


def test_tied_weights_are_stored_once_and_tied_after_load(tmp_path):
    model = make_model("gam")
    save_pretrained(model, tmp_path / "m")
    with safe_open(tmp_path / "m" / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        stored = sum(f.get_tensor(k).numel() for k in names)
    assert "head.weight" in names and "token_embedding.weight" not in names
    assert stored == model.num_params()  # every distinct parameter exactly once
    loaded = from_pretrained(tmp_path / "m", expect=GAM_Model)
    assert loaded.head.weight is loaded.token_embedding.weight
    with torch.no_grad():
        loaded.head.weight[0, 0] += 1.0  # one tensor: the embedding moves with the head
    assert loaded.token_embedding.weight[0, 0] == loaded.head.weight[0, 0]


def test_config_json_names_the_family_and_what_rebuilds_it(tmp_path):
    save_pretrained(make_model("mamba-residual"), tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["family"] == "mamba" and config["dtype"] == "float32"
    assert config["family_config"] == {"d_state": 4, "d_conv": 4, "expand": 2, "residual": True}
    assert config["model_config"] == ModelConfig(**CONFIG).to_dict()
    umask = os.umask(0)
    os.umask(umask)
    for path in (tmp_path / "m", *(tmp_path / "m").iterdir()):  # shared like any file: not mkdtemp's 0700
        assert path.stat().st_mode & 0o777 == (0o777 if path.is_dir() else 0o666) & ~umask, path


def test_keyword_arguments_choose_what_the_saved_function_leaves_open(tmp_path):
    save_pretrained(make_model("gam"), tmp_path / "gam")
    save_pretrained(make_model("transformer"), tmp_path / "tf")
    gam = from_pretrained(tmp_path / "gam", block_impl="reference", expect=GAM_Model).eval()
    tf = from_pretrained(tmp_path / "tf", attention="sdpa").eval()
    assert gam.block_impl == "reference" and tf.attention == "sdpa"
    torch.testing.assert_close(gam(ids())[0], make_model("gam")(ids())[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tf(ids())[0], make_model("transformer")(ids())[0], rtol=1e-5, atol=1e-5)


def test_weights_keep_their_dtype_and_the_rng_is_left_alone(tmp_path):
    model = make_model("gam").to(torch.float64)
    save_pretrained(model, tmp_path / "m")
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    loaded = from_pretrained(tmp_path / "m", device="cpu", expect=GAM_Model)
    assert torch.equal(torch.rand(3), expected)  # building the model drew no numbers from the global RNG
    assert loaded.head.weight.dtype == torch.float64
    assert torch.equal(loaded(ids())[0], model(ids())[0])


def test_another_family_is_refused_naming_the_class_to_use(tmp_path):
    save_pretrained(make_model("transformer"), tmp_path / "tf")
    save_pretrained(make_model("gam"), tmp_path / "gam")
    with pytest.raises(ValueError, match="holds a transformer model, not a GAM_Model.*expect=TransformerLM"):
        from_pretrained(tmp_path / "tf", expect=GAM_Model)
    with pytest.raises(ValueError, match="holds a gam model, not a MambaLM"):
        from_pretrained(tmp_path / "gam", expect=MambaLM)


def test_expect_a_subclass_builds_it_and_refuses_what_is_no_model_class(tmp_path):
    class MyGAM(GAM_Model):
        pass

    save_pretrained(make_model("gam"), tmp_path / "gam")
    loaded = from_pretrained(tmp_path / "gam", expect=MyGAM)
    assert type(loaded) is MyGAM and torch.equal(loaded(ids())[0], make_model("gam")(ids())[0])
    for expect in ("gam", GAM_Model(ModelConfig(**CONFIG)), torch.nn.Linear):
        with pytest.raises(ValueError, match="expect must be a model class"):
            from_pretrained(tmp_path / "gam", expect=expect)


def test_a_model_of_no_family_is_refused_before_anything_is_written(tmp_path):
    class Frame(CausalLM):  # a CausalLM that is none of baselines.FAMILIES
        def __init__(self, config):
            super().__init__(config, lambda: torch.nn.Identity())

    with pytest.raises(ValueError, match="has no family.*GAM_Model, TransformerLM, MambaLM"):
        save_pretrained(Frame(ModelConfig(**CONFIG)), tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_the_families_come_from_baselines_and_nothing_imports_pretrained():
    """baselines.FAMILIES is the table pretrained reads; gam_model and baselines do not import
    pretrained (no import circle), and gam_model needs only torch."""
    import subprocess

    code = ("import sys, baselines; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in {'pretrained', 'safetensors', 'transformers'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    import baselines

    assert baselines.MODEL_NAMES == tuple(baselines.FAMILIES) == ("gam", "transformer", "mamba")
    assert all(cls.family == name for name, cls in baselines.FAMILIES.items())


def rewrite_weights(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("blocks.1.memory_bank"), r"missing blocks\.1\.memory_bank"),
    (lambda t: t.update(extra=torch.zeros(2)), "unexpected extra"),
    (lambda t: t.update({"token_embedding.weight": t["head.weight"].clone()}), "unexpected token_embedding"),
    (lambda t: t.update({"ln_f.weight": torch.ones(8)}), "does not fit"),
])
def test_tensors_that_do_not_match_the_config_are_a_value_error(tmp_path, edit, message):
    save_pretrained(make_model("gam"), tmp_path / "m")
    rewrite_weights(tmp_path / "m", edit)
    with pytest.raises(ValueError, match=message) as e:
        from_pretrained(tmp_path / "m", expect=GAM_Model)
    assert "model.safetensors" in str(e.value) and "save_pretrained" in str(e.value)


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "config.json").unlink(), "config.json is missing"),
    (lambda f: (f / "config.json").write_text("{}"), "not a saved-model config"),
    (lambda f: (f / "model.safetensors").write_bytes(b"garbage"), "model.safetensors is unreadable"),
    (lambda f: (f / "model.safetensors").unlink(), "model.safetensors is unreadable"),
])
def test_a_damaged_folder_is_a_value_error(tmp_path, damage, message):
    save_pretrained(make_model("gam"), tmp_path / "m")
    damage(tmp_path / "m")
    with pytest.raises(ValueError, match=message):
        from_pretrained(tmp_path / "m")


def test_missing_safetensors_names_the_package(tmp_path, monkeypatch):
    model = make_model("gam")
    save_pretrained(model, tmp_path / "m")
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors now raises ImportError
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    for call in (lambda: save_pretrained(model, tmp_path / "n"), lambda: from_pretrained(tmp_path / "m")):
        with pytest.raises(ImportError, match="pip install safetensors"):
            call()
    assert not (tmp_path / "n").exists()


@pytest.mark.parametrize("extra, message", [
    pytest.param({"../escape.txt": "x"}, "not a plain file name", id="parent"),
    pytest.param({"/tmp/abs.txt": "x"}, "not a plain file name", id="absolute"),
    pytest.param({"sub/file.txt": "x"}, "not a plain file name", id="sub-folder"),
    pytest.param({"model.safetensors": b"x"}, "the model's own file", id="weights"),
    pytest.param({"config.json": "{}"}, "the model's own file", id="config"),
    pytest.param({"notes.txt": 3}, "give str or bytes", id="not-text"),
])
def test_extra_files_are_plain_names_with_text_or_bytes(tmp_path, extra, message):
    target = tmp_path / "inner" / "model"
    with pytest.raises(ValueError, match=message):
        save_pretrained(make_model("gam"), target, extra_files=extra)
    assert not (tmp_path / "inner").exists() and not (tmp_path / "escape.txt").exists()


def test_overwrite_policy(tmp_path):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "a.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no saved model"):
        save_pretrained(make_model("gam"), other)
    assert [p.name for p in other.iterdir()] == ["a.txt"]  # untouched
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        save_pretrained(make_model("gam"), tmp_path / "file")

    folder = tmp_path / "m"
    folder.mkdir()  # an empty folder is fine
    save_pretrained(make_model("gam"), folder, extra_files={"tokenizer.json": "{}", "notes.bin": b"\x00"})
    (folder / "README.md").write_text("kept")
    save_pretrained(make_model("transformer"), folder)  # a saved model is replaced, other files kept
    assert isinstance(from_pretrained(folder), TransformerLM)
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                                  "notes.bin", "README.md", "tokenizer_config.json", *HF_CODE_FILES}
    assert (folder / "README.md").read_text() == "kept" and (folder / "notes.bin").read_bytes() == b"\x00"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "m", "notes"]  # no temporary folder left


def test_a_failed_save_leaves_the_old_model(tmp_path, monkeypatch):
    folder = tmp_path / "m"
    save_pretrained(make_model("gam"), folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def disk_full(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)  # fails while writing the extra file
    with pytest.raises(OSError, match="No space left"):
        save_pretrained(make_model("transformer"), folder, extra_files={"notes.txt": "x"})
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def edit_config(folder: Path, edit) -> None:
    saved = json.loads((folder / "config.json").read_text())
    edit(saved)
    (folder / "config.json").write_text(json.dumps(saved))


@pytest.mark.parametrize("edit, message", [
    pytest.param(lambda c: c.update(dtype="int64"), "'int64' is not a floating-point torch dtype", id="int-dtype"),
    pytest.param(lambda c: c.update(dtype="not_a_dtype"), "is not a floating-point torch dtype", id="no-dtype"),
    pytest.param(lambda c: c["family_config"].update(bogus=1), r"arguments \['bogus'\] that GAM_Model does not take",
                 id="family-key"),
])
def test_a_config_edited_by_hand_is_a_value_error(tmp_path, edit, message):
    save_pretrained(make_model("gam"), tmp_path / "m")
    edit_config(tmp_path / "m", edit)
    with pytest.raises(ValueError, match=message):
        from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("device, message", [
    ("bogus", "'bogus' is not a torch device"),
    (3.5, "3.5 is not a torch device"),
    pytest.param("cuda", "CUDA is not available here", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_a_bad_device_is_a_value_error(tmp_path, device, message):
    save_pretrained(make_model("gam"), tmp_path / "m")
    with pytest.raises(ValueError, match=message):
        from_pretrained(tmp_path / "m", device=device)


def test_saving_under_a_file_is_a_value_error_and_writes_nothing(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="afile is a file, so no folder can be made under it"):
        save_pretrained(make_model("gam"), tmp_path / "afile" / "sub" / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"] and (tmp_path / "afile").read_text() == "x"


def test_saving_through_a_symlink_replaces_the_model_it_names_and_keeps_the_link(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    save_pretrained(make_model("gam"), tmp_path / "link")
    save_pretrained(make_model("transformer"), tmp_path / "link")  # replaces the saved GAM behind the link
    assert (tmp_path / "link").is_symlink() and isinstance(from_pretrained(tmp_path / "real"), TransformerLM)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # no temporary folder left
    (tmp_path / "file").write_text("x")
    (tmp_path / "to-file").symlink_to("file")
    with pytest.raises(ValueError, match="is a link to the file"):
        save_pretrained(make_model("gam"), tmp_path / "to-file")


def test_a_mount_point_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    # A rename cannot take a mount point's place (EBUSY): the save would fail half-way.
    mount = tmp_path / "mnt"
    mount.mkdir()
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == mount)
    with pytest.raises(ValueError, match=f"is a mount point.*{mount / 'model'}"):
        save_pretrained(make_model("gam"), mount)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnt"] and not any(mount.iterdir())


def test_a_failed_rename_leaves_no_old_folder(tmp_path, monkeypatch):
    folder = tmp_path / "m"
    save_pretrained(make_model("gam"), folder)
    real_replace = os.replace

    def busy(src, dst):
        if Path(src) == folder:
            raise OSError(16, "Device or resource busy")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", busy)
    with pytest.raises(OSError, match="busy"):
        save_pretrained(make_model("transformer"), folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"] and isinstance(from_pretrained(folder), GAM_Model)


def test_non_finite_weights_are_saved_and_loaded_with_a_warning_naming_them(tmp_path):
    model = make_model("gam")
    with torch.no_grad():
        model.blocks[1].memory_bank[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"blocks\.1\.memory_bank hold NaN or infinite values"):
        save_pretrained(model, tmp_path / "m")
    with pytest.warns(RuntimeWarning, match=r"model\.safetensors: weights blocks\.1\.memory_bank hold NaN"):
        from_pretrained(tmp_path / "m")


# ---------------------------------------------------------------------------------------------
# benchmark.py: models/<run>/ and samples.md


def trained_model(run: Path, model_name: str) -> CausalLM:
    """The trained model as the run's checkpoint holds it (independent of the export)."""
    cfg = config.TrainConfig.from_json(json.loads((run / "config.json").read_text()))
    record = next(r for r in json.loads((run / "results.json").read_text()) if r["model"] == model_name)
    model, _ = benchmark.build_model(cfg, model_name, record["data"]["vocab_size"], torch.device("cpu"), "torch")
    model.load_state_dict(torch.load(run / "checkpoints" / f"synthetic-{model_name}.pt", weights_only=True)["model"])
    return model.eval()


@pytest.mark.parametrize("model_name", ["transformer", "mamba", "gam"])
def test_benchmark_exports_each_model_with_its_tokenizer(smoke_run, model_name):
    folder = smoke_run / "models" / f"synthetic-{model_name}"
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                                  "tokenizer_config.json", "README.md", *HF_CODE_FILES}
    loaded = from_pretrained(folder, expect=GAM_Model if model_name == "gam" else None).eval()
    trained = trained_model(smoke_run, model_name)
    assert type(loaded) is type(trained)
    x = torch.randint(0, loaded.config.VOCAB_SIZE, (2, loaded.config.BLOCK_SIZE))
    assert torch.equal(loaded(x)[0], trained(x)[0])  # the trained model, exactly
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    fingerprint = json.loads((smoke_run / "config.json").read_text())["data_fingerprint"]["synthetic"]
    assert hashlib.sha256(tokenizer.to_str().encode()).hexdigest() == fingerprint["tokenizer"]  # the run's own
    assert tokenizer.get_vocab_size() == loaded.config.VOCAB_SIZE


def test_benchmark_writes_samples(smoke_run):
    records = json.loads((smoke_run / "results.json").read_text())
    prompts = records[0]["samples"]["prompts"]
    assert len(prompts) == runs.SAMPLE_PROMPTS and all(prompts)
    for r in records:
        s = r["samples"]
        assert r["export"] == f"models/synthetic-{r['model']}" and s["prompts"] == prompts  # the same prompts
        assert len(s["greedy"]) == len(s["sampled"]) == len(prompts) and all(s["greedy"]) and all(s["sampled"])
    text = (smoke_run / "samples.md").read_text()
    assert text == report.samples_markdown(records)
    for model_name in ("transformer", "mamba", "gam"):
        assert text.count(f"\n| {model_name} | ") == len(prompts)


def test_greedy_sample_is_the_model_argmax(smoke_run):
    """The recorded greedy continuation is what the exported model decodes greedily, step by step."""
    folder = smoke_run / "models" / "synthetic-gam"
    record = next(r for r in json.loads((smoke_run / "results.json").read_text()) if r["model"] == "gam")
    model, tokenizer = from_pretrained(folder, expect=GAM_Model), Tokenizer.from_file(str(folder / "tokenizer.json"))
    cfg = config.TrainConfig.from_json(record["config"])
    val = benchmark.load_dataset(cfg, "synthetic", smoke_run.parent.parent / "cache").validation.dataset.blocks
    idx = val[:1, :runs.SAMPLE_PROMPT_TOKENS]
    for _ in range(runs.SAMPLE_NEW_TOKENS):  # the reference: argmax of forward on the cropped context
        idx = torch.cat([idx, model(idx[:, -model.config.BLOCK_SIZE:])[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert tokenizer.decode(idx[0, runs.SAMPLE_PROMPT_TOKENS:].tolist()) == record["samples"]["greedy"][0]


def test_resume_republishes_the_same(smoke_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    shutil.rmtree(run / "models")
    (run / "samples.md").unlink()
    assert benchmark.main(["--resume", str(run), "--cache-dir", str(smoke_run.parent.parent / "cache")]) == 0
    capsys.readouterr()
    for name in ("samples.md", *(f"models/synthetic-{m}/{f}" for m in ("transformer", "mamba", "gam")
                                 for f in ("config.json", "model.safetensors", "tokenizer.json"))):
        assert (run / name).read_bytes() == (smoke_run / name).read_bytes(), name


def test_no_tokenizer_no_tokenizer_json_and_no_samples(tmp_path):
    """MQAR has no tokenizer: the model is exported alone and not sampled."""
    cfg = config.TrainConfig(out_dir=str(tmp_path), seed=0, seeds=(0,))
    record = {}
    no_tokenizer = PreparedData(None, None, None, {"tokenizer_path": None})
    runs.publish_model(cfg, "mqar", "gam", make_model("gam"), no_tokenizer, record)
    assert {p.name for p in (tmp_path / "models" / "mqar-gam").iterdir()} == {"config.json", "model.safetensors",
                                                                              "README.md", *HF_CODE_FILES}
    assert record == {"export": "models/mqar-gam"}


def test_a_changed_tokenizer_cache_is_refused(smoke_run, tmp_path):
    other = tmp_path / "tok.json"
    tok = Tokenizer.from_file(str(smoke_run / "models" / "synthetic-gam" / "tokenizer.json"))
    tok.add_tokens(["zzz"])
    tok.save(str(other))
    for path in (other, tmp_path / "gone.json"):
        data = types.SimpleNamespace(info={"tokenizer_path": str(path)}, fingerprint={"tokenizer": "0" * 64})
        with pytest.raises(runs.RunError, match="vanished or changed"):
            runs.run_tokenizer(str(tmp_path), data)


def test_samples_markdown_escapes_model_text():
    samples = {"prompts": ["a | b"], "greedy": ["*x*\nnew line"], "sampled": ["# [y](z)"],
               "new_tokens": 48, "temperature": 1.0, "seed": 0}
    text = report.samples_markdown([{"dataset": "d", "seed": 0, "model": "gam", "samples": samples}])
    assert "> a \\| b" in text and "| gam | \\*x\\* new line | \\# \\[y\\](z) |" in text
    assert report.samples_markdown([{"dataset": "mqar", "seed": 0, "model": "gam"}]) == ""


def test_readme_use_a_trained_model_runs(smoke_run, monkeypatch, capsys):
    """The README's "Use a trained model" block runs as written, on the folder a smoke run leaves."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Use a trained model", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "from_pretrained" in snippet and "runs/smoke/models/synthetic-gam" in snippet
    monkeypatch.chdir(smoke_run.parent.parent)
    exec(compile(snippet, "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out.strip()
    assert out.startswith("The weaver of the tower is") and len(out.split()) > 12  # prompt plus continuation
