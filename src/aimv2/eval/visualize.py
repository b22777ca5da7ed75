"""What an encoder sees: the principal components of its patch features as colours, and the attention of one
block per head (``aimv2 visualize``).

The attention weights are recomputed from the block's own qkv projection on the input the block's attention
received (captured with a forward pre-hook during one ordinary forward), so no model code changes and every
attention backend gives the same maps: ``softmax(q k^T / sqrt(head_dim))`` per head, the bidirectional attention
of inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn


def attention_weights(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[B, N, D] input of an :class:`aimv2.models.layers.Attention` -> its weights [B, heads, N, N] (rows sum to 1)."""
    B, N, _ = x.shape
    qkv = attn.qkv(x).view(B, N, 3, attn.num_heads, attn.head_dim)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, hd]
    scores = (q.float() @ k.float().transpose(-2, -1)) * attn.head_dim**-0.5
    return scores.softmax(dim=-1)


@torch.no_grad()
def features_and_attention(encoder: nn.Module, pixels: torch.Tensor, block: int = -1):
    """One forward of ``encoder`` on [B, 3, H, W]: (patch features [B, N, D] after the final norm, attention
    weights of block ``block`` (negative from the end) [B, heads, N, N])."""
    depth = len(encoder.blocks)
    if not -depth <= block < depth:
        raise ValueError(
            f"--block {block} is out of range for an encoder of {depth} blocks; give -{depth}..{depth - 1}"
        )
    attn = encoder.blocks[block].attn
    captured: list[torch.Tensor] = []
    handle = attn.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        features = encoder(pixels)
    finally:
        handle.remove()
    return features.float(), attention_weights(attn, captured[0])


def query_maps(weights: torch.Tensor, grid: tuple[int, int], query: int | str = "mean") -> torch.Tensor:
    """Attention weights [B, heads, N, N] -> [B, heads, gh, gw]: what patch ``query`` attends to (negative from
    the end), or with ``"mean"`` the attention each patch receives, averaged over all queries."""
    B, H, N, _ = weights.shape
    if query == "mean":
        rows = weights.mean(dim=2)
    else:
        if not -N <= int(query) < N:
            raise ValueError(f"--query {query} is out of range for {N} patches; give 0..{N - 1} or mean")
        rows = weights[:, :, int(query)]
    return rows.reshape(B, H, *grid)


def pca_rgb(features: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]], quantile: float = 0.01):
    """Patch features of several images ([N_i, D] each) -> one [gh_i, gw_i, 3] float image in [0, 1] each: their
    projections on the first three principal components, fitted over all the images' patches together (so a
    colour means the same in every image), each component scaled by its ``quantile`` / ``1 - quantile``
    quantiles over all patches. The sign of each component is fixed (its largest loading positive)."""
    x = torch.cat([f.float().reshape(-1, f.shape[-1]) for f in features])
    x = x - x.mean(dim=0)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    components = vh[:3]
    signs = torch.sign(components.gather(1, components.abs().argmax(dim=1, keepdim=True)))
    components = components * signs
    proj = x @ components.T  # [sum N_i, k]
    if proj.shape[1] < 3:  # fewer patches or dimensions than three components: pad with zeros
        proj = torch.cat([proj, proj.new_zeros(proj.shape[0], 3 - proj.shape[1])], dim=1)
    lo = torch.quantile(proj, quantile, dim=0)
    hi = torch.quantile(proj, 1 - quantile, dim=0)
    rgb = ((proj - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
    out, start = [], 0
    for (gh, gw), f in zip(grids, features, strict=True):
        n = f.reshape(-1, f.shape[-1]).shape[0]
        out.append(rgb[start : start + n].reshape(gh, gw, 3))
        start += n
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_pca_figure(image: torch.Tensor, rgb: torch.Tensor, out: Path, title: str) -> None:
    """uint8 [3, H, W] image and its [gh, gw, 3] PCA colours side by side (the colours upsampled to the image)."""
    plt = _plt()
    H, W = image.shape[-2:]
    fig, axes = plt.subplots(1, 2, figsize=(2 * 2.6 * W / max(H, W) + 0.4, 2.6 * H / max(H, W) + 0.5))
    axes[0].imshow(image.permute(1, 2, 0).numpy())
    axes[0].set_title("image", fontsize=9)
    axes[1].imshow(rgb.numpy(), extent=(0, W, H, 0), interpolation="nearest")
    axes[1].set_title("PCA of patch features", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def save_attention_figure(
    image: torch.Tensor, maps: torch.Tensor, query: int | str, patch: int, out: Path, title: str
) -> None:
    """uint8 [3, H, W] image (the query patch outlined) and one [gh, gw] map per head, then their mean."""
    plt = _plt()
    from matplotlib.patches import Rectangle

    H, W = image.shape[-2:]
    heads, gh, gw = maps.shape
    panels = heads + 2
    cols = min(panels, 6)
    rows = -(-panels // cols)
    size = 2.0
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size * W / max(H, W), rows * size * H / max(H, W) + 0.5))
    axes = axes.ravel() if hasattr(axes, "ravel") else [axes]
    axes[0].imshow(image.permute(1, 2, 0).numpy())
    if query == "mean":
        axes[0].set_title("image; query: mean", fontsize=8)
    else:
        q = int(query) % (gh * gw)
        r, c = divmod(q, gw)
        axes[0].add_patch(Rectangle((c * patch, r * patch), patch, patch, fill=False, edgecolor="red", lw=1.5))
        axes[0].set_title(f"image; query patch {q}", fontsize=8)
    for h in range(heads + 1):
        m = maps[h] if h < heads else maps.mean(dim=0)
        axes[h + 1].imshow(m.numpy(), extent=(0, W, H, 0), interpolation="nearest", cmap="inferno")
        axes[h + 1].set_title(f"head {h}" if h < heads else "mean of heads", fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[panels:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
