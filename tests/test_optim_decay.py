"""Weight decay in its two conventions, checked against torch's AdamW and a naive update; the sanity bound through
the command line; configs of the earlier version migrated (run folders) or refused (user files)."""

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, TINY_RUN, subprocess_env

import aimv2
from aimv2.config import ConfigError, OptimConfig, load_config
from aimv2.train.optim import build_optimizer, param_groups, set_lr

LEGACY = ROOT / "tests" / "data" / "legacy_runs"
TINY = ROOT / "configs" / "tiny-synthetic.yaml"


def _model():
    torch.manual_seed(0)
    return aimv2.create_pretraining_model("aimv2-tiny-patch8-64", vocab_size=20, depth=1, decoder_depth=1)


def _steps(model, opt, lrs, seed=1):
    """A few optimizer steps at the given lrs with the same random gradients."""
    gen = torch.Generator().manual_seed(seed)
    for lr in lrs:
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


def _torch_groups(model, wd):
    """torch.optim.AdamW's groups written out by hand: matrices decay, 1-D tensors and the named embeddings do not."""
    skip = ("pos_embed", "text_pos", "bos", "cls_token", "logit_scale")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and n.split(".")[-1] not in skip]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and n.split(".")[-1] not in skip)]
    return [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]


@pytest.mark.parametrize("fused", [True, False])
def test_weight_decay_is_torch_adamws(fused):
    """optim.weight_decay=0.05 is torch.optim.AdamW(weight_decay=0.05): same weights after steps at varying lr,
    to the bit against torch's fused kernel (the one we use) and to float rounding against its per-parameter loop."""
    ours, ref = _model(), _model()
    cfg = OptimConfig(lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95))
    opt = build_optimizer(ours, cfg)
    ref_opt = torch.optim.AdamW(_torch_groups(ref, 0.05), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, fused=fused)
    _steps(ours, opt, [1e-3, 4e-4, 1e-5])
    _steps(ref, ref_opt, [1e-3, 4e-4, 1e-5])
    tol = 0 if fused else 1e-6
    for (name, a), b in zip(ours.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize(("lr_t", "mult"), [(1e-3, 1.0), (2.5e-4, 1.0), (2.5e-4, 0.1)])
def test_the_two_conventions_shrink_by_hand(lr_t, mult):
    """With zero gradients only the decay moves a weight: p * (1 - lr_t * wd) for weight_decay, and
    p * (1 - wd * lr_t / lr_peak) for decoupled_weight_decay (naive formulas), both times the group's lr_mult."""
    lin = torch.nn.Linear(4, 4, bias=False)
    for cfg, shrink in [
        (OptimConfig(lr=1e-3, weight_decay=0.05, lr_mult={"weight": mult}), lr_t * mult * 0.05),
        (OptimConfig(lr=1e-3, decoupled_weight_decay=1e-4, lr_mult={"weight": mult}), 1e-4 * lr_t * mult / 1e-3),
    ]:
        opt = build_optimizer(lin, cfg)
        set_lr(opt, lr_t)
        before = lin.weight.detach().clone()
        lin.weight.grad = torch.zeros_like(lin.weight)
        opt.step()
        torch.testing.assert_close(lin.weight.detach(), before * (1 - shrink), rtol=1e-7, atol=0)


def test_decoupled_with_gradients_is_the_naive_update():
    """One step of decoupled decay with a gradient: Adam's first step (lr * sign(g)) after p * (1 - wd * lr_t / lr)."""
    lin = torch.nn.Linear(8, 8, bias=False)
    opt = build_optimizer(lin, OptimConfig(lr=1e-3, decoupled_weight_decay=1e-4, eps=1e-12))
    set_lr(opt, 5e-4)
    before = lin.weight.detach().clone()
    lin.weight.grad = torch.randn_like(before)
    opt.step()
    want = before * (1 - 1e-4 * 5e-4 / 1e-3) - 5e-4 * torch.sign(lin.weight.grad)  # bias-corrected m / sqrt(v)
    torch.testing.assert_close(lin.weight.detach(), want, rtol=1e-5, atol=1e-9)


def test_param_groups_take_torchs_value():
    model = _model()
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    return path


def test_user_configs():
    # no decay key, no marker: no boilerplate, the default
    assert load_config(None).optim.weight_decay == 0.1
    with pytest.raises(ConfigError, match="both set; keep one"):
        load_config(TINY, ["optim.decoupled_weight_decay=1e-4"])
    cfg = load_config(TINY, ["optim.weight_decay=null", "optim.decoupled_weight_decay=1e-4"])
    assert cfg.optim.weight_decay is None and cfg.optim.decoupled_weight_decay == 1e-4


def test_unmarked_user_file_with_weight_decay_is_refused_with_both_fixes(tmp_path):
    path = _write(tmp_path, "optim:\n  lr: 5.0e-4\n  weight_decay: 1.0e-4\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "\n" not in msg and "decoupled_weight_decay: 0.0001" in msg and "config_version: 2" in msg
    assert "weight_decay: 0.2 at lr 0.0005" in msg
    with pytest.raises(ConfigError, match=r"optim.weight_decay=0.05 without a 'config_version: 2' line; .* 5% of"):
        load_config(_write(tmp_path, "optim:\n  weight_decay: 0.05\n"))
    marked = _write(tmp_path, "config_version: 2\noptim:\n  weight_decay: 0.05\n")
    assert load_config(marked).optim.weight_decay == 0.05
    with pytest.raises(ConfigError, match="config_version=7 is not a config version"):
        load_config(_write(tmp_path, "config_version: 7\n"))


def test_unmarked_file_at_another_lr_is_told_the_default_changed(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        load_config(_write(tmp_path, "optim: {lr: 5.0e-4}\n"))
    assert "which at optim.lr=0.0005 is weight_decay=0.2" in caplog.text


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (
            ["optim.weight_decay=null", "optim.decoupled_weight_decay=0.05"],
            "optim.decoupled_weight_decay=0.05 shrinks weights by 5% a step at the peak lr (more than 1%); you "
            "probably meant optim.weight_decay: 0.05 (AdamW convention",
        ),
        (["optim.weight_decay=5"], "optim.weight_decay=5 at optim.lr=0.001 shrinks weights by 0.5% a step"),
    ],
)
def test_decay_bound_through_the_cli(overrides, says, tmp_path):
    argv = ["pretrain", str(TINY), f"out_dir={tmp_path / 'run'}", *TINY_RUN, *overrides]
    r = subprocess.run([sys.executable, "-m", "aimv2", *argv], capture_output=True, text=True, env=subprocess_env())
    assert r.returncode == 2, r.stderr[-3000:]
    assert len(r.stderr.strip().splitlines()) == 1 and says in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


def test_legacy_run_config_is_migrated_once_and_resumes(tmp_path, caplog):
    """The legacy folder's weight_decay 1e-4 was decoupled: the checkpoint its version wrote holds torch's
    1e-4 / lr = 0.1 in the decay group. Read today it is decoupled_weight_decay 1e-4 (torch's 0.1 again); the run
    resumes, and its saved config then carries the marker and is never migrated again."""
    from aimv2.train import train
    from aimv2.train.optim import adamw_weight_decay

    run = tmp_path / "aimv2"
    shutil.copytree(LEGACY / "aimv2", run)
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("LEGACY_AIMV2_RUN", str(run)))
    written_by_then = torch.load(run / "checkpoints/step_00000002.pt", weights_only=True)
    with caplog.at_level(logging.WARNING):
        cfg = load_config(run / "config.yaml", ["train.steps=3", "train.checkpoint_every=3"])
        load_config(run / "config.yaml")
    assert caplog.text.count("is read as optim.decoupled_weight_decay=0.0001") == 1
    assert (cfg.optim.weight_decay, cfg.optim.decoupled_weight_decay) == (None, 1e-4)
    assert adamw_weight_decay(cfg.optim) == written_by_then["optimizer"]["param_groups"][0]["weight_decay"]

    assert train(cfg)["step"] == 3
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["config_version"] == 2 and saved["optim"]["decoupled_weight_decay"] == 1e-4
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = load_config(run / "config.yaml")
    assert "read as" not in caplog.text and again.optim == cfg.optim
    # the same decay in the other convention is the same run: resuming with it is not refused
    assert (
        train(
            load_config(
                run / "config.yaml", ["train.steps=4", "optim.decoupled_weight_decay=null", "optim.weight_decay=0.1"]
            )
        )["step"]
        == 4
    )


def test_shipped_configs_train_as_before():
    """Every shipped config's decay is the one it had before the convention changed (its old decoupled value w is
    weight_decay w / lr now)."""
    old = {  # the values the files held before config_version 2 (decoupled)
        "tiny-synthetic": 1e-4,
        "native-tiny": 1e-4,
        "lit-tiny": 1e-4,
        "continue-tiny": 0.0,
        "highres-336": 0.0,
        "highres-448": 0.0,
        "vlm-tiny-stage1": 0.0,
        "vlm-tiny-stage2": 0.0,
    }
    from aimv2.train.optim import adamw_weight_decay

    for name, w in old.items():
        path = next(ROOT.glob(f"configs/**/{name}.yaml"))
        optim = yaml.safe_load(path.read_text())["optim"]
        cfg = OptimConfig(**{k: v for k, v in optim.items() if k != "lr_mult"})
        assert adamw_weight_decay(cfg) == pytest.approx(w / cfg.lr, rel=1e-12, abs=0), name
