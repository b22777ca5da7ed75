"""A frozen encoder as the evaluations open and feed it: which weights (a name, a checkpoint, a run folder), and
how images become its input (size, crop, normalization, blocks, native resolution, batching).

``probe`` and ``extract`` (and the demo's probes) share these settings, so the same words mean the same
preprocessing everywhere; the feature cache keys on the transform and settings built here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..models import parse_model_name
from ..weights import RELEASES, create_model, preprocessing
from .quantize import check_dtype, for_inference


@dataclass
class FeatureSettings:
    """How images are turned into features by a frozen encoder."""

    img_size: int | None = None  # short side resized to this, then center cropped; None: the encoder's
    crop_pct: float = 1.0  # resize to img_size / crop_pct before the crop
    mean_std: str = "imagenet"  # normalization: imagenet (Apple's training code) or clip (their preprocessor files)
    blocks: list[int] | None = None  # normalized outputs of these blocks averaged; None: the last block
    dtype: str = "fp32"  # fp32 | bf16 | fp16 (autocast of the forward) | int8 (torchao); features stay float32
    batch_size: int = 64  # images per encoder forward
    num_workers: int = 4  # image decoding processes, 0 decodes inline
    native: bool = False  # keep each image's aspect ratio (sin-cos encoders), at most max_patches patches
    max_patches: int = 1024
    runtime: str = "torch"  # torch | onnxruntime (fp32 or int8: aimv2.eval.onnx_runtime)
    calibrate: str | None = None  # onnxruntime int8: a folder of images that calibrates static int8 (else dynamic)

    def __post_init__(self):  # the command's options, named as the user typed them, before any work
        counts = {"--img-size": self.img_size, "--batch-size": self.batch_size, "--max-patches": self.max_patches}
        for flag, v in counts.items():
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{flag} {v} is out of range; give a positive integer")
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"--workers {self.num_workers} is out of range; workers must be 0 (decode inline) or more")
        if not 0 < self.crop_pct <= 1:  # False for nan too
            raise ValueError(f"--crop-pct {self.crop_pct} is out of range; give a fraction in (0, 1], e.g. 0.875")


def load_frozen_encoder(
    spec: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    overrides: dict | None = None,
    seed: int = 0,
    pretrained: bool = False,
    dtype: str = "fp32",
) -> nn.Module:
    """The encoder ``spec`` names, in eval mode, ready for inference in ``dtype`` (``int8``: its linear layers
    quantized by torchao; the other dtypes are an autocast of the forward and leave the weights float32).

    ``spec`` with ``checkpoint``: a model name and the weights for it. A bare model name (not an existing path):
    random weights seeded by ``seed`` without touching the global RNG, so the same command gives the same encoder
    (and reuses its cached features); the random-init control of a probe. With ``pretrained``: Apple's published
    weights of that name, through the Hugging Face cache. Anything else (a file, a transformers
    folder, a run folder) is read by :func:`aimv2.weights.load_encoder`, its layout detected.
    """
    check_dtype(dtype)  # before any weights are read
    return for_inference(_load(spec, checkpoint, dict(overrides or {}), seed, pretrained), dtype)


def is_random_init(spec, checkpoint=None, pretrained: bool = False) -> bool:
    """Whether :func:`load_frozen_encoder` gives random weights for these arguments: a bare model name (not an
    existing path) with neither ``checkpoint`` nor ``pretrained``."""
    if pretrained or checkpoint:
        return False
    try:
        parse_model_name(str(spec))
    except ValueError:
        return False
    return not Path(spec).exists()


def random_init_note(spec, checkpoint=None, pretrained: bool = False, seed: int = 0) -> str | None:
    """The line a command prints when ``spec`` gives random weights (None when it does not): a forgotten
    ``--pretrained`` would otherwise export or evaluate an untrained encoder without a word."""
    if not is_random_init(spec, checkpoint, pretrained):
        return None
    fix = "--pretrained for Apple's weights of that name, " if str(spec) in RELEASES else ""
    return (
        f"{spec} is a bare model name: random weights (seed {seed}), the random-init control; pass {fix}"
        "--checkpoint FILE, or a checkpoint, HF folder or run folder as the encoder, for trained weights"
    )


def _load(spec, checkpoint, overrides: dict, seed: int, pretrained: bool) -> nn.Module:
    """The float32 encoder, in eval mode, by the rules of :func:`load_frozen_encoder`."""
    if pretrained:
        return create_model(str(spec), pretrained=True, **overrides).eval()
    if checkpoint:
        return create_model(str(spec), checkpoint=checkpoint, **overrides).eval()
    if is_random_init(spec):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return create_model(str(spec), **overrides).eval()
    from ..weights import load_encoder

    return load_encoder(spec, **overrides).eval()


def image_size(encoder: nn.Module, settings: FeatureSettings) -> int | tuple[int, int]:
    """The evaluation size: ``settings.img_size``, else the encoder's own (224 for a module without a config)."""
    if settings.img_size is not None:
        return settings.img_size
    cfg = getattr(encoder, "cfg", None)
    return cfg.image_hw if cfg is not None else 224


def feature_transform(encoder: nn.Module, settings: FeatureSettings) -> Callable:
    """PIL image -> uint8 [3, H, W] for ``encoder``: the center-crop evaluation transform, or with ``native`` the
    aspect-keeping resize to at most ``max_patches`` patches (a ValueError naming the problem if the encoder's
    learned position grid cannot take it). The one definition is :func:`aimv2.weights.preprocessing`."""
    return preprocessing(
        encoder,
        img_size=settings.img_size,
        crop_pct=settings.crop_pct,
        mean_std=settings.mean_std,
        native=settings.native,
        max_patches=settings.max_patches,
    ).pil_transform()
