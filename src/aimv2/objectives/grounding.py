"""Grounding as a training objective: the per-patch boxes and phrase scores of models/grounding.py, matched to
the phrase's box by the Hungarian algorithm (DETR's set matching), with DETR's losses.

    images [B, 3, S, S] in [0, 1] (normalized here with the encoder's mean/std), tokens [B, L] phrase bytes,
    boxes [B, 4] xyxy input pixels (the one object each phrase names)
      -> boxes [B, N, 4], scores [B, N] (N patches)
      -> cost[n, m] = w_cls * (-sigmoid(score_n)) + w_l1 * |box_n - box_m|_1 + w_giou * (-GIoU(box_n, box_m))
         (boxes as cxcywh fractions of the image), the assignment of least total cost (scipy's
         linear_sum_assignment; with one target per phrase, the patch of least cost)
      -> score: sigmoid focal loss, the matched patch 1 and every other 0, summed over patches, per phrase
         box: L1 of the matched box, and torchvision's generalized_box_iou_loss, per phrase

Each part is a sum over phrases with a count of phrases, so micro-batches and ranks add up exactly (objectives/
base.py); the matching is per phrase, so it does not couple samples either.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou, generalized_box_iou_loss, sigmoid_focal_loss

from ..models.encoder import VisionEncoder
from ..models.grounding import GroundingModel
from .base import LossTerms, count

PARTS = ("score", "l1", "giou")


def hungarian_match(cost: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The assignment of least total cost of a [N, M] cost matrix (N predictions, M targets, N >= M): (rows,
    cols), each target matched to one distinct prediction (scipy's linear_sum_assignment)."""
    return linear_sum_assignment(cost.detach().cpu().float().numpy())


def matching_cost(boxes: torch.Tensor, scores: torch.Tensor, targets: torch.Tensor, weights: dict) -> torch.Tensor:
    """DETR's matching cost [N, M] of predictions (boxes [N, 4] and targets [M, 4], xyxy fractions; scores [N]
    logits)."""
    cls = -torch.sigmoid(scores)[:, None]  # [N, 1]
    l1 = torch.cdist(boxes, targets, p=1)  # [N, M]
    giou = -generalized_box_iou(boxes, targets)
    return weights["score"] * cls + weights["l1"] * l1 + weights["giou"] * giou


@dataclass
class GroundingOutput:
    terms: LossTerms
    loss: torch.Tensor


class GroundingObjective(nn.Module):
    input_names = ("images", "tokens", "boxes")
    whole_batch = False

    def __init__(self, model: GroundingModel, mean_std: tuple, weights: dict[str, float] | None = None):
        super().__init__()
        self.model = model
        mean, std = mean_std
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.weights = weights or {"score": 1.0, "l1": 5.0, "giou": 2.0}  # DETR's box weights

    @property
    def encoder(self) -> VisionEncoder:
        return self.model.encoder

    def outputs(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(boxes [B, N, 4] xyxy fractions of the input, score logits [B, N])."""
        boxes, scores = self.model((images - self.mean) / self.std, tokens)
        return box_convert(boxes, "cxcywh", "xyxy"), scores

    def loss_counts(self, images, tokens, boxes) -> dict[str, torch.Tensor]:
        n = count(len(images), images.device)
        return dict.fromkeys(PARTS, n)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, boxes: torch.Tensor) -> GroundingOutput:
        pred, scores = self.outputs(images, tokens)
        size = images.shape[-1]
        target = (boxes / size).float()[:, None]  # [B, 1, 4]: one object per phrase
        rows = []
        for b in range(len(images)):
            r, _ = hungarian_match(matching_cost(pred[b].detach(), scores[b].detach(), target[b], self.weights))
            rows.append(int(r[0]))
        idx = torch.tensor(rows, device=images.device)
        arange = torch.arange(len(images), device=images.device)
        matched = pred[arange, idx]  # [B, 4]
        labels = torch.zeros_like(scores)
        labels[arange, idx] = 1.0
        sums = {
            "score": sigmoid_focal_loss(scores.float(), labels, reduction="sum"),
            "l1": (matched.float() - target[:, 0]).abs().sum(),
            "giou": generalized_box_iou_loss(matched.float(), target[:, 0], reduction="sum"),
        }
        terms = LossTerms(sums, self.loss_counts(images, tokens, boxes), dict(self.weights))
        return GroundingOutput(terms, terms.loss())

    @torch.no_grad()
    def predict(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The top box of each phrase, xyxy in input pixels [B, 4], and its score (probability) [B]."""
        pred, scores = self.outputs(images, tokens)
        best = scores.argmax(1)
        arange = torch.arange(len(images), device=images.device)
        return pred[arange, best] * images.shape[-1], torch.sigmoid(scores[arange, best])

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


def build_grounding_model(g, encoder: VisionEncoder, mean_std: tuple) -> GroundingObjective:
    """The objective a ``ground`` config section describes, on ``encoder``."""
    model = GroundingModel(encoder, g.embed_dim, g.text_dim, g.text_depth, g.text_heads, g.max_text_len)
    obj = GroundingObjective(model, mean_std)
    obj.set_trainable_blocks(g.train_blocks)
    return obj
