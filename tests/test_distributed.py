"""benchmark.py under torchrun: 2 CPU processes (gloo) train the same numbers as one process
with the same global batch, only rank 0 writes, a hung process ends the job within the
timeout, and --resume under torchrun reaches the uninterrupted numbers. Plus the loaders'
split of the batches over the ranks, checked without a process group.

Each torchrun launch costs a few seconds of start-up (three Python processes import torch),
so the end-to-end tests share one uninterrupted run.
"""

import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import benchmark
import config
import data
import distributed
from gam_model import GAM_Model
from pretrained import from_pretrained
from test_benchmark import tiny_args
from test_benchmark_faults import resume_args, run_main, snapshot, without_timing

REPO = Path(__file__).resolve().parents[1]
# 40 MQAR validation examples: 5 batches of 8, dealt 3 + 2 over two ranks (an uneven split).
MQAR = ("--mqar-train-examples", "200", "--mqar-val-examples", "40")
# Equal per-rank token counts make the DDP gradient (mean of two half-batch means) the full-batch
# mean gradient; only float32 reassociation differs (measured ~1e-8 relative after 2 epochs). A
# real bug (gradients summed, half the validation set, padded duplicates) moves the loss by 1e-3+.
RTOL = 1e-5
HANG_GUARD_S = 120  # a bound on the job, not a speed assertion

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")


def ddp_args(out: Path, *extra: str) -> list[str]:
    """Two datasets, one model each; dropout 0, since each rank draws its own masks."""
    return tiny_args(out, "--datasets", "synthetic", "mqar", "--dropout", "0", *MQAR, *extra)


def readme_command() -> list[str]:
    """The README's 2-process CPU command, without `torchrun`: the job these tests launch
    (with tiny overrides appended, which argparse lets win)."""
    line = next(text for text in (REPO / "README.md").read_text().splitlines()
                if text.startswith("torchrun --standalone --nproc_per_node 2 benchmark.py"))
    words = shlex.split(line.split("#")[0])
    assert words[:4] == ["torchrun", "--standalone", "--nproc_per_node", "2"], line
    return words[1:]


def torchrun(script: str, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the README's 2-process CPU launch of ``script args``; the
    whole process group is killed and the test fails if it outlives HANG_GUARD_S."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    launch = readme_command()[:3]  # --standalone --nproc_per_node 2
    command = [sys.executable, "-m", "torch.distributed.run", *launch, script, *args]
    job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        out, err = job.communicate(timeout=HANG_GUARD_S)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.communicate()
        pytest.fail(f"the torchrun job did not end within {HANG_GUARD_S} s")
    return job.returncode, out, err


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("ddp") / "run"
    script, *readme_args = readme_command()[3:]  # benchmark.py --preset smoke --device cpu
    code, stdout, stderr = torchrun(script, *readme_args, *ddp_args(out))
    assert code == 0, stderr[-3000:]
    return out, stdout


def records(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())


def test_torchrun_trains_the_numbers_of_one_process(ddp_run, tmp_path):
    out, stdout = ddp_run
    single = tmp_path / "single"
    assert benchmark.main(ddp_args(single)) == 0

    assert stdout.count("epoch 1/2:") == 2  # one copy of the progress lines (rank 0), one per dataset
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    pairs = list(zip(records(out), records(single), strict=True))
    assert [(a["dataset"], a["model"]) for a, _ in pairs] == [("synthetic", "gam"), ("mqar", "gam")]
    for a, b in pairs:
        assert (a["world_size"], a["backend"], b["world_size"], b["backend"]) == (2, "gloo", 1, None)
        assert a["config"]["batch_size"] == b["config"]["batch_size"] == 8  # the global batch
        for ea, eb in zip(a["epochs"], b["epochs"], strict=True):
            for key in ("train_loss", "val_loss"):
                assert math.isclose(ea[key], eb[key], rel_tol=RTOL), (a["dataset"], key, ea[key], eb[key])
            pa, pb = torch.tensor(ea["val_loss_by_position"]), torch.tensor(eb["val_loss_by_position"])
            torch.testing.assert_close(pa, pb, rtol=RTOL, atol=0, equal_nan=True)
            counts = [k for k in eb if k.startswith(("recall_count", "recall_correct"))]
            assert (a["dataset"] == "mqar") == bool(counts)
            assert {k: ea[k] for k in counts} == {k: eb[k] for k in counts}  # all 40 examples, none twice
    # The checkpoint and the export hold the bare model's weights: they load in a one-process run.
    saved = torch.load(out / "checkpoints" / "synthetic-gam.pt", weights_only=True)["model"]
    cfg = config.TrainConfig.from_json(records(single)[0]["config"])
    model, _ = benchmark.build_model(cfg, "gam", records(single)[0]["data"]["vocab_size"], torch.device("cpu"), "auto")
    model.load_state_dict(saved)
    exported = from_pretrained(out / records(out)[0]["export"], expect=GAM_Model)
    assert all(torch.equal(v, saved[k]) for k, v in exported.state_dict().items())
    assert set(records(out)[0]["samples"]) == set(records(single)[0]["samples"])  # sampled once, by rank 0


STALLING_RANK = """
import os, sys, time
sys.path[:0] = [{repo!r}, {tests!r}]
import benchmark
from test_benchmark_faults import stall_in_second_epoch

if os.environ["RANK"] == "1":  # hangs in epoch 2 of its first model; rank 0 waits for it in a collective
    stall_in_second_epoch(benchmark, lambda: time.sleep(300))
sys.exit(benchmark.main(sys.argv[1:]))
"""


def test_a_hung_process_ends_the_job_then_resume_reaches_the_uninterrupted_numbers(ddp_run, tmp_path):
    script = tmp_path / "stalling_rank.py"
    script.write_text(STALLING_RANK.format(repo=str(REPO), tests=str(REPO / "tests")))
    out = tmp_path / "run"
    shutil.copytree(ddp_run[0].parent / "cache", tmp_path / "cache")  # the tokenizer, not retrained
    code, _, stderr = torchrun(str(script), *ddp_args(out, "--dist-timeout", "10"))
    assert code != 0
    assert ("benchmark.py (rank 0): failed during synthetic/gam epoch 2/2: another process of the job stopped, "
            "hangs or cannot be reached") in stderr
    assert ("every finished epoch is saved. Resume with: torchrun --standalone --nproc_per_node 2 benchmark.py "
            f"--resume {out}") in stderr
    assert "[rank0]: Traceback" not in stderr  # one line from rank 0 (torchrun adds its own report)
    assert len(torch.load(out / "checkpoints" / "synthetic-gam.pt", weights_only=True)["epochs"]) == 1

    code, stdout, stderr = torchrun("benchmark.py", *resume_args(out))
    assert code == 0, stderr[-3000:]
    assert "resumed synthetic/gam after epoch 1" in stdout
    resumed, straight = ([without_timing(r["epochs"]) for r in records(d)] for d in (out, ddp_run[0]))
    assert resumed == straight  # bit-for-bit on CPU


STOPPABLE_RANKS = """
import os, pathlib, signal, sys
sys.path[:0] = [{repo!r}, {tests!r}]
import benchmark
from test_benchmark_faults import stall_in_second_epoch


def stall():
    pathlib.Path({marker!r} + os.environ["RANK"]).touch()  # the test signals once both exist
    while True:
        signal.pause()


stall_in_second_epoch(benchmark, stall)  # both ranks, at the same step: neither waits in a collective
sys.exit(benchmark.main(sys.argv[1:]))
"""


def test_sigterm_to_torchrun_stops_every_rank_and_rank_0_prints_the_resume_command(ddp_run, tmp_path):
    # How Slurm and Kubernetes stop a job: SIGTERM to the launcher, which passes it to the ranks.
    script, marker, out = tmp_path / "stoppable_ranks.py", tmp_path / "stalled-rank", tmp_path / "run"
    script.write_text(STOPPABLE_RANKS.format(repo=str(REPO), tests=str(REPO / "tests"), marker=str(marker)))
    shutil.copytree(ddp_run[0].parent / "cache", tmp_path / "cache")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", *readme_command()[:3], str(script), *ddp_args(out)]
    job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        deadline = time.monotonic() + HANG_GUARD_S  # a bound on a hang, not a speed assumption
        while not all(Path(f"{marker}{r}").exists() for r in "01") and job.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(Path(f"{marker}{r}").exists() for r in "01"), job.poll()
        job.send_signal(signal.SIGTERM)
        _, stderr = job.communicate(timeout=HANG_GUARD_S)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.communicate()
    lines = [line for line in stderr.splitlines() if line.startswith("benchmark.py")]
    assert lines == ["benchmark.py (rank 0): stopped by SIGTERM during synthetic/gam epoch 2/2; every finished epoch "
                     "is saved. Resume with: torchrun --standalone --nproc_per_node 2 benchmark.py --resume "
                     f"{out} --cache-dir {tmp_path / 'cache'} --wandb disabled"], stderr[-3000:]
    assert "[rank0]: Traceback" not in stderr and "[rank1]: Traceback" not in stderr  # torchrun adds its own report
    assert len(torch.load(out / "checkpoints" / "synthetic-gam.pt", weights_only=True)["epochs"]) == 1
    assert not (out / ".lock").exists()


def test_resume_with_another_number_of_processes_is_refused(ddp_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(ddp_run[0], out)
    before = snapshot(out)
    code, err = run_main(resume_args(out), capsys)
    assert code == 2 and len(err) == 1
    assert "trained by 2 process(es), this is 1; resume it with torchrun" in err[0]
    assert snapshot(out) == before


def test_the_global_batch_must_divide_over_the_processes(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # checked before the process group is joined
    out = tmp_path / "run"
    code, err = run_main(tiny_args(out), capsys)  # --batch-size 8
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith("benchmark.py (rank 0): error: --batch-size 8 is the global batch")
    assert "divisible by 3 (e.g. --batch-size 6)" in err[0]
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# The loaders' split of the batches, without a process group


@pytest.mark.parametrize("world", [2, 3])
def test_the_ranks_train_steps_cover_the_one_process_batches(world):
    n, batch = 23, 6  # 23 does not divide by 2 or 3: the sampler pads the last step
    single, _ = data.make_loaders(torch.arange(n), torch.arange(n), batch_size=batch, seed=4)
    ranks = [data.make_loaders(torch.arange(n), torch.arange(n), batch_size=batch, seed=4, rank=r,
                               world_size=world)[0] for r in range(world)]
    for loader in [single, *ranks]:
        loader.sampler.set_epoch(1)
    assert all(len(loader) == len(single) for loader in ranks)
    steps = [sorted(torch.cat(parts).tolist()) for parts in zip(*ranks)]
    expected = [sorted(b.tolist()) for b in single]
    assert steps[:-1] == expected[:-1]
    padding = list(steps[-1])
    for i in expected[-1]:
        padding.remove(i)
    assert set(padding) <= set(expected[0])  # the pad repeats the epoch's first indices


@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_ranks_split_validation_exactly_and_gather_it_back_in_order(world, monkeypatch):
    n, batch = 23, 6
    single = [b.tolist() for b in data.make_loaders(torch.arange(n), torch.arange(n), batch_size=batch, seed=0)[1]]
    per_rank = [[b.tolist() for b in data.make_loaders(torch.arange(n), torch.arange(n), batch_size=batch, seed=0,
                                                       rank=r, world_size=world)[1]] for r in range(world)]
    assert sorted(i for batches in per_rank for b in batches for i in b) == list(range(n))  # no index twice
    monkeypatch.setattr(distributed, "gather_objects", lambda batches: per_rank)
    assert distributed.gather_batches(per_rank[0]) == single


def test_make_loaders_refuses_a_batch_that_does_not_divide():
    with pytest.raises(ValueError, match="divisible by world_size 3"):
        data.make_loaders(torch.arange(10), torch.arange(10), batch_size=8, seed=0, rank=0, world_size=3)
