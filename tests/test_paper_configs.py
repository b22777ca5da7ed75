"""configs/paper/: every config resolves (its ??? filled with test values), builds its pretraining model on the meta
device, and has the encoder the paper released, counted by timm's implementation; the recipe's numbers are the
paper's (batch, lr per size, schedule, decoder, mixture)."""

from pathlib import Path

import pytest
import timm
import torch
from conftest import ROOT

from aimv2.config import ConfigError
from aimv2.config.parse import load_config, resolve_config
from aimv2.objectives.build import build_model
from aimv2.train.optim import adamw_weight_decay

PAPER = ROOT / "configs" / "paper"
FILL = {"model.init_from": "ckpt.safetensors", "data.shards": "a/{0..3}.tar", "data.tokenizer": "siglip.model"}
# config -> timm's model with the same encoder; native uses sin-cos positions: timm's 224 model less its 16x16 table
CONFIGS = {
    "aimv2-large-224": "aimv2_large_patch14_224",
    "aimv2-huge-224": "aimv2_huge_patch14_224",
    "aimv2-1b-224": "aimv2_1b_patch14_224",
    "aimv2-3b-224": "aimv2_3b_patch14_224",
    "highres-336": "aimv2_large_patch14_336",
    "highres-448": "aimv2_large_patch14_448",
    "native": "aimv2_large_patch14_224",
}
PEAK_LR = {"large": 1e-3, "huge": 8e-4, "1b": 8e-4, "3b": 4e-4}
MIXTURE = {"dfn_alt_text": 0.30, "dfn_synthetic": 0.30, "coyo": 0.09, "hqitp_alt_text": 0.28, "hqitp_synthetic": 0.03}


def resolved(name: str):
    path = PAPER / f"{name}.yaml"
    _, missing = resolve_config(path)
    return load_config(path, [f"{k}={FILL.get(k, 'a/{0..3}.tar')}" for k in missing])


def test_every_paper_config_is_tested():
    # aimv2-moe-224 (no released encoder to count against) is tested in tests/test_moe.py
    assert sorted(p.stem for p in PAPER.glob("*.yaml")) == sorted([*CONFIGS, "aimv2-moe-224"])


@pytest.mark.parametrize(("name", "timm_name"), list(CONFIGS.items()))
def test_paper_config_builds_the_released_encoder(name, timm_name):
    cfg = resolved(name)
    with torch.device("meta"):
        model = build_model(cfg, vocab_size=32000, pad_id=0, eos_id=1)
        ref = timm.create_model(timm_name, pretrained=False, num_classes=0)
    want = sum(p.numel() for p in ref.parameters())
    if name == "native":
        want -= ref.pos_embed.numel()
    assert sum(p.numel() for p in model.encoder.parameters()) == want
    assert all(p.device.type == "meta" for p in model.parameters())  # nothing allocated
    d = model.decoder.cfg  # the paper's decoder at every size
    assert (d.embed_dim, d.depth) == (1024, 12) and cfg.model.alpha == 0.4


@pytest.mark.parametrize("size", list(PEAK_LR))
def test_pretraining_recipe(size):
    cfg = resolved(f"aimv2-{size}-224")
    o, t = cfg.optim, cfg.train
    assert (t.batch_size, o.lr, o.init_lr, o.min_lr, o.warmup_steps) == (8192, PEAK_LR[size], 1e-6, 1e-5, 12500)
    assert (o.betas, o.eps, o.grad_clip, o.decoupled_weight_decay) == ((0.9, 0.95), 1e-8, 1.0, 1e-4)
    assert adamw_weight_decay(o) == pytest.approx(1e-4 / PEAK_LR[size])
    assert (t.precision, t.compile, t.parallel) == ("bf16", True, "fsdp")
    assert 1.25e6 <= t.steps <= 1.5e6 and t.steps * t.batch_size == pytest.approx(12e9, rel=1e-3)
    assert {e["name"]: e["weight"] for e in cfg.data.mixture} == MIXTURE
    assert (cfg.data.context_length, cfg.data.augment, cfg.data.tokenizer) == (77, True, "siglip.model")


@pytest.mark.parametrize("name", ["highres-336", "highres-448", "native"])
def test_post_training_stages(name):
    cfg = resolved(name)
    assert adamw_weight_decay(cfg.optim) == 0 and cfg.data.caption == "txt" and not cfg.data.mixture
    assert cfg.model.init_from == FILL["model.init_from"]
    if name == "native":
        n = cfg.data.native
        assert n.enabled and (n.min_patches, n.max_patches) == (2**7, 2**12)
        assert n.tokens_per_batch % (n.max_patches * n.batch_multiple) == 0


def test_the_old_high_res_paths_are_gone_everywhere():
    """configs/highres-*.yaml moved to configs/paper/: no file in the repository names the old path."""
    files = [ROOT / "README.md", ROOT / "Makefile", ROOT / "pyproject.toml"]
    for folder in ("src", "tests", "configs", "benchmarks"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in {".py", ".md", ".yaml"}]
    hits = [p for p in files if p != Path(__file__) and "configs/highres-" in p.read_text(errors="ignore")]
    assert hits == []


def test_overrides_reach_into_the_mixture_by_position():
    cfg = resolved("aimv2-large-224")  # every data.mixture.I.shards given as key=value
    assert [e["shards"] for e in cfg.data.mixture] == ["a/{0..3}.tar"] * 5
    with pytest.raises(ConfigError, match=r"override 'data.mixture.5.shards=x': 5 is not an item of a list of 5"):
        load_config(PAPER / "aimv2-large-224.yaml", ["data.mixture.5.shards=x"])
