"""The config of a VLM run (``aimv2 vlm train``): the ``vlm`` section, and the pretraining sections for data loading,
optimizer, training and logging (config/schema.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .checks import ConfigError
from .schema import DataConfig, LogConfig, OptimConfig, SavedConfig, TrainConfig


@dataclass
class VLMSection:
    """What a VLM is made of and what it trains on (objectives/vlm.py, train/vlm_task.py)."""

    encoder: str = ""  # a pretraining run folder, an encoder checkpoint (any layout) or a model name (random init)
    encoder_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {img_size: 32}
    lm: str = ""  # a local transformers causal-LM folder (save_pretrained), e.g. from `aimv2 vlm tiny-lm OUT`
    stage: int = 1  # 1: projector only, on captions; 2: projector + LM, on instruction conversations
    init_from: str | None = None  # stage 2: the stage-1 run folder whose vlm.safetensors starts this run
    train_encoder: bool = False  # the paper keeps the encoder frozen in both stages
    block: int = -1  # the encoder block whose (normalized) features the projector reads; negative from the end
    projector_hidden: int | None = None  # None: the LM's width
    tiles: tuple[int, int] = (1, 1)  # N x M tiles at the encoder's resolution (+ a global view when not 1 x 1)
    pool: int = 1  # average-pool each view's patch grid k x k before the projector
    data: str = "synthetic"  # synthetic (built-in scenes: captions in stage 1, questions in stage 2) | llava
    json: str | None = None  # data=llava: the conversation file
    images: str | None = None  # data=llava: the image folder its "image" paths are relative to
    turns: int = 3  # data=synthetic, stage 2: questions per conversation
    max_length: int = 128  # text tokens per conversation (the image's tokens come on top)
    # a conversation longer than max_length: drop_turns keeps its first whole answered turns that fit (never half
    # an answer; dropped turns counted as data_skipped/dropped_turns, a sample with none left skipped as no_answer);
    # error stops the run instead
    truncation: str = "drop_turns"


@dataclass
class VLMConfig(SavedConfig):
    out_dir: str = "runs/vlm"
    seed: int = 0
    vlm: VLMSection = field(default_factory=VLMSection)
    data: DataConfig = field(default_factory=lambda: DataConfig(augment=False))
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)


TRUNCATION = ("drop_turns", "error")  # data/chat.py's policies


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_vlm(cfg: VLMConfig) -> None:
    v = cfg.vlm
    checks = [
        (bool(v.encoder), "vlm.encoder is required: a pretraining run folder, a checkpoint or a model name"),
        (bool(v.lm), "vlm.lm is required: a local transformers causal-LM folder (`aimv2 vlm tiny-lm OUT` makes one)"),
        (v.stage in (1, 2), f"vlm.stage must be 1 (projector) or 2 (projector + LM), got {v.stage}"),
        (v.data in ("synthetic", "llava"), f"vlm.data must be synthetic or llava, got {v.data!r}"),
        (v.data != "llava" or bool(v.json and v.images), "vlm.data=llava needs vlm.json=FILE and vlm.images=DIR"),
        (
            isinstance(v.tiles, (list, tuple)) and len(v.tiles) == 2 and all(_int(t) and t >= 1 for t in v.tiles),
            f"vlm.tiles must be two integers >= 1, got {v.tiles}",
        ),  # fmt: skip
        (_int(v.pool) and v.pool >= 1, f"vlm.pool must be an integer >= 1, got {v.pool!r}"),
        (_int(v.max_length) and v.max_length >= 8, f"vlm.max_length must be an integer >= 8, got {v.max_length!r}"),
        (
            _int(v.turns) and v.turns >= 1,
            f"vlm.turns must be an integer >= 1 (questions per conversation), got {v.turns!r}",
        ),  # fmt: skip
        (
            v.projector_hidden is None or (_int(v.projector_hidden) and v.projector_hidden >= 1),
            f"vlm.projector_hidden must be an integer >= 1 or null (the LM's width), got {v.projector_hidden!r}",
        ),
        (_int(v.block), f"vlm.block must be an integer (an encoder block; negative from the end), got {v.block!r}"),
        (v.truncation in TRUNCATION, f"vlm.truncation must be one of {', '.join(TRUNCATION)}, got {v.truncation!r}"),
        (not cfg.data.native.enabled, "a VLM trains at fixed resolution: set data.native.enabled=false"),
        (cfg.train.freeze_encoder_steps == 0, "a VLM freezes its encoder with vlm.train_encoder, not freeze steps"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
