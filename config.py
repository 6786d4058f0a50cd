"""benchmark.py's settings: the paper's hyperparameters, the presets, the command line, and
the checks that a run's settings (from flags or a saved config.json) make sense.

A run's settings resolve as paper defaults < preset < explicit flags, or come from the saved
config.json on --resume; either way they pass the same checks before anything is written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields, make_dataclass, replace
from pathlib import Path

import torch

import distributed
from baselines import MAMBA_IMPLS, MODEL_NAMES
from common import OneLineParser, UsageError, int_at_least, one_line
from gam_model import ModelConfig


# The Table 3 switches of each GAM variant.
GAM_VARIANTS = {
    "gam": dict(USE_GATE=True, USE_LOCAL=True, USE_GLOBAL=True),
    "gam-global-only": dict(USE_GATE=False, USE_LOCAL=False, USE_GLOBAL=True),
    "gam-sum-fusion": dict(USE_GATE=False, USE_LOCAL=True, USE_GLOBAL=True),
    "gam-local-only": dict(USE_GATE=False, USE_LOCAL=True, USE_GLOBAL=False),
}
# Controls: models that are not the paper's, each a family with other options. The attention
# control of the recall task is Zoology's MQAR attention baseline in this frame: layer 0 a
# causal convolution (GAM's local pathway), then one-head attention, no FFN, embeddings drawn
# from N(0, 0.02) (baselines.TransformerLM); with 2 layers, one attention layer.
CONTROLS = {"conv-attention": ("transformer", dict(conv_layers=1, n_head=1, ffn=False, embedding_std=0.02))}
MODELS = [*GAM_VARIANTS, *CONTROLS, *(f for f in MODEL_NAMES if f != "gam")]
DATASETS = ["wikitext2", "tinystories", "synthetic", "mqar"]
GENERATED = ("synthetic", "mqar")  # generated in code: no hub, no --data-dir
# The paper's training setup (its section 4; the same values as the author's benchmark.py).
PAPER_HPARAMS = dict(
    vocab_size=10000, block_size=256, n_embed=512, n_layer=6, n_head=8, dropout=0.1,
    num_memory_slots=512, conv_kernel_size=3, d_state=16, d_conv=4, expand=3,
    batch_size=32, lr=3e-4, beta1=0.9, beta2=0.95, weight_decay=0.1, warmup_steps=100,
    epochs=5, grad_clip=1.0, max_train_rows=50000, max_val_rows=5000, max_train_blocks=None,
    tokenizer_splits="train", attention="naive", mamba_residual=False, seed=1337,
    dtype="fp32", compile=False,
)
# The associative-recall task (--datasets mqar): Zoology's MQAR (Arora et al., 2023). vocab_size and
# block_size set its vocabulary and sequence length.
MQAR_HPARAMS = dict(mqar_kv_pairs=4, mqar_train_examples=40000, mqar_val_examples=1000)
CHOICES = {"tokenizer_splits": ["train", "all"], "attention": ["naive", "sdpa"],
           "mamba_impl": list(MAMBA_IMPLS), "dtype": ["fp32", "bf16", "fp16"]}
PRESETS = {
    # Table 1 as reported: Mamba only on WikiText-2.
    "paper": dict(runs={"wikitext2": ["transformer", "mamba", "gam"], "tinystories": ["transformer", "gam"]}),
    # Table 3: the four GAM variants on WikiText-2.
    "ablation": dict(runs={"wikitext2": list(GAM_VARIANTS)}),
    # Embedded corpus and tiny models: an end-to-end check that needs no network or files.
    "smoke": dict(
        runs={"synthetic": ["transformer", "mamba", "gam"]},
        vocab_size=1000, block_size=128, n_embed=64, n_layer=2, n_head=4, num_memory_slots=64,
        d_state=8, expand=2, batch_size=16, lr=5e-3, warmup_steps=20, epochs=5,
    ),
    # Associative recall (MQAR), generated in code. GAM's receptive field is 5 tokens here. 102,400
    # distinct examples, of which each epoch draws 12,800 at random (200 steps of 64): mostly fresh
    # examples, as Zoology's 100,000, so that a model learns the lookup instead of memorising a
    # small set. conv-attention is the positive control (a model that can do the task).
    "recall": dict(
        runs={"mqar": ["conv-attention", "transformer", "mamba", "gam"]},
        vocab_size=1024, block_size=64, n_embed=64, n_layer=2, n_head=4, num_memory_slots=64, d_state=8,
        expand=2, dropout=0.0, batch_size=64, lr=3e-3, warmup_steps=100, epochs=8, max_train_blocks=12800,
        mqar_kv_pairs=4, mqar_train_examples=102400, mqar_val_examples=1000,
    ),
    # WikiText-2 from local files, models scaled down to fit 2 CPU cores in < 30 minutes.
    "cpu": dict(
        runs={"wikitext2": ["transformer", "mamba", "gam"]},
        vocab_size=4096, block_size=128, n_embed=128, n_layer=2, n_head=4, num_memory_slots=128,
        d_state=8, expand=2, batch_size=16, lr=3e-3, warmup_steps=50, epochs=2, max_train_blocks=8000,
    ),
}


@dataclass(frozen=True)
class TrainConfig(make_dataclass("HParams", [(k, object, v) for k, v in {**PAPER_HPARAMS, **MQAR_HPARAMS}.items()],
                                 frozen=True)):
    """One benchmark.py command's settings, fixed before it starts: a field per hyperparameter
    (PAPER_HPARAMS, MQAR_HPARAMS: the flags, of the same names), then what the command runs.
    ``seed`` is the seed of the (dataset, seed, model) run at hand (``for_seed``); what a run
    learns while it goes (the data's fingerprints, its progress) lives beside it."""
    preset: str = "paper"
    seeds: tuple = (PAPER_HPARAMS["seed"],)  # one run per seed, each with its own init and data order
    mamba_impl: str = "auto"
    runs: dict = field(default_factory=dict)       # dataset -> model names
    data_dirs: dict = field(default_factory=dict)  # dataset -> local folder (else the hub)
    out_dir: str = ""                              # the run folder
    num_workers: int = 0                           # data-loader processes (changes no number)
    world_size: int = 1                            # processes under torchrun

    def for_seed(self, seed: int) -> "TrainConfig":
        return replace(self, seed=seed)

    def to_json(self) -> dict:
        """As config.json and results.json hold it (the seeds as a list)."""
        return {**asdict(self), "seeds": list(self.seeds)}

    @classmethod
    def from_json(cls, saved: dict) -> "TrainConfig":
        """From a validated dict of every key (validate_config), without the data's fingerprints."""
        return cls(**{k: tuple(v) if k == "seeds" else v for k, v in saved.items() if k != "data_fingerprint"})


# What a run records beside the hyperparameters; config.json also holds "data_fingerprint".
RUN_KEYS = [f.name for f in fields(TrainConfig) if f.name not in {**PAPER_HPARAMS, **MQAR_HPARAMS}]
# Flags that may change on --resume: none of them changes the numbers.
RESUME_FLAGS = {"resume", "device", "wandb", "wandb_project", "num_workers", "cache_dir", "dist_timeout"}
MAX_VOCAB = 2**20
MAX_SEED = 2**63  # torch.manual_seed and the sampler's generator take seeds below this


HELP = {
    "max_train_blocks": "train on at most this many (shuffled) blocks per epoch; ",
    "max_train_rows": "row cap of the train split (as the author's code); ",
    "max_val_rows": "row cap of the validation split; ",
    "seed": "seeds model init, dropout and shuffling; the paper used no seed; ",
    "compile": "torch.compile the model (Module.compile: the numbers stay, only the speed changes); ",
    "grad_clip": "clip the gradient norm to this; 0 = no clipping (nanoGPT's convention); ",
    "vocab_size": f"BPE vocabulary size (MQAR: the task's vocabulary), at most {2**20:,}; ",
}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="benchmark.py",
        description="Reproduce Table 1 / Table 3 of the GAM paper. Defaults are the paper's; "
                    "a preset changes some of them; explicit flags override the preset.",
        epilog="presets: paper = Table 1 (WikiText-2: Transformer, Mamba, GAM; TinyStories: Transformer, GAM); "
               "ablation = Table 3 (four GAM variants on WikiText-2); smoke = embedded synthetic corpus, "
               "tiny models, no network (~2 min on 2 CPU cores); cpu = WikiText-2 from --data-dir with "
               "models scaled down for 2 CPU cores (< 30 min); recall = multi-query associative recall "
               "(MQAR): an attention control, Transformer, Mamba and GAM, recall accuracy within and beyond "
               "GAM's receptive field (1,600 steps of 64 examples). "
               "Exit codes: 0 done, 1 failed while training, 2 bad input (nothing written; a folder in use "
               "or not empty included), 130 interrupted (Ctrl-C) and 143 stopped (SIGTERM), both printing "
               "the --resume command.",
    )
    p.add_argument("--preset", choices=list(PRESETS), default="paper", help="default: paper")
    p.add_argument("--datasets", nargs="+", choices=DATASETS, help="override the preset's datasets")
    p.add_argument("--models", nargs="+", choices=MODELS, help="override the preset's models")
    p.add_argument("--data-dir", nargs="+", metavar="[NAME=]DIR",
                   help="read a dataset from local files instead of the Hugging Face Hub; "
                        "NAME=DIR per dataset, or a bare DIR when one hub dataset is selected")
    add_hparam_flags(p.add_argument_group("model and training (default: the paper's value, or the preset's)"))
    add_mqar_flags(p)
    p.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                   help="run every (dataset, model) once per seed (overrides --seed); tables show mean ± std")
    p.add_argument("--mamba-impl", choices=CHOICES["mamba_impl"], default="auto",
                   help="mamba_ssm's CUDA kernels, or the pure-PyTorch mixer (torch); "
                        "auto: mamba_ssm when it imports and the device is CUDA")
    add_run_flags(p)
    add_mode_flags(p)
    return p


def add_mqar_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("associative recall (--datasets mqar; --vocab-size and --block-size set its "
                             "vocabulary and sequence length)")
    g.add_argument("--mqar-kv-pairs", type=int, default=None, metavar="P",
                   help=f"key-value pairs per example, each queried once (default {MQAR_HPARAMS['mqar_kv_pairs']})")
    g.add_argument("--mqar-train-examples", type=int, default=None, metavar="N",
                   help=f"training examples (default {MQAR_HPARAMS['mqar_train_examples']})")
    g.add_argument("--mqar-val-examples", type=int, default=None, metavar="N",
                   help=f"validation examples (default {MQAR_HPARAMS['mqar_val_examples']})")


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """Where the run goes and how it runs: none of these changes a number."""
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--out-dir", help="a new or empty folder; default: runs/<timestamp>")
    p.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR with its saved config")
    p.add_argument("--cache-dir", default=None, help="tokenizer cache; default: <repo>/.cache")
    p.add_argument("--num-workers", type=int, default=0,
                   help="DataLoader worker processes (the data order, and so the numbers, do not depend on it)")
    p.add_argument("--wandb", choices=["online", "offline", "disabled"], default=None,
                   help="default: online when logged in to wandb (offline, with a warning, when its server "
                        "cannot be reached), else disabled")
    p.add_argument("--wandb-project", default="gam-reproduction")
    p.add_argument("--dist-timeout", type=positive_seconds, default=distributed.DEFAULT_TIMEOUT_S,
                   metavar="SECONDS",
                   help="under torchrun: how long a process waits for the others at a collective before "
                        "the job fails (bounds the hang when one dies)")


def add_mode_flags(p: argparse.ArgumentParser) -> None:
    """Commands that train nothing, or only time the training."""
    p.add_argument("--unigram-only", action="store_true",
                   help="prepare the data, write the unigram reference PPL to unigram.json, train nothing")
    p.add_argument("--report", nargs="+", metavar="RUN_DIR",
                   help="train nothing: read the results.json of these finished runs (e.g. one per model or "
                        "seed, same settings), check they agree, and write their tables and plots together "
                        "into --out-dir")
    p.add_argument("--lr-sweep", action="store_true",
                   help="with --report: the runs form a learning-rate sweep (they may differ in --lr only); "
                        "write lr_sweep.md (each model's validation and test PPL per lr, its best by "
                        "validation loss) and lr_sweep.png instead of the tables")
    p.add_argument("--speed-steps", type=int_at_least(1), default=None, metavar="N",
                   help="measure training speed only: N timed optimizer steps per model on random tokens "
                        "(batch, length and models of the run), models interleaved step by step; writes "
                        "speed.json and speed.md; needs no data")


def positive_seconds(s: str) -> float:
    """An argparse type: a finite number of seconds > 0 (a timeout of 0, inf or NaN never ends well)."""
    try:
        v = float(s)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {s!r}")
    return v


def add_hparam_flags(g) -> None:
    """One flag per hyperparameter of the paper, default None (= the preset's or the paper's)."""
    for name, value in PAPER_HPARAMS.items():
        option = flag(name)
        if isinstance(value, bool):
            g.add_argument(option, action=argparse.BooleanOptionalAction, default=None,
                           help=HELP.get(name, "") + f"paper: {value}")
        elif name == "dtype":
            g.add_argument(option, choices=CHOICES[name], default=None,
                           help="forward passes under torch.autocast in bf16 or fp16 (fp16 with a GradScaler "
                                "on CUDA), or plain fp32. paper: fp32")
        elif name == "tokenizer_splits":
            g.add_argument(option, choices=CHOICES[name], default=None,
                           help="train the tokenizer on the train split (the paper) or on all splits "
                                "(the author's code). paper: train")
        elif name == "attention":
            g.add_argument(option, choices=CHOICES[name], default=None,
                           help="Transformer attention: naive (what the paper timed) or fused SDPA")
        else:
            kind = float if isinstance(value, float) else int
            g.add_argument(option, type=kind, default=None, metavar=name.upper(),
                           help=HELP.get(name, "") + f"paper: {'all' if value is None else value}")


def explicit_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> set[str]:
    return {k for k, v in vars(args).items() if v is not None and v != parser.get_default(k)}


def resolve_config(args: argparse.Namespace, explicit: set[str]) -> TrainConfig:
    """Paper defaults < preset < explicit flags, or the saved config on --resume; validated."""
    if args.resume:
        return saved_config(Path(args.resume), args, explicit)
    for name in ("datasets", "models", "seeds"):
        values = getattr(args, name) or []
        twice = sorted({str(v) for v in values if values.count(v) > 1})
        if twice:
            raise UsageError(f"{flag(name)}: {', '.join(twice)} given twice")
    cfg = {**PAPER_HPARAMS, **MQAR_HPARAMS}
    preset = dict(PRESETS[args.preset])
    runs = preset.pop("runs")
    cfg.update(preset)
    cfg.update({k: getattr(args, k) for k in [*PAPER_HPARAMS, *MQAR_HPARAMS] if getattr(args, k) is not None})
    if args.datasets or args.models:
        datasets = args.datasets or list(runs)
        runs = {d: args.models or runs.get(d) or ["transformer", "mamba", "gam"] for d in datasets}
    cfg.update(preset=args.preset, seeds=list(args.seeds) if args.seeds else [cfg["seed"]],
               mamba_impl=args.mamba_impl, runs=runs, data_dirs=parse_data_dirs(args.data_dir, runs),
               out_dir=args.out_dir or default_out_dir(), num_workers=args.num_workers,
               world_size=distributed.world_size())
    validate_config(cfg)
    return TrainConfig.from_json(cfg)


def saved_config(run_dir: Path, args: argparse.Namespace, explicit: set[str]) -> TrainConfig:
    path = run_dir / "config.json"
    if not path.is_file():
        raise UsageError(f"--resume {run_dir}: no config.json there (is it a benchmark.py --out-dir?)")
    refused = explicit - RESUME_FLAGS
    if refused:
        raise UsageError("--resume restores the saved config; drop these flags: "
                         + " ".join("--" + k.replace("_", "-") for k in sorted(refused)))
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(cfg, dict):
            raise UsageError(f"it holds a JSON {type(cfg).__name__}, not a run config")
        validate_config(cfg, saved=True)
    except (OSError, ValueError, TypeError, UsageError) as e:  # JSON and decoding errors are ValueErrors
        why = str(e) if isinstance(e, UsageError) else one_line(e)
        raise UsageError(f"{path} is not a valid benchmark.py config ({why}); restore it, "
                         "or start a fresh run with another --out-dir") from None
    check_same_world_size(cfg["world_size"], run_dir)
    cfg = TrainConfig.from_json(cfg)
    return replace(cfg, out_dir=str(run_dir), num_workers=args.num_workers if "num_workers" in explicit else
                   cfg.num_workers)


def saved_fingerprints(run_dir: Path) -> dict:
    """dataset -> the fingerprint of its data when the run started (config.json, validated by saved_config)."""
    return json.loads((run_dir / "config.json").read_text(encoding="utf-8"))["data_fingerprint"]


def check_same_world_size(world: int, run_dir: Path) -> None:
    """Each rank's dropout stream and share of the batch depend on the world size: a run
    resumes with the number of processes it started with."""
    if world != distributed.world_size():
        launch = "python benchmark.py" if world == 1 else \
            f"torchrun with {world} processes in all (e.g. --nproc_per_node {world})"
        raise UsageError(f"--resume {run_dir}: the run was trained by {world} process(es), this is "
                         f"{distributed.world_size()}; resume it with {launch}")


def parse_data_dirs(values: list[str] | None, runs: dict) -> dict:
    hub = [d for d in runs if d not in GENERATED]
    out = {}
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep:
            if not hub:
                raise UsageError(f"--data-dir {v}: no hub dataset is selected (synthetic and mqar are generated in code); "
                                 "select one, e.g. --datasets wikitext2 --data-dir wikitext2=DIR")
            if len(hub) > 1:
                raise UsageError(f"--data-dir {v}: several hub datasets are selected ({', '.join(hub)}); "
                                 f"write NAME=DIR, e.g. --data-dir {hub[0]}={v}")
            name, path = hub[0], v
        if name not in hub:
            raise UsageError(f"--data-dir {v}: '{name}' is not a selected hub dataset ({', '.join(hub) or 'none'})")
        if name in out:
            raise UsageError(f"--data-dir: {name} given twice")
        if not Path(path).is_dir():
            raise UsageError(f"--data-dir {v}: {path} is not a folder")
        out[name] = str(Path(path).resolve())
    return out


def validate_config(cfg: dict, saved: bool = False) -> None:
    """The same checks for the command line and a saved config.json (which also has its data
    fingerprint): every key present and no other, each of the right type, each value sensible."""
    keys = [*PAPER_HPARAMS, *MQAR_HPARAMS, *RUN_KEYS, *(["data_fingerprint"] if saved else [])]
    unknown, missing = sorted(set(cfg) - set(keys)), [k for k in keys if k not in cfg]
    listed = lambda ks: ", ".join(ks[:4]) + (f" and {len(ks) - 4} more" if len(ks) > 4 else "")  # noqa: E731
    if unknown or missing:
        raise UsageError("; ".join(([f"unknown keys {listed(unknown)}"] if unknown else [])
                                   + ([f"missing keys {listed(missing)}"] if missing else [])))
    for k, default in {**PAPER_HPARAMS, **MQAR_HPARAMS}.items():
        check_type(k, cfg[k], default)
    validate_values(cfg)
    validate_run_keys(cfg, saved)


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def check_type(key: str, value, default) -> None:
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if key in ("max_train_rows", "max_val_rows", "max_train_blocks"):
        ok = value is None or is_int
    elif isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = is_int
    elif isinstance(default, float):
        ok = is_int or (isinstance(value, float) and math.isfinite(value))
    else:
        ok = value in CHOICES[key]
    if not ok:
        raise UsageError(f"{flag(key)}: invalid value {value!r}")


def validate_values(cfg: dict) -> None:
    for k in ["vocab_size", "block_size", "n_embed", "n_layer", "n_head", "num_memory_slots", "conv_kernel_size",
              "d_state", "d_conv", "expand", "batch_size", "epochs", *MQAR_HPARAMS]:
        if cfg[k] < 1:
            raise UsageError(f"{flag(k)} must be >= 1, got {cfg[k]}")
    if cfg["vocab_size"] > MAX_VOCAB:  # the tokenizer's trainer aborts the process far beyond it
        raise UsageError(f"--vocab-size must be at most {MAX_VOCAB:,}, got {cfg['vocab_size']:,}")
    for k in ["warmup_steps", "weight_decay", "grad_clip"]:
        if not cfg[k] >= 0:  # NaN too
            raise UsageError(f"{flag(k)} must be >= 0, got {cfg[k]}")
    if not cfg["lr"] > 0:
        raise UsageError(f"--lr must be > 0, got {cfg['lr']}")
    if not (0 <= cfg["beta1"] < 1 and 0 <= cfg["beta2"] < 1):
        raise UsageError("--beta1 and --beta2 must lie in [0, 1)")
    if not 0 <= cfg["dropout"] < 1:
        raise UsageError(f"--dropout must lie in [0, 1), got {cfg['dropout']}")
    if cfg["n_embed"] % cfg["n_head"]:
        raise UsageError(f"--n-embed ({cfg['n_embed']}) must be divisible by --n-head ({cfg['n_head']})")
    for k in ["max_train_rows", "max_val_rows", "max_train_blocks"]:
        if cfg[k] is not None and cfg[k] < 1:
            raise UsageError(f"{flag(k)} must be >= 1")
    if not 0 <= cfg["seed"] < MAX_SEED:
        raise UsageError(f"--seed must lie in [0, 2**63), got {cfg['seed']}")


def validate_run_keys(cfg: dict, saved: bool) -> None:
    seeds, runs, data_dirs = cfg["seeds"], cfg["runs"], cfg["data_dirs"]
    if not (isinstance(seeds, list) and seeds and all(type(s) is int and 0 <= s < MAX_SEED for s in seeds)
            and len(set(seeds)) == len(seeds)):
        raise UsageError(f"--seeds must be distinct integers in [0, 2**63), got {seeds!r}")
    if cfg["preset"] not in PRESETS or cfg["mamba_impl"] not in CHOICES["mamba_impl"]:
        raise UsageError(f"unknown --preset {cfg['preset']!r} or --mamba-impl {cfg['mamba_impl']!r}")
    if not (isinstance(runs, dict) and runs and all(
            d in DATASETS and isinstance(ms, list) and ms and all(m in MODELS for m in ms)
            and len(set(ms)) == len(ms) for d, ms in runs.items())):
        raise UsageError(f"runs must map datasets ({', '.join(DATASETS)}) to distinct models "
                         f"({', '.join(MODELS)}), got {runs!r}")
    if not (isinstance(data_dirs, dict) and all(d in runs and isinstance(p, str) for d, p in data_dirs.items())):
        raise UsageError(f"data_dirs must map selected datasets to folders, got {data_dirs!r}")
    if not (isinstance(cfg["out_dir"], str) and type(cfg["num_workers"]) is int and cfg["num_workers"] >= 0):
        raise UsageError(f"--num-workers must be >= 0, got {cfg['num_workers']!r}")
    world = cfg["world_size"]
    if not (type(world) is int and world >= 1):
        raise UsageError(f"world_size must be an integer >= 1, got {world!r}")
    if cfg["batch_size"] % world:
        fits = world * max(1, cfg["batch_size"] // world)
        raise UsageError(f"--batch-size {cfg['batch_size']} is the global batch, split over {world} processes: "
                         f"it must be divisible by {world} (e.g. --batch-size {fits})")
    if saved:
        fp = cfg["data_fingerprint"]
        if not (isinstance(fp, dict) and set(fp) == set(runs)
                and all(isinstance(v, dict) and set(v) == set(FINGERPRINT_KEYS) for v in fp.values())):
            raise UsageError("data_fingerprint must hold train, validation, tokenizer and vocab_size per dataset")


def family_of(model_name: str) -> tuple[str, dict]:
    """The family (baselines.FAMILIES) that builds a model name, and the options it adds."""
    if model_name in GAM_VARIANTS:
        return "gam", {}
    return CONTROLS.get(model_name, (model_name, {}))


def model_config(cfg: TrainConfig, model_name: str, vocab_size: int) -> ModelConfig:
    return ModelConfig(
        VOCAB_SIZE=vocab_size, BLOCK_SIZE=cfg.block_size, N_EMBED=cfg.n_embed, N_LAYER=cfg.n_layer,
        DROPOUT=cfg.dropout, NUM_MEMORY_SLOTS=cfg.num_memory_slots, CONV_KERNEL_SIZE=cfg.conv_kernel_size,
        **GAM_VARIANTS.get(model_name, {}),
    )


def is_paper_config(cfg: TrainConfig, dataset: str, info: dict) -> bool:
    """True when a run used the paper's full setup and data, so its numbers sit beside the paper's."""
    same = all(getattr(cfg, k) == v for k, v in PAPER_HPARAMS.items() if k not in ("seed", "compile"))
    return same and PAPER_ROWS.get(dataset) == (info["rows"]["train"], info["rows"]["validation"])


def default_out_dir() -> str:
    """runs/<timestamp>, with a suffix when a run started in the same second."""
    base = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    path, n = base, 1
    while os.path.lexists(path):
        n += 1
        path = f"{base}-{n}"
    return path


FINGERPRINT_KEYS = ("train", "validation", "tokenizer", "vocab_size")


# Rows (train, validation) the paper's Table 1 runs saw: WikiText-2 whole, TinyStories capped.
PAPER_ROWS = {"wikitext2": (36718, 3760), "tinystories": (50000, 5000)}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--device {name}: {one_line(e)}") from None
    if device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index not in (None, 0)):
        raise UsageError(f"--device {name}: only cpu, cuda and cuda:N are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def rank_device(device: torch.device) -> torch.device:
    """Under torchrun on CUDA, each process takes the GPU of its LOCAL_RANK."""
    if distributed.world_size() == 1 or device.type != "cuda":
        return device
    if device.index is not None:
        raise UsageError(f"--device {device}: under torchrun each process uses cuda:LOCAL_RANK; "
                         "pass --device cuda (or auto)")
    if distributed.local_rank() >= torch.cuda.device_count():
        raise UsageError(f"LOCAL_RANK {distributed.local_rank()}: this machine has {torch.cuda.device_count()} "
                         "CUDA device(s); start at most that many processes per node (--nproc_per_node)")
    return torch.device("cuda", distributed.local_rank())
