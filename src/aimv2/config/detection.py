"""The config of a detection run (``aimv2 detect train``): the detector in ``detect``, the rest shared with
pretraining (data, optimizer, training loop, logging sections of config/schema.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .checks import ConfigError, in_range
from .schema import DataConfig, LogConfig, OptimConfig, SavedConfig, TrainConfig

DETECTOR_KINDS = ("fcos", "retinanet", "faster_rcnn")


@dataclass
class DetectorConfig:
    """A torchvision detector on the encoder's simple feature pyramid (models/dense.py)."""

    encoder: str = ""  # a pretraining run folder, an encoder checkpoint (any layout) or a model name (random weights)
    encoder_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {depth: 6}
    kind: str = "fcos"  # fcos | retinanet | faster_rcnn (torchvision's heads)
    image_size: int = 64  # training images are image_size x image_size (built-in scenes rendered, COCO resized)
    out_channels: int = 64  # pyramid width
    scales: list[float] = field(default_factory=lambda: [4.0, 2.0, 1.0, 0.5])  # pyramid levels: stride = patch / scale
    window_size: int | None = None  # windowed attention (in patches) in all blocks but global_blocks; None: global
    global_blocks: list[int] | None = None  # None: the last block of each quarter of the depth (ViTDet)
    # How much of the encoder trains: -1 all of it, 0 none (frozen: pyramid and head only), k the last k blocks
    train_blocks: int = -1
    # Layer-wise lr decay: block i of a depth-L encoder at layer_decay^(L - i), the patch and position embeddings
    # at layer_decay^(L + 1), pyramid and head at 1 (1.0 disables). Written into optim.lr_mult of the saved config.
    layer_decay: float = 1.0
    annotations: str | None = None  # data.source=folder: a COCO JSON of the images in data.folder
    synthetic_seed: int = 0  # data.source=synthetic: scenes of this seed (held-out scenes use another one)
    score_thresh: float = 0.05  # detections kept at prediction time
    detections_per_img: int = 100


@dataclass
class DetectionConfig(SavedConfig):
    out_dir: str = "runs/detect"
    seed: int = 0
    detect: DetectorConfig = field(default_factory=DetectorConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(augment=False))
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)


def check_detection(cfg: DetectionConfig) -> None:
    """The rules of the ``detect`` section (the shared sections are checked by config.validate)."""
    d = cfg.detect
    checks = [
        (bool(d.encoder), "detect.encoder is required: a pretraining run folder, a checkpoint or a model name"),
        (d.kind in DETECTOR_KINDS, f"detect.kind must be one of {', '.join(DETECTOR_KINDS)}, got {d.kind!r}"),
        (d.train_blocks >= -1, f"detect.train_blocks must be -1 (all), 0 (frozen) or a count, got {d.train_blocks}"),
        (
            d.kind != "fcos" or d.out_channels % 32 == 0,
            f"detect.out_channels must be a multiple of 32 for FCOS (its head's GroupNorm), got {d.out_channels}",
        ),
        (0 < d.layer_decay <= 1, f"detect.layer_decay must be in (0, 1], got {d.layer_decay}"),
        (
            isinstance(d.scales, list)
            and len(d.scales) > 0
            and set(d.scales) <= {4.0, 2.0, 1.0, 0.5}
            and len(set(d.scales)) == len(d.scales),
            f"detect.scales must be a non-empty list of distinct levels among 4, 2, 1, 0.5, got {d.scales}",
        ),
        in_range("detect.image_size", d.image_size, 1),
        in_range("detect.out_channels", d.out_channels, 1),
        (
            d.window_size is None or in_range("detect.window_size", d.window_size, 1)[0],
            f"detect.window_size must be null (global attention) or a window side of at least 1 patch, got "
            f"{d.window_size!r}",
        ),
        in_range("detect.score_thresh", d.score_thresh, 0, 1),
        in_range("detect.detections_per_img", d.detections_per_img, 1),
        in_range("detect.synthetic_seed", d.synthetic_seed, 0),
        (cfg.data.source in ("synthetic", "folder"), "detection data is data.source=synthetic or folder (COCO)"),
        (
            cfg.data.source != "folder" or bool(d.annotations),
            "data.source=folder needs detect.annotations=COCO_JSON (boxes of the images in data.folder)",
        ),
        (not cfg.data.native.enabled, "detection trains at a fixed detect.image_size: data.native is not supported"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def check_detection_encoder(d: DetectorConfig, depth: int, patch_size: int) -> None:
    """The rules that need the encoder: its depth (train_blocks, global_blocks) and patch size (image_size)."""
    checks = [
        (
            d.train_blocks <= depth,
            f"detect.train_blocks={d.train_blocks} is beyond the encoder's {depth} blocks; give -1 (all), 0 "
            f"(frozen) or a count up to {depth}",
        ),
        (
            d.image_size % patch_size == 0,
            f"detect.image_size={d.image_size} is not a multiple of the encoder's patch size {patch_size}; give one",
        ),
        (
            d.global_blocks is None or all(isinstance(b, int) and 0 <= b < depth for b in d.global_blocks),
            f"detect.global_blocks={d.global_blocks} must be block indices in [0, {depth - 1}] (or null: ViTDet's)",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
