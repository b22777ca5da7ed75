"""The config of a grounding run (``aimv2 ground train``): the box head and text tower in ``ground``, the rest
shared with pretraining (data, optimizer, training loop, logging sections of config/schema.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .checks import ConfigError, in_range
from .schema import DataConfig, LogConfig, OptimConfig, SavedConfig, TrainConfig


@dataclass
class GrounderConfig:
    """OWL-ViT-style grounding on the encoder's last map (models/grounding.py)."""

    encoder: str = ""  # a pretraining run folder, an encoder checkpoint (any layout) or a model name (random weights)
    encoder_overrides: dict[str, Any] = field(default_factory=dict)
    image_size: int = 64  # images are letterboxed to image_size x image_size (data/letterbox.py)
    train_blocks: int = -1  # -1 all of the encoder trains, 0 none, k the last k blocks
    embed_dim: int = 64  # the joint patch / phrase embedding
    text_dim: int = 64  # the byte-level text tower
    text_depth: int = 2
    text_heads: int = 2
    max_text_len: int = 64  # bytes of a phrase (longer ones are cut)
    annotations: str | None = None  # data.source=folder: referring expressions (JSON, JSON lines or parquet)
    split: str | None = None  # keep only the records of this split (their "split" field)
    synthetic_seed: int = 0  # data.source=synthetic: scenes of this seed (held-out scenes use another one)


@dataclass
class GroundingConfig(SavedConfig):
    out_dir: str = "runs/ground"
    seed: int = 0
    ground: GrounderConfig = field(default_factory=GrounderConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(augment=False))
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)


def check_grounding(cfg: GroundingConfig) -> None:
    """The rules of the ``ground`` section (the shared sections are checked by config.validate)."""
    g = cfg.ground
    checks = [
        (bool(g.encoder), "ground.encoder is required: a pretraining run folder, a checkpoint or a model name"),
        (g.train_blocks >= -1, f"ground.train_blocks must be -1 (all), 0 (frozen) or a count, got {g.train_blocks}"),
        in_range("ground.image_size", g.image_size, 1),
        in_range("ground.embed_dim", g.embed_dim, 1),
        in_range("ground.text_depth", g.text_depth, 1),
        in_range("ground.text_heads", g.text_heads, 1),
        in_range("ground.max_text_len", g.max_text_len, 1),
        in_range("ground.synthetic_seed", g.synthetic_seed, 0),
        (
            isinstance(g.text_dim, int)
            and g.text_dim > 0
            and isinstance(g.text_heads, int)
            and g.text_heads > 0
            and g.text_dim % g.text_heads == 0,
            f"ground.text_dim={g.text_dim} must be a positive multiple of ground.text_heads={g.text_heads}",
        ),
        (cfg.data.source in ("synthetic", "folder"), "grounding data is data.source=synthetic or folder"),
        (
            cfg.data.source != "folder" or bool(g.annotations),
            "data.source=folder needs ground.annotations=FILE (referring expressions of the images in data.folder)",
        ),
        (not cfg.data.native.enabled, "grounding trains at a fixed ground.image_size: data.native is not supported"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
