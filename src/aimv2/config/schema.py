"""The run configuration's schema: typed sections, one dataclass each, with their defaults.

Numbers live here; sizes are derived in code. The resolved config is written to ``out_dir/config.yaml``
so a run can be reproduced (and resumed) from its folder alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class ClipConfig:
    """model.objective=clip: the contrastive baseline (objectives/lit.py)."""

    pool: str = "mean"  # mean | attention (AIMv2's attention-pool head) over the encoder's patch features
    text_size: str = "auto"  # auto (the encoder's size if tiny|small, else base) | tiny | small | base
    projection_dim: int | None = None  # None: the encoder width
    init_temperature: float = 0.07  # learned; logit scale starts at ln(1 / init_temperature)


@dataclass
class DistillConfig:
    """model.objective=distill: the encoder learns a frozen teacher encoder's patch features (objectives/distill.py).
    Our recipe: Apple distilled aimv2-large-patch14-*-distilled from AIMv2-3B but has not published how."""

    # required: anything aimv2's ENCODER argument reads (a model name, a .safetensors checkpoint in any layout, a
    # transformers folder, a pretraining run folder, hf:REPO[@REV]); rebuilt from here on resume, never saved
    teacher: str | None = None
    teacher_overrides: dict[str, Any] = field(default_factory=dict)  # the teacher's config fields, e.g. {img_size: 64}
    cosine: float = 1.0  # weight of 1 - cos(projected student feature, teacher feature), per patch
    smooth_l1: float = 1.0  # weight of the smooth-L1 distance of the same pair, averaged over channels, per patch
    # where smooth-L1 turns from squared to absolute error; the teacher's features come out of its final RMSNorm at
    # about unit scale per channel, so 1.0 keeps ordinary errors quadratic and makes outlier channels count linearly
    smooth_l1_beta: float = 1.0
    aimv2: float = 0.0  # > 0: also the AIMv2 loss (a decoder, prefix attention) with this weight; 0: distillation only


@dataclass
class ModelConfig:
    # aimv2 | cap (captioning only) | cappa (cap + parallel prediction) | aimv1 (image only) | clip (contrastive):
    # the paper's baselines in this harness; distill: a frozen teacher encoder's patch features (model.distill)
    objective: str = "aimv2"
    cappa_parallel_prob: float = 0.75  # cappa: the share of rows that predict the caption in parallel (CapPa's 0.75)
    # auto (bidirectional for clip, else prefix; distill: bidirectional, prefix with model.distill.aimv2 > 0) |
    # prefix | bidirectional (cap only)
    encoder_attention: str = "auto"
    separate_decoders: bool = False  # aimv2: one decoder for pixels and one for text instead of a shared one
    clip: ClipConfig = field(default_factory=ClipConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    encoder: str = "aimv2-tiny-patch8-64"  # aimv2-{size}-patch{p}-{res|native}
    encoder_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {depth: 6}
    decoder: dict[str, Any] = field(default_factory=dict)  # embed_dim, depth, num_heads, mlp_hidden_dim
    alpha: float = 0.4  # weight of the pixel loss: loss = text_loss + alpha * image_loss
    # Post-training: start from earlier weights instead of a random init (ignored when out_dir already holds a
    # checkpoint: resume wins). A training run folder (encoder + decoder), or an encoder checkpoint in Apple's,
    # transformers' or our layout (a .safetensors file or a save_pretrained folder); learned position embeddings
    # are resized to this run's grid. Loading is strict: a different width, depth or patch size is an error.
    init_from: str | None = None
    init_decoder: bool = True  # also take the decoder when init_from is a run folder (false: a fresh decoder)


@dataclass
class NativeConfig:
    """Native-resolution training (aimv2.train.native): per step an area A of 2^n patches, n from a normal(0, 1)
    truncated to [-1, 1] mapped onto [log2 min_patches, log2 max_patches] (the paper: 128 and 4096), and a global
    batch of tokens_per_batch // A images (rounded down to a multiple of batch_multiple). Replaces train.batch_size;
    needs a sin-cos (-native) encoder; data.augment does not apply.

    mode per_image (the paper's): every image keeps its own aspect ratio with at most A patches, padded to A and
    masked (the built-in scenes draw a ratio per image in [1/max_aspect, max_aspect]; folder, hf and shard images
    have their own); model.objective=aimv2 only. mode per_step: one ratio per step and one grid for all its images,
    which keep their aspect ratio and lose the overhang (center crop). Unset (null): the mode of the run out_dir
    already holds (per_step for folders written before this key existed), per_image for a new run."""

    enabled: bool = False
    mode: str | None = None  # per_image | per_step | null (see above)
    min_patches: int = 128
    max_patches: int = 4096
    tokens_per_batch: int = 262144  # image tokens per global batch, padding included (64 images of 4096 patches)
    max_aspect: float = 2.0  # height/width in [1/max_aspect, max_aspect] (per_step: of each step's grid)
    batch_multiple: int = 8  # every B_s is a multiple of this (must be divisible by ranks x train.grad_accum)


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic (built-in scenes) | shards (webdataset) | folder | hf (local datasets files)
    folder: str | None = None  # source=folder: images with sidecar .txt captions, or a CSV / JSONL of path,caption
    hf_files: str | None = None  # source=hf: local parquet / arrow / json files (glob) read with Hugging Face datasets
    image_column: str = "image"  # source=hf
    text_column: str = "text"  # source=hf
    shards: str | None = None  # source=shards: paths, a folder, a brace pattern (data-{000..099}.tar) or pipe: URLs
    caption: str = "txt"  # source=shards: txt, json:FIELD, or weighted choice "txt=0.5,json:synthetic_caption=0.5"
    shuffle_buffer: int = 1000  # source=shards: samples in each worker's shuffle buffer
    max_fault_rate: float = 0.1  # source=shards: stop if more than this share of samples is unreadable
    # source=shards, several sources sampled by weight instead of data.shards, e.g.
    # [{name: dfn, shards: "dfn/{00000..09999}.tar", weight: 0.3, caption: txt}, {name: coyo, ...}]
    mixture: list[dict[str, Any]] = field(default_factory=list)
    num_workers: int = 1
    prefetch_factor: int = 4
    augment: bool = True  # RandomResizedCrop + flip; off for synthetic scenes whose captions name positions
    mean_std: str = "imagenet"  # "imagenet" or "clip"
    context_length: int = 77  # tokens per caption, EOS included, right-padded
    tokenizer: str | None = None  # tokenizer.json or SentencePiece .model; None: the built-in synthetic-caption one
    # the padding token's name, for a tokenizer.json that names none (CLIP's): e.g. '<|endoftext|>' for LiT, whose
    # text tower pools at the first end token and never reads past it
    pad_token: str | None = None
    synthetic_length: int | None = None  # None: an endless stream of distinct scenes
    native: NativeConfig = field(default_factory=NativeConfig)  # native-resolution training (off by default)


DEFAULT_WEIGHT_DECAY = 0.1  # optim.weight_decay when neither decay key is given

# The version of the config format a saved config.yaml carries (top-level ``config_version``). Version 1 (no marker):
# optim.weight_decay was the fully decoupled decay; version 2: it is torch AdamW's, and the decoupled one is
# optim.decoupled_weight_decay. config/parse.py reads version 1 files (see load_config).
CONFIG_VERSION = 2


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate
    init_lr: float = 1e-6  # warmup starts here
    min_lr: float = 1e-5  # cosine ends here
    warmup_steps: int = 100
    # torch AdamW's convention (and timm's): p <- p * (1 - lr_t * weight_decay). Unset: 0.1 (which, at lr 1e-3, is
    # the paper's 1e-4 fully decoupled decay). At most one of the two keys is set.
    weight_decay: float | None = None
    # Apple's training code's fully decoupled decay: p <- p * (1 - decoupled_weight_decay * lr_t / lr), the shape of
    # the schedule but not its scale (the paper's 1e-4 at every size). Equal to weight_decay = this / lr.
    decoupled_weight_decay: float | None = None
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # global norm; 0 disables
    # Learning-rate multipliers by parameter-name prefix, e.g. {encoder: 0.1} or {encoder.blocks: 0.5, decoder: 1};
    # the longest matching prefix wins, 1.0 where none matches. Weight decay scales with the group's lr (either key;
    # so a multiplier of 0 freezes a module entirely); which parameters decay is unchanged.
    lr_mult: dict[str, float] = field(default_factory=dict)
    # A module's own linear warmup by parameter-name prefix, e.g. {encoder: 200}: its lr is further scaled by
    # min(1, (step + 1) / N), on top of the schedule (a VLM's unfrozen encoder: vlm.encoder_warmup_steps).
    lr_warmup: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        if self.weight_decay is None and self.decoupled_weight_decay is None:
            self.weight_decay = DEFAULT_WEIGHT_DECAY


@dataclass
class TrainConfig:
    steps: int = 1000
    # Warm up a fresh decoder on a frozen encoder for the first N steps (post-training from an encoder-only
    # checkpoint). The encoder still runs forward and backward (DDP and FSDP2 reduce every parameter each step);
    # its gradients are dropped before clipping and the optimizer step, so AdamW neither moves it (no update, no
    # weight decay) nor keeps moments for it. Decided by the step number, so a resume mid warm-up continues it.
    freeze_encoder_steps: int = 0
    batch_size: int = 64  # global batch (all ranks, all accumulation micro-steps)
    grad_accum: int = 1
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    # torch.compile: AIMv2 pretraining on one process at fixed shapes as one graph; each block otherwise (under DDP /
    # FSDP2, at native resolution, and for the other objectives; train/parallelize.py apply_compile)
    compile: bool = False
    # auto | sdpa | flex | matmul: how attention is computed (aimv2.models.attention; auto chooses per device,
    # dtype and sequence length: FlexAttention for prefix masks on CUDA, the measured faster way on CPU)
    attention: str = "auto"
    parallel: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard per block, then the whole model); ignored on 1 process
    activation_checkpointing: bool = False
    checkpoint_every: int = 500
    keep_last: int = 2
    log_every: int = 10
    max_bad_steps: int = 5  # stop after this many consecutive non-finite losses
    device: str = "auto"  # auto | cpu | cuda
    progress: bool = True


@dataclass
class LogConfig:
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "aimv2"


class SavedConfig:
    """What every run config (pretraining, LiT, VLM, detection) shares: a plain dict, and its YAML in the run.

    The YAML starts with ``config_version``, so a later reader knows which meaning its keys had; the marker is not
    a field of the config (it describes the file, not the run)."""

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump({"config_version": CONFIG_VERSION, **self.to_dict()}, sort_keys=False))


@dataclass
class Config(SavedConfig):
    out_dir: str = "runs/default"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)


@dataclass
class LitTowerConfig:
    """What LiT trains against a frozen encoder: the text tower, the pooling head, the projections."""

    encoder: str = ""  # a pretraining run folder, an encoder checkpoint (any layout) or a model name (random weights)
    encoder_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {img_size: 96}
    text_size: str = "tiny"  # tiny | small | base (Apple's LiT text tower: 768 wide, 12 blocks, 6 heads)
    text: dict[str, Any] = field(default_factory=dict)  # TextConfig fields on top of text_size (vocab/eos: tokenizer)
    projection_dim: int = 768
    init_temperature: float = 0.07


@dataclass
class LitConfig(SavedConfig):
    """A LiT run (``aimv2 lit``): the pretraining sections for data, optimizer, training and logging, and ``lit``."""

    out_dir: str = "runs/lit"
    seed: int = 0
    lit: LitTowerConfig = field(default_factory=LitTowerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x
