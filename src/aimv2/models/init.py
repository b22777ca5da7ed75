"""The initialisation of a fresh model, tensor by tensor: Apple's (ml-l3m's AIMv2 config), rule for rule.

A model is initialised once, when it is built (or after ``to_empty`` from the meta device). Loading a checkpoint,
``init_from`` and resuming overwrite every tensor, so these rules shape new runs only; runs and checkpoints of
earlier versions load and resume unchanged.

Encoder (``VisionEncoder``), D = embed_dim, p = patch_size, C = in_chans:

==================================  ============================================================================
tensor                              rule
==================================  ============================================================================
patch_embed.proj.weight             Xavier uniform of the conv as a [D, C*p*p] linear map (MAE's, l3m's)
patch_embed.proj.bias               PyTorch's Conv2d default: uniform(+-1/sqrt(C*p*p))
pos_embed (learned)                 normal(0, 0.02), not truncated
blocks.*.attn.qkv.weight            Xavier uniform on each of q, k, v separately: uniform(+-sqrt(3/D)) (l3m holds
                                    three [D, D] linears; Xavier on the fused [3D, D] would be 0.71x narrower)
blocks.*.attn.proj.weight           Xavier uniform
blocks.*.mlp.fc1/fc2/fc3.weight     Xavier uniform
every RMSNorm weight                ones
==================================  ============================================================================

A mixture-of-experts block (``model.decoder.moe``, models/moe.py): the experts' fc1/fc2/fc3 normal(0, 0.02)
(megablocks' init, as l3m's MoE), the router Xavier uniform (a Linear of the trunk).

Decoder (``MultimodalDecoder``), D = embed_dim, L = depth:

==================================  ============================================================================
tensor                              rule
==================================  ============================================================================
image_proj.weight, image_proj.bias  PyTorch's Linear default: uniform(+-1/sqrt(D_enc)) for both (l3m wraps a plain
                                    ``torch.nn.Linear`` and never re-initialises it)
bos                                 normal(0, 0.02) (l3m's cls token)
tok_embed.weight                    normal(0, 0.02)
text_pos                            normal(0, 0.01) (CLIP's, as l3m's text preprocessor)
blocks.*                            as the encoder's blocks (q, k, v separately)
pixel_head.weight, text_head.weight variance scaling, fan-in, scale 1/(1+L), truncated normal: the truncation is
                                    corrected as timm's ``variance_scaling_`` does, so the std is sqrt(scale/D)
                                    and the bounds +-2 sqrt(scale/D)/0.8796
every RMSNorm weight                ones
==================================  ============================================================================

Blocks of other towers (LiT's text tower) follow the same block rule (:func:`init_blocks_`).

Sources in apple/ml-l3m: ``model/preprocessors/vision.py`` (ViTPreprocessor.init_weights: pos normal 0.02, patch
weight Xavier flattened, the conv's bias left at PyTorch's default; TextPreprocessor: positions normal 0.01,
embeddings normal 0.02), ``model/trunks/transformer.py`` (Xavier on every Linear of the trunk, whose attention has
separate q, k and v projections), ``model/heads/classifier.py`` (``fan_in_depth_scaled``: timm's
``variance_scaling_`` with ``truncated_normal``), ``configs/aimv2/001_aimv2_hfdata.yaml`` (which style each part uses).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .layers import Attention, RMSNorm
from .moe import MoESwiGLU

# std of a standard normal truncated to [-2, 2] (timm's and TensorFlow's truncated-normal correction)
TRUNC_NORMAL_2STD = 0.87962566103423978


@torch.no_grad()
def xavier_qkv_(attn: Attention) -> None:
    """Xavier uniform on each of the q, k, v [D, D] blocks of the fused projection (rows q, then k, then v)."""
    for w in attn.qkv.weight.chunk(3, dim=0):
        nn.init.xavier_uniform_(w)
    if attn.qkv.bias is not None:
        nn.init.zeros_(attn.qkv.bias)


@torch.no_grad()
def init_blocks_(blocks: nn.Module) -> None:
    """Transformer blocks: Xavier uniform on every linear (q, k, v each on its own [D, D]), zero biases, norms 1."""
    for m in blocks.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)
    for m in blocks.modules():
        if isinstance(m, Attention):
            xavier_qkv_(m)
        elif isinstance(m, MoESwiGLU):
            m.reset_parameters()  # experts normal(0, 0.02), router Xavier (models/moe.py)


@torch.no_grad()
def variance_scaling_trunc_(weight: torch.Tensor, scale: float) -> None:
    """Fan-in variance scaling with a truncated normal whose std is sqrt(scale / fan_in) after truncation at
    two (corrected) standard deviations: the distribution of timm's ``variance_scaling_(..., mode="fan_in",
    distribution="truncated_normal")``."""
    fan_in = weight.shape[1] * (weight[0][0].numel() if weight.ndim > 2 else 1)
    std = math.sqrt(scale / fan_in) / TRUNC_NORMAL_2STD
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)
