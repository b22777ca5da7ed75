"""transformers ``config.json`` <-> our configs, written by hand so that transformers is not a dependency.

Reading covers ``Aimv2VisionConfig`` (and Apple's hub configs, which have the same fields), ``Aimv2Config``
with its nested ``vision_config`` / ``text_config``; fields a file leaves out take transformers' defaults.
Writing gives what ``Aimv2VisionModel.from_pretrained`` / ``Aimv2Model.from_pretrained`` need to build the
model our weights fit.
"""

from __future__ import annotations

import torch

from ..models.encoder import EncoderConfig
from ..models.text import TextConfig
from ..objectives.lit import LiTConfig
from .errors import CheckpointError

# transformers.Aimv2VisionConfig defaults, for config.json files that leave fields out.
HF_VISION_DEFAULTS = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=24,
    num_attention_heads=8,
    num_channels=3,
    image_size=224,
    patch_size=14,
    rms_norm_eps=1e-5,
)


# ------------------------------------------------------------------------------------------ reading
def encoder_config_from_hf(d: dict, learned: bool) -> EncoderConfig:
    """EncoderConfig from a transformers (or Apple hub) config.json; nested ``vision_config`` for Aimv2Model.
    ``learned``: whether the checkpoint has a position embedding (the config's ``is_native`` is not always set)."""
    v = {**HF_VISION_DEFAULTS, **{k: x for k, x in d.get("vision_config", d).items() if x is not None}}
    p, img = int(v["patch_size"]), v["image_size"]
    img = int(img) if isinstance(img, int | float) else tuple(int(x) for x in img)
    if not learned:  # sin-cos models take any size; keep the nominal one a multiple of the patch
        img = max(p, (img if isinstance(img, int) else img[0]) // p * p)
    return EncoderConfig(
        embed_dim=int(v["hidden_size"]),
        depth=int(v["num_hidden_layers"]),
        num_heads=int(v["num_attention_heads"]),
        mlp_hidden_dim=int(v["intermediate_size"]),
        patch_size=p,
        img_size=img,
        pos_embed="learned" if learned else "sincos",
        in_chans=int(v["num_channels"]),
        norm_eps=float(v["rms_norm_eps"]),
    )


def text_config_from_hf(d: dict) -> TextConfig:
    """The text tower of an ``Aimv2Config`` config.json (its ``text_config``, transformers' defaults for the rest)."""
    t = {k: v for k, v in d.get("text_config", {}).items() if v is not None}
    eos = t.get("eos_token_id", 49407)
    return TextConfig(
        vocab_size=int(t.get("vocab_size", 49408)),
        embed_dim=int(t.get("hidden_size", 768)),
        depth=int(t.get("num_hidden_layers", 12)),
        num_heads=int(t.get("num_attention_heads", 6)),
        mlp_hidden_dim=int(t.get("intermediate_size", 2048)),
        context_length=int(t.get("max_position_embeddings", 77)),
        eos_id=int(eos[0] if isinstance(eos, list) else eos),
        norm_eps=float(t.get("rms_norm_eps", 1e-5)),
    )


# ------------------------------------------------------------------------------------------ writing
def hf_vision_config(cfg: EncoderConfig, dtype: torch.dtype = torch.float32) -> dict:
    """An ``Aimv2VisionConfig``-compatible config.json."""
    h, w = cfg.image_hw
    if cfg.pos_embed == "learned" and h != w:
        raise CheckpointError(f"transformers' Aimv2VisionModel needs a square learned grid, this one is {h}x{w}")
    return {
        "architectures": ["Aimv2VisionModel"],
        "model_type": "aimv2_vision_model",
        "hidden_size": cfg.embed_dim,
        "intermediate_size": cfg.mlp_hidden_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "num_channels": cfg.in_chans,
        "image_size": h,
        "patch_size": cfg.patch_size,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "attention_dropout": 0.0,
        "qkv_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "use_head": False,
        "is_native": cfg.pos_embed == "sincos",
        "dtype": str(dtype).removeprefix("torch."),
    }


def hf_lit_config(cfg: LiTConfig) -> dict:
    """An ``Aimv2Config``-compatible config.json for the two towers."""
    if (cfg.head_num_heads or cfg.encoder.num_heads) != cfg.encoder.num_heads:
        raise CheckpointError("transformers' pooling head uses the encoder's head count; this model's differs")
    t = cfg.text
    return {
        "architectures": ["Aimv2Model"],
        "model_type": "aimv2",
        "projection_dim": cfg.projection_dim,
        "logit_scale_init_value": float(torch.log(torch.tensor(1.0 / cfg.init_temperature))),
        "max_logit_scale": cfg.max_logit_scale,
        "vision_config": {**hf_vision_config(cfg.encoder), "use_head": True},
        "text_config": {
            "model_type": "aimv2_text_model",
            "vocab_size": t.vocab_size,
            "hidden_size": t.embed_dim,
            "intermediate_size": t.mlp_hidden_dim,
            "num_hidden_layers": t.depth,
            "num_attention_heads": t.num_heads,
            "max_position_embeddings": t.context_length,
            "eos_token_id": t.eos_id,
            "rms_norm_eps": t.norm_eps,
            "hidden_act": "silu",
            "qkv_bias": False,
            "mlp_bias": False,
        },
    }
