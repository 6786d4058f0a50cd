"""benchmark.py --report: the tables of several finished runs, written together."""
import json
import statistics
from pathlib import Path

import pytest

import benchmark
import config
import report
from test_benchmark import tiny_args


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A GAM run and a Transformer run of the same tiny setup, one epoch each."""
    root = tmp_path_factory.mktemp("report")
    assert benchmark.main(tiny_args(root / "gam", epochs=1)) == 0
    assert benchmark.main(tiny_args(root / "transformer", models=("transformer",), epochs=1)) == 0
    return root


def test_report_combines_the_records_of_several_runs(two_runs, capsys):
    out = two_runs / "both"
    assert benchmark.main(["--report", str(two_runs / "gam"), str(two_runs / "transformer"),
                           "--out-dir", str(out)]) == 0
    records = json.loads((out / "results.json").read_text())
    runs = [json.loads((two_runs / m / "results.json").read_text())[0] for m in ("gam", "transformer")]
    assert records == runs  # every record as its run wrote it, in the order given
    table = (out / "table1.md").read_text()
    for r in runs:
        row = next(line for line in table.splitlines() if f"| {r['model']} (" in line)
        assert f"{r['final_val_loss']:.4f}" in row
    assert (out / "curves.png").is_file() and "report of 2 records" in capsys.readouterr().out


@pytest.mark.parametrize("case, message", [
    pytest.param("twice", "is in both", id="same-run-twice"),
    pytest.param("other-lr", "differ in lr", id="different-settings"),
    pytest.param("no-results", "cannot read", id="not-a-run"),
    pytest.param("unrecorded-setting", "differ in dtype", id="a-setting-one-record-lacks"),
    pytest.param("extra-flag", "takes only --out-dir", id="training-flag"),
])
def test_report_refuses_what_does_not_belong_in_one_table(two_runs, tmp_path, capsys, case, message):
    gam = str(two_runs / "gam")
    if case == "other-lr":
        other = tmp_path / "lr"
        assert benchmark.main(tiny_args(other, "--lr", "0.02", "--seed", "5", epochs=1)) == 0
        dirs = [gam, str(other)]
    elif case == "unrecorded-setting":  # a record without its dtype is not assumed to be fp32
        records = json.loads((two_runs / "gam" / "results.json").read_text())
        for name, dtype, seed in (("unrecorded", None, 1), ("fp32", "fp32", 2)):
            edited = [{**r, "seed": seed, "config": {k: v for k, v in r["config"].items() if k != "dtype"}}
                      for r in records]
            for r in edited:
                r["config"].update({"dtype": dtype} if dtype else {})
            (tmp_path / name).mkdir()
            (tmp_path / name / "results.json").write_text(json.dumps(edited))
        dirs = [str(tmp_path / "unrecorded"), str(tmp_path / "fp32")]
    else:
        dirs = {"twice": [gam, gam], "no-results": [gam, str(tmp_path)], "extra-flag": [gam]}[case]
    extra = ["--epochs", "3"] if case == "extra-flag" else []
    capsys.readouterr()
    out = tmp_path / "out"
    assert benchmark.main(["--report", *dirs, *extra, "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing written


def test_lr_sweep_report_marks_each_models_best_by_validation_and_says_if_it_is_inside_the_grid(
        two_runs, tmp_path, capsys):
    """Runs that differ only in --lr: one row per lr, the lowest validation loss in bold, and
    'an end of the grid' when that lowest sits at the smallest or largest lr."""
    runs = [str(two_runs / "gam")]  # lr 0.01
    for lr in ("0.002", "0.02"):
        assert benchmark.main(tiny_args(tmp_path / f"lr{lr}", "--lr", lr, epochs=1)) == 0
        runs.append(str(tmp_path / f"lr{lr}"))
    out = tmp_path / "sweep"
    assert benchmark.main(["--report", *runs, "--lr-sweep", "--out-dir", str(out)]) == 0
    records = [json.loads((Path(d) / "results.json").read_text())[0] for d in runs]
    by_lr = sorted(records, key=lambda r: r["config"]["lr"])
    best = min(by_lr, key=lambda r: r["final_val_loss"])
    text = (out / "lr_sweep.md").read_text()
    rows = [line for line in text.splitlines() if line.lstrip("| *").startswith("0.0")]
    assert [row.split(" | ")[0].strip("| *") for row in rows] == ["0.002", "0.01", "0.02"]
    bold = [row for row in rows if row.startswith("| **")]
    assert bold == [next(row for row in rows if f"{best['final_val_ppl']:.2f}" in row)]
    inside = best is by_lr[1]
    assert ("inside the grid" in text) == inside and ("an end of the grid" in text) == (not inside)
    assert (out / "lr_sweep.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert benchmark.main(["--lr-sweep", "--out-dir", str(tmp_path / "x")]) == 2
    assert "--lr-sweep goes with --report" in capsys.readouterr().err


def _sweep_record(lr, val_loss=None, status="done"):
    r = {"dataset": "wikitext2", "model": "mamba", "seed": 1, "status": status, "config": {"lr": lr}}
    if status == "done":
        r.update(final_val_loss=val_loss, final_val_ppl=2.718281828 ** val_loss, final_test_ppl=None)
    return r


def test_lr_sweep_counts_a_diverged_larger_lr_as_bracketing_the_best():
    """A larger lr that diverged is worse than the best: the best is then inside the grid. Without
    it, the same best sits at the grid's end. Diverged rows are listed, not dropped."""
    finished = [_sweep_record(1e-3, 6.0), _sweep_record(3e-3, 5.5)]
    at_end = report.lr_sweep_markdown(finished)
    assert "Best by validation loss: lr 0.003, at an end of the grid" in at_end
    text = report.lr_sweep_markdown([*finished, _sweep_record(1e-2, status="diverged")])
    assert "Best by validation loss: lr 0.003, inside the grid" in text
    assert "| 0.01 | diverged | — | — |" in text
    assert "**0.003**" in text and "**0.001**" not in text
    assert "No learning rate finished" in report.lr_sweep_markdown([_sweep_record(1e-2, status="diverged")])


def _write_run(folder, records):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(records))
    return folder


def test_report_lets_models_differ_in_lr_but_not_the_seeds_of_one_model(two_runs, tmp_path):
    """Each model at its own learning rate is one table (with an LR column); two seeds of one
    model at different learning rates are not."""
    gam = json.loads((two_runs / "gam" / "results.json").read_text())[0]
    tr = json.loads((two_runs / "transformer" / "results.json").read_text())[0]
    tuned_tr = {**tr, "config": {**tr["config"], "lr": tr["config"]["lr"] * 3}}
    records = report.combined_records([_write_run(tmp_path / "g", [gam]), _write_run(tmp_path / "t", [tuned_tr])])
    table = report.table1_markdown(records)
    assert "| LR |" in table and f"| {tuned_tr['config']['lr']:g} |" in table and report.LR_NOTE in table
    assert "| LR |" not in report.table1_markdown([gam, tr])  # one shared lr: no column
    other_seed = {**tuned_tr, "seed": 99, "config": {**tuned_tr["config"], "lr": tr["config"]["lr"]}}
    with pytest.raises(config.UsageError, match="/transformer runs differ in lr"):
        report.combined_records([_write_run(tmp_path / "t2", [tuned_tr]), _write_run(tmp_path / "t3", [other_seed])])


def test_paired_differences_are_per_seed_model_minus_reference():
    def rec(model, seed, ppl, dataset="wikitext2"):
        return {"dataset": dataset, "model": model, "seed": seed, "status": "done", "final_test_ppl": ppl}
    records = [rec("transformer", 1, 400.0), rec("transformer", 2, 410.0), rec("transformer", 3, 390.0),
               rec("gam", 1, 380.0), rec("gam", 2, 415.0), rec("gam", 3, 370.0),
               rec("gam-local-only", 1, 385.0), rec("gam-local-only", 2, 420.0),
               rec("mamba", 1, 300.0)]  # one seed: no pair statistics
    rows = {r["model"]: r for r in report.paired_differences(records, "final_test_ppl")}
    assert set(rows) == {"gam", "gam-local-only"}
    g = rows["gam"]
    assert g["reference"] == "transformer" and g["seeds"] == [1, 2, 3] and g["differences"] == [-20.0, 5.0, -20.0]
    assert g["mean"] == pytest.approx(-35 / 3) and g["std"] == pytest.approx(statistics.stdev([-20.0, 5.0, -20.0]))
    assert g["lower_in"] == 2
    local = rows["gam-local-only"]
    assert local["reference"] == "gam" and local["differences"] == [5.0, 5.0] and local["lower_in"] == 0
    text = report.paired_markdown(records)
    assert "| wikitext2 | gam − transformer | test | 1, 2, 3 | -20.00, +5.00, -20.00 | -11.67 ± 14.43 | 2 of 3 |" in text
