"""Pooling heads over patch features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AttentionPoolHead(nn.Module):
    """One learned query attends over the patch features: [B, N, D] -> [B, D].

    The query is the ``cls_token`` itself (no q projection); k and v are bias-free; the heads split D as in the
    encoder; the pooled vector goes through ``linear`` (with bias), as in Apple's LiT head.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"head width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.linear = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        H, hd = self.num_heads, D // self.num_heads
        q = self.cls_token.to(x.dtype).expand(B, -1, -1).view(B, 1, H, hd).transpose(1, 2)  # [B, H, 1, hd]
        k = self.k(x).view(B, N, H, hd).transpose(1, 2)  # [B, H, N, hd]
        v = self.v(x).view(B, N, H, hd).transpose(1, 2)  # [B, H, N, hd]
        y = F.scaled_dot_product_attention(q, k, v)  # [B, H, 1, hd]
        y = y.transpose(1, 2).reshape(B, 1, D).mean(dim=1)  # [B, D]: the mean over the (one) query
        return self.linear(y)
