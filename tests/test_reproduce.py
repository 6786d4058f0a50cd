"""reproduce.py (the paper in one command) and cuda_checks.py: the tiny run end to end on CPU, the
budget, refusals, and the check functions on CPU where their logic allows."""

import dataclasses
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

import cuda_checks
import reproduce
from conftest import REPO

TINY = cuda_checks.SIZES["tiny"]
STEP_KEYS = [s.key for s in reproduce.STEPS]


def blocker_dir(tmp_path, *modules):
    """A folder for PYTHONPATH in which each module's import fails, as where it is not installed."""
    for name in modules:
        (tmp_path / "blocked" / name).mkdir(parents=True)
        (tmp_path / "blocked" / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed')\n")
    return tmp_path / "blocked"


def test_tiny_run_on_cpu_end_to_end_without_wandb_mamba_ssm_or_datasets(tmp_path):
    """The four steps through the real scripts, each in its own folder with its own files; the
    CUDA checks recorded as skipped; no step needs wandb, mamba_ssm or datasets (their imports
    fail here)."""
    out = tmp_path / "run"
    blocked = blocker_dir(tmp_path, "wandb", "mamba_ssm", "datasets")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(blocked)}
    proc = subprocess.run([sys.executable, "reproduce.py", "--device", "cpu", "--tiny", "--out-dir", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    status = {s["key"]: s["status"] for s in summary["steps"]}
    assert status == {"table2": "ok", "cuda_checks": "skipped", "table1": "ok", "table3": "ok"}, summary["steps"]
    assert all(s["seconds"] > 0 and s["exit_code"] == 0 for s in summary["steps"])
    for files in (["table2/table2.md", "table2/results.json", "table2/compute_time.png"],
                  ["cuda_checks/cuda_checks.json", "cuda_checks/cuda_checks.md"],
                  ["table1/table1.md", "table1/results.json"], ["table3/table3.md", "table3/results.json"],
                  [f"logs/{k}.log" for k in STEP_KEYS]):
        assert all((out / f).is_file() for f in files), files
    checks = json.loads((out / "cuda_checks" / "cuda_checks.json").read_text())["checks"]
    assert [c["name"] for c in checks] == list(cuda_checks.CHECKS)
    assert all(c["status"] == "skipped" and "no CUDA" in c["note"] for c in checks)
    rows = json.loads((out / "table2" / "results.json").read_text())["rows"]
    assert [(r["model"], r["status"]) for r in rows] == [("gam", "ok"), ("transformer", "ok")]
    trained = lambda step: {r["model"] for r in json.loads((out / step / "results.json").read_text())}  # noqa: E731
    assert trained("table1") == {"transformer", "mamba", "gam"}
    assert trained("table3") == {"gam", "gam-global-only", "gam-sum-fusion", "gam-local-only"}
    text = (out / "summary.md").read_text()
    for step in reproduce.STEPS:  # every step's row, and its script's own table in full
        assert step.title in text
        assert (out / step.key / step.table).read_text().strip() in text
    assert not (out / ".lock").exists()


def fake_step(tmp_path):
    """A step command whose process writes a partial result, then runs until stopped, handling
    SIGTERM as the scripts do (exit 143)."""
    child = ("import pathlib, signal, sys, time\n"
             "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))\n"
             f"pathlib.Path({str(tmp_path / 'partial.txt')!r}).write_text('row 1')\n"
             "time.sleep(60)\n")
    return lambda run, folder: (["-c", child], "")


def test_the_budget_stops_the_running_step_and_skips_the_rest(tmp_path, monkeypatch):
    steps = [dataclasses.replace(reproduce.STEPS[0], command=fake_step(tmp_path)), *reproduce.STEPS[1:]]
    monkeypatch.setattr(reproduce, "STEPS", steps)
    out = tmp_path / "run"
    start = time.monotonic()
    code = reproduce.main(["--device", "cpu", "--tiny", "--budget-minutes", "0.02", "--out-dir", str(out)])
    assert code == reproduce.INCOMPLETE and time.monotonic() - start < 30
    steps = json.loads((out / "summary.json").read_text())["steps"]
    assert steps[0]["status"] == "stopped" and steps[0]["exit_code"] == 143 and steps[0]["cut_by_budget"]
    assert (tmp_path / "partial.txt").read_text() == "row 1"  # what it wrote before the stop is kept
    assert [s["status"] for s in steps[1:]] == ["skipped"] * 3
    assert all("budget was spent" in s["note"] and s["command"] is None for s in steps[1:])
    text = (out / "summary.md").read_text()
    assert "**stopped**" in text and text.count("**skipped**") == 3


def fake_table1(out, gam_epochs_s, other_epochs_s):
    (out / "table1").mkdir(parents=True)
    records = [{"model": "gam", "epochs": [{"epoch_time_s": s} for s in gam_epochs_s]},
               {"model": "transformer", "epochs": [{"epoch_time_s": s} for s in other_epochs_s]}]
    (out / "table1" / "results.json").write_text(json.dumps(records))


def test_table3_runs_the_variants_that_gams_measured_cost_says_fit(tmp_path):
    """GAM trained 2 x 10 s, the Transformer 30 s, the step took 60 s: 5 s of the rest per model,
    so 25 s per variant; with 60 s left, two variants run and the other two are named."""
    fake_table1(tmp_path, [10, 10], [30])
    args = reproduce.build_parser().parse_args(["--data-dir", "D", "--out-dir", str(tmp_path)])
    run = reproduce.Run(args, tmp_path, time.monotonic() + 60)
    run.steps.append({"key": "table1", "seconds": 60.0})
    assert reproduce.gam_cost_s(run) == pytest.approx(25.0)
    argv, note = reproduce.table3_command(run, tmp_path / "table3")
    assert argv[argv.index("--models") + 1:argv.index("--models") + 3] == ["gam", "gam-global-only"]
    assert "not run: gam-sum-fusion, gam-local-only" in note
    run.deadline = time.monotonic() + 10  # not even one variant: the step is skipped, saying why
    assert reproduce.table3_command(run, tmp_path / "table3")[0] is None
    run.deadline = math.inf  # no budget: all four, as the preset has them
    argv, note = reproduce.table3_command(run, tmp_path / "table3")
    assert "--models" not in argv and note == "" and argv[argv.index("--preset") + 1] == "ablation"


@pytest.mark.parametrize("argv, says", [
    (["--budget-minutes", "0"], "--budget-minutes"),
    (["--budget-minutes", "nan"], "--budget-minutes"),
    (["--device", "tpu"], "--device"),
    (["--no-such-flag"], "unrecognized"),
    (["--device", "cpu"], "needs a CUDA GPU"),
    (["--device", "cpu", "--tiny", "--data-dir", "."], "drop --data-dir"),
])
def test_bad_input_is_exit_2_with_one_line_before_anything_runs(argv, says, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(reproduce.subprocess, "Popen", lambda *a, **k: pytest.fail("a step ran"))
    try:
        code = reproduce.main([*argv, "--out-dir", str(tmp_path / "run")])
    except SystemExit as e:  # argparse's refusals
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and says in err, err
    assert not (tmp_path / "run").exists()


def test_data_dir_without_the_wikitext2_files_is_refused_naming_them(tmp_path):
    (tmp_path / "wiki.train.raw").write_text("x\n")
    with pytest.raises(reproduce.UsageError, match="no wiki.valid.raw, wiki.test.raw there"):
        reproduce.check_data_dir(str(tmp_path))
    with pytest.raises(reproduce.UsageError, match="needs --data-dir"):
        reproduce.check_data_dir(None)


def test_a_missing_package_is_one_line_before_anything_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(reproduce, "NEEDED_MODULES", ("no_such_module_here",))
    assert reproduce.main(["--device", "cpu", "--tiny", "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no_such_module_here" in err
    assert not (tmp_path / "run").exists()


def test_a_non_empty_out_dir_is_refused_before_anything_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(reproduce.subprocess, "Popen", lambda *a, **k: pytest.fail("a step ran"))
    (tmp_path / "notes.txt").write_text("mine")
    assert reproduce.main(["--device", "cpu", "--tiny", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not empty" in err and "notes.txt" in err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------
# The check functions, on CPU


def test_fast_vs_reference_check_passes_under_cpu_bf16_autocast():
    rec = cuda_checks.fast_vs_reference("cpu", TINY, "bf16")
    assert rec["status"] == "pass", rec
    n = rec["numbers"]
    assert cuda_checks.LOWERED_MIN < n["fast_max_rel_err"] <= cuda_checks.AUTOCAST_TOL  # bf16 really was used
    assert n["tensors_compared"] == 2 + len(list(cuda_checks.gam_block_pair(TINY, "cpu")[0].parameters()))


def test_fast_vs_reference_check_fails_when_the_fast_path_is_off(monkeypatch):
    """A check that cannot fail checks nothing: a fast path 5% off is caught."""
    real = cuda_checks.GAMBlock._forward_fast
    monkeypatch.setattr(cuda_checks.GAMBlock, "_forward_fast", lambda self, x: 1.05 * real(self, x))
    rec = cuda_checks.fast_vs_reference("cpu", TINY, "bf16")
    assert rec["status"] == "fail" and rec["numbers"]["fast_max_rel_err"] > cuda_checks.AUTOCAST_TOL


def test_sync_check_counts_one_read_per_checked_forward_and_none_unchecked():
    rec = cuda_checks.one_sync_per_forward("cpu", TINY)
    assert rec["status"] == "pass", rec
    assert rec["numbers"]["input checks on"] == 1 and rec["numbers"]["input checks off"] == 0
    t = torch.ones(3)
    assert cuda_checks.count_host_syncs(lambda: (t.sum().item(), t.tolist()), "cpu") == 2
    assert torch.Tensor.item.__name__ == "item"  # the counting wrappers are gone


def test_export_check_round_trips_every_family_on_cpu():
    rec = cuda_checks.export_to_device("cpu", TINY)
    assert rec["status"] == "pass", rec
    assert all(rec["numbers"][f] == 0.0 for f in ("gam", "transformer", "mamba"))  # CPU to CPU: exact


def test_mamba_check_is_skipped_with_its_reason():
    assert cuda_checks.torchmamba_vs_mamba_ssm("cpu", TINY)["status"] == "skipped"
    if cuda_checks.Mamba is None:  # the import error itself, not a guess
        assert "Error" in cuda_checks.mamba_ssm_missing()


def test_every_check_is_skipped_without_cuda_and_a_failure_is_recorded_not_raised(monkeypatch):
    assert cuda_checks.run_check("export-to-cuda", torch.device("cpu"), TINY)["note"].startswith("no CUDA device")
    monkeypatch.setitem(cuda_checks.CHECKS, "boom", lambda device, size: 1 / 0)
    rec = cuda_checks.run_check("boom", "cuda", TINY)  # as if on a GPU: the check runs and raises
    assert rec["status"] == "fail" and "ZeroDivisionError" in rec["note"]


@pytest.mark.parametrize("budget_s", [math.inf, 600.0])
def test_the_paper_commands_parse_with_their_scripts_own_parsers(tmp_path, budget_s):
    """The GPU commands cannot run here, but a misspelt flag or a bad value fails here, not on the GPU."""
    import config
    import scale

    args = argparse_namespace(tmp_path, device="cuda", data_dir="/data/wt2", tiny=False)
    run = reproduce.Run(args, tmp_path, time.monotonic() + budget_s)
    for step in reproduce.STEPS:
        argv, _ = step.command(run, tmp_path / step.key)
        script, rest = argv[0], argv[1:]
        assert rest[rest.index("--out-dir") + 1] == str(tmp_path / step.key) and "cuda" in rest
        on_cpu = [("cpu" if a == "cuda" else a) for a in rest]  # their parsers refuse cuda without a GPU
        if script == "benchmark.py":
            parsed = config.build_parser().parse_args(rest)
            assert parsed.data_dir == ["wikitext2=/data/wt2"] and parsed.wandb == "disabled"
        elif script == "scale.py":
            parsed = scale.parse_args(on_cpu)
            assert parsed.models == list(scale.MODELS) and (parsed.max_seconds == 25) == (budget_s == 600)
        else:
            cuda_checks.parse_args(on_cpu)
    assert reproduce.table1_command(run, tmp_path)[0][1:5] == ["--preset", "paper", "--datasets", "wikitext2"]


def argparse_namespace(tmp_path, **settings):
    """reproduce.py's parsed arguments with some set as check_args would leave them."""
    args = reproduce.build_parser().parse_args(["--out-dir", str(tmp_path)])
    vars(args).update(settings)
    return args


def test_relative_folders_are_resolved_since_the_steps_run_in_the_repository_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = reproduce.build_parser().parse_args(["--device", "cpu", "--tiny", "--out-dir", "rel"])
    reproduce.check_args(args)
    assert args.out_dir == str(tmp_path / "rel")


def test_sigterm_to_reproduce_stops_its_step_and_writes_the_summary(tmp_path, monkeypatch):
    """As the scripts: SIGTERM (a scheduler's stop) ends the step under way, then one line, exit 143."""
    import signal
    import threading

    steps = [dataclasses.replace(reproduce.STEPS[0], command=fake_step(tmp_path)), *reproduce.STEPS[1:]]
    monkeypatch.setattr(reproduce, "STEPS", steps)
    children = []
    real_popen = reproduce.subprocess.Popen
    monkeypatch.setattr(reproduce.subprocess, "Popen", lambda *a, **k: children.append(real_popen(*a, **k)) or
                        children[-1])
    timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        code = reproduce.main(["--device", "cpu", "--tiny", "--out-dir", str(tmp_path / "run")])
    finally:
        timer.cancel()
    steps_run = [c for c in children if c.args[0] == sys.executable]  # not run_metadata's git commands
    assert code == 143 and len(steps_run) == 1 and steps_run[0].returncode == 143  # the step got SIGTERM too
    steps = json.loads((tmp_path / "run" / "summary.json").read_text())["steps"]
    assert [s["status"] for s in steps] == ["interrupted"]  # the later steps never started
    assert "**interrupted**" in (tmp_path / "run" / "summary.md").read_text()
