"""Native resolution with every image at its own aspect ratio (data.native.mode=per_image): images of different grids
share a batch as patch tokens padded to the step's area. No image's outputs depend on another image or on the
padding (perturbation and gradient reach through the objective's own forward); each row equals the plain dense path
on that image alone; grids keep each image's aspect ratio and the step's token budget; legacy run folders resume
per step; grad accumulation, 2-process DDP and a kill -9 resume give the same run."""

import contextlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import NATIVE_RUN, ROOT, native_pretraining_model, native_stream, read_metrics, subprocess_env
from PIL import Image
from safetensors.torch import load_file

from aimv2.config import ConfigError, load_config
from aimv2.objectives.aimv2 import patchify
from aimv2.train.data import pack_patches
from aimv2.train.native import NativeSchedule, fit_grid

P = 8
GRIDS = [(2, 5), (4, 3), (3, 3), (1, 7)]  # wide, tall, square, a strip: 10, 12, 9, 7 patches
AREA = 13  # every image padded to 13 tokens


def _batch(seed=1):
    """Images [1, 3, gh*p, gw*p] of GRIDS, their patch tokens padded to AREA (padding: noise, not zeros, so a leak
    would show), grids, captions of uneven length, prefixes."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(1, 3, gh * P, gw * P, generator=g) for gh, gw in GRIDS]
    tokens = 3 * torch.randn(len(GRIDS), AREA, P * P * 3, generator=g)  # padding content
    for b, x in enumerate(images):
        tokens[b, : x.shape[-2] // P * (x.shape[-1] // P)] = patchify(x, P)[0]
    text = torch.randint(3, 50, (len(GRIDS), 6), generator=g)
    text[1, 4:] = 0
    return images, tokens, torch.tensor(GRIDS), text, torch.tensor([3, 5, 1, 6])


def _real(b: int) -> int:
    return GRIDS[b][0] * GRIDS[b][1]


def test_each_row_equals_its_image_alone_on_the_dense_path():
    """Encoder features, patch predictions, caption logits and loss terms of every row equal the existing
    ``encoder(pixels)`` / ``model(pixels, ...)`` on that image alone at its own grid (a naive reference)."""
    model = native_pretraining_model()
    images, tokens, grids, text, prefix = _batch()
    with torch.no_grad():
        out = model(tokens, text, prefix, grids)
        feats = model.encoder.forward_tokens(tokens, grids, prefix)
        full = model.encoder.forward_tokens(tokens, grids)  # inference: full attention over each image's own patches
        sums = {"image_loss": 0.0, "text_loss": 0.0}
        counts = {"image_loss": 0.0, "text_loss": 0.0}
        for b, x in enumerate(images):
            n = _real(b)
            alone = model(x, text[b : b + 1], prefix[b : b + 1])
            torch.testing.assert_close(feats[b, :n], model.encoder(x, prefix[b : b + 1])[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(full[b, :n], model.encoder(x)[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(out.image_pred[b, : n - 1], alone.image_pred[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(out.text_logits[b], alone.text_logits[0], rtol=0, atol=1e-5)
            for k in sums:
                sums[k] += float(alone.terms.sums[k])
                counts[k] += float(alone.terms.counts[k])
    for k in sums:  # the batch's loss parts are the images' own, summed: padding adds no target and no error
        assert float(out.terms.sums[k]) == pytest.approx(sums[k], rel=1e-5)
        assert float(out.terms.counts[k]) == counts[k]
    assert float(out.terms.counts["image_loss"]) == sum(_real(b) - int(prefix[b]) for b in range(len(GRIDS)))
    assert {k: float(v) for k, v in model.loss_counts(tokens, text, prefix, grids).items()} == counts


def test_no_row_sees_another_image_or_the_padding():
    """Perturbation: changing image j or any padding leaves every other row's outputs exactly as they were.
    Gradient reach: d(outputs of row i) / d(tokens of row j) == 0 for j != i, and the loss has no gradient at
    padding; within a row, prediction k reaches the prefix and patches <= k only."""
    model = native_pretraining_model()
    _, tokens, grids, text, prefix = _batch()
    base = model(tokens, text, prefix, grids)

    def row_outputs(out, b):
        return torch.cat([out.image_pred[b, : _real(b) - 1].flatten(), out.text_logits[b].flatten()])

    for j in range(len(GRIDS)):
        x = tokens.clone()
        x[j, : _real(j)] += 2.0  # change image j
        x[:, AREA - 1] = 7.0  # and the last padding token of every row (row 2 and 3 have several)
        out = model(x, text, prefix, grids)
        for i in range(len(GRIDS)):
            same = torch.equal(row_outputs(out, i), row_outputs(base, i))
            assert same == (i != j), (i, j)  # exactly equal, not just close: no path at all

    x = tokens.clone().requires_grad_(True)
    out = model(x, text, prefix, grids)
    (g,) = torch.autograd.grad(out.loss, x, retain_graph=True)
    for b in range(len(GRIDS)):
        assert g[b, _real(b) :].abs().max() == 0  # the padding of every row
        assert g[b, : _real(b)].abs().max() > 0
    for i in range(len(GRIDS)):
        (g,) = torch.autograd.grad(row_outputs(out, i).sum(), x, retain_graph=True)
        reach = g.abs().sum(-1) > 0  # [B, AREA]
        assert reach[i, : _real(i)].all() and reach.sum() == _real(i), i  # its own real patches, nothing else
    i, M = 1, int(prefix[1])  # within a row: the prefix-causal rule over the image's own raster order
    for k in range(M - 1, _real(i) - 1):
        (g,) = torch.autograd.grad(out.image_pred[i, k].sum(), x, retain_graph=True)
        reach = (g[i].abs().sum(-1) > 0).tolist()
        assert reach == [j < M or j <= k for j in range(AREA)] and (g[[0, 2, 3]] == 0).all(), k


def test_grad_accum_on_a_padded_batch_gives_the_global_mean_gradient():
    """Micro-batches of padded rows, each divided by the whole batch's real-target counts, add up to the gradient of
    the model's mean loss over the whole batch (the trainer's contract, with padding in it)."""
    from aimv2.train.distributed import DistInfo
    from aimv2.train.trainer import train_step

    model = native_pretraining_model().train()
    _, tokens, grids, text, prefix = _batch(seed=4)
    out = model(tokens, text, prefix, grids)
    out.loss.backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    inputs = {"images": tokens, "text": text, "prefix_len": prefix, "grid_hw": grids}
    values = train_step(model, model, inputs, 2, DistInfo(), contextlib.nullcontext)
    torch.testing.assert_close(values["loss"], out.loss.detach(), rtol=1e-5, atol=1e-6)
    for a, b in zip(reference, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def _within_one_patch(grid, aspect):
    """A box of exactly ``aspect`` (height / width) lies within one patch of the grid on both sides."""
    gh, gw = grid
    return (gh - 1) / (gw + 1) <= aspect <= (gh + 1) / max(gw - 1, 1e-9)


def _stream(rank, world, native_fn, *, start_step=0, steps=8):
    sched = NativeSchedule(
        seed=3, min_patches=4, max_patches=32, tokens_per_batch=256, batch_multiple=4, mode="per_image"
    )
    return native_stream(sched, native_fn, rank, world, start_step=start_step, steps=steps), sched


class _Photos:
    """A folder-like source: PIL images of several aspect ratios (a gradient, so a crop shows), fitted as
    train/sources.py's _NativeFit does."""

    SIZES = [(90, 40), (40, 90), (64, 64), (30, 100), (75, 50)]  # (H, W)

    def __call__(self, index, global_index, hw):
        from aimv2.train.sources import _NativeFit

        H, W = self.SIZES[index % len(self.SIZES)]
        ramp = np.linspace(0, 255, W, dtype=np.uint8)[None, :, None].repeat(H, 0).repeat(3, 2)
        return _NativeFit(lambda i: (Image.fromarray(ramp), f"photo {i}"))(index, global_index, hw)


@pytest.mark.parametrize("data", ["scenes", "photos"])
def test_every_image_keeps_its_aspect_and_each_step_its_token_budget(data):
    from aimv2.train.sources import _NativeSynthetic

    native_fn = _NativeSynthetic(seed=0) if data == "scenes" else _Photos()
    single, sched = _stream(0, 1, native_fn)
    batches = {b.step: b for b in single}
    areas, pad = set(), []
    for step, b in batches.items():
        shape = sched(step)
        A = shape.area
        areas.add(A)
        assert b.images.shape[:2] == (shape.batch_size, A) and b.images.dtype == torch.uint8
        assert shape.batch_size * A <= 256 and shape.batch_size % 4 == 0  # the budget, padding included
        n = b.grid_hw.prod(1)
        assert (n <= A).all() and (n >= 2).all()
        assert ((b.prefix_len >= 1) & (b.prefix_len <= n - 1)).all()  # prefixes over each image's own patches
        for k, i in enumerate(b.indices.tolist()):
            H, W = _Photos.SIZES[i % len(_Photos.SIZES)]  # length=None: the dataset index is the global index
            aspect = sched.image_aspect(i) if data == "scenes" else H / W
            grid = tuple(b.grid_hw[k].tolist())
            assert _within_one_patch(grid, aspect), (grid, aspect)
            assert grid == fit_grid(A, aspect)  # the largest grid of that ratio within the area
            assert (b.images[k, n[k] :] == 0).all()  # padding after the image's own patches
        pad.append(1 - float(n.sum()) / (len(n) * A))
    assert len(areas) > 1 and len({tuple(g) for b in batches.values() for g in b.grid_hw.tolist()}) > 3
    assert 0 <= np.mean(pad) < 0.25
    # 2 ranks: same area per step, halves of the one-process batch (images, grids, prefixes), resumable mid-stream
    ranks = [{b.step: b for b in _stream(r, 2, native_fn)[0]} for r in range(2)]
    for step, b in batches.items():
        r0, r1 = ranks[0][step], ranks[1][step]
        for field in ("images", "grid_hw", "prefix_len", "indices"):
            assert torch.equal(getattr(b, field), torch.cat([getattr(r0, field), getattr(r1, field)])), field
    for b in _stream(0, 1, native_fn, start_step=5)[0]:
        assert torch.equal(b.images, batches[b.step].images) and torch.equal(b.grid_hw, batches[b.step].grid_hw)


def test_pack_patches_is_patchify_padded():
    imgs = [torch.randint(0, 255, (3, gh * P, gw * P), dtype=torch.uint8) for gh, gw in GRIDS]
    tokens, grids = pack_patches(imgs, AREA, P)
    assert grids.tolist() == [list(g) for g in GRIDS]
    for b, img in enumerate(imgs):
        assert torch.equal(tokens[b, : _real(b)], patchify(img[None], P)[0]) and (tokens[b, _real(b) :] == 0).all()
    with pytest.raises(ValueError, match="at most 8 patches"):
        pack_patches(imgs, 8, P)


def test_normalize_patch_tokens_matches_normalizing_the_pixels():
    from aimv2.data.transforms import normalize

    imgs = torch.randint(0, 256, (2, 3, 16, 24), dtype=torch.uint8)
    want = patchify(normalize(imgs, "clip"), P)
    torch.testing.assert_close(normalize(patchify(imgs, P), "clip"), want, rtol=0, atol=1e-6)


def test_paper_scale_budget_per_image():
    sched = NativeSchedule(
        seed=0, min_patches=128, max_patches=4096, tokens_per_batch=262144, batch_multiple=8, mode="per_image"
    )
    for s in range(0, 3000, 7):
        shape = sched(s)
        assert shape.num_patches == shape.area
        assert 262144 - 8 * shape.area < shape.batch_size * shape.area <= 262144


# ----------------------------------------------------------------------------------------------- runs
def _train(out: Path, *extra: str, path=ROOT / "configs/native-tiny.yaml"):
    from aimv2.train import train

    return train(load_config(path, [*NATIVE_RUN, f"out_dir={out}", *extra]))


def test_a_run_folder_written_before_the_mode_key_resumes_per_step(tmp_path):
    """A folder whose config.yaml has data.native without ``mode`` (every folder written before it existed) resumes
    with one grid per step, exactly as it was trained; a new run without the key is per image."""
    _train(tmp_path / "ref", "data.native.mode=per_step")
    old = tmp_path / "old"
    _train(old, "data.native.mode=per_step", "train.steps=3")
    cfg = yaml.safe_load((old / "config.yaml").read_text())
    del cfg["data"]["native"]["mode"]  # as an earlier version wrote it
    (old / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    _train(old, path=old / "config.yaml")  # resume from the folder's own config, 3 -> 6
    ref, resumed = read_metrics(tmp_path / "ref"), read_metrics(old)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for key in ("loss", "patches", "batch_size"):
        assert [r[key] for r in resumed] == [r[key] for r in ref], key
    assert yaml.safe_load((old / "config.yaml").read_text())["data"]["native"]["mode"] == "per_step"  # migrated
    _train(tmp_path / "new", "train.steps=1")
    assert yaml.safe_load((tmp_path / "new/config.yaml").read_text())["data"]["native"]["mode"] == "per_image"
    with pytest.raises(Exception, match="data.native"):  # resuming the per-step folder per image would mix two runs
        _train(old, "data.native.mode=per_image", "train.steps=7")


def test_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match="data.native.mode=per_step"):
        load_config(ROOT / "configs/native-tiny.yaml", ["model.objective=cap"])
    with pytest.raises(ConfigError, match="per_image or per_step"):
        load_config(ROOT / "configs/native-tiny.yaml", ["data.native.mode=sometimes"])
    load_config(ROOT / "configs/native-tiny.yaml", ["model.objective=cap", "data.native.mode=per_step"])


def _cli(out: Path, *extra: str, env=None, nproc=1) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "aimv2"]
    if nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"]
        launch.append("aimv2")
    cmd = [*launch, "pretrain", str(ROOT / "configs/native-tiny.yaml"), *NATIVE_RUN, f"out_dir={out}", *extra]
    return subprocess.run(cmd, env={**subprocess_env(), **(env or {})}, capture_output=True, text=True, timeout=400)


@pytest.mark.slow
def test_kill_9_mid_run_resumes_bit_identically(tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert _cli(ref).returncode == 0
    r = _cli(killed, env={"AIMV2_CRASH_AT": "before-export:3"})  # exits like kill -9 after the step-3 checkpoint
    assert r.returncode == 137, r.stderr[-2000:]
    r = _cli(killed)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = read_metrics(ref), read_metrics(killed)
    assert [r["step"] for r in b] == list(range(1, 7))
    for key in ("loss", "image_loss", "text_loss", "grad_norm", "patches", "batch_size"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    wa, wb = load_file(ref / "encoder.safetensors"), load_file(killed / "encoder.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_two_process_per_image_training_matches_single_process(tmp_path):
    """2-process DDP (gloo): both ranks take the step's area and half of its images (each at its own grid); the
    global-batch losses and the weights match one process."""
    single, multi = tmp_path / "single", tmp_path / "ddp"
    assert _cli(single, "train.steps=3").returncode == 0
    r = _cli(multi, "train.steps=3", nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    for s, m in zip(read_metrics(single), read_metrics(multi), strict=True):
        assert (m["patches"], m["batch_size"], m["tokens_per_s"] > 0) == (s["patches"], s["batch_size"], True)
        for key in ("loss", "image_loss", "text_loss", "grad_norm"):
            assert m[key] == pytest.approx(s[key], rel=1e-5), (key, s, m)
    a, b = load_file(single / "encoder.safetensors"), load_file(multi / "encoder.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
