"""The evaluation preprocessing of an encoder, as one value: what a PIL image goes through before the forward.

:func:`preprocessing` answers it for a model, a model name or a published name: the center-crop transform at the
encoder's resolution (or the aspect-keeping native resize of a sin-cos model), and the normalization (CLIP's for
Apple's published weights, as their ``preprocessor_config.json`` says; ImageNet's, the training default here, for
everything else). ``extract`` and ``probe`` build their transforms from it, and ``convert --to hf`` writes it as a
``preprocessor_config.json`` that ``transformers.AutoImageProcessor`` reads back to the same pixels.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..data.transforms import MEAN_STD, NativeResize, eval_transform, normalize
from ..models.encoder import EncoderConfig
from ..models.registry import parse_model_name
from .released import RELEASES

# PIL's resampling filter numbers, as transformers' image processors store them (``resample``).
_PIL_FILTER = {"bicubic": int(Image.Resampling.BICUBIC), "bilinear": int(Image.Resampling.BILINEAR)}


@dataclass(frozen=True)
class Preprocessing:
    """PIL image -> normalized float [3, H, W]: resize, crop (or the native resize), scale to [0, 1], mean/std.

    Split in two for batching: :meth:`pil_transform` gives uint8 [3, H, W] (cheap to send between processes) and
    :meth:`normalize` turns a uint8 batch into the encoder's input on the device. Calling it does both for one
    image.
    """

    img_size: tuple[int, int]  # the crop (H, W); the short side is resized to max(H, W) / crop_pct first
    patch_size: int
    crop_pct: float = 1.0
    mean_std: str = "imagenet"  # a key of aimv2.data.transforms.MEAN_STD
    interpolation: str = "bicubic"
    native: bool = False  # aspect ratio kept, at most max_patches patches, sides multiples of the patch
    max_patches: int = 1024

    def pil_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """PIL image -> uint8 [3, H, W] (picklable, for DataLoader workers; its repr keys the feature cache)."""
        if self.native:
            return NativeResize(self.max_patches, self.patch_size)
        return eval_transform(self.img_size, crop_pct=self.crop_pct, interpolation=self.interpolation)

    def normalize(self, batch: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> float32 [B, 3, H, W] on ``device``, scaled to [0, 1] and normalized."""
        return normalize(batch, self.mean_std, device)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.normalize(self.pil_transform()(img)[None])[0]  # float32 [3, H, W]

    def hf_processor_config(self) -> dict:
        """A ``preprocessor_config.json`` for ``transformers.CLIPImageProcessor`` (the class Apple's releases name):
        shortest edge resized, center crop, rescale, mean/std. The native resize has no transformers processor."""
        if self.native:
            raise ValueError("the native (aspect-keeping) resize has no transformers image processor")
        mean, std = MEAN_STD[self.mean_std]
        h, w = self.img_size
        return {
            "image_processor_type": "CLIPImageProcessor",
            "do_convert_rgb": True,
            "do_resize": True,
            "size": {"shortest_edge": int(round(max(h, w) / self.crop_pct))},
            "resample": _PIL_FILTER[self.interpolation],
            "do_center_crop": True,
            "crop_size": {"height": h, "width": w},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(mean),
            "image_std": list(std),
        }


def preprocessing(
    model_or_name,
    *,
    img_size: int | tuple[int, int] | None = None,
    crop_pct: float = 1.0,
    mean_std: str | None = None,
    native: bool = False,
    max_patches: int = 1024,
) -> Preprocessing:
    """The evaluation preprocessing of ``model_or_name``: an encoder (anything with a ``cfg``), an
    :class:`EncoderConfig`, a model name (``aimv2-large-patch14-224``) or a published name
    (``aimv2-large-patch14-224-distilled``).

    img_size: the crop, default the encoder's resolution. mean_std: default CLIP's for Apple's published weights
    (a published name, or a model ``create_model(..., pretrained=True)`` returned), else ImageNet's. native: the
    aspect-keeping resize (sin-cos encoders only; a ValueError otherwise).
    """
    release = RELEASES.get(model_or_name) if isinstance(model_or_name, str) else None
    if isinstance(model_or_name, str):
        cfg = parse_model_name(release.model if release else model_or_name)
    elif isinstance(model_or_name, EncoderConfig):
        cfg = model_or_name
    else:
        cfg = model_or_name.cfg
    if mean_std is None:
        mean_std = release.mean_std if release else getattr(model_or_name, "mean_std", "imagenet")
    if mean_std not in MEAN_STD:
        raise ValueError(f"unknown mean_std {mean_std!r}: choose {', '.join(MEAN_STD)}")
    if native and cfg.pos_embed != "sincos":
        raise ValueError(
            f"--native needs an encoder with sin-cos position embeddings (a -native model); this one has a "
            f"learned {cfg.grid_size} grid"
        )
    if native and max_patches < 2:
        raise ValueError(f"--max-patches must be >= 2, got {max_patches}")
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    size = cfg.image_hw if img_size is None else img_size
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return Preprocessing(hw, cfg.patch_size, crop_pct, mean_std, native=native, max_patches=max_patches)


def write_preprocessor_config(cfg: EncoderConfig, out_dir: Path, mean_std: str) -> None:
    """``preprocessor_config.json``: the center-crop evaluation transform at the encoder's resolution (the
    nominal one of a native model), so that ``transformers.AutoImageProcessor.from_pretrained`` feeds it the
    pixels our ``preprocessing`` does."""
    processor = preprocessing(cfg, mean_std=mean_std).hf_processor_config()
    (out_dir / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
