"""Image-caption pairs from Hugging Face ``datasets`` on local files (parquet / arrow / json), for training.

Only local files: nothing is downloaded. The image column may hold ``datasets.Image`` values (decoded to PIL by
the library), ``{"bytes": ..., "path": ...}`` dicts, or raw encoded bytes; captions are strings. Bad rows never
stop a run: they are counted by kind in ``faults`` and returned as ``None`` (the caller takes another row).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

from PIL import Image

from ...errors import MissingPackageError
from ..faults import FaultCounter, caption_fault
from ..transforms import to_rgb

_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}


def _builder(files: Sequence[str]) -> str:
    kinds = {_BUILDERS.get(os.path.splitext(f)[1].lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        raise ValueError(f"expected local .parquet, .arrow, .json(l) or .csv files of one kind, got {list(files)[:3]}")
    return kinds.pop()


def image_source(value):
    """What :func:`PIL.Image.open` reads for an image column value: a ``{"bytes", "path"}`` dict (how
    ``datasets.Image(decode=False)`` stores images), raw encoded bytes, or a path string. PIL images pass through."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes"):
            return io.BytesIO(value["bytes"])
        if value.get("path"):
            return value["path"]
        raise ValueError("image value has neither bytes nor path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(value))
    if isinstance(value, str):
        return value
    raise TypeError(f"cannot read an image from a {type(value).__name__}")


def decode_value(value) -> Image.Image:
    """An image column value, decoded (loaded) as a PIL image."""
    source = image_source(value)
    if isinstance(source, Image.Image):
        return source
    img = Image.open(source)
    img.load()
    return img


class HFImageText:
    """Map-style: ``get_item(i) -> (RGB PIL image, caption) | None``; ``len()`` rows."""

    def __init__(
        self,
        files: str | Sequence[str],
        *,
        image_column: str = "image",
        text_column: str = "text",
        max_fault_rate: float = 0.5,
        min_samples: int = 100,
    ):
        try:
            import datasets
        except ImportError as e:
            raise MissingPackageError(
                "Hugging Face datasets sources need the datasets package: pip install 'aimv2[hf]'"
            ) from e
        import glob

        patterns = [files] if isinstance(files, str) else list(files)
        paths = sorted({p for pattern in patterns for p in glob.glob(os.path.expanduser(pattern))})
        if not paths:
            raise FileNotFoundError(f"no file matches {patterns}")
        self.ds = datasets.load_dataset(_builder(paths), data_files=paths, split="train")
        missing = [c for c in (image_column, text_column) if c not in self.ds.column_names]
        if missing:
            raise ValueError(f"columns {missing} not in {paths[0]}; it has {self.ds.column_names}")
        self.image_column, self.text_column = image_column, text_column
        self.faults = FaultCounter(max_rate=max_fault_rate, min_samples=min_samples)

    def __len__(self) -> int:
        return len(self.ds)

    def get_item(self, index: int) -> tuple[Image.Image, str] | None:
        where = f"row {index}"
        try:
            row = self.ds[index]
        except Exception as e:  # an undecodable datasets.Image value fails here
            self.faults.fault("bad_image", where, str(e))
            return None
        caption = row[self.text_column]
        problem = caption_fault(caption, self.text_column)
        if problem is not None:
            self.faults.fault(problem[0], where, problem[1])
            return None
        if row[self.image_column] is None:
            self.faults.fault("no_image", where, "")
            return None
        try:
            image = to_rgb(decode_value(row[self.image_column]))
        except Exception as e:
            self.faults.fault("bad_image", where, str(e))
            return None
        self.faults.ok()
        return image, caption.strip()
