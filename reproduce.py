"""The paper in one command on one GPU: Table 2, the CUDA checks, Table 1 and Table 3, in order.

    python reproduce.py --data-dir data/wikitext-2-raw --out-dir runs/paper       # one CUDA GPU (README: 10-15 min)
    python reproduce.py --data-dir DIR --budget-minutes 20 --out-dir runs/paper   # stop cleanly at 20 minutes
    python reproduce.py --device cpu --tiny --out-dir runs/tiny                    # the same four steps, tiny, on CPU

Each step is one of the repository's scripts in a subprocess, writing into its own subfolder of
--out-dir (a new or empty folder) as soon as it has results:

  table2/       scale.py: the author's protocol (batch 16, 256-8192 tokens, fp16 autocast), all four blocks
  cuda_checks/  cuda_checks.py: GAM's fast path vs its reference under fp16 / bf16 autocast, one host sync
                per forward, TorchMamba vs mamba_ssm, an exported model on CUDA vs on the CPU
  table1/       benchmark.py --preset paper --datasets wikitext2 --data-dir wikitext2=DIR (3 models, 5 epochs)
  table3/       benchmark.py --preset ablation --data-dir wikitext2=DIR (the four GAM variants)

and, rewritten after every step, summary.md / summary.json (each step's status, wall time, folder
and its script's own table, where the paper's numbers stand beside ours) and logs/<step>.log.
--tiny: the embedded corpus and tiny models (the smoke preset), a scale sweep of two blocks at one
length, the checks at tiny sizes (on CPU recorded as skipped: they are CUDA's).

--budget-minutes: a step starts only while time is left; Table 3 runs the variants that GAM's
measured cost in Table 1 says fit; each scale.py point gets its share of the time left; a step
still running when the budget ends gets SIGTERM (benchmark.py and scale.py stop as on Ctrl-C: one
line, results so far kept, exit 143). The summary says what was cut and why.

Exit codes: 0 every step done; 1 a step failed; 2 bad input, found before anything runs; 3 done
within the budget but incomplete (something skipped or stopped); 130 / 143 interrupted (Ctrl-C /
SIGTERM), the summary written.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib
import json
import math
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from baselines import BLOCK_NAMES
from common import (REPO_DIR, OneLineParser, StopSignals, Terminated, UsageError, atomic_write_json,
                    atomic_write_text, claim_empty_folder, interrupt_exit_code, one_line, run_metadata)
from config import GAM_VARIANTS

WIKITEXT2_FILES = ("wiki.train.raw", "wiki.valid.raw", "wiki.test.raw")
# What benchmark.py needs beyond torch, imported before anything runs (data.py imports
# tokenizers; exports need safetensors; tables matplotlib). Not datasets: only the Hub needs it.
NEEDED_MODULES = ("data", "safetensors", "matplotlib")
SCALE_POINTS = len(BLOCK_NAMES) * 6  # scale.py's default sweep: four blocks x 256..8192
# Tiny: two of the blocks (each CPU point is a fresh process), one length.
TINY_SCALE = ["--models", "gam", "transformer", "--seq-lens", "16", "--batch-size", "1", "--d-model", "32",
              "--n-head", "4", "--warmup", "1", "--iters", "2"]
TINY_TRAIN = ["--preset", "smoke", "--n-embed", "16", "--n-layer", "1", "--n-head", "2", "--num-memory-slots", "8",
              "--d-state", "4", "--block-size", "32", "--batch-size", "8", "--epochs", "1", "--warmup-steps", "2",
              "--max-train-blocks", "32", "--lr", "0.01"]
STOP_GRACE_S = 60  # after SIGTERM at the budget, how long a step may take to save and exit before SIGKILL
INCOMPLETE = 3


@dataclass
class Run:
    """One reproduce.py command: its settings, its clock and the summary record of every step."""
    args: argparse.Namespace
    out_dir: Path
    deadline: float                               # time.monotonic() at which the budget ends (inf: none)
    started: float = field(default_factory=time.monotonic)
    steps: list = field(default_factory=list)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def record(self, key: str) -> dict | None:
        return next((r for r in self.steps if r["key"] == key), None)


@dataclass(frozen=True)
class Step:
    key: str                                      # its subfolder and log name
    title: str
    table: str                                    # the script's own table, shown in the summary
    command: Callable                             # (run, folder) -> (argv or None to skip, note)


# ---------------------------------------------------------------------------------------
# The steps' command lines.


def device_flag(run: Run) -> list[str]:
    return ["--device", run.args.device]


def table2_command(run: Run, folder: Path):
    """scale.py with its defaults on CUDA (the author's protocol); under a budget each point
    gets its share of the time left (scale.py skips a point estimated to exceed it)."""
    tiny = TINY_SCALE if run.args.tiny else []
    points = 2 if run.args.tiny else SCALE_POINTS
    share = [] if math.isinf(run.left()) else ["--max-seconds", f"{max(run.left() / points, 1.0):.0f}"]
    return ["scale.py", *device_flag(run), *tiny, *share, "--out-dir", str(folder)], ""


def checks_command(run: Run, folder: Path):
    return ["cuda_checks.py", *device_flag(run), *(["--tiny"] if run.args.tiny else []), "--out-dir", str(folder)], ""


def train_flags(run: Run) -> list[str]:
    """What both benchmark.py steps share: the data (or, tiny, the embedded corpus), device, no wandb."""
    if run.args.tiny:  # the tokenizer cache inside --out-dir: a tiny run leaves nothing elsewhere
        data = [*TINY_TRAIN, "--cache-dir", str(run.out_dir / ".cache")]
    else:
        data = ["--data-dir", f"wikitext2={run.args.data_dir}"]
    return [*data, *device_flag(run), "--wandb", "disabled"]


def table1_command(run: Run, folder: Path):
    preset = [] if run.args.tiny else ["--preset", "paper", "--datasets", "wikitext2"]
    return ["benchmark.py", *preset, *train_flags(run), "--out-dir", str(folder)], ""


def table3_command(run: Run, folder: Path):
    variants, note = ablation_plan(run)
    if not variants:
        return None, note
    preset = [] if run.args.tiny else ["--preset", "ablation"]
    models = ["--models", *variants] if run.args.tiny or len(variants) < len(GAM_VARIANTS) else []
    return ["benchmark.py", *preset, *models, *train_flags(run), "--out-dir", str(folder)], note


def gam_cost_s(run: Run) -> float | None:
    """Seconds one GAM variant takes, from Table 1's run: GAM's training epochs, plus its share of
    the rest of that step (data, evaluation, export). An upper bound for the variants, which
    have fewer parameters than the full model. None when Table 1 has no GAM result."""
    rec = run.record("table1")
    try:
        records = json.loads((run.out_dir / "table1" / "results.json").read_text())
        train_s = {r["model"]: sum(e["epoch_time_s"] for e in r["epochs"]) for r in records}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if "gam" not in train_s or not rec or rec.get("seconds") is None:
        return None
    return train_s["gam"] + max(rec["seconds"] - sum(train_s.values()), 0.0) / len(train_s)


def ablation_plan(run: Run) -> tuple[list[str], str]:
    """The Table 3 variants that fit in the time left, in the paper's order (full GAM first)."""
    variants, per = list(GAM_VARIANTS), gam_cost_s(run)
    if per is None or math.isinf(run.left()):
        return variants, ""
    fit = min(len(variants), int(run.left() // max(per, 1e-9)))
    if fit == len(variants):
        return variants, ""
    why = (f"cut by the budget: about {per:.0f} s per variant (GAM's cost in Table 1), {run.left():.0f} s left; "
           f"not run: {', '.join(variants[fit:])}")
    return variants[:fit], why


STEPS = [
    Step("table2", "Table 2: one block's time and memory (scale.py)", "table2.md", table2_command),
    Step("cuda_checks", "CUDA checks (cuda_checks.py)", "cuda_checks.md", checks_command),
    Step("table1", "Table 1: Transformer, Mamba and GAM trained (benchmark.py)", "table1.md", table1_command),
    Step("table3", "Table 3: the GAM ablations trained (benchmark.py)", "table3.md", table3_command),
]


# ---------------------------------------------------------------------------------------
# Running a step: a subprocess, its output to the console and its log, stopped at the budget.


def copy_output(stream, log, tail: collections.deque) -> None:
    for line in stream:
        sys.stdout.write(line)
        sys.stdout.flush()
        log.write(line)
        tail.append(line.rstrip())


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the scripts save and exit 143), then SIGKILL if it does not end in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def execute(argv: list[str], log_path: Path, timeout: float) -> tuple[int, bool, list[str]]:
    """(exit code, whether the budget stopped it, its last lines of output)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail = collections.deque(maxlen=5)
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen([sys.executable, *argv], cwd=REPO_DIR, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        copier = threading.Thread(target=copy_output, args=(proc.stdout, log, tail), daemon=True)
        copier.start()
        stopped = False
        try:
            proc.wait(None if math.isinf(timeout) else max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            stopped = True
            stop(proc)
        except KeyboardInterrupt:  # this command was stopped: so is its step
            stop(proc)
            raise
        finally:
            copier.join(10)
    return proc.returncode, stopped, list(tail)


def run_step(run: Run, step: Step) -> dict:
    rec = {"key": step.key, "title": step.title, "folder": f"{step.key}/", "status": "pending", "seconds": None,
           "exit_code": None, "command": None, "note": "", "cut_by_budget": False}
    run.steps.append(rec)
    if run.left() <= 0:
        rec.update(status="skipped", note="the budget was spent before it started", cut_by_budget=True)
        return rec
    argv, plan_note = step.command(run, run.out_dir / step.key)
    if argv is None:
        rec.update(status="skipped", note=plan_note, cut_by_budget=True)
        return rec
    rec["command"] = shlex.join(["python", *argv])
    print(f"\nreproduce.py: {step.title}: {rec['command']}", flush=True)
    start = time.monotonic()
    try:
        code, stopped, tail = execute(argv, run.out_dir / "logs" / f"{step.key}.log", run.left())
    except KeyboardInterrupt:
        rec.update(status="interrupted", seconds=time.monotonic() - start, note="this command was interrupted")
        raise
    rec.update(seconds=time.monotonic() - start, exit_code=code)
    judge(run, step, rec, stopped, tail, plan_note)
    return rec


def judge(run: Run, step: Step, rec: dict, stopped: bool, tail: list[str], plan_note: str) -> None:
    """The step's status and note from its exit code and its own result files."""
    code = rec["exit_code"]
    if stopped:
        rec.update(status="stopped", cut_by_budget=True,
                   note=f"stopped by SIGTERM at the budget (exit {code}); its results so far are kept")
    elif code != 0 and not (step.key == "cuda_checks" and code == 1):  # 1 there: a check failed, judged below
        rec.update(status="failed", note=f"exit {code}: {tail[-1] if tail else 'no output'}")
    elif step.key == "cuda_checks":
        rec["status"], rec["note"] = checks_status(run.out_dir / step.key / "cuda_checks.json")
    else:
        rec.update(status="partial" if plan_note else "ok", note=plan_note, cut_by_budget=bool(plan_note))
        if step.key == "table2":
            table2_note(run, rec)


def checks_status(path: Path) -> tuple[str, str]:
    try:
        checks = json.loads(path.read_text())["checks"]
    except (OSError, ValueError, KeyError) as e:
        return "failed", f"no readable {path.name} ({one_line(e)})"
    groups = collections.defaultdict(list)  # (status, note) -> names: one reason said once
    for c in checks:
        groups[c["status"], c["note"] if c["status"] != "pass" else ""].append(c["name"])
    statuses = {s for s, _ in groups}
    status = "failed" if "fail" in statuses else "ok" if "pass" in statuses else "skipped"
    return status, "; ".join((f"{s} ({note}): " if note else f"{s}: ") + ", ".join(names)
                             for (s, note), names in groups.items())


def table2_note(run: Run, rec: dict) -> None:
    """Points skipped by the per-point share of the budget make the step partial."""
    try:
        rows = json.loads((run.out_dir / "table2" / "results.json").read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return
    counts = collections.Counter(r["status"] for r in rows)
    rec["note"] = f"{len(rows)} points: " + ", ".join(f"{n} {s}" for s, n in counts.items())
    if counts["skipped"] and not math.isinf(run.deadline):
        rec.update(status="partial", cut_by_budget=True,
                   note=rec["note"] + " (skipped: over the time limit per point, the budget's share)")


# ---------------------------------------------------------------------------------------
# The summary: rewritten after every step.


def minutes(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s} s" if m else f"{s} s"


def summary_markdown(run: Run, meta: dict) -> str:
    budget = "none" if run.args.budget_minutes is None else f"{run.args.budget_minutes:g} min"
    lines = ["# The paper in one command", "",
             f"`{meta['command']}` on {meta['device_name']} ({run.args.device}), torch {meta['torch_version']}, "
             f"commit {meta['git_commit']}; started {meta['started_at']}, budget {budget}, "
             f"{minutes(time.monotonic() - run.started)} so far.", "",
             "| Step | Status | Wall time | Results | Note |", "|---|---|---|---|---|"]
    known = {r["key"]: r for r in run.steps}
    for step in STEPS:
        r = known.get(step.key, {"status": "pending", "seconds": None, "note": ""})
        folder = f"[{step.key}/]({step.key}/)" if (run.out_dir / step.key).is_dir() else "-"
        lines.append(f"| {step.title} | **{r['status']}** | {minutes(r['seconds'])} | {folder} | {r['note'] or '-'} |")
    for step in STEPS:  # each script's own table: ours, and the paper's beside it where it applies
        table = run.out_dir / step.key / step.table
        if table.is_file():
            lines += ["", f"## {step.title}", "", f"From `{step.key}/{step.table}` (written by the script).", "",
                      table.read_text(encoding="utf-8").strip()]
    ran = [r for r in run.steps if r["command"]]
    lines += ["", "## Commands", "", *(f"- {r['key']}: `{r['command']}`" for r in ran)] if ran else []
    return "\n".join(lines) + "\n"


def write_summary(run: Run, meta: dict) -> None:
    atomic_write_json(run.out_dir / "summary.json", {**meta, "budget_minutes": run.args.budget_minutes,
                                                     "wall_s": time.monotonic() - run.started, "steps": run.steps})
    atomic_write_text(run.out_dir / "summary.md", summary_markdown(run, meta))


def exit_code(run: Run) -> int:
    if any(r["status"] == "failed" for r in run.steps):
        return 1
    return INCOMPLETE if any(r["cut_by_budget"] for r in run.steps) else 0


# ---------------------------------------------------------------------------------------
# The command line: every refusal is one line and exit 2, before anything runs.


def budget_minutes(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        v = math.nan
    if not v > 0:  # NaN too
        raise argparse.ArgumentTypeError(f"must be a number of minutes > 0 (or inf), got {s!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="reproduce.py", description=__doc__.split("\n\n")[0],
                      epilog="Exit codes: 0 every step done, 1 a step failed, 2 bad input (nothing run), 3 done "
                             "within the budget but incomplete, 130 / 143 interrupted. README: 'The paper in one "
                             "command (one GPU)'.")
    p.add_argument("--data-dir", metavar="DIR", help="the WikiText-2 raw release (wiki.train.raw, wiki.valid.raw, "
                                                     "wiki.test.raw); nothing is downloaded. Not with --tiny")
    p.add_argument("--out-dir", help="a new or empty folder; default runs/reproduce-<timestamp>")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: cuda if available. The paper's configuration needs cuda; cpu goes with --tiny")
    p.add_argument("--budget-minutes", type=budget_minutes, default=None, metavar="MINUTES",
                   help="stop cleanly after this many minutes: later steps skipped, a running one stopped by "
                        "SIGTERM, all recorded in the summary (default: no limit; 'inf' = no limit)")
    p.add_argument("--tiny", action="store_true",
                   help="the same four steps at tiny sizes (embedded corpus, smoke preset, tiny models, "
                        "two blocks at one length in the scale sweep): an end-to-end check in under a minute on CPU")
    return p


def check_args(args: argparse.Namespace) -> None:
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but CUDA is not available here; on a CPU run --device cpu --tiny")
    if args.device == "cpu" and not args.tiny:
        raise UsageError("the paper's configuration needs a CUDA GPU (Table 1 alone would take days on a CPU); "
                         "on a CPU add --tiny for the end-to-end check at tiny sizes")
    if args.tiny and args.data_dir:
        raise UsageError("--tiny trains on the embedded corpus: drop --data-dir")
    if not args.tiny:
        check_data_dir(args.data_dir)
    if args.budget_minutes is not None and math.isinf(args.budget_minutes):
        args.budget_minutes = None
    # Absolute: the steps run in the repository root, whatever the caller's working directory.
    default = Path("runs", "reproduce-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    args.out_dir = str(Path(args.out_dir or default).resolve())
    args.data_dir = args.data_dir and str(Path(args.data_dir).resolve())


def check_data_dir(data_dir: str | None) -> None:
    if not data_dir:
        raise UsageError("needs --data-dir DIR, the WikiText-2 raw release (" + ", ".join(WIKITEXT2_FILES)
                         + "); nothing is downloaded")
    missing = [f for f in WIKITEXT2_FILES if not Path(data_dir, f).is_file()]
    if missing:
        raise UsageError(f"--data-dir {data_dir}: no {', '.join(missing)} there (the WikiText-2 raw release)")


def check_modules() -> None:
    """Each module benchmark.py imports on its --data-dir path, imported here: a missing package
    is one line now, not a traceback after Table 2 has run."""
    for name in NEEDED_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise UsageError(f"benchmark.py cannot run here: importing {name} fails ({one_line(e)}); "
                             "pip install -r requirements.txt") from None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        check_modules()
        lock = claim_empty_folder(Path(args.out_dir), "--out-dir", "reproduce.py")
    except (OSError, UsageError) as e:
        print(f"reproduce.py: error: {e}", file=sys.stderr)
        return 2
    budget_s = math.inf if args.budget_minutes is None else 60 * args.budget_minutes
    run = Run(args, Path(args.out_dir), time.monotonic() + budget_s)
    meta = {**run_metadata(args.device), "command": shlex.join(["python", "reproduce.py", *(argv or sys.argv[1:])]),
            "started_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    with StopSignals().installed() as signals:
        try:
            for step in STEPS:
                run_step(run, step)
                write_summary(run, meta)
        except KeyboardInterrupt as e:
            signals.disarm()
            write_summary(run, meta)
            what = "stopped by SIGTERM" if isinstance(e, Terminated) else "interrupted"
            print(f"reproduce.py: {what}; what ran is in {run.out_dir / 'summary.md'}", file=sys.stderr)
            return interrupt_exit_code(e)
        finally:
            lock.release()
    print(f"\nreproduce.py: summary in {run.out_dir / 'summary.md'}")
    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
