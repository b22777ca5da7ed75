"""``aimv2 vlm train``: a VLM stage as a task of the one trainer (train/trainer.py, the Task protocol of tasks.py).

The task brings the data (built-in scenes or a LLaVA file, tokenized with the LM's chat template, answers labelled
by data/chat.py), the objective (objectives/vlm.py: the encoder and the LM read here, on every rank), and its export
(``vlm.safetensors``: the parameters the run trains). Resume, micro-batches, DDP/FSDP2, bf16, the guard, metrics and
checkpoints are the trainer's.

The step stream is step-indexed like every other one (train/data.py): step s holds samples
[s * G, (s + 1) * G) of the (epoch-shuffled, when sized) dataset, this rank its slice, so a killed run resumes to
the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import IterableDataset, get_worker_info

from ..config.vlm import VLMConfig
from ..data.chat import encode_conversation, pad_batch
from ..data.sources.llava import LlavaConversations
from ..data.synthetic.questions import SyntheticConversations
from ..data.transforms import normalize
from ..objectives.tiling import num_views
from ..objectives.vlm import VisionLanguageModel
from ..weights import load_encoder
from ..weights.lm import VLM_FILE, build_vlm, load_causal_lm, load_vlm_weights, save_vlm
from . import checkpointing as ckpt
from .distributed import DistInfo
from .tasks import Work
from .trainer import fit


@dataclass
class VLMBatch:
    images: torch.Tensor  # uint8 [B, 3, H, W]
    input_ids: torch.Tensor  # long [B, T], right-padded
    labels: torch.Tensor  # long [B, T], -100 off the answers
    attention_mask: torch.Tensor  # long [B, T]
    indices: torch.Tensor  # long [B] global sample indices
    step: int
    worker: int = 0

    def pin_memory(self):
        self.images = self.images.pin_memory()
        return self


class ConversationSteps(IterableDataset):
    """This rank's VLMBatch for steps start_step..steps-1 (worker w of W makes the steps s with s % W == w)."""

    def __init__(self, dataset, tokenizer, *, global_batch, rank, world_size, start_step, steps, seed, max_length):
        if global_batch % world_size:
            raise ValueError(f"train.batch_size {global_batch} is not divisible by the number of ranks {world_size}")
        self.dataset, self.tokenizer, self.max_length = dataset, tokenizer, max_length
        self.local = global_batch // world_size
        self.global_batch, self.rank, self.start_step, self.steps, self.seed = (
            global_batch,
            rank,
            start_step,
            steps,
            seed,
        )
        self.length = dataset.length if isinstance(dataset, SyntheticConversations) else len(dataset)
        self._perm: tuple[int, np.ndarray] | None = None  # (epoch, its permutation)

    def dataset_index(self, i: int) -> int:
        if self.length is None:  # an endless synthetic stream
            return i
        epoch, pos = divmod(i, self.length)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, 1, epoch]).permutation(self.length))
        return int(self._perm[1][pos])

    def batch(self, step: int) -> VLMBatch:
        first = step * self.global_batch + self.rank * self.local
        indices = torch.arange(first, first + self.local)
        images, ids, labels = [], [], []
        for i in indices.tolist():
            image, messages = self.dataset[self.dataset_index(i)]
            row, lab = encode_conversation(self.tokenizer, messages, self.max_length)
            images.append(image)
            ids.append(row)
            labels.append(lab)
        input_ids, labels, mask = pad_batch(ids, self.tokenizer.pad_token_id, labels=labels)
        return VLMBatch(torch.stack(images), input_ids, labels, mask, indices, step)

    def __iter__(self):
        info = get_worker_info()
        w, W = (info.id, info.num_workers) if info else (0, 1)
        for step in range(self.start_step + w, self.steps, W):
            yield self.batch(step)


@dataclass
class ConversationSource:
    dataset: object
    tokenizer: object
    shards = None  # not a webdataset source: resumed by the step alone


class VLMTask:
    show = {"loss": "loss"}
    weights_file = VLM_FILE

    def __init__(self, cfg: VLMConfig):
        self.cfg = cfg
        self.name = f"vlm stage {cfg.vlm.stage}"
        self.encoder = self.lm = self.tokenizer = None

    def prepare(self) -> None:
        v = self.cfg.vlm
        self.encoder = load_encoder(v.encoder, **v.encoder_overrides)
        self.lm, self.tokenizer = load_causal_lm(v.lm)

    def data(self, out_dir: Path, info: DistInfo, save: bool) -> ConversationSource:
        v, cfg = self.cfg.vlm, self.cfg
        h, w = self.encoder.cfg.image_hw
        size = (v.tiles[0] * h, v.tiles[1] * w)
        if v.data == "llava":
            dataset = LlavaConversations(v.json, v.images, size)
        else:
            kind = "caption" if v.stage == 1 else "qa"
            dataset = SyntheticConversations(
                kind, seed=cfg.seed, size=size, turns=v.turns, length=cfg.data.synthetic_length
            )
        return ConversationSource(dataset, self.tokenizer)

    def build(self, source: ConversationSource, fresh: bool) -> nn.Module:
        if self.cfg.vlm.train_encoder:  # before the trainer builds the optimizer from cfg.optim
            encoder_recipe(self.cfg, len(self.encoder.blocks))
        model = build_vlm(self.cfg, self.encoder, self.lm, self.tokenizer)
        if fresh and self.cfg.vlm.init_from:  # stage 2 starts from stage 1's projector; resume wins
            load_vlm_weights(model, Path(self.cfg.vlm.init_from) / VLM_FILE)
        return model

    def stream(self, source: ConversationSource, model: nn.Module, start_step: int, info: DistInfo):
        cfg = self.cfg
        return ConversationSteps(
            source.dataset,
            source.tokenizer,
            global_batch=cfg.train.batch_size,
            rank=info.rank,
            world_size=info.world_size,
            start_step=start_step,
            steps=cfg.train.steps,
            seed=cfg.seed,
            max_length=cfg.vlm.max_length,
        )

    def inputs(self, batch: VLMBatch, device: torch.device) -> dict[str, torch.Tensor]:
        return {
            "images": normalize(batch.images, self.cfg.data.mean_std, device),  # [B, 3, H, W] float
            "input_ids": batch.input_ids.to(device),  # [B, T]
            "labels": batch.labels.to(device),  # [B, T]
            "attention_mask": batch.attention_mask.to(device),  # [B, T]
        }

    def work(self, model: VisionLanguageModel, batch: VLMBatch) -> Work:
        """LM positions (text + image tokens) as tokens; FLOPs ~ 2 x params per position forward (x 3 with the
        backward through the LM, which stage 1 needs too for the projector's gradient), plus the encoder forward."""
        B = len(batch.input_ids)
        K = model.tokens_per_image
        positions = int(batch.attention_mask.sum()) + (K - 1) * B
        n_lm = sum(p.numel() for p in model.lm.parameters())
        n_enc = sum(p.numel() for p in model.encoder.parameters())
        gh, gw = model.encoder.cfg.grid_size
        patches = gh * gw * num_views(model.tiles)  # encoded per image
        flops = 6.0 * n_lm * positions + 2.0 * n_enc * patches * B
        return Work(B, positions, flops, patches)

    def resumed(self, state: dict) -> None:
        pass

    def checkpoint_extra(self) -> dict:
        return {}

    def export(self, model: nn.Module, model_sd: dict, out_dir: Path) -> None:
        meta = {"stage": self.cfg.vlm.stage, "encoder": self.cfg.vlm.encoder, "lm": self.cfg.vlm.lm}
        ckpt.atomic_write(out_dir / VLM_FILE, lambda tmp: save_vlm(model, tmp, model_sd, metadata=meta))


def encoder_recipe(cfg: VLMConfig, depth: int) -> None:
    """Unfreezing the encoder (``vlm.train_encoder``) without wrecking it: fill ``cfg.optim``'s per-module lr
    multipliers and warmups for the encoder from ``vlm.encoder_lr_mult`` / ``encoder_warmup_steps`` /
    ``encoder_layer_decay``, unless the config already names the encoder there (then the user's values stand).

    Why: the projector and the LM arrive at the encoder's features with large gradients (a fresh projector, a
    stage-1 one meeting a moving LM). At the LM's lr, AdamW's first steps move every encoder weight by ~lr whatever
    its gradient's size, and the features the LM reads drift faster than it can follow; a smaller multiplier and a
    ramp from 0 while AdamW's moments fill keep the encoder's update small against its weights. Layer-wise decay
    (BEiT's) moves the early blocks, the most generic, least."""
    v, optim = cfg.vlm, cfg.optim
    names_encoder = any(k == "encoder" or k.startswith("encoder.") for k in [*optim.lr_mult, *optim.lr_warmup])
    if names_encoder:
        return
    mult, decay = v.encoder_lr_mult, v.encoder_layer_decay
    if decay == 1.0:
        optim.lr_mult = {**optim.lr_mult, "encoder": mult}
    else:  # the patch embedding below block 0, the final norm with the last block
        blocks = {f"encoder.blocks.{i}": mult * decay ** (depth - 1 - i) for i in range(depth)}
        optim.lr_mult = {**optim.lr_mult, "encoder": mult * decay**depth, **blocks, "encoder.norm": mult}
    if v.encoder_warmup_steps:
        optim.lr_warmup = {**optim.lr_warmup, "encoder": v.encoder_warmup_steps}


def train_vlm(cfg: VLMConfig) -> dict:
    """Run (or resume) the VLM stage described by ``cfg``; returns the last logged metrics."""
    return fit(cfg, VLMTask(cfg))
