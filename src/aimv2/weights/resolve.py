"""From a state dict to the encoder it fits: what its shapes say, the config to build, the strict load.

A checkpoint tells its model in one of three ways, tried in this order: our safetensors metadata (the config as
JSON and the model name), a transformers ``config.json``, or its tensor shapes alone (a bare Apple file: a named
size gives the head count). When the caller names a model too, the checkpoint is checked against it and a
mismatch names both sides. Loading is strict: a missing, unexpected or misshapen tensor is an error that lists
them, never a partial load; models are built on the meta device and assigned, so a 3B model never pays for a
random init first.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..models.encoder import EncoderConfig, VisionEncoder, resize_pos_embed
from ..models.registry import SIZES, model_config, with_overrides
from .errors import CheckpointError

logger = logging.getLogger(__name__)


@dataclass
class Checkpoint:
    """An encoder checkpoint read into our layout, with what it says about itself."""

    state_dict: dict[str, torch.Tensor]  # our key names, encoder only
    layout: str  # the layout it was stored in
    source: str  # where it came from, for messages
    config: EncoderConfig | None = None  # from our metadata, a config.json or a run's config; None: only shapes tell
    name: str | None = None  # model name from our metadata (or a config.json of a named size)


# ------------------------------------------------------------------------------------------ names and shapes
def size_of(dim: int, hidden: int) -> str | None:
    """The SIZES key of an encoder ``dim`` wide with FFN ``hidden`` (the pair is unique), else None."""
    return next((s for s, (d, _, _, h) in SIZES.items() if (d, h) == (dim, hidden)), None)


def name_of(cfg: EncoderConfig) -> str | None:
    """The registry name of a config when it is exactly a named size (square grid), else None."""
    size = size_of(cfg.embed_dim, cfg.mlp_hidden_dim)
    if size is None or SIZES[size] != (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_hidden_dim):
        return None
    h, w = cfg.image_hw
    if cfg.pos_embed == "learned" and h != w:
        return None
    return f"aimv2-{size}-patch{cfg.patch_size}-{'native' if cfg.pos_embed == 'sincos' else h}"


@dataclass
class Apparent:
    """What a state dict's tensor shapes say about the encoder that wrote it."""

    embed_dim: int
    depth: int
    mlp_hidden_dim: int
    patch_size: int
    in_chans: int
    num_positions: int | None  # learned position embedding length; None for sin-cos

    @classmethod
    def of(cls, sd: dict[str, torch.Tensor]) -> Apparent | None:
        w = sd.get("patch_embed.proj.weight")  # [D, C, p, p]
        fc1 = sd.get("blocks.0.mlp.fc1.weight")  # [hidden, D]
        if w is None or w.ndim != 4 or fc1 is None:
            return None
        blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
        pe = sd.get("pos_embed")  # [1, N, D] or absent
        n = None if pe is None else pe.shape[1]
        return cls(w.shape[0], max(blocks) + 1, fc1.shape[0], w.shape[-1], w.shape[1], n)

    def square_grid(self) -> tuple[int, int] | None:
        g = math.isqrt(self.num_positions or 0)
        return (g, g) if self.num_positions and g * g == self.num_positions else None

    def describe(self, grid: tuple[int, int] | None = None) -> str:
        """E.g. ``aimv2-huge-patch14-224 (1536 wide, 24 blocks, 16x16 learned grid)``."""
        grid = grid or self.square_grid()
        if self.num_positions is None:
            res, where = "native", "sin-cos positions"
        elif grid is not None:
            res, where = str(grid[0] * self.patch_size), f"{grid[0]}x{grid[1]} learned grid"
        else:
            res, where = "?", f"{self.num_positions} learned positions"
        size = size_of(self.embed_dim, self.mlp_hidden_dim)
        if size is None:
            what = f"an encoder of no named size (FFN {self.mlp_hidden_dim}, patch {self.patch_size})"
        else:
            what = f"aimv2-{size}-patch{self.patch_size}-{res}"
            what += f" with depth={self.depth}" if self.depth != SIZES[size][1] else ""
        return f"{what} ({self.embed_dim} wide, {self.depth} blocks, {where})"

    def config(self, source: str) -> EncoderConfig:
        """A config from shapes alone (a bare Apple file): needs a named size for the head count."""
        size = size_of(self.embed_dim, self.mlp_hidden_dim)
        grid = self.square_grid()
        if size is None or (self.num_positions is not None and grid is None):
            raise CheckpointError(
                f"{source}: no config in the checkpoint and its shapes ({self.describe()}) do not pin down a "
                "model; pass the model name (--name aimv2-...)"
            )
        dim, _, heads, hidden = SIZES[size]
        img = grid[0] * self.patch_size if grid else max(self.patch_size, 224 // self.patch_size * self.patch_size)
        return EncoderConfig(
            embed_dim=dim,
            depth=self.depth,
            num_heads=heads,
            mlp_hidden_dim=hidden,
            patch_size=self.patch_size,
            img_size=img,
            pos_embed="sincos" if grid is None else "learned",
            in_chans=self.in_chans,
        )


def _cfg_shape(cfg: EncoderConfig) -> str:
    where = "sin-cos positions" if cfg.pos_embed == "sincos" else "{}x{} learned grid".format(*cfg.grid_size)
    return f"{cfg.embed_dim} wide, {cfg.depth} blocks, {where}"


# ------------------------------------------------------------------------------------------ the config
def resolve_config(
    ckpt: Checkpoint, name: str | None, overrides: dict
) -> tuple[EncoderConfig, str | None, tuple[int, int] | None]:
    """The config to build for ``ckpt``, its model name, and the checkpoint's learned grid (None for sin-cos).

    From ``name`` when given (checked against the checkpoint's shapes and config), else from the checkpoint;
    ``overrides`` on top. A mismatch raises naming what the checkpoint looks like.
    """
    app = Apparent.of(ckpt.state_dict)
    if name is not None:
        cfg = model_config(name, **overrides)
    elif ckpt.config is not None:
        cfg, name = with_overrides(ckpt.config, overrides), ckpt.name
    elif app is not None:
        inferred = app.config(ckpt.source)
        cfg, name = with_overrides(inferred, overrides), name_of(inferred)
    else:
        raise CheckpointError(f"{ckpt.source}: no patch embedding or blocks found: not an encoder checkpoint")
    if app is None:  # nothing to check against; the strict load lists what is missing
        return cfg, name, None
    asked = f"{name or 'an encoder'} ({_cfg_shape(cfg)})"
    grid = None
    if app.num_positions is not None:
        c = ckpt.config
        grid = c.grid_size if c is not None and math.prod(c.grid_size) == app.num_positions else app.square_grid()
    got = (app.embed_dim, app.depth, app.mlp_hidden_dim, app.patch_size, app.in_chans, app.num_positions is None)
    want = (cfg.embed_dim, cfg.depth, cfg.mlp_hidden_dim, cfg.patch_size, cfg.in_chans, cfg.pos_embed == "sincos")
    if got != want:
        raise CheckpointError(f"{ckpt.source}: checkpoint looks like {app.describe(grid)}; you asked for {asked}")
    if ckpt.config is not None and ckpt.config.num_heads != cfg.num_heads:
        raise CheckpointError(
            f"{ckpt.source}: checkpoint config has {ckpt.config.num_heads} heads; you asked for {asked} with "
            f"{cfg.num_heads} heads"
        )
    if app.num_positions is not None:
        if grid is None:
            raise CheckpointError(
                f"{ckpt.source}: cannot tell the grid of a {app.num_positions}-position embedding without a config"
            )
        if grid != cfg.grid_size and "img_size" not in overrides:
            raise CheckpointError(
                f"{ckpt.source}: checkpoint looks like {app.describe(grid)}; you asked for {asked}: use the name "
                "of its resolution, or pass img_size to resize its position embedding"
            )
    return cfg, name, grid


# ------------------------------------------------------------------------------------------ loading
def check_state_dict(sd: dict[str, torch.Tensor], model: nn.Module, what: str) -> None:
    """Raise listing missing keys, unexpected keys and shape mismatches; nothing is loaded on error."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [
        f"{k}: checkpoint {list(sd[k].shape)} vs model {list(s)}"
        for k, s in expected.items()
        if k in sd and tuple(sd[k].shape) != s
    ]
    if not (missing or unexpected or mismatched):
        return

    def listed(title: str, items: list[str]) -> str:
        more = f", ... and {len(items) - 8} more" if len(items) > 8 else ""
        return f"\n  {title} ({len(items)}): {', '.join(items[:8])}{more}" if items else ""

    raise CheckpointError(
        f"{what} does not match the model (nothing was loaded; known keys renamed to our layout):"
        + listed("missing keys", missing)
        + listed("unexpected keys", unexpected)
        + listed("shape mismatches", mismatched)
    )


def load_strictly(make: Callable[[], nn.Module], sd: dict[str, torch.Tensor], what: str) -> nn.Module:
    """``make()`` built on the meta device and given ``sd`` with ``load_state_dict(assign=True)``, after a
    strict check. Weights come out in the default dtype (float32), as a freshly built model would."""
    with torch.device("meta"):
        model = make()
    check_state_dict(sd, model, what)
    dtype = torch.get_default_dtype()
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}, assign=True)
    return model


def encoder_from_checkpoint(ckpt: Checkpoint, name: str | None = None, **overrides) -> VisionEncoder:
    """The encoder with ``ckpt``'s weights, strictly; a learned position embedding of another grid than the
    config asked for (an ``img_size`` override) is resized first."""
    cfg, name, grid = resolve_config(ckpt, name, overrides)
    sd = dict(ckpt.state_dict)
    if grid is not None and grid != cfg.grid_size:
        logger.info("%s: resizing the position embedding from %dx%d to %dx%d", ckpt.source, *grid, *cfg.grid_size)
        sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], grid, cfg.grid_size)  # [1, h1*w1, D]
    return load_strictly(lambda: VisionEncoder(cfg, name=name), sd, f"{ckpt.source} ({ckpt.layout} layout)")
