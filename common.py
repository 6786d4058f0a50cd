"""What the scripts share: atomic writes, run metadata, one-line command-line errors, and the
device helpers (precision, sync, out-of-memory, freeing memory)."""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

REPO_DIR = Path(__file__).resolve().parent
MIB = 2**20
# Names of the precisions on the command lines; fp32 runs without autocast.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------
# Files: a reader (or a killed run) never sees a half-written one.


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder, then rename."""
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


# ---------------------------------------------------------------------------------------
# What produced a result: commit, hardware, versions.


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


# ---------------------------------------------------------------------------------------
# Command lines: a bad one is one readable line and exit code 2.


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (exit code 2), not a usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def int_at_least(lo: int):
    """An argparse type: an integer >= lo."""
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            v = lo - 1
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {s!r}")
        return v
    return parse


def one_line(e: BaseException) -> str:
    """An exception's message on one line, of readable length."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# ---------------------------------------------------------------------------------------
# Devices.


def autocast_context(dtype: str, device: str | torch.device):
    """The forward passes' precision: torch.autocast in bf16 / fp16, or plain fp32."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[dtype])


def sync(device: str | torch.device) -> None:
    """Wait for the device's queued work (timings and peak memory must include it)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def is_oom(e: BaseException) -> bool:
    """An out-of-memory error of the host or of a GPU."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def free_memory(device: str | torch.device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
