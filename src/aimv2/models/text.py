"""The text tower of LiT and of the CLIP baseline: a causal transformer over caption ids, pooled at the first EOS.

    ids [B, T] (right-padded, EOS after the caption)
      -> token embedding + learned position     [B, T, D]
      -> depth x causal pre-norm Block          [B, T, D]
      -> final RMSNorm, take the first EOS      [B, D]

The tower is causal, so the state at the first EOS has read the whole caption and nothing after it: padding cannot
change an embedding. Official size (Apple's ``aimv2-large-patch14-224-lit``): 768 wide, 12 blocks, 6 heads, SwiGLU
2048, CLIP BPE vocabulary 49408 with EOS 49407, context 77.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .layers import Block, RMSNorm


@dataclass
class TextConfig:
    """The text tower. Defaults are Apple's LiT text tower."""

    vocab_size: int = 49408
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 6
    mlp_hidden_dim: int = 2048
    context_length: int = 77
    eos_id: int = 49407  # pooling reads the first position holding this id
    norm_eps: float = 1e-5


# Text tower sizes by name: (embed_dim, depth, num_heads, mlp_hidden_dim). "base" is Apple's LiT tower; "tiny" trains
# in minutes on a CPU against the tiny encoder.
TEXT_SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (192, 4, 3, 512),
    "small": (384, 8, 6, 1024),
    "base": (768, 12, 6, 2048),
}


def text_config(size: str = "base", **overrides) -> TextConfig:
    """A named text tower size with field overrides (e.g. ``vocab_size``, ``eos_id``, ``context_length``)."""
    if size not in TEXT_SIZES:
        raise ValueError(f"unknown text tower size {size!r}; choose from {', '.join(TEXT_SIZES)}")
    dim, depth, heads, hidden = TEXT_SIZES[size]
    return TextConfig(**{"embed_dim": dim, "depth": depth, "num_heads": heads, "mlp_hidden_dim": hidden, **overrides})


class TextTower(nn.Module):
    """Causal transformer over caption ids, pooled at the first EOS: ids [B, T] -> [B, D]."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.context_length, cfg.embed_dim))  # [T, D], Apple's shape
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_hidden_dim, cfg.norm_eps) for _ in range(cfg.depth)
        )
        self.norm = RMSNorm(cfg.embed_dim, cfg.norm_eps)

    def forward_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Per-position states after the final norm: [B, T] -> [B, T, D]. Position t sees only ids[:, :t+1]."""
        B, T = ids.shape
        if T > self.cfg.context_length:
            raise ValueError(f"text of {T} tokens is longer than the context length {self.cfg.context_length}")
        x = self.token_embed(ids) + self.pos_embed[:T].to(self.token_embed.weight.dtype)  # [B, T, D]
        for blk in self.blocks:
            x = blk(x, is_causal=True)
        return self.norm(x)

    def eos_index(self, ids: torch.Tensor) -> torch.Tensor:
        """Position of the first EOS of each row: long [B]. A row without one (a caption cut at the context length)
        is pooled at its last position, which under causal attention is the one that has read all of it."""
        is_eos = ids == self.cfg.eos_id  # [B, T]
        first = is_eos.int().argmax(dim=-1)  # [B]: 0 when there is none
        return torch.where(is_eos.any(dim=-1), first, ids.shape[1] - 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.forward_tokens(ids)  # [B, T, D]
        return x[torch.arange(ids.shape[0], device=ids.device), self.eos_index(ids)]  # [B, D]
