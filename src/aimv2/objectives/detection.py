"""Detection as a training objective: a torchvision detector (FCOS, RetinaNet or Faster R-CNN) whose backbone is
the encoder's simple feature pyramid (models/dense.py), with the trainer's interface (objectives/base.py).

    images [B, 3, H, W] in [0, 1]      (torchvision's transform normalizes with the encoder's mean/std and pads)
    boxes  [B, M, 4] xyxy pixels, labels [B, M] in 1..K, 0 = padding (a batch is tensors, so the trainer can
                                         split it into micro-batches; padding rows are dropped before the detector)
      -> ViTDetBackbone -> torchvision head -> its loss dict, each a mean over the images of the batch it saw

The trainer adds sums and divides by global counts; torchvision reports means. Each part is therefore returned as
``mean * images`` with a count of ``images``: the micro-batches and ranks of a step then weigh each image alike,
and with one micro-batch on one process the loss is exactly torchvision's. (Within a micro-batch, torchvision's own
normalization stays: FCOS and RetinaNet divide by the batch's foreground locations, so micro-batches of different
sizes are a close, not a bit-exact, split of the whole batch.)

Labels start at 1 and ``num_classes`` counts a background class 0, torchvision's convention for all three heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

from ..config.detection import DetectorConfig
from ..models.dense import ViTDetBackbone
from ..models.encoder import VisionEncoder
from .base import LossTerms, count

LOSS_PARTS = {
    "fcos": ("classification", "bbox_regression", "bbox_ctrness"),
    "retinanet": ("classification", "bbox_regression"),
    "faster_rcnn": ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"),
}


@dataclass
class DetectionOutput:
    terms: LossTerms
    loss: torch.Tensor


def build_detector(
    kind: str,
    backbone: ViTDetBackbone,
    num_classes: int,
    image_size: int,
    mean_std: tuple[tuple[float, ...], tuple[float, ...]],
    score_thresh: float = 0.05,
    detections_per_img: int = 100,
) -> nn.Module:
    """A torchvision detector on ``backbone``, its anchors sized to the pyramid's strides.

    Images are resized so their short side is ``image_size`` (no-op for training images of that size) and padded
    to a multiple of the coarsest stride, so every level's grid divides the image exactly.
    """
    strides = backbone.strides
    mean, std = mean_std
    common = dict(
        min_size=image_size,
        max_size=image_size * 4,
        image_mean=list(mean),
        image_std=list(std),
        size_divisible=int(max(strides)),
        detections_per_img=detections_per_img,
    )
    names = [str(i) for i in range(len(backbone.pyramid.scales))]
    if kind == "fcos":  # one location per cell; the "anchor" size is the stride (FCOS's regression ranges)
        anchors = AnchorGenerator(tuple((int(s),) for s in strides), ((1.0,),) * len(strides))
        return FCOS(backbone, num_classes, anchor_generator=anchors, score_thresh=score_thresh, **common)
    if kind == "retinanet":  # 3 scales x 3 ratios per level, base size 4x the stride (RetinaNet's)
        sizes = tuple(tuple(4 * s * 2 ** (k / 3) for k in range(3)) for s in strides)
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(strides))
        return RetinaNet(backbone, num_classes, anchor_generator=anchors, score_thresh=score_thresh, **common)
    if kind == "faster_rcnn":  # RPN on every level (with "pool"), RoIAlign on the pyramid proper
        anchors = AnchorGenerator(tuple((8 * s,) for s in strides), ((0.5, 1.0, 2.0),) * len(strides))
        pool = MultiScaleRoIAlign(featmap_names=names, output_size=7, sampling_ratio=2)
        return FasterRCNN(
            backbone,
            num_classes,
            rpn_anchor_generator=anchors,
            box_roi_pool=pool,
            box_score_thresh=score_thresh,
            box_detections_per_img=detections_per_img,
            **{k: v for k, v in common.items() if k != "detections_per_img"},
        )
    raise ValueError(f"unknown detector kind {kind!r}; valid: {', '.join(LOSS_PARTS)}")


def to_targets(boxes: torch.Tensor, labels: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Padded tensors -> torchvision's per-image targets: [B, M, 4], [B, M] -> [{"boxes": [m, 4], "labels": [m]}]."""
    keep = labels > 0
    return [{"boxes": b[k].float(), "labels": lab[k].long()} for b, lab, k in zip(boxes, labels, keep, strict=True)]


class DetectionObjective(nn.Module):
    """A torchvision detector on the encoder's pyramid, trained by the project's trainer."""

    input_names = ("images", "boxes", "labels")
    whole_batch = False

    def __init__(self, detector: nn.Module, kind: str):
        super().__init__()
        self.detector = detector
        self.kind = kind
        self.parts = LOSS_PARTS[kind]

    @property
    def encoder(self) -> VisionEncoder:
        return self.detector.backbone.encoder

    def loss_counts(self, images: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        n = count(len(images), images.device)
        return {k: n for k in self.parts}

    def forward(self, images: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor) -> DetectionOutput:
        """Training losses (the detector in train mode): images [B, 3, H, W] in [0, 1], padded targets."""
        losses = self.detector(list(images), to_targets(boxes, labels))
        n = len(images)
        sums = {k: losses[k].float() * n for k in self.parts}
        terms = LossTerms(sums, self.loss_counts(images, boxes, labels), {k: 1.0 for k in self.parts})
        return DetectionOutput(terms, terms.loss())

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Detections per image (boxes xyxy in input pixels, scores, labels), in eval mode whatever the mode was."""
        was = self.detector.training
        self.detector.eval()
        try:
            return self.detector(list(images))
        finally:
            self.detector.train(was)

    def set_trainable_blocks(self, train_blocks: int) -> None:
        """-1: the whole encoder trains; 0: frozen; k: only its last k blocks and final norm."""
        enc = self.encoder
        if train_blocks < 0:
            return
        enc.requires_grad_(False)
        depth = len(enc.blocks)
        for blk in enc.blocks[depth - min(train_blocks, depth) :]:
            blk.requires_grad_(True)
        if train_blocks > 0:
            enc.norm.requires_grad_(True)

    def layer_decay_mults(self, decay: float, prefix: str = "") -> dict[str, float]:
        """optim.lr_mult entries for layer-wise lr decay (BEiT / ViTDet): block i of L at decay^(L - i), the patch
        and position embeddings at decay^(L + 1); the final norm, pyramid and head at 1. Frozen parts are left out."""
        if decay == 1.0:
            return {}
        enc_name = next(n for n, m in self.named_modules() if m is self.encoder)
        depth = len(self.encoder.blocks)
        mults: dict[str, float] = {}
        for name, p in self.encoder.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith("blocks."):
                i = int(name.split(".")[1])
                mults[f"{prefix}{enc_name}.blocks.{i}"] = decay ** (depth - i)
            elif name.startswith(("patch_embed", "pos_embed")):
                mults[f"{prefix}{enc_name}.{name.split('.')[0]}"] = decay ** (depth + 1)
        return mults


def build_detection_model(
    d: DetectorConfig, encoder: VisionEncoder, num_classes: int, mean_std: tuple
) -> DetectionObjective:
    """The objective a ``detect`` config section describes, on ``encoder`` (trained as ``d.train_blocks`` says).
    ``num_classes`` counts the background: K + 1 for labels 1..K."""
    backbone = ViTDetBackbone(
        encoder,
        out_channels=d.out_channels,
        scales=d.scales,
        window_size=d.window_size,
        global_blocks=d.global_blocks,
    )
    detector = build_detector(
        d.kind, backbone, num_classes, d.image_size, mean_std, d.score_thresh, d.detections_per_img
    )
    model = DetectionObjective(detector, d.kind)
    model.set_trainable_blocks(d.train_blocks)
    return model


def encoder_train_flops(encoder: VisionEncoder, num_patches: int) -> float:
    """Training FLOPs of the encoder on one image: matmuls of the blocks and the patch embedding, 3x the forward
    (1x when the encoder is frozen). The pyramid and the head are left out: their cost depends on the detector."""
    e = encoder.cfg
    per_token = 2 * (4 * e.embed_dim**2 + 3 * e.embed_dim * e.mlp_hidden_dim) * e.depth + 2 * e.patch_dim * e.embed_dim
    attention = 4 * num_patches * e.embed_dim * e.depth  # scores and weighted sum, per token
    trains = any(p.requires_grad for p in encoder.parameters())
    return (3.0 if trains else 1.0) * num_patches * (per_token + attention)
