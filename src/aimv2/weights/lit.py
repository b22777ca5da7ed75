"""LiT checkpoints: Apple's ``aimv2-large-patch14-224-lit`` layout, transformers' ``Aimv2Model`` and ours.

Layouts (the maps are in ``keymaps.py``):

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

from ..models.text import TEXT_SIZES, TextConfig
from ..objectives.lit import LiT, LiTConfig
from .errors import CheckpointError
from .hf_config import encoder_config_from_hf, hf_lit_config, text_config_from_hf
from .hub import fetch_release, fetch_spec, is_hub_spec
from .keymaps import LIT_LAYOUTS
from .layout import detect_lit_layout, lit_from_ours, lit_to_ours
from .preprocessing import write_preprocessor_config
from .released import RELEASES
from .resolve import Checkpoint, load_strictly, resolve_config
from .safetensors_io import checkpoint_files, read_safetensors, write_safetensors

LIT_FILE = "lit.safetensors"  # what a LiT training run writes


# ------------------------------------------------------------------------------------------ reading
@dataclass
class LiTCheckpoint:
    """A LiT checkpoint read into our layout, with its config and the metadata of the file (e.g. ``mean_std``)."""

    state_dict: dict[str, torch.Tensor]  # our names
    layout: str
    source: str
    config: LiTConfig
    metadata: dict[str, str]

    def build(self) -> LiT:
        """The LiT model with these weights, strictly (built on the meta device, then assigned)."""
        return load_strictly(lambda: LiT(self.config), self.state_dict, f"{self.source} ({self.layout} LiT layout)")


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


def read_lit(path: str | os.PathLike, config: LiTConfig | None = None) -> LiTCheckpoint:
    """A LiT checkpoint in any layout (file, LiT run folder, transformers folder), renamed to ours, with its config:
    ``config`` when given, else our metadata, a config.json, or the shapes of Apple's official LiT.

    ``path`` may also be a published LiT name (``aimv2-large-patch14-224-lit``) or ``hf:REPO[@REV]``, fetched
    through the Hugging Face cache."""
    if is_hub_spec(path):
        path = fetch_spec(str(path))
    elif str(path) in RELEASES and not Path(path).exists():
        path = fetch_release(str(path), kind="lit")[1]
    path = Path(path)
    files, hf = checkpoint_files(path, LIT_FILE, "LiT run folder")
    raw, metadata = read_safetensors(files)
    layout = detect_lit_layout(raw)
    sd = lit_to_ours(raw, layout)
    if config is not None:
        cfg = config
    elif "lit_config" in metadata:
        cfg = LiTConfig.from_dict(json.loads(metadata["lit_config"]))
    else:
        enc_sd = {k.removeprefix("encoder."): v for k, v in sd.items() if k.startswith("encoder.")}
        enc_cfg = encoder_config_from_hf(hf, "encoder.pos_embed" in sd) if hf else None
        enc_cfg, name, _ = resolve_config(Checkpoint(enc_sd, layout, str(path), enc_cfg, None), None, {})
        if "head.k.weight" not in sd or "image_proj.weight" not in sd:
            raise CheckpointError(f"{path}: no attention-pool head or image projection: not a LiT checkpoint")
        cfg = LiTConfig(
            encoder=enc_cfg,
            text=text_config_from_hf(hf) if hf else _text_from_shapes(sd, str(path)),
            projection_dim=sd["image_proj.weight"].shape[0],
            max_logit_scale=float(hf.get("max_logit_scale", 100.0)) if hf else 100.0,
            encoder_name=name,
        )
    return LiTCheckpoint(sd, layout, str(path), cfg, metadata)


def load_lit(path: str | os.PathLike, config: LiTConfig | None = None) -> LiT:
    """``LiT`` from Apple's LiT file, a transformers ``Aimv2Model`` file or folder, or our ``lit.safetensors`` /
    LiT run folder. ``config`` states the model where the file cannot (an Apple-layout file of another size)."""
    return read_lit(path, config).build()


# ------------------------------------------------------------------------------------------ writing
def save_lit(model: LiT, path: str | os.PathLike, layout: str = "aimv2", metadata: dict | None = None) -> Path:
    """One safetensors file in ``layout`` with the LiT config (and ``metadata``) in its header. Atomic."""
    if layout not in LIT_LAYOUTS:
        raise CheckpointError(f"unknown layout {layout!r}: choose {', '.join(LIT_LAYOUTS)}")
    meta = {
        "producer": "aimv2",
        "kind": "lit",
        "layout": layout,
        "lit_config": json.dumps(model.cfg.to_dict()),
        **{k: str(v) for k, v in (metadata or {}).items()},
    }
    return write_safetensors(lit_from_ours(model.state_dict(), layout), path, meta)


def export_hf_lit(model: LiT, out_dir: str | os.PathLike, mean_std: str = "imagenet") -> Path:
    """A ``save_pretrained``-style folder (config.json + model.safetensors) for ``transformers.Aimv2Model``, with
    the ``preprocessor_config.json`` of its image tower (``mean_std``: what it was trained with)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_lit_config(model.cfg), indent=2) + "\n")
    write_preprocessor_config(model.cfg.encoder, out, mean_std)
    save_lit(model, out / "model.safetensors", layout="hf")
    return out


def convert_lit(src: str | os.PathLike, to: str, out: str | os.PathLike, mean_std: str | None = None) -> Path:
    """A LiT checkpoint (any layout, or a published name) rewritten: ``hf`` as a ``transformers.Aimv2Model``
    folder, ``apple`` / ``aimv2`` as one file. ``mean_std``: default what the file says it trained with, else
    CLIP's for Apple's and transformers' files (as their processors), ImageNet's for ours."""
    if to not in LIT_LAYOUTS:
        raise CheckpointError(f"a LiT model converts to {', '.join(LIT_LAYOUTS)}, not {to!r}")
    ckpt = read_lit(src)
    mean_std = mean_std or ckpt.metadata.get("mean_std") or ("imagenet" if ckpt.layout == "aimv2" else "clip")
    model = ckpt.build()
    if to == "hf":
        return export_hf_lit(model, out, mean_std)
    return save_lit(model, out, layout=to, metadata={"mean_std": mean_std})
