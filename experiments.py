"""Every committed CPU experiment: list them, print their commands, or re-run them.

    python experiments.py                                   # the list: name, folder, cost, what
    python experiments.py lr-sweep table1-tuned --dry-run   # their commands
    python experiments.py all --data-dir wikitext2=DIR tinystories=DIR --out-root runs/reproduce

Each experiment is the commands that made one folder under assets/ (its RUN.md says at which
commit, on what hardware, in what time). A re-run writes under --out-root, never into assets/,
one command after another at one thread (OMP_NUM_THREADS=1, as the committed runs); it stops
at the first command that fails, with that command's exit code. Data folders: WikiText-2 raw
(wiki.{train,valid,test}.raw) and TinyStories (train/validation text files); see the README.
"""

from __future__ import annotations

import glob
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from common import OneLineParser

# Each model's learning rate at the cpu preset, chosen by validation loss in the sweep
# (assets/lr-sweep-cpu-wikitext2/lr_sweep.md); the tuned runs use these.
TUNED_LR = {"transformer": "1e-2", "gam": "1e-1", "mamba": "3e-3",
            "gam-global-only": "1e-1", "gam-sum-fusion": "1e-1", "gam-local-only": "1e-1"}
ABLATIONS = ["gam-global-only", "gam-sum-fusion", "gam-local-only"]
SWEEP_LRS = {"transformer": ["1e-3", "3e-3", "1e-2", "3e-2"], "gam": ["1e-3", "3e-3", "1e-2", "3e-2", "1e-1", "3e-1"],
             "mamba": ["1e-3", "3e-3", "1e-2", "3e-2"],
             **{m: ["3e-2", "1e-1", "3e-1"] for m in ("gam-global-only", "gam-sum-fusion", "gam-local-only")}}
# The recall preset's sweep (the rates each model was run at), each model's best by validation
# loss in it, and the models that got seeds 2 and 3 at their best.
RECALL_SWEEP = {"conv-attention": ["1e-3", "3e-3", "1e-2", "3e-2"], "gam": ["1e-3", "3e-3", "1e-2", "3e-2", "1e-1", "3e-1"],
                "transformer": ["3e-3", "1e-2", "3e-2", "1e-1"], "mamba": ["1e-3", "3e-3", "1e-2", "3e-2"]}
RECALL_LR = {"conv-attention": "1e-2", "gam": "1e-1", "transformer": "3e-2", "mamba": "1e-2"}
RECALL_SEEDS = ("conv-attention",)         # seeds 2 and 3 in one command
RECALL_SEED_RUNS = ("transformer", "gam", "mamba")  # seeds 2 and 3 one command each
# TinyStories (Transformer and GAM): a sweep at seed 1 bracketing each model's WikiText-2 rate, and
# each model's best by validation loss in it (TinyStories has no test split: validation picks and scores).
TINY_SWEEP = {"gam": ["3e-2", "1e-1", "3e-1", "1e0"], "transformer": ["3e-3", "1e-2", "3e-2"]}
TINY_LR = {"gam": "3e-1", "transformer": "1e-2"}
RECALL = "python benchmark.py --preset recall --wandb disabled"
CPU = "python benchmark.py --preset cpu --wandb disabled"
WIKI = CPU + " --data-dir wikitext2={wikitext2}"


@dataclass(frozen=True)
class Experiment:
    name: str
    folder: str             # under assets/
    minutes: int            # at one thread on a 2-core Xeon, roughly
    what: str
    commands: tuple         # shell-style strings with {wikitext2}, {tinystories}, {out} placeholders


def sweep_commands() -> tuple:
    runs = [f"{WIKI} --models {m} --seeds 1 --lr {lr} --out-dir {{out}}/runs/{m}-lr{lr}"
            for m, lrs in SWEEP_LRS.items() for lr in lrs]
    return (*runs, "python benchmark.py --report {out}/runs/*/ --lr-sweep --out-dir {out}/report")


def recall_commands() -> tuple:
    """The recall preset per model: a learning-rate sweep at seed 1, seeds 2 and 3 at the best rate
    of the models in RECALL_SEEDS, then one report of each model at its best rate."""
    sweep = [f"{RECALL} --models {m} --seeds 1 --lr {lr} --out-dir {{out}}/sweep/{m}-lr{lr}"
             for m, lrs in RECALL_SWEEP.items() for lr in lrs]
    seeds = [f"{RECALL} --models {m} --seeds 2 3 --lr {RECALL_LR[m]} --out-dir {{out}}/{m}-seeds23" for m in RECALL_SEEDS]
    seeds += [f"{RECALL} --models {m} --seeds {s} --lr {RECALL_LR[m]} --out-dir {{out}}/{m}-lr{RECALL_LR[m]}-seed{s}"
              for m in RECALL_SEED_RUNS for s in (2, 3)]
    best = " ".join(f"{{out}}/sweep/{m}-lr{lr}" + (f" {{out}}/{m}-seeds23" if m in RECALL_SEEDS else "")
                    + "".join(f" {{out}}/{m}-lr{lr}-seed{s}" for s in (2, 3) if m in RECALL_SEED_RUNS)
                    for m, lr in RECALL_LR.items())
    return (*sweep, *seeds, f"python benchmark.py --report {best} --out-dir {{out}}/report",
            "python benchmark.py --report {out}/sweep/*/ --lr-sweep --out-dir {out}/sweep-report")


def tinystories_commands() -> tuple:
    """TinyStories per model: the sweep at seed 1, seeds 2 and 3 at each model's best, the reports."""
    tiny = f"{CPU} --datasets tinystories --data-dir tinystories={{tinystories}}"
    sweep = [f"{tiny} --models {m} --seeds 1 --lr {lr} --out-dir {{out}}/runs/{m}-lr{lr}-seed1"
             for m, lrs in TINY_SWEEP.items() for lr in lrs]
    seeds = [f"{tiny} --models {m} --seeds {s} --lr {lr} --out-dir {{out}}/runs/{m}-lr{lr}-seed{s}"
             for m, lr in TINY_LR.items() for s in (2, 3)]
    best = " ".join(f"{{out}}/runs/{m}-lr{lr}-seed{s}" for m, lr in TINY_LR.items() for s in (1, 2, 3))
    return (*sweep, *seeds, f"python benchmark.py --report {best} --out-dir {{out}}/report",
            "python benchmark.py --report {out}/runs/*-seed1/ --lr-sweep --out-dir {out}/sweep-report")


def tuned_commands(models: list[str], also: str = "") -> tuple:
    """Seeds 2 and 3 of each model at its tuned lr (seed 1 is the sweep's run at that lr), then
    one report of the three seeds of every model (and of the finished runs ``also`` names)."""
    runs = [f"{WIKI} --models {m} --seeds {s} --lr {TUNED_LR[m]} --out-dir {{out}}/runs/{m}-lr{TUNED_LR[m]}-seed{s}"
            for m in models for s in (2, 3)]
    seed1 = " ".join(f"{{root}}/lr-sweep-cpu-wikitext2/runs/{m}-lr{TUNED_LR[m]}" for m in models)
    return (*runs, f"python benchmark.py --report {seed1}{also} {{out}}/runs/*/ --out-dir {{out}}/report")


EXPERIMENTS = [
    Experiment("lr-sweep", "lr-sweep-cpu-wikitext2", 300,
               "each model's learning rate: the cpu preset at 3-6 rates per model, seed 1", sweep_commands()),
    Experiment("table1-tuned", "table1-tuned-cpu-wikitext2", 120,
               "Table 1 shape, each model at its own lr (from lr-sweep, run it first), 3 seeds, paired differences",
               tuned_commands(["transformer", "gam", "mamba"])),
    Experiment("table3-tuned", "table3-tuned-cpu-wikitext2", 90,
               "Table 3: the three GAM variants at their own lr (from lr-sweep), 3 seeds, beside the full GAM of "
               "table1-tuned (run it first)",
               tuned_commands(ABLATIONS, also=" {root}/lr-sweep-cpu-wikitext2/runs/gam-lr1e-1"
                                              " {root}/table1-tuned-cpu-wikitext2/runs/gam-lr1e-1-seed*")),
    Experiment("table1-shared-lr", "table1-cpu-wikitext2-3seeds", 45,
               "Table 1 shape at the preset's one lr (the paper's protocol): Transformer and GAM, 3 seeds",
               (f"{WIKI} --models transformer gam --seeds 1 2 3 --out-dir {{out}}",)),
    Experiment("mamba-shared-lr", "mamba-cpu-wikitext2-3seeds", 75,
               "Mamba at the preset's one lr, 3 seeds", (f"{WIKI} --models mamba --seeds 1 2 3 --out-dir {{out}}",)),
    Experiment("ablation-shared-lr", "ablation-cpu-wikitext2", 50,
               "Table 3 variants at the preset's one lr, 3 seeds",
               (f"{WIKI} --models gam-global-only gam-sum-fusion gam-local-only --seeds 1 2 3 --out-dir {{out}}",)),
    Experiment("tinystories-shared-lr", "tinystories-cpu-3seeds", 45,
               "TinyStories, Transformer and GAM at the preset's one lr, 3 seeds",
               (f"{CPU} --datasets tinystories --data-dir tinystories={{tinystories}} --models transformer gam "
                "--seeds 1 2 3 --out-dir {out}",)),
    Experiment("tinystories-tuned", "tinystories-tuned-cpu", 60,
               "TinyStories, Transformer and GAM each at its own lr: a sweep at seed 1, then 3 seeds at the best",
               tinystories_commands()),
    Experiment("long", "long-cpu-wikitext2", 60, "Transformer and GAM over 3 full epochs",
               (f"{WIKI} --models transformer --max-train-blocks 1000000 --epochs 3 --out-dir {{out}}/transformer",
                f"{WIKI} --models gam --max-train-blocks 1000000 --epochs 3 --out-dir {{out}}/gam",
                "python benchmark.py --report {out}/transformer {out}/gam --out-dir {out}")),
    Experiment("recall", "recall-cpu-control", 60,
               "associative recall (MQAR): the attention control, Transformer, Mamba and GAM, each at its own lr",
               recall_commands()),
    Experiment("unigram", "unigram-wikitext2", 2, "the unigram reference PPL at the paper's tokenizer",
               ("python benchmark.py --preset paper --datasets wikitext2 --data-dir wikitext2={wikitext2} "
                "--unigram-only --tokenizer-splits train --out-dir {out}/tokenizer-train",
                "python benchmark.py --preset paper --datasets wikitext2 --data-dir wikitext2={wikitext2} "
                "--unigram-only --tokenizer-splits all --out-dir {out}/tokenizer-all")),
    Experiment("speed-paper", "speed-paper-cpu", 5, "training step time of the paper-size GAM and Transformer",
               ("python benchmark.py --models gam transformer --datasets wikitext2 --speed-steps 10 --wandb disabled "
                "--out-dir {out}",)),
    Experiment("dtype", "dtype-cpu", 3, "cpu preset step time in fp32 and bf16",
               (f"{CPU} --speed-steps 10 --dtype fp32 --out-dir {{out}}/fp32",
                f"{CPU} --speed-steps 10 --dtype bf16 --out-dir {{out}}/bf16")),
    Experiment("speed-cpu", "speed-cpu", 3, "cpu preset training step time of the three models (chunked Mamba scan)",
               (f"{CPU} --speed-steps 10 --out-dir {{out}}",)),
    Experiment("speed-recall", "speed-recall-cpu", 3, "recall preset step time of its four models (the preset's cost)",
               (f"{RECALL} --speed-steps 10 --out-dir {{out}}",)),
    Experiment("perf-mamba", "perf-mamba-cpu", 10, "Mamba scans (chunked vs mambapy) and a Mamba vs GAM training step",
               ("python perf.py --checks mamba-layer mamba-step --mamba-batch 8 --threads 1 --out-dir {out}",
                "python perf.py --checks mamba-step --mamba-batch 32 --mamba-scans chunked --mamba-reps 3 --threads 1 "
                "--out-dir {out}/batch32")),
    Experiment("compile", "compile-cpu", 5, "cpu preset step time, eager and torch.compile",
               (f"{CPU} --models gam transformer --speed-steps 10 --compile --out-dir {{out}}/compiled",
                f"{CPU} --models gam transformer --speed-steps 10 --out-dir {{out}}/eager")),
    Experiment("scale", "scale-cpu", 5, "Table 2 on CPU: one block, forward + backward, 256-2048 tokens",
               ("python scale.py --device cpu --batch-size 2 --seq-lens 256 512 1024 2048 --out-dir {out}",)),
    Experiment("decode", "decode-cpu", 20, "time and state per generated token against context length",
               ("python scale.py --mode decode --device cpu --threads 1 --models gam transformer mamba --seq-lens 256 "
                "512 1024 2048 4096 8192 --warmup 3 --iters 10 --reencode-max-len 1024 --reencode-reps 2 "
                "--out-dir {out}",)),
    Experiment("perf", "perf-cpu", 5, "GAM block memory, time and profile, generation speed",
               ("python perf.py --checks block generate --profile --threads 1 --out-dir {out}",)),
]
BY_NAME = {e.name: e for e in EXPERIMENTS}
# Folders under assets/ that no command re-makes: explorations kept as they were written, and
# runs of an older recall preset (their RUN.md gives the command and commit).
NOT_RERUN = {"recall-explore", "recall-cpu", "recall-cpu-preset", "recall-cpu-preset-2threads",
             "table1-cpu-wikitext2-all"}


def expand(command: str, out: Path, data_dirs: dict) -> list[str]:
    """A command with its placeholders filled in, as an argv (globs expanded as a shell would)."""
    text = command.format(out=shlex.quote(str(out)), root=shlex.quote(str(out.parent)),
                          **{k: shlex.quote(v) for k, v in data_dirs.items()})
    argv = shlex.split(text)
    return [p for a in argv for p in ((sorted(glob.glob(a)) or [a]) if "*" in a else [a])]


def parse_args(argv=None):
    p = OneLineParser(prog="experiments.py", description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", metavar="NAME", help="experiments to run (or 'all'); none: list them")
    p.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    p.add_argument("--data-dir", nargs="+", default=[], metavar="NAME=DIR",
                   help="wikitext2=DIR (wiki.*.raw) and tinystories=DIR, for the experiments that need them")
    p.add_argument("--out-root", default="runs/reproduce", help="each experiment writes to OUT_ROOT/<its folder>")
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n != "all" and n not in BY_NAME]
    if unknown:
        p.error(f"unknown experiment {unknown[0]!r}; choose from: all, {', '.join(BY_NAME)}")
    pairs = [d.partition("=") for d in args.data_dir]
    if any(not sep or name not in ("wikitext2", "tinystories") for name, sep, _ in pairs):
        p.error("--data-dir takes wikitext2=DIR and tinystories=DIR")
    args.data_dirs = {"wikitext2": "<wikitext-2-raw folder>", "tinystories": "<tinystories folder>",
                      **{name: str(Path(path).resolve()) for name, _, path in pairs}}
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    chosen = EXPERIMENTS if "all" in args.names else [BY_NAME[n] for n in args.names]
    if not chosen:
        for e in EXPERIMENTS:
            print(f"{e.name:22} assets/{e.folder:30} ~{e.minutes:>3} min  {e.what}")
        print(f"\nNot re-run by a command here: {', '.join(sorted(NOT_RERUN))} (see each RUN.md).")
        return 0
    missing = sorted({k for e in chosen for c in e.commands for k in ("wikitext2", "tinystories")
                      if "{" + k + "}" in c and args.data_dirs[k].startswith("<")})
    if missing and not args.dry_run:  # found before hours of other experiments have run
        print(f"experiments.py: error: {', '.join(e.name for e in chosen if any('{' + missing[0] + '}' in c for c in e.commands))} "
              f"needs --data-dir {missing[0]}=DIR", file=sys.stderr)
        return 2
    for e in chosen:
        for command in e.commands:
            argv_ = expand(command, Path(args.out_root) / e.folder, args.data_dirs)
            if args.dry_run:
                print(f"OMP_NUM_THREADS=1 {shlex.join(argv_)}")
                continue
            print(f"[{e.name}] {shlex.join(argv_)}", flush=True)
            code = subprocess.call([sys.executable, *argv_[1:]], env={**os.environ, "OMP_NUM_THREADS": "1"})
            if code:
                print(f"experiments.py: {e.name} stopped: exit {code} from {shlex.join(argv_)}", file=sys.stderr)
                return code
    return 0

if __name__ == "__main__":
    sys.exit(main())
