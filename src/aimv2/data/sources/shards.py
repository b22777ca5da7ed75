"""Image-caption samples from webdataset tar shards as img2dataset writes them (DFN, DataComp, COYO, CC12M, ...).

A shard holds, per sample, ``KEY.jpg`` (or png/webp), ``KEY.txt`` with the caption and ``KEY.json`` with the
caption and metadata. :class:`ShardSamples` yields ``(RGB PIL image, caption, key)`` from a list of shards:

- Tar reading, URL handling (local paths, ``pipe:`` commands, brace patterns), grouping of members into samples and
  shard faults are :mod:`~aimv2.data.sources.tar`'s, the one shard reader; this module adds the split, the shuffle,
  the caption choice and the sample faults around it. :func:`shard_captions` reads only the captions (tokenizers).
- Shards are split by rank and DataLoader worker (arguments, not ``torch.distributed``, so the reader runs and is
  tested in one process), after a per-epoch shuffle of the shard list that every consumer computes alike, so one
  epoch reads each shard exactly once across all consumers. ``resampled=True`` instead draws shards with
  replacement, forever: the usual choice for web-scale data where "epoch" means little.
- Every random choice (shard order, shuffle buffer, caption field) comes from ``(seed, epoch, rank, worker)`` or
  from ``(seed, key)``, so a run reads the same stream again when restarted with the same arguments.
- Bad samples and bad shards are skipped and counted by kind in a :class:`~aimv2.data.faults.FaultCounter`
  (logged rate-limited); the reader fails with a clear error when the skip rate is too high or nothing at all came
  through, so a wrong path or caption field never becomes a silently empty epoch.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from ..faults import FaultCounter, FaultRateError
from ..transforms import to_rgb
from .tar import IMAGE_KEYS, expand_urls, member_names, shard_samples

log = logging.getLogger(__name__)

# --- captions --------------------------------------------------------------------------------------------------------


class CaptionFault(Exception):
    """A sample has no usable caption; ``kind`` is the fault kind to count it under."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def parse_caption_spec(spec: str | Mapping[str, float]) -> dict[str, float]:
    """``"txt"``, ``"json:caption"``, ``"txt=0.5,json:synthetic_caption=0.5"`` or a dict -> {field: probability}.

    A field is a member extension (``txt``) or ``json:NAME`` (key ``NAME`` of the sample's ``.json``). Weights are
    normalized to sum to 1.
    """
    if isinstance(spec, str):
        weights: dict[str, float] = {}
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            name, sep, w = part.rpartition("=") if "=" in part else (part, "", "1")
            weights[name.strip()] = float(w)
    else:
        weights = {str(k): float(v) for k, v in spec.items()}
    if not weights or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"caption spec {spec!r}: need fields with non-negative weights summing to > 0")
    for name in weights:
        if not name or (name.startswith("json:") and not name[5:]):
            raise ValueError(f"caption spec {spec!r}: empty field name")
    total = sum(weights.values())
    return {k: v / total for k, v in weights.items() if v > 0}


class CaptionPicker:
    """Chooses and reads the caption of a sample: one field, or one of several at random with given probabilities.

    The choice for a sample is seeded by ``(seed, key)``: the same sample gets the same field in every epoch and on
    every worker layout, so a resumed run and a re-run see the same captions. When the chosen field is missing from
    a sample, another listed field is drawn among those present (with renormalized probabilities): datasets often
    have a synthetic caption for only some samples.
    """

    def __init__(self, spec: str | Mapping[str, float] = "txt", seed: int = 0):
        self.weights = parse_caption_spec(spec)
        self.seed = seed

    def __repr__(self) -> str:
        return f"CaptionPicker({self.weights!r}, seed={self.seed})"

    def _read(self, sample: dict, name: str) -> str | None:
        """The text of field ``name`` in ``sample``, or None if the sample lacks it."""
        if name.startswith("json:"):
            raw = sample.get("json")
            if raw is None:
                return None
            try:
                meta = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise CaptionFault("bad_caption", f"invalid .json: {e}") from None
            value = meta.get(name[5:]) if isinstance(meta, dict) else None
            if value is None:
                return None
            if not isinstance(value, str):
                raise CaptionFault("bad_caption", f"{name} is a {type(value).__name__}, not a string")
            return value
        raw = sample.get(name)
        if raw is None:
            return None
        try:
            return raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError as e:
            raise CaptionFault("bad_caption", f".{name} is not UTF-8: {e}") from None

    def __call__(self, sample: dict) -> str:
        names = list(self.weights)
        if len(names) > 1:
            rng = random.Random(f"caption/{self.seed}/{sample.get('__key__')}")
            names = []
            pool = dict(self.weights)
            while pool:  # the order in which fields are tried: a weighted draw without replacement
                pick = rng.choices(list(pool), weights=list(pool.values()))[0]
                names.append(pick)
                del pool[pick]
        for name in names:
            text = self._read(sample, name)
            if text is not None:
                text = text.strip()
                if not text:
                    raise CaptionFault("empty_caption", f"{name} is empty")
                return text
        raise CaptionFault("no_caption", f"none of {', '.join(self.weights)} present (has {member_names(sample)})")


def shard_captions(
    urls: str | os.PathLike | Sequence[str | os.PathLike], caption: str | Mapping[str, float], faults: FaultCounter
) -> Iterator[str]:
    """The caption of every sample of the shards ``urls`` in order, chosen by ``caption`` (see :class:`CaptionPicker`),
    decoding no image: what a tokenizer is trained on. Samples without a usable caption are counted in ``faults``."""
    picker = CaptionPicker(caption)
    for sample in shard_samples(expand_urls(urls), faults):
        try:
            text = picker(sample)
        except CaptionFault as e:
            faults.fault(e.kind, f"{sample.get('__url__')}:{sample.get('__key__')}", str(e))
            continue
        faults.ok()
        yield text


# --- reading ---------------------------------------------------------------------------------------------------------


def _shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """A shuffle buffer of ``size`` items: each output is a random pick among the next ``size`` inputs."""
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


class ShardSamples(IterableDataset):
    """``(image, caption, key)`` from webdataset shards, for one rank, split across its DataLoader workers.

    ``image`` is an RGB PIL image (``transform(image)`` if a transform is given; a transform with
    ``accepts_undecoded = True``, like :class:`~aimv2.data.transforms.TrainTransform`, gets the image opened but
    not yet decoded, so it can decode JPEGs at reduced scale; its errors count as ``bad_image``), ``caption`` a
    stripped string chosen by ``caption`` (see :class:`CaptionPicker`), ``key`` is ``"SHARD_URL:KEY"``, unique in
    the dataset.

    Without ``resampled``, one pass (one ``iter``) reads the shards this (rank, worker) owns: shard ``j`` of the
    epoch's order goes to consumer ``j % (world_size * num_workers)``, consumer ``rank * num_workers + worker``. The
    epoch's shard order is shuffled by ``(seed, epoch)`` when ``shuffle > 0``; call :meth:`set_epoch` before each
    pass. With ``resampled=True`` each consumer draws shards with replacement by ``(seed, epoch, rank, worker)``
    and never ends. ``shuffle`` is the size of a per-consumer shuffle buffer of raw (undecoded) samples.

    Resuming: with ``with_position=True`` each sample carries a 4th element ``(rank, worker, position)``, the number
    of raw samples (good or skipped) this consumer has passed when it yields that one. A trainer keeps the last
    position it received from each worker; passing ``skip={worker: position}`` (same urls, seed, epoch, rank and
    number of workers) continues each consumer's stream exactly after it, shuffle buffer included. Skipped samples
    are read but not decoded; for resampled streams, starting a new ``epoch`` (a fresh draw) is cheaper.

    ``seeded_transform=True`` draws the transform's random choices (crop, flip) from a generator keyed by
    ``(seed, rank, worker, position)``, so a sample is augmented the same way however often the stream is resumed.

    Faults are counted in ``self.faults`` (a fresh :class:`FaultCounter` per pass; in a worker process it lives in
    that worker). :class:`FaultRateError` is raised when more than ``max_fault_rate`` of the first ``min_samples``
    or more samples were skipped, or when a finite pass over at least one shard produced no sample at all.
    """

    def __init__(
        self,
        urls: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        caption: str | Mapping[str, float] = "txt",
        rank: int = 0,
        world_size: int = 1,
        shuffle: int = 0,
        seed: int = 0,
        epoch: int = 0,
        resampled: bool = False,
        transform: Callable | None = None,
        max_fault_rate: float = 0.5,
        min_samples: int = 100,
        skip: Mapping[int, int] | None = None,
        with_position: bool = False,
        seeded_transform: bool = False,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if shuffle < 0:
            raise ValueError(f"shuffle must be >= 0, got {shuffle}")
        self.urls = expand_urls(urls)
        self.picker = CaptionPicker(caption, seed)
        self.rank, self.world_size, self.shuffle, self.seed, self.epoch = rank, world_size, shuffle, seed, epoch
        self.resampled, self.transform = resampled, transform
        self.max_fault_rate, self.min_samples = max_fault_rate, min_samples
        self.skip, self.with_position = dict(skip or {}), with_position
        self.seeded_transform = seeded_transform
        self.faults = self._counter()

    def _counter(self) -> FaultCounter:
        return FaultCounter(max_rate=self.max_fault_rate, min_samples=self.min_samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shards(self, worker: int = 0, num_workers: int = 1) -> Iterator[str]:
        """The shard URLs consumer (this rank, ``worker``) reads in this epoch, in order (endless if resampled)."""
        consumer, consumers = self.rank * num_workers + worker, self.world_size * num_workers
        if self.resampled:
            rng = random.Random(f"shards/{self.seed}/{self.epoch}/{self.rank}/{worker}")
            while True:
                yield rng.choice(self.urls)
        order = list(self.urls)
        if self.shuffle > 0:
            random.Random(f"shards/{self.seed}/{self.epoch}").shuffle(order)
        if len(order) < consumers and consumer == 0:
            log.warning(
                "%d shard(s) for %d readers (%d ranks x %d workers): %d reader(s) get no data; use more shards",
                len(order), consumers, self.world_size, num_workers, consumers - len(order),
            )  # fmt: skip
        yield from order[consumer::consumers]

    def samples(self, worker: int = 0, num_workers: int = 1) -> Iterator[tuple]:
        """What ``iter(self)`` yields in DataLoader worker ``worker`` of ``num_workers`` (callable directly)."""
        faults = self.faults = self._counter()
        self.check_some_shard_exists()
        first_shard: list[str] = []  # named in the error when nothing at all came through

        def shards() -> Iterator[str]:
            for url in self.shards(worker, num_workers):
                first_shard[:] = first_shard or [url]
                yield url

        raw = shard_samples(shards(), faults)
        if self.shuffle > 0:
            raw = _shuffled(raw, self.shuffle, random.Random(f"buffer/{self.seed}/{self.epoch}/{self.rank}/{worker}"))
        skip, position = self.skip.get(worker, 0), 0
        for sample in raw:
            position += 1
            if position <= skip:  # resuming: passed over undecoded, exactly as far as the saved position
                continue
            if self.seeded_transform:  # augmentation keyed by where the sample sits in the stream: resumable
                with torch.random.fork_rng(devices=[]):
                    key = np.random.SeedSequence([self.seed, 4, self.rank, worker, position]).generate_state(1)[0]
                    torch.default_generator.manual_seed(int(key))
                    out = self._decode(sample, faults)
            else:
                out = self._decode(sample, faults)
            if out is not None:
                faults.ok()
                yield (*out, (self.rank, worker, position)) if self.with_position else out
        if first_shard and faults.samples == 0 and (position > skip or skip == 0):
            kind, n = faults.most_common()[0] if faults.counts else ("no samples", 0)
            raise FaultRateError(
                f"no usable sample in {first_shard[0]!r}{' and the other shards' if n and len(self.urls) > 1 else ''}"
                f": every sample was skipped, most as {kind} ({faults.describe()}). Check the path, that the shards "
                f"are webdataset tars, and the caption field ({', '.join(self.picker.weights)})"
            )

    def check_some_shard_exists(self) -> None:
        """FaultRateError at once if every shard is a local path that does not exist: a wrong path, said once,
        rather than one ``unreadable_shard`` per draw until the fault rate trips (a resampled stream draws the same
        missing file again and again). Stops at the first shard found, so a long list costs one ``stat``."""
        if any(url.startswith("pipe:") or "://" in url or os.path.exists(url) for url in self.urls):
            return
        more = f" and the other {len(self.urls) - 1}" if len(self.urls) > 1 else ""
        raise FaultRateError(
            f"shard not found ({self.urls[0]}{more}; every shard would be an unreadable_shard); check the path "
            "(data.shards, or the SOURCES given)"
        )

    def _decode(self, sample: dict, faults: FaultCounter) -> tuple | None:
        where = f"{sample.get('__url__')}:{sample.get('__key__')}"
        image_key = next((k for k in IMAGE_KEYS if k in sample), None)
        if image_key is None:
            faults.fault("no_image", where, f"members: {member_names(sample)}")
            return None
        try:
            caption = self.picker(sample)
        except CaptionFault as e:
            faults.fault(e.kind, where, str(e))
            return None
        undecoded = getattr(self.transform, "accepts_undecoded", False)
        try:
            with Image.open(io.BytesIO(sample[image_key])) as img:  # lazy: reads the header only
                if undecoded:  # the transform decodes (maybe at reduced scale): its decode errors fail in here
                    return self.transform(img), caption, where
                img.load()  # decode now: truncated files fail here, inside the try
                image = to_rgb(img)
        except Exception as e:
            faults.fault("bad_image", where, f".{image_key}: {type(e).__name__}: {e}")
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, caption, where

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.samples(worker, num_workers)
