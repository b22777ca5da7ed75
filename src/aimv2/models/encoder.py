"""The AIMv2 vision encoder: a ViT with RMSNorm, SwiGLU and prefix attention, and no class token.

    pixels [B, 3, H, W]
      -> conv patch embed (p x p, stride p, bias) -> RMSNorm          [B, N, D], N = (H/p) * (W/p)
      -> + position embedding (learned absolute, or 2D sin-cos)       [B, N, D]
      -> depth x pre-norm Block (prefix attention during pretraining) [B, N, D]
      -> final RMSNorm                                                [B, N, D]

During pretraining, sample b attends bidirectionally among its first ``prefix_len[b]`` patches and
causally after them, so the decoder can regress every later patch from the features. At inference
``prefix_len=None`` makes attention fully bidirectional; the paper uses the model so with no tuning.

Images of different grids share a batch as patch tokens (native resolution, every image at its own aspect ratio):

    patches [B, N, p*p*3] (image b's n_b = gh_b * gw_b patches first, raster order, then padding), grid_hw [B, 2]
      -> the patch conv as the linear map it is on one patch -> RMSNorm   [B, N, D]
      -> + each image's own position embedding of ITS grid (0 on padding) [B, N, D]
      -> the same blocks, padding keys masked out of every attention    [B, N, D]

so image b's features are those of ``forward`` on that image alone (``forward_tokens``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionMask
from .init import init_blocks_
from .layers import Block, RMSNorm


@dataclass
class EncoderConfig:
    """Numbers that define an encoder. Sizes derive from them (patch_dim = patch_size**2 * in_chans)."""

    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 8
    mlp_hidden_dim: int = 2816
    patch_size: int = 14
    img_size: int | tuple[int, int] = 224
    pos_embed: str = "learned"  # "learned" (absolute, resized to other grids) or "sincos" (2D, native resolution)
    in_chans: int = 3
    norm_eps: float = 1e-5

    def __post_init__(self):
        if isinstance(self.img_size, list):
            self.img_size = tuple(self.img_size)
        sizes = {k: getattr(self, k) for k in ("embed_dim", "depth", "num_heads", "mlp_hidden_dim", "patch_size")}
        sizes.update(zip(("img_size[0]", "img_size[1]"), self.image_hw, strict=True))
        bad = {k: v for k, v in sizes.items() if not (isinstance(v, int) and not isinstance(v, bool) and v > 0)}
        if bad:
            raise ValueError(f"encoder sizes must be positive integers, got {bad}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.pos_embed not in ("learned", "sincos"):
            raise ValueError(f"pos_embed must be 'learned' or 'sincos', got {self.pos_embed!r}")
        h, w = self.grid_size
        if h * self.patch_size != self.image_hw[0] or w * self.patch_size != self.image_hw[1]:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.pos_embed == "sincos" and self.embed_dim % 4:
            raise ValueError(f"2D sin-cos position embedding needs embed_dim divisible by 4, got {self.embed_dim}")

    @property
    def image_hw(self) -> tuple[int, int]:
        s = self.img_size
        return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))

    @property
    def grid_size(self) -> tuple[int, int]:
        h, w = self.image_hw
        return h // self.patch_size, w // self.patch_size

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.in_chans

    def to_dict(self) -> dict:
        d = asdict(self)
        d["img_size"] = list(self.image_hw) if not isinstance(self.img_size, int) else self.img_size
        return d


def sincos_pos_embed_2d(h: int, w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """2D sin-cos embedding of an h x w grid in raster order, columns first.

    pe(r, c) = [sin(c*w_k), cos(c*w_k), sin(r*w_k), cos(r*w_k)], w_k = temperature^(-k / (dim/4)).
    Computed in float64 so large grids keep their precision. Returns float32 [h*w, dim].
    """
    quarter = dim // 4
    omega = temperature ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # [D/4]
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    c = cols.flatten()[:, None] * omega[None]  # [N, D/4]
    r = rows.flatten()[:, None] * omega[None]  # [N, D/4]
    return torch.cat([c.sin(), c.cos(), r.sin(), r.cos()], dim=1).float()  # [N, D]


def resize_pos_embed(pe: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Resize a learned position embedding to another grid: [1, h0*w0, D] -> [1, h1*w1, D].

    Bicubic with antialiasing (as timm does), computed in float32 and returned in ``pe``'s dtype. One
    function for both uses: the forward pass on other image sizes and loading a checkpoint with another
    ``img_size``, so a resized checkpoint gives the same features as resizing on the fly.
    """
    (h0, w0), (h1, w1) = old_grid, new_grid
    D = pe.shape[-1]
    grid = pe.reshape(1, h0, w0, D).permute(0, 3, 1, 2).float()  # [1, D, h0, w0]
    grid = F.interpolate(grid, size=(h1, w1), mode="bicubic", antialias=True, align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, h1 * w1, D).to(pe.dtype)  # [1, h1*w1, D]


class PatchEmbed(nn.Module):
    """Conv patchifier followed by RMSNorm (Apple's ``preprocessor.patchifier``)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.norm = RMSNorm(cfg.embed_dim, cfg.norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.proj(pixels)  # [B, D, H/p, W/p]
        x = x.flatten(2).transpose(1, 2)  # [B, N, D], raster order
        return self.norm(x)


class VisionEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig, name: str | None = None):
        super().__init__()
        self.cfg = cfg
        self.name = name
        self.patch_embed = PatchEmbed(cfg)
        if cfg.pos_embed == "learned":
            gh, gw = cfg.grid_size
            self.pos_embed = nn.Parameter(torch.zeros(1, gh * gw, cfg.embed_dim))
        else:
            self.register_parameter("pos_embed", None)
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_hidden_dim, cfg.norm_eps) for _ in range(cfg.depth)
        )
        self.norm = RMSNorm(cfg.embed_dim, cfg.norm_eps)
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # ---------------------------------------------------------------- init / switches
    @torch.no_grad()
    def init_weights(self) -> None:
        """Apple's (ml-l3m's) init, tensor by tensor (the table in ``aimv2.models.init``): Xavier-uniform trunk with
        q, k, v each on its own [D, D], Xavier patch conv (flattened) with PyTorch's default bias, positions
        normal(0.02), norms 1. Call it after ``to_empty`` when the model was built on the meta device.
        """
        init_blocks_(self.blocks)
        conv = self.patch_embed.proj
        conv.reset_parameters()  # PyTorch's default: the bias uniform(+-1/sqrt(C*p*p)) (l3m leaves it so)
        nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
        for m in self.modules():
            if isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed, std=0.02)
        self._pos_cache.clear()

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    @property
    def patch_size(self) -> int:
        return self.cfg.patch_size

    # ---------------------------------------------------------------- position embeddings
    def _pos_embed(self, gh: int, gw: int, device: torch.device) -> torch.Tensor:
        """Position embedding for a gh x gw grid: [1, gh*gw, D]."""
        if self.pos_embed is None:
            key = ("sincos", gh, gw, device)
            if key not in self._pos_cache:
                pe = sincos_pos_embed_2d(gh, gw, self.cfg.embed_dim).to(device)
                self._pos_cache[key] = pe.unsqueeze(0)
            return self._pos_cache[key]
        g0h, g0w = self.cfg.grid_size
        if (gh, gw) == (g0h, g0w):
            return self.pos_embed
        # Resize the learned grid (bicubic, antialiased like timm). Cached only when no gradient flows to it:
        # in training the parameter changes every step and the resize must stay differentiable.
        cacheable = not (torch.is_grad_enabled() and self.pos_embed.requires_grad)
        key = ("learned", gh, gw, device, self.pos_embed.dtype, self.pos_embed._version, self.pos_embed.data_ptr())
        if cacheable and key in self._pos_cache:
            return self._pos_cache[key]
        pe = resize_pos_embed(self.pos_embed, (g0h, g0w), (gh, gw))  # [1, gh*gw, D]
        if cacheable:
            self._pos_cache = {k: v for k, v in self._pos_cache.items() if k[0] != "learned"}  # one stale entry max
            self._pos_cache[key] = pe
        return pe

    # ---------------------------------------------------------------- forward
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch tokens with position embedding: [B, 3, H, W] -> [B, N, D]."""
        if pixels.ndim != 4 or pixels.shape[1] != self.cfg.in_chans:
            raise ValueError(f"expected pixels [B, {self.cfg.in_chans}, H, W], got {tuple(pixels.shape)}")
        H, W = pixels.shape[-2:]
        p = self.cfg.patch_size
        if H % p or W % p:
            raise ValueError(
                f"image size {H}x{W} is not divisible by the patch size {p}; resize or crop to a multiple of {p}"
            )
        x = self.patch_embed(pixels)  # [B, N, D]
        pe = self._pos_embed(H // p, W // p, pixels.device)  # [1, N, D]
        return x + pe.to(self.patch_embed.proj.weight.dtype)

    def attention_mask(
        self, prefix_len: torch.Tensor | int | None, batch: int, seq_len: int, device
    ) -> AttentionMask | None:
        """The prefix-causal pattern of ``prefix_len`` (one per sample, or one for all), or None for full
        bidirectional attention."""
        if prefix_len is None:
            return None
        return AttentionMask(seq_len, causal=True, prefix_len=self.per_sample_prefix(prefix_len, batch, device))

    @staticmethod
    def per_sample_prefix(prefix_len: torch.Tensor | int, batch: int, device) -> torch.Tensor:
        """``prefix_len`` (one per sample, or one for all) as long [B or 1] on ``device``."""
        if isinstance(prefix_len, int):
            prefix_len = torch.full((batch,), prefix_len, dtype=torch.long, device=device)
        prefix_len = prefix_len.to(device=device).reshape(-1)
        if prefix_len.numel() not in (1, batch):
            raise ValueError(f"prefix_len must have one entry per sample ({batch}), got {prefix_len.numel()}")
        return prefix_len

    def forward(self, pixels: torch.Tensor, prefix_len: torch.Tensor | int | None = None) -> torch.Tensor:
        """Patch features after the final norm: [B, 3, H, W] -> [B, N, D]."""
        x = self.embed(pixels)  # [B, N, D]
        mask = self.attention_mask(prefix_len, x.shape[0], x.shape[1], x.device)
        for blk in self.blocks:
            x = blk(x, mask)
        return self.norm(x)

    # ---------------------------------------------------------------- images of different grids in one batch
    def embed_tokens(self, patches: torch.Tensor, grid_hw: torch.Tensor) -> torch.Tensor:
        """Patch tokens with each image's own position embedding: [B, N, p*p*C], grid_hw [B, 2] -> [B, N, D].

        Values of a patch come in (row, col, channel) order (``objectives.aimv2.patchify``). The patch conv is a
        linear map of one patch in (channel, row, col) order, so its weight is reordered, not replaced: the same
        parameters serve both paths. Padding tokens get no position embedding (their keys are masked anyway).
        """
        B, N, P = patches.shape
        p, C = self.cfg.patch_size, self.cfg.in_chans
        if P != self.cfg.patch_dim:
            raise ValueError(f"expected patch tokens [B, N, {self.cfg.patch_dim}] (p*p*C), got {tuple(patches.shape)}")
        conv = self.patch_embed.proj
        weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, p * p * C)  # [D, p*p*C], (row, col, ch)
        x = self.patch_embed.norm(F.linear(patches.to(weight.dtype), weight, conv.bias))  # [B, N, D]
        pe = x.new_zeros(B, N, x.shape[-1])  # [B, N, D]
        for gh, gw in torch.unique(grid_hw, dim=0).tolist():  # one embedding per distinct grid of the batch
            rows = (grid_hw == grid_hw.new_tensor([gh, gw])).all(1).nonzero().flatten()  # images with that grid
            pe[rows, : gh * gw] = self._pos_embed(gh, gw, x.device).to(x.dtype)
        return x + pe

    def token_mask(self, grid_hw: torch.Tensor, seq_len: int, prefix_len: torch.Tensor | int | None) -> AttentionMask:
        """The attention pattern of padded patch tokens: padding keys (positions >= gh * gw) seen by no query, and
        image b's prefix pattern over its own patches (full attention when ``prefix_len`` is None)."""
        n = grid_hw.prod(1)  # [B] real patches per image
        if int(n.max()) > seq_len or int(n.min()) < 1:
            raise ValueError(f"grids {grid_hw.tolist()} do not fit {seq_len} tokens per image (1 to {seq_len})")
        key_valid = torch.arange(seq_len, device=grid_hw.device)[None, :] < n[:, None]  # [B, N]
        if prefix_len is None:
            return AttentionMask(seq_len, key_valid=key_valid)
        prefix = self.per_sample_prefix(prefix_len, len(n), grid_hw.device)
        return AttentionMask(seq_len, causal=True, prefix_len=prefix, key_valid=key_valid)

    def forward_tokens(
        self, patches: torch.Tensor, grid_hw: torch.Tensor, prefix_len: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """Patch features of images with their own grids: patches [B, N, p*p*C] (image b's gh_b * gw_b patches
        first, then padding), grid_hw [B, 2] long -> [B, N, D] (rows past an image's patches are meaningless).

        Image b's features equal ``forward`` on that image alone (pixels [1, C, gh_b*p, gw_b*p]): its own position
        embedding, attention over its own patches only, its prefix counted in its own raster order."""
        grid_hw = grid_hw.to(patches.device)
        x = self.embed_tokens(patches, grid_hw)  # [B, N, D]
        mask = self.token_mask(grid_hw, x.shape[1], prefix_len)
        for blk in self.blocks:
            x = blk(x, mask)
        return self.norm(x)

    def forward_features(
        self,
        pixels: torch.Tensor,
        prefix_len: torch.Tensor | int | None = None,
        *,
        blocks: Sequence[int] | int | None = None,
        norm: bool = True,
    ) -> list[torch.Tensor]:
        """Outputs of chosen blocks, for probes and dense tasks that read (or average) several layers.

        blocks: indices into the trunk (negative counts from the end), or an int n for the last n
            blocks; None is the last block only. The trunk stops after the deepest block asked for.
        norm: apply the final RMSNorm to each output (the released models were trained with it on the
            last block; AIMv1 probes averaged normalized features of several blocks).
        Returns: a list of [B, N, D], in the order asked.
        """
        depth = len(self.blocks)
        if blocks is None:
            idx = [depth - 1]
        elif isinstance(blocks, int):
            if not 1 <= blocks <= depth:
                raise ValueError(f"blocks={blocks}: ask for between 1 and {depth} last blocks")
            idx = list(range(depth - blocks, depth))
        else:
            idx = [i + depth if i < 0 else i for i in blocks]
            bad = [i for i in idx if not 0 <= i < depth]
            if bad:
                raise ValueError(f"block indices {list(blocks)} out of range for an encoder with {depth} blocks")
        wanted = set(idx)
        x = self.embed(pixels)
        mask = self.attention_mask(prefix_len, x.shape[0], x.shape[1], x.device)
        outs: dict[int, torch.Tensor] = {}
        for i, blk in enumerate(self.blocks[: max(idx) + 1]):
            x = blk(x, mask)
            if i in wanted:
                outs[i] = self.norm(x) if norm else x
        return [outs[i] for i in idx]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
