"""perf.py: its author-style block is the same function as ours, and the script runs tiny."""

import json

import pytest
import torch

import perf
from gam_model import GAMBlock, ModelConfig


def test_author_style_block_computes_the_block():
    torch.manual_seed(0)
    block = GAMBlock(ModelConfig(N_EMBED=16, NUM_MEMORY_SLOTS=8)).eval()
    for p in block.parameters():  # away from init (zero biases) so a wrong pathway shows
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 11, 16)
    for impl in ("fast", "reference"):
        block.impl = impl
        assert torch.allclose(perf.author_style_forward(block, x), block(x), atol=1e-5), impl


def test_saved_bytes_counts_each_storage_once_without_parameters():
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8, requires_grad=True)
    # x @ w saves x and w; (x @ w) * (x @ w) saves its product y twice, one storage.
    assert perf.saved_bytes(lambda x: x @ w, x, [w]) == 4 * 8 * 4
    assert perf.saved_bytes(lambda x: (lambda y: y * y)(x @ w), x, [w]) == 2 * 4 * 8 * 4


def test_tiny_run_writes_json_and_markdown(tmp_path):
    assert perf.main(["--out-dir", str(tmp_path), "--batch", "2", "--seq-len", "16", "--d-model", "32",
                      "--reps", "1", "--batch-sizes", "2", "--new-tokens", "3", "--threads", "1",
                      "--mamba-batch", "2", "--mamba-seq-len", "40", "--mamba-d-model", "32", "--mamba-layers", "1",
                      "--mamba-reps", "1"]) == 0
    doc = json.loads((tmp_path / "perf.json").read_text())
    assert doc["block"]["max_abs_diff_fast_vs_author"] < 1e-4
    assert doc["block"]["ratio_vs_author"]["fast"]["saved"] < 1
    assert doc["generate"]["gam B=2"]["identical_tokens"] is True
    layer, step = doc["mamba_layer"], doc["mamba_step"]
    assert layer["max_abs_diff_chunked_vs_pscan"] < 1e-5
    assert layer["ratio_vs_pscan"]["chunked"]["saved"] < 0.5  # no (B, L, D, N) tensor saved
    assert set(step["time_s"]) == {"gam", "mamba-chunked", "mamba-pscan"}
    assert step["ratio_vs_mamba_pscan"]["mamba-chunked"]["saved"] < 1
    md = (tmp_path / "perf.md").read_text()
    assert "Streaming tok/s" in md and "TorchMamba layer" in md and "| mamba-pscan |" in md


def test_mamba_check_runs_one_scan_alone(tmp_path):
    assert perf.main(["--out-dir", str(tmp_path), "--checks", "mamba-layer", "mamba-step", "--mamba-scans", "chunked",
                      "--mamba-batch", "1", "--mamba-seq-len", "8", "--mamba-d-model", "16", "--mamba-layers", "1",
                      "--mamba-reps", "1", "--threads", "1"]) == 0
    doc = json.loads((tmp_path / "perf.json").read_text())
    assert doc["mamba_layer"]["max_abs_diff_chunked_vs_pscan"] is None and "ratio_vs_pscan" not in doc["mamba_layer"]
    assert set(doc["mamba_step"]["time_s"]) == {"gam", "mamba-chunked"}


def test_profile_writes_the_top_ops_of_both_blocks(tmp_path):
    assert perf.main(["--out-dir", str(tmp_path), "--checks", "block", "--batch", "1", "--seq-len", "8",
                      "--d-model", "16", "--reps", "1", "--threads", "1", "--profile", "--profile-rows", "3"]) == 0
    prof = json.loads((tmp_path / "perf.json").read_text())["block"]["profile"]
    assert set(prof) == {"author", "fast"}
    for p in prof.values():
        assert len(p["top"]) == 3 and p["self_cpu_total_ms"] >= sum(r["self_cpu_ms"] for r in p["top"]) > 0
        assert [r["self_cpu_ms"] for r in p["top"]] == sorted((r["self_cpu_ms"] for r in p["top"]), reverse=True)
    md = (tmp_path / "profile.md").read_text()
    assert "| Op | author calls | author self CPU (ms) | fast calls | fast self CPU (ms) |" in md
    assert md.count("\n| ") >= 1 + 3 + 1  # header, at least each block's 3 rows merged, the total


def test_no_profile_without_the_option(tmp_path):
    assert perf.main(["--out-dir", str(tmp_path), "--checks", "block", "--batch", "1", "--seq-len", "8",
                      "--d-model", "16", "--reps", "1", "--threads", "1"]) == 0
    assert "profile" not in json.loads((tmp_path / "perf.json").read_text())["block"]
    assert not (tmp_path / "profile.md").exists()


def test_profile_without_the_block_check_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        perf.main(["--out-dir", str(tmp_path / "out"), "--checks", "generate", "--profile"])
    assert e.value.code == 2 and "add block to --checks" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
