"""Named encoder sizes and the ``aimv2-{size}-patch{p}-{res}`` name parser.

The official sizes (large, huge, 1B, 3B) are Apple's (24 blocks, head dim 128); ``base`` is the
768-wide model of apple/ml-aim. ``tiny`` (5.5M at patch 16, 224 px) and ``small`` (21.6M) are our research sizes for
laptop-scale experiments: the DeiT-Ti/S widths with AIMv2's SwiGLU at about 2.7x width.
"""

from __future__ import annotations

import dataclasses
import re

from .encoder import EncoderConfig, VisionEncoder

# size -> (embed_dim, depth, num_heads, mlp_hidden_dim)
SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (192, 12, 3, 512),
    "small": (384, 12, 6, 1024),
    "base": (768, 12, 6, 2048),
    "large": (1024, 24, 8, 2816),
    "huge": (1536, 24, 12, 4096),
    "1B": (2048, 24, 16, 5632),
    "3B": (3072, 24, 24, 8192),
}

_NAME = re.compile(r"^aimv2-(?P<size>[A-Za-z0-9]+)-patch(?P<patch>\d+)-(?P<res>\d+|native)$")

# A learned grid for native models is never used (sin-cos is computed per input); 224 is the nominal size.
_NATIVE_NOMINAL_RES = 224


def _canonical_size(size: str) -> str | None:
    for k in SIZES:
        if k.lower() == size.lower():
            return k
    return None


def _match(name: str) -> tuple[re.Match, str]:
    m = _NAME.match(name)
    size = _canonical_size(m["size"]) if m else None
    if m is None or size is None:
        raise ValueError(
            f"unknown model name {name!r}: expected aimv2-{{size}}-patch{{p}}-{{res|native}} with size in "
            f"{'|'.join(SIZES)}, e.g. aimv2-large-patch14-224, aimv2-large-patch14-native, aimv2-tiny-patch8-64"
        )
    return m, size


def model_size(name: str) -> str:
    """``aimv2-1b-patch14-224`` -> ``1B``: the canonical size key of SIZES."""
    return _match(name)[1]


def parse_model_name(name: str) -> EncoderConfig:
    """``aimv2-large-patch14-224`` -> EncoderConfig. Raises ValueError that lists what is valid."""
    m, size = _match(name)
    dim, depth, heads, hidden = SIZES[size]
    patch = int(m["patch"])
    native = m["res"] == "native"
    res = _NATIVE_NOMINAL_RES if native else int(m["res"])
    if native and res % patch:
        res = (res // patch) * patch
    return EncoderConfig(
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_hidden_dim=hidden,
        patch_size=patch,
        img_size=res,
        pos_embed="sincos" if native else "learned",
    )


def model_config(name: str, **overrides) -> EncoderConfig:
    """Config for ``name`` with ``overrides`` applied to its fields (e.g. img_size=336, depth=6)."""
    return with_overrides(parse_model_name(name), overrides)


def with_overrides(cfg: EncoderConfig, overrides: dict) -> EncoderConfig:
    """``cfg`` with some fields replaced; an unknown field is a ValueError that lists the valid ones."""
    fields = {f.name for f in dataclasses.fields(EncoderConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown encoder option(s) {unknown}; valid: {sorted(fields)}")
    return dataclasses.replace(cfg, **overrides)


def list_models(res: tuple[str, ...] = ("224", "336", "448", "native")) -> list[str]:
    """The official names Apple released plus our research sizes (any other resolution also parses)."""
    names = [f"aimv2-{s}-patch14-{r}" for s in ("large", "huge", "1B", "3B") for r in res]
    names += ["aimv2-base-patch14-224", "aimv2-small-patch16-224", "aimv2-tiny-patch16-224", "aimv2-tiny-patch8-64"]
    return names


def build_encoder(name: str, **overrides) -> VisionEncoder:
    return VisionEncoder(model_config(name, **overrides), name=name)
