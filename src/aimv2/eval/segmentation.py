"""A semantic-segmentation probe: the simple feature pyramid and a light FPN-style head trained on a frozen
encoder, scored by mIoU. The counterpart of the classification probes for dense features: what the frozen maps
say about where each class is, with a few thousand pixels-labelled images and a few minutes of CPU.

    pixels -> frozen encoder (bidirectional, optionally windowed) -> pyramid -> SegmentationHead -> [B, K, H, W]
    loss: per-pixel cross-entropy; metric: aimv2.eval.detection.mean_iou over held-out images
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..data.transforms import normalize
from ..models.dense import SegmentationHead, ViTDetBackbone
from ..models.encoder import VisionEncoder
from .detection import mean_iou


class SegmentationProbe(nn.Module):
    def __init__(self, encoder: VisionEncoder, num_classes: int, channels: int = 64, window_size=None):
        super().__init__()
        self.backbone = ViTDetBackbone(encoder, out_channels=channels, window_size=window_size, extra_pool=False)
        self.head = SegmentationHead(channels, num_classes, hidden=channels)
        encoder.requires_grad_(False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # pixels [B, 3, H, W] normalized -> logits [B, K, H, W]
        return self.head(self.backbone(pixels), tuple(pixels.shape[-2:]))


def _batches(dataset, indices, batch_size: int, mean_std: str, device):
    for start in range(0, len(indices), batch_size):
        items = [dataset[i] for i in indices[start : start + batch_size]]
        images = normalize(torch.stack([it[0] for it in items]), mean_std, device)
        yield images, torch.stack([it[1] for it in items]).to(device)


def train_segmentation_probe(
    encoder: VisionEncoder,
    train_set,
    num_classes: int,
    *,
    steps: int = 200,
    batch_size: int = 16,
    lr: float = 1e-3,
    mean_std: str = "imagenet",
    seed: int = 0,
    device="cpu",
    progress: bool = False,
) -> SegmentationProbe:
    """The pyramid and head trained with AdamW (cosine lr) for ``steps`` batches of ``train_set`` (items (uint8
    image, long label map)); batch s holds items [s * batch_size, (s + 1) * batch_size) of the set."""
    torch.manual_seed(seed)
    probe = SegmentationProbe(encoder, num_classes).to(device)
    probe.backbone.encoder.eval()
    params = [p for p in probe.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for step in tqdm(range(steps), desc="segmentation probe", disable=not progress):
        idx = list(range(step * batch_size, (step + 1) * batch_size))
        images, labels = next(_batches(train_set, idx, batch_size, mean_std, device))
        loss = F.cross_entropy(probe(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return probe.eval()


@torch.no_grad()
def evaluate_segmentation(probe: SegmentationProbe, dataset, num_classes: int, mean_std: str = "imagenet",
                          batch_size: int = 32, device="cpu") -> dict:  # fmt: skip
    """mIoU (and per-class IoU) of the probe's argmax over every item of ``dataset``."""
    preds, targets = [], []
    for images, labels in _batches(dataset, list(range(len(dataset))), batch_size, mean_std, device):
        preds.append(probe(images).argmax(1).cpu())
        targets.append(labels.cpu())
    return mean_iou(torch.cat(preds), torch.cat(targets), num_classes)
