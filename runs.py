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
from common import (LOCK_NAME, FolderLock, Terminated, UsageError, atomic_torch_save, atomic_write_json,
                    interrupt_exit_code, is_oom, one_line, run_metadata)
from config import GENERATED, MQAR_HPARAMS, PAPER_HPARAMS, TrainConfig, flag, is_paper_config
from pretrained import is_saved_model, save_pretrained
from report import print_tables


class RunError(Exception):
    """A failure while training: exit 1."""


class DivergedError(RunError):
    """Training produced a non-finite loss."""


WANDB_PROBE_TIMEOUT_S = 5.0
WANDB_INIT_TIMEOUT_S = 60.0


# ---------------------------------------------------------------------------------------
# Folders: a fresh run never writes into another run's folder.


@dataclass
class RunState:
    """Where the run is, for the line printed on Ctrl-C or a failure, and the folder it holds."""
    stage: str = "start-up"
    resume_command: str | None = None  # set once the run folder can be resumed
    unsaved: tuple[str, int] | None = None  # (dataset/model, epoch): finished, its checkpoint not yet written
    out_dir: str | None = None
    lock: "FolderLock | None" = None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def cache_dir(args: argparse.Namespace) -> Path:
    return Path(args.cache_dir) if args.cache_dir else Path(__file__).resolve().parent / ".cache"


def is_run_dir(path: Path) -> bool:
    return any((path / name).exists() for name in ("config.json", "results.json", "checkpoints"))


def check_folders(cfg: TrainConfig, args: argparse.Namespace) -> None:
    """Every folder we write is (or can be made) a writable folder; what --out-dir holds is
    checked once it is locked (claim_folder)."""
    check_writable(Path(cfg.out_dir), "--resume" if args.resume else "--out-dir")
    check_writable(cache_dir(args), "--cache-dir")


def claim_folder(cfg: TrainConfig, args: argparse.Namespace, state: RunState) -> None:
    """Rank 0 locks --out-dir for the life of the command, then checks it under the lock (so
    no other command can change it in between): a fresh command needs a new or empty folder,
    --resume a run whose exports and temporary files are in order. Every rank raises the
    same refusal, so none waits at a collective for one that stopped."""
    error = None
    if distributed.is_main():
        try:
            state.lock = FolderLock(Path(cfg.out_dir), "--resume" if args.resume else "--out-dir", "benchmark.py")
            if args.resume:
                check_exports(cfg)
                remove_stale_temporaries(Path(cfg.out_dir) / "checkpoints")
            else:
                check_empty(Path(cfg.out_dir), training=not (args.report or args.unigram_only or args.speed_steps))
        except UsageError as e:
            error = str(e)
    error = distributed.gather_objects(error)[0]
    if error is not None:
        raise UsageError(error)


def check_empty(out: Path, training: bool) -> None:
    """A new command writes only into a new or empty folder (the lock file, ours, aside): the
    results, tables, figures and samples of another run or of a user are never overwritten."""
    others = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME)
    if not others:
        return
    if training and is_run_dir(out):
        raise UsageError(f"--out-dir {out} already holds a run; continue it with "
                         f"`{shlex.join(distributed.launcher())} benchmark.py --resume {shlex.quote(str(out))}`, "
                         "or choose another --out-dir")
    listed = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
    raise UsageError(f"--out-dir {out} is not empty (it holds {listed}); a new command writes into a new or "
                     "empty folder only: choose another --out-dir")


def check_exports(cfg: TrainConfig) -> None:
    """On --resume, before any training: each model's export folder is absent, empty or an
    export (replaced when the model finishes); anything else would stop the run after training."""
    for dataset, seed, model_name in planned_runs(cfg):
        folder = Path(cfg.out_dir) / "models" / run_name(cfg.for_seed(seed), dataset, model_name)
        if folder.exists() and not (folder.is_dir() and (not any(folder.iterdir()) or is_saved_model(folder))):
            raise UsageError(f"--resume {cfg.out_dir}: {folder} holds something other than an exported model, "
                             f"where {dataset}/{model_name} is exported when it finishes; move it elsewhere")


def remove_stale_temporaries(folder: Path) -> None:
    """The temporary files of checkpoint writes that a killed run (kill -9, a power cut) left;
    under the lock no write of ours is in progress."""
    for tmp in folder.glob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)


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


def check_same_data(cfg: TrainConfig, dataset: str, saved: dict, now: dict) -> None:
    changed = [name for key, name in (("train", "train data"), ("validation", "validation data"),
                                      ("tokenizer", "tokenizer")) if saved[key] != now[key]]
    if saved["vocab_size"] != now["vocab_size"] and "tokenizer" not in changed:
        changed.append("tokenizer")
    if changed:
        source = cfg.data_dirs.get(dataset, "the hub" if dataset not in GENERATED else "the generator")
        what = ", ".join(changed[:-1]) + (" and " if len(changed) > 1 else "") + changed[-1]
        raise UsageError(f"--resume {cfg.out_dir}: the {what} of {dataset} ({source}) changed "
                         "since the run started; restore them, or start a fresh run with another --out-dir")


# ---------------------------------------------------------------------------------------
# The run's plan and its resume command.


def planned_runs(cfg: TrainConfig) -> list[tuple[str, int, str]]:
    return [(d, seed, m) for d, models in cfg.runs.items() for seed in cfg.seeds for m in models]


def in_plan_order(cfg: TrainConfig, published: dict) -> list[dict]:
    """The records of ``published`` ((dataset, model, seed) -> record) that the run plans, in its order."""
    keys = [(d, m, s) for d, s, m in planned_runs(cfg)]
    return [published[k] for k in keys if k in published]


def run_name(cfg: TrainConfig, dataset: str, model_name: str) -> str:
    """<dataset>-<model>, plus -seed<S> when the run has several seeds."""
    return f"{dataset}-{model_name}" + (f"-seed{cfg.seed}" if len(cfg.seeds) > 1 else "")


def checkpoint_path(cfg: TrainConfig, dataset: str, model_name: str) -> Path:
    return Path(cfg.out_dir) / "checkpoints" / f"{run_name(cfg, dataset, model_name)}.pt"


def start_run(cfg: TrainConfig, data: dict, args: argparse.Namespace, explicit: set[str], state: RunState) -> None:
    """A fresh run writes its config.json (with the data's fingerprints) now, and only now."""
    distributed.barrier()  # under torchrun: every process has checked the folders before one is written
    if not args.resume and distributed.is_main():
        fingerprints = {dataset: prepared.fingerprint for dataset, prepared in data.items()}
        atomic_write_json(Path(cfg.out_dir) / "config.json", {**cfg.to_json(), "data_fingerprint": fingerprints})
    state.resume_command = resume_command(cfg, args, explicit)


def resume_command(cfg: TrainConfig, args: argparse.Namespace, explicit: set[str]) -> str:
    """The command that continues this run, with the flags given that --resume accepts."""
    command = [*distributed.launcher(), "benchmark.py", "--resume", cfg.out_dir]
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


def publish_model(cfg: TrainConfig, dataset: str, model_name: str, model, data, record: dict) -> None:
    """Export the model to <out-dir>/models/<run name>/ (config.json, model.safetensors, the code
    transformers opens it with, the model card README.md and the dataset's tokenizer.json; MQAR
    has no tokenizer) and, on text, record its continuations of fixed validation prompts.
    Deterministic, so a resumed run re-publishes the same."""
    if not distributed.is_main():
        return
    val_loader = data.validation
    tokenizer = run_tokenizer(cfg.out_dir, data)
    folder = Path(cfg.out_dir) / "models" / run_name(cfg, dataset, model_name)
    from model_card import model_card  # here: it imports data, and so datasets, which only publishing needs

    files = {"README.md": model_card(record, model), **({"tokenizer.json": tokenizer.to_str()} if tokenizer else {})}
    try:
        save_pretrained(model, folder, extra_files=files)
    except ValueError as e:  # a folder there that holds something else: never overwritten
        raise RunError(f"cannot export {dataset}/{model_name}: {e}") from None
    record["export"] = str(folder.relative_to(cfg.out_dir))
    if tokenizer is not None:
        record["samples"] = sample_continuations(model, val_loader.dataset.blocks, tokenizer, cfg.seed)


def run_tokenizer(out_dir: str, data):
    """The tokenizer the run was trained with (from its cache file, checked against the data's
    fingerprint: data.PreparedData), or None for a dataset without one (MQAR)."""
    path = data.info.get("tokenizer_path")
    if path is None:
        return None
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception:
        tokenizer = None
    expected = data.fingerprint["tokenizer"]
    if tokenizer is None or hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest() != expected:
        raise RunError(f"the tokenizer cache {path} vanished or changed during the run, so the model cannot be "
                       f"exported with its tokenizer; resume the run (python benchmark.py --resume {out_dir})")
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


CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "rng", "epochs", "run_config"}


EPOCH_KEYS = {"epoch", "train_loss", "val_loss", "val_ppl", "epoch_time_s", "tokens_per_s"}


def run_config(cfg: TrainConfig, dataset: str, model_name: str, fingerprint: dict) -> dict:
    """What sets the numbers of one (dataset, seed, model) run, stored in its checkpoints so
    that --resume refuses a checkpoint of another run: every hyperparameter (cfg.seed is
    the run's own seed), the Mamba implementation, the process count, and the data's
    fingerprint. Not the other runs of the job, folders or workers: they change no number."""
    defaults = {**PAPER_HPARAMS, **MQAR_HPARAMS}
    settings = {k: float(getattr(cfg, k)) if isinstance(v, float) else getattr(cfg, k)
                for k, v in defaults.items()}  # 1 == 1.0
    return {**settings, "mamba_impl": cfg.mamba_impl, "world_size": cfg.world_size, "dataset": dataset,
            "model": model_name, "data": fingerprint}


def save_checkpoint(training, train_loader, path: Path) -> None:
    if not distributed.is_main():
        return
    atomic_torch_save({"model": training.model.state_dict(), "optimizer": training.optimizer.state_dict(),
                       "scheduler": training.scheduler.state_dict(), "rng": rng_state(train_loader),
                       "epochs": training.epochs, "run_config": training.run_config}, path)


def load_checkpoint(training, train_loader, path: Path, device: torch.device, max_epochs: int) -> None:
    ckpt = read_checkpoint(path, device, max_epochs)
    check_same_run(path, ckpt["run_config"], training.run_config)
    try:
        training.model.load_state_dict(ckpt["model"])
        training.optimizer.load_state_dict(ckpt["optimizer"])
        training.scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"], train_loader)
    except Exception as e:
        raise UsageError(unusable_checkpoint(path, one_line(e), "does not fit this run")) from None
    training.epochs[:] = ckpt["epochs"]


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
    if not (isinstance(ckpt, dict) and CHECKPOINT_KEYS <= set(ckpt) and isinstance(ckpt["run_config"], dict)):
        raise UsageError(unusable_checkpoint(path, "not a benchmark.py checkpoint"))
    epochs = ckpt["epochs"]
    if not (isinstance(epochs, list) and len(epochs) <= max_epochs
            and all(isinstance(e, dict) and EPOCH_KEYS <= set(e) for e in epochs)):
        raise UsageError(unusable_checkpoint(path, f"its epoch list does not fit a run of {max_epochs} epochs"))
    return ckpt


def check_same_run(path: Path, saved: dict, expected: dict) -> None:
    """A checkpoint resumes only the run it was written by (the settings and data of runs.run_config)."""
    if saved == expected:
        return
    keys = sorted(set(saved) | set(expected), key=lambda k: (k == "data", k))
    differ = [k for k in keys if saved.get(k) != expected.get(k)]
    shown = "; ".join("its data differs" if k == "data" else f"{flag(k)} {saved.get(k)} there, {expected.get(k)} here"
                      for k in differ[:3]) + (f"; and {len(differ) - 3} more" if len(differ) > 3 else "")
    raise UsageError(f"checkpoint {path} belongs to another run ({shown}): delete it to retrain that model "
                     "from scratch, or put back this run's own checkpoint")


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


def saved_epochs(state: RunState) -> str:
    """What a resume keeps. An epoch whose checkpoint was being written is lost: say so."""
    if state.unsaved is None:
        return "every finished epoch is saved"
    name, epoch = state.unsaved
    return (f"every finished epoch is saved except epoch {epoch} of {name}, whose checkpoint was not written "
            f"({name} resumes after epoch {epoch - 1})")


def failed(e: BaseException, state: RunState) -> int:
    """The exit code and one line of a command that stopped; a bug is raised again, since its
    traceback is the useful report."""
    if isinstance(e, UsageError):
        return fail(f"error: {e}", 2)
    if isinstance(e, DivergedError):  # raised once every run is done: the others are in the tables
        print_tables(Path(state.out_dir))
    if isinstance(e, RunError):
        return fail(str(e), 1)
    if isinstance(e, KeyboardInterrupt):  # Ctrl-C or SIGTERM: under torchrun every rank has it, rank 0 says it
        code = interrupt_exit_code(e)
        return fail(interrupted_line(state, e), code) if distributed.is_main() else code
    if isinstance(e, (MemoryError, RuntimeError, OSError)):
        if distributed.is_peer_failure(e):
            return fail(peer_failure_line(e, state), 1)
        if isinstance(e, OSError) or is_oom(e):
            return fail(failure_line(e, state), 1)
    raise e


def fail(line: str, code: int) -> int:
    who = f"benchmark.py (rank {distributed.rank()})" if distributed.world_size() > 1 else "benchmark.py"
    print(f"{who}: {line}", file=sys.stderr)
    return code


def failure_line(e: BaseException, state: RunState) -> str:
    saved = f"; {saved_epochs(state)} ({state.resume_command})" if state.resume_command else ""
    if isinstance(e, OSError):
        return f"failed during {state.stage}: {e}{saved}"
    return (f"out of memory during {state.stage} ({one_line(e)}); start a fresh run with a smaller "
            f"--batch-size or --n-embed{saved}")


def peer_failure_line(e: BaseException, state: RunState) -> str:
    saved = f"; {saved_epochs(state)}. Resume with: {state.resume_command}" if state.resume_command else ""
    return (f"failed during {state.stage}: another process of the job stopped, hangs or cannot be reached "
            f"({one_line(e)}){saved}")


def interrupted_line(state: RunState, e: KeyboardInterrupt) -> str:
    what = "stopped by SIGTERM" if isinstance(e, Terminated) else "interrupted"
    if state.resume_command:
        return f"{what} during {state.stage}; {saved_epochs(state)}. Resume with: {state.resume_command}"
    return f"{what} during {state.stage}; nothing was written"


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


def new_record(cfg: TrainConfig, dataset: str, model_name: str, training, info: dict, device) -> dict:
    """The results.json record of one (dataset, seed, model) run, before training (training: benchmark.Training)."""
    model = training.model
    return {"dataset": dataset, "model": model_name, "seed": cfg.seed, "params": model.num_params(),
            "implementation": model.implementation + ("-residual" if getattr(model, "residual", False) else ""),
            "status": "running", "steps_per_epoch": training.steps_per_epoch, "epochs": training.epochs,
            "model_config": training.model_config.to_dict(), "data": info,
            **run_metadata(device), **distributed.describe(),  # world_size, backend
            "paper_config": is_paper_config(cfg, dataset, info), "config": cfg.to_json()}


def summarize(record: dict) -> None:
    """A finished run's record: its final and best numbers from the epochs."""
    ep = record["epochs"]
    record.update(status="done", final_val_loss=ep[-1]["val_loss"], final_val_ppl=ep[-1]["val_ppl"],
                  best_val_ppl=min(e["val_ppl"] for e in ep),
                  mean_epoch_time_s=sum(e["epoch_time_s"] for e in ep) / len(ep))
    if record["config"]["compile"] and ep[0].get("later_step_s_mean") is not None:  # the first step's extra time
        record["compile_time_s"] = ep[0]["first_step_s"] - ep[0]["later_step_s_mean"]
    record.update({f"final_{k}": v for k, v in ep[-1].items() if k.startswith("recall_accuracy")})
