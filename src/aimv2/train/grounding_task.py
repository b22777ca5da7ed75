"""``aimv2 ground train``: OWL-ViT-style grounding on the encoder's dense features, trained by the one trainer.

The task brings what grounding needs beyond the loop (train/tasks.py's ``Task``): a grounding set (referring
expressions of the built-in scenes, or a RefCOCO-style file and its image folder), step-indexed batches of
(image, phrase bytes, box), and ``grounder.safetensors`` (the whole model, with the encoder's config and the
``ground`` section in its header) after every checkpoint. Resume, the guard, bf16, DDP, micro-batches, metrics and
checkpoints are the trainer's.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import IterableDataset, get_worker_info

from ..config.checks import ConfigError
from ..config.grounding import GroundingConfig, check_grounding
from ..data.sources.refcoco import RefCocoStyle
from ..data.synthetic.referring import SyntheticGrounding
from ..data.transforms import mean_std
from ..models.grounding import encode_phrases
from ..objectives.grounding import PARTS, GroundingObjective, build_grounding_model
from ..weights import load_encoder
from ..weights.safetensors_io import write_safetensors
from .detection_task import dense_work
from .distributed import DistInfo
from .tasks import Work
from .trainer import fit

GROUNDER_FILE = "grounder.safetensors"


@dataclasses.dataclass
class GroundingBatch:
    images: torch.Tensor  # uint8 [B, 3, S, S]
    tokens: torch.Tensor  # long [B, L] phrase bytes (0 = padding)
    boxes: torch.Tensor  # float [B, 4] xyxy input pixels
    step: int
    worker: int = 0
    skipped: torch.Tensor | None = None  # long [len(FAULT_KINDS)] what this worker's set skipped so far

    def pin_memory(self):
        self.images = self.images.pin_memory()
        return self


def grounding_set(cfg: GroundingConfig):
    g = cfg.ground
    if cfg.data.source == "folder":
        return RefCocoStyle(g.annotations, cfg.data.folder, g.image_size, g.split, cfg.data.max_fault_rate)
    return SyntheticGrounding(g.synthetic_seed, g.image_size, cfg.data.synthetic_length)


class GroundingSteps(IterableDataset):
    """This rank's slice of each step's global batch, as detection's DetectionSteps: step s holds samples
    [s*G, (s+1)*G) (modulo the set's length), rank r its contiguous part; the data position is the step."""

    def __init__(self, dataset, global_batch, rank, world_size, start_step, steps, max_len):
        if global_batch % world_size:
            raise ValueError(f"train.batch_size {global_batch} is not divisible by {world_size} ranks")
        self.dataset, self.G, self.rank, self.world = dataset, global_batch, rank, world_size
        self.start, self.steps, self.max_len = start_step, steps, max_len
        self.length = None if getattr(dataset, "length", 0) is None else len(dataset)

    def batch(self, step: int, worker: int = 0) -> GroundingBatch:
        per = self.G // self.world
        first = step * self.G + self.rank * per
        idx = [first + j if self.length is None else (first + j) % self.length for j in range(per)]
        images, phrases, boxes = zip(*(self.dataset[i] for i in idx), strict=True)
        batch = GroundingBatch(
            torch.stack(images), encode_phrases(list(phrases), self.max_len), torch.stack(boxes), step, worker
        )
        if hasattr(self.dataset, "skipped_by_kind"):
            batch.skipped = torch.tensor(self.dataset.skipped_by_kind())
        return batch

    def __iter__(self):
        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info else (0, 1)
        for step in range(self.start + (w - self.start) % n, self.steps, n):
            yield self.batch(step, w)


class GroundingTask:
    name = "ground"
    weights_file = GROUNDER_FILE

    def __init__(self, cfg: GroundingConfig, encoder):
        self.cfg = cfg
        self.encoder = encoder
        self.show = {"loss": "loss", **{k: k for k in PARTS}}

    def prepare(self) -> None:
        pass

    def data(self, out_dir: Path, info: DistInfo, save: bool):
        return grounding_set(self.cfg)

    def build(self, source, fresh: bool) -> nn.Module:
        return build_grounding_model(self.cfg.ground, self.encoder, mean_std(self.cfg.data.mean_std))

    def stream(self, source, model: nn.Module, start_step: int, info: DistInfo) -> IterableDataset:
        t = self.cfg.train
        return GroundingSteps(
            source, t.batch_size, info.rank, info.world_size, start_step, t.steps, self.cfg.ground.max_text_len
        )

    def inputs(self, batch: GroundingBatch, device: torch.device) -> dict[str, torch.Tensor]:
        return {
            "images": batch.images.to(device, non_blocking=True).float() / 255,
            "tokens": batch.tokens.to(device),
            "boxes": batch.boxes.to(device),
        }

    def work(self, model: GroundingObjective, batch: GroundingBatch) -> Work:
        return dense_work(model.encoder, batch.images)

    def resumed(self, state: dict) -> None:
        pass

    def checkpoint_extra(self) -> dict:
        return {}

    def export(self, model: GroundingObjective, model_sd: dict, out_dir: Path) -> None:
        """grounder.safetensors: every weight, with what rebuilding the model needs in the header."""
        meta = {
            "ground": json.dumps(dataclasses.asdict(self.cfg.ground)),
            "encoder": json.dumps(model.encoder.cfg.to_dict()),
            "mean_std": self.cfg.data.mean_std,
        }
        write_safetensors({k: v.contiguous() for k, v in model_sd.items()}, out_dir / GROUNDER_FILE, meta)


def train_grounding(cfg: GroundingConfig) -> dict:
    """Run (or resume) the grounding training ``cfg`` describes; returns the last logged metrics."""
    check_grounding(cfg)
    torch.manual_seed(cfg.seed)
    encoder = load_encoder(cfg.ground.encoder, **cfg.ground.encoder_overrides)
    depth, p = len(encoder.blocks), encoder.patch_size
    if cfg.ground.train_blocks > depth:
        raise ConfigError(f"ground.train_blocks={cfg.ground.train_blocks} is beyond the encoder's {depth} blocks")
    if cfg.ground.image_size % p:
        raise ConfigError(f"ground.image_size={cfg.ground.image_size} is not a multiple of the patch size {p}")
    return fit(cfg, GroundingTask(cfg, encoder))
