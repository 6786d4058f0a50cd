"""benchmark.py under faults and bad input, tried as a careless user would.

Each case ends in one readable line on stderr (exit 2 for bad input, found before anything is
written; 1 for a failure while training; 130 for Ctrl-C and 143 for SIGTERM, with the --resume
command) and never damages a run that already exists. Signals go to a real process, and a folder
in use is held by a real process; the rest runs in-process.
"""

import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

import benchmark
import common
import config
import runs
from test_benchmark import tiny_args

REPO = Path(__file__).resolve().parents[1]


def run_main(argv, capsys) -> tuple[int, list[str]]:
    """(exit code, stderr lines) of benchmark.main, argparse's own exits included."""
    try:
        code = benchmark.main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip().splitlines()


def assert_one_line(err: list[str], *needles: str) -> None:
    assert len(err) == 1, err
    assert err[0].startswith("benchmark.py: ") and "Traceback" not in err[0], err
    for needle in needles:
        assert needle in err[0], (needle, err[0])


def snapshot(folder: Path) -> dict:
    """Every file of a run folder with its bytes: a refused command must change none."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished run (GAM and Transformer, 3 epochs) run straight through; tests that damage
    it work on a copy."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("finished") / "run"
    assert benchmark.main(tiny_args(out, models=("gam", "transformer"), epochs=3)) == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    shutil.copytree(finished_run.parent / "cache", tmp_path / "cache")
    return out


def resume_args(out: Path) -> list[str]:
    return ["--resume", str(out), "--wandb", "disabled", "--cache-dir", str(out.parent / "cache")]


# ---------------------------------------------------------------------------------------------
# a fresh command: refused before anything is written


def _impossible_allocation():
    return ["--n-embed", str(2**40), "--n-head", "1"]


BAD_FRESH = [
    pytest.param(["--n-embed", "30", "--n-head", "4"], "divisible", id="heads_do_not_divide"),
    pytest.param(["--lr", "0"], "--lr", id="zero_lr"),
    pytest.param(["--lr", "nan"], "--lr", id="nan_lr"),
    pytest.param(["--epochs", "0"], "--epochs", id="zero_epochs"),
    pytest.param(["--dropout", "1.5"], "--dropout", id="dropout_too_big"),
    pytest.param(["--datasets", "wikitext2", "--data-dir", "/nonexistent/dir"], "not a folder", id="missing_dir"),
    pytest.param(["--data-dir", "x=/tmp"], "not a selected", id="data_dir_unknown_name"),
    pytest.param(["--data-dir", "/tmp"], "no hub dataset is selected", id="bare_data_dir_without_hub_dataset"),
    pytest.param(["--datasets", "wikitext2", "tinystories", "--data-dir", "/tmp"], "NAME=DIR",
                 id="bare_data_dir_with_two_hub_datasets"),
    pytest.param(["--datasets", "wikitext2", "--data-dir", "wikitext2=/tmp", "wikitext2=/"], "given twice",
                 id="data_dir_repeated"),
    pytest.param(["--models", "gam", "gam"], "--models: gam given twice", id="duplicate_model"),
    pytest.param(["--seeds", "1", "2", "1"], "--seeds: 1 given twice", id="duplicate_seed"),
    pytest.param(["--seed", str(2**63)], "--seed must lie in [0, 2**63)", id="seed_too_big"),
    pytest.param(["--seed", "-1"], "--seed", id="negative_seed"),
    pytest.param(["--seeds", "1", str(10**23)], "--seeds", id="seeds_too_big"),
    pytest.param(["--seed", "1e23"], "invalid int value", id="seed_not_an_int"),
    pytest.param(["--num-workers", "-1"], "--num-workers must be >= 0", id="negative_workers"),
    pytest.param(["--grad-clip", "-1"], "--grad-clip must be >= 0", id="negative_grad_clip"),
    pytest.param(["--grad-clip", "nan"], "--grad-clip: invalid value nan", id="nan_grad_clip"),
    pytest.param(["--vocab-size", str(10**9)], "--vocab-size must be at most 1,048,576", id="vocab_too_big"),
    pytest.param(["--preset", "nope"], "invalid choice", id="unknown_preset"),
    pytest.param(["--batch-size", "many"], "invalid int", id="non_integer"),
    pytest.param(["--device", "mps"], "only cpu, cuda and cuda:N", id="device_mps"),
    pytest.param(["--device", "meta"], "only cpu, cuda and cuda:N", id="device_meta"),
    pytest.param(["--device", "tpu9"], "--device tpu9", id="device_unknown"),
    pytest.param(["--device", "cuda:99"], "--device cuda:99", id="device_missing_gpu"),
    pytest.param(["--wandb", "sometimes"], "invalid choice", id="wandb_mode"),
    pytest.param(_impossible_allocation(), "--n-embed", id="impossible_allocation"),
    pytest.param(["--datasets", "mqar", "--mqar-train-examples", str(10**12)],
                 "not enough memory to prepare mqar", id="impossible_mqar_set"),
    *[pytest.param(["--dist-timeout", v], "--dist-timeout: must be a finite number of seconds > 0",
                   id=f"dist_timeout_{v}") for v in ("nan", "inf", "0", "-5")],
]


@pytest.mark.parametrize("extra, needle", BAD_FRESH)
def test_bad_flags_exit_2_with_one_line_and_write_nothing(extra, needle, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_main(tiny_args(out, *extra), capsys)
    assert code == 2
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0], err
    assert not out.exists()  # no lone config.json


def test_out_dir_and_cache_dir_are_checked_first(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    prepared = []
    monkeypatch.setattr(benchmark, "prepare_data", lambda *a: prepared.append(a))  # must not be reached
    cases = [(["--out-dir", str(a_file)], "is a file"),
             (["--out-dir", str(a_file / "sub")], "lies under the file"),
             (["--cache-dir", str(a_file)], "--cache-dir"),
             (["--cache-dir", str(a_file / "sub")], "--cache-dir")]
    if sys.platform.startswith("linux") and os.access("/sys", os.R_OK):
        cases.append((["--out-dir", "/sys/gam-benchmark-test"], "not writable"))  # read-only even for root
    for extra, needle in cases:
        code, err = run_main(tiny_args(tmp_path / "out", *extra), capsys)
        assert code == 2, extra
        assert_one_line(err, needle)
    assert not prepared and a_file.read_text() == ""


def test_a_fresh_command_refuses_an_existing_run(finished_run, capsys):
    before = snapshot(finished_run)
    for extra in (["--lr", "1e-5", "--seed", "7"], ["--n-embed", "32"], []):
        code, err = run_main(tiny_args(finished_run, *extra, models=("gam",), epochs=3), capsys)
        assert code == 2
        assert_one_line(err, "already holds a run", f"--resume {finished_run}", "another --out-dir")
    assert snapshot(finished_run) == before


@pytest.mark.parametrize("name", ["samples.md", "table1.md", "context.md", "curves.png", "notes/"])
def test_a_new_command_refuses_a_folder_that_is_not_empty(name, tmp_path, capsys, monkeypatch):
    # Not a run, but a user's files: a fresh run, a report, --unigram-only and --speed-steps
    # would overwrite them. Refused before anything is prepared or written.
    out = tmp_path / "out"
    out.mkdir()
    if name.endswith("/"):
        (out / name).mkdir()
    else:
        (out / name).write_text("mine\n")
    monkeypatch.setattr(benchmark, "prepare_data", lambda *a: pytest.fail("must not prepare data"))
    before = snapshot(out)
    for argv in (tiny_args(out), tiny_args(out, "--unigram-only"), tiny_args(out, "--speed-steps", "1"),
                 ["--report", str(tmp_path), "--out-dir", str(out)]):
        code, err = run_main(argv, capsys)
        assert code == 2, argv
        assert_one_line(err, f"--out-dir {out} is not empty (it holds {name.rstrip('/')})", "choose another --out-dir")
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == [name.rstrip("/")]


def test_a_lock_file_left_by_a_killed_command_does_not_make_a_folder_taken(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / runs.LOCK_NAME).write_text("123 elsewhere\n")  # no process holds it any more
    assert run_main(tiny_args(out, "--unigram-only"), capsys)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["unigram.json"]


def test_a_folder_that_cannot_be_locked_is_used_with_a_warning(tmp_path, capsys, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")  # e.g. NFS without its lock daemon

    monkeypatch.setattr(common.fcntl, "flock", no_locks)
    code, err = run_main(tiny_args(tmp_path / "out", "--unigram-only"), capsys)
    assert code == 0
    assert_one_line(err, f"warning: {tmp_path / 'out'} cannot be locked (No locks available)")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["unigram.json"]


def test_default_out_dir_never_collides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(benchmark.time, "strftime", lambda fmt: "20250101-000000")
    first = config.default_out_dir()
    assert first == os.path.join("runs", "20250101-000000")
    os.makedirs(first)
    assert config.default_out_dir() == first + "-2"


# ---------------------------------------------------------------------------------------------
# --resume of a damaged run: refused in one line, the published results untouched


def _evil_pickle(path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo this must never run",))
    torch.save({"model": Evil()}, path)


CHECKPOINT_DAMAGE = {
    "empty": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "garbage": lambda p: p.write_bytes(b"not a checkpoint at all\n" * 50),
    "malicious_pickle": _evil_pickle,
    "plain_pickle": lambda p: p.write_bytes(pickle.dumps({"model": 1}, protocol=4)),
    "not_a_checkpoint": lambda p: torch.save({"weights": torch.ones(3)}, p),
    # Without the settings it was trained with, a checkpoint cannot be matched to this run.
    "no_run_config": lambda p: torch.save({k: v for k, v in torch.load(p, weights_only=True).items()
                                           if k != "run_config"}, p),
}


@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGE))
def test_resume_refuses_a_damaged_checkpoint(damage, run_copy, capfd):
    # The second model's checkpoint is damaged: the first must not be retrained or republished.
    ckpt = run_copy / "checkpoints" / "synthetic-transformer.pt"
    CHECKPOINT_DAMAGE[damage](ckpt)
    before = snapshot(run_copy)
    capfd.readouterr()
    code = benchmark.main(resume_args(run_copy))
    captured = capfd.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2
    assert_one_line(err, f"checkpoint {ckpt}", "delete it to retrain that model from scratch, or restore it")
    assert "weights_only" not in err[0]
    assert snapshot(run_copy) == before  # results.json, table1.md, config.json untouched
    assert "must never run" not in captured.out


def test_resume_refuses_a_checkpoint_of_another_model(run_copy, capsys):
    # A readable checkpoint of another width (as if copied from another run) put in place by hand.
    path = run_copy / "checkpoints" / "synthetic-gam.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["token_embedding.weight"] = torch.zeros(ckpt["model"]["token_embedding.weight"].shape[0], 32)
    torch.save(ckpt, path)
    before = snapshot(run_copy)
    code, err = run_main(resume_args(run_copy), capsys)
    assert code == 2
    assert_one_line(err, "synthetic-gam.pt does not fit this run", "size mismatch")
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("other", [["--lr", "0.02"], ["--max-train-blocks", "64"], ["--epochs", "2"]],
                         ids=["lr", "max_train_blocks", "epochs"])
def test_resume_refuses_a_checkpoint_of_another_run(other, run_copy, tmp_path, capsys, monkeypatch):
    # Same shapes, so it would load: a copy from a run of other settings must not be resumed.
    donor = tmp_path / "donor"
    assert benchmark.main(tiny_args(donor, *other, models=("gam",), epochs=3)) == 0
    shutil.copy(donor / "checkpoints" / "synthetic-gam.pt", run_copy / "checkpoints" / "synthetic-gam.pt")
    (run_copy / "checkpoints" / "synthetic-transformer.pt").unlink()  # else nothing would be loaded to train
    monkeypatch.setattr(benchmark, "train_epoch", lambda *a: pytest.fail("must not train"))
    before = snapshot(run_copy)
    code, err = run_main(resume_args(run_copy), capsys)
    assert code == 2
    saved = {"--lr": "0.02", "--max-train-blocks": "64", "--epochs": "2"}[other[0]]
    here = {"--lr": "0.01", "--max-train-blocks": "96", "--epochs": "3"}[other[0]]
    assert_one_line(err, "checkpoints/synthetic-gam.pt belongs to another run",
                    f"{other[0]} {saved} there, {here} here", "delete it to retrain that model from scratch")
    assert snapshot(run_copy) == before


def test_resume_refuses_a_foreign_folder_where_a_model_is_exported_before_training(run_copy, capsys, monkeypatch):
    (run_copy / "checkpoints" / "synthetic-gam.pt").unlink()  # gam trains again, then is exported
    shutil.rmtree(run_copy / "models" / "synthetic-gam")
    (run_copy / "models" / "synthetic-gam").mkdir()
    (run_copy / "models" / "synthetic-gam" / "notes.txt").write_text("mine\n")
    monkeypatch.setattr(benchmark, "train_epoch", lambda *a: pytest.fail("must not train"))
    before = snapshot(run_copy)
    code, err = run_main(resume_args(run_copy), capsys)
    assert code == 2
    assert_one_line(err, f"{run_copy / 'models' / 'synthetic-gam'} holds something other than an exported model",
                    "move it elsewhere")
    assert snapshot(run_copy) == before


def _edit_config(**changes):
    def edit(cfg):
        cfg.update(changes)
        return cfg
    return edit


CONFIG_DAMAGE = {
    "empty_object": lambda cfg: {},
    "a_list": lambda cfg: [cfg],
    "bad_json": None,  # not JSON at all
    "unknown_model": _edit_config(runs={"synthetic": ["lstm"]}),
    "unknown_dataset": _edit_config(runs={"imagenet": ["gam"]}),
    "unknown_key": _edit_config(learning_rate=0.1),
    "missing_key": lambda cfg: {k: v for k, v in cfg.items() if k != "n_embed"},
    "wrong_type": _edit_config(lr="fast"),
    "bool_for_int": _edit_config(n_layer=True),
    "bad_value": _edit_config(batch_size=0),
    "nan": _edit_config(dropout=float("nan")),
    "seed_too_big": _edit_config(seeds=[2**64]),
    "unknown_dtype": _edit_config(dtype="fp8"),
    "compile_not_bool": _edit_config(compile="yes"),
    "no_fingerprint": lambda cfg: {k: v for k, v in cfg.items() if k != "data_fingerprint"},
    "no_dtype_or_compile": lambda cfg: {k: v for k, v in cfg.items() if k not in ("dtype", "compile")},
    "no_world_size": lambda cfg: {k: v for k, v in cfg.items() if k != "world_size"},
}


@pytest.mark.parametrize("change", [["--dtype", "bf16"], ["--compile"]])
def test_resume_refuses_another_dtype_or_compile(change, run_copy, capsys):
    before = snapshot(run_copy)
    code, err = run_main(resume_args(run_copy) + change, capsys)
    assert code == 2
    assert_one_line(err, "--resume restores the saved config", change[0])
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("damage", list(CONFIG_DAMAGE))
def test_resume_refuses_a_broken_config(damage, run_copy, capsys):
    path = run_copy / "config.json"
    edit = CONFIG_DAMAGE[damage]
    path.write_text("{'lr': 3e-4,\n" if edit is None else json.dumps(edit(json.loads(path.read_text()))))
    before = snapshot(run_copy)
    code, err = run_main(resume_args(run_copy), capsys)
    assert code == 2
    assert_one_line(err, f"{path} is not a valid benchmark.py config", "restore it")
    assert snapshot(run_copy) == before


def test_resume_rejects_config_flags(run_copy, capsys):
    code, err = run_main(resume_args(run_copy) + ["--lr", "0.1", "--models", "gam"], capsys)
    assert code == 2
    assert_one_line(err, "--lr", "--models")
    code, err = run_main(["--resume", str(run_copy.parent / "nothing-here")], capsys)
    assert code == 2
    assert_one_line(err, "no config.json")


def _write_text_dataset(folder: Path, train_rows: list[str], val_rows: list[str]) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "wiki.train.raw").write_text("".join(r + "\n" for r in train_rows))
    (folder / "wiki.valid.raw").write_text("".join(r + "\n" for r in val_rows))


def test_resume_refuses_changed_data(tmp_path, capsys):
    from synthetic import synthetic_corpus

    corpus = synthetic_corpus(n_train_docs=40, n_val_docs=8)
    data_dir, out = tmp_path / "text", tmp_path / "run"
    _write_text_dataset(data_dir, corpus["train"], corpus["validation"])
    args = tiny_args(out, "--datasets", "wikitext2", "--data-dir", f"wikitext2={data_dir}", epochs=1)
    assert benchmark.main(args) == 0
    before = snapshot(out)
    cases = [(corpus["train"], corpus["validation"][:-1], "the validation data of wikitext2"),
             (corpus["train"][:-1], corpus["validation"], "the train data, validation data and tokenizer of wikitext2")]
    for train_rows, val_rows, needle in cases:
        _write_text_dataset(data_dir, train_rows, val_rows)
        capsys.readouterr()
        code, err = run_main(resume_args(out), capsys)
        assert code == 2
        assert_one_line(err, needle, str(data_dir), "changed")
        assert snapshot(out) == before
    _write_text_dataset(data_dir, corpus["train"], corpus["validation"])
    assert benchmark.main(resume_args(out) + ["--num-workers", "1"]) == 0  # the same data again: fine
    assert json.loads((out / "results.json").read_text())[0]["config"]["num_workers"] == 1


def test_unreadable_data_dir_exits_2(tmp_path, capsys):
    (tmp_path / "only_train").mkdir()
    (tmp_path / "only_train" / "wiki.train.raw").write_text("some text\n" * 100)
    code, err = run_main(["--preset", "cpu", "--data-dir", str(tmp_path / "only_train"), "--wandb", "disabled",
                          "--out-dir", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")], capsys)
    assert code == 2
    assert_one_line(err, "valid")
    assert not (tmp_path / "o").exists()  # nothing written half-way


# ---------------------------------------------------------------------------------------------
# failures while training: exit 1, one line; the finished epochs stay resumable


@pytest.mark.parametrize("exc, needle", [
    (RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB"), "out of memory during synthetic/gam epoch 1/2"),
    (OSError(28, "No space left on device"), "No space left on device"),
])
def test_a_failure_while_training_is_one_line_exit_1(exc, needle, tmp_path, capsys, monkeypatch):
    def fails(*args, **kwargs):
        raise exc

    monkeypatch.setattr(benchmark, "train_epoch", fails)
    out = tmp_path / "run"
    code, err = run_main(tiny_args(out), capsys)
    assert code == 1
    assert_one_line(err, needle)
    assert (out / "config.json").is_file()  # resumable: the run folder was started


def test_a_failed_resume_keeps_the_published_records(run_copy, capsys, monkeypatch):
    # The transformer's checkpoint was deleted (to retrain it); its retraining fails: the
    # records published before stay, the transformer's included.
    published = json.loads((run_copy / "results.json").read_text())
    (run_copy / "checkpoints" / "synthetic-transformer.pt").unlink()

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(benchmark, "train_epoch", out_of_memory)  # gam is finished: only the transformer trains
    code, err = run_main(resume_args(run_copy), capsys)
    assert code == 1
    assert_one_line(err, "out of memory during synthetic/transformer epoch 1/3", f"--resume {run_copy}")
    records = json.loads((run_copy / "results.json").read_text())
    assert [(r["model"], r["final_val_loss"]) for r in records] == [(r["model"], r["final_val_loss"]) for r in published]


# ---------------------------------------------------------------------------------------------
# Ctrl-C, SIGTERM and kill -9 in a real process, then --resume: the same numbers as a straight run.
# The child stalls at a known point and touches a marker file; only then does the test signal it,
# so the signal always lands there, however loaded the machine.

def stall_in_second_epoch(benchmark_module, on_stall):
    """Wrap train_epoch so that epoch 2 calls on_stall() after its third step, mid-loop."""
    real_train_epoch, calls = benchmark_module.train_epoch, []

    def second_epoch_stalls(t, loader, cfg, device, desc, log_step):
        calls.append(desc)
        if len(calls) < 2:
            return real_train_epoch(t, loader, cfg, device, desc, log_step)

        def log_then_stall(metrics):
            log_step(metrics)
            if metrics["step"] == t.steps_per_epoch + 3:
                on_stall()
        return real_train_epoch(t, loader, cfg, device, desc, log_then_stall)

    benchmark_module.train_epoch = second_epoch_stalls


def stall_in_checkpoint_write(benchmark_module, on_stall):
    """Make the write of synthetic/gam's second checkpoint call on_stall() once its temporary
    file is complete, just before the rename that would put it in place."""
    real_replace, writes = os.replace, []

    def replace_then_stall(src, dst):
        if Path(dst).name == "synthetic-gam.pt":
            writes.append(dst)
            if len(writes) == 2:
                on_stall()
        real_replace(src, dst)

    os.replace = replace_then_stall  # the child's own os module: common.atomic_write_bytes calls it


CHILD = """
import pathlib, signal, sys
sys.path[:0] = [{repo!r}, {tests!r}]
import benchmark
import test_benchmark_faults


def stall():
    pathlib.Path({marker!r}).touch()  # the test signals once this exists
    while True:
        signal.pause()  # until a signal ends the process or raises here


test_benchmark_faults.{stall}(benchmark, stall)
sys.exit(benchmark.main(sys.argv[1:]))
"""


def start_stalled_child(out: Path, stall: str = "stall_in_second_epoch", epochs: int = 3) -> subprocess.Popen:
    """A benchmark.py process training out, stalled at `stall` (its marker file exists)."""
    marker = out.parent / f"{out.name}.stalled"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    code = CHILD.format(repo=str(REPO), tests=str(REPO / "tests"), marker=str(marker), stall=stall)
    child = subprocess.Popen([sys.executable, "-c", code, *tiny_args(out, epochs=epochs)], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240  # a bound on a hang, not a speed assumption
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not marker.exists():
        child.kill()
        pytest.fail(f"the child never stalled: {child.communicate(timeout=60)}")
    return child


def stop(child: subprocess.Popen, signum: int) -> tuple[int, list[str]]:
    """(exit code, stderr lines) of the stalled child after signum."""
    child.send_signal(signum)
    try:
        _, err = child.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        child.kill()
        pytest.fail(f"the child did not end after signal {signum}: {child.communicate()}")
    return child.returncode, err.strip().splitlines()


def without_timing(epochs: list[dict]) -> list[dict]:
    """Epoch stats less the wall times, which no two runs share."""
    timing = ("epoch_time_s", "tokens_per_s", "first_step_s", "later_step_s_mean")
    return [{k: v for k, v in e.items() if k not in timing} for e in epochs]


def assert_resumes_to_the_straight_numbers(out: Path, finished_run: Path, capsys) -> None:
    assert len(torch.load(out / "checkpoints" / "synthetic-gam.pt", weights_only=True)["epochs"]) == 1
    assert benchmark.main(resume_args(out)) == 0
    assert "resumed synthetic/gam after epoch 1" in capsys.readouterr().out
    a = json.loads((finished_run / "results.json").read_text())[0]
    b = json.loads((out / "results.json").read_text())[0]
    assert a["model"] == b["model"] == "gam"
    assert without_timing(a["epochs"]) == without_timing(b["epochs"])  # bit-for-bit on CPU
    assert a["final_val_loss"] == b["final_val_loss"]


def resume_line(out: Path) -> str:
    return f"Resume with: python benchmark.py --resume {out} --cache-dir {out.parent / 'cache'} --wandb disabled"


def signalled_in_process(out: Path, stall, signum: int, capsys, monkeypatch) -> tuple[int, list[str], list]:
    """(exit code, stderr lines, temporary checkpoint files at the stall) of benchmark.main
    training out, sent signum by itself at `stall`. signal.raise_signal signals this thread, whose
    Python handler then runs before the call returns: the same handler, at the same point, as a
    signal from outside, without the seconds of starting a process."""
    monkeypatch.setattr(benchmark, "train_epoch", benchmark.train_epoch)  # put back after the test
    monkeypatch.setattr(os, "replace", os.replace)
    at_stall = []

    def send_signal():
        at_stall.append(list((out / "checkpoints").glob(".*.tmp")))
        signal.raise_signal(signum)

    stall(benchmark, send_signal)
    code, err = run_main(tiny_args(out, epochs=3), capsys)
    return code, err, at_stall


@pytest.mark.parametrize("signum, code, what", [(signal.SIGINT, 130, "interrupted"),
                                                (signal.SIGTERM, 143, "stopped by SIGTERM")],
                         ids=["ctrl_c", "sigterm"])
def test_ctrl_c_mid_epoch_prints_the_resume_command_then_resume_reaches_the_same_numbers(
        signum, code, what, finished_run, capsys):
    # A real process, stopped from outside: its exit code and its one line. SIGTERM is how Slurm,
    # Kubernetes and torchrun stop a job: the same as Ctrl-C, exit 128 + 15.
    out = finished_run.parent / f"interrupted-{code}"
    child = start_stalled_child(out)
    assert stop(child, signum) == (code, [f"benchmark.py: {what} during synthetic/gam epoch 2/3; every finished "
                                          f"epoch is saved. {resume_line(out)}"])
    assert not (out / ".lock").exists()
    if signum == signal.SIGINT:
        assert_resumes_to_the_straight_numbers(out, finished_run, capsys)
    else:  # the same handler saved the same state; one resume (seconds of the suite) checks it
        assert len(torch.load(out / "checkpoints" / "synthetic-gam.pt", weights_only=True)["epochs"]) == 1


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl_c", "sigterm"])
def test_a_signal_during_a_checkpoint_write_leaves_no_temporary_file_and_names_the_lost_epoch(
        signum, code, finished_run, capsys, monkeypatch):
    out = finished_run.parent / f"stopped-while-saving-{code}"
    got, err, at_stall = signalled_in_process(out, stall_in_checkpoint_write, signum, capsys, monkeypatch)
    assert len(at_stall) == 1 and at_stall[0]  # the stall is mid-write: the temporary file is there
    assert got == code
    assert_one_line(err, "during synthetic/gam checkpoint of epoch 2/3; every finished epoch is saved except "
                         "epoch 2 of synthetic/gam, whose checkpoint was not written (synthetic/gam resumes after "
                         "epoch 1)", resume_line(out))
    assert not list((out / "checkpoints").glob(".*.tmp"))
    monkeypatch.undo()  # the real train_epoch and os.replace for the resume
    assert_resumes_to_the_straight_numbers(out, finished_run, capsys)


def test_kill_9_during_a_checkpoint_write_leaves_a_temporary_file_that_resume_removes(finished_run, capsys):
    out = finished_run.parent / "killed-while-saving"
    child = start_stalled_child(out, "stall_in_checkpoint_write")
    assert stop(child, signal.SIGKILL)[0] == -signal.SIGKILL
    assert list((out / "checkpoints").glob(".*.tmp"))  # nothing can clean up after kill -9
    assert_resumes_to_the_straight_numbers(out, finished_run, capsys)
    assert not list((out / "checkpoints").glob(".*.tmp"))


def test_a_folder_in_use_is_refused_until_kill_9_then_resume_reaches_the_same_numbers(finished_run, capsys):
    # A real second process: while the child trains the folder, no other command may write into
    # it; kill -9 mid-epoch (the kernel drops the lock) frees it for --resume, which reaches the
    # numbers of a straight run.
    out = finished_run.parent / "in-use"
    child = start_stalled_child(out)
    try:
        before = snapshot(out)
        for argv in (resume_args(out), tiny_args(out), tiny_args(out, "--unigram-only"),
                     tiny_args(out, "--speed-steps", "1"),
                     ["--report", str(finished_run), "--out-dir", str(out)]):
            code, err = run_main(argv, capsys)
            assert code == 2, argv
            assert_one_line(err, f"{out} is in use by another benchmark.py (PID {child.pid} on ", "wait until it ends")
        assert snapshot(out) == before
    finally:
        child.kill()
        child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert_resumes_to_the_straight_numbers(out, finished_run, capsys)


def test_ctrl_c_while_the_data_is_prepared(run_copy, tmp_path, capsys, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(benchmark, "prepare_data", interrupted)
    code, err = run_main(tiny_args(tmp_path / "fresh"), capsys)
    assert code == 130
    assert_one_line(err, "interrupted during start-up; nothing was written")
    assert not (tmp_path / "fresh").exists()

    before = snapshot(run_copy)
    code, err = run_main(resume_args(run_copy), capsys)  # a resumed run stays resumable
    assert code == 130
    assert_one_line(err, f"Resume with: python benchmark.py --resume {run_copy} --cache-dir")
    assert snapshot(run_copy) == before


# ---------------------------------------------------------------------------------------------
# wandb: decided once before training; never an account needed, never a hang, never its output


class FakeWandb(types.ModuleType):
    """Stands in for the wandb package: records what benchmark.py asks of it."""

    def __init__(self, fail_init=False):
        super().__init__("wandb")
        self.settings, self.inits, self.logs, self.finishes, self.fail_init = [], [], [], [], fail_init

    def Settings(self, **kwargs):  # noqa: N802 (wandb's name)
        self.settings.append(kwargs)
        return kwargs

    def init(self, **kwargs):
        if self.fail_init:
            raise RuntimeError("Run initialization has timed out after 60.0 sec.")
        self.inits.append(kwargs)
        fake = self

        class Run:
            def __init__(self):
                self.summary = {}

            def log(self, metrics):
                fake.logs.append(metrics)

            def finish(self, exit_code=None):
                fake.finishes.append((exit_code, dict(self.summary)))

        return Run()


@pytest.fixture
def fake_wandb(monkeypatch, tmp_path):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for key in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # no login, whatever this machine has
    return fake


def test_wandb_offline_logs_every_step_and_epoch_silently(fake_wandb, tmp_path, capsys):
    out = tmp_path / "run"
    assert benchmark.main(tiny_args(out, "--wandb", "offline", models=("gam", "transformer"), epochs=1)) == 0
    assert "wandb offline" in capsys.readouterr().out
    assert [i["name"] for i in fake_wandb.inits] == ["synthetic-gam", "synthetic-transformer"]
    init = fake_wandb.inits[0]
    assert init["mode"] == "offline" and init["project"] == "gam-reproduction" and init["dir"] == str(out)
    assert init["config"]["params"] > 0 and init["config"]["config"]["lr"] == 0.01
    settings = init["settings"]
    assert settings["silent"] is True and settings["console"] == "off" and 0 < settings["init_timeout"] <= 120
    steps = [m for m in fake_wandb.logs if "train/lr" in m]
    epochs = [m for m in fake_wandb.logs if "epoch/val_loss" in m]
    assert len(steps) == 2 * 12 and len(epochs) == 2  # 96 blocks / batch 8 = 12 steps per epoch
    assert [m["step"] for m in steps[:12]] == list(range(1, 13))
    read = [s for s in range(1, 13) if s % benchmark.LOG_EVERY == 0 or s == 12]  # the loss: when read
    assert [m["step"] for m in steps[:12] if "train/loss" in m] == read
    record = json.loads((out / "results.json").read_text())[0]
    assert fake_wandb.finishes[0] == (0, {k: record[k] for k in runs.WandbRun.SUMMARY if k in record})


def test_wandb_mode_is_decided_once_before_training(fake_wandb, monkeypatch, capsys):
    mode = runs.resolve_wandb_mode
    assert mode(None, "out") == "disabled" and mode("offline", "out") == "offline"  # no login: nothing logged
    assert runs.WandbLogger("disabled", "p", "out").start("x", {}).run is None and not fake_wandb.inits
    with pytest.raises(config.UsageError, match="--wandb online needs a wandb login"):
        mode("online", "out")

    monkeypatch.setenv("WANDB_API_KEY", "not-a-real-key")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # the discard port: refused at once
    with pytest.raises(config.UsageError, match="--wandb online: http://127.0.0.1:9 cannot be reached"):
        mode("online", "out")
    capsys.readouterr()
    assert mode(None, "out") == "offline"  # by default: a fallback with one warning line
    err = capsys.readouterr().err.strip().splitlines()
    assert_one_line(err, "warning: http://127.0.0.1:9 cannot be reached", "offline")
    monkeypatch.setattr(runs, "wandb_unreachable", lambda url: None)
    assert mode(None, "out") == "online" and mode("online", "out") == "online"

    monkeypatch.delenv("WANDB_API_KEY")
    (Path(os.environ["NETRC"])).write_text("machine api.wandb.ai login user password not-a-real-key\n")
    assert mode(None, "out") == "online"  # a `wandb login` netrc entry counts as logged in


def test_wandb_online_without_a_login_is_refused_by_the_cli(fake_wandb, tmp_path, capsys):
    code, err = run_main(tiny_args(tmp_path / "run", "--wandb", "online"), capsys)
    assert code == 2
    assert_one_line(err, "--wandb online needs a wandb login", "--wandb offline")
    assert not (tmp_path / "run").exists()


def test_wandb_that_fails_to_start_does_not_stop_training(fake_wandb, tmp_path, capsys):
    fake_wandb.fail_init = True
    code, err = run_main(tiny_args(tmp_path / "run", "--wandb", "offline", epochs=1), capsys)
    assert code == 0
    assert_one_line(err, "warning: wandb did not start", "continuing without it")
    assert json.loads((tmp_path / "run" / "results.json").read_text())[0]["status"] == "done"


def test_wandb_probe_reports_a_refused_connection_quickly():
    start = time.monotonic()
    why = runs.wandb_unreachable("http://127.0.0.1:9")
    assert why and "refused" in why.lower() and time.monotonic() - start < runs.WANDB_PROBE_TIMEOUT_S + 2
