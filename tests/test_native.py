"""Native-resolution training: per-step area distribution, token budget and aspect ratios, rank lockstep,
the objective on non-square sin-cos grids, exact micro-batch reweighting, and a short run that resumes exactly."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    NATIVE_RUN,
    ROOT,
    TORCHRUN_AIMV2,
    native_pretraining_model,
    native_stream,
    read_metrics,
    subprocess_env,
)
from PIL import Image
from safetensors.torch import load_file

import aimv2
from aimv2.config import ConfigError, load_config
from aimv2.data.transforms import native_max_side
from aimv2.objectives.aimv2 import patchify
from aimv2.train.native import NativeSchedule, fit_grid

P = 8


def _paper_schedule(seed=0):
    return NativeSchedule(seed=seed, min_patches=128, max_patches=4096, tokens_per_batch=262144, batch_multiple=8)


def test_area_distribution_budget_and_grids_at_paper_scale():
    sched = _paper_schedule()
    shapes = [sched(s) for s in range(3000)]
    areas = np.array([s.area for s in shapes])
    assert areas.min() >= 128 and areas.max() <= 4096
    n = (np.log2(areas) - 7) / 2.5 - 1  # back to the truncated normal's support [-1, 1]
    assert abs(np.median(np.log2(areas)) - 9.5) < 0.1  # median 2^9.5 ~ 724 patches
    # truncated normal(0, 1) on [-1, 1]: standard deviation 0.538, 0.439 of the mass in |n| > 0.5
    assert abs(n.std() - 0.538) < 0.03 and abs((np.abs(n) > 0.5).mean() - 0.439) < 0.04
    assert areas.min() < 140 and areas.max() > 3600  # the tails are reached
    for s in shapes:
        N = s.num_patches
        assert N <= s.area and N >= 0.8 * s.area  # the grid uses most of the drawn area
        assert s.batch_size % 8 == 0 and s.batch_size * N <= 262144  # the token budget ...
        assert s.batch_size * N > 262144 - 8 * N  # ... filled to within one batch quantum
        assert 0.5 * (1 - 1 / min(s.grid)) <= s.grid[0] / s.grid[1] <= 2 / (1 - 1 / min(s.grid))  # aspect in [1/2, 2]
        assert max(s.grid) * 14 <= native_max_side(4096, 2.0, 14)  # what NativeDecode may reduce JPEGs to
    # starts are the running sum of batch sizes, also across the draw blocks
    assert all(b.start == a.start + a.batch_size for a, b in zip(shapes, shapes[1:], strict=False))
    # a fresh schedule (a resumed run) gives the same shape at any step; another seed gives others
    assert NativeSchedule(**_kw(sched))(2500) == shapes[2500]
    other = _paper_schedule(seed=1)
    assert any(other(t).area != shapes[t].area for t in range(20))


def _kw(s):
    return dict(
        seed=s.seed,
        min_patches=s.min_patches,
        max_patches=s.max_patches,
        tokens_per_batch=s.tokens_per_batch,
        batch_multiple=s.batch_multiple,
    )


@pytest.mark.parametrize("area", [16, 45, 128, 724, 4096])
@pytest.mark.parametrize("aspect", [0.5, 0.75, 1.0, 1.6, 2.0])
def test_fit_grid_keeps_aspect_within_rounding(area, aspect):
    gh, gw = fit_grid(area, aspect)
    assert gh * gw <= area
    # one patch of rounding on either side
    assert (gh - 1) / (gw + 1) <= aspect <= (gh + 1) / max(gw - 1, 1e-9)


def test_native_fit_keeps_aspect_and_crops_only_the_overhang():
    from aimv2.data.transforms import native_fit

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (60, 120, 3), dtype=np.uint8))  # 1:2 (h:w)
    same = native_fit(img, (32, 64))  # same aspect: a plain resize
    ref = np.asarray(img.resize((64, 32), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    assert same.shape == (3, 32, 64) and np.abs(same.numpy().astype(int) - ref).max() <= 1
    sq = native_fit(img, (32, 32))  # square grid: the central square, undistorted
    ref = np.asarray(img.crop((30, 0, 90, 60)).resize((32, 32), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    assert sq.shape == (3, 32, 32) and np.abs(sq.numpy().astype(int) - ref).mean() < 2


def _stream(rank, world, *, start_step=0, steps=6, native_fn=None):
    def native(index, global_index, hw):
        return torch.full((3, *hw), index % 251, dtype=torch.uint8), f"caption {index}"

    sched = NativeSchedule(seed=3, min_patches=4, max_patches=16, tokens_per_batch=128, batch_multiple=4)
    return native_stream(sched, native_fn or native, rank, world, start_step=start_step, steps=steps)


def test_ranks_share_each_steps_area_but_not_images_or_prefixes():
    from torch.utils.data import DataLoader

    seen = {}
    for rank in range(2):
        for b in DataLoader(_stream(rank, 2), batch_size=None, num_workers=2):  # 2 workers: steps alternate
            seen[(rank, b.step)] = b
    single = {b.step: b for b in _stream(0, 1)}
    shapes = {tuple(b.images.shape[-2:]) for b in single.values()}
    assert len(shapes) > 1  # the grid changes across steps
    for step, b in single.items():
        r0, r1 = seen[(0, step)], seen[(1, step)]
        assert r0.images.shape == r1.images.shape  # lockstep: same grid and local batch on both ranks
        N = (b.images.shape[-2] // P) * (b.images.shape[-1] // P)
        assert len(b.indices) * N <= 128 and len(b.indices) % 4 == 0
        assert not set(r0.indices.tolist()) & set(r1.indices.tolist())  # different images
        assert not torch.equal(r0.prefix_len, r1.prefix_len)
        # the two ranks together are the single-process global batch (same samples, prefixes, pixels)
        assert torch.equal(b.indices, torch.cat([r0.indices, r1.indices]))
        assert torch.equal(b.prefix_len, torch.cat([r0.prefix_len, r1.prefix_len]))
        assert torch.equal(b.images, torch.cat([r0.images, r1.images]))
        assert ((b.prefix_len >= 1) & (b.prefix_len <= N - 1)).all()
    idx = torch.cat([single[s].indices for s in sorted(single)])
    assert torch.equal(idx, torch.arange(len(idx)))  # the stream is contiguous: no sample skipped or repeated
    for b in _stream(0, 1, start_step=3):  # resuming mid-stream continues exactly
        assert torch.equal(b.indices, single[b.step].indices) and torch.equal(b.images, single[b.step].images)


def test_synthetic_scenes_render_at_any_aspect():
    from aimv2.data.synthetic.dataset import synthetic_sample

    sq, cap = synthetic_sample(5, seed=1, size=48)
    sq2, cap2 = synthetic_sample(5, seed=1, size=(48, 48))
    assert cap == cap2 and np.array_equal(np.asarray(sq), np.asarray(sq2))  # square unchanged
    wide, cap3 = synthetic_sample(5, seed=1, size=(24, 64))
    assert cap3 == cap and wide.size == (64, 24)


@pytest.mark.parametrize("hw", [(16, 40), (40, 16)])
def test_objective_does_not_leak_on_non_square_sincos_grids(hw):
    """Perturbation and gradient checks of the native (sin-cos) model on wide and tall grids: the prediction of
    patch k+1 (at position k) sees the prefix and patches <= k, never patch k+1 or later."""
    model = native_pretraining_model()
    H, W = hw
    gw = W // P
    N = (H // P) * gw
    torch.manual_seed(1)
    images = torch.randn(1, 3, H, W, requires_grad=True)
    text = torch.randint(3, 50, (1, 5))
    M = 3
    pred = model(images, text, prefix_len=M).image_pred  # [1, N-1, P*P*3]
    for k in range(N - 1):
        (g,) = torch.autograd.grad(pred[0, k].sum(), images, retain_graph=True)
        reach = patchify(g, P).abs().sum(-1)[0] > 0  # [N]
        if k + 1 >= M:
            assert torch.equal(reach, torch.tensor([i < M or i <= k for i in range(N)])), k
    # perturbation: changing patch k+1 (row-major on the non-square grid) leaves predictions 0..k unchanged
    base = pred.detach()
    for j in sorted({j for j in (M, gw, gw + 1, 2 * gw, N - 1) if M <= j < N}):  # row starts included
        x = images.detach().clone()
        r, c = divmod(j, gw)
        x[..., r * P : (r + 1) * P, c * P : (c + 1) * P] += 3.0
        out = model(x, text, prefix_len=M).image_pred.detach()
        torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=1e-5)
        assert j == N - 1 or (out[:, j:] - base[:, j:]).abs().amax() > 1e-3  # later predictions do see it


def test_grad_accum_on_a_native_batch_gives_the_global_mean_gradient():
    """Micro-batches of a variable-size step, each divided by the whole step's valid counts, accumulate exactly the
    gradient of the plain model's mean loss over the whole step (``model(...).loss.backward()``)."""
    import contextlib

    from aimv2.data.transforms import normalize
    from aimv2.train.distributed import DistInfo
    from aimv2.train.trainer import train_step

    model = native_pretraining_model().train()
    torch.manual_seed(2)
    B, H, W = 12, 16, 40
    images = normalize(torch.randint(0, 256, (B, 3, H, W), dtype=torch.uint8), "imagenet", torch.device("cpu"))
    text = torch.randint(3, 50, (B, 6))
    text[::3, 3:] = 0  # uneven caption lengths: micro-batches hold different numbers of valid tokens
    prefix = torch.randint(1, (H // P) * (W // P), (B,))  # and different numbers of valid patches

    out = model(images, text, prefix_len=prefix)
    out.loss.backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    grid = torch.tensor([H // P, W // P]).expand(B, 2)  # read by per-image token batches only
    inputs = {"images": images, "text": text, "prefix_len": prefix, "grid_hw": grid}
    values = train_step(model, model, inputs, 3, DistInfo(), contextlib.nullcontext)
    torch.testing.assert_close(values["loss"], out.loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(values["image_loss"], out.image_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(values["text_loss"], out.text_loss.detach(), rtol=1e-5, atol=1e-6)
    for a, b in zip(reference, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    # a per-micro-batch mean (the naive accumulation) is measurably different here, so the test can fail
    model.zero_grad()
    for sl in (slice(0, 4), slice(4, 8), slice(8, 12)):
        (model(images[sl], text[sl], prefix_len=prefix[sl]).loss / 3).backward()
    naive = [p.grad.clone() for p in model.parameters()]
    assert (
        max(float((a - b).abs().max() / a.abs().max().clamp(min=1e-12)) for a, b in zip(reference, naive, strict=True))
        > 1e-3
    )


def _native_tar(path: Path, sizes: list[tuple[int, int]]) -> None:
    """A webdataset shard of JPEGs of the given (H, W) sizes: a colour gradient, so any crop or scaling shows."""
    import io

    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for i, (h, w) in enumerate(sizes):
            yy, xx = np.mgrid[0:h, 0:w]
            rgb = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, (37 * i) % 256)], -1).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
            sink.write({"__key__": f"{i:06d}", "jpg": buf.getvalue(), "txt": f"image {i}"})


def _shard_stream(url, rank, world, *, start_step=0, skip=None):
    from aimv2.data.sources.shards import ShardSamples
    from aimv2.data.transforms import NativeDecode, native_max_side
    from aimv2.train.data import ShardStepBatches

    sched = NativeSchedule(seed=3, min_patches=4, max_patches=16, tokens_per_batch=128, batch_multiple=4)
    reader = ShardSamples(url, rank=rank, world_size=world, with_position=True, skip=skip,
                          transform=NativeDecode(native_max_side(16, 2.0, P)))  # fmt: skip
    return sched, ShardStepBatches(
        [("shards", reader, 1.0)],
        global_batch=8,
        rank=rank,
        world_size=world,
        start_step=start_step,
        steps=5,
        encode_text=lambda caps: torch.ones(len(caps), 4, dtype=torch.long),
        seed=0,
        patch_size=P,
        native=sched,
    )


def test_native_batches_from_shards_follow_the_schedule_keep_aspect_and_resume(tmp_path):
    """Shards at native resolution: each step has the schedule's grid and batch on every rank, each image is its
    decoded file brought to the step's grid by native_fit (aspect kept, overhang cropped), and a stream resumed
    from a batch's saved position continues exactly."""
    from aimv2.data.transforms import native_fit

    sizes = [(40, 80), (80, 40), (64, 64), (48, 96), (56, 40)] * 40  # 200 images, several aspect ratios
    _native_tar(tmp_path / "a.tar", sizes)
    sched, stream = _shard_stream(tmp_path / "a.tar", 0, 1)
    batches = list(stream)
    assert len({tuple(b.images.shape[-2:]) for b in batches}) > 1  # the grid changes across steps
    files = [Image.open(io_bytes).convert("RGB") for io_bytes in _jpegs(tmp_path / "a.tar")]
    for b in batches:
        shape = sched(b.step)
        hw = (shape.grid[0] * P, shape.grid[1] * P)
        assert b.images.shape == (shape.batch_size, 3, *hw) and len(b.text) == shape.batch_size
        for img, pos in zip(b.images, b.indices.tolist(), strict=True):  # positions count from 1 in file order
            assert torch.equal(img, native_fit(files[pos - 1], hw))  # small files: decoded at full scale
    _native_tar(tmp_path / "b.tar", sizes)  # two shards: one per rank
    halves = [list(_shard_stream([tmp_path / "a.tar", tmp_path / "b.tar"], r, 2)[1]) for r in range(2)]
    for b0, b1, b in zip(*halves, batches, strict=True):
        assert b0.images.shape == b1.images.shape and 2 * len(b0.images) == len(b.images)  # lockstep
    resumed = list(_shard_stream(tmp_path / "a.tar", 0, 1, start_step=3, skip={0: batches[2].position["shards"]})[1])
    assert [b.step for b in resumed] == [3, 4]
    for a, b in zip(resumed, batches[3:], strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.indices, b.indices)


def _jpegs(tar: Path) -> list:
    import io
    import tarfile

    with tarfile.open(tar) as t:
        members = sorted((m for m in t.getmembers() if m.name.endswith(".jpg")), key=lambda m: m.name)
        return [io.BytesIO(t.extractfile(m).read()) for m in members]


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="tokens_per_batch"):
        load_config(ROOT / "configs/native-tiny.yaml", ["data.native.tokens_per_batch=100"])
    with pytest.raises(ConfigError, match="grad_accum"):
        load_config(ROOT / "configs/native-tiny.yaml", ["train.grad_accum=3"])
    from aimv2.train.sources import build_source

    cfg = load_config(ROOT / "configs/native-tiny.yaml", ["model.encoder=aimv2-tiny-patch8-64"])
    with pytest.raises(ConfigError, match="sin-cos"):
        build_source(cfg, None)


@pytest.mark.parametrize(
    ("source", "mode"), [("synthetic", "per_image"), ("shards", "per_image"), ("shards", "per_step")]
)
def test_short_native_run_trains_and_resumes_exactly(tmp_path, monkeypatch, source, mode):
    from aimv2.train import train, trainer

    data = []
    if source == "shards":  # the same run reading webdataset shards: the resumed streams continue exactly
        from aimv2.data.synthetic.shards import write_synthetic_shards

        write_synthetic_shards(tmp_path / "shards", 240, shard_size=60, size=48)
        data = ["data.source=shards", f"data.shards={tmp_path / 'shards'}", "data.shuffle_buffer=16"]

    def run(out):
        overrides = [*NATIVE_RUN, *data, f"data.native.mode={mode}", f"out_dir={out}"]
        return train(load_config(ROOT / "configs/native-tiny.yaml", overrides))

    run(tmp_path / "ref")

    class Killed(Exception):
        pass

    original = trainer.save_run_state

    def die_after_first(model, optimizer, out_dir, step, *a, **k):
        original(model, optimizer, out_dir, step, *a, **k)
        if step == 3:
            raise Killed

    monkeypatch.setattr(trainer, "save_run_state", die_after_first)
    with pytest.raises(Killed):
        run(tmp_path / "resumed")
    monkeypatch.setattr(trainer, "save_run_state", original)
    run(tmp_path / "resumed")  # resumes from step 3

    rows = [read_metrics(tmp_path / d) for d in ("ref", "resumed")]
    assert [r["step"] for r in rows[1]] == list(range(1, 7))
    for key in ("loss", "patches", "batch_size"):
        assert [r[key] for r in rows[0]] == [r[key] for r in rows[1]], key
    assert len({r["patches"] for r in rows[0]}) > 1  # the grid varied
    assert all(r["batch_size"] * r["patches"] <= 128 for r in rows[0])
    assert rows[0][-1]["loss"] < rows[0][0]["loss"]
    a, b = load_file(tmp_path / "ref/encoder.safetensors"), load_file(tmp_path / "resumed/encoder.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    enc = aimv2.create_model("aimv2-tiny-patch8-native", checkpoint=tmp_path / "ref/encoder.safetensors", depth=2)
    assert enc(torch.randn(1, 3, 24, 56)).shape == (1, 21, 192)  # any grid
    assert math.isfinite(rows[0][-1]["tokens_per_s"])


def test_extract_native_keeps_aspect_groups_by_shape_and_matches_the_encoder(tmp_path, capsys):
    from safetensors import safe_open

    from aimv2.cli import main
    from aimv2.data.transforms import native_resize, normalize

    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    sizes = {"a.png": (40, 90), "b.png": (90, 40), "c.png": (40, 88), "d.png": (64, 64)}  # (H, W)
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / name)
    (folder / "e.png").write_bytes(b"not an image")
    out = tmp_path / "f.safetensors"
    args = ["aimv2-tiny-patch8-native", str(folder), str(out), "--native", "--max-patches", "24"]
    common = ["--set", "depth=2", "--workers", "0", "--no-progress"]
    assert main(["extract", *args, *common]) == 0
    assert "warning: 1 of 5 images could not be read" in capsys.readouterr().err
    with safe_open(str(out), "pt") as f:
        feats, offsets, grids = f.get_tensor("features"), f.get_tensor("offsets"), f.get_tensor("grids")
        paths = json.loads(f.metadata()["paths"])
    assert paths == ["a.png", "b.png", "c.png", "d.png"]  # folder order, not grouped order
    torch.manual_seed(0)  # the command's random init is seeded with 0
    enc = aimv2.create_model("aimv2-tiny-patch8-native", depth=2).eval()
    for i, name in enumerate(paths):
        h, w = sizes[name]
        gh, gw = grids[i].tolist()
        assert gh * gw <= 24 and abs(math.log((gh / gw) / (h / w))) < 0.45  # aspect kept within a patch
        x, _ = native_resize(Image.open(folder / name), 24, P)
        with torch.no_grad():
            ref = enc(normalize(x[None]))[0]
        torch.testing.assert_close(feats[offsets[i] : offsets[i + 1]], ref, rtol=1e-4, atol=1e-4)
    assert grids[0].tolist() == grids[2].tolist() != grids[1].tolist()  # a and c share a batch shape
    pooled = tmp_path / "p.npy"
    assert main(["extract", *args[:2], str(pooled), "--native", "--max-patches", "24", "--pool", "mean", *common]) == 0
    assert np.load(pooled).shape == (4, 192)
    assert main(["extract", "aimv2-tiny-patch8-64", str(folder), str(tmp_path / "x.safetensors"), "--native"]) == 2


def test_probe_native_on_folders_of_mixed_aspect_ratios(tmp_path, capsys):
    from aimv2.cli import main
    from aimv2.data.synthetic.probes import probe_scene
    from aimv2.data.synthetic.scenes import render

    for split, n in (("train", 18), ("val", 9)):
        for i in range(n):
            spec, label = probe_scene("colour", split, i)
            hw = [(32, 64), (64, 32), (48, 48)][i % 3]
            (tmp_path / split / label).mkdir(parents=True, exist_ok=True)
            render(spec, hw).save(tmp_path / split / label / f"{i}.png")
    base = ["probe", "aimv2-tiny-patch8-native", "--train", str(tmp_path / "train"), "--val", str(tmp_path / "val")]
    common = ["--set", "depth=1", "--workers", "0", "--no-progress", "--native", "--max-patches", "16"]
    assert main([*base, "--method", "knn", "--k", "3", *common]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["native"] is True and result["max_patches"] == 16 and 0 <= result["top1"] <= 100
    assert "native, 3 grids" in out
    assert main([*base, "--method", "attentive", *common]) == 2  # needs token masks: refused with a reason
    assert "mean-pooled" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_native_training_matches_single_process(tmp_path):
    """2-process DDP (gloo), one grid per step: both ranks take the same grid and half of each step's varying batch;
    the global-batch losses and the weights match one process (per image: test_native_per_image.py)."""
    import subprocess
    import sys

    env = subprocess_env()
    args = [
        "pretrain",
        str(ROOT / "configs/native-tiny.yaml"),
        *NATIVE_RUN,
        "train.steps=3",
        "data.native.mode=per_step",
    ]
    single, multi = tmp_path / "single", tmp_path / "ddp"
    subprocess.run([sys.executable, "-m", "aimv2", *args, f"out_dir={single}"], env=env, check=True, timeout=300)
    r = subprocess.run(
        [*TORCHRUN_AIMV2, *args, f"out_dir={multi}"], env=env, capture_output=True, text=True, timeout=400
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [read_metrics(d) for d in (single, multi)]
    for s, m in zip(*rows, strict=True):
        assert (m["patches"], m["batch_size"]) == (s["patches"], s["batch_size"])
        for key in ("loss", "image_loss", "text_loss", "grad_norm"):
            assert m[key] == pytest.approx(s[key], rel=1e-5), (key, s, m)
    a, b = load_file(single / "encoder.safetensors"), load_file(multi / "encoder.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


def test_native_decode_reduces_big_jpegs_only_as_far_as_the_largest_step_allows():
    import io

    from aimv2.data.transforms import NativeDecode, native_fit, native_max_side

    yy, xx = np.mgrid[0:512, 0:1024]
    rgb = np.stack([xx * 255 // 1024, yy * 255 // 512, (xx + yy) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
    side = native_max_side(64, 2.0, P)  # 12 patches of 8 px: no step of max_patches=64, aspect <= 2 is taller or wider
    assert side == 96
    decoded = NativeDecode(side)(Image.open(io.BytesIO(buf.getvalue())))
    assert decoded.size == (256, 128)  # 1/4 scale: 128 >= 96, and 1/8 (64) would be too small
    full = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    for hw in [(96, 48), (48, 96), (64, 64)]:
        a, b = native_fit(decoded, hw).float(), native_fit(full, hw).float()
        assert (a - b).abs().mean() < 3  # the reduced decode only skips work
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, format="PNG")
    assert NativeDecode(side)(Image.open(png)).size == (1024, 512)  # no reduced decode outside JPEG
