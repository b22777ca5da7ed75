"""Typed run configuration: one YAML file plus dotted ``key=value`` overrides.

Numbers live here; sizes are derived in code. The resolved config is written to ``out_dir/config.yaml``
so a run can be reproduced (and resumed) from its folder alone.
"""

from __future__ import annotations

import dataclasses
import types
import typing
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
class ModelConfig:
    # aimv2 | cap (captioning only) | aimv1 (image only) | clip (contrastive): the paper's baselines in this harness
    objective: str = "aimv2"
    encoder_attention: str = "auto"  # auto (bidirectional for clip, else prefix) | prefix | bidirectional (cap only)
    separate_decoders: bool = False  # aimv2: one decoder for pixels and one for text instead of a shared one
    clip: ClipConfig = field(default_factory=ClipConfig)
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
    """Native-resolution training (aimv2.train.native): per step an area of 2^n patches, n from a normal(0, 1)
    truncated to [-1, 1] mapped onto [log2 min_patches, log2 max_patches] (the paper: 128 and 4096), one aspect ratio
    per step log-uniform in [1/max_aspect, max_aspect], and a global batch of tokens_per_batch // patches images
    (rounded down to a multiple of batch_multiple). Replaces train.batch_size; needs a sin-cos (-native) encoder.
    All images of a step share its grid: synthetic scenes are rendered at it, folder/hf images keep their aspect
    ratio and lose the overhang (center crop); data.augment does not apply. Shards are not supported yet."""

    enabled: bool = False
    min_patches: int = 128
    max_patches: int = 4096
    tokens_per_batch: int = 262144  # image tokens per global batch (64 images of 4096 patches)
    max_aspect: float = 2.0  # height/width in [1/max_aspect, max_aspect]
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


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate
    init_lr: float = 1e-6  # warmup starts here
    min_lr: float = 1e-5  # cosine ends here
    warmup_steps: int = 100
    weight_decay: float = 1e-4  # fully decoupled: p <- p * (1 - wd * lr_t / lr)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # global norm; 0 disables
    # Learning-rate multipliers by parameter-name prefix, e.g. {encoder: 0.1} or {encoder.blocks: 0.5, decoder: 1};
    # the longest matching prefix wins, 1.0 where none matches. Decoupled weight decay scales with the group's lr
    # (so a multiplier of 0 freezes a module entirely); which parameters decay is unchanged.
    lr_mult: dict[str, float] = field(default_factory=dict)


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
    compile: bool = False
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


class _Saved:
    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


@dataclass
class Config(_Saved):
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
class LitConfig(_Saved):
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


class ConfigError(ValueError):
    pass


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check and convert a YAML value to the annotated type, with an error that names the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-3 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; valid under {prefix or 'top level'}: "
            f"{sorted(names)}"
        )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, data[f.name], f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _coerce(data[f.name], tp, prefix + f.name)
    return cls(**kwargs)


def apply_override(data: dict, override: str) -> None:
    """``a.b.c=value`` -> data['a']['b']['c'] = yaml(value). Dict-valued fields accept deeper keys."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key=value (e.g. train.steps=100)")
    key, raw = override.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else None
    node = data
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {p} is not a section")
    node[parts[-1]] = value


def validate(cfg: Config) -> None:
    t, o = cfg.train, cfg.optim
    checks = [
        (t.steps >= 1, "train.steps must be >= 1"),
        (t.batch_size >= 1, "train.batch_size must be >= 1"),
        (t.grad_accum >= 1, "train.grad_accum must be >= 1"),
        (
            t.batch_size % t.grad_accum == 0,
            f"train.batch_size ({t.batch_size}) must be divisible by train.grad_accum ({t.grad_accum})",
        ),
        (t.precision in ("auto", "fp32", "bf16"), f"train.precision must be auto|fp32|bf16, got {t.precision!r}"),
        (t.parallel in ("ddp", "fsdp"), f"train.parallel must be ddp|fsdp, got {t.parallel!r}"),
        (t.device in ("auto", "cpu", "cuda"), f"train.device must be auto|cpu|cuda, got {t.device!r}"),
        (t.checkpoint_every >= 1, "train.checkpoint_every must be >= 1"),
        (t.keep_last >= 1, "train.keep_last must be >= 1"),
        (t.log_every >= 1, "train.log_every must be >= 1"),
        (o.lr > 0, "optim.lr must be > 0"),
        (0 <= o.min_lr <= o.lr, "optim.min_lr must be in [0, optim.lr]"),
        (o.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
        (o.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (cfg.data.mean_std in ("imagenet", "clip"), "data.mean_std must be imagenet or clip"),
        (cfg.data.num_workers >= 0, "data.num_workers must be >= 0"),
        (cfg.data.context_length >= 2, "data.context_length must be >= 2"),
        (
            cfg.data.source in ("synthetic", "shards", "folder", "hf"),
            f"data.source must be synthetic, shards, folder or hf, got {cfg.data.source!r}",
        ),
        (cfg.data.source != "hf" or bool(cfg.data.hf_files), "data.source=hf needs data.hf_files=GLOB"),
        (cfg.data.source != "folder" or bool(cfg.data.folder), "data.source=folder needs data.folder=PATH"),
        (
            cfg.data.source != "shards" or bool(cfg.data.shards) != bool(cfg.data.mixture),
            "data.source=shards needs either data.shards=PATH_OR_PATTERN or a data.mixture list (not both)",
        ),
        (0 < cfg.data.max_fault_rate <= 1, "data.max_fault_rate must be in (0, 1]"),
        (t.freeze_encoder_steps >= 0, "train.freeze_encoder_steps must be >= 0"),
        (
            t.freeze_encoder_steps == 0 or bool(cfg.model.init_from),
            "train.freeze_encoder_steps warms up a decoder on a pretrained encoder: set model.init_from=PATH too",
        ),
        (
            all(isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in o.lr_mult.values()),
            f"optim.lr_mult values must be numbers >= 0, got {o.lr_mult!r}",
        ),
    ]
    if isinstance(cfg, Config):
        m = cfg.model
        attention = {"aimv2": ("auto", "prefix"), "aimv1": ("auto", "prefix"), "clip": ("auto", "bidirectional")}
        checks += [
            (
                m.objective in ("aimv2", "cap", "aimv1", "clip"),
                f"model.objective must be aimv2, cap, aimv1 or clip, got {m.objective!r}",
            ),
            (
                m.encoder_attention in attention.get(m.objective, ("auto", "prefix", "bidirectional")),
                f"model.encoder_attention={m.encoder_attention!r} does not fit model.objective={m.objective!r} "
                "(prefix: aimv2, aimv1, cap; bidirectional: cap, clip)",
            ),
            (
                not m.separate_decoders or m.objective == "aimv2",
                "model.separate_decoders applies to model.objective=aimv2 only",
            ),
            (m.clip.pool in ("mean", "attention"), f"model.clip.pool must be mean or attention, got {m.clip.pool!r}"),
            (m.clip.init_temperature > 0, "model.clip.init_temperature must be > 0"),
            # the contrastive loss couples every pair of the batch: micro-batches would change it, not just split it
            (m.objective != "clip" or t.grad_accum == 1, "model.objective=clip needs train.grad_accum=1"),
            (m.objective != "clip" or not cfg.data.native.enabled, "model.objective=clip does not support data.native"),
            (
                m.objective == "aimv2" and not m.separate_decoders or not m.init_from or not m.init_decoder,
                "model.init_from with a decoder needs objective=aimv2 (shared decoder): set model.init_decoder=false",
            ),
        ]
    if isinstance(cfg, LitConfig):
        checks += [
            (bool(cfg.lit.encoder), "lit.encoder is required: a pretraining run folder, a checkpoint or a model name"),
            # the contrastive loss couples every pair of the batch: micro-batches would change it, not just split it
            (t.grad_accum == 1, "LiT needs train.grad_accum=1 (the contrastive batch is the global batch)"),
            (t.parallel == "ddp", "LiT trains with train.parallel=ddp (the frozen encoder is replicated)"),
            (cfg.lit.projection_dim >= 1, "lit.projection_dim must be >= 1"),
            (cfg.lit.init_temperature > 0, "lit.init_temperature must be > 0"),
        ]
    nat = cfg.data.native
    if nat.enabled:
        checks += [
            (nat.min_patches >= 2, f"data.native.min_patches must be >= 2, got {nat.min_patches}"),
            (
                nat.max_patches >= nat.min_patches,
                f"data.native.max_patches ({nat.max_patches}) must be >= data.native.min_patches ({nat.min_patches})",
            ),
            (nat.max_aspect >= 1, f"data.native.max_aspect must be >= 1, got {nat.max_aspect}"),
            (nat.batch_multiple >= 1, "data.native.batch_multiple must be >= 1"),
            (
                nat.batch_multiple % t.grad_accum == 0,
                f"data.native.batch_multiple ({nat.batch_multiple}) must be divisible by train.grad_accum "
                f"({t.grad_accum}): every step's batch is split into equal micro-batches",
            ),
            (
                nat.tokens_per_batch >= nat.max_patches * nat.batch_multiple,
                f"data.native.tokens_per_batch ({nat.tokens_per_batch}) is smaller than data.native.max_patches x "
                f"data.native.batch_multiple = {nat.max_patches * nat.batch_multiple}: a step at the largest area "
                f"would have no images; raise tokens_per_batch or lower max_patches",
            ),
        ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


REQUIRED = "???"  # a config value that must be given (by an override): e.g. model.init_from in the high-res presets


def _required_left(data, prefix: str = "") -> list[str]:
    if isinstance(data, dict):
        return [k for key, v in data.items() for k in _required_left(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if data == REQUIRED else []


def load_config(path: str | Path | None, overrides: list[str] = (), cls: type = Config) -> Config:
    """Read a YAML config (or the defaults if path is None), apply overrides, check types and values.

    ``cls`` is the run's config class: Config (pretraining) or LitConfig. A value ``???`` marks a key the config
    leaves to the command line; one left unset is an error naming it."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found (see configs/ for examples)")
        data = yaml.safe_load(path.read_text()) or {}
    for ov in overrides:
        apply_override(data, ov)
    missing = _required_left(data)
    if missing:
        raise ConfigError(
            f"{path} needs a value for {', '.join(missing)} (marked ??? in the file): add "
            + " ".join(f"{k}=..." for k in missing)
            + " to the command"
        )
    cfg = _build(cls, data)
    validate(cfg)
    return cfg
