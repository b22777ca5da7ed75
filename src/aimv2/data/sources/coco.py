"""A detection set in COCO's format: one JSON of images, categories and box annotations, plus a folder of images.

Item ``i`` is (uint8 [3, S, S], boxes float [M, 4] xyxy in the input's pixels, labels long [M] in 1..K): each image
goes through the one resize policy of detection (data/letterbox.py: aspect kept, long side S, padded to the square),
so a batch is one tensor and train, eval and predict see the same input. Categories are renumbered 1..K in the order
of their ids (COCO's own ids have gaps); ``category_ids[k - 1]`` is label k's id, which is what predictions are
written back with. Crowd annotations are left out of the targets (COCOeval ignores crowd regions itself).

The JSON is checked record by record (data/records.py: a missing key or a wrong type names the file, the list, the
record and the key) and completed as pycocotools' own loaders complete results: ``area`` the box's w * h,
``iscrowd`` 0, ``id`` the next free number (:func:`read_coco`). What cannot be used without stopping is skipped and
counted (data/faults.py): an image that is missing or does not decode (``no_image``, ``bad_image``: the item is
replaced by the next readable one in training, left out of an evaluation), and a box with no area inside its image
(``bad_box``: left out of the targets, partly outside boxes are clipped).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image

from ...errors import DataError
from ..faults import FaultCounter
from ..letterbox import Fitted, letterbox, to_input
from ..records import RecordAt, RecordError, field, read_json

log = logging.getLogger(__name__)

WHAT = "a COCO detection file (images, annotations, categories)"


def read_coco(path: str | Path, files: bool = True) -> dict:
    """The COCO detection document at ``path``, every record checked, missing ``area`` / ``iscrowd`` / annotation
    ``id`` filled in (a new document; the file is not changed)."""
    return check_coco(read_json(path, WHAT), path, files)


def check_coco(doc, path: str | Path, files: bool = True) -> dict:
    """:func:`read_coco` of a document already parsed (``path`` names it in the errors); ``files`` False: images
    need no file_name (ground truth for COCOeval only)."""
    if not isinstance(doc, dict):
        raise RecordError(f"{path} holds a JSON {type(doc).__name__}, not an object; give {WHAT}")
    top = RecordAt(path)
    lists = {k: field(doc, k, list, where=top, fix=f"give {WHAT}") for k in ("images", "annotations", "categories")}
    for k in ("images", "categories"):
        if not lists[k]:
            raise RecordError(f"{k!r} is an empty list ({path}); give {WHAT} with at least one entry there")
    images, categories, annotations = [], [], []
    for i, im in enumerate(lists["images"]):
        at = RecordAt(path, "images", i)
        fix = "give each image an integer id, its file_name and its height and width in pixels"
        field(im, "id", int, where=at, fix=fix)
        field(im, "file_name", str, where=at, fix=fix, optional=not files)
        for k in ("height", "width"):
            if field(im, k, (int, float), where=at, fix=fix) <= 0:
                raise RecordError(f"{k!r} is {im[k]} ({at}); {fix}")
        images.append({**im})
    for i, c in enumerate(lists["categories"]):
        at = RecordAt(path, "categories", i)
        fix = "give each category an integer id and a name"
        field(c, "id", int, where=at, fix=fix)
        field(c, "name", str, where=at, fix=fix)
        categories.append({**c})
    for k, items in (("images", images), ("categories", categories)):
        ids = [r["id"] for r in items]
        if len(set(ids)) != len(ids):
            dup = next(x for x in ids if ids.count(x) > 1)
            raise RecordError(f"id {dup} is used twice in {k!r} ({path}); give every entry its own id")
    image_ids, category_ids = {im["id"] for im in images}, {c["id"] for c in categories}
    used = {a["id"] for a in lists["annotations"] if isinstance(a, dict) and isinstance(a.get("id"), int)}
    next_id = max(used, default=0) + 1
    for i, a in enumerate(lists["annotations"]):
        at = RecordAt(path, "annotations", i)
        fix = "give each annotation an image_id and category_id listed in the file and a bbox [x, y, width, height]"
        if field(a, "image_id", int, where=at, fix=fix) not in image_ids:
            raise RecordError(f"image_id {a['image_id']} is not in 'images' ({at}); {fix}")
        if field(a, "category_id", int, where=at, fix=fix) not in category_ids:
            raise RecordError(f"category_id {a['category_id']} is not in 'categories' ({at}); {fix}")
        bbox = field(a, "bbox", list, where=at, fix=fix)
        if len(bbox) != 4 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox):
            raise RecordError(f"bbox {bbox} is not 4 numbers ({at}); {fix}")
        rec = {**a}
        if field(a, "iscrowd", (int, bool), where=at, fix=fix, optional=True) is None:
            rec["iscrowd"] = 0  # pycocotools' loadRes does the same for results
        if field(a, "area", (int, float), where=at, fix=fix, optional=True) is None:
            rec["area"] = float(bbox[2]) * float(bbox[3])  # loadRes: the box's w * h
        if field(a, "id", int, where=at, fix=fix, optional=True) is None:
            rec["id"], next_id = next_id, next_id + 1
        annotations.append(rec)
    return {**doc, "images": images, "annotations": annotations, "categories": categories}


class CocoDetection:
    """A COCO JSON and its image folder as a detection set at ``size`` x ``size`` (see the module docstring)."""

    def __init__(self, annotations: str | Path, images: str | Path, size: int, max_fault_rate: float = 0.5):
        self.annotations_file = Path(annotations)
        self.document = read_coco(self.annotations_file)
        self.root = Path(images)
        self.size = size
        self.categories = sorted(self.document["categories"], key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in self.categories]
        label_of = {cid: k + 1 for k, cid in enumerate(self.category_ids)}
        self.images = sorted(self.document["images"], key=lambda im: im["id"])
        # images read (per process: each worker its own); the rate is enforced from 100 reads, or the whole set
        self.faults = FaultCounter(max_rate=max_fault_rate, min_samples=min(100, len(self.images)))
        self.listing_faults = FaultCounter(max_rate=1.0)  # boxes left out when the file was read
        self._boxes: dict[int, list] = {im["id"]: [] for im in self.images}
        hw = {im["id"]: (im["height"], im["width"]) for im in self.images}
        for i, a in enumerate(self.document["annotations"]):
            if a["iscrowd"]:
                continue
            x, y, w, h = a["bbox"]
            ih, iw = hw[a["image_id"]]
            x0, y0, x1, y1 = max(0.0, x), max(0.0, y), min(float(iw), x + w), min(float(ih), y + h)  # clipped
            if x1 <= x0 or y1 <= y0:
                self.listing_faults.fault(
                    "bad_box", str(RecordAt(self.annotations_file, "annotations", i)),
                    f"bbox {a['bbox']} has no area inside its {iw:g} x {ih:g} image",
                )  # fmt: skip
                continue
            self.listing_faults.ok()
            self._boxes[a["image_id"]].append((x0, y0, x1, y1, label_of[a["category_id"]]))
        if self.listing_faults.skipped:
            log.warning("%s: left out %d boxes: %s", self.annotations_file, self.listing_faults.skipped,
                        self.listing_faults.describe())  # fmt: skip

    @property
    def boxes(self) -> int:
        """How many boxes the targets hold (crowd and empty ones left out)."""
        return sum(len(v) for v in self._boxes.values())

    def __len__(self) -> int:
        return len(self.images)

    def image_id(self, i: int) -> int:
        return self.images[i]["id"]

    def original_size(self, i: int) -> tuple[int, int]:
        """(height, width) of image i as the JSON states it."""
        return int(self.images[i]["height"]), int(self.images[i]["width"])

    def file(self, i: int) -> Path:
        return self.root / self.images[i]["file_name"]

    def fitted(self, i: int) -> Fitted | None:
        """Image i as the detector's input (data/letterbox.py), or None after counting why it cannot be read."""
        file = self.file(i)
        try:
            with Image.open(file) as im:
                im.load()  # decode now: a truncated file fails here
                out = letterbox(im, self.size)
        except FileNotFoundError:
            self.faults.fault("no_image", str(file), f"listed in {self.annotations_file}, not found")
            return None
        except Exception as e:  # any decoder error means "this file is unreadable"
            self.faults.fault("bad_image", str(file), f"{type(e).__name__}: {e}")
            return None
        self.faults.ok()
        return out

    def get_item(self, i: int):
        """(pixels, boxes, labels) of image i, or None if it cannot be read (counted in :attr:`faults`)."""
        fitted = self.fitted(i)
        if fitted is None:
            return None
        rows = self._boxes[self.images[i]["id"]]
        boxes = torch.tensor([r[:4] for r in rows], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([r[4] for r in rows], dtype=torch.long)
        return fitted.pixels, to_input(boxes, fitted), labels

    def __getitem__(self, i: int):
        """Image i or, if it cannot be read, the next readable one (so a batch keeps its size and a resumed run
        sees the same images)."""
        n = len(self)
        for k in range(n):
            item = self.get_item((i + k) % n)
            if item is not None:
                return item
        raise DataError(
            f"no readable image in {self.root} ({self.faults.describe()}); check data.folder and the file names "
            f"in {self.annotations_file}"
        )

    def skipped_by_kind(self, listing: bool = True) -> list[int]:
        """Skips by kind (data/faults.py order): the images read so far, and (``listing``) the boxes left out."""
        counts = self.faults.by_kind()
        if listing:
            counts = [a + b for a, b in zip(counts, self.listing_faults.by_kind(), strict=True)]
        return counts


def collate_detection(items: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """Items of a detection set as one batch of tensors: images uint8 [B, 3, S, S], boxes [B, M, 4], labels [B, M],
    M the most boxes of any image, label 0 on the padding rows (what objectives/detection.py drops)."""
    images = torch.stack([it[0] for it in items])
    m = max(1, max(len(it[2]) for it in items))
    boxes = torch.zeros(len(items), m, 4)
    labels = torch.zeros(len(items), m, dtype=torch.long)
    for b, (_, bx, lab) in enumerate(items):
        boxes[b, : len(lab)], labels[b, : len(lab)] = bx, lab
    return images, boxes, labels
