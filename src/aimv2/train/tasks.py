"""The kinds of run the one trainer (train/trainer.py) knows: what each brings beyond the loop they share.

A task says how its objective is built (after the data source, whose tokenizer sizes it), which extra fields its
checkpoints keep, and which weights file it exports after every checkpoint:

    PretrainTask   ``aimv2 pretrain``: AIMv2 or a baseline from ``cfg.model`` (optionally ``model.init_from``);
                   exports encoder.safetensors (the encoder in Apple's layout)
    LiTTask        ``aimv2 lit``: a text tower and pooling head against a frozen encoder; exports lit.safetensors

A new objective (a VLM stage, detection) is a new task here and an objective in ``objectives/``: the loop, resume,
guard, metrics and checkpoints come with the trainer.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ..config import Config, LitConfig
from ..data.tokenizer import Tokenizer
from ..models.encoder import VisionEncoder
from ..objectives import LiT, build_lit_model, build_model
from ..weights import LIT_FILE, load_encoder, save_encoder, save_lit
from . import checkpointing as ckpt
from .init_from import init_from
from .trainer import fit

ENCODER_FILE = "encoder.safetensors"  # what a pretraining run exports


class Task(Protocol):
    name: str  # the progress bar's label
    show: dict[str, str]  # metric -> short name, for the log line and the progress bar
    weights_file: str  # the file export writes into out_dir

    def prepare(self) -> dict:
        """Runs on every rank before the data source is built; returns build_source keyword arguments."""

    def build(self, tokenizer: Tokenizer, fresh: bool) -> nn.Module:
        """The objective, on CPU; ``fresh``: out_dir holds no checkpoint (a resumed run keeps its own weights)."""

    def resumed(self, state: dict) -> None:
        """Called with the checkpoint a run resumes from."""

    def checkpoint_extra(self) -> dict:
        """Fields every checkpoint of the run keeps besides the trainer's own."""

    def export(self, model: nn.Module, model_sd: dict, out_dir: Path) -> None:
        """Rank 0, after each checkpoint: write ``weights_file`` from the gathered full state dict."""


class PretrainTask:
    name = "pretrain"
    show = {"loss": "loss", "image_loss": "img", "text_loss": "txt"}
    weights_file = ENCODER_FILE

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.origin = None  # where the weights came from (model.init_from); every checkpoint of the run keeps it

    def prepare(self) -> dict:
        return {}

    def build(self, tokenizer: Tokenizer, fresh: bool) -> nn.Module:
        model = build_model(self.cfg, tokenizer.vocab_size, tokenizer.pad_id, tokenizer.eos_id)
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
        ckpt.atomic_write(out_dir / ENCODER_FILE, lambda tmp: save_encoder(enc, tmp, layout="apple"))


class LiTTask:
    name = "lit"
    show = {"loss": "loss", "acc": "acc", "logit_scale": "scale"}
    weights_file = LIT_FILE

    def __init__(self, cfg: LitConfig):
        self.cfg = cfg
        self.encoder: VisionEncoder | None = None

    def prepare(self) -> dict:
        # every rank reads the encoder itself; a model name is a random one, the same on every rank under the seed
        self.encoder = load_encoder(self.cfg.lit.encoder, **self.cfg.lit.encoder_overrides)
        return {"img_size": self.encoder.cfg.image_hw}

    def build(self, tokenizer: Tokenizer, fresh: bool) -> nn.Module:
        return build_lit_model(self.cfg, self.encoder, tokenizer.vocab_size, tokenizer.eos_id)

    def resumed(self, state: dict) -> None:
        pass

    def checkpoint_extra(self) -> dict:
        return {}

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
