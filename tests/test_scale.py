"""Tests of scale.py (the paper's Table 2 sweep). CPU only, tiny sizes."""

import argparse
import csv
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]

import scale  # noqa: E402
from baselines import build_block  # noqa: E402
from gam_model import ModelConfig  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NUMBERS = ("time_ms_median", "time_ms_min", "time_ms_max", "time_ms_mean", "peak_mem_mb")
TINY = ["--device", "cpu", "--batch-size", "1", "--d-model", "32", "--n-head", "4", "--warmup", "1", "--iters", "2"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def argparse_ns(**kw):
    """Parsed-arguments stand-in for the pure table/plot helpers (no parsing, no device check)."""
    base = dict(models=["gam", "transformer"], seq_lens=[256, 4096], batch_size=1, d_model=32, n_head=4,
                warmup=1, iters=2, device="cpu", dtype="fp32", max_seconds=60.0, seed=0, out_dir="unused",
                mode="train")
    base.update(kw)
    return argparse.Namespace(**base)


def fake_ok(L):
    """A plausible measured point: time ~ T, memory ~ T."""
    return {"status": "ok", "implementation": "fake", "time_ms_median": L / 10, "time_ms_min": L / 11,
            "time_ms_max": L / 9, "time_ms_mean": L / 10, "peak_mem_mb": L / 4}


# -----------------------------------------------------------------------------
# the real thing, through the CLI

def test_cli_tiny_cpu_sweep(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "scale.py", "--models", "gam", "transformer", "--seq-lens", "16", "32",
           *TINY, "--out-dir", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]

    for png in ("compute_time.png", "peak_memory.png"):
        data = (out / png).read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 5000, png

    rows = read_csv(out / "results.csv")
    assert list(rows[0].keys()) == scale.CSV_FIELDS
    points = [(r["model"], int(r["seq_len"])) for r in rows]
    assert points == [("gam", 16), ("gam", 32), ("transformer", 16), ("transformer", 32)]
    for r in rows:
        assert r["status"] == "ok" and r["batch"] == "1" and r["implementation"], r
        t_min, t_med, t_max = float(r["time_ms_min"]), float(r["time_ms_median"]), float(r["time_ms_max"])
        assert 0 < t_min <= t_med <= t_max and t_min <= float(r["time_ms_mean"]) <= t_max, r
        # A tiny block's gradients and activations take well under 1 MiB (seen: 0.1-0.6); a
        # measurement that counted the process (> 100 MiB resident) or the parameters would not.
        assert 0 <= float(r["peak_mem_mb"]) < 16, r

    doc = json.loads((out / "results.json").read_text())
    meta = doc["metadata"]
    for key in ("device_name", "cpu_threads", "dtype", "torch_version", "git_commit", "args",
                "memory_measure", "exponents", "complete"):
        assert key in meta, key
    assert meta["dtype"] == "fp32" and meta["complete"] is True and meta["paper_config"] is False
    assert meta["args"]["seq_lens"] == [16, 32] and meta["args"]["models"] == ["gam", "transformer"]
    assert "resident set size" in meta["memory_measure"]
    assert set(meta["exponents"]) == {"gam", "transformer"}
    for e in meta["exponents"].values():
        assert isinstance(e["time"], float) and set(e) == {"time", "memory"}
    assert doc["rows"][0]["seq_len"] == 16 and len(doc["rows"]) == 4

    table = (out / "table2.md").read_text()
    assert table.startswith("| Sequence length | GAM Time (ms) | Transformer Time (ms) | GAM Memory (MB)")
    assert "paper" not in table.splitlines()[0]  # not the paper's configuration
    assert "| 16 " in table and "| 32 " in table and "Failed" not in table
    assert table.splitlines()[0] in proc.stdout  # the console shows the same table


def test_cpu_memory_counts_gradients_not_parameters():
    # A parameter-heavy block on a 4-token input: what the worker reports should be about one
    # copy of the parameters (their gradients), not two (the parameters are in the baseline).
    args = scale.parse_args(["--models", "gam", "--seq-lens", "4", *TINY, "--d-model", "1024"])
    res = scale.run_in_worker("gam", 4, args)
    assert res["status"] == "ok" and res["mem_method"] == "VmHWM reset", res
    block, _ = build_block("gam", 1024, n_head=4)
    param_mib = sum(p.numel() * p.element_size() for p in block.parameters()) / 2**20  # ~42 MiB
    # Upper bound below two copies: RSS also carries some allocator slack (seen: up to ~1.45x on a
    # busy machine), but counting the parameters themselves would give >= 2x.
    assert 0.9 * param_mib <= res["peak_mem_mb"] < 1.75 * param_mib, (res["peak_mem_mb"], param_mib)


def test_cpu_memory_peak_is_that_of_the_timed_iterations(monkeypatch):
    # As the author resets the CUDA peak after the warm-up, a spike in the warm-up must not count.
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's VmHWM reset")

    class SpikyInWarmup(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.calls = nn.Linear(32, 32), 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 2:  # call 1 is the priming pass, call 2 the warm-up iteration
                torch.ones(64 * 2**20)  # 256 MiB, written (so resident), freed at once
            return self.lin(x)

    monkeypatch.setattr(scale, "build_block", lambda *a, **k: (SpikyInWarmup(), "spiky"))
    res = scale.bench_point("gam", 16, scale.parse_args(["--seq-lens", "16", *TINY]))
    assert res["status"] == "ok" and res["peak_mem_mb"] < 64, res


# -----------------------------------------------------------------------------
# OOM

def _sweep_with(monkeypatch, tmp_path, runner, models=("gam", "transformer"), lens=("16", "32", "64")):
    calls = []

    def run_point(name, L, args):
        calls.append((name, L))
        return runner(name, L, args)

    monkeypatch.setattr(scale, "run_point", run_point)
    out = tmp_path / "run"
    rc = scale.main(["--models", *models, "--seq-lens", *lens, *TINY, "--out-dir", str(out)])
    assert rc == 0
    return calls, out, read_csv(out / "results.csv"), json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("exc", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    MemoryError(),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory"),
])
def test_oom_points_are_recorded_and_the_sweep_goes_on(monkeypatch, tmp_path, exc):
    def runner(name, L, args):
        if name == "gam" and L >= 32:
            raise exc
        return fake_ok(L)

    calls, out, rows, doc = _sweep_with(monkeypatch, tmp_path, runner)
    assert len(calls) == 6  # every point was tried: an OOM does not stop the sweep
    status = {(r["model"], int(r["seq_len"])): r for r in rows}
    assert [status["gam", L]["status"] for L in (16, 32, 64)] == ["ok", "OOM", "OOM"]
    assert all(status["transformer", L]["status"] == "ok" for L in (16, 32, 64))
    for L in (32, 64):  # no invented numbers
        assert all(status["gam", L][k] == "" for k in NUMBERS)
    table = (out / "table2.md").read_text()
    gam_row32 = next(line for line in table.splitlines() if line.startswith("| 32 "))
    assert gam_row32.count("Failed (OOM)") == 2  # time and memory columns
    series = scale.plot_series(doc["rows"], argparse_ns(), "time_ms_median")
    assert series["gam"] == [(16, 1.6)] and [L for L, _ in series["transformer"]] == [16, 32, 64]
    assert doc["metadata"]["exponents"]["gam"]["time"] is None  # one ok point: no fit
    assert (out / "peak_memory.png").read_bytes()[:8] == PNG_SIGNATURE


def test_worker_reports_a_real_cpu_allocation_failure_as_oom(monkeypatch):
    # A real worker process under an 8 GiB address-space limit asked for a 17 GiB attention matrix.
    if not sys.platform.startswith("linux"):
        pytest.skip("RLIMIT_AS is enforced on Linux only")
    args = scale.parse_args(["--models", "transformer", "--seq-lens", "4096", *TINY, "--batch-size", "64",
                             "--warmup", "0", "--iters", "1"])
    real_cmd = scale.worker_command("transformer", 4096, args)
    limit = 8 * 2**30
    wrapped = [sys.executable, "-c",
               "import resource, runpy, sys; "
               f"resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit})); "
               f"sys.path.insert(0, {str(ROOT)!r}); sys.argv = {real_cmd[1:]!r}; "
               "runpy.run_path(sys.argv[0], run_name='__main__')"]
    monkeypatch.setattr(scale, "worker_command", lambda *a: wrapped)
    res = scale.run_in_worker("transformer", 4096, args)
    assert res["status"] == "OOM", res
    assert "allocate" in res["note"]


@pytest.mark.parametrize("code, status, note", [
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "OOM", "SIGKILL"),  # the OOM killer
    ("import sys; sys.stderr.write('boom\\n'); sys.exit(3)", "error", "code 3: boom"),
])
def test_worker_that_dies_without_a_result(monkeypatch, code, status, note):
    monkeypatch.setattr(scale, "worker_command", lambda *a: [sys.executable, "-c", code])
    args = scale.parse_args(["--seq-lens", "16", *TINY])
    res = scale.run_in_worker("gam", 16, args)
    assert res["status"] == status and note in res["note"]


def test_oom_inside_a_block_is_classified(monkeypatch):
    class Greedy(nn.Module):
        def forward(self, x):
            raise MemoryError

    monkeypatch.setattr(scale, "build_block", lambda *a, **k: (Greedy(), "greedy"))
    args = scale.parse_args(["--seq-lens", "16", *TINY])
    with pytest.raises(MemoryError) as info:
        scale.bench_point("gam", 16, args)
    assert scale.failure(info.value)["status"] == "OOM"
    assert scale.failure(ValueError("shape mismatch"))["status"] == "error"


# -----------------------------------------------------------------------------
# time limit

def test_time_limit_skips_the_point_without_numbers():
    args = scale.parse_args(["--seq-lens", "16", *TINY, "--max-seconds", "1e-9"])
    res = scale.bench_point("gam", 16, args)
    assert res["status"] == "skipped" and "--max-seconds" in res["note"]
    assert not any(k.startswith(("time_", "peak_")) for k in res)
    row = scale.make_row("gam", 16, args, res)
    assert row["status"] == "skipped" and row["time_ms_median"] is None and row["peak_mem_mb"] is None


def test_time_limit_skip_propagates_to_longer_lengths(monkeypatch, tmp_path):
    def runner(name, L, args):
        if name == "transformer" and L >= 32:
            return {"status": "skipped", "implementation": "fake", "note": "estimated 99 s > --max-seconds 60"}
        return fake_ok(L)

    calls, out, rows, doc = _sweep_with(monkeypatch, tmp_path, runner)
    assert ("transformer", 64) not in calls and ("gam", 64) in calls  # longer ones are not even tried
    st = {(r["model"], int(r["seq_len"])): r for r in rows}
    assert [st["transformer", L]["status"] for L in (16, 32, 64)] == ["ok", "skipped", "skipped"]
    assert st["transformer", 64]["implementation"] == "fake"
    for L in (32, 64):
        assert all(st["transformer", L][k] == "" for k in NUMBERS)
    row64 = next(line for line in (out / "table2.md").read_text().splitlines() if line.startswith("| 64 "))
    assert row64.count("skipped (time limit)") == 2
    series = scale.plot_series(doc["rows"], argparse_ns(), "peak_mem_mb")
    assert [L for L, _ in series["transformer"]] == [16]


# -----------------------------------------------------------------------------
# exponent fit, paper table

def test_fit_exponent():
    xs = [256, 512, 1024, 2048, 4096]
    assert scale.fit_exponent(xs, [3 * x for x in xs]) == pytest.approx(1.0, abs=1e-6)
    rng = random.Random(0)
    noisy = [2 * x**2 * (1 + rng.uniform(-0.02, 0.02)) for x in xs]
    assert scale.fit_exponent(xs, noisy) == pytest.approx(2.0, abs=0.05)
    assert scale.fit_exponent([256], [1.0]) is None
    assert scale.fit_exponent([], []) is None
    assert scale.fit_exponent([256, 256], [1.0, 2.0]) is None  # no spread in x
    assert scale.fit_exponent([256, 512, 1024], [None, 4.0, 8.0]) == pytest.approx(1.0)  # OOM point ignored
    with pytest.raises(ValueError):
        scale.fit_exponent([1, 2], [1.0])


def test_paper_columns_only_in_the_paper_configuration():
    rows = [scale.make_row(m, L, argparse_ns(), fake_ok(L)) for m in ("gam", "transformer") for L in (256, 4096)]
    paper = argparse_ns(device="cuda", dtype="fp16", batch_size=16, d_model=512, n_head=8)
    table = scale.markdown_table(rows, paper)
    header = table.splitlines()[0]
    assert "GAM Time (ms), paper" in header and "Transformer Memory (MB), paper" in header
    row4096 = next(line for line in table.splitlines() if line.startswith("| 4096 "))
    assert "105.03" in row4096 and "2370.35" in row4096 and row4096.count("| OOM") == 2
    assert "paper" not in scale.markdown_table(rows, argparse_ns()).splitlines()[0]
    assert scale.paper_exponents(paper)["gam"]["time"] == pytest.approx(
        scale.fit_exponent([256, 4096], [8.97, 105.03]))


# -----------------------------------------------------------------------------
# bad arguments: exit code 2 and one readable line

BAD_ARGS = [
    ["--models", "gam", "lstm"],
    ["--seq-lens", "0"],
    ["--seq-lens", "12x"],
    ["--batch-size", "-1"],
    ["--iters", "0"],
    ["--warmup", "-1"],
    ["--threads", "0"],
    ["--mode", "decode", "--compile"],
    ["--mode", "block"],
    ["--d-model", "30", "--n-head", "4"],
    ["--max-seconds", "0"],
    ["--max-seconds", "nan"],
]


def tiny_then(argv, out):
    # Valid tiny arguments first, the bad ones last (argparse: the last one wins), so that a
    # regression that accepts a bad argument fails fast here instead of starting a long sweep.
    return [*TINY, "--models", "gam", "--seq-lens", "16", "--out-dir", str(out), *argv]


@pytest.mark.parametrize("argv", BAD_ARGS, ids=" ".join)
def test_bad_args_exit_2_with_one_line(argv, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        scale.main(tiny_then(argv, tmp_path / "out"))
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("scale.py: error:"), err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_cuda_without_a_gpu_is_a_bad_arg(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as info:
        scale.main(tiny_then(["--device", "cuda"], tmp_path / "out"))
    assert info.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["results.csv", "table2.md", "results.json", "notes"])
def test_a_folder_that_is_not_empty_is_refused_before_the_sweep(name, tmp_path, capsys, monkeypatch):
    # An earlier sweep's results or a user's table would be replaced.
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_text("mine\n")
    monkeypatch.setattr(scale, "run_point", lambda *a: pytest.fail("must not measure"))
    assert scale.main(tiny_then([], out)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"scale.py: error: --out-dir {out} is not empty (it holds {name}")
    assert "choose another --out-dir" in err
    assert [p.name for p in out.iterdir()] == [name] and (out / name).read_text() == "mine\n"


STALLED_SWEEP = """
import pathlib, signal, sys
sys.path.insert(0, {repo!r})
import scale


def stall(*args):
    pathlib.Path({marker!r}).touch()  # the test acts once this exists
    while True:
        signal.pause()


scale.run_point = stall
sys.exit(scale.main(sys.argv[1:]))
"""


def test_a_second_sweep_is_refused_while_one_runs_and_sigterm_stops_it_like_ctrl_c(tmp_path, capsys):
    # A real process holds --out-dir (as a scheduler's job would) until SIGTERM stops it.
    out, marker = tmp_path / "out", tmp_path / "stalled"
    code = STALLED_SWEEP.format(repo=str(ROOT), marker=str(marker))
    child = subprocess.Popen([sys.executable, "-c", code, *tiny_then([], out)], cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120  # a bound on a hang, not a speed assumption
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), child.communicate(timeout=60)
        assert scale.main(tiny_then([], out)) == 2
        err = capsys.readouterr().err
        assert err == (f"scale.py: error: --out-dir {out} is in use by another scale.py (PID {child.pid} on "
                       f"{socket.gethostname()}): wait until it ends, or choose another --out-dir\n")
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == 143
    assert err.strip().splitlines()[-1] == f"scale.py: stopped by SIGTERM; partial results in {out}"
    assert "Traceback" not in err and not (out / ".lock").exists()


def test_unwritable_out_dir_is_one_line_exit_2(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    rc = scale.main(["--seq-lens", "16", *TINY, "--out-dir", str(blocker / "sub")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


# -----------------------------------------------------------------------------
# --dtype on CPU, --mode decode

def test_bf16_on_cpu_runs_under_autocast(monkeypatch):
    seen = []
    real = scale.autocast_context
    monkeypatch.setattr(scale, "autocast_context", lambda dtype, device: seen.append(dtype) or real(dtype, device))
    res = scale.bench_point("gam", 16, scale.parse_args(["--seq-lens", "16", *TINY, "--dtype", "bf16"]))
    assert res["status"] == "ok" and seen and set(seen) == {"bf16"}
    assert res["first_iter_ms"] > 0


def test_fp16_on_cpu_without_autocast_support_is_a_bad_arg(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(scale, "cpu_autocast_supports", lambda dtype: False)
    with pytest.raises(SystemExit) as info:
        scale.main(tiny_then(["--dtype", "fp16"], tmp_path / "out"))
    assert info.value.code == 2 and "no CPU autocast" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


DECODE = ["--mode", "decode", "--device", "cpu", "--d-model", "32", "--n-head", "4", "--warmup", "1", "--iters", "2"]


def test_cli_tiny_decode_sweep(tmp_path):
    out = tmp_path / "dec"
    cmd = [sys.executable, "scale.py", *DECODE, "--models", "gam", "transformer", "mamba",
           "--seq-lens", "16", "32", "--reencode-max-len", "16", "--out-dir", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for png in ("decode_time.png", "state_memory.png"):
        assert (out / png).read_bytes()[:8] == PNG_SIGNATURE, png
    rows = read_csv(out / "results.csv")
    assert list(rows[0]) == scale.MODES["decode"]["csv"]
    assert [(r["model"], int(r["seq_len"])) for r in rows] == [
        (m, L) for m in ("gam", "transformer", "mamba") for L in (16, 32)]
    for r in rows:
        assert r["status"] == "ok" and r["batch"] == "1" and float(r["time_ms_median"]) > 0, r
        assert (r["reencode_ms_median"] != "") == (r["seq_len"] == "16"), r  # only up to --reencode-max-len
    meta = json.loads((out / "results.json").read_text())["metadata"]
    assert meta["mode"] == "decode" and meta["complete"] and "decoding state" in meta["memory_measure"]
    assert meta["exponents"]["gam"]["memory"] == pytest.approx(0.0, abs=1e-9)        # constant state
    assert meta["exponents"]["transformer"]["memory"] == pytest.approx(1.0, abs=1e-9)  # KV cache ~ T
    assert "ms / token, cached" in (out / "decode.md").read_text()


@pytest.mark.parametrize("T", [16, 100])
def test_decoding_state_bytes_match_the_configs(T):
    # Independent counts from the configs (fp32, per sequence): GAM keeps k-1 normalised inputs
    # per layer; the Transformer keys and values of T positions per layer; Mamba a conv state of
    # d_conv inputs and an SSM state of d_state per inner channel per layer.
    args = scale.parse_args([*DECODE, "--seq-lens", str(T), "--batch-size", "2", "--reencode-max-len", "0"])
    cfg = ModelConfig(N_EMBED=32)
    L, k, C = cfg.N_LAYER, cfg.CONV_KERNEL_SIZE, 32
    d_inner, d_state, d_conv = 3 * C, 16, 4  # build_lm's Mamba defaults: expand 3, d_state 16, d_conv 4
    expected = {"gam": L * (k - 1) * C * 4, "transformer": 2 * L * T * C * 4,
                "mamba": L * (d_inner * d_conv + d_inner * d_state) * 4}
    for name, nbytes in expected.items():
        res = scale.bench_decode_point(name, T, args)
        assert res["state_bytes_per_seq"] == nbytes, name
        assert "reencode_ms_median" not in res


def test_streamed_token_equals_the_reencoded_one():
    # The decode point times stream from the encoded context; its logits are those of re-encoding.
    args = scale.parse_args([*DECODE, "--seq-lens", "12"])
    for name in ("gam", "transformer", "mamba"):
        model = scale.build_decoder(name, 12, args, torch.device("cpu"))
        ids = torch.randint(0, 100, (2, 13))
        with torch.no_grad():
            _, states = model.stream(ids[:, :12], 0, [None] * len(model.blocks))
            streamed, _ = model.stream(ids[:, 12:], 12, states)
            full = model.logits(ids)[:, -1]
        assert torch.allclose(streamed, full, atol=1e-4), name
