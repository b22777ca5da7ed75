"""Image-caption pairs from local files, as a map-style dataset: a folder with sidecar captions or an index file.

Three layouts are common when data does not come as webdataset shards:

- ``sidecar``: every image ``x.jpg`` has its caption in ``x.txt`` next to it (found recursively, sorted as
  :func:`aimv2.data.sources.folders.list_images` sorts, so indices are the same on every machine);
- ``csv``: an index file with a ``path`` and a ``caption`` column;
- ``jsonl``: an index file with one JSON object per line, with ``path`` and ``caption`` keys.

Index paths are relative to the index file's folder (or absolute), so a dataset folder can be moved as a whole.

Local folders hold broken files as often as shards do, and one of them must not stop a run. Problems seen while
listing (an image without its sidecar, an index row without a caption) are counted in :attr:`listing_faults` and the
item is left out, with one warning. Problems seen when reading (an image that does not decode or is gone, a sidecar
that is empty or not UTF-8) are counted in :attr:`faults` and :meth:`CaptionedImages.get_item` returns ``None``:
the caller skips the item (:func:`collate_skip_none`). Fault kinds are those of :mod:`aimv2.data.faults`; a missing
image file counts as ``no_image``. Like the shard reader, :attr:`faults` raises
:class:`~aimv2.data.faults.FaultRateError` once more than ``max_fault_rate`` of the items read were bad, because a
wrong folder must not become a silently empty epoch. In DataLoader workers each worker counts its own faults.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset, default_collate

from ...errors import DataError
from ..faults import FaultCounter, caption_fault
from ..transforms import to_rgb
from .folders import list_images

log = logging.getLogger(__name__)

CAPTION_FROM = ("sidecar", "csv", "jsonl")


def infer_caption_from(root_or_index: str | os.PathLike) -> str:
    """``sidecar`` for a folder, ``csv`` for ``*.csv``, ``jsonl`` for ``*.jsonl``/``*.json``; raises otherwise."""
    p = Path(root_or_index)
    if p.is_dir():
        return "sidecar"
    if not p.exists():
        raise DataError(f"no such file or folder ({p}); {_LAYOUTS}")
    suffix = p.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    raise DataError(f"cannot tell the layout of {p} from its name; {_LAYOUTS}")


_LAYOUTS = "give a folder of images with .txt captions next to them, a .csv or a .jsonl index file"


class CaptionedImages(Dataset):
    """``(RGB PIL image, caption)`` pairs from a sidecar folder or a CSV/JSONL index (see the module docstring).

    ``dataset[i]`` is :meth:`get_item` with ``transform`` applied to the image, or ``None`` for a bad item.
    :meth:`get_caption` reads only the caption (no image decoding), e.g. to train a tokenizer.
    """

    def __init__(
        self,
        root_or_index: str | os.PathLike,
        *,
        caption_from: str | None = None,
        path_column: str = "path",
        caption_column: str = "caption",
        transform: Callable | None = None,
        max_fault_rate: float = 0.5,
        min_samples: int = 100,
    ):
        self.source = Path(root_or_index)
        self.caption_from = caption_from or infer_caption_from(self.source)
        if self.caption_from not in CAPTION_FROM:
            raise ValueError(f"caption_from must be one of {', '.join(CAPTION_FROM)}, got {self.caption_from!r}")
        self.transform = transform
        # listing never raises on the fault rate: "nothing usable" gets its own clearer error below
        self.listing_faults = FaultCounter(max_rate=1.0)
        self.faults = FaultCounter(max_rate=max_fault_rate, min_samples=min_samples)
        # each item: (image path, caption) for index files, (image path, sidecar path) for sidecar folders
        self.items: list[tuple[Path, str | Path]] = []
        if self.caption_from == "sidecar":
            self._list_sidecar()
        else:
            if not self.source.is_file():
                raise DataError(f"index file not found ({self.source}); check the path")
            rows = self._csv_rows() if self.caption_from == "csv" else self._jsonl_rows()
            self._list_index(rows, path_column, caption_column)
        lf = self.listing_faults
        if not self.items:
            kind = lf.most_common()[0][0] if lf.counts else "no items"
            raise DataError(
                f"no usable image-caption pair in {self.source} ({self.caption_from}; most were left out as "
                f"{kind}: {lf.describe()}); check the layout and the column names"
            )
        if lf.skipped:
            log.warning("%s: left out %d of %d items: %s", self.source, lf.skipped, lf.skipped + lf.samples,
                        lf.describe())  # fmt: skip

    # --- listing ---

    def _list_sidecar(self) -> None:
        for image in list_images(self.source):
            sidecar = image.with_suffix(".txt")
            if sidecar.is_file():
                self.items.append((image, sidecar))
                self.listing_faults.ok()
            else:
                self.listing_faults.fault("no_caption", str(image), f"no {sidecar.name} next to it")

    def _csv_rows(self):
        # a byte that is not UTF-8 spoils its row only: kept as a surrogate by the reader, the row left out here
        with open(self.source, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            for line, row in enumerate(csv.DictReader(f), start=2):  # line 1 is the header
                where = f"{self.source}:{line}"
                try:
                    "".join(map(str, row.values())).encode("utf-8")
                except UnicodeEncodeError as e:
                    self.listing_faults.fault("bad_caption", where, f"not UTF-8 text: {e.reason}")
                    continue
                yield where, row

    def _jsonl_rows(self):
        with open(self.source, "rb") as f:  # decoded line by line: one bad byte spoils its line, not the file
            for line, raw in enumerate(f, start=1):
                where = f"{self.source}:{line}"
                try:
                    text = raw.decode("utf-8-sig" if line == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    self.listing_faults.fault("bad_caption", where, f"not UTF-8 text: {e.reason} at byte {e.start}")
                    continue
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except ValueError as e:
                    self.listing_faults.fault("bad_caption", where, f"invalid JSON: {e}")
                    continue
                if not isinstance(row, dict):
                    self.listing_faults.fault("bad_caption", where, f"a JSON {type(row).__name__}, not an object")
                    continue
                yield where, row

    def _list_index(self, rows, path_column: str, caption_column: str) -> None:
        base = self.source.parent
        for where, row in rows:
            path, caption = row.get(path_column), row.get(caption_column)
            has = ", ".join(map(str, row))
            if not isinstance(path, str) or not path.strip():
                self.listing_faults.fault("no_image", where, f"no {path_column!r} (has {has})")
                continue
            problem = caption_fault(caption, caption_column)
            if problem is not None:
                kind, what = problem
                self.listing_faults.fault(kind, where, f"{what} (has {has})" if kind == "no_caption" else what)
                continue
            self.items.append((base / path.strip(), caption.strip()))  # an absolute path replaces base
            self.listing_faults.ok()

    # --- reading ---

    def __len__(self) -> int:
        return len(self.items)

    def _caption(self, index: int, faults: FaultCounter | None) -> str | None:
        image, caption = self.items[index]
        if isinstance(caption, str):
            return caption
        try:
            text = caption.read_bytes().decode("utf-8").strip()
        except FileNotFoundError:
            return _fault(faults, "no_caption", image, f"{caption.name} is gone")
        except (OSError, UnicodeDecodeError) as e:
            return _fault(faults, "bad_caption", image, f"{caption.name}: {type(e).__name__}: {e}")
        return text or _fault(faults, "empty_caption", image, f"{caption.name} is empty")

    def get_caption(self, index: int, faults: FaultCounter | None = None) -> str | None:
        """The caption of item ``index`` without reading its image (e.g. to train a tokenizer); ``None`` if it is
        unusable, with the fault counted in ``faults`` if given (not in :attr:`faults`, which counts reads)."""
        return self._caption(index, faults)

    def get_item(self, index: int) -> tuple[Image.Image, str] | None:
        """``(RGB PIL image, caption)``, or ``None`` after counting the fault in :attr:`faults`."""
        caption = self._caption(index, self.faults)
        if caption is None:
            return None
        path = self.items[index][0]
        try:
            with Image.open(path) as img:
                img.load()  # decode now, inside the try: truncated files fail here
                image = to_rgb(img)
        except FileNotFoundError:
            return _fault(self.faults, "no_image", path, "file not found")
        except Exception as e:  # any decoder error means "this file is unreadable"
            return _fault(self.faults, "bad_image", path, f"{type(e).__name__}: {e}")
        self.faults.ok()
        return image, caption

    def __getitem__(self, index: int):
        item = self.get_item(index)
        if item is None or self.transform is None:
            return item
        return self.transform(item[0]), item[1]

    def __repr__(self) -> str:
        return f"CaptionedImages({str(self.source)!r}, caption_from={self.caption_from!r}, items={len(self)})"


def _fault(faults: FaultCounter | None, kind: str, where: Path, what: str) -> None:
    if faults is not None:
        faults.fault(kind, str(where), what)


def collate_skip_none(batch: list):
    """``default_collate`` of the items that are not ``None``; ``None`` if the whole batch was bad."""
    good = [item for item in batch if item is not None]
    return default_collate(good) if good else None
