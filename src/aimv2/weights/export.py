"""Writing encoders: one safetensors file in any layout, a transformers folder (with its image processor's
config), and layout conversion.

Every file we write carries safetensors metadata (``layout``, ``config`` as JSON, ``name``), so a checkpoint
loads from its path alone and a loader can check it against the model asked for.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..models.encoder import EncoderConfig, VisionEncoder
from .encoders import read_checkpoint
from .errors import CheckpointError
from .hf_config import hf_vision_config
from .keymaps import LAYOUTS
from .layout import from_ours
from .preprocessing import preprocessing, write_preprocessor_config
from .resolve import check_state_dict, resolve_config
from .safetensors_io import write_safetensors
from .timm_args import timm_model_args


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown layout {layout!r}: choose {', '.join(LAYOUTS)}")


def write_state_dict(
    sd: dict[str, torch.Tensor], cfg: EncoderConfig, name: str | None, path: str | os.PathLike, layout: str
) -> Path:
    """Write our-layout ``sd`` to ``path`` in ``layout``, with our metadata (for ``timm``: the
    ``timm.create_model`` arguments it loads into, as ``timm_model`` and ``timm_kwargs``). Atomic."""
    meta = {"producer": "aimv2", "layout": layout, "config": json.dumps(cfg.to_dict())}
    if layout == "timm":
        arch, kwargs = timm_model_args(cfg)
        meta.update(timm_model=arch, timm_kwargs=json.dumps(kwargs))
    if name:
        meta["name"] = name
    return write_safetensors(from_ours(sd, layout), path, meta)


def save_encoder(model: VisionEncoder, path: str | os.PathLike, layout: str = "apple") -> Path:
    """Save the encoder's weights as one safetensors file in ``layout`` (``apple`` loads in Apple's code and
    through timm's checkpoint filter as well as here; ``timm`` into ``timm.create_model(...)`` with a plain
    strict ``load_state_dict``; ``aimv2`` is our names; ``hf`` the key names of transformers)."""
    _check_layout(layout)
    return write_state_dict(model.state_dict(), model.cfg, model.name, path, layout)


def write_hf(
    sd: dict[str, torch.Tensor],
    cfg: EncoderConfig,
    name: str | None,
    out_dir: str | os.PathLike,
    mean_std: str = "imagenet",
) -> Path:
    """A ``save_pretrained``-style folder (config.json, preprocessor_config.json, model.safetensors) from
    our-layout ``sd``; ``mean_std`` is the normalization the weights were trained with."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = sd["patch_embed.proj.weight"].dtype
    (out / "config.json").write_text(json.dumps(hf_vision_config(cfg, dtype), indent=2) + "\n")
    write_preprocessor_config(cfg, out, mean_std)
    write_state_dict(sd, cfg, name, out / "model.safetensors", "hf")
    return out


def export_hf(model: VisionEncoder, out_dir: str | os.PathLike, mean_std: str | None = None) -> Path:
    """A folder that ``transformers.Aimv2VisionModel.from_pretrained`` loads with our outputs, and
    ``AutoImageProcessor.from_pretrained`` with our preprocessing (``mean_std``: default as ``preprocessing``)."""
    mean_std = preprocessing(model, mean_std=mean_std).mean_std
    return write_hf(model.state_dict(), model.cfg, model.name, out_dir, mean_std)


def convert_checkpoint(
    src: str | os.PathLike, to: str, out: str | os.PathLike, name: str | None = None, mean_std: str = "imagenet"
) -> Path:
    """Rewrite a checkpoint in another layout without building the model: tensors keep their dtype and
    bits. The state dict is first checked strictly against the model it claims to be (on the meta device).
    ``mean_std`` goes into the ``hf`` folder's preprocessor_config.json."""
    _check_layout(to)
    ckpt = read_checkpoint(src)
    cfg, name, _ = resolve_config(ckpt, name, {})
    with torch.device("meta"):
        check_state_dict(ckpt.state_dict, VisionEncoder(cfg, name=name), f"{src} ({ckpt.layout} layout)")
    if to == "hf":
        return write_hf(ckpt.state_dict, cfg, name, out, mean_std)
    return write_state_dict(ckpt.state_dict, cfg, name, out, to)
