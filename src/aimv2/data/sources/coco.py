"""A detection set in COCO's format: one JSON of images, categories and box annotations, plus a folder of images.

Item ``i`` is (uint8 [3, S, S], boxes float [M, 4] xyxy in the resized image's pixels, labels long [M] in 1..K):
each image is resized to ``size`` x ``size`` (boxes scaled with each side), so a batch is one tensor. Categories
are renumbered 1..K in the order of their ids (COCO's own ids have gaps); ``category_ids[k - 1]`` is label k's id,
which is what predictions are written back with. Crowd annotations and empty boxes are left out of the targets
(COCOeval ignores crowd regions itself). The JSON is read with the standard library: pycocotools is needed only
to evaluate.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..transforms import to_rgb


class CocoDetection:
    def __init__(self, annotations: str | Path, images: str | Path, size: int):
        path = Path(annotations)
        if not path.is_file():
            raise FileNotFoundError(f"COCO annotations {path} not found (a JSON with images, annotations, categories)")
        doc = json.loads(path.read_text())
        missing = [k for k in ("images", "annotations", "categories") if k not in doc]
        if missing:
            raise ValueError(f"{path} is not a COCO detection file: it has no {', '.join(missing)}")
        self.root = Path(images)
        self.size = size
        self.annotations_file = path
        self.categories = sorted(doc["categories"], key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in self.categories]
        label_of = {cid: k + 1 for k, cid in enumerate(self.category_ids)}
        self.images = sorted(doc["images"], key=lambda im: im["id"])
        self._boxes: dict[int, list] = {im["id"]: [] for im in self.images}
        for a in doc["annotations"]:
            x, y, w, h = a["bbox"]
            if a.get("iscrowd", 0) or w <= 0 or h <= 0:
                continue
            self._boxes[a["image_id"]].append((x, y, x + w, y + h, label_of[a["category_id"]]))

    def __len__(self) -> int:
        return len(self.images)

    def image_id(self, i: int) -> int:
        return self.images[i]["id"]

    def original_size(self, i: int) -> tuple[int, int]:
        """(height, width) of image i as the JSON states it (predictions are scaled back to it)."""
        return int(self.images[i]["height"]), int(self.images[i]["width"])

    def __getitem__(self, i: int):
        info = self.images[i]
        file = self.root / info["file_name"]
        if not file.is_file():
            raise FileNotFoundError(f"image {file} listed in {self.annotations_file} not found")
        with Image.open(file) as im:
            img = to_rgb(im).resize((self.size, self.size), Image.Resampling.BILINEAR)
        pixels = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()  # [3, S, S]
        h, w = self.original_size(i)
        rows = self._boxes[info["id"]]
        scale = torch.tensor([self.size / w, self.size / h] * 2)
        boxes = torch.tensor([r[:4] for r in rows], dtype=torch.float32).reshape(-1, 4) * scale
        labels = torch.tensor([r[4] for r in rows], dtype=torch.long)
        return pixels, boxes, labels


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
