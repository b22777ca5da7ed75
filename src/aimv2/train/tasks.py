"""The kinds of run the one trainer (train/trainer.py) knows: what each brings beyond the loop they share.

A task says what its data is (the source, the step stream, a batch as the objective's inputs, the work a batch is),
how its objective is built (after the data source, whose tokenizer sizes it), which extra fields its checkpoints
keep, and which weights file it exports after every checkpoint. ``ImageTextTask`` holds what the image-caption
objectives share (train/sources.py, train/data.py):

    PretrainTask   ``aimv2 pretrain``: AIMv2, a baseline or distillation from ``cfg.model`` (optionally
                   ``model.init_from``); exports encoder.safetensors (the encoder in Apple's layout); a distillation
                   teacher is read on every rank from the config, fresh or resumed, and never checkpointed
    LiTTask        ``aimv2 lit``: a text tower and pooling head against a frozen encoder; exports lit.safetensors

A new objective (a VLM stage, detection) is a new task here and an objective in ``objectives/``: the loop, resume,
guard, metrics and checkpoints come with the trainer.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
from torch import nn
from torch.utils.data import IterableDataset

from ..config import Config, LitConfig
from ..data.transforms import normalize
from ..models.encoder import VisionEncoder
from ..objectives import LiT, build_lit_model, build_model
from ..weights import LIT_FILE, CheckpointError, load_encoder, save_encoder, save_lit
from .data import Batch, ShardStepBatches, StepBatches
from .distributed import DistInfo
from .init_from import init_from
from .metrics import flops_per_sample
from .native import native_schedule
from .sources import Source, build_source
from .trainer import fit

ENCODER_FILE = "encoder.safetensors"  # what a pretraining run exports


class Work(NamedTuple):
    """What one rank's batch is, for the throughput metrics."""

    samples: int
    tokens: int  # image patches + text tokens (the objective's sequence positions)
    flops: float  # training FLOPs (forward + backward)
    patches: int  # patches per image (varies per step with data.native)


class Task(Protocol):
    name: str  # the progress bar's label
    show: dict[str, str]  # metric -> short name, for the log line and the progress bar
    weights_file: str  # the file export writes into out_dir

    def prepare(self) -> None:
        """Runs on every rank before the data source is built (LiT reads its encoder here)."""

    def data(self, out_dir: Path, info: DistInfo, save: bool):
        """The data source (rank 0 first with ``save``: it may write files, e.g. the tokenizer, into out_dir). A
        source with ``shards`` (webdataset readers) has its read positions saved and restored with the run."""

    def build(self, source, fresh: bool) -> nn.Module:
        """The objective, on CPU; ``fresh``: out_dir holds no checkpoint (a resumed run keeps its own weights)."""

    def stream(self, source, model: nn.Module, start_step: int, info: DistInfo) -> IterableDataset:
        """This rank's batches from ``start_step`` on, one per step (train/data.py's contract: ``batch.step``)."""

    def inputs(self, batch, device: torch.device) -> dict[str, torch.Tensor]:
        """A batch as the objective's inputs, on ``device`` (the objective picks ``input_names`` from them)."""

    def work(self, model: nn.Module, batch) -> Work:
        """The batch's samples, tokens and FLOPs, for samples/s, tokens/s and MFU."""

    def resumed(self, state: dict) -> None:
        """Called with the checkpoint a run resumes from."""

    def checkpoint_extra(self) -> dict:
        """Fields every checkpoint of the run keeps besides the trainer's own."""

    def export(self, model: nn.Module, model_sd: dict, out_dir: Path) -> None:
        """Rank 0, after each checkpoint: write ``weights_file`` from the gathered full state dict."""


class ImageTextTask:
    """Image-caption data for an objective with an ``encoder``: sources and tokenizer from ``cfg.data``, step
    streams with prefix lengths, images normalized on the device."""

    def __init__(self, cfg):
        self.cfg = cfg

    def source_options(self) -> dict:
        return {}

    def data(self, out_dir: Path, info: DistInfo, save: bool) -> Source:
        opts = self.source_options()
        return build_source(self.cfg, out_dir, save=save, rank=info.rank, world_size=info.world_size, **opts)

    def stream(self, source: Source, model: nn.Module, start_step: int, info: DistInfo) -> IterableDataset:
        cfg = self.cfg
        self.patch_size = model.encoder.cfg.patch_size
        common = dict(
            global_batch=cfg.train.batch_size,
            rank=info.rank,
            world_size=info.world_size,
            start_step=start_step,
            steps=cfg.train.steps,
            encode_text=source.tokenizer.encode,
            seed=cfg.seed,
            patch_size=model.encoder.cfg.patch_size,
            native=native_schedule(cfg, info),
        )
        if source.shards is not None:
            return ShardStepBatches(source.shards, **common)
        return StepBatches(
            source.sample_fn, length=source.length, native_fn=source.native_fn, faults=source.faults, **common
        )

    def inputs(self, batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
        grid_hw = batch.grid_hw  # per-image native: [B, 2], each image's own
        if grid_hw is None:  # one grid for the batch
            H, W = batch.images.shape[-2:]
            grid_hw = torch.tensor([H // self.patch_size, W // self.patch_size]).expand(len(batch.text), 2)
        return {
            # [B, 3, H, W] float, or per-image native patch tokens [B, A, p*p*3]
            "images": normalize(batch.images, self.cfg.data.mean_std, device),
            "text": batch.text.to(device, non_blocking=True),  # [B, T]
            "prefix_len": batch.prefix_len.to(device),  # [B]
            "grid_hw": grid_hw.to(device),  # [B, 2]
        }

    def work(self, model: nn.Module, batch: Batch) -> Work:
        """Tokens count real image patches (not padding); FLOPs count the padded length, which is computed."""
        p = model.encoder.cfg.patch_size
        B = len(batch.text)
        if batch.grid_hw is None:
            n_patches = (batch.images.shape[-2] // p) * (batch.images.shape[-1] // p)
            real = n_patches * B
        else:
            n_patches, real = batch.images.shape[1], int(batch.grid_hw.prod(1).sum())  # A_s, sum of n_b
        tokens = real + int((batch.text != self.pad_id).sum())
        return Work(B, tokens, flops_per_sample(model, n_patches, self.cfg.data.context_length) * B, n_patches)

    def resumed(self, state: dict) -> None:
        pass

    def checkpoint_extra(self) -> dict:
        return {}


class PretrainTask(ImageTextTask):
    name = "pretrain"
    show = {"loss": "loss", "image_loss": "img", "text_loss": "txt"}
    weights_file = ENCODER_FILE

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.origin = None  # where the weights came from (model.init_from); every checkpoint of the run keeps it
        self.teacher: VisionEncoder | None = None  # model.objective=distill: the frozen teacher, never checkpointed
        if cfg.model.objective == "distill":
            self.show = {"loss": "loss", "distill_cosine": "cos", "distill_smooth_l1": "l1"}
            if cfg.model.distill.aimv2 > 0:
                self.show.update(image_loss="img", text_loss="txt")

    def prepare(self) -> None:
        if self.cfg.model.objective == "distill":  # every rank reads the teacher itself, fresh run or resumed
            self.teacher = load_teacher(self.cfg)

    def build(self, source: Source, fresh: bool) -> nn.Module:
        tok = source.tokenizer
        self.pad_id = tok.pad_id
        model = build_model(self.cfg, tok.vocab_size, tok.pad_id, tok.eos_id, teacher=self.teacher)
        if self.cfg.model.init_from and fresh:  # resume wins: never re-apply init_from
            self.origin = init_from(model, self.cfg)
        return model

    def resumed(self, state: dict) -> None:
        self.origin = state.get("init_from")

    def checkpoint_extra(self) -> dict:
        # model.init_from's record (path, kind, layout, step, decoder, pos_embed) or None
        return {"init_from": self.origin}

    def export(self, model: nn.Module, model_sd: dict, out_dir: Path) -> None:
        """out_dir/encoder.safetensors in Apple's layout, through a meta-device encoder (no second weight copy)."""
        with torch.device("meta"):
            enc = VisionEncoder(model.encoder.cfg, name=model.encoder.name)
        sd = {k.removeprefix("encoder."): v for k, v in model_sd.items() if k.startswith("encoder.")}
        enc.load_state_dict(sd, strict=True, assign=True)
        save_encoder(enc, out_dir / ENCODER_FILE, layout="apple")  # atomic


def load_teacher(cfg: Config) -> VisionEncoder:
    """The frozen teacher of a distillation run: ``model.distill.teacher`` read like any ENCODER argument (a model
    name is a random encoder, the same on every rank and on resume under the run's seed)."""
    d = cfg.model.distill
    try:
        teacher = load_encoder(d.teacher, **d.teacher_overrides)
    except (CheckpointError, FileNotFoundError) as e:
        raise CheckpointError(f"model.distill.teacher: {e}") from e
    return teacher.requires_grad_(False).eval()


class LiTTask(ImageTextTask):
    name = "lit"
    show = {"loss": "loss", "acc": "acc", "logit_scale": "scale"}
    weights_file = LIT_FILE

    def __init__(self, cfg: LitConfig):
        super().__init__(cfg)
        self.encoder: VisionEncoder | None = None

    def prepare(self) -> None:
        # every rank reads the encoder itself; a model name is a random one, the same on every rank under the seed
        self.encoder = load_encoder(self.cfg.lit.encoder, **self.cfg.lit.encoder_overrides)

    def source_options(self) -> dict:
        return {"img_size": self.encoder.cfg.image_hw}

    def build(self, source: Source, fresh: bool) -> nn.Module:
        self.pad_id = source.tokenizer.pad_id
        return build_lit_model(self.cfg, self.encoder, source.tokenizer.vocab_size, source.tokenizer.eos_id)

    def export(self, model: nn.Module, model_sd: dict, out_dir: Path) -> None:
        """lit.safetensors (the whole model in our layout, its config in the header), through a meta-device copy."""
        with torch.device("meta"):
            export = LiT(dataclasses.replace(model.cfg))
        export.load_state_dict(model_sd, strict=True, assign=True)
        save_lit(export, out_dir / LIT_FILE, metadata={"mean_std": self.cfg.data.mean_std})  # atomic


def train(cfg: Config) -> dict:
    """Run (or resume) the pretraining described by ``cfg``; returns the last logged metrics."""
    return fit(cfg, PretrainTask(cfg))


def train_lit(cfg: LitConfig) -> dict:
    """Run (or resume) the LiT training described by ``cfg``; returns the last logged metrics."""
    return fit(cfg, LiTTask(cfg))
