"""Run folders of benchmark.py: where a run writes, how it resumes (config, data fingerprint,
checkpoints), how a finished model is exported, what a failure prints, and wandb.

Checkpoints are written atomically at every epoch end and read back only as tensors and plain
containers (weights_only=True), so a file from elsewhere cannot run code here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import shlex
import sys
import tempfile
import threading
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

import distributed
from common import atomic_torch_save, atomic_write_json, one_line
from config import GENERATED, UsageError, flag
from pretrained import save_pretrained


class RunError(Exception):
    """A failure while training: exit 1."""


class DivergedError(RunError):
    """Training produced a non-finite loss."""


WANDB_PROBE_TIMEOUT_S = 5.0
WANDB_INIT_TIMEOUT_S = 60.0


# ---------------------------------------------------------------------------------------
# Folders: a fresh run never writes into another run's folder.


@dataclass
class Where:
    """Where the run is, for the line printed on Ctrl-C or a failure."""
    stage: str = "start-up"
    resume_command: str | None = None  # set once the run folder can be resumed


def cache_dir(args: argparse.Namespace) -> Path:
    return Path(args.cache_dir) if args.cache_dir else Path(__file__).resolve().parent / ".cache"


def is_run_dir(path: Path) -> bool:
    return any((path / name).exists() for name in ("config.json", "results.json", "checkpoints"))


def check_folders(cfg: dict, args: argparse.Namespace) -> None:
    """A fresh run never writes into another run's folder; every folder we write is writable."""
    out = Path(cfg["out_dir"])
    if not args.resume and out.is_dir() and is_run_dir(out):
        raise UsageError(f"--out-dir {out} already holds a run; continue it with "
                         f"`{shlex.join(distributed.launcher())} benchmark.py --resume {shlex.quote(str(out))}`, "
                         "or choose another --out-dir")
    check_writable(out, "--resume" if args.resume else "--out-dir")
    check_writable(cache_dir(args), "--cache-dir")


def check_writable(path: Path, what: str) -> None:
    """path is, or can be made, a folder we can write in: probed with a temporary file in its
    deepest existing ancestor (permission bits do not tell, e.g. for root or a read-only mount)."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path} is a file, not a folder; choose another path")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{what} {path} lies under the file {existing}; choose another path")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UsageError(f"{what} {path} is not writable ({e.strerror or e}); choose another path") from None


# ---------------------------------------------------------------------------------------
# The data a run trained on: fingerprinted, so --resume refuses changed data.


def check_ranks_agree(fingerprints: dict) -> None:
    """Under torchrun every process prepares the data itself (on several machines, from its
    own --data-dir): all must hold the same train and validation sets and tokenizer."""
    if len({json.dumps(f, sort_keys=True) for f in distributed.gather_objects(fingerprints)}) > 1:
        raise UsageError("the processes of this job prepared different data (check that --data-dir holds the "
                         "same files on every machine, and that --cache-dir is not shared by different versions)")


def data_fingerprint(prepared) -> dict:
    sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    tokenizer = prepared.tokenizer
    return {"train": sha(prepared.train.dataset.blocks.contiguous().numpy()),
            "validation": sha(prepared.validation.dataset.blocks.contiguous().numpy()),
            "tokenizer": sha(tokenizer.to_str().encode("utf-8")) if tokenizer else "none (generated ids)",
            "vocab_size": prepared.info["vocab_size"]}


def check_same_data(cfg: dict, dataset: str, saved: dict, now: dict) -> None:
    changed = [name for key, name in (("train", "train data"), ("validation", "validation data"),
                                      ("tokenizer", "tokenizer")) if saved[key] != now[key]]
    if saved["vocab_size"] != now["vocab_size"] and "tokenizer" not in changed:
        changed.append("tokenizer")
    if changed:
        source = cfg["data_dirs"].get(dataset, "the hub" if dataset not in GENERATED else "the generator")
        what = ", ".join(changed[:-1]) + (" and " if len(changed) > 1 else "") + changed[-1]
        raise UsageError(f"--resume {cfg['out_dir']}: the {what} of {dataset} ({source}) changed "
                         "since the run started; restore them, or start a fresh run with another --out-dir")


# ---------------------------------------------------------------------------------------
# The run's plan and its resume command.


def planned_runs(cfg: dict) -> list[tuple[str, int, str]]:
    return [(d, seed, m) for d, models in cfg["runs"].items() for seed in cfg["seeds"] for m in models]


def run_name(cfg: dict, dataset: str, model_name: str) -> str:
    """<dataset>-<model>, plus -seed<S> when the run has several seeds."""
    seeds = cfg.get("seeds", [cfg["seed"]])
    return f"{dataset}-{model_name}" + (f"-seed{cfg['seed']}" if len(seeds) > 1 else "")


def checkpoint_path(cfg: dict, dataset: str, model_name: str) -> Path:
    return Path(cfg["out_dir"]) / "checkpoints" / f"{run_name(cfg, dataset, model_name)}.pt"


def start_run(cfg: dict, args: argparse.Namespace, explicit: set[str], where: Where) -> None:
    """A fresh run writes its config.json (with the data fingerprint) now, and only now."""
    distributed.barrier()  # under torchrun: every process has checked the folders before one is written
    if not args.resume and distributed.is_main():
        atomic_write_json(Path(cfg["out_dir"]) / "config.json", cfg)
    where.resume_command = resume_command(cfg, args, explicit)


def resume_command(cfg: dict, args: argparse.Namespace, explicit: set[str]) -> str:
    """The command that continues this run, with the flags given that --resume accepts."""
    command = [*distributed.launcher(), "benchmark.py", "--resume", cfg["out_dir"]]
    for key in ("device", "num_workers", "cache_dir", "wandb", "wandb_project", "dist_timeout"):  # RESUME_FLAGS
        if key in explicit:
            command += [flag(key), str(getattr(args, key))]
    return " ".join(shlex.quote(c) for c in command)


def read_published(out_dir: Path) -> dict:
    try:
        records = json.loads((out_dir / "results.json").read_text(encoding="utf-8"))
        return {(r["dataset"], r["model"], r["seed"]): r for r in records}
    except (OSError, ValueError, TypeError, KeyError):
        return {}  # none yet, or unreadable: it is rebuilt from the checkpoints


SAMPLE_PROMPTS, SAMPLE_PROMPT_TOKENS, SAMPLE_NEW_TOKENS, SAMPLE_TEMPERATURE = 3, 24, 48, 1.0


# ---------------------------------------------------------------------------------------
# A finished model, published: exported for use (models/<run name>/) and sampled (samples.md).


def publish_model(cfg: dict, dataset: str, model_name: str, model, data, record: dict) -> None:
    """Export the model to <out-dir>/models/<run name>/ (config.json, model.safetensors, the code
    transformers opens it with, the model card README.md and the dataset's tokenizer.json; MQAR
    has no tokenizer) and, on text, record its continuations of fixed validation prompts.
    Deterministic, so a resumed run re-publishes the same."""
    if not distributed.is_main():
        return
    val_loader, info = data.validation, data.info
    tokenizer = run_tokenizer(cfg, dataset, info)
    folder = Path(cfg["out_dir"]) / "models" / run_name(cfg, dataset, model_name)
    from model_card import model_card  # README.md: the Hub's model card

    files = {"README.md": model_card(record, model), **({"tokenizer.json": tokenizer.to_str()} if tokenizer else {})}
    try:
        save_pretrained(model, folder, extra_files=files)
    except ValueError as e:  # a folder there that holds something else: never overwritten
        raise RunError(f"cannot export {dataset}/{model_name}: {e}") from None
    record["export"] = str(folder.relative_to(cfg["out_dir"]))
    if tokenizer is not None:
        record["samples"] = sample_continuations(model, val_loader.dataset.blocks, tokenizer, cfg["seed"])


def run_tokenizer(cfg: dict, dataset: str, info: dict):
    """The tokenizer the run was trained with (from its cache file, checked against the run's
    fingerprint), or None for a dataset without one (MQAR)."""
    if info.get("tokenizer_path") is None:
        return None
    from tokenizers import Tokenizer

    path = info["tokenizer_path"]
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception:
        tokenizer = None
    expected = cfg["data_fingerprint"][dataset]["tokenizer"]
    if tokenizer is None or hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest() != expected:
        raise RunError(f"the tokenizer cache {path} vanished or changed during the run, so the model cannot be "
                       f"exported with its tokenizer; resume the run (python benchmark.py --resume {cfg['out_dir']})")
    return tokenizer


@torch.no_grad()
def sample_continuations(model, blocks: torch.Tensor, tokenizer, seed: int) -> dict:
    """Greedy and sampled (fixed seed) continuations of the first tokens of the first, middle and
    last validation blocks, decoded: {"prompts", "greedy", "sampled"} lists of text and settings."""
    n, length = blocks.shape[0], min(SAMPLE_PROMPT_TOKENS, blocks.shape[1])
    picks = sorted({round(i * (n - 1) / max(1, SAMPLE_PROMPTS - 1)) for i in range(SAMPLE_PROMPTS)})
    device = next(model.parameters()).device
    prompts = blocks[picks, :length].to(device)                              # (P, L)
    model.eval()
    out = {"prompts": tokenizer.decode_batch(prompts.tolist()), "new_tokens": SAMPLE_NEW_TOKENS,
           "temperature": SAMPLE_TEMPERATURE, "seed": seed}
    for mode, options in (("greedy", {"top_k": 1}), ("sampled", {"temperature": SAMPLE_TEMPERATURE})):
        generator = torch.Generator(device=device).manual_seed(seed)
        ids = model.generate(prompts, SAMPLE_NEW_TOKENS, generator=generator, **options)[:, length:]  # (P, new)
        out[mode] = tokenizer.decode_batch(ids.tolist())
    return out


# ---------------------------------------------------------------------------------------
# Checkpoints: every epoch end, atomically; read back as tensors and plain containers only.


CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "rng", "epochs"}


EPOCH_KEYS = {"epoch", "train_loss", "val_loss", "val_ppl", "epoch_time_s", "tokens_per_s"}


def save_checkpoint(t, train_loader, path: Path) -> None:
    if not distributed.is_main():
        return
    atomic_torch_save({"model": t.model.state_dict(), "optimizer": t.optimizer.state_dict(),
                       "scheduler": t.scheduler.state_dict(), "rng": rng_state(train_loader),
                       "epochs": t.epochs}, path)


def load_checkpoint(t, train_loader, path: Path, device: torch.device, max_epochs: int) -> None:
    ckpt = read_checkpoint(path, device, max_epochs)
    try:
        t.model.load_state_dict(ckpt["model"])
        t.optimizer.load_state_dict(ckpt["optimizer"])
        t.scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"], train_loader)
    except Exception as e:
        raise UsageError(unusable_checkpoint(path, one_line(e), "does not fit this run")) from None
    t.epochs[:] = ckpt["epochs"]


def read_checkpoint(path: Path, device: torch.device, max_epochs: int) -> dict:
    try:
        with warnings.catch_warnings():  # e.g. torch's note on a foreign pickle protocol: not ours to print
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        why = ("it holds Python objects other than tensors and plain containers, which are not loaded"
               if "weights only" in str(e).lower() else one_line(e))
        raise UsageError(unusable_checkpoint(path, why)) from None
    except Exception as e:  # empty, truncated or garbage files raise many kinds of errors
        raise UsageError(unusable_checkpoint(path, one_line(e) or type(e).__name__)) from None
    if not (isinstance(ckpt, dict) and CHECKPOINT_KEYS <= set(ckpt)):
        raise UsageError(unusable_checkpoint(path, "not a benchmark.py checkpoint"))
    epochs = ckpt["epochs"]
    if not (isinstance(epochs, list) and len(epochs) <= max_epochs
            and all(isinstance(e, dict) and EPOCH_KEYS <= set(e) for e in epochs)):
        raise UsageError(unusable_checkpoint(path, f"its epoch list does not fit a run of {max_epochs} epochs"))
    return ckpt


def unusable_checkpoint(path: Path, why: str, what: str = "is unreadable") -> str:
    if "weights_only" in why:  # torch's advice to unpickle anything is not ours to repeat
        why = "not loadable as tensors"
    return f"checkpoint {path} {what} ({why}): delete it to retrain that model from scratch, or restore it"


def rng_state(train_loader) -> dict:
    state = {"torch": torch.get_rng_state(), "loader": train_loader.generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, train_loader) -> None:
    # .cpu(): map_location moved every tensor of the checkpoint to the device; RNG states live on the CPU.
    torch.set_rng_state(state["torch"].cpu())
    train_loader.generator.set_state(state["loader"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# ---------------------------------------------------------------------------------------
# Failures: one line each.


def failure_line(e: BaseException, where: Where) -> str:
    saved = f"; every finished epoch is saved ({where.resume_command})" if where.resume_command else ""
    if isinstance(e, OSError):
        return f"failed during {where.stage}: {e}{saved}"
    return (f"out of memory during {where.stage} ({one_line(e)}); start a fresh run with a smaller "
            f"--batch-size or --n-embed{saved}")


def interrupted_line(where: Where) -> str:
    if where.resume_command:
        return (f"interrupted during {where.stage}; every finished epoch is saved. "
                f"Resume with: {where.resume_command}")
    return f"interrupted during {where.stage}; nothing was written"


# ---------------------------------------------------------------------------------------
# Weights & Biases: optional, decided once before training, never waited on for long, silent.


def resolve_wandb_mode(requested: str | None, out_dir: str) -> str:
    """offline / disabled as asked; online only with a login and a server that answers."""
    if requested in ("offline", "disabled"):
        return requested
    if not wandb_logged_in():
        if requested == "online":
            raise UsageError("--wandb online needs a wandb login (`wandb login`, or WANDB_API_KEY); "
                             "or log locally with --wandb offline")
        return "disabled"
    url = wandb_url()
    why = wandb_unreachable(url)
    if why is None:
        return "online"
    if requested == "online":
        raise UsageError(f"--wandb online: {url} cannot be reached ({why}); check the network, "
                         "or log locally with --wandb offline")
    print(f"benchmark.py: warning: {url} cannot be reached ({why}); logging to wandb offline in "
          f"{os.path.join(out_dir, 'wandb')} (upload later with `wandb sync`)", file=sys.stderr)
    return "offline"


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc
    try:
        hosts = netrc.netrc(os.environ.get("NETRC")).hosts
    except (OSError, netrc.NetrcParseError):
        return False
    return any("wandb" in h for h in hosts)


def wandb_url() -> str:
    return os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"


def wandb_unreachable(url: str) -> str | None:
    """None when url answers at all (any HTTP status), else why not. Run in a thread joined
    with a timeout, because a name lookup is not bounded by the socket timeout."""
    outcome: dict = {}

    def probe():
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=WANDB_PROBE_TIMEOUT_S).close()
        except urllib.error.HTTPError:
            pass  # an HTTP error is an answer: the server is there
        except Exception as e:
            outcome["why"] = one_line(getattr(e, "reason", None) or e)
            return
        outcome["ok"] = True

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(WANDB_PROBE_TIMEOUT_S + 1)
    return None if outcome.get("ok") else outcome.get("why", f"no answer within {WANDB_PROBE_TIMEOUT_S:g} s")


class WandbLogger:
    """One wandb run per (dataset, seed, model); a no-op when mode is 'disabled'."""

    def __init__(self, mode: str, project: str, out_dir: str):
        self.mode, self.project, self.out_dir = mode, project, out_dir

    def start(self, name: str, record: dict) -> "WandbRun":
        if self.mode == "disabled":
            return WandbRun()
        import wandb

        # silent/quiet/console="off": wandb prints nothing into our output; init_timeout bounds a hang.
        settings = wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT_S, silent=True, quiet=True, console="off",
                                  show_info=False, show_warnings=False)
        config = {k: v for k, v in record.items() if k not in ("epochs", "status")}
        try:
            run = wandb.init(project=self.project, name=name, mode=self.mode, dir=self.out_dir, config=config,
                             reinit="finish_previous", settings=settings)
        except Exception as e:  # e.g. the server went away since the probe: training matters more
            print(f"benchmark.py: warning: wandb did not start ({one_line(e)}); continuing without it",
                  file=sys.stderr)
            self.mode = "disabled"
            return WandbRun()
        return WandbRun(run)


class WandbRun:
    SUMMARY = ("params", "implementation", "status", "final_val_loss", "final_val_ppl", "best_val_ppl",
               "mean_epoch_time_s", "error")

    def __init__(self, run=None):
        self.run = run

    def log(self, metrics: dict) -> None:
        if self.run is not None:
            self.run.log(metrics)

    def finish(self, record: dict, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.summary.update({k: record[k] for k in self.SUMMARY if k in record})
            self.run.finish(exit_code=exit_code)
