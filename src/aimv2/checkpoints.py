"""Encoder checkpoints: safetensors I/O and conversion between Apple's, transformers' and our key layouts.

Three layouts name the same tensors:

- ``apple``: Apple's released ``model.safetensors`` (``preprocessor.*``, ``trunk.*``); timm's
  ``checkpoint_filter_fn`` reads it directly, so it is what we write for training runs.
  Apple's LiT files nest it under ``image_encoder.`` next to a text tower and a pooling head.
- ``hf``: ``transformers.Aimv2VisionModel`` (q, k, v as separate projections; position embedding
  as an ``nn.Embedding`` [N, D]); ``Aimv2Model`` nests it under ``vision_model.``.
- ``aimv2``: our module names (``models/encoder.py``).

Conversion is data: each layout is a table of (our name, their name) pairs with ``{i}`` for the block
index; a pair whose "their name" is a triple splits our fused qkv on dim 0. Every file we save carries
safetensors metadata (``layout``, ``config`` as JSON, ``name``) so a checkpoint can be loaded from its
path alone. Loading is strict: a missing, unexpected or misshapen tensor is an error that lists them,
never a partial load. Nothing here unpickles: ``.bin``/``.pt``/``.pth`` files are refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .models.encoder import EncoderConfig, VisionEncoder, resize_pos_embed
from .models.registry import SIZES, build_encoder, model_config

logger = logging.getLogger(__name__)

LAYOUTS = ("apple", "hf", "aimv2")


class Rename(NamedTuple):
    """One row of a key map."""

    ours: str  # our key; "{i}" stands for the block index
    theirs: str | tuple[str, ...]  # their key, or the (q, k, v) keys our fused qkv splits into on dim 0
    unbatch: bool = False  # theirs is [N, D] (an nn.Embedding) where ours is [1, N, D]


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

KEY_MAPS = {"apple": APPLE_KEYS, "hf": HF_KEYS}

# Prefixes of the two-tower (LiT) files, and what of them is not the encoder trunk.
APPLE_LIT_PREFIX, APPLE_LIT_HEAD = "image_encoder.", "image_encoder.head."
HF_CLIP_PREFIX, HF_HEAD = "vision_model.", "head."

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

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model asked for. The message says why."""


# ------------------------------------------------------------------------------------------ key maps
def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(\d+)") + "$")


def _fill(template: str, m: re.Match) -> str:
    return template.replace("{i}", m.group(1)) if m.groups() else template


def detect_layout(state_dict: dict[str, torch.Tensor]) -> str:
    """``"apple"``, ``"hf"`` or ``"aimv2"`` from the key names (LiT / Aimv2Model prefixes included)."""
    keys = list(state_dict)
    starts = lambda *prefixes: any(k.startswith(prefixes) for k in keys)
    if starts("preprocessor.", "trunk.", APPLE_LIT_PREFIX + "preprocessor.", APPLE_LIT_PREFIX + "trunk."):
        return "apple"
    if starts("embeddings.", "encoder.layers.", HF_CLIP_PREFIX + "embeddings.", HF_CLIP_PREFIX + "encoder."):
        return "hf"
    if starts("patch_embed.", "blocks."):
        return "aimv2"
    shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
    raise CheckpointError(f"not an AIMv2 encoder in a known layout ({'|'.join(LAYOUTS)}); its keys: {shown}")


def to_aimv2(
    state_dict: dict[str, torch.Tensor], layout: str, keys: tuple[Rename, ...] | None = None
) -> dict[str, torch.Tensor]:
    """Rename ``layout``'s keys to ours (fusing q, k, v). Keys no rule knows are kept as they are, so a
    strict load reports them as unexpected; an incomplete q/k/v triple is kept under its own names.
    ``keys`` is another key map for the same layout (the LiT models' maps)."""
    if layout == "aimv2":
        return dict(state_dict)
    rules = [(_pattern(t), r, j) for r in keys or _key_map(layout) for j, t in enumerate(_as_tuple(r.theirs))]
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


def from_aimv2(
    state_dict: dict[str, torch.Tensor], layout: str, keys: tuple[Rename, ...] | None = None
) -> dict[str, torch.Tensor]:
    """Rename our keys to ``layout``'s (splitting qkv on dim 0). Every key must have a rule."""
    if layout == "aimv2":
        return dict(state_dict)
    rules = [(_pattern(r.ours), r) for r in keys or _key_map(layout)]
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


def convert_state_dict(state_dict: dict[str, torch.Tensor], src: str, dst: str) -> dict[str, torch.Tensor]:
    """Encoder state dict from layout ``src`` to layout ``dst`` (through ours)."""
    return from_aimv2(to_aimv2(state_dict, src), dst)


def _key_map(layout: str) -> tuple[Rename, ...]:
    if layout not in KEY_MAPS:
        raise CheckpointError(f"unknown layout {layout!r}: choose {', '.join(LAYOUTS)}")
    return KEY_MAPS[layout]


def _as_tuple(theirs: str | tuple[str, ...]) -> tuple[str, ...]:
    return theirs if isinstance(theirs, tuple) else (theirs,)


def _encoder_part(state_dict: dict[str, torch.Tensor], layout: str, source: str) -> dict[str, torch.Tensor]:
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
    kept = {k[len(prefix) :]: v for k, v in kept.items()}
    return kept


# ------------------------------------------------------------------------------------------ reading
@dataclass
class Checkpoint:
    """An encoder checkpoint read into our layout, with what it says about itself."""

    state_dict: dict[str, torch.Tensor]  # our key names, encoder only
    layout: str  # the layout it was stored in
    source: str  # where it came from, for messages
    config: EncoderConfig | None = None  # from our metadata or a config.json; None when only shapes tell
    name: str | None = None  # model name from our metadata (or a config.json of a named size)


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a ``.safetensors`` file, a transformers ``save_pretrained`` folder (single or sharded) or a
    training run folder (``encoder.safetensors``); detect its layout and convert it to ours."""
    path = Path(path)
    files, hf_config = checkpoint_files(path)
    raw, metadata = read_safetensors(files)
    layout = detect_layout(raw)
    sd = to_aimv2(_encoder_part(raw, layout, str(path)), layout)
    learned = "pos_embed" in sd
    config, name = None, None
    if "config" in metadata:
        try:
            config = EncoderConfig(**json.loads(metadata["config"]))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: its metadata config does not describe an encoder ({e})") from e
        name = metadata.get("name") or _name_of(config)
    elif hf_config is not None:
        config = _config_from_hf(hf_config, learned)
        name = _name_of(config)
    return Checkpoint(sd, layout, str(path), config, name)


def checkpoint_files(
    path: Path, run_file: str = "encoder.safetensors", what: str = "run folder"
) -> tuple[list[Path], dict | None]:
    """The safetensors files that hold the checkpoint at ``path``, and its config.json if any.

    ``path`` is a file, a folder of ours holding ``run_file``, or a transformers folder (``model.safetensors`` or a
    sharded index). Pickles are refused by name, never opened."""
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_file():
        _refuse_pickle(path)
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: expected a .safetensors file, a transformers folder or a {what}")
        return [path], None
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else None
    for name in (run_file, "model.safetensors"):
        if (path / name).is_file():
            return [path / name], config
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards], config
    pickled = [p for p in sorted(path.iterdir()) if p.suffix in PICKLE_SUFFIXES]
    if pickled:
        _refuse_pickle(pickled[0])
    raise CheckpointError(
        f"{path}: no {run_file} ({what}), model.safetensors or model.safetensors.index.json (transformers folder) in it"
    )


def read_safetensors(files: list[Path]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of ``files`` (the shards of one checkpoint) and the first file's metadata."""
    raw: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as sf:
                metadata = metadata or dict(sf.metadata() or {})
            raw.update(load_file(f))
        except Exception as e:  # safetensors raises its own error type for a corrupt header
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from e
    return raw, metadata


def _refuse_pickle(path: Path) -> None:
    if path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: {path.suffix} files are pickles and we never unpickle them (loading one can run code). "
            'If you trust it, convert it yourself: python -c "import torch; from safetensors.torch import '
            f"save_file; save_file(torch.load('{path.name}', weights_only=True), '{path.stem}.safetensors')\""
        )


def _config_from_hf(d: dict, learned: bool) -> EncoderConfig:
    """EncoderConfig from a transformers (or Apple hub) config.json; nested ``vision_config`` for Aimv2Model."""
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


def _size_of(dim: int, hidden: int) -> str | None:
    return next((s for s, (d, _, _, h) in SIZES.items() if (d, h) == (dim, hidden)), None)


def _name_of(cfg: EncoderConfig) -> str | None:
    """The registry name of a config when it is exactly a named size (square grid), else None."""
    size = _size_of(cfg.embed_dim, cfg.mlp_hidden_dim)
    if size is None or SIZES[size] != (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_hidden_dim):
        return None
    h, w = cfg.image_hw
    if cfg.pos_embed == "learned" and h != w:
        return None
    return f"aimv2-{size}-patch{cfg.patch_size}-{'native' if cfg.pos_embed == 'sincos' else h}"


# ------------------------------------------------------------------------------------------ shapes
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
        size = _size_of(self.embed_dim, self.mlp_hidden_dim)
        if size is None:
            what = f"an encoder of no named size (FFN {self.mlp_hidden_dim}, patch {self.patch_size})"
        else:
            what = f"aimv2-{size}-patch{self.patch_size}-{res}"
            what += f" with depth={self.depth}" if self.depth != SIZES[size][1] else ""
        return f"{what} ({self.embed_dim} wide, {self.depth} blocks, {where})"

    def config(self, source: str) -> EncoderConfig:
        """A config from shapes alone (a bare Apple file): needs a named size for the head count."""
        size = _size_of(self.embed_dim, self.mlp_hidden_dim)
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


def _with_overrides(cfg: EncoderConfig, overrides: dict) -> EncoderConfig:
    fields = {f.name for f in dataclasses.fields(EncoderConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown encoder option(s) {unknown}; valid: {sorted(fields)}")
    return dataclasses.replace(cfg, **overrides)


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
        cfg, name = _with_overrides(ckpt.config, overrides), ckpt.name
    elif app is not None:
        inferred = app.config(ckpt.source)
        cfg, name = _with_overrides(inferred, overrides), _name_of(inferred)
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
def check_state_dict(sd: dict[str, torch.Tensor], model: torch.nn.Module, what: str) -> None:
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


def build_from_checkpoint(ckpt: Checkpoint, name: str | None = None, **overrides) -> VisionEncoder:
    """The encoder with ``ckpt``'s weights, strictly. Built on the meta device and filled with
    ``load_state_dict(assign=True)``, so a 3B model does not pay for a random init first. Weights come out
    in the default dtype (float32), as a freshly built model would; call ``.to()`` for another."""
    cfg, name, grid = resolve_config(ckpt, name, overrides)
    sd = dict(ckpt.state_dict)
    if grid is not None and grid != cfg.grid_size:
        logger.info("%s: resizing the position embedding from %dx%d to %dx%d", ckpt.source, *grid, *cfg.grid_size)
        sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], grid, cfg.grid_size)  # [1, h1*w1, D]
    with torch.device("meta"):
        model = VisionEncoder(cfg, name=name)
    check_state_dict(sd, model, f"{ckpt.source} ({ckpt.layout} layout)")
    dtype = torch.get_default_dtype()
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}, assign=True)
    return model


def load_encoder_checkpoint(path: str | os.PathLike, name: str | None = None, **overrides) -> VisionEncoder:
    """``create_model(name, checkpoint=path, **overrides)``: a file or folder in any layout, strictly.

    ``name`` None takes the model from the checkpoint (metadata, config.json, or shapes of a named size).
    An ``img_size`` override other than the checkpoint's grid resizes its learned position embedding.
    """
    return build_from_checkpoint(read_checkpoint(path), name, **overrides)


def load_encoder(spec: str | os.PathLike, *, name: str | None = None, **overrides) -> VisionEncoder:
    """An encoder from what a user types: a checkpoint file, a transformers folder, a run folder, or a model
    name (random weights, with a warning). ``name`` states the model when the checkpoint cannot tell."""
    if Path(spec).exists() or str(spec).endswith(".safetensors") or str(spec).endswith(PICKLE_SUFFIXES):
        return load_encoder_checkpoint(spec, name, **overrides)
    try:
        model = build_encoder(str(spec), **overrides)
    except ValueError as e:
        raise CheckpointError(f"{spec!r} is neither a checkpoint file or folder nor a model name: {e}") from e
    logger.warning("%s: no checkpoint given, the weights are random (untrained)", spec)
    return model


# ------------------------------------------------------------------------------------------ saving
def _metadata(cfg: EncoderConfig, name: str | None, layout: str) -> dict[str, str]:
    # "format": "pt" is what transformers writes and what its older versions require to load a file at all.
    meta = {"format": "pt", "producer": "aimv2", "layout": layout, "config": json.dumps(cfg.to_dict())}
    if name:
        meta["name"] = name
    return meta


def write_state_dict(
    sd: dict[str, torch.Tensor], cfg: EncoderConfig, name: str | None, path: str | os.PathLike, layout: str
) -> Path:
    """Write our-layout ``sd`` to ``path`` in ``layout``, with our metadata. Atomic: a reader never sees half a
    file (a training run rewrites ``encoder.safetensors`` while others may read it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in from_aimv2(sd, layout).items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata=_metadata(cfg, name, layout))
    os.replace(tmp, path)
    return path


def save_encoder(model: VisionEncoder, path: str | os.PathLike, layout: str = "apple") -> Path:
    """Save the encoder's weights as one safetensors file in ``layout`` (``apple`` loads in timm and Apple's
    code as well as here; ``aimv2`` is our names; ``hf`` the key names of transformers)."""
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown layout {layout!r}: choose {', '.join(LAYOUTS)}")
    return write_state_dict(model.state_dict(), model.cfg, model.name, path, layout)


def hf_config(cfg: EncoderConfig, dtype: torch.dtype = torch.float32) -> dict:
    """An ``Aimv2VisionConfig``-compatible config.json, written by hand so transformers is not a dependency."""
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


def write_hf(sd: dict[str, torch.Tensor], cfg: EncoderConfig, name: str | None, out_dir: str | os.PathLike) -> Path:
    """A ``save_pretrained``-style folder (config.json + model.safetensors) from our-layout ``sd``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = sd["patch_embed.proj.weight"].dtype
    (out / "config.json").write_text(json.dumps(hf_config(cfg, dtype), indent=2) + "\n")
    write_state_dict(sd, cfg, name, out / "model.safetensors", "hf")
    return out


def export_hf(model: VisionEncoder, out_dir: str | os.PathLike) -> Path:
    """A folder that ``transformers.Aimv2VisionModel.from_pretrained`` loads with our outputs."""
    return write_hf(model.state_dict(), model.cfg, model.name, out_dir)


def convert_checkpoint(src: str | os.PathLike, to: str, out: str | os.PathLike, name: str | None = None) -> Path:
    """Rewrite a checkpoint in another layout without building the model: tensors keep their dtype and
    bits. The state dict is first checked strictly against the model it claims to be (on the meta device)."""
    if to not in LAYOUTS:
        raise CheckpointError(f"unknown layout {to!r}: choose {', '.join(LAYOUTS)}")
    ckpt = read_checkpoint(src)
    cfg, name, _ = resolve_config(ckpt, name, {})
    with torch.device("meta"):
        check_state_dict(ckpt.state_dict, VisionEncoder(cfg, name=name), f"{src} ({ckpt.layout} layout)")
    if to == "hf":
        return write_hf(ckpt.state_dict, cfg, name, out)
    return write_state_dict(ckpt.state_dict, cfg, name, out, to)
