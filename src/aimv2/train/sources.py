"""Where training samples come from: a sample function over global indices, plus the run's tokenizer.

A source maps (dataset index, global sample index) -> (uint8 image [3, H, W], caption). Random
augmentation is seeded by the global sample index, so a sample looks the same however many workers or
ranks produce it and whenever the run is resumed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ..data.tokenizer import Tokenizer, default_synthetic_tokenizer
from ..data.transforms import eval_transform, train_transform
from .checkpointing import atomic_write
from .config import Config, ConfigError


@dataclass
class Source:
    sample_fn: Callable[[int, int], tuple[torch.Tensor, str]] | None  # indexable data
    length: int | None  # None: an endless stream of distinct samples
    tokenizer: Tokenizer
    shards: object | None = None  # a ShardSamples stream (source=shards)
    transform: Callable | None = None  # source=shards: PIL image -> uint8 [3, H, W]


class _SeededSample:
    """Picklable sample function: loads item ``i`` and applies the transform under a per-sample seed."""

    def __init__(self, get_item, transform, seed: int):
        self.get_item, self.transform, self.seed = get_item, transform, seed

    def __call__(self, index: int, global_index: int) -> tuple[torch.Tensor, str]:
        image, caption = self.get_item(index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(np.random.SeedSequence([self.seed, 3, global_index]).generate_state(1)[0]))
            return self.transform(image), caption


def _tokenizer(cfg: Config, out_dir: Path | None, save: bool) -> Tokenizer:
    """The configured tokenizer, or the built-in one; saved with the run (by rank 0) and reused on resume."""
    saved = out_dir / "tokenizer.json" if out_dir is not None else None
    if cfg.data.tokenizer:
        path = Path(cfg.data.tokenizer)
        if not path.is_file():
            raise ConfigError(f"data.tokenizer: {path} not found (a tokenizer.json file)")
        tok = Tokenizer.from_file(path, context_length=cfg.data.context_length)
    elif saved is not None and saved.exists():
        tok = Tokenizer.from_file(saved, context_length=cfg.data.context_length)
    else:
        tok = default_synthetic_tokenizer(context_length=cfg.data.context_length)
    if save and saved is not None and not saved.exists():
        atomic_write(saved, tok.save)
    return tok


def build_source(
    cfg: Config, out_dir: Path | None, save: bool = False, *, rank: int = 0, world_size: int = 1
) -> Source:
    """The run's data and tokenizer. Shards are split by (rank, DataLoader worker); the trainer sets
    ``source.shards.skip`` to resume each worker's stream."""
    from ..models.registry import model_config

    enc = model_config(cfg.model.encoder, **cfg.model.encoder_overrides)
    img_size = enc.image_hw
    tokenizer = _tokenizer(cfg, out_dir, save)
    transform = train_transform(img_size) if cfg.data.augment else eval_transform(img_size)
    if cfg.data.source == "synthetic":
        from ..data.synthetic import synthetic_sample

        get_item = partial(synthetic_sample, seed=cfg.seed, size=max(img_size))
        return Source(_SeededSample(get_item, transform, cfg.seed), cfg.data.synthetic_length, tokenizer)
    if cfg.data.source == "shards":
        from ..data.shards import ShardSamples

        try:
            samples = ShardSamples(
                cfg.data.shards,
                caption=cfg.data.caption,
                rank=rank,
                world_size=world_size,
                shuffle=cfg.data.shuffle_buffer,
                seed=cfg.seed,
                resampled=True,
                with_position=True,
                max_fault_rate=cfg.data.max_fault_rate,
            )
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"data.shards={cfg.data.shards!r}: {e}") from e
        return Source(None, None, tokenizer, shards=samples, transform=transform)
    raise ConfigError(f"data.source={cfg.data.source!r} is not known; valid: synthetic, shards")
