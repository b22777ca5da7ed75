"""Telling layouts apart and converting a state dict between them (the maps themselves are in ``keymaps.py``).

Detection reads key names only: Apple's ``preprocessor.``/``trunk.``, transformers' ``embeddings.``/
``encoder.layers.``, timm's SwiGLU ``mlp.fc1_g.``, ours otherwise; the two-tower files (Apple LiT,
transformers ``Aimv2Model``) under their image prefix. :func:`encoder_part` takes the encoder trunk out of
those, dropping only the extras it knows (the text tower, the pooling head), each with a log line.
"""

from __future__ import annotations

import logging

import torch

from .errors import CheckpointError
from .keymaps import (
    APPLE_LIT_HEAD,
    APPLE_LIT_PREFIX,
    HF_CLIP_PREFIX,
    HF_HEAD,
    KEY_MAPS,
    LIT_KEY_MAPS,
    from_aimv2,
    key_map,
    to_aimv2,
)

logger = logging.getLogger(__name__)

KNOWN = (*KEY_MAPS, "aimv2")  # the layouts we read


# ------------------------------------------------------------------------------------------ the encoder
def detect_layout(state_dict: dict[str, torch.Tensor]) -> str:
    """``apple``, ``hf``, ``timm`` or ``aimv2`` from the key names (LiT / Aimv2Model prefixes included)."""
    keys = list(state_dict)
    starts = lambda *prefixes: any(k.startswith(prefixes) for k in keys)
    if starts("preprocessor.", "trunk.", APPLE_LIT_PREFIX + "preprocessor.", APPLE_LIT_PREFIX + "trunk."):
        return "apple"
    if starts("embeddings.", "encoder.layers.", HF_CLIP_PREFIX + "embeddings.", HF_CLIP_PREFIX + "encoder."):
        return "hf"
    if starts("patch_embed.", "blocks."):
        return "timm" if any(".mlp.fc1_g." in k for k in keys) else "aimv2"
    shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
    raise CheckpointError(f"not an AIMv2 encoder in a known layout ({'|'.join(KNOWN)}); its keys: {shown}")


def to_ours(state_dict: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """An encoder state dict in ``layout`` renamed to our keys (unknown keys kept, for the strict load to list)."""
    return dict(state_dict) if layout == "aimv2" else to_aimv2(state_dict, key_map(layout))


def from_ours(state_dict: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Our encoder state dict renamed to ``layout``'s keys; a key the map does not know is an error."""
    return dict(state_dict) if layout == "aimv2" else from_aimv2(state_dict, key_map(layout), layout)


def convert_state_dict(state_dict: dict[str, torch.Tensor], src: str, dst: str) -> dict[str, torch.Tensor]:
    """Encoder state dict from layout ``src`` to layout ``dst`` (through ours)."""
    return from_ours(to_ours(state_dict, src), dst)


def encoder_part(state_dict: dict[str, torch.Tensor], layout: str, source: str) -> dict[str, torch.Tensor]:
    """The encoder trunk of a two-tower file (Apple LiT, transformers Aimv2Model) or of a vision model with
    an attention-pool head. Only these known extras are dropped, each with a log line; anything else stays
    and fails the strict load."""
    if layout == "apple" and any(k.startswith(APPLE_LIT_PREFIX) for k in state_dict):
        prefix, head = APPLE_LIT_PREFIX, APPLE_LIT_HEAD
        what = "Apple LiT checkpoint: loading the image_encoder trunk"
    elif layout == "hf" and any(k.startswith(HF_CLIP_PREFIX) for k in state_dict):
        prefix, head = HF_CLIP_PREFIX, HF_CLIP_PREFIX + HF_HEAD
        what = "transformers Aimv2Model checkpoint: loading the vision_model trunk"
    elif layout == "hf" and any(k.startswith(HF_HEAD) for k in state_dict):
        prefix, head = "", HF_HEAD
        what = "transformers Aimv2VisionModel checkpoint with a head: loading the trunk"
    else:
        return state_dict
    kept = {k: v for k, v in state_dict.items() if k.startswith(prefix) and not k.startswith(head)}
    group = lambda k: head.rstrip(".") if k.startswith(head) else k.split(".")[0]
    dropped = sorted({group(k) for k in state_dict if k not in kept})
    logger.info(
        "%s: %s (%d tensors); ignoring %d tensors of %s",
        source,
        what,
        len(kept),
        len(state_dict) - len(kept),
        ", ".join(dropped),
    )
    return {k[len(prefix) :]: v for k, v in kept.items()}


# ------------------------------------------------------------------------------------------ LiT
def detect_lit_layout(state_dict: dict[str, torch.Tensor]) -> str:
    """``apple``, ``hf`` or ``aimv2`` for a two-tower state dict; raises for anything else (an encoder alone)."""
    if any(k.startswith("text_encoder.") for k in state_dict):
        return "apple"
    if any(k.startswith("text_model.") for k in state_dict):
        return "hf"
    if any(k.startswith("text.") for k in state_dict) and any(k.startswith("encoder.") for k in state_dict):
        return "aimv2"
    shown = ", ".join(list(state_dict)[:5])
    raise CheckpointError(f"not a LiT (two-tower) checkpoint: no text tower among its keys ({shown}, ...)")


def lit_to_ours(state_dict: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    return dict(state_dict) if layout == "aimv2" else to_aimv2(state_dict, key_map(layout, LIT_KEY_MAPS))


def lit_from_ours(state_dict: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    return dict(state_dict) if layout == "aimv2" else from_aimv2(state_dict, key_map(layout, LIT_KEY_MAPS), layout)
