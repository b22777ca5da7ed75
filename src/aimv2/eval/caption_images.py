"""Captions of image files: a :class:`~aimv2.eval.captioning.Captioner` over files and folders, batched, with the
unreadable files reported and skipped rather than stopping the run. ``aimv2 caption`` and the demo use it."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data.sources.folders import ImageFiles, ReadError, collate_skip, list_images
from ..data.transforms import eval_transform
from ..data.workers import loader_workers
from .captioning import Caption, Captioner


@dataclass
class CaptionedImage:
    path: Path
    caption: Caption | None  # None when the file could not be read
    error: ReadError | None = None


def image_paths(items: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given, folders expanded (recursively, sorted); FileNotFoundError / ValueError for what is neither
    a file nor a folder with images."""
    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = list_images(p)
            if not found:
                raise ValueError(f"no images found under {str(item)!r}")
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            raise FileNotFoundError(f"{str(item)!r} is neither an image file nor a folder")
    return paths


def caption_images(
    captioner: Captioner,
    paths: Sequence[Path],
    *,
    beam: int = 1,
    max_len: int | None = None,
    length_penalty: float = 0.0,
    batch_size: int = 32,
    num_workers: int = 2,
    progress: bool | None = None,
) -> Iterator[CaptionedImage]:
    """Caption every file of ``paths`` with the run's evaluation preprocessing (the encoder's size, center crop),
    ``batch_size`` at a time: readable images in input order, each batch's unreadable ones first. ``progress``: a
    bar on stderr (None: when stderr is a terminal); print beside it with ``tqdm.write``."""
    dataset = ImageFiles(list(paths), transform=eval_transform(captioner.model.encoder.cfg.image_hw))
    workers = loader_workers(num_workers, len(dataset), batch_size)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_skip)
    progress = sys.stderr.isatty() if progress is None else progress
    with torch.inference_mode(), tqdm(total=len(paths), desc="caption", unit="img", file=sys.stderr,
                                      disable=not progress) as bar:  # fmt: skip
        for images, _, indices, bad in loader:
            for err in bad:
                yield CaptionedImage(Path(err.path), None, err)
            if images is not None:
                captions = captioner.caption(images, beam=beam, max_len=max_len, length_penalty=length_penalty)
                for i, cap in zip(indices.tolist(), captions, strict=True):
                    yield CaptionedImage(paths[i], cap)
            bar.update(len(bad) + (0 if images is None else len(images)))
