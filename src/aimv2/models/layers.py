"""Building blocks shared by the AIMv2 encoder, decoder and text tower.

Every block is pre-norm: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``. Attention goes through
:func:`aimv2.models.attention.attend`, which takes the pattern as an :class:`AttentionMask` (or a boolean
tensor, ``True`` meaning "may attend") and runs it through the backend chosen for the device, dtype and length
(fused SDPA, FlexAttention on CUDA for prefix masks, or two matmuls on CPU in bf16 at short lengths).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionMask, attend
from .moe import MoEConfig, MoESwiGLU

KV = tuple[torch.Tensor, torch.Tensor]  # cached keys and values of one attention layer, each [B, H, P, head_dim]
Mask = AttentionMask | torch.Tensor | None  # what a block's attention accepts (see models/attention.py)


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale, computed in float32.

    Under bf16 autocast the mean of squares loses too much precision in bf16, so the statistic is
    taken in float32 and the result cast back to the input dtype (as transformers and timm do).
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)
        return y.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class SwiGLU(nn.Module):
    """``fc2(silu(fc1(x)) * fc3(x))``: fc1 is the gate, fc3 the up projection, fc2 the down one.

    The names follow Apple's checkpoints so that the key maps in ``weights/keymaps.py`` stay short.
    """

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.fc3 = nn.Linear(dim, hidden_dim, bias=bias)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.fc2(F.silu(self.fc1(x)) * self.fc3(x))
        # Inference: the same values computed in place, which saves two [B, N, hidden] buffers per call
        # (about 5% of the MLP's time in fp32 on CPU). Autograd would need the intermediates, hence the branch.
        h = F.silu(self.fc1(x), inplace=True)
        return self.fc2(h.mul_(self.fc3(x)))


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (q, k, v stacked on the output dim)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, proj_bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor, mask: Mask = None, is_causal: bool = False) -> torch.Tensor:
        # x: [B, N, D]; mask: an AttentionMask, a bool [B or 1, 1, N, N] (True = may attend), or None
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, hd]
        y = attend(q, k, v, mask, is_causal)
        y = y.transpose(1, 2).reshape(B, N, D)  # [B, N, D]
        return self.proj(y)

    def forward_cached(self, x: torch.Tensor, past: KV | None) -> tuple[torch.Tensor, KV]:
        """Causal attention for ``L`` new positions that follow ``P`` cached ones (incremental decoding).

        x: [B, L, D] the new positions; past: (k, v) each [B, H, P, hd] of the earlier positions, or None.
        New position i sees every cached position and new positions <= i, exactly as in a causal forward over
        all ``P + L`` positions. Returns (y [B, L, D], (k, v) each [B, H, P + L, hd]) for the next call.
        """
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, hd]
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # [B, H, P + L, hd]
            v = torch.cat([past[1], v], dim=2)
        P = k.shape[2] - L
        mask = None
        if L > 1 and P > 0:  # queries are the last L of P + L positions: query i sees keys j <= P + i
            key = torch.arange(P + L, device=x.device)
            mask = key[None, :] <= (P + torch.arange(L, device=x.device))[:, None]  # [L, P + L]
        # L == 1 sees everything (no mask); P == 0 is a plain causal forward
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and L > 1)
        y = y.transpose(1, 2).reshape(B, L, D)  # [B, L, D]
        return self.proj(y), (k, v)


class Block(nn.Module):
    """Pre-norm transformer block: RMSNorm -> attention, RMSNorm -> SwiGLU (or a mixture of SwiGLU experts, ``moe``),
    both residual."""

    def __init__(
        self, dim: int, num_heads: int, mlp_hidden_dim: int, norm_eps: float = 1e-5, moe: MoEConfig | None = None
    ):
        super().__init__()
        self.norm1 = RMSNorm(dim, norm_eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = RMSNorm(dim, norm_eps)
        self.mlp = (
            MoESwiGLU(dim, mlp_hidden_dim, moe) if moe is not None and moe.enabled else SwiGLU(dim, mlp_hidden_dim)
        )

    def forward(self, x: torch.Tensor, mask: Mask = None, is_causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask=mask, is_causal=is_causal)
        x = x + self.mlp(self.norm2(x))
        return x

    def forward_cached(self, x: torch.Tensor, past: KV | None) -> tuple[torch.Tensor, KV]:
        """The causal forward of ``x`` [B, L, D] after cached positions (see :meth:`Attention.forward_cached`)."""
        a, kv = self.attn.forward_cached(self.norm1(x), past)
        x = x + a
        x = x + self.mlp(self.norm2(x))
        return x, kv
