"""benchmark.py end to end and its training loop: results schema, divergence, tables, and
tests that fail when the loop's wiring breaks (eval mode, gradient clipping, weight decay,
one loader iterator per epoch). Faults and bad input: test_benchmark_faults.py.

Every run here uses the embedded synthetic corpus and a tiny model, so no network and no files
outside a temporary folder are needed.
"""

import dataclasses
import json
import math
import statistics
import types
from pathlib import Path

import pytest
import torch

import benchmark
import config
import runs
import report
from gam_model import GAM_Model, ModelConfig
from pretrained import from_pretrained

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CPU = torch.device("cpu")


def tiny_args(out_dir: Path, *extra: str, models=("gam",), epochs: int = 2) -> list[str]:
    return [
        "--preset", "smoke", "--models", *models, "--n-embed", "16", "--n-layer", "1", "--n-head", "2",
        "--num-memory-slots", "8", "--d-state", "4", "--block-size", "32", "--batch-size", "8",
        "--epochs", str(epochs), "--warmup-steps", "2", "--max-train-blocks", "96", "--lr", "0.01",
        "--wandb", "disabled", "--out-dir", str(out_dir), "--cache-dir", str(out_dir.parent / "cache"), *extra,
    ]


def tiny_config(out_dir: Path, *extra: str) -> dict:
    parser = config.build_parser()
    args = parser.parse_args(tiny_args(out_dir, *extra))
    return config.resolve_config(args, config.explicit_flags(parser, args))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """(cfg, train_loader, val_loader, info) of the tiny synthetic setup, prepared once."""
    cfg = tiny_config(tmp_path_factory.mktemp("data") / "run")
    prepared = benchmark.prepare_data(cfg, Path(cfg.out_dir).parent / "cache", runs.RunState())["synthetic"]
    return cfg, prepared.train, prepared.validation, prepared.info


def training(tiny_data, model_name="gam", **overrides) -> tuple[benchmark.Training, config.TrainConfig]:
    cfg, train_loader, _, info = tiny_data
    cfg = dataclasses.replace(cfg, **overrides)
    return benchmark.build_training(cfg, model_name, info["vocab_size"], len(train_loader), CPU), cfg


# ---------------------------------------------------------------------------------------------
# end to end


def test_smoke_run_writes_results(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()  # an empty existing folder is a fine --out-dir
    assert benchmark.main(tiny_args(out, models=("transformer", "mamba", "gam"))) == 0
    assert "| synthetic | gam (" in capsys.readouterr().out  # the table is printed

    records = json.loads((out / "results.json").read_text())
    assert isinstance(records, list) and [r["model"] for r in records] == ["transformer", "mamba", "gam"]
    for r in records:
        for key in ("dataset", "model", "seed", "params", "implementation", "epochs", "final_val_loss",
                    "final_val_ppl", "best_val_ppl", "device", "torch_version", "git_commit", "config", "paper_config"):
            assert key in r, key
        assert r["dataset"] == "synthetic" and r["status"] == "done" and r["paper_config"] is False
        assert r["torch_version"] == torch.__version__ and r["config"]["num_workers"] == 0
        assert len(r["epochs"]) == 2
        for e in r["epochs"]:
            assert set(e) >= {"train_loss", "val_loss", "val_ppl", "epoch_time_s", "tokens_per_s",
                              "val_loss_by_position"}
            assert math.isclose(e["val_ppl"], math.exp(e["val_loss"]), rel_tol=1e-12)
            assert e["epoch_time_s"] > 0 and e["tokens_per_s"] > 0 and len(e["val_loss_by_position"]) == 32
        assert r["final_val_loss"] == r["epochs"][-1]["val_loss"]
        assert r["best_val_ppl"] == min(e["val_ppl"] for e in r["epochs"])
        # Learning happened: the validation loss is well below the uniform-guess loss.
        assert r["final_val_loss"] < math.log(r["data"]["vocab_size"]) - 0.5
    gam = records[-1]
    expected = GAM_Model(ModelConfig(**gam["model_config"])).num_params()
    assert gam["params"] == expected
    assert gam["model_config"]["N_EMBED"] == 16 and gam["config"]["max_train_blocks"] == 96
    assert records[1]["implementation"].startswith("mamba")

    config = json.loads((out / "config.json").read_text())
    fingerprint = config["data_fingerprint"]["synthetic"]
    assert set(fingerprint) == {"train", "validation", "tokenizer", "vocab_size"}
    assert fingerprint["vocab_size"] == gam["data"]["vocab_size"] and config["num_workers"] == 0

    table = (out / "table1.md").read_text()
    for name in ("transformer", "mamba", "gam"):
        assert f"| synthetic | {name} (" in table
    assert "The paper reports no gam run on synthetic." in table
    assert "Reference: a unigram model" in table and records[0]["data"]["unigram_val_ppl"] > 1
    assert "882.57" not in table and "Seeds" not in table
    assert (out / "curves.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "context.png").read_bytes()[:8] == PNG_MAGIC
    assert "R = 3 tokens" in (out / "context.md").read_text()  # 1 layer, kernel 3
    assert (out / "checkpoints" / "synthetic-gam.pt").is_file()


def test_seeds_give_one_record_each_and_mean_std_tables(tmp_path):
    out = tmp_path / "seeds"
    assert benchmark.main(tiny_args(out, "--seeds", "3", "4", epochs=1)) == 0
    records = json.loads((out / "results.json").read_text())
    assert [(r["model"], r["seed"]) for r in records] == [("gam", 3), ("gam", 4)]
    assert records[0]["final_val_loss"] != records[1]["final_val_loss"]  # other init and data order
    for seed in (3, 4):
        assert (out / "checkpoints" / f"synthetic-gam-seed{seed}.pt").is_file()
    row = next(line for line in (out / "table1.md").read_text().splitlines() if line.startswith("| synthetic"))
    losses = [r["final_val_loss"] for r in records]
    assert f"{statistics.fmean(losses):.4f} ± {statistics.stdev(losses):.4f}" in row
    assert "| 2 |" in row  # the seed count


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
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "non-finite" in err[0] and "Last good checkpoint" in err[0]
    ckpt = torch.load(out / "checkpoints" / "synthetic-gam.pt", weights_only=True)
    assert len(ckpt["epochs"]) == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    record = json.loads((out / "results.json").read_text())[0]
    assert record["status"] == "diverged" and len(record["epochs"]) == 1


def test_a_diverged_model_does_not_stop_the_others(tmp_path, monkeypatch, capsys):
    real_ce, real_build, training_gam = torch.nn.functional.cross_entropy, benchmark.build_training, {"on": False}

    def poisoned(*args, **kwargs):  # GAM's losses are NaN from its first step; the Transformer's are not
        loss = real_ce(*args, **kwargs)
        return loss * float("nan") if training_gam["on"] and torch.is_grad_enabled() else loss

    def build(cfg, model_name, *args, **kwargs):
        training_gam["on"] = model_name == "gam"
        return real_build(cfg, model_name, *args, **kwargs)

    monkeypatch.setattr(benchmark, "build_training", build)
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)
    out = tmp_path / "one-diverges"
    assert benchmark.main(tiny_args(out, models=("gam", "transformer"), epochs=1)) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "synthetic/gam: non-finite" in err[0] and "the other runs finished" in err[0]
    printed = [line for line in captured.out.splitlines() if line.startswith("| synthetic | gam (gam) |")]
    assert len(printed) == 1 and "| diverged | diverged |" in printed[0]  # the table is printed, with the row
    gam, transformer = json.loads((out / "results.json").read_text())
    assert (gam["model"], gam["status"]) == ("gam", "diverged")
    assert (transformer["model"], transformer["status"]) == ("transformer", "done")
    assert math.isfinite(transformer["final_val_loss"]) and "| transformer (" in (out / "table1.md").read_text()


def test_a_run_scores_its_final_model_on_the_test_split(tmp_path, capsys):
    """A data folder with a test file: each record holds the final model's test loss, which
    equals evaluate() of the exported model on that split; the tables show it beside validation."""
    from data import build_loaders

    words = [f"w{(i * 7) % 53}" for i in range(6000)]
    data_dir = tmp_path / "text"
    data_dir.mkdir()
    for name, part in (("train.txt", words), ("valid.txt", words[:1500]), ("test.txt", words[3000:4600])):
        (data_dir / name).write_text(" ".join(part) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    args = tiny_args(out, "--datasets", "wikitext2", "--data-dir", f"wikitext2={data_dir}", "--vocab-size", "200",
                     models=("gam",), epochs=1)
    assert benchmark.main(args) == 0
    assert "test " in capsys.readouterr().out
    [record] = json.loads((out / "results.json").read_text())
    prepared = build_loaders("wikitext2", data_dir=data_dir, vocab_size=200, block_size=32, batch_size=8,
                             cache_dir=tmp_path / "cache")
    model = from_pretrained(out / record["export"], expect=GAM_Model)
    expected = benchmark.evaluate(model, prepared.test, CPU)["val_loss"]
    assert record["final_test_loss"] == pytest.approx(expected, rel=1e-6)
    assert record["final_test_ppl"] == pytest.approx(math.exp(expected), rel=1e-6)
    assert record["final_test_loss"] != record["final_val_loss"]
    table = (out / "table1.md").read_text()
    assert "| Test loss | Test PPL |" in table and f"{record['final_test_ppl']:.2f}" in table


def test_unigram_only_trains_nothing(tmp_path):
    out = tmp_path / "u"
    assert benchmark.main(tiny_args(out) + ["--unigram-only"]) == 0
    unigram = json.loads((out / "unigram.json").read_text())
    assert 1 < unigram["synthetic"]["unigram_val_ppl"] < unigram["synthetic"]["vocab_size"] * 2
    assert sorted(p.name for p in out.iterdir()) == ["unigram.json"]  # not a run: nothing to resume


# ---------------------------------------------------------------------------------------------
# the training loop's wiring: each test fails if one line of it goes missing


def test_evaluate_is_deterministic_under_dropout(tiny_data):
    # evaluate() must switch dropout off itself, whatever mode the model was left in.
    t, _ = training(tiny_data, dropout=0.5)
    val_loader = tiny_data[2]
    first = benchmark.evaluate(t.model, val_loader, CPU)
    t.model.train()
    second = benchmark.evaluate(t.model, val_loader, CPU)
    assert first == second


def test_gradients_are_clipped_to_the_limit(tiny_data):
    # One step at initialisation (loss ~ log V: gradient norm far above 1e-3); the gradients
    # stay on the parameters after the step, already clipped.
    t, cfg = training(tiny_data, grad_clip=1e-3, max_train_blocks=8)
    benchmark.train_epoch(t, tiny_data[1], cfg, CPU, "clip", lambda metrics: None)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in t.model.parameters()]))
    assert 0 < norm <= 1e-3 * (1 + 1e-4)


def test_grad_clip_0_means_no_clipping(tiny_data):
    """--grad-clip 0 (nanoGPT's "no clipping"): the gradients reach the optimizer as backward left
    them; a max norm of 0 would scale them all to zero and the model would never move."""
    t, cfg = training(tiny_data, grad_clip=0.0, lr=1e-3, warmup_steps=0, dropout=0.0)
    x, y = next(iter(tiny_data[1]))
    seen = {}
    step = t.optimizer.step
    t.optimizer.step = lambda *a, **k: (seen.update(
        norm=float(torch.nn.utils.get_total_norm([p.grad for p in t.model.parameters()]))), step(*a, **k))[1]
    t.model.train()
    _, loss = t.model(x, y)  # the unclipped gradients, at the weights train_step starts from
    loss.backward()
    unclipped = float(torch.nn.utils.get_total_norm([p.grad for p in t.model.parameters()]))
    t.model.zero_grad()
    benchmark.train_step(t, x, y, cfg)
    assert seen["norm"] > 0.1 and seen["norm"] == pytest.approx(unclipped, rel=1e-3)


def test_weight_decay_is_applied_to_the_parameters(tiny_data):
    # With a zero gradient AdamW's update is zero, so a step only decays: p <- p * (1 - lr * wd).
    t, cfg = training(tiny_data, warmup_steps=0, lr=0.05, weight_decay=0.1)
    p = t.model.blocks[0].memory_bank
    before = p.detach().clone()
    for q in t.model.parameters():
        q.grad = torch.zeros_like(q)
    t.optimizer.step()
    assert torch.allclose(p.detach(), before * (1 - 0.05 * 0.1), rtol=0, atol=1e-7)
    assert not torch.allclose(p.detach(), before, rtol=0, atol=1e-6)


def test_one_loader_iterator_and_the_scheduler_steps_per_epoch(tiny_data, monkeypatch):
    t, cfg = training(tiny_data, max_train_blocks=20)  # 20 blocks / batch 8 -> 3 steps
    assert t.steps_per_epoch == 3
    starts = []
    real_iter = torch.utils.data.DataLoader.__iter__
    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", lambda self: starts.append(1) or real_iter(self))
    loss, seconds, tokens = benchmark.train_epoch(t, tiny_data[1], cfg, CPU, "steps", lambda metrics: None)
    assert len(starts) == 1  # the loader (and its workers) start once per epoch
    assert t.model.check_inputs is False  # ids were checked at load time: no per-step device sync
    assert t.scheduler.last_epoch == 3 and tokens == 3 * 8 * 32 and math.isfinite(loss) and seconds > 0


def test_token_ids_are_checked_once_at_load_time(tiny_data):
    cfg, train_loader, val_loader, info = tiny_data
    from data import DataError, PreparedData

    PreparedData(train_loader, val_loader, None, info).check_token_ids()  # real data passes
    bad = types.SimpleNamespace(dataset=types.SimpleNamespace(blocks=torch.tensor([[0, 1, info["vocab_size"]]])))
    with pytest.raises(DataError, match=r"validation token ids lie in \[0, \d+\], outside"):
        PreparedData(train_loader, bad, None, info).check_token_ids()
    with pytest.raises(DataError, match=r"test token ids lie in \[0, \d+\], outside"):
        PreparedData(train_loader, val_loader, None, info, test=bad).check_token_ids()


def test_lr_schedule_warmup_then_cosine_to_zero():
    f = benchmark.lr_lambda(warmup_steps=10, total_steps=110)
    assert f(0) == 0.0 and f(5) == pytest.approx(0.5) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5)  # halfway through the cosine
    assert f(110) == pytest.approx(0.0, abs=1e-12)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_unigram_perplexity_matches_hand_computation():
    # Train targets [0, 0, 1] with add-one over V=3 -> p = [3, 2, 1] / 6; validation targets [0, 2].
    train = torch.tensor([[9, 0, 0, 1]])
    val = torch.tensor([[9, 0, 2]])
    expected = math.exp(-(math.log(3 / 6) + math.log(1 / 6)) / 2)
    from data import PreparedData

    prepared = PreparedData(*(types.SimpleNamespace(dataset=types.SimpleNamespace(blocks=b)) for b in (train, val)),
                            None, {"vocab_size": 3})
    assert prepared.unigram_perplexity() == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# config and tables


def test_presets_and_flag_precedence(tmp_path):
    parser = config.build_parser()
    args = parser.parse_args(["--preset", "smoke", "--n-embed", "32", "--out-dir", str(tmp_path)])
    cfg = config.resolve_config(args, {"preset", "n_embed", "out_dir"})
    assert cfg.n_embed == 32                                    # flag beats preset
    assert cfg.n_layer == config.PRESETS["smoke"]["n_layer"]  # preset beats paper default
    assert cfg.lr == config.PRESETS["smoke"]["lr"]
    paper = config.resolve_config(parser.parse_args([]), set())
    for k, v in config.PAPER_HPARAMS.items():
        assert getattr(paper, k) == v, k
    assert paper.runs == {"wikitext2": ["transformer", "mamba", "gam"], "tinystories": ["transformer", "gam"]}


def _fake_record(dataset, model, paper_config=True, seed=1337, loss=6.5):
    switches = config.GAM_VARIANTS.get(model, config.GAM_VARIANTS["gam"])
    return {"dataset": dataset, "model": model, "seed": seed, "implementation": model, "params": 22_599_680,
            "paper_config": paper_config, "model_config": dict(switches), "status": "done",
            "data": {"rows": {"train": 36718, "validation": 3760}}, "epochs": [],
            "final_val_loss": loss, "final_val_ppl": math.exp(loss), "best_val_ppl": math.exp(loss),
            "mean_epoch_time_s": 100.0}


def test_paper_numbers_shown_only_for_the_paper_config():
    paper = config.TrainConfig()
    rows = {"train": 36718, "validation": 3760}
    assert config.is_paper_config(paper, "wikitext2", {"rows": rows})
    assert not config.is_paper_config(dataclasses.replace(paper, n_embed=128), "wikitext2", {"rows": rows})
    assert not config.is_paper_config(paper, "tinystories", {"rows": {"train": 2316, "validation": 1840}})
    assert config.is_paper_config(paper.for_seed(7), "wikitext2", {"rows": rows})  # the paper had no seed

    table = report.table1_markdown([_fake_record("wikitext2", "gam")])
    assert "882.57" in table and "117.2" in table
    assert "882.57" not in report.table1_markdown([_fake_record("wikitext2", "gam", paper_config=False)])
    t3 = report.table3_markdown([_fake_record("wikitext2", m) for m in config.GAM_VARIANTS])
    for ppl in ("900.84", "905.45", "942.59", "944.70"):
        assert ppl in t3
    assert "| gam-local-only (wikitext2) | no | yes | no |" in t3


def test_tables_with_several_seeds_show_mean_std_and_count():
    records = [_fake_record("wikitext2", "gam", seed=s, loss=v) for s, v in ((1, 6.0), (2, 6.2), (3, 6.7))]
    records.append({**_fake_record("wikitext2", "transformer", seed=1), "status": "diverged",
                    "final_val_loss": None, "final_val_ppl": None})
    records.append(_fake_record("wikitext2", "transformer", seed=2, loss=6.4))
    table = report.table1_markdown(records)
    gam = next(line for line in table.splitlines() if "| gam (" in line)
    assert f"| {6.3:.4f} ± {statistics.stdev([6.0, 6.2, 6.7]):.4f} |" in gam and "| 3 |" in gam
    transformer = next(line for line in table.splitlines() if "| transformer (" in line)
    assert "| 6.4000 |" in transformer and "| 1 of 2 |" in transformer  # one seed diverged
    t3 = report.table3_markdown(records[:3])
    assert "Seeds" in t3.splitlines()[0] and "| 3 |" in t3


def test_per_position_loss_matches_a_hand_computation(tiny_data):
    # The curve is the mean over blocks of the loss at each position; averaging it with
    # equal weights gives back the plain token mean (every position has the same count).
    t, _ = training(tiny_data)
    val_loader = tiny_data[2]
    by_position = benchmark.evaluate(t.model, val_loader, CPU)["val_loss_by_position"]
    t.model.eval()
    with torch.no_grad():
        per_token = torch.cat([torch.nn.functional.cross_entropy(
            t.model(x)[0].double().transpose(1, 2), y, reduction="none") for x, y in val_loader])  # (N, T)
    assert len(by_position) == per_token.shape[1]
    assert by_position == pytest.approx(per_token.mean(0).tolist(), abs=1e-5)


def _curve_record(model, seed, curve, n_layer=2, k=3):
    switches = {**config.GAM_VARIANTS.get(model, config.GAM_VARIANTS["gam"]), "N_LAYER": n_layer,
                "CONV_KERNEL_SIZE": k}
    return {**_fake_record("wikitext2", model, seed=seed), "model_config": switches,
            "epochs": [{"epoch": 1, "val_ppl": 500.0, "val_loss_by_position": [9.0] * len(curve)},
                       {"epoch": 2, "val_ppl": 400.0, "val_loss_by_position": curve}]}


def test_context_table_and_figure(tmp_path):
    # R = 2 * (3 - 1) + 1 = 5. GAM: flat at 5.0, so nothing to gain beyond R. Transformer (two
    # seeds, +-0.5 around the same curve): 6.0 with fewer than 10 tokens of context, 4.0 over the
    # last quarter (context 31..40), so it gains 6.0 - 4.0 = +2.0 beyond R. Only the last epoch counts.
    base = [6.0] * 9 + [5.0] * 21 + [4.0] * 10
    records = [_curve_record("gam", 1, [5.0] * 40),
               _curve_record("transformer", 1, [v + 0.5 for v in base]),
               _curve_record("transformer", 2, [v - 0.5 for v in base])]
    table = report.context_markdown(records)
    assert "| wikitext2 | gam | 1 | 5.0000 | 5.0000 | 5.0000 | +0.0000 |" in table
    assert "| wikitext2 | transformer | 2 | 6.0000 | 6.0000 | 4.0000 | +2.0000 |" in table
    assert "R = 5 tokens" in table
    report.plot_context(records, tmp_path / "context.png")
    assert (tmp_path / "context.png").read_bytes()[:8] == PNG_MAGIC


def test_speed_steps_times_every_model_without_data(tmp_path, monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("--speed-steps must not prepare data")

    monkeypatch.setattr(benchmark, "prepare_data", no_data)
    out = tmp_path / "speed"
    assert benchmark.main(tiny_args(out, "--speed-steps", "2", models=("transformer", "gam"))) == 0
    speed = json.loads((out / "speed.json").read_text())
    assert [r["model"] for r in speed["rows"]] == ["transformer", "gam"] and speed["steps"] == 2
    for r in speed["rows"]:
        assert r["step_s_min"] <= r["step_s_median"] <= r["step_s_max"]
        assert r["tokens_per_s"] == pytest.approx(8 * 32 / r["step_s_median"])  # batch 8 x 32 tokens
    assert "| gam (gam) |" in (out / "speed.md").read_text() and not (out / "results.json").exists()


def test_recall_evaluation_matches_a_naive_count():
    from data import build_mqar_loaders

    prepared = build_mqar_loaders(
        vocab_size=64, block_size=24, num_kv_pairs=3, num_train=8, num_validation=10, batch_size=4)
    val_loader, info = prepared.validation, prepared.info
    torch.manual_seed(0)
    model = GAM_Model(ModelConfig(VOCAB_SIZE=64, BLOCK_SIZE=24, N_EMBED=16, N_LAYER=2, NUM_MEMORY_SLOTS=8))
    stats = benchmark.evaluate(model, val_loader, CPU, receptive_field=5)
    ds = val_loader.dataset
    with torch.no_grad():
        argmax = model(ds.blocks)[0].argmax(-1)
    counts = {"within": [0, 0], "beyond": [0, 0]}  # [correct, total]
    for i in range(len(ds)):
        for q in range(24):
            if int(ds.targets[i, q]) == -100:
                continue
            key_pos = [p for p in range(0, 6, 2) if int(ds.blocks[i, p]) == int(ds.blocks[i, q])][0]
            side = "within" if q - key_pos <= 4 else "beyond"
            counts[side][0] += int(argmax[i, q]) == int(ds.targets[i, q])
            counts[side][1] += 1
    for side, (correct, total) in counts.items():
        assert stats[f"recall_correct_{side}_rf"] == correct and stats[f"recall_count_{side}_rf"] == total
    assert stats["recall_count"] == 30 == info["queries"]["validation"]  # 10 examples x 3 queries
    by_position = stats["val_loss_by_position"]
    assert all(math.isnan(v) for v in by_position[:6])  # the key-value section is never scored


def test_recall_run_writes_recall_table(tmp_path):
    out = tmp_path / "mqar"
    args = tiny_args(out, "--datasets", "mqar", "--vocab-size", "64", "--mqar-kv-pairs", "2",
                     "--mqar-train-examples", "64", "--mqar-val-examples", "16", epochs=1)
    assert benchmark.main(args) == 0
    record = json.loads((out / "results.json").read_text())[0]
    assert record["dataset"] == "mqar" and 0 <= record["final_recall_accuracy"] <= 1
    assert record["epochs"][0]["recall_count"] == 32 and record["data"]["unigram_val_ppl"] is None
    assert "| mqar | gam (gam) |" in (out / "recall.md").read_text()
    assert not (out / "context.md").exists()  # per-position loss of a recall task is not a context curve


# ---------------------------------------------------------------------------------------------
# host reads (device syncs) in the training loop, dtype and compile

REPO_FILES = {str(Path(benchmark.__file__).parent / f) for f in
              ("benchmark.py", "gam_model.py", "baselines.py", "data.py", "synthetic.py")}
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


@pytest.fixture
def host_reads(monkeypatch):
    """Every call of a tensor method that copies a value to the host (a sync on an accelerator),
    as the file that called it: the CPU has no sync debug mode, so the calls are counted."""
    import sys

    calls = []
    for name in READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            calls.append(sys._getframe(1).f_code.co_filename)
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


def test_the_training_loop_reads_the_loss_once_per_log_every_steps(tiny_data, monkeypatch, host_reads):
    t, cfg = training(tiny_data, max_train_blocks=80)  # 80 blocks / batch 8 -> 10 steps
    monkeypatch.setattr(benchmark, "LOG_EVERY", 4)
    logged = []
    benchmark.train_epoch(t, tiny_data[1], cfg, CPU, "reads", logged.append)
    ours = [f for f in host_reads if f in REPO_FILES]
    assert len(ours) == math.ceil(10 / 4)  # reads after steps 4, 8 and 10: none per step
    assert not [f for f in host_reads if f.endswith("clip_grad.py")]  # clipping reads nothing either
    assert [m["step"] for m in logged if "train/loss" in m] == [4, 8, 10] and len(logged) == 10


def test_the_epoch_mean_loss_equals_the_mean_of_per_step_losses(tiny_data):
    # The reference: the same steps written out, each loss read at once (the loop before LOG_EVERY).
    train_loader = tiny_data[1]

    def fresh():
        t, c = training(tiny_data, max_train_blocks=80)
        train_loader.generator.manual_seed(c.seed)
        train_loader.sampler.set_epoch(0)
        return t, c

    t, c = fresh()
    mean, _, _ = benchmark.train_epoch(t, train_loader, c, CPU, "mean", lambda m: None)
    t, c = fresh()
    t.model.train()
    losses, batches = [], iter(train_loader)
    for _ in range(t.steps_per_epoch):
        x, y = next(batches)
        t.optimizer.zero_grad(set_to_none=True)
        _, loss = t.model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(t.model.parameters(), c.grad_clip)
        t.optimizer.step()
        t.scheduler.step()
        losses.append(loss.item())
    assert len(losses) == 10 and abs(mean - sum(losses) / len(losses)) < 1e-6


def test_a_non_finite_loss_stops_at_the_next_read_naming_its_step(tiny_data, monkeypatch):
    t, cfg = training(tiny_data, max_train_blocks=80)
    monkeypatch.setattr(benchmark, "LOG_EVERY", 4)
    real_ce, calls = torch.nn.functional.cross_entropy, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real_ce(*args, **kwargs)
        return loss * float("nan") if len(calls) in (6, 7) else loss  # steps 6 and 7

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)
    with pytest.raises(runs.DivergedError, match=r"non-finite training loss .* at step 6$"):
        benchmark.train_epoch(t, tiny_data[1], cfg, CPU, "nan", lambda m: None)
    assert t.scheduler.last_epoch == 8  # stopped at the read after step 8, not at the epoch end


def test_bf16_autocasts_training_and_evaluation(tiny_data):
    x, y = next(iter(tiny_data[1]))
    results = {}
    for dtype in ("fp32", "bf16"):
        t, cfg = training(tiny_data, dtype=dtype)
        ev = benchmark.evaluate(t.model, tiny_data[2], CPU, dtype=dtype)["val_loss"]
        t.model.train()
        results[dtype] = (ev, benchmark.train_step(t, x, y, cfg).item())
    (ev32, step32), (ev16, step16) = results["fp32"], results["bf16"]
    assert ev16 != ev32 and abs(ev16 - ev32) < 0.05  # the same model, in lower precision
    assert step16 != step32 and abs(step16 - step32) < 0.05


def test_compile_compiles_the_model_in_place(tiny_data, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    t, _ = training(tiny_data, compile=True)
    assert compiled == [t.model]
    training(tiny_data)
    assert compiled == [t.model]  # not without --compile


def test_dtype_and_compile_are_recorded(tmp_path):
    out = tmp_path / "bf16"
    assert benchmark.main(tiny_args(out, "--dtype", "bf16", epochs=1)) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bf16"
    record = json.loads((out / "results.json").read_text())[0]
    assert record["config"]["dtype"] == "bf16" and record["config"]["compile"] is False
    assert record["paper_config"] is False and math.isfinite(record["final_val_loss"])
    assert record["epochs"][0]["first_step_s"] > 0
