"""The paper's baselines (captioning, AIMv1, CLIP, separate decoders): shapes, gradients, no leakage, the CLIP loss
against naive loops, and a 3-step `aimv2 pretrain` run of each objective."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN, TORCHRUN_AIMV2, perturb_from, read_metrics, subprocess_env

import aimv2
from aimv2.config import ConfigError, load_config
from aimv2.objectives import CLIPBaseline, GenerativeBaseline, create_baseline_model
from aimv2.objectives.aimv2 import AIMv2Pretrainer

ROOT = Path(__file__).resolve().parents[1]
P, V, EOS = 8, 50, 1
N = (32 // P) ** 2  # 16 patches of the 32 px test images
VARIANTS = {  # name: (objective, options)
    "cap-prefix": ("cap", {}),
    "cap-bidirectional": ("cap", {"encoder_attention": "bidirectional"}),
    "aimv1": ("aimv1", {}),
    "separate": ("aimv2", {"separate_decoders": True}),
    "clip-mean": ("clip", {}),
    "clip-attention": ("clip", {"clip_pool": "attention"}),
}


def _model(name):
    objective, kw = VARIANTS[name]
    torch.manual_seed(0)
    return create_baseline_model(
        objective,
        "aimv2-tiny-patch8-64",
        vocab_size=V,
        eos_id=EOS,
        encoder_overrides={"img_size": 32, "depth": 2},
        decoder_overrides={"depth": 2, "max_text_len": 8},
        **kw,
    ).eval()


def _batch(B=3, T=7):
    torch.manual_seed(1)
    images = torch.randn(B, 3, 32, 32)
    text = torch.randint(3, V, (B, T))
    text[:, 5] = EOS
    text[:, 6:] = 0  # right padding
    text[0, 3] = EOS
    text[0, 4:] = 0
    return images, text


@pytest.mark.parametrize("name", list(VARIANTS))
def test_shapes_finite_loss_and_every_parameter_gets_a_gradient(name):
    model = _model(name).train()
    images, text = _batch()
    objective = VARIANTS[name][0]
    prefix = torch.tensor([3, 9, 15])
    inputs = {"images": images, "text": text, "prefix_len": prefix}
    out = model(*[inputs[k] for k in model.input_names])
    means = out.terms.means()
    for part in ("image_loss", "text_loss"):  # every pretraining objective reports both (0 where it has none)
        assert means[part].ndim == 0 and torch.isfinite(means[part]), part
    # the counts the trainer all-reduces before the forward are the counts the forward reports
    counts = model.loss_counts(*[inputs[k] for k in model.input_names])
    assert {k: float(v) for k, v in counts.items()} == {k: float(v) for k, v in out.terms.counts.items()}
    if objective == "clip":
        assert float(counts["contrastive_loss"]) == 3 and float(counts["image_loss"]) == 0
    else:
        assert float(counts["text_loss"]) == (float((text != 0).sum()) if objective != "aimv1" else 0.0)
        image_targets = float((N - prefix).sum()) if objective == "aimv1" or name == "separate" else 0.0
        assert float(counts["image_loss"]) == image_targets
    pixels = objective == "aimv1" or name == "separate"
    words = objective == "cap" or name == "separate"
    if objective != "clip":
        assert (out.image_pred is not None) == pixels and (out.text_logits is not None) == words
    if pixels:
        assert out.image_pred.shape == (3, N - 1, P * P * 3) and means["image_loss"] > 0
    else:
        assert means["image_loss"].item() == 0.0  # a loss part the objective does not have: zero, so metrics keep keys
    if words:
        assert out.text_logits.shape == (3, 7, V) and means["text_loss"] > 0
    else:
        assert means["text_loss"].item() == 0.0
    if objective == "clip":
        assert out.image_embeds.shape == out.text_embeds.shape == (3, 192)
        torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(3))
    else:
        torch.testing.assert_close(out.loss, out.text_loss + model.alpha * out.image_loss)
        torch.testing.assert_close(out.loss, out.terms.loss())
        assert out.prefix_len.tolist() == ([N] * 3 if name == "cap-bidirectional" else [3, 9, 15])
    out.terms.loss().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing


@pytest.mark.parametrize("name", ["cap-prefix", "aimv1", "separate"])
def test_detached_predictions_leave_every_gradient_as_it_was(name):
    """predictions_keep_grad=False (what the trainer sets) detaches the returned predictions, not the loss."""
    model = _model(name)
    images, text = _batch()
    grads = {}
    for keep in (True, False):
        model.zero_grad(set_to_none=True)
        model.predictions_keep_grad = keep
        out = model(images, text, torch.tensor([3, 9, 15]))
        out.loss.backward()
        assert all(t.requires_grad == keep for t in (out.image_pred, out.text_logits) if t is not None)
        grads[keep] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys() and grads[True]
    assert all(torch.equal(g, grads[False][n]) for n, g in grads[True].items())


@pytest.mark.parametrize("name", ["cap-prefix", "cap-bidirectional", "separate"])
def test_caption_logits_ignore_current_and_later_tokens(name):
    model = _model(name)
    images, text = _batch()
    base = model(images, text, prefix_len=5).text_logits
    T = text.shape[1]
    for t in range(T):
        changed = text.clone()
        changed[:, t:] = torch.randint(3, V, (3, T - t))
        out = model(images, changed, prefix_len=5).text_logits
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-5)
        if t < T - 1:
            assert (out[:, t + 1 :] - base[:, t + 1 :]).abs().amax() > 1e-4  # later logits do read token t


def _features_seen_by_the_decoder(model, images, text, prefix_len):
    """The encoder features as the objective's own forward computes them (a hook on its encoder), so the test
    exercises how the baseline wires prefix_len into the encoder, not a call made by the test."""
    seen = []
    handle = model.encoder.register_forward_hook(lambda mod, args, out: seen.append(out.detach()))
    inputs = {"images": images, "text": text, "prefix_len": prefix_len}
    try:
        model(*[inputs[k] for k in model.input_names])
    finally:
        handle.remove()
    return seen[0]


def test_captioning_with_prefix_attention_keeps_prefix_features_blind_to_the_rest():
    model = _model("cap-prefix")
    images, text = _batch()
    M = 6
    prefix = torch.full((3,), M)
    base = _features_seen_by_the_decoder(model, images, text, prefix)
    out = _features_seen_by_the_decoder(model, perturb_from(images, M, P), text, prefix)
    torch.testing.assert_close(out[:, :M], base[:, :M], rtol=0, atol=1e-5)
    assert (out[:, M:] - base[:, M:]).abs().amax() > 1e-3
    # the bidirectional variant ignores the prefix it is given: every feature sees every patch
    bi = _model("cap-bidirectional")
    a = _features_seen_by_the_decoder(bi, images, text, prefix)
    b = _features_seen_by_the_decoder(bi, perturb_from(images, N - 1, P), text, prefix)
    assert ((a[:, 0] - b[:, 0]).abs().amax(-1) > 1e-4).all()


@pytest.mark.parametrize("name", ["aimv1", "separate"])
def test_patch_prediction_ignores_target_and_later_patches(name):
    """image_pred[:, j-1] (the prediction of patch j >= M) does not change when patches >= j change."""
    model = _model(name)
    images, text = _batch()
    M = 5
    prefix = torch.full((3,), M)
    base = model(images, text, prefix_len=prefix).image_pred
    for j in (M, M + 1, N // 2 + 1, N - 1):
        out = model(perturb_from(images, j, P), text, prefix_len=prefix).image_pred
        torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=1e-5)  # predictions of patches 1..j
        if j < N - 1:
            assert (out[:, j:] - base[:, j:]).abs().amax() > 1e-3  # later predictions do see patch j
    if name == "separate":  # pixel predictions never read the caption (their decoder has none)
        other = model(images, torch.randint(3, V, text.shape), prefix_len=prefix).image_pred
        torch.testing.assert_close(other, base, rtol=0, atol=0)


def _naive_clip_loss(img, txt, scale):
    B = img.shape[0]
    total = 0.0
    for i in range(B):  # image i against every caption, and caption i against every image
        i2t = [scale * float(img[i] @ txt[j]) for j in range(B)]
        t2i = [scale * float(txt[i] @ img[j]) for j in range(B)]
        for row in (i2t, t2i):
            total += -(row[i] - math.log(sum(math.exp(v) for v in row)))
    return total / (2 * B)


@pytest.mark.parametrize("name", ["clip-mean", "clip-attention"])
def test_clip_towers_and_loss_match_naive_loops_and_sharded_batches(name):
    model: CLIPBaseline = _model(name)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(20.0))
    images, text = _batch(B=4)
    with torch.no_grad():
        out = model(images, text)
    assert out.logit_scale.item() == pytest.approx(20.0)
    assert out.terms.loss().item() == pytest.approx(_naive_clip_loss(out.image_embeds, out.text_embeds, 20.0), rel=1e-5)
    # the image tower is bidirectional: the first patch's feature (and so the embedding) sees the last patch
    a = _features_seen_by_the_decoder(model, images, text, None)
    b = _features_seen_by_the_decoder(model, perturb_from(images, N - 1, P), text, None)
    assert ((a[:, 0] - b[:, 0]).abs().amax(-1) > 1e-4).all()
    # the text tower pools at the first EOS: tokens after it change nothing, a token before it does
    after, before = text.clone(), text.clone()
    after[0, 4:] = torch.randint(3, V, (text.shape[1] - 4,))  # row 0's first EOS is at 3
    before[0, 1] = (text[0, 1] + 1) % V
    torch.testing.assert_close(model(images, after).text_embeds, out.text_embeds, rtol=0, atol=1e-6)
    assert (model(images, before).text_embeds[0] - out.text_embeds[0]).abs().amax() > 1e-4
    # two ranks, as the trainer runs them: each scores its rows against the gathered batch through the objective's
    # gather hook; the sums over the ranks divided by the global count are the one-process loss
    sums = []
    for rank, rows in enumerate((slice(0, 2), slice(2, 4))):
        img, txt = out.image_embeds[rows], out.text_embeds[rows]

        def gather(x, img=img, rank=rank):  # what the all-gather returns on this rank: the whole batch, its offset
            return (out.image_embeds if torch.equal(x, img) else out.text_embeds), 2 * rank

        model.gather_rows = gather
        terms = model.loss_terms(img, txt, out.logit_scale)
        assert float(terms.counts["contrastive_loss"]) == 2
        sums.append(terms.sums["contrastive_loss"])
    model.gather_rows = None
    assert float(sum(sums) / 4) == pytest.approx(out.terms.loss().item(), rel=1e-6)
    from aimv2.objectives.lit import contrastive_loss

    halves = [
        contrastive_loss(out.image_embeds[s], out.text_embeds[s], out.logit_scale, out.image_embeds, out.text_embeds, o)
        for s, o in ((slice(0, 2), 0), (slice(2, 4), 2))
    ]
    assert float(sum(halves) / 2) == pytest.approx(out.terms.loss().item(), rel=1e-6)


def _config(tmp_path, *overrides):
    base = ROOT / "configs/tiny-synthetic.yaml"
    return load_config(base, [f"out_dir={tmp_path}", *overrides])


def test_config_selects_the_model_and_rejects_mismatches(tmp_path):
    from aimv2.objectives import build_model

    kw = dict(vocab_size=V, pad_id=0, eos_id=EOS)
    small = ["model.encoder_overrides={depth: 1, img_size: 32}", "model.decoder={depth: 1}"]
    assert type(build_model(_config(tmp_path, *small), **kw)) is AIMv2Pretrainer  # default: unchanged
    m = build_model(_config(tmp_path, *small, "model.objective=cap", "model.encoder_attention=bidirectional"), **kw)
    assert isinstance(m, GenerativeBaseline) and m.bidirectional and m.pixel_decoder is None
    m = build_model(_config(tmp_path, *small, "model.objective=clip", "model.clip.pool=attention"), **kw)
    assert isinstance(m, CLIPBaseline) and m.head is not None and m.text.cfg.eos_id == EOS
    for bad in (
        ["model.objective=mae"],
        ["model.objective=aimv1", "model.encoder_attention=bidirectional"],
        ["model.objective=clip", "model.encoder_attention=prefix"],
        ["model.objective=cap", "model.separate_decoders=true"],
        ["model.objective=clip", "train.grad_accum=2"],
    ):
        with pytest.raises(ConfigError):
            _config(tmp_path, *bad)


BASE = [*TINY_RUN, "train.steps=3"]
RUNS = {
    "cap-prefix": ["model.objective=cap"],
    "cap-bidirectional": ["model.objective=cap", "model.encoder_attention=bidirectional"],
    "aimv1": ["model.objective=aimv1"],
    "separate": ["model.separate_decoders=true"],
    "clip": ["model.objective=clip", "model.clip.text_size=tiny"],
}


@pytest.mark.parametrize("name", list(RUNS))
def test_three_step_pretrain_run(tmp_path, name):
    out = tmp_path / name
    cmd = [sys.executable, "-m", "aimv2", "pretrain", str(ROOT / "configs/tiny-synthetic.yaml"), *BASE, *RUNS[name]]
    env = subprocess_env()
    r = subprocess.run([*cmd, f"out_dir={out}"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_metrics(out)
    assert [row["step"] for row in rows] == [1, 2, 3]
    for row in rows:
        assert all(k in row for k in ("loss", "image_loss", "text_loss", "lr", "samples_per_s"))
        assert math.isfinite(row["loss"]) and row["loss"] > 0
    enc = aimv2.create_model("aimv2-tiny-patch8-64", checkpoint=out / "encoder.safetensors", depth=2, img_size=32)
    assert enc(torch.randn(1, 3, 32, 32)).shape == (1, N, 192)


@pytest.mark.slow
def test_clip_two_processes_train_like_one(tmp_path):
    """Under torchrun the embeddings are all-gathered: 2 ranks x 4 pairs train like 1 process x 8 pairs."""
    env = subprocess_env()
    args = ["pretrain", str(ROOT / "configs/tiny-synthetic.yaml"), *BASE, *RUNS["clip"]]
    single, multi = tmp_path / "single", tmp_path / "multi"
    subprocess.run([sys.executable, "-m", "aimv2", *args, f"out_dir={single}"], env=env, check=True, timeout=300)
    r = subprocess.run(
        [*TORCHRUN_AIMV2, *args, f"out_dir={multi}"], env=env, capture_output=True, text=True, timeout=400
    )
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = read_metrics(single), read_metrics(multi)
    for s, m in zip(a, b, strict=True):
        for key in ("loss", "grad_norm"):
            assert m[key] == pytest.approx(s[key], rel=1e-5), (key, s, m)


def test_ablate_grid_points_and_table9_preset():
    from aimv2.cli.ablate import grid_points

    points = grid_points(["alpha=0.2,0.6", "decoder.depth=1,2"])
    assert [n for n, _ in points] == [
        "alpha=0.2,depth=1",
        "alpha=0.2,depth=2",
        "alpha=0.6,depth=1",
        "alpha=0.6,depth=2",
    ]
    assert points[1][1] == ["model.alpha=0.2", "model.decoder.depth=2"]
    table9 = grid_points([], "table9")
    assert [n for n, _ in table9] == [
        "aimv1",
        "cap-bidirectional",
        "cap-prefix",
        "aimv2-alpha0.2",
        "aimv2-alpha0.4",
        "aimv2-alpha0.6",
        "clip",
    ]
    for _, overrides in table9:  # every preset point is a valid config
        load_config(ROOT / "configs/tiny-synthetic.yaml", overrides)


def test_ablate_tiny_grid_tabulates_and_resumes(tmp_path):
    out = tmp_path / "ablate"
    cmd = [sys.executable, "-m", "aimv2", "ablate", str(ROOT / "configs/tiny-synthetic.yaml")]
    cmd += [o for o in BASE if "steps" not in o]  # overrides for every point: after CONFIG, before the options
    cmd += ["--grid", "objective=aimv2,cap", "--seeds", "0", "--steps", "2", f"--out-dir={out}", "--probe-tasks=count"]
    cmd += ["--probe-train=16", "--probe-val=8", "--probe-epochs=1"]
    env = subprocess_env()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    table = json.loads((out / "ablation.json").read_text())
    assert list(table["points"]) == ["objective=aimv2", "objective=cap"]
    for row in table["points"].values():
        assert 0 <= row["count"]["mean"] <= 100 and row["count"]["std"] == 0.0 and row["seeds"] == [0]
    assert (out / "ablation.png").stat().st_size > 0 and "objective=cap" in (out / "ablation.md").read_text()
    assert (out / "objective=cap/seed0/encoder.safetensors").exists()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)  # finished: nothing is re-run
    assert r.returncode == 0 and r.stderr.count("done already") == 2, r.stderr[-3000:]
