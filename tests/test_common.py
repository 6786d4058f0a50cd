"""The shared helpers of the scripts: atomic writes under a signal."""

import os
import signal

import pytest

from common import atomic_write_bytes


def test_a_ctrl_c_as_the_temporary_file_is_created_leaves_no_file(tmp_path, monkeypatch):
    # The signal lands just after the file is created, before the call that created it returns:
    # the clean-up must know the file's name without that call's answer.
    real_open = os.open

    def open_then_ctrl_c(file, *args, **kwargs):
        fd = real_open(file, *args, **kwargs)
        if str(file).startswith(str(tmp_path)):
            signal.raise_signal(signal.SIGINT)  # to this thread: its handler (KeyboardInterrupt) runs here
        return fd

    monkeypatch.setattr(os, "open", open_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(tmp_path / "results.json", b"{}")
    assert list(tmp_path.iterdir()) == []


def test_an_atomic_write_replaces_the_file_whole_and_shares_it(tmp_path):
    target = tmp_path / "results.json"
    target.write_bytes(b"old")
    mask = os.umask(0o022)
    try:
        atomic_write_bytes(target, b"new")
    finally:
        os.umask(mask)
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
    assert target.stat().st_mode & 0o777 == 0o644  # 0o666 less the umask, as any new file
