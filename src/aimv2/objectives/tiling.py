"""High-resolution tiling for a VLM: one large image as several views at the encoder's resolution.

The paper grows its VLM's input from 336 px to 672 (2 x 2 tiles) and 1008 (3 x 3) without retraining the encoder
at those sizes: the image is cut into an N x M grid of tiles, each exactly the encoder's input size, and a
downsized copy of the whole image (the global view) is added so the LM also sees the layout at a glance.

The order of the tokens handed to the LM (documented here, tested in tests/test_vlm_tiling.py):

    [global view's tokens] [tile (0, 0)] [tile (0, 1)] ... [tile (0, M-1)] [tile (1, 0)] ... [tile (N-1, M-1)]

tiles in raster order (row by row), and within every view its patches in raster order. A 1 x 1 grid is the image
itself at the encoder's resolution, with no global view. With ``pool = k`` each view's patch grid is average-pooled
k x k first, which divides the number of tokens per view by k^2 (bounding the LM's sequence length).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def num_views(grid: tuple[int, int]) -> int:
    """Views per image: the N x M tiles, plus the global view unless the grid is 1 x 1."""
    n, m = grid
    return 1 if n * m == 1 else 1 + n * m


def split_views(images: torch.Tensor, grid: tuple[int, int], tile_hw: tuple[int, int]) -> torch.Tensor:
    """[B, 3, N*h, M*w] -> [B, V, 3, h, w]: the global view (bilinear, antialiased) then the tiles row by row."""
    n, m = grid
    h, w = tile_hw
    B, C, H, W = images.shape
    if (H, W) != (n * h, m * w):
        raise ValueError(f"a {n}x{m} grid of {h}x{w} tiles needs {n * h}x{m * w} images, got {H}x{W}")
    if n * m == 1:
        return images.unsqueeze(1)
    tiles = images.reshape(B, C, n, h, m, w).permute(0, 2, 4, 1, 3, 5).reshape(B, n * m, C, h, w)  # raster order
    view = F.interpolate(images, size=(h, w), mode="bilinear", antialias=True, align_corners=False)  # [B, 3, h, w]
    return torch.cat([view.unsqueeze(1), tiles], dim=1)


def pool_tokens(tokens: torch.Tensor, grid_hw: tuple[int, int], k: int) -> torch.Tensor:
    """[B, gh*gw, D] patch tokens in raster order -> [B, (gh/k)*(gw/k), D], each k x k block averaged."""
    if k == 1:
        return tokens
    gh, gw = grid_hw
    if gh % k or gw % k:
        raise ValueError(f"token pooling {k}x{k} needs a patch grid divisible by {k}, got {gh}x{gw}")
    B, _, D = tokens.shape
    x = tokens.transpose(1, 2).reshape(B, D, gh, gw)
    return F.avg_pool2d(x, k).flatten(2).transpose(1, 2)
