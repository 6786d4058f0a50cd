"""The model card of an exported model: the README.md of ``<out-dir>/models/<run>/``, in the
Hugging Face Hub's form (YAML front matter, then Markdown).

>>> text = model_card(record, model)   # a finished benchmark.py record and its trained model

``runs.publish_model`` writes it beside the weights. Everything in it comes from the record
(data, tokenizer, settings, losses, hardware, commit) and the model (family, parameters,
receptive field), so a re-published model gets the same card.
"""

from __future__ import annotations

import json
import shlex

from config import MQAR_HPARAMS, PAPER_HPARAMS, PRESETS, flag
from data import HUB_SOURCES

__all__ = ["model_card"]

FAMILY_TEXT = {
    "gam": "a Gated Associative Memory (GAM) language model (R. Acharya, \"Gated Associative Memory: "
           "A Parallel O(N) Architecture for Efficient Sequence Modeling\", arXiv:2509.00605)",
    "transformer": "the paper's Transformer baseline (pre-norm GPT blocks)",
    "mamba": "the paper's Mamba baseline",
}


def model_card(record: dict, model) -> str:
    """The card: front matter (library_name, pipeline_tag, tags, datasets, metrics), what the
    model is, how it was trained and how well it does, and how to load it."""
    sections = [_front_matter(record, model), _summary(record, model), _facts(record, model)]
    if model.family == "gam":
        sections.append(_receptive_field(model))
    sections.append(_usage(record))
    return "\n\n".join(sections) + "\n"


def _front_matter(record: dict, model) -> str:
    hub = HUB_SOURCES.get(_data(record).get("source"))
    metrics = ["perplexity"] + (["accuracy"] if "final_recall_accuracy" in record else [])
    tags = ["gam-reproduction", model.family, "causal-lm", "custom_code"]
    if hub is None:
        tags.append("synthetic-data")
    meta = {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": tags,
            "datasets": [hub[0]] if hub else [], "metrics": metrics}
    # JSON values are valid YAML, so every value is written (and quoted) the same safe way.
    return "---\n" + "".join(f"{k}: {json.dumps(v)}\n" for k, v in meta.items()) + "---"


def _summary(record: dict, model) -> str:
    title = f"# {record.get('model', model.family)}" + (f" on {record['dataset']}" if "dataset" in record else "")
    how = "trained by this repository's `benchmark.py`" if "config" in record else "from this repository"
    return (f"{title}\n\nThis is {FAMILY_TEXT[model.family]}, {how} (`{model.implementation}`, "
            f"{model.num_params():,} parameters). It opens in Hugging Face transformers (custom code in this "
            "folder) and with the repository's `pretrained.from_pretrained`; both give the same logits.")


# The rows of the card's table: (name, text from the record and the model). A row whose information
# the record lacks (a partial or older record) is left out.
ROWS = [
    ("Family", lambda r, m: f"`{m.family}` ({type(m).__name__}), options {json.dumps(m.family_config())}"),
    ("Parameters", lambda r, m: f"{m.num_params():,} (tied embedding and head counted once)"),
    ("Model config", lambda r, m: ", ".join(f"{k}={v}" for k, v in m.config.to_dict().items())),
    ("Data", lambda r, m: _data_text(r)),
    ("Tokenizer", lambda r, m: _tokenizer_text(r["data"])),
    ("Training", lambda r, m: f"{len(r['epochs'])} epoch(s) of {r['steps_per_epoch']} steps, batch "
                              f"{r['config']['batch_size']}, lr {r['config']['lr']}, seed {r['seed']}, "
                              f"{r['config']['dtype']}"),
    ("Validation", lambda r, m: _loss_text(r, "val")),
    ("Test", lambda r, m: _loss_text(r, "test")),
    *((name, lambda r, m, key=key: f"{r[key]:.4f}") for name, key in (
        ("Recall accuracy", "final_recall_accuracy"),
        ("Recall accuracy, key within the receptive field", "final_recall_accuracy_within_rf"),
        ("Recall accuracy, key beyond the receptive field", "final_recall_accuracy_beyond_rf"))),
    ("Hardware", lambda r, m: _hardware_text(r)),
    ("Command", lambda r, m: f"`{training_command(r)}`"),
    ("Commit", lambda r, m: f"`{r['git_commit']}`"),
]


def _facts(record: dict, model) -> str:
    rows = []
    for name, text in ROWS:
        try:
            rows.append(f"| {name} | {_cell(text(record, model))} |\n")
        except (KeyError, TypeError):  # not in this record
            continue
    return "## The model\n\n| | |\n|---|---|\n" + "".join(rows).rstrip()


def _data(record: dict) -> dict:
    return record.get("data") or {}


def _data_text(record: dict) -> str:
    data, dataset = record["data"], record["dataset"]
    hub = HUB_SOURCES.get(data.get("source"))
    where = (f"`{hub[0]}`" + (f" (`{hub[1]}`)" if hub[1] else "")) if hub else "generated in code (synthetic.py)"
    tokens = ", ".join(f"{split} {n:,}" for split, n in (data.get("tokens") or {}).items())
    return f"{dataset}: {where}" + (f"; tokens: {tokens}" if tokens else "")


def _tokenizer_text(data: dict) -> str:
    if data.get("tokenizer_path") is None:
        return "none: the inputs are token ids (no tokenizer.json)"
    splits = data.get("tokenizer_splits") or ["train"]
    splits = " and ".join(splits) if isinstance(splits, (list, tuple)) else str(splits)
    return (f"BPE over whitespace-split words, {data['vocab_size']:,} tokens, trained on the "
            f"{splits} split(s); special tokens [UNK] [PAD] [SOS] [EOS] "
            "(none added when encoding); `tokenizer.json`, no decoder (decoded tokens are joined by spaces)")


def _loss_text(record: dict, split: str) -> str:
    return f"loss {record[f'final_{split}_loss']:.4f}, PPL {record[f'final_{split}_ppl']:.2f} (after the last epoch)"


def _hardware_text(record: dict) -> str:
    world = record.get("world_size", 1)
    return record["device_name"] + (f", {world} processes" if world > 1 else "")


def training_command(record: dict) -> str:
    """A command that trains this model again: the run's preset, this dataset, model and seed,
    and a flag for every setting that differs from what the preset gives."""
    cfg, dataset = record["config"], record["dataset"]
    preset = {k: v for k, v in PRESETS[cfg["preset"]].items() if k != "runs"}
    world = record.get("world_size", 1)
    start = ["python"] if world == 1 else ["torchrun", "--nproc_per_node", str(world)]
    command = [*start, "benchmark.py", "--preset", cfg["preset"], "--datasets", dataset, "--models", record["model"]]
    for key, default in {**PAPER_HPARAMS, **MQAR_HPARAMS, **preset}.items():
        value = record["seed"] if key == "seed" else cfg.get(key, default)
        if value == default or value is None:  # None (all blocks) is every default that can be None
            continue
        if isinstance(value, bool):
            command.append(flag(key) if value else "--no-" + flag(key)[2:])
        else:
            command += [flag(key), str(value)]
    if cfg.get("mamba_impl", "auto") != "auto":
        command += ["--mamba-impl", cfg["mamba_impl"]]
    if dataset in (cfg.get("data_dirs") or {}):
        command += ["--data-dir", f"{dataset}={cfg['data_dirs'][dataset]}"]
    return shlex.join(command)


def _receptive_field(model) -> str:
    c, n = model.config, model.receptive_field
    rule = (f"N_LAYER * (k - 1) + 1 = {c.N_LAYER} * ({c.CONV_KERNEL_SIZE} - 1) + 1 = {n}" if c.USE_LOCAL
            else "1: this variant has no convolution")
    return ("## Receptive field\n\n"
            f"The logits at position t depend on at most the last **{n} tokens** (t included; {rule}) plus "
            "the absolute position t. The memory bank is shared by every position and every sequence, so the "
            "global pathway is a per-token function; only the causal convolutions (kernel k) move information "
            f"across time. However long the context (up to BLOCK_SIZE = {c.BLOCK_SIZE}), nothing further back "
            "than that changes a prediction; `generate` past BLOCK_SIZE re-encodes just those tokens.")


def _usage(record: dict) -> str:
    tokenizer = _data(record).get("tokenizer_path") is not None
    hf = ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
          'folder = "."  # this folder',
          "model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)"]
    if tokenizer:
        hf += ["tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)",
               'ids = tokenizer("The", return_tensors="pt").input_ids',
               "out = model.generate(ids, max_new_tokens=16, do_sample=False)",
               "print(tokenizer.decode(out[0], skip_special_tokens=True))"]
    repo = ["from pretrained import from_pretrained  # in a checkout of the repository", "",
            'model = from_pretrained(".")  # the same weights as the repository\'s model class']
    return ("## Use\n\nWith transformers (the folder's `hf_model.py` wraps the repository's model code, "
            "copied beside it):\n\n```python\n" + "\n".join(hf) + "\n```\n\n"
            "With the repository:\n\n```python\n" + "\n".join(repo) + "\n```")


def _cell(text: str) -> str:
    """A Markdown table cell: pipes escaped, on one line."""
    return " ".join(str(text).split()).replace("|", "\\|")
