"""The paper's numbers (its Tables 1-3) and ours beside them: the tables, figures and
summaries that benchmark.py and scale.py write."""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from pathlib import Path

import torch

import distributed
from baselines import MODEL_NAMES
from gam_model import ModelConfig
from common import atomic_save_figure, atomic_write_json, atomic_write_text, device_description, one_line
from config import GAM_VARIANTS, TrainConfig, UsageError, flag

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
    groups = [g for g in group_seeds(records) if g[0]["model"] in MODEL_NAMES]
    seeds, test, lrs = any(len(g) > 1 for g in groups), has_test(records), own_lrs(groups)
    head = ["Dataset", "Model", "Params", *(["LR"] if lrs else []), *(["Seeds"] if seeds else []),
            "Time / epoch (s)", "Val loss", "Val PPL",
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
                 *([f"{r['config']['lr']:g}"] if lrs else []), *([seed_count(g)] if seeds else []),
                 seed_cell(g, "mean_epoch_time_s", ".1f"),
                 seed_cell(g, "final_val_loss", ".4f"), seed_cell(g, "final_val_ppl", ".2f"),
                 *([seed_cell(g, "final_test_loss", ".4f"), seed_cell(g, "final_test_ppl", ".2f")] if test else []),
                 p.get("params", "—"), fmt(p.get("epoch_time_s"), ".1f"), fmt(p.get("val_loss")),
                 fmt(p.get("val_ppl"), ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    if seeds:
        notes.add("With several seeds: mean ± sample standard deviation over the seeds that finished.")
    if test:
        notes.add(TEST_NOTE)
    if lrs:
        notes.add(LR_NOTE)
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
    seeds, test, lrs = any(len(g) > 1 for g in groups), has_test(records), own_lrs(groups)
    head = ["Model configuration", "Gating", "Local", "Global", "Params", *(["LR"] if lrs else []),
            *(["Seeds"] if seeds else []),
            "Best val PPL", *(["Test PPL"] if test else []), "Paper params", "Paper best val PPL"]
    lines = ["| " + " | ".join(head) + " |", "|---|:-:|:-:|:-:|" + "---|" * (len(head) - 4)]
    mark = lambda b: "yes" if b else "no"  # noqa: E731
    for g in groups:
        r, mc = g[0], g[0]["model_config"]
        comparable = r["dataset"] == "wikitext2" and all(x.get("paper_config") for x in g)
        paper = PAPER_TABLE3[r["model"]] if comparable else {}
        cells = [f"{r['model']} ({r['dataset']})", mark(mc["USE_GATE"]), mark(mc["USE_LOCAL"]), mark(mc["USE_GLOBAL"]),
                 f"{r['params'] / 1e6:.2f} M", *([f"{r['config']['lr']:g}"] if lrs else []),
                 *([seed_count(g)] if seeds else []), seed_cell(g, "best_val_ppl", ".2f"),
                 *([seed_cell(g, "final_test_ppl", ".2f")] if test else []),
                 paper.get("params", "—"), fmt(paper.get("best_val_ppl"), ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [*([TEST_NOTE] if test else []), *([LR_NOTE] if lrs else [])]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


LR_NOTE = ("LR: each model's peak learning rate. Where models differ in it, each was trained at its own "
           "learning rate (chosen by a sweep on validation loss), not at one shared rate.")


def own_lrs(groups: list[list[dict]]) -> bool:
    """Whether the rows' models were trained at different learning rates."""
    return len({g[0].get("config", {}).get("lr") for g in groups}) > 1


# ---------------------------------------------------------------------------------------
# Paired differences: the same seed (same init seed and data order) for two models, so
# that the seed-to-seed spread that both share cancels.


def paired_differences(records: list[dict], metric: str) -> list[dict]:
    """Per dataset: each model against the reference (the Transformer for Table 1 models, full
    GAM for the Table 3 variants), over the seeds both finished: the per-seed differences
    model - reference of ``metric``, their mean and sample std, and in how many seeds the model
    was lower."""
    done = {(r["dataset"], r["model"], r["seed"]): r[metric] for r in records
            if r.get("status") == "done" and r.get(metric) is not None}
    rows = []
    for dataset, model in dict.fromkeys((d, m) for d, m, _ in done):
        ref = "gam" if model in PAPER_TABLE3 and model != "gam" else "transformer"
        seeds = sorted(s for d, m, s in done if (d, m) == (dataset, model) and (dataset, ref, s) in done)
        if model == ref or len(seeds) < 2:
            continue
        diffs = [done[(dataset, model, s)] - done[(dataset, ref, s)] for s in seeds]
        rows.append({"dataset": dataset, "model": model, "reference": ref, "metric": metric, "seeds": seeds,
                     "differences": diffs, "mean": statistics.fmean(diffs), "std": statistics.stdev(diffs),
                     "lower_in": sum(x < 0 for x in diffs)})
    return rows


def paired_markdown(records: list[dict]) -> str:
    """The paired differences in test PPL (validation PPL where there is no test split), or ''."""
    rows = [row for metric in ("final_test_ppl", "final_val_ppl") for row in paired_differences(records, metric)
            if metric == "final_test_ppl" or not has_test([r for r in records if r["dataset"] == row["dataset"]])]
    if not rows:
        return ""
    lines = ["| Dataset | Model − reference | PPL | Seeds | Per-seed differences | Mean ± std | Lower in |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['model']} − {r['reference']} | {r['metric'][6:-4]} | "
                     f"{', '.join(map(str, r['seeds']))} | {', '.join(f'{d:+.2f}' for d in r['differences'])} | "
                     f"{r['mean']:+.2f} ± {r['std']:.2f} | {r['lower_in']} of {len(r['seeds'])} |")
    return "\n".join(lines + ["", "Per seed: the model's final PPL minus the reference's at the same seed (same "
                                   "initialisation seed and data order). Negative: the model is better. Mean ± "
                                   "sample standard deviation over the seeds."]) + "\n"


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
    """One panel per dataset: validation perplexity per epoch (text), or recall accuracy
    against training steps (MQAR: accuracy, not perplexity, is what the task scores). A colour
    per model, a line style per seed; the legend beside the axes, not over the data."""
    import matplotlib.ticker

    datasets = list(dict.fromkeys(r["dataset"] for r in records))
    models = list(dict.fromkeys(r["model"] for r in records))
    seeds = list(dict.fromkeys(r.get("seed") for r in records))
    fig, axes = new_figure(len(datasets), figsize=(7.5 * len(datasets), 4))
    for ax, dataset in zip(axes, datasets):
        recall = dataset == "mqar"
        for r in records:
            if r["dataset"] != dataset or not r["epochs"]:
                continue
            label = r["model"] + (f" seed {r.get('seed')}" if len(seeds) > 1 else "")
            style = dict(color=f"C{models.index(r['model']) % 10}", linestyle=["-", "--", ":", "-."][seeds.index(
                r.get("seed")) % 4], marker="o", markersize=3, label=label)
            if recall:  # records written before steps_per_epoch was recorded: epochs
                steps = r.get("steps_per_epoch", 1)
                ax.plot([e["epoch"] * steps for e in r["epochs"]], [e.get("recall_accuracy") for e in r["epochs"]],
                        **style)
            else:
                ppl = [e["val_ppl"] if math.isfinite(e["val_ppl"]) else math.nan for e in r["epochs"]]
                ax.plot([e["epoch"] for e in r["epochs"]], ppl, **style)
        if recall:
            steps = all("steps_per_epoch" in r for r in records if r["dataset"] == dataset)
            ax.set(title=dataset, xlabel="training step" if steps else "epoch", ylabel="recall accuracy (validation)",
                   ylim=(0, 1.02))
        else:
            ax.set(title=dataset, xlabel="epoch", ylabel="validation perplexity", yscale="log")
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small", frameon=False)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def sweep_points(records: list[dict], finished_only: bool = True) -> dict:
    """(dataset, model) -> [(lr, record)] sorted by lr: finished records, or all of them."""
    points: dict[tuple, list] = {}
    for r in records:
        if r.get("status") == "done" or not finished_only:
            points.setdefault((r["dataset"], r["model"]), []).append((r["config"]["lr"], r))
    return {k: sorted(v, key=lambda p: p[0]) for k, v in points.items()}


def lr_sweep_markdown(records: list[dict]) -> str:
    """Per (dataset, model): validation (and test) PPL at each learning rate; the best by
    validation loss in bold, and whether it lies inside the grid, that is, whether a smaller and a
    larger lr were tried (a larger one that diverged counts: it is worse)."""
    lines = []
    for (dataset, model), pts in sweep_points(records, finished_only=False).items():
        done = [(lr, r) for lr, r in pts if r.get("status") == "done"]
        best_lr = min(done, key=lambda p: p[1]["final_val_loss"])[0] if done else None
        recall = any("final_recall_accuracy" in r for _, r in pts)  # MQAR: what the task scores
        lines += [f"### {model} on {dataset}", "", "| lr | Val loss | Val PPL | " + ("Recall accuracy |" if recall
                  else "Test PPL |"), "|---|---|---|---|"]
        for lr, r in pts:
            if r.get("status") != "done":
                lines.append(f"| {lr:g} | {r.get('status', '?')} | — | — |")
                continue
            last = fmt(r.get("final_recall_accuracy"), ".3f") if recall else fmt(r.get("final_test_ppl"), ".2f")
            cells = [f"{lr:g}", fmt(r["final_val_loss"]), fmt(r["final_val_ppl"], ".2f"), last]
            lines.append("| " + " | ".join(f"**{c}**" if lr == best_lr else c for c in cells) + " |")
        if best_lr is None:
            lines += ["", "No learning rate finished.", ""]
            continue
        inside = min(lr for lr, _ in pts) < best_lr < max(lr for lr, _ in pts)
        where = "inside the grid" if inside else "at an end of the grid: extend it before relying on this choice"
        lines += ["", f"Best by validation loss: lr {best_lr:g}, {where}.", ""]
    return "\n".join(lines) + "\n"


def plot_lr_sweep(records: list[dict], path: str | os.PathLike) -> None:
    """Final validation PPL against learning rate (log-log), one panel per dataset, one line per
    model; a learning rate at which a model diverged is an x on the panel's top edge."""
    sweeps, every = sweep_points(records), sweep_points(records, finished_only=False)
    datasets = list(dict.fromkeys(d for d, _ in every))
    models = list(dict.fromkeys(m for _, m in every))
    fig, axes = new_figure(len(datasets), figsize=(7 * len(datasets), 4))
    for ax, dataset in zip(axes, datasets):
        top = max((r["final_val_ppl"] for (d, _), pts in sweeps.items() if d == dataset for _, r in pts), default=1.0)
        for (d, model), pts in every.items():
            if d != dataset:
                continue
            i, done = models.index(model), [(lr, r) for lr, r in pts if r.get("status") == "done"]
            style = dict(color=f"C{i % 10}", marker="osD^v<>ph*"[i % 10])
            ax.plot([lr for lr, _ in done], [r["final_val_ppl"] for _, r in done], "-", label=model, **style)
            failed = [lr for lr, r in pts if r.get("status") != "done"]
            if failed:
                ax.plot(failed, [top * 1.25] * len(failed), linestyle="none", marker="x", markersize=9,
                        color=style["color"], label=f"{model}: diverged")
        ax.set(title=dataset, xlabel="peak learning rate", ylabel="final validation perplexity", xscale="log",
               yscale="log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small", frameon=False)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


# ---------------------------------------------------------------------------------------
# Context use: validation loss at each position of the block (position p has p + 1 tokens
# of context, itself included), from each run's last epoch, mean over seeds.


def receptive_field(model_config: dict) -> int:
    """GAM's receptive field in tokens (ModelConfig.receptive_field) of a record's model_config."""
    return ModelConfig(**model_config).receptive_field


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


def print_tables(out_dir: Path, names=("table1.md", "recall.md")) -> None:
    for name in names:
        table = out_dir / name
        print(table.read_text() if table.exists() else "", end="\n")
    print(f"results: {out_dir / 'results.json'}")


# Keys two runs of one dataset may differ in without changing what a record measures.
REPORT_FREE_KEYS = {"seed", "seeds", "runs", "out_dir", "preset", "num_workers", "data_dirs", "mamba_impl",
                    "world_size"}  # the same global batch on 1 or W processes


def write_report(run_dirs: list[str], explicit: set[str], out_dir: Path) -> int:
    extra = explicit - {"report", "out_dir", "lr_sweep"}
    if extra:
        raise UsageError("--report takes only --out-dir and --lr-sweep; drop "
                         + " ".join(flag(k) for k in sorted(extra)))
    sweep = "lr_sweep" in explicit
    records = combined_records([Path(d) for d in run_dirs], free=REPORT_FREE_KEYS | ({"lr"} if sweep else set()))
    out_dir.mkdir(parents=True, exist_ok=True)
    if sweep:
        atomic_write_json(out_dir / "results.json", records)
        atomic_write_text(out_dir / "lr_sweep.md", lr_sweep_markdown(records))
        plot_lr_sweep(records, out_dir / "lr_sweep.png")
        print((out_dir / "lr_sweep.md").read_text(encoding="utf-8"))
        print(f"learning-rate sweep of {len(records)} records from {len(run_dirs)} runs: {out_dir}")
        return 0
    write_results(records, out_dir)
    print_tables(out_dir, ("table1.md", "table3.md", "recall.md", "paired.md"))
    print(f"report of {len(records)} records from {len(run_dirs)} runs: {out_dir}")
    return 0


def combined_records(run_dirs: list[Path], free: set = REPORT_FREE_KEYS) -> list[dict]:
    """Every record of every run, refusing a (dataset, model, seed) given twice and runs of one
    dataset whose settings differ outside ``free`` (those would not belong in one table). The
    learning rate may differ between models (each at its own tuned lr) but not between the seeds
    of one model. In a learning-rate sweep ``free`` holds "lr", and a record is (dataset, model,
    seed, lr)."""
    records, source, first = [], {}, {}
    for run_dir in run_dirs:
        for r in run_records(run_dir):
            key = (r["dataset"], r["model"], r["seed"], *([r["config"].get("lr")] if "lr" in free else []))
            if key in source:
                raise UsageError(f"--report: {'/'.join(map(str, key))} is in both {source[key]} and {run_dir}; "
                                 "give each run once")
            source[key] = run_dir
            check_same_settings(first.setdefault(r["dataset"], (run_dir, r)), (run_dir, r), free | {"lr"})
            check_same_settings(first.setdefault(key[:2], (run_dir, r)), (run_dir, r), free)
            records.append(r)
    return records


NOT_RECORDED = "not recorded"


def check_same_settings(ref: tuple, new: tuple, free: set) -> None:
    """Two (run folder, record) pairs whose configs agree outside ``free``, or a UsageError."""
    (ref_dir, ref_record), (run_dir, record) = ref, new
    a, b = ref_record["config"], record["config"]
    for k in sorted((set(a) | set(b)) - free):  # a setting one record lacks differs too: its value is unknown
        if a.get(k, NOT_RECORDED) != b.get(k, NOT_RECORDED):
            who = record["dataset"] if ref_record["model"] != record["model"] else f"{record['dataset']}/{record['model']}"
            raise UsageError(f"--report: {who} runs differ in {k} ({ref_dir}: {a.get(k, NOT_RECORDED)}, "
                             f"{run_dir}: {b.get(k, NOT_RECORDED)}); report them separately")


def run_records(run_dir: Path) -> list[dict]:
    path = run_dir / "results.json"
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"--report: cannot read {path} ({one_line(e)}); is {run_dir} a finished run?") from None
    needed = {"dataset", "model", "config", "epochs", "status"}
    if not (isinstance(records, list) and records
            and all(isinstance(r, dict) and needed <= set(r) and isinstance(r["config"], dict) for r in records)):
        raise UsageError(f"--report: {path} is not a benchmark.py results.json")
    for r in records:
        r.setdefault("seed", r["config"].get("seed"))  # records before --seeds carried it in the config only
    return records


def speed_row(model_name: str, t, seconds: list[float], cfg: TrainConfig) -> dict:
    median = statistics.median(seconds)
    return {"model": model_name, "params": t.model.num_params(), "implementation": t.model.implementation,
            "step_s_median": median, "step_s_min": min(seconds), "step_s_max": max(seconds),
            "tokens_per_s": cfg.batch_size * cfg.block_size / median}


def speed_markdown(rows: list[dict], cfg: TrainConfig, device: torch.device) -> str:
    ref = next((r for r in rows if r["model"] == "gam"), rows[0])
    lines = ["| Model | Params | Step time, median [min, max] (s) | Tokens / s | Time relative to " + ref["model"] + " |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} ({r['implementation']}) | {r['params']:,} | {r['step_s_median']:.3f} "
                     f"[{r['step_s_min']:.3f}, {r['step_s_max']:.3f}] | {r['tokens_per_s']:,.0f} | "
                     f"{r['step_s_median'] / ref['step_s_median']:.2f}x |")
    return "\n".join(lines + ["", f"One training step (forward, backward, clip, AdamW, schedule) at batch "
                               f"{cfg.batch_size} x {cfg.block_size} tokens, {cfg.dtype}"
                               f"{', compiled' if cfg.compile else ''}, on {device_description(device)}; "
                               "models interleaved step by step; median over the timed steps."]) + "\n"


def write_results(records: list[dict], out_dir: Path) -> None:
    if not distributed.is_main():
        return
    atomic_write_json(out_dir / "results.json", records)
    if any(r["model"] in MODEL_NAMES for r in records):
        atomic_write_text(out_dir / "table1.md", table1_markdown(records))
    if len({r["model"] for r in records if r["model"] in GAM_VARIANTS}) > 1:
        atomic_write_text(out_dir / "table3.md", table3_markdown(records))
    if any(r["epochs"] for r in records):
        plot_curves(records, out_dir / "curves.png")
    language = [r for r in records if r["dataset"] != "mqar"]  # recall scores queries only
    if any(r["epochs"] for r in language):
        plot_context(language, out_dir / "context.png")
    for name, text in (("context.md", context_markdown(language)), ("recall.md", recall_markdown(records)),
                       ("paired.md", paired_markdown(records)),
                       ("samples.md", samples_markdown(records))):
        if text:
            atomic_write_text(out_dir / name, text)


def write_unigram(data: dict, out_dir: Path) -> int:
    if not distributed.is_main():
        return 0
    keys = ("unigram_val_ppl", "vocab_size", "tokenizer_splits", "tokens", "block_size", "rows")
    atomic_write_json(out_dir / "unigram.json", {d: {k: p.info[k] for k in keys} for d, p in data.items()})
    print(f"unigram reference: {out_dir / 'unigram.json'}")
    return 0
