"""The AIMv2 pretraining model written the straightforward way, as the baseline of ``train_speed.py``.

Same architecture, same parameter names (so our model's ``state_dict`` loads with ``strict=True``) and the same
loss, computed the way one writes it first, op by op:

- attention is ``softmax(q k^T / sqrt(d) + mask) v`` with the scores materialized ([B, H, N, N]) and the mask an
  additive float tensor (0 or -inf; [B, 1, N, N] for the encoder's prefix mask, [N, N] for the causal decoder),
  where ours goes through ``aimv2.models.attention.attend`` (fused SDPA with a boolean mask or ``is_causal``; on
  CPU in bf16 up to the measured crossover length the same two matmuls, which are faster there);
- RMSNorm is ``x * rsqrt(mean(x^2) + eps) * w`` in float32, where ours calls the fused ``F.rms_norm``;
- the caption loss is ``log_softmax`` + ``gather`` + a masked mean, where ours calls ``F.cross_entropy``; the image
  loss is the same masked MSE written out;
- the optimizer (``plain_optimizer``) is AdamW with ``foreach=False``, the per-parameter loop. On CPU that is
  torch's default too, so the difference is nil there; on CUDA ours gets the multi-tensor (foreach) kernels.

What is not different: the SwiGLU (ours only differs without gradients), the heads (ours already projects only
the positions that have targets), the patch-embedding convolution and the parameter groups. ``train_speed.py``
checks that this model's loss and gradients equal ours before timing anything.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from aimv2.config import OptimConfig
from aimv2.objectives.aimv2 import AIMv2Pretrainer
from aimv2.train.optim import adamw_weight_decay, param_groups


class PlainRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # the statistic in float32, as ours
            x32 = x.float()
            y = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight.float()
        return y.to(x.dtype)


class PlainAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        # x: [B, N, D]; additive_mask: float, 0 where attention is allowed, -inf elsewhere, [B or 1, 1, N, N] or [N, N]
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # each [B, H, N, hd]
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim) + additive_mask  # [B, H, N, N]
        weights = torch.softmax(scores.float(), dim=-1).to(v.dtype)  # [B, H, N, N]
        y = (weights @ v).transpose(1, 2).reshape(B, N, D)  # [B, N, D]
        return self.proj(y)


class PlainSwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc3 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.silu(self.fc1(x)) * self.fc3(x))


class PlainBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden: int, eps: float):
        super().__init__()
        self.norm1 = PlainRMSNorm(dim, eps)
        self.attn = PlainAttention(dim, num_heads)
        self.norm2 = PlainRMSNorm(dim, eps)
        self.mlp = PlainSwiGLU(dim, hidden)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), additive_mask)
        return x + self.mlp(self.norm2(x))


class PlainPatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int, patch: int, eps: float):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)
        self.norm = PlainRMSNorm(dim, eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(pixels).flatten(2).transpose(1, 2))  # [B, N, D]


class PlainEncoder(nn.Module):
    """A learned-position encoder (the configurations ``train_speed.py`` times) with prefix attention."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D, eps = cfg.embed_dim, cfg.norm_eps
        self.patch_embed = PlainPatchEmbed(cfg.in_chans, D, cfg.patch_size, eps)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid_size[0] * cfg.grid_size[1], D))
        self.blocks = nn.ModuleList(PlainBlock(D, cfg.num_heads, cfg.mlp_hidden_dim, eps) for _ in range(cfg.depth))
        self.norm = PlainRMSNorm(D, eps)

    def forward(self, pixels: torch.Tensor, prefix_len: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels) + self.pos_embed  # [B, N, D]
        mask = prefix_additive_mask(prefix_len, x.shape[1])  # [B, 1, N, N]
        for blk in self.blocks:
            x = blk(x, mask)
        return self.norm(x)


class PlainDecoder(nn.Module):
    def __init__(self, cfg, encoder_dim: int, patch_dim: int):
        super().__init__()
        D, eps = cfg.embed_dim, cfg.norm_eps
        self.image_proj = nn.Linear(encoder_dim, D, bias=True)
        self.bos = nn.Parameter(torch.zeros(1, 1, D))
        self.tok_embed = nn.Embedding(cfg.vocab_size, D)
        self.text_pos = nn.Parameter(torch.zeros(1, cfg.max_text_len, D))
        self.blocks = nn.ModuleList(PlainBlock(D, cfg.num_heads, cfg.mlp_hidden_dim, eps) for _ in range(cfg.depth))
        self.norm = PlainRMSNorm(D, eps)
        self.pixel_head = nn.Linear(D, patch_dim, bias=False)
        self.text_head = nn.Linear(D, cfg.vocab_size, bias=False)

    def forward(self, feats: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # feats [B, N, D_enc], text [B, T] -> pixel predictions [B, N - 1, P], text logits [B, T, V]
        B, N, _ = feats.shape
        T = text.shape[1]
        txt = torch.cat([self.bos.expand(B, -1, -1), self.tok_embed(text[:, :-1])], dim=1) + self.text_pos[:, :T]
        x = torch.cat([self.image_proj(feats), txt], dim=1)  # [B, N + T, D]
        mask = causal_additive_mask(N + T, x.device)  # [N + T, N + T]
        for blk in self.blocks:
            x = blk(x, mask)
        x = self.norm(x)
        return self.pixel_head(x[:, : N - 1]), self.text_head(x[:, N:])


class PlainPretrainer(nn.Module):
    """Encoder + decoder + loss (``text CE + alpha * image MSE``), the parameters named as in ``AIMv2Pretrainer``."""

    def __init__(self, encoder_cfg, decoder_cfg, pad_id: int, alpha: float):
        super().__init__()
        self.encoder = PlainEncoder(encoder_cfg)
        self.decoder = PlainDecoder(decoder_cfg, encoder_cfg.embed_dim, encoder_cfg.patch_dim)
        self.pad_id, self.alpha, self.patch_size = pad_id, alpha, encoder_cfg.patch_size

    def forward(self, images: torch.Tensor, text: torch.Tensor, prefix_len: torch.Tensor) -> torch.Tensor:
        """The scalar training loss of images [B, 3, H, W], text [B, T] and prefix lengths [B]."""
        image_pred, logits = self.decoder(self.encoder(images, prefix_len), text)  # [B, N-1, P], [B, T, V]
        N = image_pred.shape[1] + 1
        # image: patch k+1 from position k, normalized per patch (unbiased variance), only patches past the prefix
        B, C, H, W = images.shape
        p = self.patch_size
        patches = images.float().reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, N, -1)
        target = (patches - patches.mean(-1, keepdim=True)) / torch.sqrt(patches.var(-1, keepdim=True) + 1e-6)
        per_patch = ((image_pred.float() - target[:, 1:]) ** 2).mean(-1)  # [B, N-1]
        valid = (torch.arange(1, N, device=images.device)[None] >= prefix_len[:, None]).float()  # [B, N-1]
        image_loss = (per_patch * valid).sum() / valid.sum().clamp(min=1)
        # text: next-token cross-entropy over non-pad tokens
        logp = torch.log_softmax(logits.float(), dim=-1)  # [B, T, V]
        nll = -logp.gather(-1, text.unsqueeze(-1)).squeeze(-1)  # [B, T]
        keep = (text != self.pad_id).float()
        text_loss = (nll * keep).sum() / keep.sum()
        return text_loss + self.alpha * image_loss


def prefix_additive_mask(prefix_len: torch.Tensor, n: int) -> torch.Tensor:
    """0 where query i may see key j (j <= i, or j inside sample b's prefix), -inf elsewhere: float [B, 1, n, n]."""
    i = torch.arange(n, device=prefix_len.device)
    allowed = (i[None, :] <= i[:, None])[None] | (i[None, None, :] < prefix_len[:, None, None])  # [B, n, n]
    return torch.zeros(allowed.shape, device=allowed.device).masked_fill(~allowed, float("-inf")).unsqueeze(1)


def causal_additive_mask(n: int, device: torch.device) -> torch.Tensor:
    """0 on and below the diagonal, -inf above: float [n, n]."""
    return torch.full((n, n), float("-inf"), device=device).triu(1)


def plain_copy(model: AIMv2Pretrainer) -> PlainPretrainer:
    """The baseline with ``model``'s weights (on its device)."""
    if model.encoder.pos_embed is None:
        raise ValueError("the baseline implements learned position embeddings only (the fixed-resolution models)")
    base = PlainPretrainer(model.encoder.cfg, model.decoder.cfg, model.pad_id, model.alpha)
    base.load_state_dict(model.state_dict(), strict=True)
    return base.to(next(model.parameters()).device)


def plain_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Our parameter groups and hyperparameters, with the per-parameter AdamW loop."""
    groups = param_groups(model, adamw_weight_decay(cfg), cfg.lr_mult)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=False)
