"""Grounding's metric, evaluation, model loading and pictures.

grounding_accuracy  RefCOCO's metric: the share of phrases whose top box overlaps theirs at IoU >= 0.5
evaluate_grounding  a grounder over a set -> accuracy, mean IoU, and per-phrase records (boxes in original pixels)
ground_phrases      a grounder on one image fitted to its input and several phrases -> boxes in original pixels
load_grounder       a grounding run folder's exported model (grounder.safetensors) back as an objective
draw_phrases        the image with each phrase's box and the phrase drawn
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from torchvision.ops import box_iou
from torchvision.utils import draw_bounding_boxes
from tqdm import tqdm

from ..config.grounding import GrounderConfig
from ..data.letterbox import Fitted, to_original
from ..data.transforms import mean_std as mean_std_of
from ..models.encoder import EncoderConfig, VisionEncoder
from ..models.grounding import encode_phrases
from ..objectives.grounding import GroundingObjective, build_grounding_model
from ..weights.safetensors_io import read_safetensors

GROUNDER_FILE = "grounder.safetensors"
COLOURS = ["yellow", "cyan", "magenta", "lime", "orange", "white"]


def grounding_accuracy(pred: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> float:
    """Share of rows whose predicted box [N, 4] overlaps the target box [N, 4] (xyxy) at IoU >= ``threshold``."""
    if len(pred) == 0:
        return 0.0
    iou = box_iou(pred.float(), target.float()).diagonal()
    return float((iou >= threshold).float().mean())


def ground_phrases(model: GroundingObjective, fitted: Fitted, phrases: list[str], device="cpu"):
    """Top boxes (xyxy, the image's original pixels) [P, 4] and scores [P] of ``phrases`` on one fitted image."""
    max_len = model.model.text.pos.shape[1]
    images = fitted.pixels[None].expand(len(phrases), -1, -1, -1).to(device).float() / 255
    boxes, scores = model.predict(images, encode_phrases(phrases, max_len).to(device))
    return to_original(boxes.cpu(), fitted), scores.cpu()


def evaluate_grounding(model: GroundingObjective, dataset, batch_size: int = 32, device="cpu", progress=False):
    """({"accuracy", "mean_iou", "phrases"}, records) over every readable sample of ``dataset`` (``fitted(i)`` ->
    (Fitted, phrase, box in original pixels) or None for an unreadable image)."""
    max_len = model.model.text.pos.shape[1]
    preds, targets, records = [], [], []
    for start in tqdm(range(0, len(dataset), batch_size), desc="ground", unit="batch", disable=not progress):
        items = [it for i in range(start, min(start + batch_size, len(dataset))) if (it := dataset.fitted(i))]
        if not items:
            continue
        images = torch.stack([f.pixels for f, _, _ in items]).to(device).float() / 255
        boxes, scores = model.predict(images, encode_phrases([p for _, p, _ in items], max_len).to(device))
        for (f, phrase, box), b, s in zip(items, boxes.cpu(), scores.cpu(), strict=True):
            b = to_original(b[None], f)[0]
            preds.append(b)
            targets.append(box)
            records.append({"phrase": phrase, "bbox": [*b[:2].tolist(), *(b[2:] - b[:2]).tolist()], "score": float(s)})
    if not preds:
        return {"accuracy": 0.0, "mean_iou": 0.0, "phrases": 0}, records
    pred, target = torch.stack(preds), torch.stack(targets)
    stats = {
        "accuracy": grounding_accuracy(pred, target),
        "mean_iou": float(box_iou(pred, target).diagonal().mean()),
        "phrases": len(preds),
    }
    return stats, records


def load_grounder(run_dir: str | Path) -> tuple[GroundingObjective, dict]:
    """A grounding run's exported model (run_dir/grounder.safetensors) and its metadata (``ground`` section)."""
    path = Path(run_dir) / GROUNDER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: train with `aimv2 ground train` (it is written at each checkpoint)")
    tensors, meta = read_safetensors([path])
    g = GrounderConfig(**json.loads(meta["ground"]))
    with torch.device("meta"):
        encoder = VisionEncoder(EncoderConfig(**json.loads(meta["encoder"])))
    model = build_grounding_model(g, encoder, mean_std_of(meta["mean_std"]))
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval(), {"ground": g, "mean_std": meta["mean_std"]}


def draw_phrases(image: torch.Tensor, boxes: torch.Tensor, phrases: list[str], scores: torch.Tensor) -> Image.Image:
    """uint8 [3, H, W] with each phrase's box and the phrase (and its score) drawn, one colour per phrase."""
    labels = [f"{p} {s:.2f}" for p, s in zip(phrases, scores.tolist(), strict=True)]
    colours = [COLOURS[i % len(COLOURS)] for i in range(len(phrases))]
    out = draw_bounding_boxes(image, boxes, labels=labels, colors=colours, width=2)
    return Image.fromarray(out.permute(1, 2, 0).numpy())
