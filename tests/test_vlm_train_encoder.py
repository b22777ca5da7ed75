"""Unfreezing a VLM's encoder (vlm.train_encoder=true) with the recipe: its lr is optim.lr x vlm.encoder_lr_mult,
ramped from 0 over vlm.encoder_warmup_steps, with optional layer-wise decay; checked against hand-computed
learning rates and against the size of AdamW's first steps on the encoder in a real run."""

from pathlib import Path

import pytest
import torch
from conftest import QUIET
from torch import nn

from aimv2.config import load_config
from aimv2.config.vlm import VLMConfig
from aimv2.train.optim import param_groups, set_lr
from aimv2.train.vlm_task import encoder_recipe, train_vlm
from aimv2.weights import create_model, save_encoder
from aimv2.weights.lm import build_tiny_lm

ROOT = Path(__file__).resolve().parents[1]


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.patch_embed = nn.Linear(2, 2)
        self.encoder.blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))
        self.encoder.norm = nn.LayerNorm(2)
        self.projector = nn.Linear(2, 2)


@pytest.mark.parametrize("decay", [1.0, 0.5])
def test_the_recipe_gives_each_encoder_group_its_lr_and_ramp(decay):
    cfg = VLMConfig()
    cfg.vlm.train_encoder, cfg.vlm.encoder_lr_mult, cfg.vlm.encoder_warmup_steps = True, 0.1, 4
    cfg.vlm.encoder_layer_decay = decay
    encoder_recipe(cfg, depth=3)
    model = Toy()
    opt = torch.optim.AdamW(param_groups(model, 0.1, cfg.optim.lr_mult, cfg.optim.lr_warmup), lr=1.0)
    lr_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    want = {  # hand-computed: 0.1 x decay ** (depth - 1 - i) for block i, the patch embedding below block 0
        "encoder.patch_embed.weight": 0.1 * decay**3,
        "encoder.blocks.0.weight": 0.1 * decay**2,
        "encoder.blocks.2.bias": 0.1,
        "encoder.norm.weight": 0.1,
        "projector.weight": 1.0,
    }
    params = dict(model.named_parameters())
    for step, ramp in ((0, 0.25), (1, 0.5), (3, 1.0), (50, 1.0)):
        set_lr(opt, 2e-3, step)
        for name, mult in want.items():
            r = ramp if name.startswith("encoder") else 1.0
            assert lr_of[id(params[name])]["lr"] == pytest.approx(2e-3 * mult * r), (name, step)


def test_the_defaults_leave_the_optimizer_as_runs_before_the_recipe_had_it():
    """A run written before these keys existed resumes with them at their defaults: no lr_mult or lr_warmup entry
    appears (the saved config and the optimizer's groups stay what they were)."""
    cfg = VLMConfig()
    cfg.vlm.train_encoder = True
    encoder_recipe(cfg, depth=3)
    assert cfg.optim.lr_mult == {} and cfg.optim.lr_warmup == {}


def test_the_users_own_encoder_multipliers_win():
    cfg = VLMConfig()
    cfg.vlm.train_encoder = True
    cfg.optim.lr_mult = {"encoder.blocks": 0.3}
    encoder_recipe(cfg, depth=3)
    assert cfg.optim.lr_mult == {"encoder.blocks": 0.3} and cfg.optim.lr_warmup == {}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    d = tmp_path_factory.mktemp("vlm-enc")
    torch.manual_seed(1)
    save_encoder(create_model("aimv2-tiny-patch8-64", depth=1, img_size=16), d / "encoder.safetensors")
    build_tiny_lm(d / "lm", width=32, depth=1, heads=2)
    return d


def _encoder_step(parts, out, *extra) -> float:
    """The largest change of an encoder weight in the second step (the first at the full lr: warmup_steps=1)."""
    overrides = [f"vlm.encoder={parts / 'encoder.safetensors'}", "vlm.encoder_overrides={depth: 1, img_size: 16}",
                 f"vlm.lm={parts / 'lm'}", f"out_dir={out}", "vlm.max_length=96", "train.batch_size=4",
                 "train.steps=2", "train.checkpoint_every=1", "train.keep_last=5", "optim.warmup_steps=1",
                 "optim.lr=1e-3", "vlm.train_encoder=true", *QUIET, *extra]  # fmt: skip
    train_vlm(load_config(ROOT / "configs/vlm-tiny-stage2.yaml", overrides, VLMConfig))
    a, b = (torch.load(p, weights_only=True)["model"] for p in sorted((out / "checkpoints").glob("*.pt")))
    return max((b[k] - a[k]).abs().max().item() for k in a if k.startswith("encoder."))


def test_unfrozen_encoder_moves_by_the_recipes_small_steps(parts, tmp_path):
    """AdamW's first steps move each weight by about its lr whatever the gradient: at the LM's lr the encoder jumps
    by ~1e-3 per weight; with the recipe (x 0.1, ramp over 50 steps) step 1 moves it by ~1e-3 x 0.1 x 2 / 50."""
    recipe = _encoder_step(parts, tmp_path / "recipe", "vlm.encoder_lr_mult=0.1", "vlm.encoder_warmup_steps=50")
    assert 0 < recipe <= 1.2 * 1e-3 * 0.1 * 2 / 50
    one_lr = _encoder_step(parts, tmp_path / "one")  # the defaults: as before the recipe existed
    assert one_lr > 0.5e-3
