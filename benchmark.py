"""Reproduce Table 1 (GAM vs Transformer vs Mamba) and Table 3 (GAM ablations).

    python benchmark.py                          # the paper's setup (GPU, hub data)
    python benchmark.py --preset smoke           # embedded corpus, tiny models, < 2 min on CPU
    python benchmark.py --preset cpu --data-dir wikitext2=PATH/wikitext-2-raw
    python benchmark.py --preset ablation        # Table 3
    python benchmark.py --resume runs/<dir>      # continue a killed run

Every hyperparameter of the paper is a flag whose default is the paper's value;
a preset changes some of them and explicit flags override the preset. Outputs go
to --out-dir: results.json, table1.md, table3.md (ablations), curves.png,
config.json and per-run checkpoints.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from gam_model import ModelConfig
from reporting import OneLineParser, atomic_save_figure, atomic_torch_save, atomic_write_json, atomic_write_text, run_metadata

# ---------------------------------------------------------------------------------------
# What the paper ran, and what it reported (arXiv:2509.00605, Tables 1 and 3).
# Printed beside our numbers; never copied into our results.

PAPER_TABLE1 = {
    ("wikitext2", "transformer"): {"params": "24.2 M", "epoch_time_s": 131.9, "val_loss": 6.8233, "val_ppl": 918.99},
    ("wikitext2", "mamba"): {"params": "20.5 M", "epoch_time_s": 127.1, "val_loss": 6.9251, "val_ppl": 1017.54},
    ("wikitext2", "gam"): {"params": "22.6 M", "epoch_time_s": 117.2, "val_loss": 6.7828, "val_ppl": 882.57},
    ("tinystories", "transformer"): {"params": "24.2 M", "epoch_time_s": 671.6, "val_loss": 3.1591, "val_ppl": 23.55},
    ("tinystories", "gam"): {"params": "22.6 M", "epoch_time_s": 601.4, "val_loss": 3.1418, "val_ppl": 23.15},
}
PAPER_TABLE3 = {  # WikiText-2, best validation PPL over the epochs
    "gam": {"params": "22.6 M", "best_val_ppl": 900.84},
    "gam-global-only": {"params": "19.4 M", "best_val_ppl": 905.45},
    "gam-sum-fusion": {"params": "19.4 M", "best_val_ppl": 942.59},
    "gam-local-only": {"params": "17.9 M", "best_val_ppl": 944.70},
}

# The Table 3 switches of each GAM variant.
GAM_VARIANTS = {
    "gam": dict(USE_GATE=True, USE_LOCAL=True, USE_GLOBAL=True),
    "gam-global-only": dict(USE_GATE=False, USE_LOCAL=False, USE_GLOBAL=True),
    "gam-sum-fusion": dict(USE_GATE=False, USE_LOCAL=True, USE_GLOBAL=True),
    "gam-local-only": dict(USE_GATE=False, USE_LOCAL=True, USE_GLOBAL=False),
}
MODELS = [*GAM_VARIANTS, "transformer", "mamba"]
DATASETS = ["wikitext2", "tinystories", "synthetic"]

# SPEC section 3: the paper's (and the author's benchmark.py) training setup.
PAPER_HPARAMS = dict(
    vocab_size=10000, block_size=256, n_embed=512, n_layer=6, n_head=8, dropout=0.1,
    num_memory_slots=512, conv_kernel_size=3, d_state=16, d_conv=4, expand=3,
    batch_size=32, lr=3e-4, beta1=0.9, beta2=0.95, weight_decay=0.1, warmup_steps=100,
    epochs=5, grad_clip=1.0, max_train_rows=50000, max_val_rows=5000, max_train_blocks=None,
    tokenizer_splits="train", attention="naive", mamba_residual=False, seed=1337,
)

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
    # WikiText-2 from local files, models scaled down to fit 2 CPU cores in < 30 minutes.
    "cpu": dict(
        runs={"wikitext2": ["transformer", "mamba", "gam"]},
        vocab_size=4096, block_size=128, n_embed=128, n_layer=2, n_head=4, num_memory_slots=128,
        d_state=8, expand=2, batch_size=16, lr=3e-3, warmup_steps=50, epochs=2, max_train_blocks=8000,
    ),
}

# ---------------------------------------------------------------------------------------
# Command line


HELP = {
    "max_train_blocks": "train on at most this many (shuffled) blocks per epoch; ",
    "max_train_rows": "row cap of the train split (as the author's code); ",
    "max_val_rows": "row cap of the validation split; ",
    "seed": "seeds model init, dropout and shuffling; the paper used no seed; ",
}


class UsageError(Exception):
    """A problem the user fixes by changing the command line: exit code 2, one line."""


class DivergedError(Exception):
    """Training produced a non-finite loss."""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        description="Reproduce Table 1 / Table 3 of the GAM paper. Defaults are the paper's; "
                    "a preset changes some of them; explicit flags override the preset.",
        epilog="presets: paper = Table 1 (WikiText-2: Transformer, Mamba, GAM; TinyStories: Transformer, GAM); "
               "ablation = Table 3 (four GAM variants on WikiText-2); smoke = embedded synthetic corpus, "
               "tiny models, no network (~2 min on 2 CPU cores); cpu = WikiText-2 from --data-dir with "
               "models scaled down for 2 CPU cores (< 30 min).",
    )
    p.add_argument("--preset", choices=list(PRESETS), default="paper", help="default: paper")
    p.add_argument("--datasets", nargs="+", choices=DATASETS, help="override the preset's datasets")
    p.add_argument("--models", nargs="+", choices=MODELS, help="override the preset's models")
    p.add_argument("--data-dir", nargs="+", metavar="[NAME=]DIR",
                   help="read a dataset from local files instead of the Hugging Face Hub; "
                        "NAME=DIR per dataset, or a bare DIR when one hub dataset is selected")
    g = p.add_argument_group("model and training (default: the paper's value, or the preset's)")
    for name, value in PAPER_HPARAMS.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help=f"paper: {value}")
        elif name == "tokenizer_splits":
            g.add_argument(flag, choices=["train", "all"], default=None,
                           help="train the tokenizer on the train split (the paper) or on all splits "
                                "(the author's code). paper: train")
        elif name == "attention":
            g.add_argument(flag, choices=["naive", "sdpa"], default=None,
                           help="Transformer attention: naive (what the paper timed) or fused SDPA")
        else:
            kind = float if isinstance(value, float) else int
            g.add_argument(flag, type=kind, default=None, metavar=name.upper(),
                           help=HELP.get(name, "") + f"paper: {'all' if value is None else value}")
    p.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                   help="run every (dataset, model) once per seed (overrides --seed); tables show mean ± std")
    p.add_argument("--mamba-impl", choices=["auto", "hf", "mamba_ssm"], default="auto",
                   help="mamba_ssm kernels (CUDA) or the pure-PyTorch Hugging Face mixer")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--out-dir", help="default: runs/<timestamp>")
    p.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR with its saved config")
    p.add_argument("--cache-dir", default=None, help="tokenizer cache; default: <repo>/.cache")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--wandb", choices=["online", "offline", "disabled"], default=None,
                   help="default: online when logged in to wandb, else offline")
    p.add_argument("--wandb-project", default="gam-reproduction")
    p.add_argument("--unigram-only", action="store_true",
                   help="prepare the data, write the unigram reference PPL to unigram.json, train nothing")
    return p


def resolve_config(args: argparse.Namespace, explicit: set[str]) -> dict:
    """Paper defaults < preset < explicit flags. Returns the full, JSON-able run config."""
    if args.resume:
        saved = Path(args.resume) / "config.json"
        if not saved.is_file():
            raise UsageError(f"--resume {args.resume}: no config.json there (is it a benchmark.py --out-dir?)")
        allowed = {"resume", "device", "wandb", "wandb_project", "num_workers", "cache_dir"}
        if explicit - allowed:
            raise UsageError("--resume restores the saved config; drop these flags: "
                             + " ".join("--" + k.replace("_", "-") for k in sorted(explicit - allowed)))
        cfg = json.loads(saved.read_text())
        cfg["out_dir"] = str(Path(args.resume))
        return cfg
    cfg = dict(PAPER_HPARAMS)
    preset = dict(PRESETS[args.preset])
    runs = preset.pop("runs")
    cfg.update(preset)
    cfg.update({k: getattr(args, k) for k in PAPER_HPARAMS if getattr(args, k) is not None})
    if args.datasets or args.models:
        datasets = args.datasets or list(runs)
        runs = {d: args.models or runs.get(d) or ["transformer", "mamba", "gam"] for d in datasets}
    cfg["preset"] = args.preset
    cfg["seeds"] = list(args.seeds) if args.seeds else [cfg["seed"]]
    cfg["mamba_impl"] = args.mamba_impl
    cfg["runs"] = runs
    cfg["data_dirs"] = parse_data_dirs(args.data_dir, runs)
    cfg["out_dir"] = args.out_dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    validate_config(cfg)
    return cfg


def parse_data_dirs(values: list[str] | None, runs: dict) -> dict:
    hub = [d for d in runs if d != "synthetic"]
    out = {}
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep:
            if len(hub) != 1:
                raise UsageError(f"--data-dir {v}: several datasets selected ({', '.join(hub) or 'none from the hub'}); "
                                 "write NAME=DIR, e.g. --data-dir wikitext2=DIR")
            name, path = hub[0], v
        if name not in hub:
            raise UsageError(f"--data-dir {v}: '{name}' is not a selected hub dataset ({', '.join(hub) or 'none'})")
        if not Path(path).is_dir():
            raise UsageError(f"--data-dir {v}: {path} is not a folder")
        out[name] = str(Path(path).resolve())
    return out


def validate_config(cfg: dict) -> None:
    positive = ["vocab_size", "block_size", "n_embed", "n_layer", "n_head", "num_memory_slots", "conv_kernel_size",
                "d_state", "d_conv", "expand", "batch_size", "epochs"]
    for k in positive:
        if cfg[k] < 1:
            raise UsageError(f"--{k.replace('_', '-')} must be >= 1, got {cfg[k]}")
    for k in ["warmup_steps", "weight_decay", "grad_clip"]:
        if cfg[k] < 0:
            raise UsageError(f"--{k.replace('_', '-')} must be >= 0, got {cfg[k]}")
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
            raise UsageError(f"--{k.replace('_', '-')} must be >= 1")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {name}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


# ---------------------------------------------------------------------------------------
# Training


def lr_lambda(warmup_steps: int, total_steps: int):
    """Linear warm-up, then cosine decay to 0 over the remaining steps (per step, as the author)."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def model_config(cfg: dict, model_name: str, vocab_size: int) -> ModelConfig:
    return ModelConfig(
        VOCAB_SIZE=vocab_size, BLOCK_SIZE=cfg["block_size"], N_EMBED=cfg["n_embed"], N_LAYER=cfg["n_layer"],
        DROPOUT=cfg["dropout"], NUM_MEMORY_SLOTS=cfg["num_memory_slots"], CONV_KERNEL_SIZE=cfg["conv_kernel_size"],
        **GAM_VARIANTS.get(model_name, {}),
    )


def build_model(cfg: dict, model_name: str, vocab_size: int, device: torch.device, mamba_impl: str):
    from baselines import build_lm

    mc = model_config(cfg, model_name, vocab_size)
    family = "gam" if model_name in GAM_VARIANTS else model_name
    model = build_lm(family, mc, n_head=cfg["n_head"], attention=cfg["attention"],
                     d_state=cfg["d_state"], d_conv=cfg["d_conv"], expand=cfg["expand"],
                     mamba_residual=cfg["mamba_residual"], mamba_impl=mamba_impl, device=device)
    return model.to(device), mc


def rng_state(train_loader) -> dict:
    state = {"torch": torch.get_rng_state(), "loader": train_loader.generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, train_loader) -> None:
    torch.set_rng_state(state["torch"])
    train_loader.generator.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.no_grad()
def evaluate(model, loader, device) -> tuple[float, list[float]]:
    """(mean of per-batch mean losses, as the author's code; mean loss at each block position).

    The per-position curve shows how much a model gains from context: position p has p
    tokens before it. Ignored targets (-100) count neither in the loss nor in the curve.
    """
    model.eval()
    losses, pos_sum, pos_count = [], 0.0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits, loss = model(x, y)
        losses.append(loss.item())
        per_token = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), y, reduction="none", ignore_index=-100)     # (B, T)
        scored = (y != -100)
        pos_sum = pos_sum + per_token.double().sum(0)                       # (T,)
        pos_count = pos_count + scored.sum(0)                               # (T,)
    by_position = (pos_sum / pos_count.clamp(min=1)).tolist()
    return sum(losses) / len(losses), by_position


def train_epoch(model, loader, optimizer, scheduler, cfg, device, desc, log_step):
    """One epoch; returns (mean train loss, wall time of the training loop, tokens seen)."""
    from tqdm.auto import tqdm

    model.train()
    total, n, tokens = 0.0, 0, 0
    limit = cfg["max_train_blocks"]
    steps = len(loader) if not limit else min(len(loader), math.ceil(limit / cfg["batch_size"]))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    bar = tqdm(loader, total=steps, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0)
    for x, y in bar:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        optimizer.step()
        scheduler.step()
        value = loss.item()
        if not math.isfinite(value):
            raise DivergedError(f"non-finite training loss ({value}) at step {scheduler.last_epoch}")
        total, n, tokens = total + value, n + 1, tokens + x.numel()
        lr = scheduler.get_last_lr()[0]
        bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.2e}", refresh=False)
        log_step({"train/loss": value, "train/lr": lr, "step": scheduler.last_epoch})
        if n == steps:  # --max-train-blocks: a shuffled subset of the blocks each epoch
            break
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return total / max(1, n), time.perf_counter() - start, tokens


def run_name(cfg: dict, dataset: str, model_name: str) -> str:
    """<dataset>-<model>, plus -seed<S> when the run has several seeds."""
    seeds = cfg.get("seeds", [cfg["seed"]])
    return f"{dataset}-{model_name}" + (f"-seed{cfg['seed']}" if len(seeds) > 1 else "")


def run_one(cfg, dataset, model_name, loaders, info, device, logger) -> dict:
    """Train and evaluate one model on one dataset, resuming from its checkpoint if present."""
    train_loader, val_loader = loaders
    ckpt_path = Path(cfg["out_dir"]) / "checkpoints" / f"{run_name(cfg, dataset, model_name)}.pt"
    torch.manual_seed(cfg["seed"])  # the same init for a model whatever ran before it
    train_loader.generator.manual_seed(cfg["seed"])
    model, mc = build_model(cfg, model_name, info["vocab_size"], device, cfg["mamba_impl"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]),
                                  weight_decay=cfg["weight_decay"])
    steps_per_epoch = len(train_loader)
    if cfg["max_train_blocks"]:
        steps_per_epoch = min(steps_per_epoch, math.ceil(cfg["max_train_blocks"] / cfg["batch_size"]))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg["warmup_steps"], cfg["epochs"] * steps_per_epoch))
    record = {"dataset": dataset, "model": model_name, "seed": cfg["seed"], "params": model.num_params(),
              "implementation": model.implementation + ("-residual" if getattr(model, "residual", False) else ""),
              "status": "running", "epochs": [],
              "model_config": mc.to_dict(), "data": info, **run_metadata(device), "config": cfg}

    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"], train_loader)
        record["epochs"] = ckpt["epochs"]
        print(f"  resumed {dataset}/{model_name} after epoch {len(record['epochs'])} from {ckpt_path}")

    print(f"  {model_name}: {record['params']:,} parameters ({record['implementation']}) on {dataset}")
    run = logger.start(run_name(cfg, dataset, model_name), record)
    try:
        for epoch in range(len(record["epochs"]), cfg["epochs"]):
            desc = f"{dataset}/{model_name} epoch {epoch + 1}/{cfg['epochs']}"
            train_loader.sampler.set_epoch(epoch)  # this epoch's order: a function of (seed, epoch)
            train_loss, seconds, tokens = train_epoch(model, train_loader, optimizer, scheduler, cfg, device,
                                                      desc, run.log)
            val_loss, val_by_position = evaluate(model, val_loader, device)
            if not math.isfinite(val_loss):
                raise DivergedError(f"non-finite validation loss ({val_loss}) after epoch {epoch + 1}")
            stats = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
                     "val_ppl": math.exp(min(val_loss, 700.0)), "epoch_time_s": seconds,
                     "tokens_per_s": tokens / seconds, "val_loss_by_position": val_by_position}
            record["epochs"].append(stats)
            run.log({f"epoch/{k}": v for k, v in stats.items() if k != "val_loss_by_position"})
            print(f"  epoch {epoch + 1}/{cfg['epochs']}: train {train_loss:.4f} | val {val_loss:.4f} "
                  f"| ppl {stats['val_ppl']:.2f} | {seconds:.1f} s | {stats['tokens_per_s']:,.0f} tok/s")
            atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "scheduler": scheduler.state_dict(), "rng": rng_state(train_loader),
                               "epochs": record["epochs"]}, ckpt_path)
    except DivergedError as e:
        record["status"] = "diverged"
        record["error"] = (f"{dataset}/{model_name}: {e}; stopped. Last good checkpoint: "
                           f"{ckpt_path if ckpt_path.is_file() else 'none (it diverged in its first epoch)'}")
        run.finish(record)
        return record
    ep = record["epochs"]
    record.update(status="done", final_val_loss=ep[-1]["val_loss"], final_val_ppl=ep[-1]["val_ppl"],
                  best_val_ppl=min(e["val_ppl"] for e in ep),
                  mean_epoch_time_s=sum(e["epoch_time_s"] for e in ep) / len(ep))
    run.finish(record)
    return record


# ---------------------------------------------------------------------------------------
# Results


# Rows (train, validation) the paper's runs saw: WikiText-2 whole, TinyStories capped.
PAPER_ROWS = {"wikitext2": (36718, 3760), "tinystories": (50000, 5000)}


def unigram_perplexity(train_blocks: torch.Tensor, val_blocks: torch.Tensor, vocab_size: int) -> float:
    """Validation PPL of a model that knows only the train split's token frequencies (add-one).

    The floor any LM must beat: a model at this PPL has learned no context at all.
    """
    counts = torch.bincount(train_blocks[:, 1:].reshape(-1), minlength=vocab_size).double() + 1.0
    log_p = (counts / counts.sum()).log()
    return math.exp(-log_p[val_blocks[:, 1:].reshape(-1)].mean().item())


def is_paper_config(record: dict) -> bool:
    """True when a run used the paper's full setup, so its numbers sit beside the paper's."""
    cfg, rows = record["config"], record["data"]["rows"]
    same = all(cfg.get(k) == v for k, v in PAPER_HPARAMS.items() if k != "seed")
    return same and PAPER_ROWS.get(record["dataset"]) == (rows["train"], rows["validation"])


def fmt(x, spec=".4f") -> str:
    return "—" if x is None else format(x, spec)


def table1_markdown(records: list[dict]) -> str:
    rows = [r for r in records if r["model"] in ("gam", "transformer", "mamba")]
    lines = ["| Dataset | Model | Params | Time / epoch (s) | Val loss | Val PPL | "
             "Paper params | Paper time / epoch (s) | Paper val loss | Paper val PPL |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    notes = set()
    for r in rows:
        paper = PAPER_TABLE1.get((r["dataset"], r["model"])) if is_paper_config(r) else None
        if paper is None and (r["dataset"], r["model"]) in PAPER_TABLE1:
            notes.add("Paper columns are left empty where our configuration differs from the paper's "
                      "(scaled-down preset, data subset or changed flags): those numbers are not comparable.")
        elif paper is None:
            notes.add(f"The paper reports no {r['model']} run on {r['dataset']}.")
        p = paper or {}
        lines.append(f"| {r['dataset']} | {r['model']} ({r['implementation']}) | {r['params'] / 1e6:.2f} M | "
                     f"{fmt(r.get('mean_epoch_time_s'), '.1f')} | {fmt(r.get('final_val_loss'))} | "
                     f"{fmt(r.get('final_val_ppl'), '.2f')} | {p.get('params', '—')} | "
                     f"{fmt(p.get('epoch_time_s'), '.1f')} | {fmt(p.get('val_loss'))} | {fmt(p.get('val_ppl'), '.2f')} |")
    unigram = {r["dataset"]: r["data"].get("unigram_val_ppl") for r in rows}
    notes.update(f"Reference: a unigram model (train token frequencies, add-one smoothing) has validation "
                 f"PPL {ppl:.2f} on {d} with this tokenizer." for d, ppl in unigram.items() if ppl)
    return "\n".join(lines + [""] + sorted(notes)) + "\n"


def table3_markdown(records: list[dict]) -> str:
    lines = ["| Model configuration | Gating | Local | Global | Params | Best val PPL | Paper params | Paper best val PPL |",
             "|---|:-:|:-:|:-:|---|---|---|---|"]
    mark = lambda b: "yes" if b else "no"  # noqa: E731
    for r in records:
        if r["model"] not in GAM_VARIANTS:
            continue
        sw = GAM_VARIANTS[r["model"]]
        paper = PAPER_TABLE3[r["model"]] if is_paper_config(r) and r["dataset"] == "wikitext2" else {}
        lines.append(f"| {r['model']} ({r['dataset']}) | {mark(sw['USE_GATE'])} | {mark(sw['USE_LOCAL'])} | "
                     f"{mark(sw['USE_GLOBAL'])} | {r['params'] / 1e6:.2f} M | {fmt(r.get('best_val_ppl'), '.2f')} | "
                     f"{paper.get('params', '—')} | {fmt(paper.get('best_val_ppl'), '.2f')} |")
    return "\n".join(lines) + "\n"


def plot_curves(records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    datasets = list(dict.fromkeys(r["dataset"] for r in records))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for r in records:
            if r["dataset"] == dataset and r["epochs"]:
                ax.plot([e["epoch"] for e in r["epochs"]], [e["val_ppl"] for e in r["epochs"]], "o-", label=r["model"])
        ax.set(title=dataset, xlabel="epoch", ylabel="validation perplexity", yscale="log")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=120)
    plt.close(fig)


def write_results(records: list[dict], out_dir: Path) -> None:
    atomic_write_json(out_dir / "results.json", records)
    if any(r["model"] in ("gam", "transformer", "mamba") for r in records):
        atomic_write_text(out_dir / "table1.md", table1_markdown(records))
    if sum(r["model"] in GAM_VARIANTS for r in records) > 1:
        atomic_write_text(out_dir / "table3.md", table3_markdown(records))
    if any(r["epochs"] for r in records):
        plot_curves(records, out_dir / "curves.png")


# ---------------------------------------------------------------------------------------
# Weights & Biases (optional; never requires an account)


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc
    try:
        hosts = netrc.netrc(os.environ.get("NETRC")).hosts
    except (OSError, netrc.NetrcParseError):
        return False
    return any("wandb" in h for h in hosts)


class WandbLogger:
    """One wandb run per (dataset, model); a no-op when mode is 'disabled'."""

    class _Run:
        def __init__(self, run=None):
            self.run = run

        def log(self, metrics: dict) -> None:
            if self.run is not None:
                self.run.log(metrics)

        def finish(self, record: dict) -> None:
            if self.run is not None:
                keys = ("params", "implementation", "status", "final_val_loss", "final_val_ppl", "best_val_ppl",
                        "mean_epoch_time_s", "error")
                self.run.summary.update({k: record[k] for k in keys if k in record})
                self.run.finish()

    def __init__(self, mode: str | None, project: str, out_dir: Path):
        self.mode = mode or ("online" if wandb_logged_in() else "offline")
        self.project, self.out_dir = project, out_dir

    def start(self, name: str, record: dict) -> "WandbLogger._Run":
        if self.mode == "disabled":
            return self._Run()
        import wandb

        config = {k: v for k, v in record.items() if k not in ("epochs", "status")}
        run = wandb.init(project=self.project, name=name, mode=self.mode, dir=str(self.out_dir),
                         config=config, reinit="finish_previous")
        return self._Run(run)


# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = {k for k, v in vars(args).items() if v is not None and v != parser.get_default(k)}
    try:
        cfg = resolve_config(args, explicit)
        device = resolve_device(args.device)
        out_dir = Path(cfg["out_dir"])
        logger = WandbLogger(args.wandb, args.wandb_project, out_dir)
        print(f"benchmark: preset {cfg['preset']}, device {device}, out-dir {out_dir}, wandb {logger.mode}")
        run_all(cfg, device, logger, args)
    except UsageError as e:
        print(f"benchmark.py: error: {e}", file=sys.stderr)
        return 2
    except DivergedError as e:
        print(f"benchmark.py: {e}", file=sys.stderr)
        return 1
    if args.unigram_only:
        print(f"unigram reference: {out_dir / 'unigram.json'}")
        return 0
    print((out_dir / "table1.md").read_text() if (out_dir / "table1.md").exists() else "")
    print(f"results: {out_dir / 'results.json'}")
    return 0


def run_all(cfg: dict, device: torch.device, logger: WandbLogger, args) -> list[dict]:
    from data import DataError, build_loaders

    out_dir, records, unigram = Path(cfg["out_dir"]), [], {}
    for dataset, models in cfg["runs"].items():
        try:
            train_loader, val_loader, _, info = build_loaders(
                dataset, data_dir=cfg["data_dirs"].get(dataset), block_size=cfg["block_size"],
                batch_size=cfg["batch_size"], vocab_size=cfg["vocab_size"], tokenizer_splits=cfg["tokenizer_splits"],
                max_train_rows=cfg["max_train_rows"], max_val_rows=cfg["max_val_rows"],
                cache_dir=args.cache_dir or str(Path(__file__).resolve().parent / ".cache"),
                seed=cfg["seed"], num_workers=args.num_workers)
        except DataError as e:
            raise UsageError(str(e)) from None
        atomic_write_json(out_dir / "config.json", cfg)  # only once the data is known to load
        info["unigram_val_ppl"] = unigram_perplexity(train_loader.dataset.blocks, val_loader.dataset.blocks,
                                                     info["vocab_size"])
        print(f"{dataset}: {info['blocks']['train']:,} train / {info['blocks']['validation']:,} validation blocks, "
              f"vocab {info['vocab_size']:,}, unigram validation PPL {info['unigram_val_ppl']:.2f}")
        if args.unigram_only:
            unigram = {**unigram, dataset: {k: info[k] for k in ("unigram_val_ppl", "vocab_size", "tokenizer_splits",
                                                                 "tokens", "block_size", "rows")}}
            atomic_write_json(out_dir / "unigram.json", unigram)
            continue
        for seed in cfg.get("seeds", [cfg["seed"]]):
            for model_name in models:
                seeded = {**cfg, "seed": seed}
                records.append(run_one(seeded, dataset, model_name, (train_loader, val_loader), info, device, logger))
                write_results(records, out_dir)
                if records[-1]["status"] == "diverged":
                    raise DivergedError(records[-1]["error"])
    return records


if __name__ == "__main__":
    sys.exit(main())
