"""What ``timm.create_model`` needs to build the model a timm-layout file of ours loads into, strictly.

timm's ``aimv2_*`` models are its ``VisionTransformer`` with SwiGLU, RMSNorm, no class token and no biases but the
patch embedding's: our encoder, tensor for tensor, under the names of ``keymaps.TIMM_KEYS``. timm registers the
four official sizes at 224/336/448; anything else (our tiny and small sizes, other depths or resolutions) is the
large model's architecture with its fields overridden, which timm's factory allows. timm has no sin-cos position
embedding for these models, so native encoders have no timm form.
"""

from __future__ import annotations

from ..models.encoder import EncoderConfig
from .errors import CheckpointError
from .released import RELEASES
from .resolve import name_of


def timm_model_args(cfg: EncoderConfig) -> tuple[str, dict]:
    """(architecture, kwargs) such that ``timm.create_model(architecture, **kwargs)`` has exactly our tensors.

    ``num_classes=0``: the encoder alone, its ``forward_features`` our ``forward``."""
    if cfg.pos_embed != "learned":
        raise CheckpointError(
            "timm's AIMv2 models have a learned position embedding; a native (sin-cos) encoder has no timm form"
        )
    if cfg.norm_eps != 1e-5:
        raise CheckpointError(f"timm's AIMv2 models use RMSNorm eps 1e-5; this encoder uses {cfg.norm_eps}")
    name = name_of(cfg)
    if name in RELEASES and cfg.in_chans == 3:  # Apple's sizes and resolutions: timm registers each by name
        return name.replace("-", "_").lower(), {"num_classes": 0}
    h, w = cfg.image_hw
    kwargs = {
        "num_classes": 0,
        "img_size": h if h == w else (h, w),
        "patch_size": cfg.patch_size,
        "in_chans": cfg.in_chans,
        "embed_dim": cfg.embed_dim,
        "depth": cfg.depth,
        "num_heads": cfg.num_heads,
        # timm sizes the SwiGLU as int(dim * mlp_ratio): half a unit over the exact ratio survives the float rounding
        "mlp_ratio": (cfg.mlp_hidden_dim + 0.5) / cfg.embed_dim,
    }
    return "aimv2_large_patch14_224", kwargs
