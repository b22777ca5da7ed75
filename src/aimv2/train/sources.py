"""Where training samples come from: a sample function over global indices, plus the run's tokenizer.

A source maps (dataset index, global sample index) -> (uint8 image [3, H, W], caption). Random
augmentation is seeded by the global sample index, so a sample looks the same however many workers or
ranks produce it and whenever the run is resumed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ..config import Config, ConfigError
from ..data.faults import FaultCounter
from ..data.tokenizer import Tokenizer, UnknownSpecialToken, default_synthetic_tokenizer
from ..data.transforms import NativeDecode, TrainTransform, eval_transform, native_max_side, train_transform
from .checkpointing import atomic_write


@dataclass
class Source:
    sample_fn: Callable[[int, int], tuple[torch.Tensor, str]] | None  # indexable data
    length: int | None  # None: an endless stream of distinct samples
    tokenizer: Tokenizer
    shards: list[tuple[str, object, float]] | None = None  # source=shards: (name, ShardSamples, weight) each
    # data.native: (dataset index, global index, size) -> (uint8 image [3, H, W], caption); size is the step's (H, W)
    # (one grid per step) or, per image, a function of the image's aspect ratio (None: it has none) to its (H, W)
    native_fn: Callable[[int, int, tuple[int, int]], tuple[torch.Tensor, str]] | None = None
    faults: FaultCounter | None = None  # indexable data read from files: the dataset's counter of skipped items


class _SeededSample:
    """Picklable sample function: loads item ``i`` and applies the transform under a per-sample seed."""

    def __init__(self, get_item, transform, seed: int):
        self.get_item, self.transform, self.seed = get_item, transform, seed

    def __call__(self, index: int, global_index: int) -> tuple[torch.Tensor, str]:
        image, caption = self.get_item(index)
        with torch.random.fork_rng(devices=[]):
            key = np.random.SeedSequence([self.seed, 3, global_index]).generate_state(1)[0]
            torch.default_generator.manual_seed(int(key))  # CPU only: torch.manual_seed also seeds CUDA (slow)
            return self.transform(image), caption


class _FirstReadable:
    """Item i of a captioned folder or datasets table, or the next readable one: an unreadable item (counted
    by the dataset) is replaced deterministically, so a batch keeps its size and a resumed run sees the same
    samples."""

    def __init__(self, ds):
        self.ds = ds

    def __call__(self, index: int):
        n = len(self.ds)
        for k in range(n):
            item = self.ds.get_item((index + k) % n)
            if item is not None:
                return item
        raise RuntimeError(f"no readable image-caption pair left in {self.ds}")


class _NativeSynthetic:
    """Picklable native sample function of the built-in scenes: the scene rendered straight at the step's
    (H, W), or at the grid of the aspect ratio drawn for it (a scene has no shape of its own), nothing cropped."""

    def __init__(self, seed: int):
        self.seed = seed

    def __call__(self, index: int, global_index: int, hw) -> tuple[torch.Tensor, str]:
        from ..data.synthetic.dataset import synthetic_sample

        hw = hw(None) if callable(hw) else hw
        image, caption = synthetic_sample(index, self.seed, size=tuple(hw))
        return torch.from_numpy(np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))), caption


class _NativeFit:
    """Picklable native sample function of a dataset of PIL images: aspect ratio kept, cropped to the step's
    (H, W) (:func:`aimv2.data.transforms.native_fit`)."""

    def __init__(self, get_item):
        self.get_item = get_item

    def __call__(self, index: int, global_index: int, hw) -> tuple[torch.Tensor, str]:
        from ..data.transforms import native_fit, to_rgb

        image, caption = self.get_item(index)
        if callable(hw):  # per image: the grid of its own aspect ratio
            image = to_rgb(image)
            hw = hw(image.height / image.width)
        return native_fit(image, hw), caption


def _readable_source(ds, transform, tokenizer: Tokenizer, seed: int) -> Source:
    """A Source over a dataset of files whose unreadable items are replaced by the next readable one and counted."""
    get_item = _FirstReadable(ds)
    sample_fn = _SeededSample(get_item, transform, seed)
    return Source(sample_fn, len(ds), tokenizer, native_fn=_NativeFit(get_item), faults=ds.faults)


def _check_native(cfg: Config, enc) -> None:
    if cfg.data.native.enabled and enc.pos_embed != "sincos":
        raise ConfigError(
            f"data.native needs an encoder with 2D sin-cos position embeddings (a -native name such as "
            f"aimv2-tiny-patch8-native); {cfg.model.encoder} has a learned {enc.grid_size} grid"
        )


def _tokenizer(cfg: Config, out_dir: Path | None, save: bool) -> Tokenizer:
    """The configured tokenizer, or the built-in one; saved with the run (by rank 0) and reused on resume."""
    saved = out_dir / "tokenizer.json" if out_dir is not None else None
    if cfg.data.tokenizer:
        path = Path(cfg.data.tokenizer)
        if not path.is_file():
            raise ConfigError(f"data.tokenizer: {path} not found (a tokenizer.json or SentencePiece .model file)")
        if path.suffix == ".model":  # SentencePiece (e.g. SigLIP's, the paper's tokenizer)
            tok = Tokenizer.from_sentencepiece(path, context_length=cfg.data.context_length)
        else:
            try:
                tok = Tokenizer.from_file(path, context_length=cfg.data.context_length, pad_token=cfg.data.pad_token)
            except ValueError as e:
                pad = isinstance(e, UnknownSpecialToken) and e.what == "pad"
                fix = " (set data.pad_token to the token to pad with)" if pad else ""
                raise ConfigError(f"data.tokenizer={path}: {e}{fix}") from e
        if saved is not None and saved.exists():  # resuming: the file must still be the one the run trained with
            check_same_tokenizer(tok, path, saved)
    elif saved is not None and saved.exists():
        tok = Tokenizer.from_file(saved, context_length=cfg.data.context_length)
    else:
        tok = default_synthetic_tokenizer(context_length=cfg.data.context_length)
    if save and saved is not None and not saved.exists():
        atomic_write(saved, tok.save)
    return tok


def check_same_tokenizer(tok: Tokenizer, configured: Path, saved: Path) -> None:
    """A resumed run keeps the token ids it trained with: refuse a ``data.tokenizer`` file that changed since (e.g.
    retrained in place by ``aimv2 tokenizer train``), compared by content hash with the copy in the run."""
    now = hashlib.sha256(tok.to_str().encode()).hexdigest()
    then = hashlib.sha256(saved.read_bytes()).hexdigest()
    if now != then:
        raise ConfigError(
            f"data.tokenizer={configured} is not the tokenizer this run trained with (sha256 {now[:12]} vs "
            f"{then[:12]} of the copy in {saved}); resuming would change the token ids mid-run: restore the original "
            f"file (the run's copy is {saved}), or start a new run in another out_dir"
        )


_MIXTURE_KEYS = {"name", "shards", "weight", "caption"}


def _shard_source(cfg: Config, entry: dict, i: int, rank: int, world_size: int, transform) -> tuple[str, object, float]:
    """One (name, ShardSamples, weight) of data.shards or of a data.mixture entry."""
    from ..data.sources.shards import ShardSamples

    where = f"data.mixture[{i}]" if cfg.data.mixture else "data.shards"
    unknown = sorted(set(entry) - _MIXTURE_KEYS)
    if unknown or "shards" not in entry:
        raise ConfigError(f"{where}: needs 'shards' and takes only {sorted(_MIXTURE_KEYS)}; got {sorted(entry)}")
    weight = float(entry.get("weight", 1.0))
    if weight <= 0:
        raise ConfigError(f"{where}.weight must be > 0, got {weight}")
    try:
        samples = ShardSamples(
            entry["shards"],
            caption=entry.get("caption", cfg.data.caption),
            rank=rank,
            world_size=world_size,
            shuffle=cfg.data.shuffle_buffer,
            seed=cfg.seed + i,
            resampled=True,
            with_position=True,
            max_fault_rate=cfg.data.max_fault_rate,
            transform=transform,
            seeded_transform=True,
        )
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"{where}={entry['shards']!r}: {e}") from e
    return str(entry.get("name", f"source{i}")), samples, weight


def build_source(
    cfg: Config,
    out_dir: Path | None,
    save: bool = False,
    *,
    rank: int = 0,
    world_size: int = 1,
    img_size: tuple[int, int] | None = None,
) -> Source:
    """The run's data and tokenizer. Shards are split by (rank, DataLoader worker); the trainer sets
    ``source.shards.skip`` to resume each worker's stream. ``img_size`` defaults to the configured encoder's
    (``cfg.model``); runs without one (LiT, whose encoder comes from a checkpoint) pass it."""
    from ..models.registry import model_config

    if img_size is None:  # LiT passes the size of its checkpoint's encoder; native mode needs a configured one
        enc = model_config(cfg.model.encoder, **cfg.model.encoder_overrides)
        _check_native(cfg, enc)
        img_size = enc.image_hw
    elif cfg.data.native.enabled:
        raise ConfigError("data.native is for pretraining runs; this run's images have one fixed size")
    tokenizer = _tokenizer(cfg, out_dir, save)
    transform = train_transform(img_size) if cfg.data.augment else eval_transform(img_size)
    if cfg.data.source == "synthetic":
        from ..data.synthetic.dataset import synthetic_sample

        get_item = partial(synthetic_sample, seed=cfg.seed, size=max(img_size))
        return Source(
            _SeededSample(get_item, transform, cfg.seed),
            cfg.data.synthetic_length,
            tokenizer,
            native_fn=_NativeSynthetic(cfg.seed),
        )
    if cfg.data.source == "shards":
        entries = cfg.data.mixture or [{"name": "shards", "shards": cfg.data.shards}]
        # decoding inside the reader lets JPEGs decode at reduced scale when the crop allows (TrainTransform)
        shard_transform = TrainTransform(img_size) if cfg.data.augment else transform
        if cfg.data.native.enabled:  # the step's grid is drawn later: decode only, fit in the batch (data.py)
            nat = cfg.data.native
            shard_transform = NativeDecode(native_max_side(nat.max_patches, nat.max_aspect, enc.patch_size))
        sources = [_shard_source(cfg, e, i, rank, world_size, shard_transform) for i, e in enumerate(entries)]
        names = [name for name, _, _ in sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"data.mixture: source names must be distinct, got {names}")
        return Source(None, None, tokenizer, shards=sources)
    if cfg.data.source == "folder":
        from ..data.sources.captioned import CaptionedImages

        try:
            ds = CaptionedImages(cfg.data.folder, max_fault_rate=cfg.data.max_fault_rate)
        except (ValueError, FileNotFoundError) as e:
            where = "data.folder" if str(cfg.data.folder) in str(e) else f"data.folder={cfg.data.folder!r}"
            raise ConfigError(f"{where}: {e}") from e  # the message names the path once
        return _readable_source(ds, transform, tokenizer, cfg.seed)
    if cfg.data.source == "hf":
        from ..data.sources.hf import HFImageText

        try:
            ds = HFImageText(
                cfg.data.hf_files,
                image_column=cfg.data.image_column,
                text_column=cfg.data.text_column,
                max_fault_rate=cfg.data.max_fault_rate,
            )
        except (ValueError, FileNotFoundError, ImportError) as e:
            raise ConfigError(f"data.hf_files={cfg.data.hf_files!r}: {e}") from e
        return _readable_source(ds, transform, tokenizer, cfg.seed)
    raise ConfigError(f"data.source={cfg.data.source!r} is not known; valid: synthetic, shards, folder, hf")
