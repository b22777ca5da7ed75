"""LoRA in VLM stage 2 (vlm.lora.*, through peft): only the projector and the adapters train, the run resumes
bit-identically after kill -9, and the export with the adapters merged into the LM gives the unmerged model's
logits in transformers' LLaVA."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import QUIET, kill9_after_checkpoint, subprocess_env
from safetensors.torch import load_file

from aimv2.config import load_config
from aimv2.config.checks import ConfigError
from aimv2.config.vlm import VLMConfig, validate_vlm
from aimv2.train.vlm_task import train_vlm
from aimv2.weights import create_model, save_encoder
from aimv2.weights.lm import build_tiny_lm, load_vlm_run

pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parents[1]
LORA = ["vlm.lora.rank=4", "vlm.lora.alpha=8", "vlm.lora.dropout=0.1"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    d = tmp_path_factory.mktemp("vlm-lora")
    torch.manual_seed(1)
    save_encoder(create_model("aimv2-tiny-patch8-64", depth=1, img_size=16), d / "encoder.safetensors")
    build_tiny_lm(d / "lm", width=32, depth=1, heads=2)
    return d


def _overrides(parts, out, *extra):
    return [
        f"vlm.encoder={parts / 'encoder.safetensors'}",
        "vlm.encoder_overrides={depth: 1, img_size: 16}",
        f"vlm.lm={parts / 'lm'}",
        f"out_dir={out}",
        "vlm.max_length=96",
        "train.batch_size=4",
        "train.log_every=1",
        "optim.warmup_steps=1",
        *LORA,
        *QUIET,
        *extra,
    ]


def _cfg(parts, out, *extra):
    return load_config(ROOT / "configs/vlm-tiny-stage2.yaml", _overrides(parts, out, *extra), VLMConfig)


def test_lora_trains_the_adapters_and_the_projector_only_and_exports_merged(parts, tmp_path):
    import transformers as tf

    from aimv2.weights.llava_export import export_llava

    run = tmp_path / "run"
    train_vlm(_cfg(parts, run, "train.steps=3", "train.checkpoint_every=3"))
    saved = load_file(run / "vlm.safetensors")
    assert {k.split(".")[0] for k in saved} == {"projector", "lm"}
    lora = [k for k in saved if k.startswith("lm.")]
    assert lora and all(".lora_A." in k or ".lora_B." in k for k in lora)  # adapters only, no LM weight
    assert any(saved[k].abs().max() > 0 for k in lora if ".lora_B." in k)  # B starts at 0: it moved

    model, tok, _ = load_vlm_run(run)
    base = load_file(parts / "lm" / "model.safetensors")
    lm_sd = model.lm.get_base_model().state_dict()
    for k, v in base.items():  # the LM's weights are the file's, the adapters on top
        got = lm_sd.get(k, lm_sd.get(k.replace(".weight", ".base_layer.weight")))
        assert torch.equal(got, v), k

    out = tmp_path / "llava"
    export_llava(run, out)
    llava = tf.LlavaForConditionalGeneration.from_pretrained(out).eval()
    ids = torch.tensor([[1, 7, tok.convert_tokens_to_ids("<image>"), 9, 11, 12, 13]])
    images = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        embeds, mask, _ = model.embed(images, ids, torch.ones_like(ids))
        ours = model.lm(inputs_embeds=embeds, attention_mask=mask).logits  # adapters unmerged (peft's forward)
        K = model.tokens_per_image
        expanded = torch.cat([ids[:, :2], ids[:, 2:3].repeat(1, K), ids[:, 3:]], 1)
        theirs = llava(input_ids=expanded, pixel_values=images, attention_mask=torch.ones_like(expanded)).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # and the adapters matter: without them the logits differ
        model.lm.disable_adapter_layers()
        plain = model.lm(inputs_embeds=embeds, attention_mask=mask).logits
    assert (plain - ours).abs().max() > 1e-3


def test_lora_config_errors_are_one_line(parts, tmp_path):
    with pytest.raises(ConfigError, match="stage 2 only"):
        validate_vlm(load_config(ROOT / "configs/vlm-tiny-stage1.yaml", _overrides(parts, tmp_path), VLMConfig))
    from aimv2.weights.errors import CheckpointError

    with pytest.raises(CheckpointError, match="vlm.lora.*target_modules"):
        train_vlm(_cfg(parts, tmp_path / "bad", "train.steps=1", "vlm.lora.target_modules=[no_such_layer]"))


def _cmd(parts, out, *extra):
    cfg = str(ROOT / "configs/vlm-tiny-stage2.yaml")
    return [sys.executable, "-m", "aimv2", "vlm", "train", cfg, *_overrides(parts, out, *extra)]


def _metrics(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_lora_kill9_and_resume_is_bit_identical(parts, tmp_path):
    """As tests/test_vlm_train.py's resume test, with adapters (and their dropout) in the model."""
    steps = ["train.steps=4", "train.checkpoint_every=2"]
    ref = tmp_path / "ref"
    subprocess.run(_cmd(parts, ref, *steps), env=subprocess_env(), check=True, timeout=300, capture_output=True)
    out = tmp_path / "killed"
    kill9_after_checkpoint(_cmd(parts, out, *steps), out, 2)
    subprocess.run(_cmd(parts, out, *steps), env=subprocess_env(), check=True, timeout=300, capture_output=True)
    a, b = load_file(ref / "vlm.safetensors"), load_file(out / "vlm.safetensors")
    assert any(".lora_B." in k for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _metrics(ref)] == [r["loss"] for r in _metrics(out)][-4:]


def test_starting_the_data_loader_leaves_the_global_rng_alone():
    """A resumed run restores the RNG, then starts its loader: drawing the workers' seed from the global RNG there
    shifted the dropout masks of every later step against the run it resumes."""
    from aimv2.train.data import make_loader

    class Steps(torch.utils.data.IterableDataset):
        seed = 3

        def __iter__(self):
            yield 1

    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    iter(make_loader(Steps(), 0, 2, pin_memory=False))
    assert torch.equal(torch.rand(3), want)
