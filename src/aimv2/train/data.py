"""Deterministic, resumable batches for training on indexable datasets.

The batch of global step s is samples [s*G, (s+1)*G) of the (epoch-shuffled) dataset, G the global
batch; rank r takes its contiguous slice. Every random choice of a sample (augmentation, prefix length)
is keyed by the sample's global index. So:
  - any number of ranks and workers sees the same global batch (DDP matches single-process training),
  - ranks and workers never see the same sample, nor draw the same prefix sequence,
  - resuming at step k continues the stream exactly (the data position is the step).

Native resolution (``native=NativeSchedule``): step s has its own area A_s and global batch B_s, both drawn from
(seed, s) alone, and holds samples [start(s), start(s) + B_s); the rest is as above. One grid per step: the images
are one dense tensor. Per image (train/native.py): each image comes at its own grid with at most A_s patches, and
the batch is its patch tokens, padded to A_s (:func:`pack_patches`), with the grid of every image.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..data.faults import FaultCounter
from ..data.transforms import native_fit
from ..objectives.aimv2 import PrefixSampler, patchify
from .native import NativeSchedule, fit_grid


@dataclass
class Batch:
    images: torch.Tensor  # uint8 [B, 3, H, W], or per-image native: patch tokens uint8 [B, A, p*p*3] (pack_patches)
    text: torch.Tensor  # long [B, T], right-padded
    prefix_len: torch.Tensor  # long [B]
    indices: torch.Tensor  # long [B] global sample indices (indexable data) or stream positions (shards)
    step: int
    worker: int = 0  # the DataLoader worker that produced the batch
    position: dict | None = None  # shards: {source: raw samples that worker's stream had passed after this batch}
    source_counts: torch.Tensor | None = None  # shards: long [S] samples of the batch from each source
    # long [len(FAULT_KINDS)] samples this worker's readers skipped so far (this process), by kind; None: not counted
    skipped: torch.Tensor | None = None
    grid_hw: torch.Tensor | None = None  # per-image native: long [B, 2], each image's own grid (gh, gw)

    def pin_memory(self):
        self.images, self.text = self.images.pin_memory(), self.text.pin_memory()
        return self


class _StepStream(IterableDataset):
    """What both step streams share: this rank's slice of the global batch, the steps each DataLoader worker
    produces (worker w of W makes steps s with s % W == w; the DataLoader reads workers round-robin, so batches
    come out in step order), the text encoder and the prefix sampler."""

    def __init__(
        self,
        *,
        global_batch: int,
        rank: int,
        world_size: int,
        start_step: int,
        steps: int,
        encode_text: Callable[[list[str]], torch.Tensor],
        seed: int,
        patch_size: int,
        native: NativeSchedule | None = None,
    ):
        if native is not None and native.batch_multiple % world_size:
            raise ValueError(
                f"data.native.batch_multiple {native.batch_multiple} is not divisible by the number of ranks "
                f"{world_size} (x train.grad_accum): every step's batch must split evenly"
            )
        if native is None and global_batch % world_size:
            raise ValueError(f"train.batch_size {global_batch} is not divisible by the number of ranks {world_size}")
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.rank, self.world_size, self.start_step, self.steps = rank, world_size, start_step, steps
        self.native = native
        self.encode_text, self.seed, self.patch_size = encode_text, seed, patch_size
        self.prefix = PrefixSampler(seed)

    @staticmethod
    def _worker() -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info else (0, 1)

    def _worker_steps(self, worker: int, num_workers: int) -> range:
        return range(self.start_step + worker, self.steps, num_workers)

    def _native_step(self, step: int) -> tuple[int, int, tuple[int, int]]:
        """(global index of the step's first sample, this rank's batch size, (H, W) pixels) of a native step: the
        same grid and global batch on every rank and worker, drawn from (seed, step) only."""
        shape = self.native(step)
        p = self.patch_size
        return shape.start, shape.batch_size // self.world_size, (shape.grid[0] * p, shape.grid[1] * p)

    def _num_patches(self, images: torch.Tensor) -> int:
        H, W = images.shape[-2:]
        return (H // self.patch_size) * (W // self.patch_size)

    def _image_hw(self, area: int, aspect: float | None, global_index: int | None = None) -> tuple[int, int]:
        """Per-image native: (H, W) pixels of an image with aspect ratio ``aspect`` (height / width) at most ``area``
        patches; ``aspect=None`` (data with no shape of its own: the built-in scenes) draws one for sample
        ``global_index``."""
        if aspect is None:
            aspect = self.native.image_aspect(global_index)
        gh, gw = fit_grid(area, aspect)
        return gh * self.patch_size, gw * self.patch_size

    def _finish(self, images: list[torch.Tensor], area: int | None):
        """uint8 images -> (the batch's images, grid_hw or None, patches per image for the prefix draws)."""
        if area is None:  # one grid
            stacked = torch.stack(images)  # uint8 [B, 3, H, W]
            return stacked, None, self._num_patches(stacked)
        tokens, grid_hw = pack_patches(images, area, self.patch_size)  # [B, A, p*p*3], [B, 2]
        return tokens, grid_hw, grid_hw.prod(1)


class StepBatches(_StepStream):
    """This rank's Batch for steps start_step, ..., steps-1 of an indexable dataset (see the module docstring)."""

    def __init__(
        self,
        sample_fn: Callable[[int, int], tuple],
        *,
        length: int | None,
        native_fn: Callable[[int, int, tuple[int, int]], tuple] | None = None,
        faults: FaultCounter | None = None,
        **common,
    ):
        super().__init__(**common)
        self.faults = faults  # the dataset's counter of unreadable items (replaced by the next readable one)
        if self.native is not None and native_fn is None:
            raise ValueError("native-resolution batches need a native_fn (dataset index, global index, (H, W))")
        self.sample_fn, self.native_fn = sample_fn, native_fn
        self.length = length
        self._perms: dict[int, np.ndarray] = {}

    def _dataset_index(self, global_index: int) -> int:
        """Map a position in the endless stream to a dataset index (reshuffled every epoch if sized)."""
        if self.length is None:
            return global_index
        epoch, pos = divmod(global_index, self.length)
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, 1, epoch]).permutation(self.length)}
        return int(self._perms[epoch][pos])

    def batch(self, step: int) -> Batch:
        if self.native is not None:
            return self._native_batch(step)
        first = step * self.global_batch + self.rank * self.local_batch
        indices = torch.arange(first, first + self.local_batch)  # [B] global sample indices
        images, captions = zip(*(self.sample_fn(self._dataset_index(int(i)), int(i)) for i in indices), strict=True)
        images = torch.stack(images)  # [B, 3, H, W] uint8
        prefix_len = self.prefix.per_sample(indices, self._num_patches(images))  # [B]
        return Batch(images, self.encode_text(list(captions)), prefix_len, indices, step)

    def _native_batch(self, step: int) -> Batch:
        start, local, hw = self._native_step(step)
        first = start + self.rank * local
        indices = torch.arange(first, first + local)  # [B_s / ranks] global sample indices
        area = self.native(step).area if self.native.per_image else None
        samples = []
        for i in map(int, indices):
            size = hw if area is None else partial(self._image_hw, area, global_index=i)  # per image: aspect -> (H, W)
            samples.append(self.native_fn(self._dataset_index(i), i, size))
        images, captions = zip(*samples, strict=True)
        images, grid_hw, n = self._finish(list(images), area)
        prefix_len = self.prefix.per_sample(indices, n)  # [B] in [1, n_b - 1]
        return Batch(images, self.encode_text(list(captions)), prefix_len, indices, step, grid_hw=grid_hw)

    def __iter__(self):
        w, W = self._worker()
        for step in self._worker_steps(w, W):
            batch = self.batch(step)
            batch.worker = w
            if self.faults is not None:  # this worker's copy of the dataset counted what it skipped
                batch.skipped = torch.tensor(self.faults.by_kind())
            yield batch


class ShardStepBatches(_StepStream):
    """This rank's Batch for steps start_step..steps-1 from webdataset shards: one source, or a weighted
    mixture of several (the paper mixes five), each an endless resampled stream.

    Each worker reads its own stream of every source. Which source each sample comes from is drawn by
    (seed, rank, worker, step) with the sources' weights. A batch carries the worker's position in every
    source's stream; the trainer saves the last positions of each worker in its checkpoints, and the sources'
    ``skip`` continues every stream exactly after them (same number of workers). Prefix lengths are keyed by
    (seed, rank, worker, step); augmentation happens in the reader, keyed by stream position.

    Native resolution: the step's grid and batch come from (seed, step) as for indexable data; the readers hand
    over decoded PIL images (:class:`~aimv2.data.transforms.NativeDecode`), and each is brought to the step's
    (H, W) here, keeping its aspect ratio (:func:`~aimv2.data.transforms.native_fit`), once the grid is known.
    """

    def __init__(self, sources: list[tuple[str, object, float]], **common):
        super().__init__(**common)
        self.names = [name for name, _, _ in sources]
        self.streams = [samples for _, samples, _ in sources]
        weights = np.array([w for _, _, w in sources], dtype=np.float64)
        self.weights = weights / weights.sum()

    def __iter__(self):
        w, W = self._worker()
        streams = [s.samples(w, W) for s in self.streams]
        position = {name: s.skip.get(w, 0) for name, s in zip(self.names, self.streams, strict=True)}
        for step in self._worker_steps(w, W):
            local, fit, area = self.local_batch, None, None
            if self.native is not None:
                _, local, hw = self._native_step(step)
                fit = partial(native_fit, hw=hw)
                if self.native.per_image:  # each image at its own aspect ratio, at most A_s patches
                    area = self.native(step).area
                    fit = partial(_fit_own_aspect, hw_of=partial(self._image_hw, area))
            picks = np.random.default_rng([self.seed, 5, self.rank, w, step]).choice(
                len(streams), size=local, p=self.weights
            )  # [B] source of each sample
            images, captions, positions = [], [], []
            for k in picks:
                image, caption, _, (_, _, pos) = next(streams[k])
                position[self.names[k]] = pos
                # uint8 [3, H, W] augmented in the reader (seeded by its stream position), or native: PIL -> step's grid
                images.append(image if fit is None else fit(image))
                captions.append(caption)
                positions.append(pos)
            images, grid_hw, n = self._finish(images, area)  # uint8 [B, 3, H, W], or tokens [B, A, P] + grids
            prefix_len = self.prefix(len(picks), n, rank=self.rank, worker=w, step=step)
            yield Batch(
                images,
                self.encode_text(captions),
                prefix_len,  # [B]
                torch.tensor(positions),
                step,
                worker=w,
                position=dict(position),
                source_counts=torch.from_numpy(np.bincount(picks, minlength=len(streams))),
                skipped=torch.tensor([sum(n) for n in zip(*(s.faults.by_kind() for s in self.streams), strict=True)]),
                grid_hw=grid_hw,
            )


def _fit_own_aspect(img, hw_of):
    """A decoded image at the grid of its own aspect ratio (``hw_of(height / width)``), cropped by less than a patch."""
    return native_fit(img, hw_of(img.height / img.width))


def pack_patches(images: list[torch.Tensor], area: int, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of their own grids as one batch: uint8 [3, gh_b*p, gw_b*p] each -> (patch tokens uint8 [B, area,
    p*p*3], image b's gh_b * gw_b patches first in raster order (``patchify``'s value order) and zeros after;
    grid_hw long [B, 2])."""
    p = patch_size
    tokens = torch.zeros(len(images), area, p * p * 3, dtype=torch.uint8)
    grids = []
    for b, img in enumerate(images):
        gh, gw = img.shape[-2] // p, img.shape[-1] // p
        if gh * gw > area or img.shape[-2] % p or img.shape[-1] % p:
            raise ValueError(f"image {tuple(img.shape)} is not a grid of at most {area} patches of {p} px")
        tokens[b, : gh * gw] = patchify(img[None], p)[0]
        grids.append((gh, gw))
    return tokens, torch.tensor(grids, dtype=torch.long).reshape(-1, 2)


def make_loader(stream: _StepStream, num_workers: int, prefetch_factor: int, pin_memory: bool) -> DataLoader:
    kw = {}
    if num_workers > 0:
        kw = dict(prefetch_factor=prefetch_factor, persistent_workers=False)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are forked after the tokenizer loads
    # its own generator: starting an iterator draws the workers' base seed, which from the global RNG would shift
    # every later draw (dropout) of a resumed run by one against the run it resumes (the RNG is restored before)
    kw["generator"] = torch.Generator().manual_seed(int(getattr(stream, "seed", 0)))
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, **kw)
