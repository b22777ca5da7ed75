"""``aimv2 detect train``: a torchvision detector on the encoder's pyramid, trained by the project's one trainer.

The task brings what detection needs beyond the loop (train/tasks.py's ``Task``): a detection set (the built-in
scenes, or a COCO JSON and its image folder), step-indexed batches of padded targets, and ``detector.safetensors``
(the whole model, with the encoder's config and the categories in its header) after every checkpoint. Resume, the
guard, bf16, DDP, micro-batches, metrics and checkpoints are the trainer's.

How much of the encoder trains is ``detect.train_blocks`` (all, none, the last k blocks); layer-wise lr decay
(``detect.layer_decay``) becomes per-block ``optim.lr_mult`` entries, so the saved config.yaml holds the
multipliers the optimizer used.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import IterableDataset, get_worker_info

from ..config.detection import DetectionConfig, check_detection, check_detection_encoder
from ..data.sources.coco import CocoDetection, collate_detection
from ..data.synthetic.boxes import SyntheticDetection
from ..data.transforms import mean_std
from ..errors import DataError
from ..models.encoder import VisionEncoder
from ..objectives.detection import DetectionObjective, build_detection_model, encoder_train_flops
from ..weights import load_encoder
from ..weights.safetensors_io import write_safetensors
from .distributed import DistInfo
from .tasks import Work
from .trainer import fit

DETECTOR_FILE = "detector.safetensors"
SHORT = {  # torchvision's loss names -> the progress bar's
    "classification": "cls",
    "bbox_regression": "box",
    "bbox_ctrness": "ctr",
    "loss_classifier": "cls",
    "loss_box_reg": "box",
    "loss_objectness": "obj",
    "loss_rpn_box_reg": "rpn_box",
}


@dataclasses.dataclass
class DetectionBatch:
    images: torch.Tensor  # uint8 [B, 3, S, S]
    boxes: torch.Tensor  # float [B, M, 4] xyxy pixels
    labels: torch.Tensor  # long [B, M], 0 = padding
    step: int
    worker: int = 0
    skipped: torch.Tensor | None = None  # long [len(FAULT_KINDS)] what this worker's set skipped so far, by kind

    def pin_memory(self):
        self.images = self.images.pin_memory()
        return self


def detection_set(cfg: DetectionConfig):
    """The training set a config names: built-in scenes (endless unless data.synthetic_length) or a COCO folder."""
    d = cfg.detect
    if cfg.data.source == "folder":
        data = CocoDetection(d.annotations, cfg.data.folder, d.image_size, max_fault_rate=cfg.data.max_fault_rate)
        if not data.boxes:
            raise DataError(
                f"{d.annotations} holds no box to train on ({len(data)} images, {len(data.document['annotations'])} "
                f"annotations, crowd and empty boxes left out): training on nothing; give annotations with bboxes"
            )
        return data
    return SyntheticDetection(d.synthetic_seed, d.image_size, cfg.data.synthetic_length)


class DetectionSteps(IterableDataset):
    """This rank's slice of each step's global batch: step s holds samples [s*G, (s+1)*G) (modulo the set's length),
    rank r its contiguous part; worker w of W makes the steps with s % W == w. The data position is the step."""

    def __init__(self, dataset, global_batch: int, rank: int, world_size: int, start_step: int, steps: int):
        if global_batch % world_size:
            raise ValueError(f"train.batch_size {global_batch} is not divisible by {world_size} ranks")
        self.dataset, self.G, self.rank, self.world = dataset, global_batch, rank, world_size
        self.start, self.steps = start_step, steps
        self.length = None if getattr(dataset, "length", 0) is None else len(dataset)  # None: endless

    def batch(self, step: int, worker: int = 0) -> DetectionBatch:
        per = self.G // self.world
        first = step * self.G + self.rank * per
        idx = [first + j if self.length is None else (first + j) % self.length for j in range(per)]
        batch = DetectionBatch(*collate_detection([self.dataset[i] for i in idx]), step=step, worker=worker)
        if hasattr(self.dataset, "skipped_by_kind"):  # a set read from files counts what it skipped
            batch.skipped = torch.tensor(self.dataset.skipped_by_kind(listing=worker == 0))  # listing: counted once
        return batch

    def __iter__(self):
        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info else (0, 1)
        for step in range(self.start + (w - self.start) % n, self.steps, n):
            yield self.batch(step, w)


class DetectionTask:
    name = "detect"
    weights_file = DETECTOR_FILE

    def __init__(self, cfg: DetectionConfig, encoder: VisionEncoder):
        self.cfg = cfg
        self.encoder = encoder  # read by every rank itself (train_detection), before the config is saved
        self.show = {"loss": "loss"}

    def prepare(self) -> None:
        pass

    def data(self, out_dir: Path, info: DistInfo, save: bool):
        return detection_set(self.cfg)

    def build(self, source, fresh: bool) -> nn.Module:
        model = build_detection_model(
            self.cfg.detect, self.encoder, len(source.categories) + 1, mean_std(self.cfg.data.mean_std)
        )
        self.categories = [c["name"] for c in source.categories]
        self.category_ids = list(source.category_ids)
        self.show = {"loss": "loss", **{k: SHORT[k] for k in model.parts}}
        return model

    def stream(self, source, model: nn.Module, start_step: int, info: DistInfo) -> IterableDataset:
        t = self.cfg.train
        return DetectionSteps(source, t.batch_size, info.rank, info.world_size, start_step, t.steps)

    def inputs(self, batch: DetectionBatch, device: torch.device) -> dict[str, torch.Tensor]:
        return {
            "images": batch.images.to(device, non_blocking=True).float() / 255,  # the detector normalizes
            "boxes": batch.boxes.to(device),
            "labels": batch.labels.to(device),
        }

    def work(self, model: DetectionObjective, batch: DetectionBatch) -> Work:
        return dense_work(model.encoder, batch.images)

    def resumed(self, state: dict) -> None:
        pass

    def checkpoint_extra(self) -> dict:
        return {}

    def export(self, model: DetectionObjective, model_sd: dict, out_dir: Path) -> None:
        """detector.safetensors: every weight, with what rebuilding the model needs in the header."""
        meta = {
            "detect": json.dumps(dataclasses.asdict(self.cfg.detect)),
            "encoder": json.dumps(model.encoder.cfg.to_dict()),
            "categories": json.dumps(self.categories),
            "category_ids": json.dumps(self.category_ids),
            "mean_std": self.cfg.data.mean_std,
        }
        tensors = {k: v.contiguous() for k, v in model_sd.items()}
        write_safetensors(tensors, out_dir / DETECTOR_FILE, meta)  # atomic


def with_layer_decay(cfg: DetectionConfig, model: DetectionObjective) -> DetectionConfig:
    """cfg with detect.layer_decay written into optim.lr_mult (user entries win over the derived ones)."""
    mults = {**model.layer_decay_mults(cfg.detect.layer_decay), **cfg.optim.lr_mult}
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr_mult=mults))


def train_detection(cfg: DetectionConfig) -> dict:
    """Run (or resume) the detection training ``cfg`` describes; returns the last logged metrics."""
    check_detection(cfg)
    torch.manual_seed(cfg.seed)  # a model name gives random weights: the same on every rank
    encoder = load_encoder(cfg.detect.encoder, **cfg.detect.encoder_overrides)
    check_detection_encoder(cfg.detect, depth=len(encoder.blocks), patch_size=encoder.patch_size)
    if cfg.detect.layer_decay != 1.0:  # the multipliers name the encoder's blocks: derive them on a meta copy
        with torch.device("meta"):
            probe = build_detection_model(cfg.detect, VisionEncoder(encoder.cfg), 2, mean_std(cfg.data.mean_std))
        cfg = with_layer_decay(cfg, probe)
    return fit(cfg, DetectionTask(cfg, encoder))


def dense_work(encoder, images: torch.Tensor) -> Work:
    """A dense task's step (detection, grounding): images [B, 3, H, W] through the encoder, counted as its patches
    and the encoder's training FLOPs (the heads are small beside it)."""
    p = encoder.patch_size
    n = (images.shape[-2] // p) * (images.shape[-1] // p)
    B = len(images)
    return Work(B, n * B, encoder_train_flops(encoder, n) * B, n)
