"""The fast training decode (JPEG draft mode) keeps quality and seeding; native-resolution resizing keeps budgets."""

from __future__ import annotations

import io
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

from aimv2.data.sources.shards import ShardSamples
from aimv2.data.transforms import TrainTransform, native_resize, train_transform


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth-ish RGB image with some detail (gradients plus blurred noise), like a photo more than noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(x / 37 + c) * np.cos(y / 23 - c) for c in range(3)], -1)  # [h, w, 3]
    small = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    noise = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    return Image.fromarray(np.clip(0.7 * base + 0.3 * noise, 0, 255).astype(np.uint8))


def _encode(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _run(transform, data: bytes, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    with Image.open(io.BytesIO(data)) as img:
        return transform(img)


def test_draft_decode_is_close_to_full_decode_and_faster():
    data = _encode(_photo(2048, 1536))
    fast, full = TrainTransform(224), TrainTransform(224, draft=False)
    diffs = []
    for seed in range(12):
        a, b = _run(fast, data, seed), _run(full, data, seed)  # uint8 [3, 224, 224] each, same crop and flip
        assert a.shape == b.shape == (3, 224, 224) and a.dtype == torch.uint8
        diffs.append((a.float() - b.float()).abs().mean().item())
    assert np.mean(diffs) < 3.0, diffs  # on average < 3/255
    assert max(diffs) < 6.0, diffs

    def timed(t) -> float:
        start = time.perf_counter()
        for seed in range(6):
            _run(t, data, seed)
        return time.perf_counter() - start

    timed(fast), timed(full)
    assert timed(fast) < 0.75 * timed(full)


def test_without_draft_matches_plain_pipeline_params():
    """Same seed -> same crop box and flip as torchvision's pipeline (the only difference is the border filter)."""
    data = _encode(_photo(640, 480))
    ours, plain = TrainTransform(64, draft=False), train_transform(64)
    for seed in range(5):
        a = _run(ours, data, seed).float()
        b = _run(plain, data, seed).float()
        assert (a - b).abs().mean() < 2.0


def test_draft_scale_never_upsamples():
    t = TrainTransform(224)
    assert t.draft_scale((2000, 1800)) == 8
    assert t.draft_scale((900, 2000)) == 4
    assert t.draft_scale((447, 1000)) == 1
    assert t.draft_scale((448, 448)) == 2


def test_non_jpeg_is_unchanged_and_modes_apply():
    img = _photo(300, 200).convert("RGBA")
    img.putalpha(0)  # fully transparent: must come out white, as to_rgb does
    data = _encode(img, "PNG")
    a, b = _run(TrainTransform(32), data, 3), _run(train_transform(32), data, 3)
    assert torch.equal(a, b)
    assert (a == 255).all()
    gray = _encode(_photo(800, 600).convert("L"))  # a greyscale JPEG: drafted, still 3 channels
    out = _run(TrainTransform(32), gray, 0)
    assert out.shape == (3, 32, 32) and torch.equal(out[0], out[1])


def _shard(tmp_path, images: list[bytes]) -> str:
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        for i, data in enumerate(images):
            for ext, payload in (("jpg", data), ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return str(path)


def test_shard_reader_hands_undecoded_image_and_counts_corrupt_jpegs(tmp_path):
    good = _encode(_photo(1024, 768))
    truncated = good[: len(good) // 3]
    garbage = b"\xff\xd8\xff\xe0" + b"not a jpeg" * 20
    shard = _shard(tmp_path, [good, truncated, garbage, good])
    ds = ShardSamples(shard, transform=TrainTransform(64), max_fault_rate=0.9)
    out = list(ds)
    assert [key.rsplit(":", 1)[1] for _, _, key in out] == ["000000", "000003"]
    assert all(img.shape == (3, 64, 64) and img.dtype == torch.uint8 for img, _, _ in out)
    assert ds.faults.counts["bad_image"] == 2


@pytest.mark.parametrize("wh", [(640, 480), (480, 640), (1000, 100), (100, 1000), (37, 53), (4000, 3000), (224, 224)])
@pytest.mark.parametrize("area,p", [(256, 14), (196, 16), (64, 8), (1, 14)])
def test_native_resize_budget_aspect_and_multiples(wh, area, p):
    w, h = wh
    out, info = native_resize(Image.new("RGB", (w, h), (10, 20, 30)), area, p)
    H, W = out.shape[1:]
    assert out.dtype == torch.uint8 and out.shape[0] == 3
    assert H % p == 0 and W % p == 0 and H >= p and W >= p
    assert (H // p) * (W // p) <= area
    assert info == {"orig_hw": (h, w), "hw": (H, W), "pad": (0, 0)}
    # aspect ratio within one patch: the new width is within one patch of H * (w / h), when not clamped to 1 patch
    if H > p and W > p:
        assert abs(W - H * w / h) <= p or abs(H - W * h / w) <= p


def test_native_resize_pads_bottom_right_with_zeros():
    out, info = native_resize(Image.new("RGB", (300, 200), (200, 200, 200)), 64, 8, pad_to=(96, 112))
    h, w = info["hw"]
    assert out.shape == (3, 96, 112) and info["pad"] == (96 - h, 112 - w)
    assert (out[:, :h, :w] > 0).all() and (out[:, h:, :] == 0).all() and (out[:, :, w:] == 0).all()
    with pytest.raises(ValueError):
        native_resize(Image.new("RGB", (300, 200)), 64, 8, pad_to=(8, 8))
