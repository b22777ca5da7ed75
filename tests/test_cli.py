"""The `aimv2` command: help for every subcommand, errors, and a smoke run of the demo pipeline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aimv2.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out
    assert "examples:" in out


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_subcommand_has_teaching_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: aimv2 " + name in out
    assert "example" in out.lower()


def test_one_line_help_is_defined_once_and_shown_by_both_helps(capsys):
    """`aimv2 --help` lists every command with the one line of the table, `aimv2 NAME --help` opens with the same
    line; the module itself holds no copy of it."""
    import importlib

    with pytest.raises(SystemExit):
        main(["--help"])
    top = " ".join(capsys.readouterr().out.split())  # argparse wraps long help lines
    for name, (module_name, help_) in COMMANDS.items():
        assert f"{name} {help_}" in top, name
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        own = capsys.readouterr().out.split("\n\n")
        assert own[1] == help_, name  # the first paragraph after the usage
        module = importlib.import_module(module_name)
        assert not hasattr(module, "HELP") and help_ not in module.DESCRIPTION, name


def test_top_level_help_imports_no_command_module():
    code = "import sys; from aimv2.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\n"
    code += "print(sorted(m for m in sys.modules if m.startswith('aimv2.cli.')))"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_unknown_command_and_no_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["pretrian"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main([]) == 0


def test_options_may_come_between_overrides(monkeypatch, capsys):
    import aimv2.cli.data as data_cmd
    import aimv2.cli.pretrain as pretrain

    seen = []
    monkeypatch.setattr(pretrain, "run", lambda args: seen.append(args))
    assert main(["pretrain", "c.yaml", "a=1", "--quiet", "b=2"]) == 0
    assert seen[0].config == "c.yaml" and seen[0].overrides == ["a=1", "b=2"] and seen[0].quiet
    monkeypatch.setattr(data_cmd, "run", lambda args: seen.append(args))  # sub-actions still parse as before
    assert main(["data", "inspect", "x.tar", "--limit", "3"]) == 0
    assert seen[1].sources == ["x.tar"] and seen[1].limit == 3


def test_python_m_entry_point():
    r = subprocess.run(
        [sys.executable, "-m", "aimv2", "--version"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
    )
    assert r.returncode == 0 and r.stdout.startswith("aimv2 ")


def test_pretrain_bad_config_value_is_one_clear_line(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "aimv2",
            "pretrain",
            str(ROOT / "configs/tiny-synthetic.yaml"),
            "train.steps=-3",
            f"out_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
    )
    assert r.returncode == 2
    assert r.stderr == "aimv2 pretrain: error: train.steps=-3 is out of range; give an integer in [1, inf)\n"


@pytest.mark.slow
def test_demo_smoke(tmp_path):
    """The whole demo on a very small budget: pretrain, probes, plots, captions, LiT and zero-shot."""
    out = tmp_path / "demo"
    cmd = [
        sys.executable,
        "-m",
        "aimv2",
        "demo",
        "--config",
        str(ROOT / "configs/tiny-synthetic.yaml"),
        "--out-dir",
        str(out),
        "--steps",
        "3",
        "--probe-tasks",
        "count",
        "--probe-train",
        "40",
        "--probe-val",
        "20",
        "--captions",
        "2",
        "--lit-steps",
        "2",
        "model.encoder_overrides={depth: 2}",
        "train.log_every=1",
        "train.progress=false",
        "data.num_workers=0",
        "train.batch_size=16",
    ]
    r = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["steps"] == 3
    assert set(result["probe_top1"]["count"]) == {"pretrained", "random_init", "chance"}
    assert len(result["captions"]) == 2 and all(c["true"] and "decoded" in c for c in result["captions"])
    assert result["zeroshot"]["chance"] == pytest.approx(100 / 9) and 0 <= result["zeroshot"]["top1"] <= 100
    for png in ("loss_curve.png", "probe_top1.png", "probe-count/report/pretrained.png"):
        assert (out / png).is_file(), png
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert json.loads((out / "results.json").read_text()) == result
