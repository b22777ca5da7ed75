"""VLM stages on the one trainer: stage 1 moves the projector only, stage 2 the projector and the LM (from stage 1's
projector), a run killed with kill -9 resumes bit-identically, and `aimv2 vlm ask` / `eval` read the run back."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import QUIET, kill9_after_checkpoint, subprocess_env
from safetensors.torch import load_file

from aimv2.config import load_config
from aimv2.config.vlm import VLMConfig
from aimv2.train.vlm_task import train_vlm
from aimv2.weights import create_model, load_encoder, save_encoder
from aimv2.weights.lm import build_tiny_lm

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """An encoder checkpoint and a tiny LM folder, written once."""
    d = tmp_path_factory.mktemp("vlm-parts")
    torch.manual_seed(1)
    save_encoder(create_model("aimv2-tiny-patch8-64", depth=1, img_size=16), d / "encoder.safetensors")
    build_tiny_lm(d / "lm", width=32, depth=1, heads=2)
    return d


def _overrides(parts, out, stage=1, *extra):
    return [
        f"vlm.encoder={parts / 'encoder.safetensors'}",
        "vlm.encoder_overrides={depth: 1, img_size: 16}",
        f"vlm.lm={parts / 'lm'}",
        f"out_dir={out}",
        "vlm.max_length=96",
        "train.batch_size=4",
        "train.log_every=1",
        "optim.warmup_steps=1",
        *QUIET,
        *extra,
    ]


def _cfg(parts, out, stage, *extra):
    return load_config(ROOT / f"configs/vlm-tiny-stage{stage}.yaml", _overrides(parts, out, stage, *extra), VLMConfig)


def _steps(out):
    return [torch.load(p, weights_only=True)["model"] for p in sorted((Path(out) / "checkpoints").glob("*.pt"))]


def test_stage1_moves_only_the_projector_and_stage2_the_lm_too(parts, tmp_path):
    steps = ["train.steps=3", "train.checkpoint_every=1", "train.keep_last=5"]
    train_vlm(_cfg(parts, tmp_path / "s1", 1, *steps))
    encoder = load_encoder(str(parts / "encoder.safetensors"), depth=1, img_size=16).state_dict()
    lm = load_file(parts / "lm" / "model.safetensors")
    states = _steps(tmp_path / "s1")
    assert len(states) == 3
    for sd in states:  # bit-identical to the files they were read from, after every step
        assert all(torch.equal(sd[f"encoder.{k}"], v) for k, v in encoder.items())
        assert all(torch.equal(sd[f"lm.{k}"], v) for k, v in lm.items())
    assert not torch.equal(states[0]["projector.0.weight"], states[-1]["projector.0.weight"])
    exported = load_file(tmp_path / "s1" / "vlm.safetensors")
    assert sorted({k.split(".")[0] for k in exported}) == ["projector"]  # only what stage 1 trains

    train_vlm(_cfg(parts, tmp_path / "s2", 2, *steps, f"vlm.init_from={tmp_path / 's1'}"))
    s2 = _steps(tmp_path / "s2")
    first = s2[0]
    assert any(not torch.equal(first[f"lm.{k}"], v) for k, v in lm.items())  # the LM trains in stage 2
    assert all(torch.equal(first[k], s2[-1][k]) for k in first if k.startswith("encoder."))  # the encoder does not
    # step 1 started from stage 1's projector: it moved one AdamW step (lr <= 1e-3) away from it, not from a fresh init
    gap = (first["projector.2.weight"] - exported["projector.2.weight"]).abs().max()
    assert gap <= 1.1e-3
    assert {k.split(".")[0] for k in load_file(tmp_path / "s2" / "vlm.safetensors")} == {"projector", "lm"}


def _cmd(parts, out, *extra):
    cfg = str(ROOT / "configs/vlm-tiny-stage2.yaml")
    return [sys.executable, "-m", "aimv2", "vlm", "train", cfg, *_overrides(parts, out, 2, *extra)]


def _metrics(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_kill9_and_resume_is_bit_identical(parts, tmp_path):
    steps = ["train.steps=8", "train.checkpoint_every=2"]
    ref = tmp_path / "ref"
    subprocess.run(_cmd(parts, ref, *steps), env=subprocess_env(), check=True, timeout=300, capture_output=True)
    out = tmp_path / "killed"
    kill9_after_checkpoint(_cmd(parts, out, *steps), out, 2)
    subprocess.run(_cmd(parts, out, *steps), env=subprocess_env(), check=True, timeout=300, capture_output=True)
    a, b = load_file(ref / "vlm.safetensors"), load_file(out / "vlm.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _metrics(ref)] == [r["loss"] for r in _metrics(out)][-8:]


@pytest.mark.slow
def test_ask_and_eval_read_the_run_back(parts, tmp_path):
    out = tmp_path / "run"
    train_vlm(_cfg(parts, out, 2, "train.steps=1", "train.checkpoint_every=1"))
    from aimv2.data.synthetic.questions import question_scene
    from aimv2.data.synthetic.scenes import render

    render(question_scene(0, 0, "heldout")[0], 16).save(tmp_path / "scene.png")
    env = subprocess_env()
    ask = [sys.executable, "-m", "aimv2", "vlm", "ask", str(out), str(tmp_path / "scene.png"), "How many?"]
    r = subprocess.run([*ask, "--max-new-tokens", "3"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    ev = [sys.executable, "-m", "aimv2", "vlm", "eval", str(out), "--scenes", "3", "--batch-size", "8"]
    r = subprocess.run(ev, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.splitlines()[-1])
    assert result["n"] >= 6 and "accuracy/count" in result and 0 <= result["accuracy"] <= 1
    r = subprocess.run([*ask[:5], str(tmp_path), "x.png", "q"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not a VLM run folder" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp", "grad_accum"])
def test_two_processes_or_micro_batches_train_like_one(parts, tmp_path, parallel):
    """2-process DDP and FSDP2 (gloo; FSDP shards each LM decoder layer) and 2 accumulation micro-batches: the same
    global-batch loss and weights as one process (answer counts differ per micro-batch and rank: the sums over the
    global count make them add up)."""
    steps = ["train.steps=3", "train.checkpoint_every=3"]
    single = tmp_path / "single"
    subprocess.run(_cmd(parts, single, *steps), env=subprocess_env(), check=True, timeout=300, capture_output=True)
    multi = tmp_path / parallel
    if parallel == "grad_accum":
        cmd = _cmd(parts, multi, *steps, "train.grad_accum=2")
    else:
        run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        cmd = [*run, "-m", *_cmd(parts, multi, *steps, f"train.parallel={parallel}")[2:]]
    r = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    for s, m in zip(_metrics(single), _metrics(multi), strict=True):
        assert m["loss"] == pytest.approx(s["loss"], rel=1e-5) and m["grad_norm"] == pytest.approx(s["grad_norm"], 1e-4)
    a, b = load_file(single / "vlm.safetensors"), load_file(multi / "vlm.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


def test_fsdp_units_are_our_blocks_and_the_lm_decoder_layers(parts):
    """What apply_fsdp shards one by one in a VLM: the encoder's blocks and each of the LM's decoder layers (found
    through transformers' _no_split_modules, so any causal LM works), nothing else (the root takes the rest)."""
    from aimv2.objectives.vlm import VisionLanguageModel
    from aimv2.train.parallelize import block_lists, lm_layers
    from aimv2.weights.lm import load_causal_lm

    lm, tok = load_causal_lm(parts / "lm")
    model = VisionLanguageModel(create_model("aimv2-tiny-patch8-64", depth=2, img_size=16), lm, 5)
    assert [list(b) for b in block_lists(model)] == [list(model.encoder.blocks)]
    assert lm_layers(model) == list(lm.model.layers) and len(lm_layers(model)) == lm.config.num_hidden_layers
