"""The config of a VLM run (``aimv2 vlm train``): the ``vlm`` section, and the pretraining sections for data loading,
optimizer, training and logging (config/schema.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .checks import ConfigError
from .schema import DataConfig, LogConfig, OptimConfig, SavedConfig, TrainConfig


@dataclass
class LoRASection:
    """Low-rank adapters on the LM in stage 2 (peft's LoRA): the LM's weights stay frozen, rank-r updates train
    (weights/lora.py). ``aimv2 vlm export`` merges them into the LM."""

    rank: int = 0  # 0: off (the whole LM trains in stage 2); LLaVA-1.5's LoRA recipe uses 128
    alpha: float = 16.0  # the update is scaled by alpha / rank (LLaVA-1.5: 256 with rank 128)
    dropout: float = 0.05  # on the adapter's input (LLaVA-1.5: 0.05)
    target_modules: list[str] | str | None = (
        None  # module names, "all-linear", or None: peft's default for the LM family
    )


@dataclass
class VLMSection:
    """What a VLM is made of and what it trains on (objectives/vlm.py, train/vlm_task.py)."""

    encoder: str = ""  # a pretraining run folder, an encoder checkpoint (any layout) or a model name (random init)
    encoder_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {img_size: 32}
    lm: str = ""  # a local transformers causal-LM folder (save_pretrained), e.g. from `aimv2 vlm tiny-lm OUT`
    stage: int = 1  # 1: projector only, on captions; 2: projector + LM, on instruction conversations
    init_from: str | None = None  # stage 2: the stage-1 run folder whose vlm.safetensors starts this run
    train_encoder: bool = False  # the paper keeps the encoder frozen in both stages
    # train_encoder=true (train/vlm_task.py encoder_recipe; optim.lr_mult / lr_warmup that name the encoder win over
    # it): the encoder at optim.lr x encoder_lr_mult, its own linear warmup from 0 over encoder_warmup_steps, block i
    # further x encoder_layer_decay ** (depth - 1 - i) (1.0: off). The defaults train it like the rest, as runs
    # written before these keys did (so they resume); the tested recipe is encoder_lr_mult=0.1 encoder_warmup_steps=50
    encoder_lr_mult: float = 1.0
    encoder_warmup_steps: int = 0
    encoder_layer_decay: float = 1.0
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
    lora: LoRASection = field(default_factory=LoRASection)  # stage 2: adapters instead of the whole LM


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
    checks += lora_checks(v)
    checks += [
        (v.encoder_lr_mult >= 0, f"vlm.encoder_lr_mult must be >= 0, got {v.encoder_lr_mult}"),
        (v.encoder_warmup_steps >= 0, f"vlm.encoder_warmup_steps must be >= 0, got {v.encoder_warmup_steps}"),
        (0 < v.encoder_layer_decay <= 1, f"vlm.encoder_layer_decay must be in (0, 1], got {v.encoder_layer_decay}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def lora_checks(v: VLMSection) -> list[tuple[bool, str]]:
    lo = v.lora
    return [
        (lo.rank >= 0, f"vlm.lora.rank must be >= 0 (0: off), got {lo.rank}"),
        (lo.rank == 0 or v.stage == 2, "vlm.lora adapts the LM, which trains in stage 2 only: set vlm.stage=2"),
        (0.0 <= lo.dropout < 1.0, f"vlm.lora.dropout must be in [0, 1), got {lo.dropout}"),
        (lo.alpha > 0, f"vlm.lora.alpha must be > 0, got {lo.alpha}"),
    ]
