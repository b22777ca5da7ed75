"""Features of a folder of images, written to a file: what ``aimv2 extract`` does, as two library calls.

A ``.safetensors`` file holds tensor ``features`` and, as metadata, the image ``paths`` (JSON list relative to the
folder, one per row) and the settings used. A ``.npy`` file holds the array; the paths go to a sibling
``.paths.txt``. Native-resolution patch tokens differ in number per image: they are concatenated
(``features`` [sum of N_i, D]) with ``offsets`` long [n + 1] and ``grids`` long [n, 2], so only .safetensors
can hold them.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..data.sources.folders import ImageFiles, ReadError
from ..errors import UserError
from .features import default_device, extract_features, extract_native_features, native_shape_groups
from .frozen_encoder import FeatureSettings, feature_transform, image_size

SUFFIXES = (".safetensors", ".npy")


@dataclass
class FolderFeatures:
    features: torch.Tensor  # [n, N, D] patch tokens, [n, D] pooled, or native tokens [sum of N_i, D]
    paths: list[str]  # image of each row (of each image for native tokens), relative to the folder
    settings: dict  # how they were computed; written into the file's metadata
    errors: list[ReadError]  # unreadable images, skipped
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # native: grids [n, 2] (+ offsets [n + 1])


def check_feature_file(out: str | os.PathLike, settings: FeatureSettings, pool: str, overwrite: bool = False) -> None:
    """UserError if ``out`` cannot hold these features, exists (unless ``overwrite``) or cannot be written: checked
    before any encoder forward, so a long extraction never ends in a refusal to write. Creates ``out``'s folder."""
    out = Path(out)
    if out.suffix not in SUFFIXES:
        raise UserError(f"OUT must end in .safetensors or .npy, got {str(out)!r}")
    if out.is_dir():
        raise UserError(f"OUT is a folder ({out}); give a .safetensors or .npy file path")
    if out.exists() and not overwrite:
        raise UserError(f"OUT exists ({out}); pass --overwrite to replace it, or choose another path")
    blocking = next((p for p in out.parents if p.is_file()), None)
    if blocking is not None:
        raise UserError(f"OUT's folder is a file ({blocking}); choose another path")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=out.parent):  # PermissionError / read-only file system now, not after the work
        pass
    if settings.native and out.suffix == ".npy" and pool == "none":
        raise ValueError(
            "--native patch tokens differ in number per image; write a .safetensors file (features + offsets + "
            "grids) or use --pool mean"
        )


def check_blocks(encoder: nn.Module, blocks: list[int] | None) -> None:
    """UserError unless every index of ``blocks`` names a block of ``encoder`` (negative ones count from the end)."""
    if not blocks or not hasattr(encoder, "blocks"):
        return
    depth = len(encoder.blocks)
    bad = [b for b in blocks if not -depth <= b < depth]
    if bad:
        raise UserError(
            f"--blocks {','.join(map(str, bad))} out of range (the encoder has {depth} blocks); "
            f"choose indices in 0..{depth - 1} or -{depth}..-1"
        )


def extract_folder(
    encoder: nn.Module,
    images: str | os.PathLike,
    settings: FeatureSettings | None = None,
    *,
    pool: str = "none",
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> FolderFeatures:
    """Features of every image under ``images`` (recursively, sorted by path) through frozen ``encoder``."""
    settings = settings or FeatureSettings()
    check_blocks(encoder, settings.blocks)
    dataset = ImageFiles.from_folder(images, feature_transform(encoder, settings))
    extract = extract_features
    if settings.native:
        groups = native_shape_groups(dataset.paths, settings.max_patches, encoder.cfg.patch_size)
        extract = partial(extract_native_features, groups=groups)
    device = default_device() if device is None else torch.device(device)
    encoder.to(device)
    result = extract(
        encoder,
        dataset,
        batch_size=settings.batch_size,
        num_workers=settings.num_workers,
        device=device,
        dtype=settings.dtype,
        blocks=settings.blocks,
        pool=pool,
        mean_std=settings.mean_std,
        progress=progress,
        desc="extract",
    )
    root = Path(images)
    paths = [dataset.paths[i].relative_to(root).as_posix() for i in result["indices"].tolist()]
    described = {
        "img_size": image_size(encoder, settings),
        "crop_pct": settings.crop_pct,
        "mean_std": settings.mean_std,
        "blocks": settings.blocks,
        "pool": pool,
        "dtype": settings.dtype,
        "skipped": [e.path for e in result["errors"]],
    }
    extra, features = {}, result["features"]
    if settings.native:
        described.update(native=True, max_patches=settings.max_patches)
        extra["grids"] = result["grids"]
        if isinstance(features, list):  # ragged patch tokens: concatenated, with offsets
            sizes = torch.tensor([f.shape[0] for f in features])
            extra["offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
            features = torch.cat(features)
    return FolderFeatures(features, paths, described, result["errors"], extra)


def write_features(out: str | os.PathLike, result: FolderFeatures, metadata: dict | None = None) -> list[Path]:
    """Write ``result`` to ``out`` (.safetensors or .npy), ``metadata`` added to its settings; returns the files
    written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        import numpy as np

        np.save(out, result.features.numpy())
        paths_file = out.with_suffix(".paths.txt")
        paths_file.write_text("".join(p + "\n" for p in result.paths), encoding="utf-8")
        return [out, paths_file]
    from safetensors.torch import save_file

    meta = {k: json.dumps(v) for k, v in {**(metadata or {}), **result.settings}.items()}
    meta["paths"] = json.dumps(result.paths)
    save_file({"features": result.features.contiguous(), **result.extra}, str(out), metadata=meta)
    return [out]
