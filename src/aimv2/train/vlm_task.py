"""``aimv2 vlm train``: a VLM stage as a task of the one trainer (train/trainer.py, the Task protocol of tasks.py).

The task brings the data (built-in scenes or a LLaVA file, tokenized with the LM's chat template, answers labelled
by data/chat.py), the objective (objectives/vlm.py: the encoder and the LM read here, on every rank), and its export
(``vlm.safetensors``: the parameters the run trains). Resume, micro-batches, DDP/FSDP2, bf16, the guard, metrics and
checkpoints are the trainer's.

The step stream is step-indexed like every other one (train/data.py): step s holds samples
[s * G, (s + 1) * G) of the (epoch-shuffled, when sized) dataset, this rank its slice, so a killed run resumes to
the same batches. A sample that cannot be used (its image missing or unreadable, or no answer left: no gpt turn,
or its first answer past ``vlm.max_length``) is replaced by the next usable one, deterministically, and counted;
answered turns dropped for ``vlm.max_length`` (``vlm.truncation=drop_turns``) are counted too. The counts reach
``metrics.jsonl`` as ``data_skipped/<kind>`` (``no_image``, ``bad_image``, ``no_answer``, ``dropped_turns``).
A run whose data has nothing to train on refuses before its first step (:func:`check_trainable`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import IterableDataset, get_worker_info

from ..config import ConfigError
from ..config.vlm import VLMConfig
from ..data.chat import conversation_turns, encode_turns, pad_batch, pad_id
from ..data.faults import FAULT_KINDS, FaultCounter
from ..data.records import RecordError
from ..data.sources.llava import LlavaConversations, has_answer, to_messages
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
    skipped: torch.Tensor | None = None  # long [len(FAULT_KINDS)] this worker's counts so far (train/data.py)

    def pin_memory(self):
        self.images = self.images.pin_memory()
        return self


log = logging.getLogger(__name__)
DROPPED = list(FAULT_KINDS).index("dropped_turns")


class ConversationSteps(IterableDataset):
    """This rank's VLMBatch for steps start_step..steps-1 (worker w of W makes the steps s with s % W == w)."""

    def __init__(
        self,
        dataset,
        tokenizer,
        *,
        global_batch,
        rank,
        world_size,
        start_step,
        steps,
        seed,
        max_length,
        truncation="drop_turns",
        max_fault_rate=0.5,
    ):
        if global_batch % world_size:
            raise ValueError(f"train.batch_size {global_batch} is not divisible by the number of ranks {world_size}")
        self.dataset, self.tokenizer, self.max_length, self.truncation = dataset, tokenizer, max_length, truncation
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
        self.faults = FaultCounter(max_rate=max_fault_rate)  # samples with no answer left
        self.dropped, self._warned = 0, 0.0  # answered turns dropped for max_length; when that was last logged

    def dataset_index(self, i: int) -> int:
        if self.length is None:  # an endless synthetic stream
            return i
        epoch, pos = divmod(i, self.length)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, 1, epoch]).permutation(self.length))
        return int(self._perm[1][pos])

    def sample(self, i: int):
        """(image, ids, labels) of global sample ``i``, or of the next usable dataset item after it."""
        first = self.dataset_index(i)
        n = self.length or 1_000_000
        for k in range(min(n, 100_000)):
            j = (first + k) % n
            item = self.dataset.get_item(j) if hasattr(self.dataset, "get_item") else self.dataset[j]
            if item is None:  # counted by the dataset
                continue
            image, messages = item
            enc = encode_turns(self.tokenizer, messages, self.max_length, self.truncation)
            if not enc.answers:
                why = (
                    "no gpt turn" if not enc.dropped else f"its first answer ends past vlm.max_length={self.max_length}"
                )
                where = self.dataset.describe(j) if hasattr(self.dataset, "describe") else f"sample {j}"
                self.faults.fault("no_answer", where, why)
                continue
            self.faults.ok()
            if enc.dropped:
                self.dropped += enc.dropped
                now = time.monotonic()
                if now - self._warned >= 30.0:
                    self._warned = now
                    log.warning(
                        "sample %d: %d answered turn(s) past vlm.max_length=%d dropped (%d so far; counted as "
                        "data_skipped/dropped_turns in metrics.jsonl; raise vlm.max_length to keep them)",
                        j, enc.dropped, self.max_length, self.dropped,
                    )  # fmt: skip
            return image, enc.ids, enc.labels
        raise RuntimeError(f"no usable conversation left in {self.dataset}")

    def skipped(self) -> torch.Tensor:
        counts = torch.tensor(self.faults.by_kind())
        ds = getattr(self.dataset, "faults", None)
        if ds is not None:
            counts += torch.tensor(ds.by_kind())
        counts[DROPPED] += self.dropped
        return counts

    def batch(self, step: int) -> VLMBatch:
        first = step * self.global_batch + self.rank * self.local
        indices = torch.arange(first, first + self.local)
        images, ids, labels = [], [], []
        for i in indices.tolist():
            image, row, lab = self.sample(i)
            images.append(image)
            ids.append(row)
            labels.append(lab)
        input_ids, labels, mask = pad_batch(ids, pad_id(self.tokenizer), labels=labels)
        return VLMBatch(torch.stack(images), input_ids, labels, mask, indices, step, skipped=self.skipped())

    def __iter__(self):
        info = get_worker_info()
        w, W = (info.id, info.num_workers) if info else (0, 1)
        for step in range(self.start_step + w, self.steps, W):
            batch = self.batch(step)
            batch.worker = w
            yield batch


def check_trainable(dataset, tokenizer, max_length: int, truncation: str, where: str, probe: int = 64) -> None:
    """Refuse, before the first step, data that would train on nothing: no record with an answer, or none of the
    first ``probe`` conversations keeping an answer within ``max_length`` tokens."""
    if isinstance(dataset, LlavaConversations):
        if not any(has_answer(r) for r in dataset.records):
            raise RecordError(
                f"no record has a gpt turn after a human turn ({where}): nothing to train on; give conversations "
                "with answers"
            )
        convs = [to_messages(r) for r in dataset.records[:probe] if has_answer(r)]
    else:
        n = probe if dataset.length is None else min(probe, dataset.length)
        convs = [to_messages(dataset.record(i)[1]) for i in range(n)]
    for messages in convs:
        if encode_turns(tokenizer, messages, max_length, truncation).answers:
            return
    p, a = conversation_turns(tokenizer, convs[0])[0]
    raise ConfigError(
        f"vlm.max_length={max_length} keeps no answer of the first {len(convs)} conversations ({where}; the first "
        f"one's first answer ends at token {len(p) + len(a)}): nothing to train on; raise vlm.max_length"
    )


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
            dataset = LlavaConversations(v.json, v.images, size, max_fault_rate=cfg.data.max_fault_rate)
        else:
            kind = "caption" if v.stage == 1 else "qa"
            dataset = SyntheticConversations(
                kind, seed=cfg.seed, size=size, turns=v.turns, length=cfg.data.synthetic_length
            )
        where = f"vlm.json={v.json}" if v.data == "llava" else "vlm.data=synthetic"
        check_trainable(dataset, self.tokenizer, v.max_length, v.truncation, where)
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
            truncation=cfg.vlm.truncation,
            max_fault_rate=cfg.data.max_fault_rate,
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
    if mult == 1.0 and decay == 1.0:  # the defaults: the encoder in the LM's group, as before these keys existed
        pass
    elif decay == 1.0:
        optim.lr_mult = {**optim.lr_mult, "encoder": mult}
    else:  # the patch embedding below block 0, the final norm with the last block
        blocks = {f"encoder.blocks.{i}": mult * decay ** (depth - 1 - i) for i in range(depth)}
        optim.lr_mult = {**optim.lr_mult, "encoder": mult * decay**depth, **blocks, "encoder.norm": mult}
    if v.encoder_warmup_steps:
        optim.lr_warmup = {**optim.lr_warmup, "encoder": v.encoder_warmup_steps}


def train_vlm(cfg: VLMConfig) -> dict:
    """Run (or resume) the VLM stage described by ``cfg``; returns the last logged metrics."""
    return fit(cfg, VLMTask(cfg))
