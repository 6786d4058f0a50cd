"""Table 2 of "Gated Associative Memory" (arXiv:2509.00605): time and peak memory of
ONE block (forward + backward) versus sequence length.

    python scale.py                                    # the paper's sweep, all four blocks
    python scale.py --device cpu --models gam transformer --batch-size 1 --seq-lens 256 512
    python scale.py --mode decode --device cpu --seq-lens 256 1024 4096   # one generated token

--mode decode: per (model, context length T) point, the language model (ModelConfig defaults,
BLOCK_SIZE T + 2, untrained weights) in eval mode encodes a T-token context once, then the time
of one more token through the streaming path (``stream``, as ``generate`` with ``use_cache``)
is measured (median of --iters after --warmup), and the bytes of the decoding state it holds per
sequence, counted exactly from the tensors (GAM: the last k-1 normalised inputs per layer;
Transformer: the KV cache of T positions; Mamba: the conv and SSM states). Beside it, for
T <= --reencode-max-len, the time per token of the non-cached path (``logits`` on the whole
context, what the paper's model does for every token), as the median of --reencode-reps.

Per (model, sequence length) point: a fresh block from ``baselines.build_block`` in train
mode, a random input (B, T, C) with requires_grad (in the autocast dtype on CUDA, as the
author's fp16 input), and per iteration forward, ``out.sum()``, backward; ``--warmup``
untimed iterations, then ``--iters`` timed ones, reported as the median / min / max (and
mean, which is what the author's script prints) milliseconds per iteration.

Peak memory over the timed iterations, in MiB (2**20 bytes, as the author's
``/ (1024 * 1024)``, printed there as "MB"):
  * CUDA: ``torch.cuda.max_memory_allocated()`` with the peak reset after the warm-up, as
    the author's script: parameters, input, gradients and activations.
  * CPU: there is no allocator counter, so each point runs in a fresh worker process and we
    report its peak resident set size during the timed iterations minus its resident set
    size before the warm-up (after the block and input were built and one tiny priming
    pass); see ``CpuPeakRss`` and ``MEMORY_MEASURE``. Parameters and input are therefore
    NOT included on CPU, unlike on CUDA; their gradients and the activations are.

Differences from the author's scale.py: it runs on CPU too, writes the
figures, tables and raw results to --out-dir, records OOM / time-limit points explicitly
instead of crashing or inventing numbers, and fits a scaling exponent per model. The
input gets a gradient (the author's does not: +1 (B, T, C) tensor) and there is no
GradScaler (it only multiplies the loss by a constant).
"""

from __future__ import annotations

import argparse
import contextlib
import warnings
import csv
import datetime
import io
import json
import math
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from baselines import BLOCK_NAMES, build_block, build_lm
from gam_model import ModelConfig
from common import (DTYPES, MIB, OneLineParser, StopSignals, Terminated, UsageError, claim_empty_folder,
                    interrupt_exit_code, atomic_write_text, autocast_context, free_memory, int_at_least, is_oom,
                    run_metadata, sync)
from report import PAPER_TABLE2, new_figure, save_figure

MODELS = BLOCK_NAMES  # gam, transformer (naive attention), transformer-sdpa, mamba
LABELS = {"gam": "GAM", "transformer": "Transformer", "transformer-sdpa": "Transformer (SDPA)", "mamba": "Mamba"}
CPU_MAX_SECONDS = 60.0  # default per-point time budget on CPU (no limit on CUDA)

# The setup of the paper's Table 2 (report.PAPER_TABLE2): only for it are the paper's numbers shown.
PAPER_CONFIG = {"device": "cuda", "dtype": "fp16", "batch_size": 16, "d_model": 512, "n_head": 8}

MEMORY_MEASURE = {
    "cuda": "torch.cuda.max_memory_allocated() over the timed iterations (peak stats reset after the "
            "warm-up, as the author's script): peak tensor memory incl. parameters, input, gradients "
            "and activations (not the caching allocator's unused reserve, not the CUDA context). "
            "MiB = 2**20 bytes.",
    "cpu": "peak resident set size of a fresh worker process during the timed iterations minus its "
           "resident set size before the warm-up, i.e. after the block and the input were built and "
           "one tiny untimed priming pass (T<=8, batch 1; its gradients freed) loaded the one-off "
           "runtime state: activations, parameter and input gradients, autograd buffers and "
           "allocator caching; NOT the parameters or the input. Peak = VmHWM reset via "
           "/proc/self/clear_refs after the warm-up; where that reset is unavailable, the ru_maxrss "
           "difference over warm-up + timed iterations (then an earlier peak can hide part of the "
           "work: a lower bound). MiB = 2**20 bytes.",
}
CSV_FIELDS = ["model", "implementation", "seq_len", "batch", "status",
              "time_ms_median", "time_ms_min", "time_ms_max", "time_ms_mean", "peak_mem_mb", "note"]
DECODE_MEASURE = ("bytes of the decoding state per sequence, counted from its tensors after the context "
                  "was encoded (a KV cache: its T filled positions). MiB = 2**20 bytes.")
# What differs between the modes: measured numbers (key, decimals), table columns (key, paper
# column index or None, header, format), the memory key of the fit, plots and the table file.
MODES = {
    "train": dict(
        numbers=[("time_ms_median", 4), ("time_ms_min", 4), ("time_ms_max", 4), ("time_ms_mean", 4),
                 ("peak_mem_mb", 3)],
        columns=[("time_ms_median", 0, "Time (ms)", ".2f"), ("peak_mem_mb", 1, "Memory (MB)", ".2f")],
        csv=CSV_FIELDS, memory="peak_mem_mb", table="table2.md",
        plots=[("time_ms_median", "time per iteration (ms, median)", "compute_time.png", 0),
               ("peak_mem_mb", "peak memory (MiB)", "peak_memory.png", 1)],
        title="one block fwd+bwd"),
    "decode": dict(
        numbers=[("time_ms_median", 4), ("time_ms_min", 4), ("time_ms_max", 4), ("time_ms_mean", 4),
                 ("state_mb", 6), ("state_bytes_per_seq", 0), ("reencode_ms_median", 4), ("reencode_speedup", 2)],
        columns=[("time_ms_median", None, "ms / token, cached", ".3g"),
                 ("reencode_ms_median", None, "ms / token, re-encoding", ".3g"),
                 ("state_mb", None, "state (MiB / seq)", ".4g")],
        csv=["model", "implementation", "seq_len", "batch", "status", "time_ms_median", "time_ms_min",
             "time_ms_max", "time_ms_mean", "state_mb", "state_bytes_per_seq", "reencode_ms_median",
             "reencode_speedup", "note"],
        memory="state_bytes_per_seq", table="decode.md",
        plots=[("time_ms_median", "time per generated token (ms, median)", "decode_time.png", None),
               ("state_mb", "decoding state per sequence (MiB)", "state_memory.png", None)],
        title="one generated token (LM, streaming)"),
}
CELL = {"OOM": "Failed (OOM)", "skipped": "skipped (time limit)", "error": "Failed (error)"}
WORKER_TAG = "SCALE_WORKER_RESULT "


def label(name):
    return LABELS.get(name, name)


def mode(args) -> dict:
    return MODES[args.mode]


# -----------------------------------------------------------------------------
# arguments

def _positive_float(s):
    try:
        v = float(s)
    except ValueError:
        v = math.nan
    if not v > 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be a number > 0 (or inf), got {s!r}")
    return v


def parse_args(argv=None):
    p = build_parser()
    return resolve_args(p, p.parse_args(argv))


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="scale.py", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", choices=list(MODES), default="train",
                   help="train: one block, forward + backward (Table 2); decode: one generated token of "
                        "the language model with its decoding state, vs re-encoding the context")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), metavar="MODEL",
                   help=f"blocks to measure, from {', '.join(MODELS)}")
    p.add_argument("--seq-lens", nargs="+", type=int_at_least(1), default=[256, 512, 1024, 2048, 4096, 8192])
    p.add_argument("--batch-size", type=int_at_least(1), default=None, help="default 16 (train), 1 (decode)")
    p.add_argument("--d-model", type=int_at_least(1), default=512)
    p.add_argument("--n-head", type=int_at_least(1), default=8)
    p.add_argument("--warmup", type=int_at_least(0), default=5)
    p.add_argument("--iters", type=int_at_least(1), default=20)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: cuda if available, else cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="fp16/bf16 autocast (input in that dtype, as the author's) or fp32; default fp16 on "
                        "CUDA (as the author), fp32 on CPU")
    p.add_argument("--compile", action="store_true",
                   help="--mode train: torch.compile the block; its first iteration's time (compilation) "
                        "is in results.json as first_iter_ms")
    p.add_argument("--reencode-max-len", type=int_at_least(0), default=1024,
                   help="--mode decode: time the re-encoding path only up to this context length")
    p.add_argument("--reencode-reps", type=int_at_least(1), default=3,
                   help="--mode decode: timed re-encodings per point (after one untimed)")
    p.add_argument("--max-seconds", type=_positive_float, default=None,
                   help=f"per-point time budget, estimated from the first iterations; a point over it "
                        f"(and every longer one of that model) is skipped. Default {CPU_MAX_SECONDS:g} "
                        f"on CPU, no limit on CUDA; 'inf' = no limit")
    p.add_argument("--threads", type=int_at_least(1), default=None,
                   help="CPU intra-op threads (torch.set_num_threads); default: torch's choice. "
                        "On a busy machine fewer threads than cores avoid slow OpenMP barriers")
    p.add_argument("--out-dir", default=None, help="a new or empty folder; default runs/scale-<timestamp>")
    p.add_argument("--seed", type=int, default=0)
    return p


def resolve_args(p: OneLineParser, args: argparse.Namespace) -> argparse.Namespace:
    """The defaults that depend on the device and the mode; every refusal is one line + exit 2."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch.cuda.is_available() is False")
    if args.dtype is None:
        args.dtype = "fp16" if args.device == "cuda" else "fp32"
    if args.device == "cpu" and args.dtype != "fp32" and not cpu_autocast_supports(DTYPES[args.dtype]):
        p.error(f"--dtype {args.dtype}: this torch has no CPU autocast for {DTYPES[args.dtype]}; use fp32 or bf16")
    if args.compile and args.mode != "train":
        p.error("--compile applies to --mode train only")
    if args.batch_size is None:
        args.batch_size = 16 if args.mode == "train" else 1
    if args.device == "cuda" and args.dtype == "bf16" and not torch.cuda.is_bf16_supported():
        p.error("--dtype bf16: this GPU does not support bfloat16")
    if args.d_model % args.n_head:
        p.error(f"--d-model {args.d_model} is not divisible by --n-head {args.n_head}")
    if args.max_seconds is None:
        args.max_seconds = CPU_MAX_SECONDS if args.device == "cpu" else math.inf
    if math.isinf(args.max_seconds):
        args.max_seconds = None  # no limit (and keeps results.json strict JSON)
    if args.threads:
        torch.set_num_threads(args.threads)  # here too, so that the metadata tells the truth
    args.models = list(dict.fromkeys(args.models))  # dedupe, keep order
    args.seq_lens = sorted(set(args.seq_lens))       # ascending: "longer lengths" are the later ones
    if args.out_dir is None:
        args.out_dir = os.path.join("runs", "scale-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    return args


def is_paper_config(args) -> bool:
    return args.mode == "train" and all(getattr(args, k) == v for k, v in PAPER_CONFIG.items())


def cpu_autocast_supports(dtype: torch.dtype) -> bool:
    """torch disables CPU autocast (with a warning) for a dtype it does not support."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast("cpu", dtype=dtype):
            return torch.is_autocast_enabled("cpu")


# -----------------------------------------------------------------------------
# measuring one point

def _proc_status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")


def _ru_maxrss_kib():
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform == "darwin" else r  # bytes on macOS, KiB on Linux


class CpuPeakRss:
    """Peak resident memory of this process from now on, above the resident memory now.

    Linux keeps the lifetime peak RSS (VmHWM, = ru_maxrss); writing "5" to
    /proc/self/clear_refs resets it to the current RSS, so after a reset VmHWM is the
    peak of exactly the work that follows. ``reset_peak()`` (after the warm-up) starts
    that window again while keeping the baseline. Without the reset we fall back to
    ru_maxrss now and later: still monotone, but an earlier (e.g. import-time) peak above
    the current RSS would hide part of the work, so the number can only be too low.
    """

    def __init__(self):
        self.method = "VmHWM reset" if self.reset_peak() else "ru_maxrss"
        self.base = _proc_status_kib("VmRSS") if self.method == "VmHWM reset" else _ru_maxrss_kib()

    @staticmethod
    def reset_peak() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def peak_mib(self) -> float:
        peak = _proc_status_kib("VmHWM") if self.method == "VmHWM reset" else _ru_maxrss_kib()
        return max(0.0, peak - self.base) / 1024


def primed_cpu_peak(block, seq_len, args) -> CpuPeakRss:
    """One tiny untimed pass first, so that one-off runtime state (kernel code pages, thread
    pools: 15-30 MiB measured) lands in the baseline, not in this length's number; then the
    peak-RSS meter, its baseline taken now."""
    x_dtype = DTYPES[args.dtype]
    with autocast_context(args.dtype, args.device):
        prime = block(torch.randn(1, min(seq_len, 8), args.d_model, dtype=x_dtype, requires_grad=True))
    prime.sum().backward()
    del prime
    block.zero_grad(set_to_none=True)
    return CpuPeakRss()


def bench_point(name, seq_len, args) -> dict:
    """Time and memory of one (model, seq_len) point in THIS process. Raises on OOM."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    block, impl = build_block(name, args.d_model, n_head=args.n_head, device=device)
    block.train()  # as the author: dropout on, autograd on
    if getattr(args, "compile", False):
        block = torch.compile(block)  # compiled in the first call of each shape (priming, warm-up)
    x_dtype = DTYPES[args.dtype]  # the author feeds fp16 under autocast
    x = torch.randn(args.batch_size, seq_len, args.d_model, device=device, dtype=x_dtype, requires_grad=True)
    cpu_peak = None if cuda else primed_cpu_peak(block, seq_len, args)

    n_total, timed, all_dts = args.warmup + args.iters, [], []
    t_start = time.perf_counter()
    for i in range(n_total):
        block.zero_grad(set_to_none=True)
        x.grad = None
        if i == args.warmup and cuda:  # the peak is that of the timed iterations, as the author's
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
        elif i == args.warmup:
            cpu_peak.reset_peak()  # the baseline stays the RSS before the warm-up
        sync(device)
        t0 = time.perf_counter()
        with autocast_context(args.dtype, args.device):
            out = block(x)
            loss = out.sum()
        loss.backward()
        sync(device)
        dt = time.perf_counter() - t0
        del out, loss
        all_dts.append(dt)
        if i >= args.warmup:
            timed.append(dt)
        # The fastest iteration so far predicts the rest (the first ones carry one-off costs),
        # so a point is only skipped when even that optimistic estimate is over the budget.
        estimate = time.perf_counter() - t_start + (n_total - i - 1) * min(all_dts)
        if args.max_seconds is not None and estimate > args.max_seconds:
            return {"status": "skipped", "implementation": impl,
                    "note": f"estimated {estimate:.1f} s for {n_total} iterations > --max-seconds {args.max_seconds:g}"}

    peak = torch.cuda.max_memory_allocated(device) / MIB if cuda else cpu_peak.peak_mib()
    ms = [t * 1000 for t in timed]
    return {"status": "ok", "implementation": impl,
            "time_ms_median": statistics.median(ms), "time_ms_min": min(ms), "time_ms_max": max(ms),
            "time_ms_mean": statistics.fmean(ms),
            "peak_mem_mb": peak, "mem_method": "max_memory_allocated" if cuda else cpu_peak.method,
            "first_iter_ms": all_dts[0] * 1000}


# -----------------------------------------------------------------------------
# measuring one decoding point (--mode decode)

def build_decoder(name, context_len, args, device):
    """The language model of block family ``name`` (ModelConfig defaults, d_model and heads of
    the args), with room for the context and two more tokens; eval mode."""
    cfg = ModelConfig(N_EMBED=args.d_model, BLOCK_SIZE=context_len + 2)
    family = "transformer" if name.startswith("transformer") else name
    attention = "sdpa" if name == "transformer-sdpa" else "naive"
    model = build_lm(family, cfg, n_head=args.n_head, attention=attention, device=device)
    return model.eval()


def state_bytes(state) -> int:
    """Bytes held by one block's decoding state (nested tensors). A KV cache [k, v, n]
    (baselines.CausalSelfAttention.step) counts its n filled positions, not spare capacity."""
    if state is None:
        return 0
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, list) and len(state) == 3 and isinstance(state[2], int):
        k, v, n = state
        return state_bytes(k[:, :, :n]) + state_bytes(v[:, :, :n])
    return sum(state_bytes(s) for s in state)


def time_calls(fn, warmup, iters, device) -> list[float]:
    """Seconds of each of ``iters`` calls of fn, after ``warmup`` untimed ones."""
    out = []
    for i in range(warmup + iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            out.append(time.perf_counter() - t0)
    return out


@torch.no_grad()
def bench_decode_point(name, context_len, args) -> dict:
    """One generated token after a context of ``context_len`` tokens: streaming vs re-encoding."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_decoder(name, context_len, args, device)
    ids = torch.randint(0, model.config.VOCAB_SIZE, (args.batch_size, context_len + 1), device=device)
    context, new = ids[:, :context_len], ids[:, context_len:]            # (B, T), (B, 1)
    res = {"status": "ok", "implementation": getattr(model, "implementation", name)}
    with autocast_context(args.dtype, args.device):
        if context_len <= args.reencode_max_len:  # the paper's path: the whole context per token
            s = time_calls(lambda: model.logits(ids[:, 1:])[:, -1], 1, args.reencode_reps, device)
            res["reencode_ms_median"] = statistics.median(s) * 1000
        _, states = model.stream(context, 0, [None] * len(model.blocks))    # encode the context once
        total = sum(state_bytes(st) for st in states)
        # One token first, so that the timed ones run on a state that has its steady layout
        # (a KV cache grows by doubling); each timed call then decodes position T + 1 again.
        _, states = model.stream(new, context_len, states)
        ms = [t * 1000 for t in time_calls(lambda: model.stream(new, context_len + 1, states),
                                           args.warmup, args.iters, device)]
    res.update(time_ms_median=statistics.median(ms), time_ms_min=min(ms), time_ms_max=max(ms),
               time_ms_mean=statistics.fmean(ms), state_bytes_per_seq=total // args.batch_size,
               state_mb=total / args.batch_size / MIB)
    if "reencode_ms_median" in res:
        res["reencode_speedup"] = res["reencode_ms_median"] / res["time_ms_median"]
    return res


def worker_main(spec_json: str) -> None:
    """Entry point of a CPU worker process: one point, result as one tagged JSON line."""
    with contextlib.suppress(OSError):
        # Should the machine run out of memory, let the kernel kill this worker first.
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    spec = json.loads(spec_json)
    try:
        res = bench_point(spec["name"], spec["seq_len"], argparse.Namespace(**spec["args"]))
    except Exception as e:  # MemoryError included
        res = failure(e)
    print(WORKER_TAG + json.dumps(res), flush=True)


def worker_command(name, seq_len, args) -> list[str]:
    spec = {"name": name, "seq_len": seq_len, "args": vars(args)}
    return [sys.executable, os.path.abspath(__file__), "--_worker", json.dumps(spec)]


def run_in_worker(name, seq_len, args) -> dict:
    """One point in a fresh process, so its peak RSS belongs to this point alone."""
    # A generous hard stop for a worker that hangs (e.g. swapping) despite the estimate.
    timeout = None if args.max_seconds is None else 3 * args.max_seconds + 120
    try:
        proc = subprocess.run(worker_command(name, seq_len, args), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "skipped", "note": f"worker killed after the hard timeout of {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(WORKER_TAG):
            return json.loads(line[len(WORKER_TAG):])
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode)
        # A SIGKILL without a result is, in practice, the kernel's out-of-memory killer.
        status = "OOM" if sig == signal.SIGKILL else "error"
        return {"status": status, "note": f"worker killed by {sig.name}"}
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": "error", "note": f"worker exited with code {proc.returncode}: {tail}"}


def run_point(name, seq_len, args) -> dict:
    """CPU: in a fresh worker process (sound peak RSS). CUDA: here (the allocator counts).
    Decoding: here (its memory is counted from the state's tensors, not measured)."""
    if args.mode == "decode":
        return bench_decode_point(name, seq_len, args)
    if in_worker(args):
        return run_in_worker(name, seq_len, args)
    return bench_point(name, seq_len, args)


def in_worker(args) -> bool:
    """Whether run_point measures in a worker process (CPU training) rather than in this one."""
    return args.device == "cpu" and args.mode == "train"


def failure(exc) -> dict:
    """The result of a point that raised: OOM, or an error noted in one line."""
    lines = str(exc).strip().splitlines()
    note = f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]
    return {"status": "OOM" if is_oom(exc) else "error", "note": note}


# -----------------------------------------------------------------------------
# the sweep

def make_row(name, seq_len, args, res, impl="") -> dict:
    ok = res["status"] == "ok"
    # never a number unless measured
    num = lambda k, nd: (round(res[k], nd) if nd else res[k]) if ok and res.get(k) is not None else None  # noqa: E731
    row = {"model": name, "implementation": res.get("implementation") or impl, "seq_len": seq_len,
           "batch": args.batch_size, "status": res["status"]}
    row.update({k: num(k, nd) for k, nd in mode(args)["numbers"]})
    row["note"] = res.get("note") or ("memory from the ru_maxrss fallback: a lower bound"
                                      if res.get("mem_method") == "ru_maxrss" else "")
    if ok and "first_iter_ms" in res:  # results.json only: with --compile, the compilation
        row["first_iter_ms"] = round(res["first_iter_ms"], 4)
    return row


def run_sweep(args, on_row=None) -> list[dict]:
    rows, skipped_at, impls = [], {}, {}
    points = [(m, L) for m in args.models for L in args.seq_lens]
    bar = tqdm(points, desc="scale", unit="point", dynamic_ncols=True)
    for name, L in bar:
        bar.set_postfix_str(f"{name} T={L}")
        if name in skipped_at:  # the longer lengths would only take longer
            res = {"status": "skipped", "note": f"not run: T={skipped_at[name]} was already over the time limit"}
        else:
            try:
                res = run_point(name, L, args)
            except Exception as e:
                res = failure(e)
            if not in_worker(args):  # a worker's memory went with it; a full collection here costs ~0.1 s
                free_memory(args.device)  # after the except block, so the traceback's tensors are gone
        if res["status"] == "skipped":
            skipped_at.setdefault(name, L)
        if res["status"] == "error":
            tqdm.write(f"warning: {name} T={L} failed: {res['note']}")
        row = make_row(name, L, args, res, impls.get(name, ""))
        impls.setdefault(name, row["implementation"])
        rows.append(row)
        if on_row:
            on_row(rows)
    bar.close()
    return rows


# -----------------------------------------------------------------------------
# results: exponents, table, files, plots

def fit_exponent(xs, ys) -> float | None:
    """Least-squares slope k of log(y) against log(x), i.e. y ~ c * x**k.

    Pairs with a missing, non-positive or non-finite value are ignored (no logarithm);
    returns None when fewer than two distinct x remain.
    """
    if len(xs) != len(ys):
        raise ValueError(f"fit_exponent: {len(xs)} xs but {len(ys)} ys")
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys)
           if x is not None and y is not None and 0 < x < math.inf and 0 < y < math.inf]
    if len({lx for lx, _ in pts}) < 2:
        return None
    mx = sum(lx for lx, _ in pts) / len(pts)
    my = sum(ly for _, ly in pts) / len(pts)
    sxx = sum((lx - mx) ** 2 for lx, _ in pts)
    return sum((lx - mx) * (ly - my) for lx, ly in pts) / sxx


def exponents(rows, args) -> dict:
    out = {}
    for name in args.models:
        ok = [r for r in rows if r["model"] == name and r["status"] == "ok"]
        xs = [r["seq_len"] for r in ok]
        out[name] = {"time": fit_exponent(xs, [r["time_ms_median"] for r in ok]),
                     "memory": fit_exponent(xs, [r[mode(args)["memory"]] for r in ok])}
        if args.mode == "decode":
            out[name]["reencode_time"] = fit_exponent(xs, [r["reencode_ms_median"] for r in ok])
    return out


def paper_exponents(args) -> dict:
    """The same fit on the paper's numbers, over the lengths of this sweep."""
    out = {}
    for name, table in PAPER_TABLE2.items():
        pts = [(L, table[L]) for L in args.seq_lens if table.get(L)]
        xs = [L for L, _ in pts]
        out[name] = {"time": fit_exponent(xs, [v[0] for _, v in pts]),
                     "memory": fit_exponent(xs, [v[1] for _, v in pts])}
    return out


def markdown_table(rows, args) -> str:
    paper = is_paper_config(args)
    cell = {(r["model"], r["seq_len"]): r for r in rows}

    def ours(name, L, key, fmt):
        r = cell.get((name, L))
        if r is None:
            return ""
        if r["status"] != "ok":
            return CELL[r["status"]]
        return "-" if r[key] is None else format(r[key], fmt)

    def theirs(name, L, i):
        if L not in PAPER_TABLE2[name]:
            return "-"
        v = PAPER_TABLE2[name][L]
        return "OOM" if v is None else f"{v[i]:.2f}"

    header, cols = ["Sequence length"], []
    for key, i, unit, fmt in mode(args)["columns"]:
        for name in args.models:
            header.append(f"{label(name)} {unit}")
            cols.append(lambda L, n=name, k=key, f=fmt: ours(n, L, k, f))
            if paper and name in PAPER_TABLE2:
                header.append(f"{label(name)} {unit}, paper")
                cols.append(lambda L, n=name, i=i: theirs(n, L, i))
    body = [[str(L)] + [c(L) for c in cols] for L in args.seq_lens]
    widths = [max(len(row[j]) for row in [header] + body) for j in range(len(header))]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    lines = [fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(b) for b in body]

    exps, pexps = exponents(rows, args), paper_exponents(args)
    f = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    lines += ["", "Fitted scaling exponents k (least squares, log y = k log T + c, over the ok points):", "",
              "| Model | time k | memory k |", "|---|---|---|"]
    for name in args.models:
        lines.append(f"| {label(name)} | {f(exps[name]['time'])} | {f(exps[name]['memory'])} |")
        if paper and name in pexps:
            lines.append(f"| {label(name)}, paper | {f(pexps[name]['time'])} | {f(pexps[name]['memory'])} |")
    if args.mode == "decode":
        lines += ["", f"One generated token of the language model (ModelConfig defaults, d_model {args.d_model}, "
                      f"{args.n_head} heads, untrained) after a context of T tokens, {args.device}, {args.dtype}, "
                      f"batch {args.batch_size}: streaming with the decoding state, median of {args.iters} after "
                      f"{args.warmup} warm-up; re-encoding the whole context (the paper's model), median of "
                      f"{args.reencode_reps}, up to T = {args.reencode_max_len}. Time k: the cached path (the re-encoding "
                      f"path's is results.json's exponents.*.reencode_time). State: {DECODE_MEASURE}"]
        return "\n".join(lines) + "\n"
    lines += ["", f"One block, forward + backward, {args.device}, {args.dtype}, batch {args.batch_size}, "
                  f"d_model {args.d_model}, {args.n_head} heads, {args.warmup} warm-up + {args.iters} timed "
                  f"iterations, median time (the paper's are means; ours are in results.csv). "
                  f"MB = MiB (2**20 bytes). Memory: {MEMORY_MEASURE[args.device]}"]
    if not paper:
        lines.append(f"Paper columns are shown only for the paper's configuration {PAPER_CONFIG}.")
    return "\n".join(lines) + "\n"


def metadata(args, rows) -> dict:
    meta = run_metadata(args.device)
    meta.update({
        "script": "scale.py", "paper": "arXiv:2509.00605, Table 2",
        "cpu_threads": args.threads or torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "dtype": args.dtype, "args": vars(args), "paper_config": is_paper_config(args),
        "memory_unit": "MiB (2**20 bytes)", "mode": args.mode,
        "compile": getattr(args, "compile", False),
        "memory_measure": DECODE_MEASURE if args.mode == "decode" else MEMORY_MEASURE[args.device],
        "exponents": exponents(rows, args),
        "complete": len(rows) == len(args.models) * len(args.seq_lens),
    })
    if meta["paper_config"]:
        meta["paper_exponents"] = paper_exponents(args)
    return meta


def write_results(rows, args) -> None:
    """results.csv and results.json, rewritten after every point so a long sweep survives a crash."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=mode(args)["csv"], lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(os.path.join(args.out_dir, "results.csv"), buf.getvalue())
    doc = {"metadata": metadata(args, rows), "rows": rows}
    atomic_write_text(os.path.join(args.out_dir, "results.json"), json.dumps(doc, indent=2, allow_nan=False) + "\n")


def plot_series(rows, args, key) -> dict:
    """model -> [(seq_len, value)] of the ok points: OOM / skipped / failed points are absent
    (and so is a zero, which a log axis cannot show)."""
    return {name: [(r["seq_len"], r[key]) for r in rows
                   if r["model"] == name and r["status"] == "ok" and r[key] > 0] for name in args.models}


def plot(rows, args, key, ylabel, filename, paper_index) -> None:
    fig, (ax,) = new_figure()
    for name, pts in plot_series(rows, args, key).items():
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label(name))
        if paper_index is not None and is_paper_config(args) and name in PAPER_TABLE2:
            ppts = [(L, v[paper_index]) for L, v in PAPER_TABLE2[name].items() if v and L in args.seq_lens]
            if ppts:
                ax.plot(*zip(*ppts), linestyle="--", marker="x", alpha=0.6, label=f"{label(name)} (paper)")
    if ax.lines:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(args.seq_lens, [str(L) for L in args.seq_lens])
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no successful points", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("sequence length")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{mode(args)['title']}, {args.device} {args.dtype}, batch {args.batch_size}, d_model {args.d_model}")
    ax.grid(True, which="both", alpha=0.3)
    save_figure(fig, os.path.join(args.out_dir, filename), dpi=120, bbox_inches="tight")


def write_outputs(rows, args) -> str:
    write_results(rows, args)
    table = markdown_table(rows, args)
    atomic_write_text(os.path.join(args.out_dir, mode(args)["table"]), table)
    for key, ylabel, filename, paper_index in mode(args)["plots"]:
        plot(rows, args, key, ylabel, filename, paper_index)
    return table


def main(argv=None) -> int:
    args = parse_args(argv)
    with StopSignals().installed() as stop:  # SIGTERM (a scheduler's stop), like Ctrl-C: the line, then exit
        try:
            lock = claim_empty_folder(Path(args.out_dir), "--out-dir", "scale.py")
        except (OSError, UsageError) as e:  # e.g. an unwritable --out-dir: one line and exit 2, as a bad argument
            print(f"scale.py: error: {e}", file=sys.stderr)
            return 2
        try:
            rows = run_sweep(args, on_row=lambda rows: write_results(rows, args))
            table = write_outputs(rows, args)
        except OSError as e:
            print(f"scale.py: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:
            stop.disarm()  # a second signal must not cut the line short
            what = "stopped by SIGTERM" if isinstance(e, Terminated) else "interrupted"
            print(f"scale.py: {what}; partial results in {args.out_dir}", file=sys.stderr)
            return interrupt_exit_code(e)
        finally:
            lock.release()
    print(table)
    names = ["results.csv", "results.json", mode(args)["table"], *(p[2] for p in mode(args)["plots"])]
    print(f"wrote {args.out_dir}/{{{','.join(names)}}}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--_worker":  # internal: one CPU point, see run_in_worker
        worker_main(sys.argv[2])
    else:
        sys.exit(main())
