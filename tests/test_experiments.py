"""experiments.py: every committed experiment has a command that re-makes it, and the commands parse."""
import shlex
from pathlib import Path

import pytest

import config
import experiments
import perf
import scale
from conftest import REPO

DATA = {"wikitext2": "/data/wt2", "tinystories": "/data/ts"}


def test_every_assets_folder_is_listed_or_named_as_not_rerun():
    """A folder committed under assets/ without a command here (or a stale entry) fails."""
    folders = {p.name for p in (REPO / "assets").iterdir() if p.is_dir()}
    listed = {e.folder for e in experiments.EXPERIMENTS}
    assert listed | experiments.NOT_RERUN == folders
    assert not listed & experiments.NOT_RERUN


@pytest.mark.parametrize("experiment", experiments.EXPERIMENTS, ids=lambda e: e.name)
def test_every_command_parses_with_its_scripts_own_parser(experiment, tmp_path):
    """A misspelt flag, a removed option or a bad value fails here, not hours into a re-run."""
    for command in experiment.commands:
        argv = experiments.expand(command, tmp_path / experiment.folder, DATA)
        assert argv[0] == "python" and "{" not in " ".join(argv), argv
        script, args = argv[1], argv[2:]
        if script == "benchmark.py":
            config.build_parser().parse_args(args)
        elif script == "scale.py":
            scale.parse_args(args)
        else:
            assert script == "perf.py"
            perf.parse_args(args)
        out = args[args.index("--out-dir") + 1]
        assert Path(out).is_relative_to(tmp_path), "every command writes under --out-root"


def test_dry_run_prints_the_commands_with_the_data_folders(capsys, tmp_path):
    assert experiments.main(["unigram", "dtype", "--dry-run", "--data-dir", "wikitext2=/data/wt2",
                             "--out-root", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all(line.startswith("OMP_NUM_THREADS=1 python ") for line in lines)
    assert "--data-dir wikitext2=/data/wt2" in lines[0]
    assert shlex.split(lines[2])[-1] == str(tmp_path / "dtype-cpu" / "fp32")
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


def test_missing_data_folder_or_unknown_name_is_exit_2_before_anything_runs(capsys, monkeypatch, tmp_path):
    ran = []
    monkeypatch.setattr(experiments.subprocess, "call", lambda *a, **k: ran.append(a) or 0)
    assert experiments.main(["dtype", "lr-sweep", "--out-root", str(tmp_path)]) == 2
    assert "lr-sweep needs --data-dir wikitext2=DIR" in capsys.readouterr().err and not ran
    with pytest.raises(SystemExit) as e:
        experiments.main(["no-such-experiment"])
    assert e.value.code == 2 and "unknown experiment" in capsys.readouterr().err
    assert experiments.main(["dtype", "--out-root", str(tmp_path)]) == 0 and len(ran) == 2
