"""`aimv2 pretrain --dry-run`: FLOPs against an analytic count and a full (not extrapolated) measurement, data
sources as they lie on disk, the ??? listing, and nothing written."""

import json
import tarfile

import pytest
import torch
from conftest import ROOT
from torch.utils.flop_counter import FlopCounterMode

from aimv2.cli import main
from aimv2.config.parse import resolve_config
from aimv2.train.dry_run import dry_run, step_flops_per_image

TINY = ROOT / "configs" / "tiny-synthetic.yaml"
LARGE = ROOT / "configs" / "paper" / "aimv2-large-224.yaml"


def analytic_flops(enc, dec, n: int, t: int, vocab: int) -> float:
    """Training FLOPs of one image of n patches and t text tokens, by hand: 6 x parameters x tokens for every matmul
    (forward 2, backward 4), but 4 for the patch embedding (the pixels need no gradient); and 14 x n^2 x width per
    attention layer: QK^T and AV forward (4), and a backward that recomputes the scores, as fused attention
    kernels do (10)."""
    e, d = enc.embed_dim, dec.embed_dim
    matmul = n * enc.depth * (4 * e * e + 3 * e * enc.mlp_hidden_dim)
    matmul += n * e * d  # image projection into the decoder
    matmul += (n + t) * dec.depth * (4 * d * d + 3 * d * dec.mlp_hidden_dim)
    matmul += (n - 1) * d * enc.patch_dim + t * d * vocab  # pixel and text heads
    attention = 14 * (enc.depth * n * n * e + dec.depth * (n + t) ** 2 * d)
    return 6 * matmul + 4 * n * enc.patch_dim * e + attention


@pytest.mark.parametrize("config", [TINY, LARGE])
def test_flops_per_step_match_the_analytic_count(config):
    """Within 0.1%: the analytic count leaves out only norms, activations, biases and the loss (elementwise work),
    which FlopCounterMode does not count either."""
    r = dry_run(config)
    cfg, _ = resolve_config(config)
    from aimv2.models.decoder import default_decoder_config
    from aimv2.models.registry import model_config, model_size

    enc = model_config(cfg.model.encoder, **cfg.model.encoder_overrides)
    dec = default_decoder_config(model_size(cfg.model.encoder), **cfg.model.decoder)
    vocab = 32000 if cfg.data.tokenizer else _builtin_vocab(cfg)  # the paper configs' tokenizer is ??? (SigLIP's)
    n = enc.grid_size[0] * enc.grid_size[1]
    want = cfg.train.batch_size * analytic_flops(enc, dec, n, cfg.data.context_length, vocab)
    assert r.flops_per_step[0] == r.flops_per_step[1]
    assert r.flops_per_step[0] == pytest.approx(want, rel=1e-3)


def _builtin_vocab(cfg) -> int:
    from aimv2.data.tokenizer import default_synthetic_tokenizer

    return default_synthetic_tokenizer(cfg.data.context_length).vocab_size


def test_depth_extrapolation_equals_counting_the_whole_model():
    """The dry run measures 1- and 2-block models and extrapolates; counting the whole tiny model (6 encoder and 3
    decoder blocks) forward and backward on real tensors gives the same number exactly."""
    from aimv2.objectives.build import build_model
    from aimv2.train.dry_run import ATTENTION_FLOPS

    cfg, _ = resolve_config(TINY)
    vocab = _builtin_vocab(cfg)
    model = build_model(cfg, vocab_size=vocab, pad_id=0, eos_id=1)
    images, text = torch.zeros(1, 3, 64, 64), torch.ones(1, cfg.data.context_length, dtype=torch.long)
    with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as counter:
        model(images, text).loss.backward()
    assert step_flops_per_image(cfg, vocab, (8, 8), model.decoder.cfg.depth) == counter.get_total_flops()


def test_native_config_reports_the_range_of_areas():
    r = dry_run(ROOT / "configs" / "paper" / "native.yaml")
    assert "16,384 images of 128 patches to 512 images of 4,096 patches" in r.global_batch
    lo, hi = r.flops_per_step
    assert lo < hi < 1.5 * lo  # the same tokens a step; attention grows with the area
    assert r.unresolved == ["model.init_from", "data.shards", "data.tokenizer"]


def _shards(folder, n_written: int, with_stats: bool):
    folder.mkdir()
    for i in range(n_written):
        with tarfile.open(folder / f"{i:03d}.tar", "w"):
            pass
        if with_stats:
            (folder / f"{i:03d}_stats.json").write_text(json.dumps({"successes": 1000}))


def test_data_sources_and_steps_per_epoch(tmp_path):
    _shards(tmp_path / "a", 3, with_stats=True)
    _shards(tmp_path / "b", 2, with_stats=False)
    mixture = (
        f'data.mixture=[{{name: a, shards: "{tmp_path}/a/{{000..003}}.tar", weight: 3}}, '
        f'{{name: b, shards: "{tmp_path}/b", weight: 1}}]'
    )
    r = dry_run(LARGE, [mixture, "data.tokenizer=null", "train.batch_size=100"])
    a, b = r.sources
    assert (a.name, a.weight, a.shards, a.present, a.samples) == ("a", 0.75, 4, 3, None)  # one shard missing
    assert (b.shards, b.present, b.samples) == (2, 2, None) and r.unresolved == []
    assert r.steps_per_epoch.startswith("unknown")
    one = f'data.mixture=[{{name: a, shards: "{tmp_path}/a/{{000..002}}.tar"}}]'
    r = dry_run(LARGE, [one, "data.tokenizer=null", "train.batch_size=100"])
    assert r.sources[0].samples == 3000 and r.steps_per_epoch == "30 (3,000 samples)"
    two = (
        f'data.mixture=[{{name: a, shards: "{tmp_path}/a/{{000..002}}.tar", weight: 3}}, '
        f'{{name: a2, shards: "{tmp_path}/a/{{000..001}}.tar", weight: 1}}]'
    )
    r = dry_run(LARGE, [two, "data.tokenizer=null", "train.batch_size=100"])
    assert r.steps_per_epoch == "a: 40; a2: 80 (steps to draw each source's samples once, by weight)"
    r = dry_run(TINY, ["data.synthetic_length=1000"])
    assert r.steps_per_epoch == "16 (1,000 samples)"
    assert dry_run(TINY).steps_per_epoch.startswith("unknown (set data.synthetic_length=N")


def test_cli_dry_run_lists_what_is_missing_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", str(LARGE), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "(???) give each as key=value" in out and "data.mixture.0.shards, data.mixture.1.shards" in out
    assert "data.mixture.4.shards, data.tokenizer\n" in out
    assert "encoder 309.2M (309,197,824)" in out  # timm's aimv2_large_patch14_224 (tests/test_paper_configs.py)
    assert "global batch 8,192 images of 256 patches" in out and "1,464,844 steps; warmup 12,500" in out
    assert "decoupled 0.0001 (torch AdamW's 0.1 at the peak lr)" in out
    assert list(tmp_path.iterdir()) == []  # no out_dir, no lock


def test_help_teaches_dry_run(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = capsys.readouterr().out
    assert "--dry-run" in out and "configs/paper/" in out and "decoupled_weight_decay" in out
