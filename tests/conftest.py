"""Shared test set-up: the repository root on sys.path, the shared data folder, no network."""

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# No test may reach the Hugging Face Hub: a mistake fails fast instead of downloading.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def shared_data_dir() -> Path | None:
    """The real data folder (../shared/data next to the repository, or $GAM_SHARED_DATA) when present; tests that need it skip otherwise."""
    for candidate in (os.environ.get("GAM_SHARED_DATA"), REPO.parent / "shared" / "data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread per test: deterministic and fast on a shared 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """A tiny finished benchmark.py run of the three families, in <tmp>/runs/smoke (the README's
    path), trained once for every test file that reads its exports (treat it as read-only)."""
    import benchmark
    from test_benchmark import tiny_args

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("smoke") / "runs" / "smoke"
    assert benchmark.main(tiny_args(out, models=("transformer", "mamba", "gam"), epochs=1)) == 0
    return out
