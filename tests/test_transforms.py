"""Image mode conversion by pixel values, the evaluation/training transforms, and batched normalization."""

import numpy as np
import pytest
import torch
from PIL import Image

from aimv2.data.transforms import MEAN_STD, eval_transform, normalize, to_rgb, train_transform


def px(img: Image.Image, xy=(0, 0)) -> tuple:
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == img.size
    return out.getpixel(xy)


def test_rgb_is_returned_unchanged():
    img = Image.new("RGB", (3, 2), (10, 20, 30))
    assert to_rgb(img) is img


def test_alpha_is_composited_over_white():
    rgba = Image.new("RGBA", (2, 1), (200, 0, 0, 0))  # fully transparent red -> white, not red or black
    rgba.putpixel((1, 0), (200, 0, 0, 255))  # opaque stays
    assert px(rgba, (0, 0)) == (255, 255, 255)
    assert px(rgba, (1, 0)) == (200, 0, 0)
    half = Image.new("RGBA", (1, 1), (0, 0, 0, 128))  # half-transparent black over white -> mid grey
    assert all(abs(v - 127) <= 1 for v in px(half))
    la = Image.new("LA", (1, 1), (0, 0))
    assert px(la) == (255, 255, 255)
    assert px(Image.new("LA", (1, 1), (40, 255))) == (40, 40, 40)


def test_palette_transparency_is_white():
    p = Image.new("P", (2, 1), 0)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0  # palette index 0 (black) is transparent
    assert px(p, (0, 0)) == (255, 255, 255)
    assert px(p, (1, 0)) == (10, 200, 30)
    del p.info["transparency"]
    assert px(p, (0, 0)) == (0, 0, 0)


def test_rgb_with_transparency_key_is_white():
    img = Image.new("RGB", (1, 1), (1, 2, 3))
    img.info["transparency"] = (1, 2, 3)
    assert px(img) == (255, 255, 255)


def test_gray_binary_cmyk():
    assert px(Image.new("L", (1, 1), 77)) == (77, 77, 77)
    assert px(Image.new("1", (1, 1), 1)) == (255, 255, 255)
    assert px(Image.new("1", (1, 1), 0)) == (0, 0, 0)
    assert px(Image.new("CMYK", (1, 1), (0, 255, 255, 0))) == (255, 0, 0)  # no cyan, full magenta+yellow = red
    assert px(Image.new("CMYK", (1, 1), (0, 0, 0, 255))) == (0, 0, 0)


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_gray_is_scaled_not_clipped(mode, tmp_path):
    values = np.array([[0, 257 * 100, 65535, 1000]], dtype=np.uint16 if mode == "I;16" else np.int32)
    img = Image.fromarray(values)
    assert img.mode == mode
    out = np.asarray(to_rgb(img))  # [1, 4, 3]
    assert out[0, :, 0].tolist() == [0, 100, 255, 4]  # 1000 * 255 / 65535 = 3.9 -> 4; PIL's convert gives 255
    assert (out[..., 0] == out[..., 2]).all()
    if mode == "I;16":  # and as decoded from a real 16-bit PNG
        img.save(tmp_path / "g16.png")
        with Image.open(tmp_path / "g16.png") as reread:
            assert np.asarray(to_rgb(reread))[0, :, 1].tolist() == [0, 100, 255, 4]


def test_float_images():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert unit.mode == "F"
    assert np.asarray(to_rgb(unit))[0, :, 0].tolist() == [0, 128, 255]
    wide = Image.fromarray(np.array([[0.0, 100.0, 300.0]], dtype=np.float32))
    assert np.asarray(to_rgb(wide))[0, :, 0].tolist() == [0, 100, 255]


def test_eval_transform_resizes_short_side_then_center_crops():
    img = Image.new("RGB", (128, 64), (255, 0, 0))  # left half red, right half blue
    img.paste((0, 0, 255), (64, 0, 128, 64))
    t = eval_transform(32)
    x = t(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
    # short side 64 -> 32 gives 64x32; the center 32 columns are 16..48: left half red, right half blue
    assert x[:, 16, 2].tolist() == [255, 0, 0]
    assert x[:, 16, 29].tolist() == [0, 0, 255]
    assert "BICUBIC" in repr(t) and "ToRGB" in repr(t)
    assert eval_transform(32, crop_pct=0.875)(img).shape == (3, 32, 32)
    assert eval_transform((16, 24))(Image.new("LA", (50, 70))).shape == (3, 16, 24)
    with pytest.raises(ValueError, match="crop_pct"):
        eval_transform(32, crop_pct=1.5)


def test_train_transform_is_uint8_and_random():
    torch.manual_seed(0)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 60, 3), dtype=np.uint8))
    t = train_transform(48)
    a, b = t(img), t(img)
    assert a.shape == (3, 48, 48) and a.dtype == torch.uint8
    assert not torch.equal(a, b)


def test_normalize_on_batches():
    batch = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 2, 2).contiguous()
    mean, std = MEAN_STD["clip"]
    x = normalize(batch, "clip", device="cpu")
    assert x.dtype == torch.float32 and x.shape == (2, 3, 2, 2)
    for c in range(3):
        assert x[0, c, 0, 0].item() == pytest.approx(-mean[c] / std[c], rel=1e-5)
        assert x[1, c, 1, 1].item() == pytest.approx((1 - mean[c]) / std[c], rel=1e-5)
    assert not torch.allclose(x, normalize(batch, "imagenet"))
    with pytest.raises(TypeError, match="uint8"):
        normalize(batch.float())
    with pytest.raises(ValueError, match="unknown mean/std"):
        normalize(batch, "nope")
