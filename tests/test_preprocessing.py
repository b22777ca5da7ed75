"""The evaluation preprocessing (``aimv2.preprocessing``) and the ``preprocessor_config.json`` the transformers
export writes: ``AutoImageProcessor.from_pretrained`` on it must give our pixel values on real CC12M photos."""

import io
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import aimv2
from aimv2.weights import export_hf

SHARD = Path(__file__).resolve().parents[1].parent / "shared/data/cc12m-train-0000.tar"
needs_shard = pytest.mark.skipif(not SHARD.is_file(), reason="needs the CC12M shard (shared/data beside the checkout)")


def cc12m_images(n: int) -> list[Image.Image]:
    """The first ``n`` JPEGs of the real shard (photos of every size and aspect ratio)."""
    out = []
    with tarfile.open(SHARD) as tar:
        for m in tar:
            if m.name.endswith(".jpg"):
                out.append(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB"))
                if len(out) == n:
                    break
    return out


def test_defaults_follow_the_model_and_the_release():
    p = aimv2.preprocessing("aimv2-large-patch14-336")  # a published name: Apple's processor files use CLIP's
    assert (p.img_size, p.patch_size, p.mean_std, p.native) == ((336, 336), 14, "clip", False)
    assert aimv2.preprocessing("aimv2-large-patch14-224-distilled").img_size == (224, 224)
    assert aimv2.preprocessing("aimv2-tiny-patch8-64").mean_std == "imagenet"  # ours: the training default
    with torch.device("meta"):
        assert aimv2.preprocessing(aimv2.create_model("aimv2-large-patch14-224")).mean_std == "imagenet"
    assert aimv2.preprocessing("aimv2-tiny-patch8-64", img_size=32, mean_std="clip").img_size == (32, 32)
    with pytest.raises(ValueError, match="sin-cos position embeddings"):
        aimv2.preprocessing("aimv2-large-patch14-224", native=True)


@needs_shard
def test_matches_a_plain_torchvision_pipeline():
    """The transform is the reference pipeline written out with torchvision: PIL bicubic short-side resize,
    center crop, /255, mean/std (exactly equal)."""
    from torchvision.transforms import functional as F

    img = cc12m_images(1)[0]
    p = aimv2.preprocessing("aimv2-tiny-patch8-64", mean_std="clip")
    ref = F.center_crop(F.resize(img, 64, interpolation=F.InterpolationMode.BICUBIC), [64, 64])
    ref = F.normalize(F.to_tensor(ref), (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    torch.testing.assert_close(p(img), ref, rtol=0, atol=1e-6)


def crop_shift(size: tuple[int, int], short: int, crop: int) -> tuple[int, int]:
    """How many pixels (rows, columns) torchvision's center crop starts after transformers' for an image of
    ``size`` resized to ``short``: torchvision rounds half the margin (half to even), transformers floors it."""
    w, h = size
    hh, ww = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    return tuple(round((m - crop) / 2) - (m - crop) // 2 for m in (hh, ww))


@needs_shard
@pytest.mark.parametrize("mean_std", ["clip", "imagenet"])
def test_auto_image_processor_reproduces_our_pixels(tmp_path, mean_std):
    """transformers' processor from our export vs ours on 16 real photos. Both resize with PIL's bicubic filter.

    Tolerance: one uint8 level (1/255/std) on at most 0.5% of the values, from float rounding in the resize. One
    known difference is checked as such: on some odd margins transformers' center crop takes the floor of half of it
    where torchvision (and Apple's evaluation code) rounds it up (half to even), so that axis is shifted by one pixel.
    """
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    export_hf(aimv2.create_model("aimv2-tiny-patch8-64", depth=1), tmp_path, mean_std=mean_std)
    ours = aimv2.preprocessing("aimv2-tiny-patch8-64", mean_std=mean_std)
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    level = 1 / 255 / min(processor.image_std) + 1e-5
    odd = 0
    for img in cc12m_images(16):
        theirs = processor(images=[img], return_tensors="pt")["pixel_values"][0]  # [3, 64, 64]
        mine = ours(img)
        assert theirs.shape == mine.shape == (3, 64, 64)
        dh, dw = crop_shift(img.size, 64, 64)
        if dh:  # theirs starts one row above ours: their rows 1.. are our rows ..-1
            theirs, mine, odd = theirs[:, 1:], mine[:, :-1], odd + 1
        if dw:
            theirs, mine, odd = theirs[:, :, 1:], mine[:, :, :-1], odd + 1
        diff = (theirs - mine).abs()
        assert diff.max() <= level, (img.size, diff.max())
        assert (diff > 1e-5).float().mean() <= 0.005, (img.size, (diff > 1e-5).float().mean())
    assert 0 < odd < 16  # both cases were seen
