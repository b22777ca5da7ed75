"""LiT checkpoints: Apple's ``aimv2-large-patch14-224-lit`` layout, transformers' ``Aimv2Model`` and ours.

The same key-map data as the encoder (``checkpoints.py``): the encoder rows are reused under the image prefix, the
block rows under the text prefix, plus one row per tensor of the pooling head, the text embeddings and the
projections. Layouts:

- ``apple``: ``image_encoder.{preprocessor,trunk}.*``, ``image_encoder.head.{cls_token,k,v,linear}``,
  ``text_encoder.preprocessor.{text_embedding.weight,positional_embedding}``, ``text_encoder.trunk.*``,
  ``image_projector``, ``text_projector``, ``log_logit_scale``.
- ``hf``: ``vision_model.*`` (with ``head.{k_proj,v_proj,output_proj,cls_token}``), ``text_model.*``,
  ``visual_projection``, ``text_projection``, ``logit_scale``.
- ``aimv2``: our module names (``objectives/lit.py``): ``encoder.*``, ``head.*``, ``text.*``, ``image_proj``,
  ``text_proj``, ``logit_scale``.

Files we write carry the LiT config as JSON metadata, so a checkpoint loads from its path alone; an Apple file is
read from its shapes (named sizes give the head counts); a transformers folder from its config.json. Loading is
strict, from safetensors only.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoints import (
    APPLE_KEYS,
    HF_KEYS,
    Checkpoint,
    CheckpointError,
    Rename,
    _config_from_hf,
    check_state_dict,
    checkpoint_files,
    from_aimv2,
    hf_config,
    read_safetensors,
    resolve_config,
    to_aimv2,
)
from .models.text import TEXT_SIZES, TextConfig
from .objectives.lit import LiT, LiTConfig

LIT_FILE = "lit.safetensors"  # what a LiT training run writes


def _prefixed(rows: tuple[Rename, ...], ours: str, theirs: str) -> tuple[Rename, ...]:
    def add(t):
        return tuple(theirs + x for x in t) if isinstance(t, tuple) else theirs + t

    return tuple(Rename(ours + r.ours, add(r.theirs), r.unbatch) for r in rows)


def _blocks(rows: tuple[Rename, ...]) -> tuple[Rename, ...]:
    return tuple(r for r in rows if r.ours.startswith("blocks."))


APPLE_LIT_KEYS: tuple[Rename, ...] = (
    *_prefixed(APPLE_KEYS, "encoder.", "image_encoder."),
    Rename("head.cls_token", "image_encoder.head.cls_token"),  # [1, 1, De]
    Rename("head.k.weight", "image_encoder.head.k.weight"),
    Rename("head.v.weight", "image_encoder.head.v.weight"),
    Rename("head.linear.weight", "image_encoder.head.linear.weight"),
    Rename("head.linear.bias", "image_encoder.head.linear.bias"),
    Rename("text.token_embed.weight", "text_encoder.preprocessor.text_embedding.weight"),  # [V, Dt]
    Rename("text.pos_embed", "text_encoder.preprocessor.positional_embedding"),  # [T, Dt]
    *_prefixed(_blocks(APPLE_KEYS), "text.", "text_encoder."),
    Rename("text.norm.weight", "text_encoder.trunk.post_trunk_norm.weight"),
    Rename("image_proj.weight", "image_projector.weight"),  # [P, De]
    Rename("text_proj.weight", "text_projector.weight"),  # [P, Dt]
    Rename("logit_scale", "log_logit_scale"),  # scalar, before the clamp
)

HF_LIT_KEYS: tuple[Rename, ...] = (
    *_prefixed(HF_KEYS, "encoder.", "vision_model."),
    Rename("head.cls_token", "vision_model.head.cls_token"),
    Rename("head.k.weight", "vision_model.head.k_proj.weight"),
    Rename("head.v.weight", "vision_model.head.v_proj.weight"),
    Rename("head.linear.weight", "vision_model.head.output_proj.weight"),
    Rename("head.linear.bias", "vision_model.head.output_proj.bias"),
    Rename("text.token_embed.weight", "text_model.embeddings.token_embedding.weight"),
    Rename("text.pos_embed", "text_model.embeddings.position_embedding.weight"),  # nn.Embedding: [T, Dt] as ours
    *_prefixed(_blocks(HF_KEYS), "text.", "text_model."),
    Rename("text.norm.weight", "text_model.rms_norm.weight"),
    Rename("image_proj.weight", "visual_projection.weight"),
    Rename("text_proj.weight", "text_projection.weight"),
    Rename("logit_scale", "logit_scale"),
)

LIT_KEY_MAPS = {"apple": APPLE_LIT_KEYS, "hf": HF_LIT_KEYS}


def detect_lit_layout(sd: dict[str, torch.Tensor]) -> str:
    """``apple``, ``hf`` or ``aimv2`` for a two-tower state dict; raises for anything else (an encoder alone)."""
    if any(k.startswith("text_encoder.") for k in sd):
        return "apple"
    if any(k.startswith("text_model.") for k in sd):
        return "hf"
    if any(k.startswith("text.") for k in sd) and any(k.startswith("encoder.") for k in sd):
        return "aimv2"
    shown = ", ".join(list(sd)[:5])
    raise CheckpointError(f"not a LiT (two-tower) checkpoint: no text tower among its keys ({shown}, ...)")


def lit_to_aimv2(sd: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    return dict(sd) if layout == "aimv2" else to_aimv2(sd, layout, LIT_KEY_MAPS[layout])


def lit_from_aimv2(sd: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    return dict(sd) if layout == "aimv2" else from_aimv2(sd, layout, LIT_KEY_MAPS[layout])


# ------------------------------------------------------------------------------------------ reading
@dataclass
class LiTCheckpoint:
    state_dict: dict[str, torch.Tensor]  # our names
    layout: str
    source: str
    config: LiTConfig
    metadata: dict[str, str]


def _text_from_shapes(sd: dict[str, torch.Tensor], source: str) -> TextConfig:
    V, D = sd["text.token_embed.weight"].shape
    T = sd["text.pos_embed"].shape[0]
    hidden = sd["text.blocks.0.mlp.fc1.weight"].shape[0]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"text\.blocks\.(\d+)\.", k)))
    size = next((s for s, (d, _, _, h) in TEXT_SIZES.items() if (d, h) == (D, hidden)), None)
    if size is None or V != 49408:
        raise CheckpointError(
            f"{source}: no config in the checkpoint, and its text tower ({D} wide, FFN {hidden}, vocabulary {V}) is "
            "not Apple's; it needs our metadata or a config.json"
        )
    return TextConfig(
        vocab_size=V, embed_dim=D, depth=depth, num_heads=TEXT_SIZES[size][2], mlp_hidden_dim=hidden, context_length=T
    )


def _text_from_hf(d: dict) -> TextConfig:
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


def read_lit(path: str | os.PathLike, config: LiTConfig | None = None) -> LiTCheckpoint:
    """A LiT checkpoint in any layout (file, LiT run folder, transformers folder), renamed to ours, with its config:
    ``config`` when given, else our metadata, a config.json, or the shapes of Apple's official LiT."""
    path = Path(path)
    files, hf = checkpoint_files(path, LIT_FILE, "LiT run folder")
    raw, metadata = read_safetensors(files)
    layout = detect_lit_layout(raw)
    sd = lit_to_aimv2(raw, layout)
    if config is not None:
        cfg = config
    elif "lit_config" in metadata:
        cfg = LiTConfig.from_dict(json.loads(metadata["lit_config"]))
    else:
        enc_sd = {k.removeprefix("encoder."): v for k, v in sd.items() if k.startswith("encoder.")}
        enc_cfg = _config_from_hf(hf, "encoder.pos_embed" in sd) if hf else None
        enc_cfg, name, _ = resolve_config(Checkpoint(enc_sd, layout, str(path), enc_cfg, None), None, {})
        if "head.k.weight" not in sd or "image_proj.weight" not in sd:
            raise CheckpointError(f"{path}: no attention-pool head or image projection: not a LiT checkpoint")
        cfg = LiTConfig(
            encoder=enc_cfg,
            text=_text_from_hf(hf) if hf else _text_from_shapes(sd, str(path)),
            projection_dim=sd["image_proj.weight"].shape[0],
            max_logit_scale=float(hf.get("max_logit_scale", 100.0)) if hf else 100.0,
            encoder_name=name,
        )
    return LiTCheckpoint(sd, layout, str(path), cfg, metadata)


def build_lit(ckpt: LiTCheckpoint) -> LiT:
    """The LiT model with ``ckpt``'s weights, strictly (built on the meta device, then assigned)."""
    with torch.device("meta"):
        model = LiT(ckpt.config)
    check_state_dict(ckpt.state_dict, model, f"{ckpt.source} ({ckpt.layout} LiT layout)")
    dtype = torch.get_default_dtype()
    model.load_state_dict(
        {k: v.to(dtype) if v.is_floating_point() else v for k, v in ckpt.state_dict.items()}, assign=True
    )
    return model


def load_lit(path: str | os.PathLike, config: LiTConfig | None = None) -> LiT:
    """``LiT`` from Apple's LiT file, a transformers ``Aimv2Model`` file or folder, or our ``lit.safetensors`` /
    LiT run folder. ``config`` states the model where the file cannot (an Apple-layout file of another size)."""
    return build_lit(read_lit(path, config))


# ------------------------------------------------------------------------------------------ writing
def save_lit(model: LiT, path: str | os.PathLike, layout: str = "aimv2", metadata: dict | None = None) -> Path:
    """One safetensors file in ``layout`` with the LiT config (and ``metadata``) in its header. Atomic."""
    if layout not in ("aimv2", "apple", "hf"):
        raise CheckpointError(f"unknown layout {layout!r}: choose aimv2, apple or hf")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tensors = {k: v.contiguous() for k, v in lit_from_aimv2(sd, layout).items()}
    meta = {
        "format": "pt",
        "producer": "aimv2",
        "kind": "lit",
        "layout": layout,
        "lit_config": json.dumps(model.cfg.to_dict()),
        **{k: str(v) for k, v in (metadata or {}).items()},
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)
    return path


def hf_lit_config(cfg: LiTConfig) -> dict:
    """An ``Aimv2Config``-compatible config.json (written by hand: transformers is not a dependency)."""
    if (cfg.head_num_heads or cfg.encoder.num_heads) != cfg.encoder.num_heads:
        raise CheckpointError("transformers' pooling head uses the encoder's head count; this model's differs")
    t = cfg.text
    return {
        "architectures": ["Aimv2Model"],
        "model_type": "aimv2",
        "projection_dim": cfg.projection_dim,
        "logit_scale_init_value": float(torch.log(torch.tensor(1.0 / cfg.init_temperature))),
        "max_logit_scale": cfg.max_logit_scale,
        "vision_config": {**hf_config(cfg.encoder), "use_head": True},
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


def export_hf_lit(model: LiT, out_dir: str | os.PathLike) -> Path:
    """A ``save_pretrained``-style folder (config.json + model.safetensors) for ``transformers.Aimv2Model``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_lit_config(model.cfg), indent=2) + "\n")
    save_lit(model, out / "model.safetensors", layout="hf")
    return out
