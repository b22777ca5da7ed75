"""Boxes and masks of the built-in scenes, in COCO's detection format: every object's box and outline are known
exactly from its :class:`~.scenes.SceneSpec`, so the scenes make a detection set with perfect labels.

One category per shape (ids 1..7 in :data:`~.vocabulary.SHAPES` order; colour and size are not classes). A box is
the shape's outline as :func:`~.scenes.render` draws it (same centre, radius and rotation), clipped to the image;
the segmentation is that outline as a COCO polygon (a circle as a 32-gon). Boxes and masks are amodal: an object
partly covered by a later one keeps its whole outline (the sampler allows only a light overlap of corners).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from ..letterbox import Fitted
from .dataset import synthetic_scene
from .scenes import OUTLINES, SceneObject, SceneSpec, render
from .vocabulary import SHAPES

CATEGORIES = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
CATEGORY_ID = {s: i + 1 for i, s in enumerate(SHAPES)}
CIRCLE_POINTS = 32


def outline(obj: SceneObject, hw: tuple[int, int]) -> np.ndarray:
    """The object's outline in pixels of an (height, width) rendering, as render() draws it: [P, 2] (x, y)."""
    h, w = hw
    cx, cy, r = obj.x * w, obj.y * h, obj.radius * min(h, w)
    if obj.shape == "circle":
        a = np.linspace(0, 2 * math.pi, CIRCLE_POINTS, endpoint=False)
        return np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], 1)
    a = math.radians(obj.rotation)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    pts = OUTLINES[obj.shape] @ rot.T * r  # y up
    return np.stack([cx + pts[:, 0], cy - pts[:, 1]], 1)  # image rows go down


def object_box(obj: SceneObject, hw: tuple[int, int]) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) in pixels, clipped to the image."""
    pts = outline(obj, hw)
    h, w = hw
    x0, y0 = max(0.0, float(pts[:, 0].min())), max(0.0, float(pts[:, 1].min()))
    x1, y1 = min(float(w), float(pts[:, 0].max())), min(float(h), float(pts[:, 1].max()))
    return x0, y0, x1, y1


def _polygon_area(pts: np.ndarray) -> float:
    x, y = pts[:, 0], pts[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def scene_annotations(spec: SceneSpec, hw: tuple[int, int], masks: bool = True) -> list[dict]:
    """COCO annotations of one scene (no ``id`` / ``image_id`` yet): bbox [x, y, w, h], category_id, area, iscrowd
    and, with ``masks``, the outline polygon as segmentation. Area is the polygon's when there is one."""
    anns = []
    for obj in spec.objects:
        x0, y0, x1, y1 = object_box(obj, hw)
        pts = outline(obj, hw)
        ann = {
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "category_id": CATEGORY_ID[obj.shape],
            "area": _polygon_area(pts) if masks else (x1 - x0) * (y1 - y0),
            "iscrowd": 0,
        }
        if masks:
            ann["segmentation"] = [pts.round(2).flatten().tolist()]
        anns.append(ann)
    return anns


def scene_targets(spec: SceneSpec, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One scene's training targets at ``size`` x ``size``: boxes float [M, 4] xyxy pixels, labels long [M]."""
    boxes = [object_box(o, (size, size)) for o in spec.objects]
    labels = [CATEGORY_ID[o.shape] for o in spec.objects]
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels, dtype=torch.long)


def scene_label_map(spec: SceneSpec, size: int) -> torch.Tensor:
    """Semantic-segmentation target of one scene: long [size, size], each pixel the category id of the top-most
    object covering it (objects drawn in list order, as render does), 0 for the background. Outlines are filled
    at pixel resolution (no antialiasing: a pixel belongs to one class)."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for obj in spec.objects:
        draw.polygon([tuple(p) for p in outline(obj, (size, size)).tolist()], fill=CATEGORY_ID[obj.shape])
    return torch.from_numpy(np.array(canvas)).long()


class SyntheticDetection:
    """Built-in scenes as a detection set: item i is (uint8 [3, size, size], boxes [M, 4] xyxy, labels [M]), a pure
    function of (seed, i). ``length`` None is endless (training); evaluation uses a fixed number of scenes."""

    categories = CATEGORIES
    category_ids = [c["id"] for c in CATEGORIES]  # label k is category id k

    def __init__(self, seed: int = 0, size: int = 64, length: int | None = None):
        self.seed, self.size, self.length = seed, size, length

    def original_size(self, i: int) -> tuple[int, int]:
        return self.size, self.size

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("an endless synthetic detection stream has no length")
        return self.length

    def __getitem__(self, i: int):
        spec, _ = synthetic_scene(i, self.seed)
        img = torch.from_numpy(np.array(render(spec, self.size))).permute(2, 0, 1).contiguous()  # [3, S, S]
        return (img, *scene_targets(spec, self.size))

    def image_id(self, i: int) -> int:
        return i + 1  # COCO image ids start at 1, in write_coco as here

    def fitted(self, i: int) -> Fitted:
        """Scene i as the detector's input: rendered square at the input size (the letterbox of a square image)."""
        return Fitted(self[i][0], (1.0, 1.0), (self.size, self.size))


def coco_document(count: int, seed: int = 0, size: int = 64, masks: bool = True) -> dict:
    """The COCO detection document of scenes 0..count-1 of ``seed`` at ``size`` px (no pixels: cheap). Image ``i``
    has id ``i + 1`` and file name NNNNNN.png, as :func:`write_coco` and :class:`SyntheticDetection` number them."""
    images, annotations = [], []
    for i in range(count):
        spec, _ = synthetic_scene(i, seed)
        images.append({"id": i + 1, "file_name": f"{i:06d}.png", "width": size, "height": size})
        for ann in scene_annotations(spec, (size, size), masks):
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, **ann})
    return {
        "info": {"description": f"aimv2 built-in scenes, seed {seed}, {size} px"},
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }


class SyntheticSegmentation(SyntheticDetection):
    """Built-in scenes as a semantic-segmentation set: item i is (uint8 [3, size, size], long [size, size] label map,
    0 = background, k = category k), a pure function of (seed, i)."""

    def __getitem__(self, i: int):
        spec, _ = synthetic_scene(i, self.seed)
        img = torch.from_numpy(np.array(render(spec, self.size))).permute(2, 0, 1).contiguous()  # [3, S, S]
        return img, scene_label_map(spec, self.size)


def write_coco(out_dir: str | Path, count: int, seed: int = 0, size: int = 64, masks: bool = True) -> Path:
    """Render ``count`` scenes of ``seed`` as out_dir/images/NNNNNN.png and write out_dir/annotations.json (COCO
    detection format, :func:`coco_document`). Returns the JSON's path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    doc = coco_document(count, seed, size, masks)
    for i in tqdm(range(count), desc="scenes", unit="img", disable=count < 200):
        render(synthetic_scene(i, seed)[0], size).save(out / "images" / f"{i:06d}.png")
    path = out / "annotations.json"
    path.write_text(json.dumps(doc))
    return path
