"""The built-in image-caption dataset: rendered scenes of coloured shapes with captions generated from the scene.

It exists so that pretraining, probing and every test run with no download: a run on a laptop, in CI or on a fresh
GPU machine has data the moment the package is installed. Sample ``i`` of seed ``s`` is a pure function of
``(s, i)`` (its random generator is ``np.random.default_rng([s, i])``), so it is the same whatever the number of
DataLoader workers, ranks, or the order they run in, and a resumed run can continue the stream exactly
(:class:`SyntheticCaptionStream` with ``start=``).

The labelled probe splits (:mod:`.probes`) come from the same scene generator; :mod:`.shards` writes this stream as
webdataset shards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .captions import caption
from .scenes import SceneSpec, render, sample_scene


def synthetic_scene(index: int, seed: int = 0) -> tuple[SceneSpec, str]:
    """The scene and caption of sample ``index`` of the stream with ``seed`` (no pixels: cheap)."""
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be non-negative, got index={index}, seed={seed}")
    rng = np.random.default_rng([seed, index])
    spec = sample_scene(rng)
    return spec, caption(spec, rng)


def synthetic_sample(index: int, seed: int = 0, size: int | tuple[int, int] = 64) -> tuple[Image.Image, str]:
    """Sample ``index`` of the stream with ``seed``: (RGB image of ``size`` x ``size``, caption). ``size`` may be
    ``(height, width)``: the same scene and caption at another aspect ratio (native-resolution training)."""
    spec, text = synthetic_scene(index, seed)
    return render(spec, size), text


class SyntheticCaptions(Dataset):
    """Map-style: ``ds[i]`` is ``(image, caption)`` for sample ``offset + i``; ``len(ds) == length``.

    ``transform`` maps the PIL image (e.g. to a uint8 [3, H, W] tensor); by default the PIL image is returned.
    """

    def __init__(
        self, length: int, *, seed: int = 0, size: int = 64, transform: Callable | None = None, offset: int = 0
    ):
        if length < 0:
            raise ValueError(f"length must be non-negative, got {length}")
        self.length, self.seed, self.size, self.transform, self.offset = length, seed, size, transform, offset

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        if not -self.length <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} samples")
        image, text = synthetic_sample(self.offset + i % self.length, self.seed, self.size)
        return (self.transform(image) if self.transform else image), text


class SyntheticCaptionStream(IterableDataset):
    """Infinite stream of ``(image, caption)`` (``(image, caption, index)`` with ``with_index``), split across ranks
    and DataLoader workers without duplicates, and resumable.

    The stream is cut into blocks of ``batch_size`` consecutive sample indices starting at ``start``; block ``b``
    goes to worker ``(b // world_size) % num_workers`` of rank ``b % world_size``. A DataLoader takes its batches
    from its workers in turn, so with ``batch_size`` equal to the per-rank DataLoader batch size, step ``k`` of rank
    ``r`` holds exactly block ``k * world_size + r``, and after ``k`` steps the run has consumed exactly samples
    ``start .. start + k * batch_size * world_size - 1``. To resume after ``k`` steps, pass
    ``start = k * batch_size * world_size`` (plus the previous ``start``). With another ``batch_size`` the split
    is still disjoint and complete, only not in that order.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        size: int = 64,
        transform: Callable | None = None,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        batch_size: int = 1,
        with_index: bool = False,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if start < 0 or batch_size < 1:
            raise ValueError(f"need start >= 0 and batch_size >= 1, got start={start}, batch_size={batch_size}")
        self.seed, self.size, self.transform = seed, size, transform
        self.rank, self.world_size, self.start, self.batch_size = rank, world_size, start, batch_size
        self.with_index = with_index

    def indices(self, worker: int = 0, num_workers: int = 1) -> Iterator[int]:
        """The sample indices that worker ``worker`` of ``num_workers`` on this rank produces, in order."""
        consumer = worker * self.world_size + self.rank  # worker-major: see the class docstring
        stride = num_workers * self.world_size
        block = consumer
        while True:
            first = self.start + block * self.batch_size
            yield from range(first, first + self.batch_size)
            block += stride

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for i in self.indices(worker, num_workers):
            image, text = synthetic_sample(i, self.seed, self.size)
            image = self.transform(image) if self.transform else image
            yield (image, text, i) if self.with_index else (image, text)
