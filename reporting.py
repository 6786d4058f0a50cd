"""What benchmark.py and scale.py share: atomic writes, run metadata, the paper's tables
(restated from shared/SPEC.md section 4), our tables beside them, and figures."""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import re
import subprocess
import statistics
import tempfile
from pathlib import Path

import torch

REPO_DIR = Path(__file__).resolve().parent


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder, then rename.

    A reader (or a killed run) never sees a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def atomic_save_figure(fig, path: str | os.PathLike, **kwargs) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", **kwargs)
    atomic_write_bytes(path, buf.getvalue())


def git_commit() -> str | None:
    """The repository's HEAD commit (with '-dirty' when the tree has changes), or None."""
    try:
        run = lambda *a: subprocess.run(  # noqa: E731
            ["git", *a], cwd=REPO_DIR, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        sha = run("rev-parse", "HEAD")
        dirty = run("status", "--porcelain", "--untracked-files=no")
        return sha + ("-dirty" if dirty else "")
    except Exception:
        return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(device: str | torch.device) -> str:
    """Human-readable hardware name, e.g. 'NVIDIA H200' or 'AMD EPYC ... (2 threads)'."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def run_metadata(device: str | torch.device) -> dict:
    return {
        "device": str(device),
        "device_name": device_description(device),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "git_commit": git_commit(),
    }


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (exit code 2), not a usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ---------------------------------------------------------------------------------------
# The paper's numbers (arXiv:2509.00605), printed beside ours; never copied into our results.

PAPER_TABLE1 = {  # final epoch
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
# One block, forward + backward, batch 16, d_model 512, 8 heads, fp16 autocast, unnamed GPU.
# seq_len -> (time ms, peak memory MB), or None where the paper reports OOM.
PAPER_TABLE2 = {
    "gam": {256: (8.97, 179.42), 512: (13.09, 325.48), 1024: (25.86, 617.60),
            2048: (51.94, 1201.85), 4096: (105.03, 2370.35), 8192: (217.30, 4707.35)},
    "transformer": {256: (8.90, 216.03), 512: (23.86, 552.98), 1024: (74.19, 1964.79),
                    2048: (279.37, 7483.92), 4096: None, 8192: None},
}
# Rows (train, validation) the paper's Table 1 runs saw: WikiText-2 whole, TinyStories capped.
PAPER_ROWS = {"wikitext2": (36718, 3760), "tinystories": (50000, 5000)}


# ---------------------------------------------------------------------------------------
# Tables 1 and 3 of benchmark.py. A record (one dataset, model and seed) carries
# "paper_config": True only when its run used the paper's full setup and data, and only then
# do the paper's numbers appear beside ours. Several seeds of a (dataset, model) make one row
# with mean ± sample standard deviation over the seeds that finished, and their count.


def fmt(x, spec=".4f") -> str:
    return "—" if x is None else format(x, spec)


def group_seeds(records: list[dict]) -> list[list[dict]]:
    """Records grouped by (dataset, model), in order of first appearance."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["model"]), []).append(r)
    return list(groups.values())


def seed_cell(group: list[dict], key: str, spec: str) -> str:
    values = [r[key] for r in group if r.get(key) is not None]
    if not values and any(r.get("status") == "diverged" for r in group):
        return "diverged"
    if len(values) < 2:
        return fmt(values[0] if values else None, spec)
    return f"{format(statistics.fmean(values), spec)} ± {format(statistics.stdev(values), spec)}"


def seed_count(group: list[dict]) -> str:
    done = sum(r.get("status") == "done" for r in group)
    return str(done) if done == len(group) else f"{done} of {len(group)}"


def table1_markdown(records: list[dict]) -> str:
    groups = [g for g in group_seeds(records) if g[0]["model"] in ("gam", "transformer", "mamba")]
    seeds, test = any(len(g) > 1 for g in groups), has_test(records)
    head = ["Dataset", "Model", "Params", *(["Seeds"] if seeds else []), "Time / epoch (s)", "Val loss", "Val PPL",
            *(["Test loss", "Test PPL"] if test else []),
            "Paper params", "Paper time / epoch (s)", "Paper val loss", "Paper val PPL"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = set()
    for g in groups:
        r, key = g[0], (g[0]["dataset"], g[0]["model"])
        paper = PAPER_TABLE1.get(key) if all(x.get("paper_config") for x in g) else None
        if paper is None and key in PAPER_TABLE1:
            notes.add("Paper columns are left empty where our configuration differs from the paper's "
                      "(scaled-down preset, data subset or changed flags): those numbers are not comparable.")
        elif paper is None:
            notes.add(f"The paper reports no {r['model']} run on {r['dataset']}.")
        p = paper or {}
        cells = [r["dataset"], f"{r['model']} ({r['implementation']})", f"{r['params'] / 1e6:.2f} M",
                 *([seed_count(g)] if seeds else []), seed_cell(g, "mean_epoch_time_s", ".1f"),
                 seed_cell(g, "final_val_loss", ".4f"), seed_cell(g, "final_val_ppl", ".2f"),
                 *([seed_cell(g, "final_test_loss", ".4f"), seed_cell(g, "final_test_ppl", ".2f")] if test else []),
                 p.get("params", "—"), fmt(p.get("epoch_time_s"), ".1f"), fmt(p.get("val_loss")),
                 fmt(p.get("val_ppl"), ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    if seeds:
        notes.add("With several seeds: mean ± sample standard deviation over the seeds that finished.")
    if test:
        notes.add(TEST_NOTE)
    unigram = {g[0]["dataset"]: g[0]["data"].get("unigram_val_ppl") for g in groups}
    notes.update(f"Reference: a unigram model (train token frequencies, add-one smoothing) has validation "
                 f"PPL {ppl:.2f} on {d} with this tokenizer." for d, ppl in unigram.items() if ppl)
    return "\n".join(lines + [""] + sorted(notes)) + "\n"


TEST_NOTE = ("Test: the final model on the test split (where the data has one; TinyStories has no test split, "
             "so there validation is the only held-out split). A learning rate chosen on validation makes "
             "validation optimistic; test is not used for any choice.")


def has_test(records: list[dict]) -> bool:
    return any(r.get("final_test_ppl") is not None for r in records)


def table3_markdown(records: list[dict]) -> str:
    groups = [g for g in group_seeds(records) if g[0]["model"] in PAPER_TABLE3]
    seeds, test = any(len(g) > 1 for g in groups), has_test(records)
    head = ["Model configuration", "Gating", "Local", "Global", "Params", *(["Seeds"] if seeds else []),
            "Best val PPL", *(["Test PPL"] if test else []), "Paper params", "Paper best val PPL"]
    lines = ["| " + " | ".join(head) + " |", "|---|:-:|:-:|:-:|" + "---|" * (len(head) - 4)]
    mark = lambda b: "yes" if b else "no"  # noqa: E731
    for g in groups:
        r, mc = g[0], g[0]["model_config"]
        comparable = r["dataset"] == "wikitext2" and all(x.get("paper_config") for x in g)
        paper = PAPER_TABLE3[r["model"]] if comparable else {}
        cells = [f"{r['model']} ({r['dataset']})", mark(mc["USE_GATE"]), mark(mc["USE_LOCAL"]), mark(mc["USE_GLOBAL"]),
                 f"{r['params'] / 1e6:.2f} M", *([seed_count(g)] if seeds else []), seed_cell(g, "best_val_ppl", ".2f"),
                 *([seed_cell(g, "final_test_ppl", ".2f")] if test else []),
                 paper.get("params", "—"), fmt(paper.get("best_val_ppl"), ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + ([""] + [TEST_NOTE] if test else [])) + "\n"


# ---------------------------------------------------------------------------------------
# Figures: drawn off screen (Agg), written atomically, then freed.


def new_figure(ncols: int = 1, figsize: tuple[float, float] = (6.4, 4.8)):
    """(figure, list of its ncols axes), on the non-interactive Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize, squeeze=False)
    return fig, list(axes[0])


def save_figure(fig, path: str | os.PathLike, **kwargs) -> None:
    import matplotlib.pyplot as plt

    try:
        atomic_save_figure(fig, path, **kwargs)
    finally:
        plt.close(fig)


def plot_curves(records: list[dict], path: str | os.PathLike) -> None:
    """Validation perplexity per epoch, one panel per dataset, one line per model and seed."""
    import matplotlib.ticker

    datasets = list(dict.fromkeys(r["dataset"] for r in records))
    several_seeds = len({r.get("seed") for r in records}) > 1
    fig, axes = new_figure(len(datasets), figsize=(5.5 * len(datasets), 4))
    for ax, dataset in zip(axes, datasets):
        for r in records:
            if r["dataset"] == dataset and r["epochs"]:
                label = r["model"] + (f" seed {r.get('seed')}" if several_seeds else "")
                ppl = [e["val_ppl"] if math.isfinite(e["val_ppl"]) else math.nan for e in r["epochs"]]
                ax.plot([e["epoch"] for e in r["epochs"]], ppl, "o-", label=label)
        ax.set(title=dataset, xlabel="epoch", ylabel="validation perplexity", yscale="log")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def sweep_points(records: list[dict]) -> dict:
    """(dataset, model) -> [(lr, record)] sorted by lr, finished records only."""
    points: dict[tuple, list] = {}
    for r in records:
        if r.get("status") == "done":
            points.setdefault((r["dataset"], r["model"]), []).append((r["config"]["lr"], r))
    return {k: sorted(v, key=lambda p: p[0]) for k, v in points.items()}


def lr_sweep_markdown(records: list[dict]) -> str:
    """Per (dataset, model): validation (and test) PPL at each learning rate; the best by
    validation loss in bold, and whether it lies inside the grid (an end point may not be the best)."""
    lines = []
    for (dataset, model), pts in sweep_points(records).items():
        best = min(range(len(pts)), key=lambda i: pts[i][1]["final_val_loss"])
        inside = 0 < best < len(pts) - 1
        lines += [f"### {model} on {dataset}", "", "| lr | Val loss | Val PPL | Test PPL |", "|---|---|---|---|"]
        for i, (lr, r) in enumerate(pts):
            cells = [f"{lr:g}", fmt(r["final_val_loss"]), fmt(r["final_val_ppl"], ".2f"), fmt(r.get("final_test_ppl"), ".2f")]
            lines.append("| " + " | ".join(f"**{c}**" if i == best else c for c in cells) + " |")
        where = "inside the grid" if inside else "at an end of the grid: extend it before relying on this choice"
        lines += ["", f"Best by validation loss: lr {pts[best][0]:g}, {where}.", ""]
    failed = [f"{r['model']} lr {r['config']['lr']:g}" for r in records if r.get("status") != "done"]
    if failed:
        lines.append("Not finished (diverged or running): " + ", ".join(failed) + ".")
    return "\n".join(lines) + "\n"


def plot_lr_sweep(records: list[dict], path: str | os.PathLike) -> None:
    """Final validation PPL against learning rate (log-log), one panel per dataset, one line per model."""
    sweeps = sweep_points(records)
    datasets = list(dict.fromkeys(d for d, _ in sweeps))
    fig, axes = new_figure(len(datasets), figsize=(5.5 * len(datasets), 4))
    for ax, dataset in zip(axes, datasets):
        for i, ((d, model), pts) in enumerate(sweeps.items()):
            if d == dataset:
                ax.plot([lr for lr, _ in pts], [r["final_val_ppl"] for _, r in pts], "o-", label=model,
                        color=f"C{i % 10}", marker="osD^v<>ph*"[i % 10])
        ax.set(title=dataset, xlabel="peak learning rate", ylabel="final validation perplexity", xscale="log",
               yscale="log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="best", framealpha=0.8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


# ---------------------------------------------------------------------------------------
# Context use: validation loss at each position of the block (position p has p + 1 tokens
# of context, itself included), from each run's last epoch, mean over seeds.


def receptive_field(model_config: dict) -> int:
    """GAM's receptive field in tokens (SPEC section 1): N_LAYER * (k - 1) + 1."""
    if not model_config.get("USE_LOCAL", True):
        return 1
    return model_config["N_LAYER"] * (model_config["CONV_KERNEL_SIZE"] - 1) + 1


def mean_loss_by_position(group: list[dict]) -> list[float] | None:
    """Last-epoch val_loss_by_position averaged over the seeds of one (dataset, model)."""
    curves = [r["epochs"][-1]["val_loss_by_position"] for r in group
              if r["epochs"] and r["epochs"][-1].get("val_loss_by_position")]
    if not curves:
        return None
    return [statistics.fmean(values) for values in zip(*curves)]


def gam_receptive_field(records: list[dict]) -> int | None:
    fields = {receptive_field(r["model_config"]) for r in records if r["model"] in PAPER_TABLE3}
    return max(fields) if fields else None


def context_windows(curve: list[float], rf: int) -> tuple[float, float]:
    """(mean loss with R to 2R - 1 tokens of context, mean loss over the last quarter of the block)."""
    near = [v for c, v in enumerate(curve, 1) if rf <= c < 2 * rf and math.isfinite(v)]
    far = [v for v in curve[-max(1, len(curve) // 4):] if math.isfinite(v)]
    return (statistics.fmean(near) if near else math.nan), (statistics.fmean(far) if far else math.nan)


def context_markdown(records: list[dict]) -> str:
    """How much each model gains from context beyond GAM's receptive field R."""
    rf = gam_receptive_field(records)
    if rf is None:
        return ""
    lines = ["| Dataset | Model | Seeds | Loss, context 1 | Loss, context R..2R-1 | Loss, last quarter | "
             "Gain beyond R |", "|---|---|---|---|---|---|---|"]
    for g in group_seeds(records):
        curve = mean_loss_by_position(g)
        if curve is None or 2 * rf > len(curve):
            continue
        near, far = context_windows(curve, rf)
        lines.append(f"| {g[0]['dataset']} | {g[0]['model']} | {len(g)} | {curve[0]:.4f} | {near:.4f} | "
                     f"{far:.4f} | {near - far:+.4f} |")
    return "\n".join(lines + ["", f"R = {rf} tokens, GAM's receptive field (N_LAYER * (k - 1) + 1): its logits "
                               "cannot depend on anything further back. Mean validation loss per position, last "
                               "epoch, mean over seeds; 'gain beyond R' = loss with R..2R-1 tokens of context "
                               "minus loss over the last quarter of the block."]) + "\n"


def plot_context(records: list[dict], path: str | os.PathLike) -> None:
    """Validation loss against context length (log x), one line per model, GAM's R marked."""
    datasets = list(dict.fromkeys(r["dataset"] for r in records))
    rf = gam_receptive_field(records)
    fig, axes = new_figure(len(datasets), figsize=(5.5 * len(datasets), 4))
    for ax, dataset in zip(axes, datasets):
        for g in group_seeds([r for r in records if r["dataset"] == dataset]):
            curve = mean_loss_by_position(g)
            if curve is not None:
                n = f" ({len(g)} seeds)" if len(g) > 1 else ""
                ax.plot(range(1, len(curve) + 1), curve, label=g[0]["model"] + n)
        if rf is not None:
            ax.axvline(rf, color="grey", linestyle="--", label=f"GAM receptive field ({rf} tokens)")
        ax.set(title=dataset, xlabel="tokens of context (position + 1)", ylabel="validation loss", xscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


# ---------------------------------------------------------------------------------------
# Associative recall (MQAR): accuracy at the queries, split by the distance d between a query
# and its key at GAM's receptive field R (within: d <= R - 1, both key and value visible).


def recall_markdown(records: list[dict]) -> str:
    scored = [r for r in records if "final_recall_accuracy" in r]
    if not scored:
        return ""
    recall_sets = {r["dataset"] for r in scored}  # with the models that diverged on them
    groups = [g for g in group_seeds(records) if g[0]["dataset"] in recall_sets]
    lines = ["| Dataset | Model | Params | Seeds | Recall accuracy | Within R | Beyond R | Val loss |",
             "|---|---|---|---|---|---|---|---|"]
    last = scored[-1]["epochs"][-1]
    rf, counts = last.get("receptive_field"), (last.get("recall_count_within_rf"), last.get("recall_count_beyond_rf"))
    for g in groups:
        r = g[0]
        lines.append(f"| {r['dataset']} | {r['model']} ({r['implementation']}) | {r['params'] / 1e6:.2f} M | "
                     f"{seed_count(g)} | {seed_cell(g, 'final_recall_accuracy', '.3f')} | "
                     f"{seed_cell(g, 'final_recall_accuracy_within_rf', '.3f')} | "
                     f"{seed_cell(g, 'final_recall_accuracy_beyond_rf', '.3f')} | {seed_cell(g, 'final_val_loss', '.4f')} |")
    note = (f"Accuracy of the argmax prediction at the query positions, last epoch. R = {rf} tokens is GAM's "
            f"receptive field: 'within R' are queries whose key is at most R - 1 tokens back (the model at the "
            f"query sees the key and its value; {counts[0]} queries), 'beyond R' the others ({counts[1]} queries), "
            "which a model that sees R tokens can only guess. With several seeds: mean ± standard deviation.")
    return "\n".join(lines + ["", note]) + "\n"


def samples_markdown(records: list[dict]) -> str:
    """samples.md: each validation prompt, then every model's greedy and sampled continuation
    side by side (a table per prompt), per dataset and seed; "" when no record has samples."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("samples"):
            groups.setdefault((r["dataset"], r["seed"]), []).append(r)
    if not groups:
        return ""
    first = next(iter(groups.values()))[0]["samples"]
    lines = ["# Samples", "", f"Each trained model continues the same validation prompts by {first['new_tokens']} "
             f"tokens: greedy, and sampled at temperature {first['temperature']:g} with the run's seed. Decoded "
             "with the dataset's tokenizer, which has no decoder: tokens are joined by spaces."]
    for (dataset, seed), group in groups.items():
        for i, prompt in enumerate(group[0]["samples"]["prompts"]):
            lines += ["", f"## {dataset}, seed {seed}, prompt {i + 1}", "", f"> {markdown_text(prompt)}", "",
                      "| Model | Greedy | Sampled |", "|---|---|---|"]
            lines += [f"| {r['model']} | {markdown_text(r['samples']['greedy'][i])} | "
                      f"{markdown_text(r['samples']['sampled'][i])} |" for r in group]
    return "\n".join(lines) + "\n"


def markdown_text(text: str) -> str:
    """Model output as literal text on one line (a table cell): markdown's active characters escaped."""
    text = re.sub(r"([\\`*_\[\]<>|~])", r"\\\1", " ".join(text.split()))
    return "\\" + text if text[:1] in ("#", "+", "-", "=") else text  # not a heading or list item
