"""Dense features of the encoder: token maps, windowed attention and ViTDet's simple feature pyramid.

    pixels [B, 3, H, W]    (H, W any multiples of the patch size: learned position embeddings are resized,
      |                     sin-cos ones computed for the grid, both by VisionEncoder.embed)
    DenseEncoder        -> block outputs as maps [B, D, h, w], h = H/p, w = W/p
      |                    (optionally windowed attention in most blocks, global attention in a few)
    SimpleFeaturePyramid -> {"0": [B, C, 4h, 4w], "1": [B, C, 2h, 2w], "2": [B, C, h, w], "3": [B, C, h/2, w/2],
                             "pool": [B, C, h/4, w/4]}   (strides p/4, p/2, p, 2p, 4p: 4 ... 64 for p = 16)
    ViTDetBackbone      =  both, with ``out_channels``: what torchvision's detectors take as a backbone

ViTDet (Li et al., 2022) showed that a plain ViT needs no hierarchical backbone for detection: the last map alone,
deconvolved up and pooled down, makes the pyramid, and at high resolution most blocks can attend within
non-overlapping windows while a few (one per quarter of the depth) stay global to propagate information across the
image. Windowing here changes only which tokens a block's attention sees, never a weight, so one checkpoint runs
with or without it (``DenseEncoder.window_size``, settable at any time).

Attention semantics: dense tasks run the encoder **bidirectionally** (``prefix_len=None``), as the paper uses it
after pretraining. Prefix attention is not offered here: it is defined on the raster order of the whole grid, and a
window holds a square of patches from several rows, so a causal order inside a window would mean something else
than in pretraining. With windowing, a windowed block's token sees exactly the tokens of its own window (padding
tokens, added when the grid is not a multiple of the window, are masked out as keys and cropped from the output),
so a window covering the whole grid is global attention.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .encoder import VisionEncoder


def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Raster-order tokens as a 2D map: [B, h*w, D] -> [B, D, h, w]."""
    B, N, D = tokens.shape
    h, w = grid
    if N != h * w:
        raise ValueError(f"{N} tokens do not fill a {h}x{w} grid")
    return tokens.transpose(1, 2).reshape(B, D, h, w)


def window_partition(x: torch.Tensor, window: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split a token grid into non-overlapping windows, padding the grid up to a multiple of the window.

    x: [B, h, w, D]. Returns (windows [B * nW, wh * ww, D], key mask): the mask is None without padding, else bool
    [B * nW, 1, 1, wh * ww], True at real tokens, so padding is never attended to.
    """
    B, h, w, D = x.shape
    wh, ww = window
    ph, pw = -h % wh, -w % ww
    x = F.pad(x, (0, 0, 0, pw, 0, ph))  # [B, h + ph, w + pw, D], zeros at the bottom and right
    Hp, Wp = h + ph, w + pw
    x = x.view(B, Hp // wh, wh, Wp // ww, ww, D).permute(0, 1, 3, 2, 4, 5)  # [B, nh, nw, wh, ww, D]
    windows = x.reshape(-1, wh * ww, D)  # [B * nW, wh * ww, D]
    if not (ph or pw):
        return windows, None
    valid = torch.zeros(Hp, Wp, dtype=torch.bool, device=x.device)
    valid[:h, :w] = True
    valid = valid.view(Hp // wh, wh, Wp // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)  # [nW, wh * ww]
    return windows, valid.repeat(B, 1)[:, None, None, :]  # [B * nW, 1, 1, wh * ww]


def window_unpartition(windows: torch.Tensor, window: tuple[int, int], grid: tuple[int, int], batch: int):
    """Inverse of :func:`window_partition`: [B * nW, wh * ww, D] -> [B, h, w, D] (padding cropped)."""
    wh, ww = window
    h, w = grid
    Hp, Wp = h + (-h % wh), w + (-w % ww)
    D = windows.shape[-1]
    x = windows.view(batch, Hp // wh, Wp // ww, wh, ww, D).permute(0, 1, 3, 2, 4, 5)  # [B, nh, wh, nw, ww, D]
    return x.reshape(batch, Hp, Wp, D)[:, :h, :w]


def default_global_blocks(depth: int) -> tuple[int, ...]:
    """ViTDet's choice: the last block of each quarter of the depth stays global (2, 5, 8, 11 for 12 blocks)."""
    return tuple(sorted({max(0, (k + 1) * depth // 4 - 1) for k in range(4)}))


class DenseEncoder(nn.Module):
    """A :class:`VisionEncoder` read as 2D maps, with optional windowed attention (bidirectional only).

    window_size: None (every block global), an int or (height, width) in patches. Blocks in ``global_blocks``
        (default: :func:`default_global_blocks`) always attend globally. Set the attribute to switch at any time;
        the weights are the encoder's, untouched (``self.encoder`` is the very module).
    """

    def __init__(
        self,
        encoder: VisionEncoder,
        window_size: int | tuple[int, int] | None = None,
        global_blocks: Sequence[int] | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.window_size = window_size
        depth = len(encoder.blocks)
        self.global_blocks = tuple(default_global_blocks(depth) if global_blocks is None else global_blocks)
        if any(not 0 <= i < depth for i in self.global_blocks):
            raise ValueError(f"global_blocks {self.global_blocks} out of range for an encoder with {depth} blocks")

    @property
    def embed_dim(self) -> int:
        return self.encoder.embed_dim

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    def _window(self, grid: tuple[int, int]) -> tuple[int, int] | None:
        if self.window_size is None:
            return None
        ws = self.window_size
        wh, ww = (ws, ws) if isinstance(ws, int) else (int(ws[0]), int(ws[1]))
        if wh < 1 or ww < 1:
            raise ValueError(f"window_size must be positive, got {self.window_size}")
        return wh, ww

    def forward(
        self, pixels: torch.Tensor, blocks: Sequence[int] | None = None, norm: bool = True
    ) -> list[torch.Tensor]:
        """Maps of the chosen blocks: [B, 3, H, W] -> list of [B, D, H/p, W/p].

        blocks: indices into the trunk (negative counts from the end); None is the last block. norm: apply the
        encoder's final RMSNorm to each (as ``VisionEncoder.forward_features``).
        """
        enc = self.encoder
        depth = len(enc.blocks)
        idx = [depth - 1] if blocks is None else [i + depth if i < 0 else i for i in blocks]
        if any(not 0 <= i < depth for i in idx):
            raise ValueError(f"block indices {blocks} out of range for an encoder with {depth} blocks")
        p = enc.patch_size
        grid = (pixels.shape[-2] // p, pixels.shape[-1] // p)
        window = self._window(grid)
        x = enc.embed(pixels)  # [B, N, D]
        B, N, D = x.shape
        outs: dict[int, torch.Tensor] = {}
        for i, blk in enumerate(enc.blocks[: max(idx) + 1]):
            if window is None or i in self.global_blocks:
                x = blk(x)  # global, bidirectional
            else:
                wins, mask = window_partition(x.view(B, *grid, D), window)  # [B * nW, L, D]
                x = window_unpartition(blk(wins, mask), window, grid, B).reshape(B, N, D)
            if i in idx:
                outs[i] = tokens_to_map(enc.norm(x) if norm else x, grid)
        return [outs[i] for i in idx]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a [B, C, H, W] map (ViTDet's norm in the pyramid)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: one stride-p map -> maps at strides p / scale, plus a max-pooled top level.

    Per scale: 4 -> deconv 2x2/2, LN, GELU, deconv 2x2/2 (D -> D/2 -> D/4); 2 -> deconv (D -> D/2); 1 -> identity;
    0.5 -> 2x2 max-pool. Then each level: 1x1 conv -> LN -> 3x3 conv -> LN to ``out_channels`` (convs without bias,
    as ViTDet). ``extra_pool`` adds torchvision's LastLevelMaxPool level "pool" (stride 2x the coarsest), which
    Faster R-CNN's RPN and RetinaNet use for the largest objects.
    """

    def __init__(
        self,
        in_dim: int,
        out_channels: int = 256,
        scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
        extra_pool: bool = True,
    ):
        super().__init__()
        self.scales = tuple(float(s) for s in scales)
        self.stages = nn.ModuleList()
        for s in self.scales:
            if s == 4.0:
                up = [nn.ConvTranspose2d(in_dim, in_dim // 2, 2, 2), LayerNorm2d(in_dim // 2), nn.GELU()]
                up += [nn.ConvTranspose2d(in_dim // 2, in_dim // 4, 2, 2)]
                dim = in_dim // 4
            elif s == 2.0:
                up, dim = [nn.ConvTranspose2d(in_dim, in_dim // 2, 2, 2)], in_dim // 2
            elif s == 1.0:
                up, dim = [], in_dim
            elif s == 0.5:
                up, dim = [nn.MaxPool2d(2, 2)], in_dim
            else:
                raise ValueError(f"pyramid scale {s} not supported; use some of 4, 2, 1, 0.5")
            out = [nn.Conv2d(dim, out_channels, 1, bias=False), LayerNorm2d(out_channels)]
            out += [nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels)]
            self.stages.append(nn.Sequential(*up, *out))
        self.top = LastLevelMaxPool() if extra_pool else None
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        # x: [B, D, h, w] -> {"0": [B, C, h*s0, w*s0], ...} in the order of ``scales`` (finest first by default)
        feats = [stage(x) for stage in self.stages]
        names = [str(i) for i in range(len(feats))]
        if self.top is not None:
            feats, names = self.top(feats, feats, names)
        return OrderedDict(zip(names, feats, strict=True))


class ViTDetBackbone(nn.Module):
    """The encoder's last map through a simple feature pyramid, as torchvision's detectors want a backbone:
    ``forward(images [B, 3, H, W]) -> OrderedDict of [B, out_channels, h_l, w_l]`` and an ``out_channels``."""

    def __init__(
        self,
        encoder: VisionEncoder,
        out_channels: int = 256,
        scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
        window_size: int | tuple[int, int] | None = None,
        global_blocks: Sequence[int] | None = None,
        extra_pool: bool = True,
    ):
        super().__init__()
        self.dense = DenseEncoder(encoder, window_size, global_blocks)
        self.pyramid = SimpleFeaturePyramid(encoder.embed_dim, out_channels, scales, extra_pool)
        self.out_channels = out_channels

    @property
    def encoder(self) -> VisionEncoder:
        return self.dense.encoder

    @property
    def strides(self) -> tuple[float, ...]:
        """Each pyramid level's stride in pixels (the "pool" level last, when there is one)."""
        p = self.encoder.patch_size
        base = [p / s for s in self.pyramid.scales]
        return tuple(base + ([base[-1] * 2] if self.pyramid.top is not None else []))

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        (last,) = self.dense(images)  # [B, D, H/p, W/p]
        return self.pyramid(last)


class SegmentationHead(nn.Module):
    """A light FPN-style semantic-segmentation decoder on the pyramid: every level -> one shared 3x3 conv, upsampled
    to the finest level and summed, then a 1x1 classifier; logits are upsampled (bilinear) to the input size.

    pyramid: {"0": [B, C, h0, w0], ...} -> [B, num_classes, H, W].
    """

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 128):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.norm = nn.GroupNorm(min(32, hidden), hidden)
        self.classifier = nn.Conv2d(hidden, num_classes, 1)

    def forward(self, pyramid: dict[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        levels = [v for k, v in pyramid.items() if k != "pool"]
        finest = levels[0].shape[-2:]
        fused = sum(F.interpolate(self.proj(f), size=finest, mode="bilinear", align_corners=False) for f in levels)
        logits = self.classifier(F.gelu(self.norm(fused)))  # [B, K, h0, w0]
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)  # [B, K, H, W]
