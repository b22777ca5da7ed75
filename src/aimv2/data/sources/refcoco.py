"""Referring expressions in the RefCOCO style, from JSON, JSON lines or parquet (never the pickled ``refs(*).p``):
one record per referred object, with its image, its box and its phrases.

    {"file_name": "COCO_train2014_000000581857.jpg", "bbox": [x, y, width, height],
     "sentences": ["the lady with the blue shirt", {"sent": "lady in blue"}], "split": "val"}

``sentences`` may be a list of strings or of RefCOCO's ``{"sent": ...}`` objects; a single ``sentence``, ``phrase``
or ``sent`` string does too. ``bbox`` is COCO's [x, y, width, height] in the image's pixels. ``split`` (optional)
keeps only the records of one split. Every phrase of a record is one sample. Records are checked with
data/records.py (file, record and key named); an image that is missing or does not decode is skipped and counted
(data/faults.py) and replaced by the next readable sample in training.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ...errors import DataError
from ..faults import FaultCounter
from ..letterbox import Fitted, letterbox, to_input
from ..records import RecordAt, RecordError, field, read_json_records

WHAT = "a referring-expression file (records with file_name, bbox and sentences)"
FIX = "give each record a file_name, a bbox [x, y, width, height] and sentences (strings or {'sent': ...})"


def read_records(path: Path) -> list:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        if not path.is_file():
            raise FileNotFoundError(2, f"{WHAT} not found; check the path", str(path))
        return pq.read_table(path).to_pylist()
    return read_json_records(path, WHAT)


def phrases_of(record: dict, at: RecordAt) -> list[str]:
    sentences = field(record, "sentences", list, where=at, fix=FIX, optional=True)
    if sentences is None:
        for key in ("sentence", "phrase", "sent"):
            one = field(record, key, str, where=at, fix=FIX, optional=True)
            if one is not None:
                sentences = [one]
                break
        else:
            raise RecordError(f"no 'sentences' ({at}); {FIX}")
    out = []
    for s in sentences:
        text = s.get("sent") if isinstance(s, dict) else s
        if not isinstance(text, str) or not text.strip():
            raise RecordError(f"a sentence is {s!r}, not a phrase ({at}); {FIX}")
        out.append(text.strip())
    return out


class RefCocoStyle:
    """A referring-expression file and its image folder as a grounding set at ``size`` x ``size`` (one resize
    policy with detection: data/letterbox.py). Item i is (uint8 [3, S, S], phrase, box [4] xyxy input pixels)."""

    def __init__(self, annotations: str | Path, images: str | Path, size: int, split: str | None = None,
                 max_fault_rate: float = 0.5):  # fmt: skip
        self.annotations_file = Path(annotations)
        self.root, self.size = Path(images), size
        self.samples: list[tuple[str, str, tuple[float, float, float, float]]] = []  # (file, phrase, xyxy)
        for i, rec in enumerate(read_records(self.annotations_file)):
            at = RecordAt(self.annotations_file, "", i)
            file = field(rec, "file_name", str, where=at, fix=FIX)
            bbox = field(rec, "bbox", list, where=at, fix=FIX)
            if len(bbox) != 4 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox):
                raise RecordError(f"bbox {bbox} is not 4 numbers ({at}); {FIX}")
            if bbox[2] <= 0 or bbox[3] <= 0:
                raise RecordError(f"bbox {bbox} has no area ({at}); {FIX}")
            if split is not None and field(rec, "split", str, where=at, fix=FIX, optional=True) != split:
                continue
            x, y, w, h = map(float, bbox)
            self.samples += [(file, p, (x, y, x + w, y + h)) for p in phrases_of(rec, at)]
        if not self.samples:
            where = f" of split {split!r}" if split is not None else ""
            raise DataError(f"no referring expression{where} in {self.annotations_file}; give {WHAT}")
        self.faults = FaultCounter(max_rate=max_fault_rate, min_samples=min(100, len(self.samples)))

    def __len__(self) -> int:
        return len(self.samples)

    def fitted(self, i: int) -> tuple[Fitted, str, torch.Tensor] | None:
        """(image as the input, phrase, box in original pixels), or None after counting why it cannot be read."""
        file, phrase, box = self.samples[i]
        path = self.root / file
        try:
            with Image.open(path) as im:
                im.load()
                out = letterbox(im, self.size)
        except FileNotFoundError:
            self.faults.fault("no_image", str(path), f"listed in {self.annotations_file}, not found")
            return None
        except Exception as e:  # any decoder error means "this file is unreadable"
            self.faults.fault("bad_image", str(path), f"{type(e).__name__}: {e}")
            return None
        self.faults.ok()
        return out, phrase, torch.tensor(box, dtype=torch.float32)

    def __getitem__(self, i: int):
        n = len(self)
        for k in range(n):
            item = self.fitted((i + k) % n)
            if item is not None:
                fitted, phrase, box = item
                return fitted.pixels, phrase, to_input(box[None], fitted)[0]
        raise DataError(f"no readable image in {self.root} ({self.faults.describe()}); check the image folder")

    def skipped_by_kind(self, listing: bool = True) -> list[int]:
        return self.faults.by_kind()
