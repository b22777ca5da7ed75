"""CapPa (``model.objective=cappa``): captioning where, in training, a share of the rows predicts the whole caption in
parallel from [MASK] inputs (big_vision's ``masked_pred_prob`` with ``masking_ratio`` 1). Tested: parallel rows read
nothing of the caption and see every text position; autoregressive rows stay causal; the share follows the
probability (0: cap exactly, 1: all parallel, eval: autoregressive); every parameter learns; a run resumes
bit-identically (the draws are keyed by the trainer's per-sample prefix draw and the caption); the ablation preset's
points are valid configs."""

import shutil

import pytest
import torch
from conftest import ROOT, TINY_RUN, read_metrics
from safetensors.torch import load_file

from aimv2.cli import main
from aimv2.cli.ablate import grid_points
from aimv2.config import load_config
from aimv2.objectives import create_baseline_model

V = 50


def model(prob=0.75):
    torch.manual_seed(0)
    return create_baseline_model(
        "cappa",
        "aimv2-tiny-patch8-64",
        vocab_size=V,
        encoder_overrides={"img_size": 32, "depth": 2},
        decoder_overrides={"depth": 2, "max_text_len": 8},
        encoder_attention="bidirectional",
        cappa_parallel_prob=prob,
    ).eval()


def batch(B=3, T=7):
    torch.manual_seed(1)
    return torch.randn(B, 3, 32, 32), torch.randint(3, V, (B, T))


def logits(m, images, text, parallel):
    feats = m.encoder(images)
    return m.text_decoder(feats, text, parallel=torch.full((len(text),), parallel))[1]


def test_parallel_rows_read_nothing_of_the_caption_and_see_every_position():
    m = model()
    images, text = batch()
    base = logits(m, images, text, True)
    other = logits(m, images, torch.randint(3, V, text.shape), True)
    torch.testing.assert_close(other, base, rtol=0, atol=1e-6)  # the caption is only the target
    with torch.no_grad():
        m.text_decoder.text_pos[:, 6] += 1.0  # the input of the last text position only
    moved = logits(m, images, text, True)
    assert (moved[:, 0] - base[:, 0]).abs().amax() > 1e-4  # the first position sees the last (bidirectional)
    ar_base = logits(m, images, text, False)
    with torch.no_grad():
        m.text_decoder.text_pos[:, 6] -= 1.0
    torch.testing.assert_close(logits(m, images, text, False)[:, :6], ar_base[:, :6], rtol=0, atol=1e-6)


def test_autoregressive_rows_stay_causal():
    m = model()
    images, text = batch()
    base = logits(m, images, text, False)
    for t in range(text.shape[1]):
        changed = text.clone()
        changed[:, t:] = torch.randint(3, V, changed[:, t:].shape)
        torch.testing.assert_close(logits(m, images, changed, False)[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-5)


def test_share_of_parallel_rows_follows_the_probability():
    images, text = batch()
    cap = create_baseline_model(
        "cap",
        "aimv2-tiny-patch8-64",
        vocab_size=V,
        encoder_overrides={"img_size": 32, "depth": 2},
        decoder_overrides={"depth": 2, "max_text_len": 8},
        encoder_attention="bidirectional",
    )
    m0 = model(0.0).train()
    cap.load_state_dict({k: v for k, v in m0.state_dict().items() if "mask_token" not in k})
    torch.testing.assert_close(m0(images, text).loss, cap.train()(images, text).loss, rtol=0, atol=0)  # 0: cap
    m1 = model(1.0).train()
    torch.testing.assert_close(m1(images, text).text_logits, logits(m1, images, text, True), rtol=0, atol=0)
    m1.eval()  # evaluation and captioning decode autoregressively
    torch.testing.assert_close(m1(images, text).text_logits, logits(m1, images, text, False), rtol=0, atol=0)
    half = model(0.5).train()
    g = torch.Generator().manual_seed(2)
    text, prefix = torch.randint(3, V, (400, 7), generator=g), torch.randint(1, 16, (400,), generator=g)
    rows = half.parallel_rows(text, prefix)
    share = rows.float().mean().item()
    assert torch.equal(half.parallel_rows(text, prefix), rows)  # keyed: the same samples draw the same
    assert 0.42 < share < 0.58  # 400 Bernoulli(0.5) draws: 3.2 standard deviations


def test_every_parameter_gets_a_gradient():
    m = model(0.5).train()
    torch.manual_seed(3)
    images, text = batch(B=8)
    m(images, text).loss.backward()  # rows of both kinds in this draw
    missing = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


def test_ablation_preset_and_bad_probability():
    points = grid_points([], "cappa")
    assert [n for n, _ in points] == ["cap-bidirectional", "cappa-bidirectional"]
    for _, overrides in points:
        load_config(ROOT / "configs/tiny-synthetic.yaml", overrides)
    with pytest.raises(Exception, match=r"model.cappa_parallel_prob must be in \[0, 1\]"):
        load_config(ROOT / "configs/tiny-synthetic.yaml", ["model.objective=cappa", "model.cappa_parallel_prob=1.5"])


def test_run_resumes_bit_identically(tmp_path):
    config = str(ROOT / "configs" / "tiny-synthetic.yaml")
    args = [*TINY_RUN, "model.objective=cappa", "train.steps=2", "train.checkpoint_every=1", "train.progress=false"]
    ref = tmp_path / "ref"
    assert main(["pretrain", config, *args, f"out_dir={ref}"]) == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(ref, resumed)
    (resumed / "checkpoints" / "step_00000002.pt").unlink()  # as if killed after the step-1 checkpoint
    (resumed / "encoder.safetensors").unlink()
    assert main(["pretrain", config, *args, f"out_dir={resumed}"]) == 0
    a, b = load_file(ref / "encoder.safetensors"), load_file(resumed / "encoder.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in read_metrics(ref)] == [r["loss"] for r in read_metrics(resumed)]
