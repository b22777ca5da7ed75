"""Run folders written by an earlier version keep resuming, converting, extracting, captioning and zero-shot
classifying (DESIGN.md's contract). The folders in tests/data/legacy_runs/ were written by the project at commit
0065324 (before the one-trainer refactor), see tests/data/legacy_runs/README.md."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from aimv2.cli import main
from aimv2.config import LitConfig, load_config

LEGACY = Path(__file__).resolve().parent / "data" / "legacy_runs"


def _copy(name: str, tmp: Path, **placeholders: Path) -> Path:
    """The legacy folder ``name`` under ``tmp``, its config's placeholders replaced by real paths."""
    run = tmp / name
    shutil.copytree(LEGACY / name, run)
    cfg = (run / "config.yaml").read_text()
    for key, path in {f"LEGACY_{name.upper()}_RUN": run, **placeholders}.items():
        cfg = cfg.replace(key, str(path))
    (run / "config.yaml").write_text(cfg)
    return run


def _images(folder: Path) -> Path:
    for i, rgb in enumerate([(200, 30, 30), (30, 30, 200)]):
        (folder / f"c{i}").mkdir(parents=True)
        Image.new("RGB", (16, 16), rgb).save(folder / f"c{i}" / "0.png")
    return folder


def test_legacy_pretraining_run_resumes_converts_extracts_and_captions(tmp_path, capsys):
    from aimv2.train import train

    run = _copy("aimv2", tmp_path)
    before = torch.load(run / "checkpoints/step_00000002.pt", weights_only=True)
    last = train(load_config(run / "config.yaml", ["train.steps=3", "train.checkpoint_every=3"]))
    assert last["step"] == 3 and all(k in last for k in ("loss", "image_loss", "text_loss"))
    after = torch.load(run / "checkpoints/step_00000003.pt", weights_only=True)
    assert after["model"].keys() == before["model"].keys()  # the same model, resumed (not rebuilt differently)
    assert any(not torch.equal(after["model"][k], before["model"][k]) for k in before["model"])
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]

    assert main(["convert", str(run / "encoder.safetensors"), "--to", "hf", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    images = _images(tmp_path / "images")
    assert main(["extract", str(run), str(images), str(tmp_path / "feats.safetensors"), "--no-progress"]) == 0
    assert (tmp_path / "feats.safetensors").stat().st_size > 0
    capsys.readouterr()
    assert main(["caption", str(run), str(images / "c0" / "0.png"), "--max-len", "4", "--json", "--no-progress"]) == 0
    assert "0.png" in capsys.readouterr().out


def test_legacy_lit_run_resumes_and_classifies_zero_shot(tmp_path, capsys):
    from aimv2.train import train_lit

    encoder_run = _copy("aimv2", tmp_path)
    run = _copy("lit", tmp_path, LEGACY_AIMV2_RUN=encoder_run)
    last = train_lit(load_config(run / "config.yaml", ["train.steps=3"], cls=LitConfig))
    assert last["step"] == 3 and "acc" in last and "logit_scale" in last
    capsys.readouterr()
    images = _images(tmp_path / "images")
    (tmp_path / "templates.txt").write_text("a {} square\n")
    assert main(["zeroshot", str(run), "--images", str(images), "--templates", str(tmp_path / "templates.txt")]) == 0
    assert "top1" in capsys.readouterr().out


def test_legacy_clip_checkpoint_keys_are_the_clip_baselines_keys(tmp_path):
    """A CLIP-baseline run of the earlier version (its model keys and shapes, recorded from its checkpoint) loads
    into today's CLIP baseline, which is LiT's two towers with a trainable encoder."""
    from aimv2.objectives import CLIPBaseline, build_model

    run = _copy("clip", tmp_path)
    cfg = load_config(run / "config.yaml")
    model = build_model(cfg, vocab_size=521, pad_id=0, eos_id=1)
    assert isinstance(model, CLIPBaseline)
    recorded = json.loads((LEGACY / "clip_model_keys.json").read_text())
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == recorded


@pytest.mark.parametrize("name", ["aimv2", "lit"])
def test_legacy_fixtures_are_what_the_readme_says(name):
    state = torch.load(LEGACY / name / "checkpoints/step_00000002.pt", weights_only=True)
    assert state["step"] == 2 and "rng" in state and "optimizer" in state
