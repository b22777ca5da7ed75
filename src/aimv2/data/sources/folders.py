"""Local image folders: a flat (recursive) list of images, or one sub-folder per class as torchvision's ImageFolder.

Real folders hold the odd truncated JPEG or a text file renamed ``.png``. A probe or an extraction over a million
images must not die on image 812,345, nor silently drop it: :class:`ImageFiles` hands back a :class:`ReadError` in
place of the pixels, :func:`collate_skip` sets such samples aside, and the caller counts them and names them in a
warning while the run goes on.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from ..transforms import to_rgb

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(root: str | os.PathLike) -> list[Path]:
    """Every image under ``root`` (recursive, by extension, hidden files and folders skipped).

    Sorted by path relative to ``root`` (as POSIX strings), so the order is the same on every machine and file
    system; feature files and caches index images by this order. Symlinked folders are followed.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a folder")
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath) / f for f in filenames if _is_image(f)]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def find_classes(root: str | os.PathLike) -> list[str]:
    """Class names of an image folder: its non-hidden sub-folders, sorted. Raises if there are none."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a folder")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(
            f"{str(root)!r} has no class sub-folders: expected one folder per class, e.g. {root}/cat/1.jpg, "
            f"{root}/dog/2.jpg"
        )
    return classes


@dataclass(frozen=True)
class ReadError:
    """Stands in for the pixels of an image that could not be read or decoded."""

    path: str
    error: str

    def __str__(self) -> str:
        return f"{self.path}: {self.error}"


def read_image(source, transform: Callable | None, where: str):
    """Decode one image (a path or a binary file object) to RGB and apply ``transform``; a :class:`ReadError`
    naming ``where`` if anything fails. The one decode path of every labelled-image source (folders, shards, HF).

    A transform with ``accepts_undecoded = True`` (:class:`~aimv2.data.transforms.TrainTransform`) gets the image
    opened but not decoded, so it can decode a JPEG at reduced scale; its decode errors are caught here too.
    """
    try:
        with Image.open(source) as img:
            if getattr(transform, "accepts_undecoded", False):
                return transform(img)
            img.load()  # decode now, inside the try: truncated files fail here, not later
            img = to_rgb(img)
        return transform(img) if transform is not None else img
    except Exception as e:  # any decoder error means "this image is unreadable"
        message = str(e) if isinstance(source, (str, os.PathLike)) else str(e).replace(repr(source), "<bytes>")
        return ReadError(where, f"{type(e).__name__}: {message}")


class ImageFiles(Dataset):
    """Images from a list of files, each read with :func:`to_rgb` and transformed (typically to uint8 [3, H, W]).

    ``dataset[i]`` is ``(image, label, i)``; ``image`` is a :class:`ReadError` if the file cannot be decoded, and
    ``label`` is -1 for unlabelled images. Use :func:`collate_skip` as the DataLoader's ``collate_fn``.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        labels: Sequence[int] | None = None,
        transform: Callable | None = None,
        classes: Sequence[str] | None = None,
        root: str | os.PathLike | None = None,
    ):
        self.paths = [Path(p) for p in paths]
        self.labels = list(labels) if labels is not None else [-1] * len(self.paths)
        if len(self.labels) != len(self.paths):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")
        self.transform = transform
        self.classes = list(classes) if classes is not None else None
        self.root = Path(root) if root is not None else None

    @classmethod
    def from_folder(cls, root: str | os.PathLike, transform: Callable | None = None) -> ImageFiles:
        """All images under ``root``, recursively, unlabelled."""
        paths = list_images(root)
        if not paths:
            raise ValueError(f"no images found under {str(root)!r} (extensions: {' '.join(IMAGE_EXTENSIONS)})")
        return cls(paths, transform=transform, root=root)

    @classmethod
    def from_class_folders(cls, root: str | os.PathLike, transform: Callable | None = None) -> ImageFiles:
        """One sub-folder per class (sorted names -> labels 0, 1, ...), images found recursively inside each."""
        root = Path(root)
        classes = find_classes(root)
        paths, labels, empty = [], [], []
        for label, name in enumerate(classes):
            files = list_images(root / name)
            if not files:
                empty.append(name)
            paths += files
            labels += [label] * len(files)
        if empty:
            raise ValueError(f"class folder(s) with no images under {str(root)!r}: {', '.join(empty)}")
        return cls(paths, labels, transform=transform, classes=classes, root=root)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        return read_image(path, self.transform, str(path)), self.labels[index], index

    def fingerprint(self) -> list[tuple[str, int, int, int]]:
        """(path, size, mtime_ns, label) per image: changes when any file is added, removed, edited or relabelled."""
        out = []
        for p, label in zip(self.paths, self.labels, strict=True):
            try:
                st = p.stat()
                out.append((str(p.resolve()), st.st_size, st.st_mtime_ns, label))
            except OSError:
                out.append((str(p), -1, -1, label))
        return out


def collate_skip(batch: list[tuple]) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, list[ReadError]]:
    """Collate ``(image, label, index)`` samples, setting unreadable ones aside.

    Returns ``(images [B', ...] or None if all failed, labels [B'], indices [B'], errors)``.
    """
    good = [s for s in batch if not isinstance(s[0], ReadError)]
    errors = [s[0] for s in batch if isinstance(s[0], ReadError)]
    if not good:
        return None, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), errors
    images, labels, indices = default_collate(good)
    return images, labels, indices, errors
