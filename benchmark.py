"""Reproduce Table 1 (GAM vs Transformer vs Mamba) and Table 3 (GAM ablations).

    python benchmark.py                          # the paper's setup (GPU, hub data)
    python benchmark.py --preset smoke           # embedded corpus, tiny models, < 2 min on CPU
    python benchmark.py --preset cpu --data-dir wikitext2=PATH/wikitext-2-raw
    python benchmark.py --preset ablation        # Table 3
    python benchmark.py --resume runs/<dir>      # continue a killed run
    torchrun --standalone --nproc_per_node 4 benchmark.py ...   # data-parallel (README: Multi-GPU)

Every hyperparameter of the paper is a flag whose default is the paper's value;
a preset changes some of them and explicit flags override the preset. Outputs go
to --out-dir: results.json, table1.md, table3.md (ablations), curves.png,
config.json (the run's settings and a fingerprint of its data), per-run checkpoints, every
finished model under models/<run name>/ (from_pretrained, with its tokenizer) and samples.md.

Exit codes: 0 done; 2 a problem with the command line, the run folder or the data, found
before anything is written or trained (a folder that another command holds, or that is not
empty, included); 1 a failure while training (non-finite loss, out of memory, a full disk);
130 interrupted (Ctrl-C) and 143 stopped (SIGTERM), each with the command that resumes the run.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import torch

import distributed
import runs
from baselines import build_lm
from common import (StopSignals, atomic_write_json, atomic_write_text, autocast_context, free_memory,
                    is_oom, one_line, run_metadata, sync)
from config import (TrainConfig, UsageError, build_parser, explicit_flags, family_of, model_config, rank_device,
                    resolve_config, resolve_device, saved_fingerprints)
from evaluation import evaluate, evaluate_test
from gam_model import ModelConfig
from report import print_tables, speed_markdown, speed_row, write_report, write_results, write_unigram
from runs import DivergedError, RunState

# The training loss is read on the host (a device sync) every LOG_EVERY steps, not every step.
LOG_EVERY = 25


# ---------------------------------------------------------------------------------------
# From the command line to loss.backward(): the runs, the epochs of a run, the steps of an epoch.


def main(argv: list[str] | None = None) -> int:
    """The command: its checks, then every planned (dataset, seed, model) run in turn, results
    rewritten after each. On --resume the published records of an earlier session stay until
    replaced, so a failure never shrinks them. A run that diverges is recorded as such and the
    others still train (a comparison keeps its other rows); the job then ends with
    DivergedError (exit 1) naming each."""
    parser = build_parser()
    args = parser.parse_args(argv)  # a malformed flag: argparse's one line, exit 2
    state = RunState()
    with StopSignals().installed() as stop:  # SIGTERM, like Ctrl-C, ends in the --resume line
        try:
            job = prepare_job(parser, args, state)
            if isinstance(job, int):  # --report, --speed-steps or --unigram-only: done, nothing trained
                return job
            cfg, data, device, logger = job
            published, diverged = runs.read_published(Path(cfg.out_dir)), []
            for dataset, seed, model_name in runs.planned_runs(cfg):
                record = train_run(cfg.for_seed(seed), dataset, model_name, data[dataset], device, logger, state)
                published[(dataset, model_name, seed)] = record
                write_results(runs.in_plan_order(cfg, published), Path(cfg.out_dir))
                if record["status"] == "diverged":
                    diverged.append(record["error"])
            # Under torchrun the ranks end together: one that tears down its process group while
            # another still works (rank 0 exports the last model) can abort in gloo (SIGABRT).
            distributed.barrier()
            if diverged:
                finished = Path(cfg.out_dir) / "results.json"
                raise DivergedError(" | ".join(diverged) + f" (the other runs finished: {finished})")
            print_tables(Path(cfg.out_dir))
            return 0
        except BaseException as e:
            stop.disarm()  # the command is ending: a second signal must not cut its line short
            return runs.failed(e, state)
        finally:
            state.release()  # the run folder's lock


def train_run(cfg, dataset, model_name, data, device, logger, state) -> dict:
    """Train and evaluate one model on one dataset, resuming from its checkpoint if present:
    each remaining epoch is trained, evaluated, then checkpointed (a kill loses one epoch at most)."""
    name, path = f"{dataset}/{model_name}", runs.checkpoint_path(cfg, dataset, model_name)
    training = start_training(cfg, dataset, model_name, data, device, path)
    record = runs.new_record(cfg, dataset, model_name, training, data.info, device)
    print(f"  {model_name}: {record['params']:,} parameters ({record['implementation']}) on {dataset}")
    run = logger.start(runs.run_name(cfg, dataset, model_name), record)
    try:
        for epoch in range(len(training.epochs), cfg.epochs):
            state.stage = f"{name} epoch {epoch + 1}/{cfg.epochs}"
            data.train.sampler.set_epoch(epoch)  # this epoch's order: a function of (seed, epoch)
            distributed.reseed(cfg.seed, epoch)
            train_loss, seconds, tokens = train_epoch(training, data.train, cfg, device, state.stage, run.log)
            end_epoch(training, cfg, data, device, (train_loss, seconds, tokens), run, state, name, path)
    except DivergedError as e:
        record["status"] = "diverged"
        record["error"] = (f"{name}: {e}; stopped. Last good checkpoint: "
                           f"{path if path.is_file() else 'none (it diverged in its first epoch)'}")
    except BaseException:
        run.finish(record, exit_code=1)
        raise
    if record["status"] != "diverged":
        runs.summarize(record)
        if data.test is not None:
            state.stage = f"{name} test split"
            evaluate_test(training.model, data.test, device, cfg.dtype, record)
        state.stage = f"{name} export and samples"
        runs.publish_model(cfg, dataset, model_name, training.model, data, record)
    run.finish(record)
    return record


def train_epoch(training: Training, loader, cfg: TrainConfig, device: torch.device, desc: str, log_step):
    """One epoch of t.steps_per_epoch steps; returns (mean train loss, wall time of the loop, tokens).

    The losses are summed on the device and read every LOG_EVERY steps and at the end (one
    sync each, not one per step); a non-finite loss stops the epoch at that read, naming the
    first step that produced one. The mean is the same sum as a per-step read's (float64)."""
    from tqdm import tqdm

    training.model.train()
    tokens, window = 0, LossWindow(device)
    sync(device)
    start = time.perf_counter()
    batches = iter(loader)  # one iterator: the loader (and its workers) start once per epoch
    # A bar on terminals only (disable=None); closed on any exit, so a Ctrl-C line reads clean.
    with tqdm(total=training.steps_per_epoch, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0,
              disable=None) as bar:
        for i in range(training.steps_per_epoch):
            x, y = next(batches)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            window.add(train_step(training, x, y, cfg), training.scheduler.last_epoch)
            tokens += x.numel()
            if i == 0:  # the first step alone (with --compile: the compilation), one extra sync
                sync(device)
                first = time.perf_counter() - start
            lr = training.scheduler.get_last_lr()[0]
            metrics = {"train/lr": lr, "step": training.scheduler.last_epoch}
            if (i + 1) % LOG_EVERY == 0 or i + 1 == training.steps_per_epoch:
                metrics["train/loss"] = window.read()
                bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", lr=f"{lr:.2e}", refresh=False)
            bar.update()
            log_step(metrics)
    del batches  # with --max-train-blocks it is left unfinished; this stops its workers now
    sync(device)
    seconds = time.perf_counter() - start
    rest = (seconds - first) / (training.steps_per_epoch - 1) if training.steps_per_epoch > 1 else None
    training.step_timing = {"first_step_s": first, "later_step_s_mean": rest}
    return window.total / training.steps_per_epoch, seconds, tokens


def train_step(training: Training, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """One optimizer step (the author's: AdamW, grad-norm clip, per-step schedule); returns the
    loss as a device tensor (reading it is the caller's sync). fp16 on CUDA: a GradScaler."""
    training.optimizer.zero_grad(set_to_none=True)
    with autocast_context(cfg.dtype, x.device):
        _, loss = training.step_module(x, y)
    if training.scaler is None:
        loss.backward()
    else:
        training.scaler.scale(loss).backward()
        training.scaler.unscale_(training.optimizer)  # clip the true gradients
    # No error_if_nonfinite: that would read the norm on the host each step (a sync).
    if cfg.grad_clip > 0:  # 0: no clipping (a max norm of 0 would zero every gradient)
        torch.nn.utils.clip_grad_norm_(training.model.parameters(), cfg.grad_clip)
    if training.scaler is None:
        training.optimizer.step()
    else:
        training.scaler.step(training.optimizer)  # skips a step with inf/nan gradients (its own sync)
        training.scaler.update()
    training.scheduler.step()
    return loss.detach()


# ---------------------------------------------------------------------------------------
# The pieces of a run: its Training (model, optimizer, schedule), built or resumed; the end of an epoch.


@dataclass
class Training:
    """What one run updates step by step, and the stats of its finished epochs."""
    model: torch.nn.Module
    model_config: ModelConfig
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    steps_per_epoch: int
    epochs: list = field(default_factory=list)
    scaler: torch.amp.GradScaler | None = None  # fp16 on CUDA only
    step_timing: dict = field(default_factory=dict)  # of the last epoch: first step (compilation) vs the rest
    ddp: torch.nn.Module | None = None  # under torchrun: the DistributedDataParallel around model
    run_config: dict = field(default_factory=dict)  # what its checkpoints are tied to (runs.run_config)

    @property
    def step_module(self) -> torch.nn.Module:
        """What a training step calls: the DDP wrapper (it averages the gradients over the
        processes) or the model itself. Checkpoints, records and exports use model."""
        return self.model if self.ddp is None else self.ddp


def start_training(cfg: TrainConfig, dataset: str, model_name: str, data, device: torch.device, path: Path):
    """The Training of one run at its start: from its checkpoint when there is one."""
    data.train.generator.manual_seed(cfg.seed)
    data.train.sampler.seed = cfg.seed  # with --seeds, each seed has its own data order
    training = build_training(cfg, model_name, data.info["vocab_size"], len(data.train), device)
    training.run_config = runs.run_config(cfg, dataset, model_name, data.fingerprint)
    if path.is_file():
        runs.load_checkpoint(training, data.train, path, device, cfg.epochs)
        print(f"  resumed {dataset}/{model_name} after epoch {len(training.epochs)} from {path}")
    return training


def build_training(cfg: TrainConfig, model_name: str, vocab_size: int, n_batches: int, device: torch.device) -> Training:
    torch.manual_seed(cfg.seed)  # the same init for a model whatever ran before it
    try:
        model, model_cfg = build_model(cfg, model_name, vocab_size, device, cfg.mamba_impl)
    except (ValueError, ImportError) as e:  # e.g. --mamba-impl mamba_ssm without CUDA or the package
        raise UsageError(f"cannot build {model_name}: {one_line(e)} (see --mamba-impl)") from None
    except (MemoryError, RuntimeError) as e:
        if not is_oom(e):
            raise
        raise UsageError(f"not enough memory to build {model_name} with --n-embed {cfg.n_embed}, --n-layer "
                         f"{cfg.n_layer}, vocabulary {vocab_size} ({one_line(e)}); choose a smaller --n-embed "
                         "(or --n-layer, --num-memory-slots, --vocab-size)") from None
    setattr(model, "check_inputs", False)  # ids checked once at load time (data.PreparedData.check_token_ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  weight_decay=cfg.weight_decay)
    steps = steps_per_epoch(cfg, n_batches)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, cfg.epochs * steps))
    scaler = torch.amp.GradScaler("cuda") if cfg.dtype == "fp16" and device.type == "cuda" else None
    if cfg.compile:  # in place (Module.compile): state_dict keys, checkpoints and methods stay; at the first step
        model.compile()
    return Training(model, model_cfg, optimizer, scheduler, steps, scaler=scaler,
                    ddp=distributed.data_parallel(model, device))


def build_model(cfg: TrainConfig, model_name: str, vocab_size: int, device: torch.device, mamba_impl: str):
    model_cfg = model_config(cfg, model_name, vocab_size)
    family, options = family_of(model_name)
    kwargs = dict(n_head=cfg.n_head, attention=cfg.attention, d_state=cfg.d_state, d_conv=cfg.d_conv,
                  expand=cfg.expand, mamba_residual=cfg.mamba_residual, mamba_impl=mamba_impl)
    model = build_lm(family, model_cfg, device=device, **{**kwargs, **options})  # a control's options win
    return model.to(device), model_cfg


def steps_per_epoch(cfg: TrainConfig, n_batches: int) -> int:
    """Batches per epoch: all of them, or the first ones of each epoch's shuffled order with
    --max-train-blocks. The scheduler's length and the training loop both use this."""
    if not cfg.max_train_blocks:
        return n_batches
    return min(n_batches, math.ceil(cfg.max_train_blocks / cfg.batch_size))


def lr_lambda(warmup_steps: int, total_steps: int):
    """Linear warm-up, then cosine decay to 0 over the remaining steps (per step, as the author)."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def end_epoch(training: Training, cfg: TrainConfig, data, device, trained: tuple, run, state: RunState, name: str,
              path: Path) -> None:
    """After an epoch's steps: evaluate, record and print the epoch, then checkpoint it."""
    train_loss, seconds, tokens = trained
    train_loss, tokens = distributed.all_mean(train_loss), distributed.all_sum([tokens])[0]
    rf = model_config(cfg, "gam", 1).receptive_field  # full GAM's: the recall split of every model
    ev = evaluate(training.model, data.validation, device, rf, dtype=cfg.dtype)
    val_loss, epoch = ev["val_loss"], len(training.epochs) + 1
    if not math.isfinite(val_loss):
        raise DivergedError(f"non-finite validation loss ({val_loss}) after epoch {epoch}")
    stats = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
             "val_ppl": math.exp(min(val_loss, 700.0)), "epoch_time_s": seconds,
             "tokens_per_s": tokens / seconds, **training.step_timing, **ev}
    training.epochs.append(stats)
    state.unsaved = (name, epoch)  # printed as finished below, lost if stopped before it is saved
    run.log({f"epoch/{k}": v for k, v in stats.items() if k != "val_loss_by_position"})
    recall = f" | recall {ev['recall_accuracy']:.3f}" if "recall_accuracy" in ev else ""
    print(f"  epoch {epoch}/{cfg.epochs}: train {train_loss:.4f} | val {val_loss:.4f} "
          f"| ppl {stats['val_ppl']:.2f}{recall} | {seconds:.1f} s | {stats['tokens_per_s']:,.0f} tok/s")
    state.stage = f"{name} checkpoint of epoch {epoch}/{cfg.epochs}"
    runs.save_checkpoint(training, data.train, path)
    state.unsaved = None


class LossWindow:
    """Training losses summed on the device (float64) and read on the host only on ``read()``.

    ``read()`` returns the mean loss since the previous read and adds the window's sum to
    ``total``; it raises DivergedError when a loss in the window was not finite, naming the
    first such step (recorded on the device as it happened)."""

    def __init__(self, device: torch.device):
        self.sum = torch.zeros((), dtype=torch.float64, device=device)
        self.first_bad = torch.full((), -1.0, dtype=torch.float64, device=device)
        self.count, self.total = 0, 0.0

    def add(self, loss: torch.Tensor, step: int) -> None:
        loss = loss.detach().double()
        self.sum += loss
        bad = (self.first_bad < 0) & ~torch.isfinite(loss)
        self.first_bad = torch.where(bad, float(step), self.first_bad)  # no sync: a device select
        self.count += 1

    def read(self) -> float:
        window_sum, first_bad = torch.stack([self.sum, self.first_bad]).tolist()  # the one sync
        if first_bad >= 0 or not math.isfinite(window_sum):
            raise DivergedError(f"non-finite training loss ({window_sum / self.count}) at step {int(first_bad)}")
        value = window_sum / self.count
        self.total += window_sum
        self.sum.zero_()
        self.count = 0
        return value


# ---------------------------------------------------------------------------------------
# Before the first step: config, run folder, data (prepared, checked and fingerprinted), preflight.


class Job(NamedTuple):
    """What a training command has checked and prepared before its first step."""
    cfg: TrainConfig
    data: dict  # dataset -> data.PreparedData
    device: torch.device
    logger: runs.WandbLogger


def prepare_job(parser, args, state: RunState) -> Job | int:
    """The config, the run folder (claimed), the data and the checks before any training; the
    modes that train nothing (--report, --speed-steps, --unigram-only) run here and return
    their exit code."""
    explicit = explicit_flags(parser, args)
    cfg = resolve_config(args, explicit)
    device = rank_device(resolve_device(args.device))
    runs.check_folders(cfg, args)
    if args.lr_sweep and not args.report:
        raise UsageError("--lr-sweep goes with --report RUN_DIR ...: it reports finished runs")
    if args.report:  # trains nothing, in one process: before (and without) a process group
        if distributed.world_size() > 1:
            raise UsageError("--report trains nothing: run it with python, not torchrun")
        runs.claim_folder(cfg, args, state)
        return write_report(args.report, explicit, Path(cfg.out_dir))
    distributed.init(device, args.dist_timeout)  # under torchrun; nothing in a plain run
    cfg = replace(cfg, out_dir=distributed.gather_objects(cfg.out_dir)[0])  # rank 0's runs/<timestamp>
    state.out_dir = cfg.out_dir
    runs.claim_folder(cfg, args, state)  # before anything is written into it
    if not distributed.is_main():
        sys.stdout = open(os.devnull, "w")  # one copy of the progress lines: rank 0's
    if args.resume:  # the folder already holds a run: a Ctrl-C from here on can be resumed
        state.resume_command = runs.resume_command(cfg, args, explicit)
    mode = runs.resolve_wandb_mode(args.wandb, cfg.out_dir) if distributed.is_main() else "disabled"
    logger = runs.WandbLogger(mode, args.wandb_project, cfg.out_dir)
    print(f"benchmark: preset {cfg.preset}, device {device}, out-dir {cfg.out_dir}, wandb {logger.mode}")
    if args.speed_steps:
        return measure_speed(cfg, device, args.speed_steps, state)
    saved = saved_fingerprints(Path(cfg.out_dir)) if args.resume else None
    data = prepare_data(cfg, runs.cache_dir(args), state, saved)
    if args.unigram_only:
        return write_unigram(data, Path(cfg.out_dir))
    preflight(cfg, data, device, state)
    runs.start_run(cfg, data, args, explicit, state)
    return Job(cfg, data, device, logger)


def prepare_data(cfg: TrainConfig, cache: Path, state: RunState, saved: dict | None = None) -> dict:
    """dataset -> data.PreparedData. On --resume (``saved``: the fingerprints in config.json) a
    changed train set, validation set or tokenizer is refused, since the checkpoints were
    trained on the old ones."""
    data = {}
    for dataset in cfg.runs:
        state.stage = f"preparing {dataset}"
        prepared = load_dataset(cfg, dataset, cache)
        info = prepared.info
        if saved is not None:
            runs.check_same_data(cfg, dataset, saved[dataset], prepared.fingerprint)
        info["unigram_val_ppl"] = None if dataset == "mqar" else prepared.unigram_perplexity()
        unigram = f", unigram validation PPL {info['unigram_val_ppl']:.2f}" if info["unigram_val_ppl"] else ""
        test = f" / {info['blocks']['test']:,} test" if prepared.test is not None else ""
        print(f"{dataset}: {info['blocks']['train']:,} train / {info['blocks']['validation']:,} validation{test} "
              f"blocks, vocab {info['vocab_size']:,}{unigram}")
        data[dataset] = prepared
    runs.check_ranks_agree({dataset: prepared.fingerprint for dataset, prepared in data.items()})
    return data


def load_dataset(cfg: TrainConfig, dataset: str, cache: Path):
    """The data.PreparedData of one dataset, its token ids checked; a DataError is bad input,
    and so is data too large for memory (found before anything is written)."""
    from data import DataError

    try:
        prepared = build_dataset(cfg, dataset, cache)
    except DataError as e:
        raise UsageError(str(e)) from None
    except (MemoryError, RuntimeError) as e:
        if not is_oom(e):
            raise
        fewer = ("--mqar-train-examples or --mqar-val-examples" if dataset == "mqar"
                 else "--max-train-rows or --max-val-rows")
        raise UsageError(f"not enough memory to prepare {dataset} ({one_line(e)}); choose fewer {fewer}") from None
    try:
        prepared.check_token_ids()
    except DataError as e:
        raise UsageError(f"{dataset}: {e}") from None
    return prepared


def build_dataset(cfg: TrainConfig, dataset: str, cache: Path):
    from data import build_loaders, build_mqar_loaders

    shard = dict(rank=distributed.rank(), world_size=distributed.world_size())
    if dataset == "mqar":
        return build_mqar_loaders(
            vocab_size=cfg.vocab_size, block_size=cfg.block_size, num_kv_pairs=cfg.mqar_kv_pairs,
            num_train=cfg.mqar_train_examples, num_validation=cfg.mqar_val_examples,
            batch_size=cfg.batch_size, seed=cfg.seed, num_workers=cfg.num_workers, **shard)
    return build_loaders(
        dataset, data_dir=cfg.data_dirs.get(dataset), block_size=cfg.block_size,
        batch_size=cfg.batch_size, vocab_size=cfg.vocab_size, tokenizer_splits=cfg.tokenizer_splits,
        max_train_rows=cfg.max_train_rows, max_val_rows=cfg.max_val_rows, cache_dir=str(cache),
        seed=cfg.seed, num_workers=cfg.num_workers, **shard)


def preflight(cfg: TrainConfig, data: dict, device: torch.device, state: RunState) -> None:
    """Before anything is written: every model can be allocated, and every checkpoint of the
    run is readable and loads into its model, optimizer and scheduler."""
    for dataset, models in cfg.runs.items():
        train_loader, info = data[dataset].train, data[dataset].info
        for model_name in models:
            state.stage = f"checking {dataset}/{model_name}"
            seeded = cfg.for_seed(cfg.seeds[0])
            training = build_training(seeded, model_name, info["vocab_size"], len(train_loader), device)
            for seed in cfg.seeds:
                path = runs.checkpoint_path(cfg.for_seed(seed), dataset, model_name)
                training.run_config = runs.run_config(cfg.for_seed(seed), dataset, model_name, data[dataset].fingerprint)
                if path.exists():
                    runs.load_checkpoint(training, train_loader, path, device, cfg.epochs)
            del training
            free_memory(device)


# ---------------------------------------------------------------------------------------
# Training speed side by side (Table 1's time column, measured fairly on a shared machine).


SPEED_WARMUP_STEPS = 2  # untimed: the first steps allocate optimizer state and warm caches

def measure_speed(cfg: TrainConfig, device: torch.device, steps: int, state: RunState) -> int:
    """Median step time and tokens/s of every model of the run, one step of each in turn, so
    that every model sees the same machine load; random tokens (speed does not depend on them)."""
    if distributed.world_size() > 1:
        raise UsageError("--speed-steps times one process: run it with python, not torchrun")
    models = list(dict.fromkeys(m for ms in cfg.runs.values() for m in ms))
    trainings = {m: build_training(cfg, m, cfg.vocab_size, SPEED_WARMUP_STEPS + steps, device) for m in models}
    g = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.block_size + 1), generator=g).to(device)
    x, y = ids[:, :-1], ids[:, 1:]
    seconds, first = {m: [] for m in models}, {}
    for i in range(SPEED_WARMUP_STEPS + steps):
        for m, training in trainings.items():
            state.stage = f"speed: {m} step {i + 1}/{SPEED_WARMUP_STEPS + steps}"
            training.model.train()
            sync(device)
            start = time.perf_counter()
            train_step(training, x, y, cfg)
            sync(device)
            if i >= SPEED_WARMUP_STEPS:
                seconds[m].append(time.perf_counter() - start)
            first.setdefault(m, time.perf_counter() - start)  # with --compile: the compilation
    rows = [{**speed_row(m, trainings[m], seconds[m], cfg), "first_step_s": first[m]} for m in models]
    out_dir = Path(cfg.out_dir)
    atomic_write_json(out_dir / "speed.json", {"rows": rows, "steps": steps, "warmup_steps": SPEED_WARMUP_STEPS,
                                               **run_metadata(device), "config": cfg.to_json()})
    atomic_write_text(out_dir / "speed.md", speed_markdown(rows, cfg, device))
    print((out_dir / "speed.md").read_text())
    return 0


if __name__ == "__main__":
    try:
        code = main()
    finally:
        distributed.close()
    sys.exit(code)
