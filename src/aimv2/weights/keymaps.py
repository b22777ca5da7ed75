"""Key maps as data: how Apple, transformers and timm name the tensors of our modules.

Four layouts name the same encoder tensors:

- ``apple``: Apple's released ``model.safetensors`` (``preprocessor.*``, ``trunk.*``); timm's
  ``checkpoint_filter_fn`` reads it directly, so it is what training runs write.
- ``hf``: ``transformers.Aimv2VisionModel`` (q, k, v as separate projections; the position embedding an
  ``nn.Embedding`` [N, D]).
- ``timm``: timm's ``aimv2_*`` models (``VisionTransformer`` with SwiGLU): our names, except that the two
  SwiGLU input projections are ``fc1_g`` (gate) and ``fc1_x`` (value).
- ``aimv2``: our module names (``models/encoder.py``), the identity map.

A map is a tuple of :class:`Rename` rows, (our name, their name) with ``{i}`` for the block index; a row whose
"their name" is a triple splits our fused qkv on dim 0. The LiT maps (``objectives/lit.py``) reuse the encoder rows
under the image prefix and the block rows under the text prefix. :func:`to_aimv2` and :func:`from_aimv2` apply
a map; everything else about layouts (telling them apart, the extras of two-tower files) is in ``layout.py``.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch

from .errors import CheckpointError

# What we write (``save_encoder``, ``aimv2 convert --to``). ``timm`` loads with a plain strict
# ``load_state_dict`` into the model ``timm_args.timm_model_args`` names; ``apple`` goes through timm's own
# checkpoint filter (``pretrained_cfg_overlay=dict(file=...)``).
LAYOUTS = ("apple", "hf", "timm", "aimv2")
LIT_LAYOUTS = ("apple", "hf", "aimv2")


class Rename(NamedTuple):
    """One row of a key map."""

    ours: str  # our key; "{i}" stands for the block index
    theirs: str | tuple[str, ...]  # their key, or the (q, k, v) keys our fused qkv splits into on dim 0
    unbatch: bool = False  # theirs is [N, D] (an nn.Embedding) where ours is [1, N, D]


# ------------------------------------------------------------------------------------------ the encoder
APPLE_KEYS: tuple[Rename, ...] = (
    Rename("patch_embed.proj.weight", "preprocessor.patchifier.proj.weight"),
    Rename("patch_embed.proj.bias", "preprocessor.patchifier.proj.bias"),
    Rename("patch_embed.norm.weight", "preprocessor.patchifier.norm.weight"),
    Rename("pos_embed", "preprocessor.pos_embed"),
    Rename("blocks.{i}.norm1.weight", "trunk.blocks.{i}.norm_1.weight"),
    Rename("blocks.{i}.attn.qkv.weight", "trunk.blocks.{i}.attn.qkv.weight"),
    Rename("blocks.{i}.attn.proj.weight", "trunk.blocks.{i}.attn.proj.weight"),
    Rename("blocks.{i}.norm2.weight", "trunk.blocks.{i}.norm_2.weight"),
    Rename("blocks.{i}.mlp.fc1.weight", "trunk.blocks.{i}.mlp.fc1.weight"),
    Rename("blocks.{i}.mlp.fc2.weight", "trunk.blocks.{i}.mlp.fc2.weight"),
    Rename("blocks.{i}.mlp.fc3.weight", "trunk.blocks.{i}.mlp.fc3.weight"),
    Rename("norm.weight", "trunk.post_trunk_norm.weight"),
)

_HF_ATTN = "encoder.layers.{i}.attention."
HF_KEYS: tuple[Rename, ...] = (
    Rename("patch_embed.proj.weight", "embeddings.patch_embed.weight"),
    Rename("patch_embed.proj.bias", "embeddings.patch_embed.bias"),
    Rename("patch_embed.norm.weight", "embeddings.rms_norm.weight"),
    Rename("pos_embed", "embeddings.position_embedding.weight", unbatch=True),
    Rename("blocks.{i}.norm1.weight", "encoder.layers.{i}.rms_norm1.weight"),
    Rename("blocks.{i}.attn.qkv.weight", tuple(_HF_ATTN + f"{x}_proj.weight" for x in "qkv")),
    Rename("blocks.{i}.attn.proj.weight", _HF_ATTN + "out_proj.weight"),
    Rename("blocks.{i}.norm2.weight", "encoder.layers.{i}.rms_norm2.weight"),
    Rename("blocks.{i}.mlp.fc1.weight", "encoder.layers.{i}.ffn.gate_proj.weight"),
    Rename("blocks.{i}.mlp.fc3.weight", "encoder.layers.{i}.ffn.up_proj.weight"),
    Rename("blocks.{i}.mlp.fc2.weight", "encoder.layers.{i}.ffn.down_proj.weight"),
    Rename("norm.weight", "rms_norm.weight"),
)

# timm keeps our names but for the SwiGLU input projections (its own _convert_aimv2 renames fc1 -> fc1_g and
# fc3 -> fc1_x when it reads an Apple file).
TIMM_KEYS: tuple[Rename, ...] = tuple(
    Rename(r.ours, r.ours.replace("mlp.fc1.", "mlp.fc1_g.").replace("mlp.fc3.", "mlp.fc1_x.")) for r in APPLE_KEYS
)

KEY_MAPS: dict[str, tuple[Rename, ...]] = {"apple": APPLE_KEYS, "hf": HF_KEYS, "timm": TIMM_KEYS}

# Prefixes of the two-tower (LiT) files, and what of them is not the encoder trunk.
APPLE_LIT_PREFIX, APPLE_LIT_HEAD = "image_encoder.", "image_encoder.head."
HF_CLIP_PREFIX, HF_HEAD = "vision_model.", "head."


# ------------------------------------------------------------------------------------------ LiT
def _prefixed(rows: tuple[Rename, ...], ours: str, theirs: str) -> tuple[Rename, ...]:
    def add(t):
        return tuple(theirs + x for x in t) if isinstance(t, tuple) else theirs + t

    return tuple(Rename(ours + r.ours, add(r.theirs), r.unbatch) for r in rows)


def _blocks(rows: tuple[Rename, ...]) -> tuple[Rename, ...]:
    return tuple(r for r in rows if r.ours.startswith("blocks."))


APPLE_LIT_KEYS: tuple[Rename, ...] = (
    *_prefixed(APPLE_KEYS, "encoder.", APPLE_LIT_PREFIX),
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
    *_prefixed(HF_KEYS, "encoder.", HF_CLIP_PREFIX),
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

LIT_KEY_MAPS: dict[str, tuple[Rename, ...]] = {"apple": APPLE_LIT_KEYS, "hf": HF_LIT_KEYS}


# ------------------------------------------------------------------------------------------ applying a map
def key_map(layout: str, maps: dict[str, tuple[Rename, ...]] = KEY_MAPS) -> tuple[Rename, ...]:
    """The map of ``layout`` in ``maps``; an unknown layout is an error that lists the known ones."""
    if layout not in maps:
        raise CheckpointError(f"unknown layout {layout!r}: choose {', '.join([*maps, 'aimv2'])}")
    return maps[layout]


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(\d+)") + "$")


def _fill(template: str, m: re.Match) -> str:
    return template.replace("{i}", m.group(1)) if m.groups() else template


def _as_tuple(theirs: str | tuple[str, ...]) -> tuple[str, ...]:
    return theirs if isinstance(theirs, tuple) else (theirs,)


def to_aimv2(state_dict: dict[str, torch.Tensor], rows: tuple[Rename, ...]) -> dict[str, torch.Tensor]:
    """Rename their keys to ours with the map ``rows`` (fusing q, k, v). Keys no row knows are kept as they are,
    so a strict load reports them as unexpected; an incomplete q/k/v triple is kept under its own names."""
    rules = [(_pattern(t), r, j) for r in rows for j, t in enumerate(_as_tuple(r.theirs))]
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, tuple[str, torch.Tensor]]] = {}  # fused key -> part index -> (their key, tensor)
    for key, t in state_dict.items():
        for pat, r, j in rules:
            if (m := pat.match(key)) is None:
                continue
            if isinstance(r.theirs, tuple):
                parts.setdefault(_fill(r.ours, m), {})[j] = (key, t)
            else:
                out[_fill(r.ours, m)] = t.unsqueeze(0) if r.unbatch else t  # [N, D] -> [1, N, D]
            break
        else:
            out[key] = t
    for name, got in parts.items():
        if len(got) == 3:
            out[name] = torch.cat([got[j][1] for j in range(3)], dim=0)  # [3D, D] = q, k, v stacked
        else:
            out.update(dict(got.values()))
    return out


def from_aimv2(state_dict: dict[str, torch.Tensor], rows: tuple[Rename, ...], layout: str) -> dict[str, torch.Tensor]:
    """Rename our keys to theirs with the map ``rows`` (splitting qkv on dim 0). Every key must have a row;
    ``layout`` names the map in the error."""
    rules = [(_pattern(r.ours), r) for r in rows]
    out: dict[str, torch.Tensor] = {}
    for key, t in state_dict.items():
        for pat, r in rules:
            if (m := pat.match(key)) is None:
                continue
            if isinstance(r.theirs, tuple):  # [3D, D] -> three [D, D]; cloned: safetensors refuses shared storage
                for name, part in zip(r.theirs, t.chunk(3, dim=0), strict=True):
                    out[_fill(name, m)] = part.clone()
            else:
                out[_fill(r.theirs, m)] = t[0] if r.unbatch else t  # [1, N, D] -> [N, D]
            break
        else:
            raise CheckpointError(f"no {layout} name for our key {key!r}")
    return out
