"""benchmark.py end to end: CLI, results schema, resume equality, divergence, wandb, bad input.

Every run here uses the embedded synthetic corpus and a tiny model, so no network and no files
outside a temporary folder are needed.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

import benchmark  # noqa: E402
from gam_model import GAM_Model, ModelConfig  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_args(out_dir: Path, *extra: str, models=("gam",), epochs: int = 2) -> list[str]:
    return [
        "--preset", "smoke", "--models", *models, "--n-embed", "16", "--n-layer", "1", "--n-head", "2",
        "--num-memory-slots", "8", "--d-state", "4", "--block-size", "32", "--batch-size", "8",
        "--epochs", str(epochs), "--warmup-steps", "2", "--max-train-blocks", "96", "--lr", "0.01",
        "--wandb", "disabled", "--out-dir", str(out_dir), "--cache-dir", str(out_dir.parent / "cache"), *extra,
    ]


@pytest.fixture(autouse=True)
def _one_thread():
    # Deterministic and fast on a shared 2-core machine.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "benchmark.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------


def test_cli_smoke_run_writes_results(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(*tiny_args(out, models=("transformer", "mamba", "gam")))
    assert proc.returncode == 0, proc.stderr[-3000:]

    records = json.loads((out / "results.json").read_text())
    assert isinstance(records, list) and [r["model"] for r in records] == ["transformer", "mamba", "gam"]
    for r in records:
        for key in ("dataset", "model", "params", "implementation", "epochs", "final_val_loss", "final_val_ppl",
                    "best_val_ppl", "device", "torch_version", "git_commit", "config"):
            assert key in r, key
        assert r["dataset"] == "synthetic" and r["status"] == "done"
        assert r["torch_version"] == torch.__version__
        assert len(r["epochs"]) == 2
        for e in r["epochs"]:
            assert set(e) >= {"train_loss", "val_loss", "val_ppl", "epoch_time_s", "tokens_per_s"}
            assert math.isclose(e["val_ppl"], math.exp(e["val_loss"]), rel_tol=1e-12)
            assert e["epoch_time_s"] > 0 and e["tokens_per_s"] > 0
        assert r["final_val_loss"] == r["epochs"][-1]["val_loss"]
        assert r["best_val_ppl"] == min(e["val_ppl"] for e in r["epochs"])
        # Learning happened: the validation loss is well below the uniform-guess loss.
        assert r["final_val_loss"] < math.log(r["data"]["vocab_size"]) - 0.5
    gam = records[-1]
    expected = GAM_Model(ModelConfig(**gam["model_config"])).num_params()
    assert gam["params"] == expected
    assert gam["model_config"]["N_EMBED"] == 16 and gam["config"]["max_train_blocks"] == 96
    assert records[1]["implementation"].startswith("mamba")

    table = (out / "table1.md").read_text()
    for name in ("transformer", "mamba", "gam"):
        assert f"| synthetic | {name} (" in table
    assert "The paper reports no gam run on synthetic." in table
    assert "Reference: a unigram model" in table and records[0]["data"]["unigram_val_ppl"] > 1
    assert "882.57" not in table
    assert (out / "curves.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "checkpoints" / "synthetic-gam.pt").is_file()


def test_resume_reaches_the_same_numbers(tmp_path, monkeypatch):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert benchmark.main(tiny_args(straight, epochs=3)) == 0

    real_train_epoch, calls = benchmark.train_epoch, {"n": 0}

    def dies_in_second_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if the job were killed mid-epoch
        return real_train_epoch(*args, **kwargs)

    monkeypatch.setattr(benchmark, "train_epoch", dies_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        benchmark.main(tiny_args(killed, epochs=3))
    monkeypatch.setattr(benchmark, "train_epoch", real_train_epoch)
    ckpt = torch.load(killed / "checkpoints" / "synthetic-gam.pt", weights_only=True)
    assert len(ckpt["epochs"]) == 1

    assert benchmark.main(["--resume", str(killed), "--wandb", "disabled"]) == 0
    a = json.loads((straight / "results.json").read_text())[0]
    b = json.loads((killed / "results.json").read_text())[0]
    strip = lambda ep: [{k: v for k, v in e.items() if k not in ("epoch_time_s", "tokens_per_s")} for e in ep]  # noqa: E731
    assert strip(a["epochs"]) == strip(b["epochs"])  # bit-for-bit on CPU
    assert a["final_val_loss"] == b["final_val_loss"]


def test_resume_rejects_config_flags(tmp_path, capsys):
    out = tmp_path / "r"
    assert benchmark.main(tiny_args(out, epochs=1)) == 0
    capsys.readouterr()
    assert benchmark.main(["--resume", str(out), "--lr", "0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lr" in err[0]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real_ce, real_evaluate, poison = torch.nn.functional.cross_entropy, benchmark.evaluate, {"on": False}

    def poisoned(*args, **kwargs):
        loss = real_ce(*args, **kwargs)
        return loss * float("nan") if poison["on"] else loss

    def evaluate_then_poison(*args, **kwargs):
        value = real_evaluate(*args, **kwargs)
        poison["on"] = True  # the first epoch ends cleanly; the second one diverges
        return value

    monkeypatch.setattr(benchmark, "evaluate", evaluate_then_poison)
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)
    out = tmp_path / "nan"
    assert benchmark.main(tiny_args(out, epochs=2)) == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and "Last good checkpoint" in err
    ckpt = torch.load(out / "checkpoints" / "synthetic-gam.pt", weights_only=True)
    assert len(ckpt["epochs"]) == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    record = json.loads((out / "results.json").read_text())[0]
    assert record["status"] == "diverged" and len(record["epochs"]) == 1


def test_wandb_offline_writes_a_run(tmp_path):
    out = tmp_path / "wb"
    args = tiny_args(out, epochs=1)
    args[args.index("disabled")] = "offline"
    env_keys = {"WANDB_MODE": None, "WANDB_API_KEY": None}
    proc = subprocess.run([sys.executable, str(REPO / "benchmark.py"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300,
                          env={**{k: v for k, v in os.environ.items() if k not in env_keys},
                               "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")) and list(runs[0].glob("*.wandb"))[0].stat().st_size > 0


@pytest.mark.parametrize(
    "args, needle",
    [
        pytest.param(["--n-embed", "30", "--n-head", "4"], "divisible", id="heads_do_not_divide"),
        pytest.param(["--lr", "0"], "--lr", id="zero_lr"),
        pytest.param(["--epochs", "0"], "--epochs", id="zero_epochs"),
        pytest.param(["--dropout", "1.5"], "--dropout", id="dropout_too_big"),
        pytest.param(["--datasets", "wikitext2", "--data-dir", "/nonexistent/dir"], "not a folder", id="missing_dir"),
        pytest.param(["--data-dir", "x=/tmp"], "not a selected", id="data_dir_unknown_name"),
        pytest.param(["--preset", "nope"], "invalid choice", id="unknown_preset"),
        pytest.param(["--batch-size", "many"], "invalid int", id="non_integer"),
        pytest.param(["--resume", "/nonexistent/run"], "config.json", id="resume_missing"),
        pytest.param(["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "device",
                     id="unavailable_device"),
    ],
)
def test_bad_flags_exit_2_with_one_line(args, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        sys.exit(benchmark.main(["--wandb", "disabled", *args]))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert needle in err[0] and "Traceback" not in err[0]


def test_unreadable_data_dir_exits_2(tmp_path):
    (tmp_path / "only_train").mkdir()
    (tmp_path / "only_train" / "wiki.train.raw").write_text("some text\n" * 100)
    proc = run_cli("--preset", "cpu", "--data-dir", str(tmp_path / "only_train"), "--wandb", "disabled",
                   "--out-dir", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"), timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "valid" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()  # nothing written half-way


def test_lr_schedule_warmup_then_cosine_to_zero():
    f = benchmark.lr_lambda(warmup_steps=10, total_steps=110)
    assert f(0) == 0.0 and f(5) == pytest.approx(0.5) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5)  # halfway through the cosine
    assert f(110) == pytest.approx(0.0, abs=1e-12)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def _fake_record(dataset, model, cfg, rows):
    return {"dataset": dataset, "model": model, "implementation": model, "params": 22_599_680, "config": cfg,
            "data": {"rows": {"train": rows[0], "validation": rows[1]}}, "epochs": [],
            "final_val_loss": 6.5, "final_val_ppl": math.exp(6.5), "best_val_ppl": math.exp(6.5),
            "mean_epoch_time_s": 100.0}


def test_paper_numbers_shown_only_for_the_paper_config():
    paper_cfg = dict(benchmark.PAPER_HPARAMS)
    full = _fake_record("wikitext2", "gam", paper_cfg, (36718, 3760))
    table = benchmark.table1_markdown([full])
    assert "882.57" in table and "117.2" in table
    small = _fake_record("wikitext2", "gam", {**paper_cfg, "n_embed": 128}, (36718, 3760))
    assert "882.57" not in benchmark.table1_markdown([small])
    subset = _fake_record("tinystories", "gam", paper_cfg, (2316, 1840))  # a subset is not the paper's data
    assert "23.15" not in benchmark.table1_markdown([subset])
    ablation = [_fake_record("wikitext2", m, paper_cfg, (36718, 3760)) for m in benchmark.GAM_VARIANTS]
    t3 = benchmark.table3_markdown(ablation)
    for ppl in ("900.84", "905.45", "942.59", "944.70"):
        assert ppl in t3


def test_presets_and_flag_precedence(tmp_path):
    parser = benchmark.build_parser()
    args = parser.parse_args(["--preset", "smoke", "--n-embed", "32", "--out-dir", str(tmp_path)])
    cfg = benchmark.resolve_config(args, {"preset", "n_embed", "out_dir"})
    assert cfg["n_embed"] == 32                                    # flag beats preset
    assert cfg["n_layer"] == benchmark.PRESETS["smoke"]["n_layer"]  # preset beats paper default
    assert cfg["lr"] == benchmark.PRESETS["smoke"]["lr"]
    paper = benchmark.resolve_config(parser.parse_args([]), set())
    for k, v in benchmark.PAPER_HPARAMS.items():
        assert paper[k] == v, k
    assert paper["runs"] == {"wikitext2": ["transformer", "mamba", "gam"], "tinystories": ["transformer", "gam"]}


def test_unigram_perplexity_matches_hand_computation():
    # Train targets [0, 0, 1] with add-one over V=3 -> p = [3, 2, 1] / 6; validation targets [0, 2].
    train = torch.tensor([[9, 0, 0, 1]])
    val = torch.tensor([[9, 0, 2]])
    expected = math.exp(-(math.log(3 / 6) + math.log(1 / 6)) / 2)
    assert benchmark.unigram_perplexity(train, val, vocab_size=3) == pytest.approx(expected, rel=1e-12)


def test_unigram_only_trains_nothing(tmp_path):
    out = tmp_path / "u"
    assert benchmark.main(tiny_args(out) + ["--unigram-only"]) == 0
    unigram = json.loads((out / "unigram.json").read_text())
    assert 1 < unigram["synthetic"]["unigram_val_ppl"] < unigram["synthetic"]["vocab_size"] * 2
    assert not (out / "results.json").exists() and not (out / "checkpoints").exists()
