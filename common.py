"""What the scripts share: atomic writes, run metadata, one-line command-line errors, and the
device helpers (precision, sync, out-of-memory, freeing memory)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import gc
import io
import json
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import torch

REPO_DIR = Path(__file__).resolve().parent
MIB = 2**20
# Names of the precisions on the command lines; fp32 runs without autocast.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------
# Files: a reader (or a killed run) never sees a half-written one.


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder, then rename. The
    temporary file's name is chosen before the file exists (unlike mkstemp's), so that a
    Ctrl-C at any point leaves nothing behind: the clean-up always knows what to remove."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(6)}.tmp"
    try:
        # O_EXCL: never another's file; 0o666 less the umask: results are meant to be shared.
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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


class UsageError(Exception):
    """Bad input (command line, run folder, data), found before anything is written: exit 2."""


# ---------------------------------------------------------------------------------------
# One command per folder: a lock that the kernel drops when its holder dies.


LOCK_NAME = ".lock"


class FolderLock:
    """An exclusive flock on <folder>/.lock, which holds the holder's PID and host. The kernel
    drops a flock when its process dies in any way, so a killed command never blocks the next;
    release() removes the file and the folders that acquiring created, if they stayed empty."""

    def __init__(self, folder: Path, what: str, program: str):
        self.path, self.created, self.program = folder / LOCK_NAME, [], program
        missing = folder
        while not missing.exists():
            self.created.append(missing)
            missing = missing.parent
        folder.mkdir(parents=True, exist_ok=True)
        self.fd = self._lock(what)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()} {socket.gethostname()}\n".encode())

    def _lock(self, what: str) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP):  # e.g. NFS without a lock daemon
                    print(f"{self.program}: warning: {self.path.parent} cannot be locked ({e.strerror}); nothing "
                          "stops another command from writing into it at the same time", file=sys.stderr)
                    return fd
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                self.fd = None
                self.release()
                other = ", or choose another --out-dir" if what == "--out-dir" else ""
                raise UsageError(f"{what} {self.path.parent} is in use by another {self.program} ({self.holder()}): "
                                 f"wait until it ends{other}") from None
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)  # its holder removed the file as we opened it: lock the new one

    def holder(self) -> str:
        try:
            pid, host = self.path.read_text().split()
            return f"PID {pid} on {host}"
        except (OSError, ValueError):
            return "its PID is not written yet"

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still held: no one locks the file being removed
            os.close(self.fd)
            self.fd = None
        for folder in self.created:
            try:
                folder.rmdir()
            except OSError:  # not empty: the command wrote there
                break


def claim_empty_folder(folder: Path, what: str, program: str) -> FolderLock:
    """The lock on a new or empty folder, taken before anything is written into it. A folder
    that holds anything (another command's results, a user's files) is refused (UsageError),
    so that nothing of anyone else's is replaced."""
    lock = FolderLock(folder, what, program)
    others = sorted(name for name in os.listdir(folder) if name != LOCK_NAME)
    if others:
        lock.release()
        raise UsageError(f"{what} {folder} is not empty (it holds {', '.join(others[:3])}"
                         f"{' ...' if len(others) > 3 else ''}); {program} writes into a new or empty folder "
                         f"only: choose another {what}")
    return lock


# ---------------------------------------------------------------------------------------
# Stop signals: SIGTERM (Slurm, Kubernetes, torchrun stopping a job) is handled as Ctrl-C.


class Terminated(KeyboardInterrupt):
    """SIGTERM. A KeyboardInterrupt, so that every clean-up on the way out (the temporary file
    of an atomic write, the data loader's workers, wandb) treats it as Ctrl-C."""


def interrupt_exit_code(e: KeyboardInterrupt) -> int:
    return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)  # the shells' convention


class StopSignals:
    """While armed, the first SIGINT or SIGTERM raises KeyboardInterrupt or Terminated in the
    main thread; later ones are ignored, so that a second signal (torchrun answers Ctrl-C with
    SIGTERM) cannot cut short the saving and the one line of the first. kill -9 still stops."""

    def __init__(self):
        self.armed, self.previous = True, {}

    def handle(self, signum, frame) -> None:
        if self.armed:
            self.armed = False
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    def disarm(self) -> None:
        self.armed = False

    @contextlib.contextmanager
    def installed(self):
        """The handlers for the block, then the previous ones back (main() also runs in-process)."""
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield self
            return
        # A signal ignored on purpose (SIGINT of a background job, nohup) stays ignored.
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)
                         if signal.getsignal(s) is not signal.SIG_IGN}
        try:
            yield self
        finally:
            for s, handler in self.previous.items():
                signal.signal(s, handler)
