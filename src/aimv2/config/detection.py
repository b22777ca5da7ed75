"""The config of a detection run (``aimv2 detect train``): the detector in ``detect``, the rest shared with
pretraining (data, optimizer, training loop, logging sections of config/schema.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .checks import ConfigError
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
        (set(d.scales) <= {4.0, 2.0, 1.0, 0.5}, f"detect.scales must be among 4, 2, 1, 0.5, got {d.scales}"),
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
