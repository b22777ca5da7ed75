"""Pooling heads over patch features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AttentionPoolHead(nn.Module):
    """Learned queries attend over the patch features: [B, N, D] -> [B, out_dim].

    AIMv1/AIMv2's attentive pooling, used by LiT (one query, ``out_dim = D``, Apple's names) and by the attentive
    probe (``num_queries`` queries, ``out_dim`` = the number of classes). The queries are ``cls_token`` itself (no q
    projection); k and v are bias-free; the heads split D as in the encoder; the mean over the queries goes through
    ``linear`` (with bias).
    """

    def __init__(self, dim: int, num_heads: int, num_queries: int = 1, out_dim: int | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"head width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.cls_token = nn.Parameter(torch.zeros(1, num_queries, dim))
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.linear = nn.Linear(dim, out_dim or dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        H, hd, Q = self.num_heads, D // self.num_heads, self.cls_token.shape[1]
        q = self.cls_token.to(x.dtype).expand(B, -1, -1).reshape(B, Q, H, hd).transpose(1, 2)  # [B, H, Q, hd]
        k = self.k(x).view(B, N, H, hd).transpose(1, 2)  # [B, H, N, hd]
        v = self.v(x).view(B, N, H, hd).transpose(1, 2)  # [B, H, N, hd]
        y = F.scaled_dot_product_attention(q, k, v)  # [B, H, Q, hd]
        y = y.transpose(1, 2).reshape(B, Q, D).mean(dim=1)  # [B, D]: the mean over the queries
        return self.linear(y)
