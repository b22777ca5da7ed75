"""The one resize policy of detection (and grounding): training, evaluation and prediction all see an image as

    the whole image, its aspect ratio kept, resized so that its long side is ``size``, padded (bottom and right,
    with zeros) to the square ``size`` x ``size`` input

as torchvision's detection transform (short side to ``min_size``, long side at most ``max_size``, then padded) and
ViTDet's large-scale jitter (resize into the square, pad) do; a square image is just resized. A box goes into the
input by the per-axis ratios of the resized to the original side, and back by dividing by them, so the same image
gives the same boxes in original pixels whichever command saw it.

    fitted = letterbox(image, 64)            # uint8 [3, 64, 64], and the ratios (sx, sy) and original (h, w)
    boxes_in = to_input(boxes, fitted)       # original pixels -> input pixels
    boxes_out = to_original(boxes, fitted)   # input pixels -> original pixels, clipped to the image
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .transforms import to_rgb


@dataclass(frozen=True)
class Fitted:
    pixels: torch.Tensor  # uint8 [3, size, size]
    scale: tuple[float, float]  # (sx, sy): resized width / original width, resized height / original height
    original_hw: tuple[int, int]  # (height, width) of the image as read


def fitted_hw(hw: tuple[int, int], size: int) -> tuple[int, int]:
    """(height, width) of an (h, w) image resized so that its long side is ``size`` (each side at least 1 px)."""
    h, w = hw
    s = size / max(h, w)
    return max(1, min(size, round(h * s))), max(1, min(size, round(w * s)))


def letterbox(image: Image.Image, size: int) -> Fitted:
    """The image (any PIL mode) as the square detection input: aspect kept, long side ``size``, zero padding."""
    img = to_rgb(image)
    w, h = img.size
    nh, nw = fitted_hw((h, w), size)
    resized = np.asarray(img.resize((nw, nh), Image.Resampling.BILINEAR))  # [nh, nw, 3]
    pixels = torch.zeros(3, size, size, dtype=torch.uint8)
    pixels[:, :nh, :nw] = torch.from_numpy(resized.copy()).permute(2, 0, 1)
    return Fitted(pixels, (nw / w, nh / h), (h, w))


def to_input(boxes: torch.Tensor, fitted: Fitted) -> torch.Tensor:
    """xyxy boxes [M, 4] in original pixels -> the input's pixels."""
    sx, sy = fitted.scale
    return boxes * boxes.new_tensor([sx, sy, sx, sy])


def to_original(boxes: torch.Tensor, fitted: Fitted) -> torch.Tensor:
    """xyxy boxes [M, 4] in the input's pixels -> the original image's, clipped to it (a box predicted on the
    padding ends at the image's edge)."""
    sx, sy = fitted.scale
    h, w = fitted.original_hw
    out = boxes / boxes.new_tensor([sx, sy, sx, sy])
    return torch.stack([out[:, 0].clamp(0, w), out[:, 1].clamp(0, h), out[:, 2].clamp(0, w), out[:, 3].clamp(0, h)], 1)
