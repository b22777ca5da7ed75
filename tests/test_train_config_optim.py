"""Run configs (YAML + overrides, typed, validated) and the optimizer (groups, schedule; decay: test_optim_decay.py)."""

import math

import pytest

import aimv2
from aimv2.config import ConfigError, load_config
from aimv2.train.optim import lr_at, param_groups


def test_yaml_plus_overrides_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("out_dir: a\nseed: 3\ntrain: {steps: 10, batch_size: 8}\noptim: {lr: 1e-3}\n")
    cfg = load_config(
        path, ["train.steps=20", "out_dir=b", "model.encoder_overrides.depth=2", "optim.betas=[0.9,0.99]"]
    )
    assert cfg.train.steps == 20 and cfg.out_dir == "b" and cfg.seed == 3
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.model.encoder_overrides == {"depth": 2}
    assert cfg.optim.betas == (0.9, 0.99)
    cfg.save(tmp_path / "saved.yaml")
    again = load_config(tmp_path / "saved.yaml")
    assert again == cfg


@pytest.mark.parametrize(
    "override,match",
    [
        ("train.stesp=3", r"unknown config key\(s\) \['train.stesp'\]"),
        ("train.steps=ten", "train.steps: expected an integer"),
        ("train.precision=fp8", "train.precision must be auto"),
        ("train.batch_size=10", "divisible by train.grad_accum"),
        ("trainsteps", "not of the form key=value"),
    ],
)
def test_bad_config_values_are_named(override, match):
    extra = ["train.grad_accum=4"] if "batch_size" in override else []
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override, *extra])


def test_missing_config_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_param_groups_no_decay_on_biases_norms_positions_bos():
    model = aimv2.create_pretraining_model("aimv2-tiny-patch8-64", vocab_size=20, depth=1, decoder_depth=1)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert {"encoder.pos_embed", "decoder.text_pos", "decoder.bos", "decoder.image_proj.bias"} <= nd
    assert all("norm" not in n for n in d)
    assert "encoder.blocks.0.attn.qkv.weight" in d and "decoder.tok_embed.weight" in d
    assert len(d) + len(nd) == len(list(model.parameters()))


def test_warmup_then_cosine():
    from aimv2.config import OptimConfig

    cfg = OptimConfig(lr=1e-3, init_lr=1e-6, min_lr=1e-5, warmup_steps=10)
    assert lr_at(0, 110, cfg) == pytest.approx(1e-6)
    assert lr_at(5, 110, cfg) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    assert lr_at(10, 110, cfg) == pytest.approx(1e-3)
    assert lr_at(60, 110, cfg) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert lr_at(110, 110, cfg) == pytest.approx(1e-5)
    lrs = [lr_at(s, 110, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    assert not any(math.isnan(x) for x in lrs)
