"""Detection and segmentation metrics with the standard implementations, predictions as COCO JSON, and pictures.

    detect_fitted  a detector on images fitted to its input (data/letterbox.py) -> detections in original pixels
    predict_coco   a detector over a dataset -> COCO result records (boxes in each image's original pixels)
    coco_eval      pycocotools' COCOeval on ground truth (a JSON file or document) and results -> AP, AP50, AP75, ...
    mean_iou       semantic segmentation's mIoU from a confusion matrix (classes absent from both sides left out)
    draw           boxes with their class names and scores drawn on an image (torchvision's draw_bounding_boxes)
    load_detector  a detection run folder's exported model (detector.safetensors) back as an objective

pycocotools is imported when an evaluation runs, so predicting and drawing work without it.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.utils import draw_bounding_boxes
from tqdm import tqdm

from ..config.detection import DetectorConfig
from ..data.letterbox import Fitted, to_original
from ..data.sources.coco import check_coco, read_coco
from ..data.transforms import mean_std as mean_std_of
from ..models.encoder import EncoderConfig, VisionEncoder
from ..objectives.detection import DetectionObjective, build_detection_model
from ..weights.safetensors_io import read_safetensors

DETECTOR_FILE = "detector.safetensors"
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def detect_fitted(model: DetectionObjective, fitted: list[Fitted], device="cpu") -> list[dict[str, torch.Tensor]]:
    """Detections of images already fitted to the input (data/letterbox.py), boxes back in each image's original
    pixels: what ``detect predict`` and ``detect eval`` both run, so they give the same boxes."""
    if not fitted:
        return []
    images = torch.stack([f.pixels for f in fitted]).to(device).float() / 255
    out = []
    for f, det in zip(fitted, model.predict(images), strict=True):
        det = {k: v.cpu() for k, v in det.items()}
        out.append({**det, "boxes": to_original(det["boxes"], f)})
    return out


def coco_records(image_id: int, det: dict, category_ids: list[int], **extra) -> list[dict]:
    """COCO result records of one image's detections (boxes xyxy in its pixels; label k is category_ids[k - 1])."""
    return [
        {"image_id": image_id, **extra, "category_id": category_ids[k - 1], "bbox": [x0, y0, x1 - x0, y1 - y0],
         "score": s}
        for (x0, y0, x1, y1), s, k in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist(),
                                          strict=True)
    ]  # fmt: skip


def predict_coco(
    model: DetectionObjective,
    dataset,
    batch_size: int = 16,
    device="cpu",
    progress: bool = False,
    category_ids: list[int] | None = None,
) -> list[dict]:
    """COCO result records ({image_id, category_id, bbox [x, y, w, h], score}) of every readable image of
    ``dataset`` (it has ``fitted(i)``, ``image_id(i)`` and ``category_ids``; an image it cannot read, ``None``, is
    left out and counted by the set), boxes in each image's original pixels. ``category_ids`` (default the set's)
    maps the model's labels to ids: label k is ``category_ids[k - 1]``."""
    ids = list(category_ids or dataset.category_ids)
    loader = DataLoader(range(len(dataset)), batch_size=batch_size, collate_fn=list)
    records = []
    for idx in tqdm(loader, desc="predict", unit="batch", disable=not progress):
        fitted = [(i, f) for i in idx if (f := dataset.fitted(i)) is not None]
        dets = detect_fitted(model, [f for _, f in fitted], device)
        for (i, _), det in zip(fitted, dets, strict=True):
            records += coco_records(dataset.image_id(i), det, ids)
    return records


def coco_eval(ground_truth: str | Path | dict, results: list[dict] | str | Path, iou_type: str = "bbox") -> dict:
    """pycocotools' COCOeval: {"AP", "AP50", "AP75", "APs", "APm", "APl"} (COCO's stats, -1 where a size range has
    no ground truth). ``ground_truth`` a COCO JSON path or document; ``results`` records or a results JSON."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as e:
        raise ImportError("detection AP needs pycocotools: pip install pycocotools") from e
    if isinstance(ground_truth, str | Path):
        doc = read_coco(ground_truth, files=False)
    else:
        doc = check_coco(ground_truth, "the ground truth document", files=False)
    if isinstance(results, str | Path):
        results = json.loads(Path(results).read_text())
    if not results:
        return dict.fromkeys(STAT_NAMES, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and table
        gt = COCO()
        gt.dataset = doc
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: float(v) for k, v in zip(STAT_NAMES, ev.stats[:6], strict=True)}


def mean_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255) -> dict:
    """mIoU of label maps (any shape, same for both): per class TP / (TP + FP + FN) from one confusion matrix,
    averaged over the classes present in the prediction or the target. Returns {"mIoU", "IoU": [per class or nan]}."""
    keep = target != ignore_index
    p, t = pred[keep].long(), target[keep].long()
    conf = torch.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes).double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.nan)
    return {"mIoU": float(iou.nanmean()), "IoU": iou.tolist()}


def draw(image: torch.Tensor, detections: dict, names: list[str], min_score: float = 0.3) -> Image.Image:
    """uint8 [3, H, W] with the detections scoring >= ``min_score`` drawn as labelled boxes; ``names[k - 1]`` is
    label k's name."""
    keep = detections["scores"] >= min_score
    if not keep.any():  # nothing to draw (torchvision would warn about it)
        return Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    labels = [
        f"{names[k - 1]} {s:.2f}"
        for k, s in zip(detections["labels"][keep].tolist(), detections["scores"][keep].tolist(), strict=True)
    ]
    out = draw_bounding_boxes(image, detections["boxes"][keep].cpu(), labels=labels, colors="yellow", width=1)
    return Image.fromarray(out.permute(1, 2, 0).numpy())


def load_detector(run_dir: str | Path) -> tuple[DetectionObjective, dict]:
    """A detection run's exported model (run_dir/detector.safetensors) and its metadata: categories (label k is
    categories[k - 1], COCO id category_ids[k - 1]), mean_std and the ``detect`` section it was trained with."""
    path = Path(run_dir) / DETECTOR_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: train with `aimv2 detect train` (it is written at each checkpoint)")
    tensors, meta = read_safetensors([path])
    d = DetectorConfig(**json.loads(meta["detect"]))
    with torch.device("meta"):
        encoder = VisionEncoder(EncoderConfig(**json.loads(meta["encoder"])))
    categories = json.loads(meta["categories"])
    model = build_detection_model(d, encoder, len(categories) + 1, mean_std_of(meta["mean_std"]))
    model.load_state_dict(tensors, strict=True, assign=True)
    ids = json.loads(meta["category_ids"])
    return model.eval(), {"categories": categories, "category_ids": ids, "mean_std": meta["mean_std"], "detect": d}
