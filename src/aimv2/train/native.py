"""Native-resolution training (the paper's post-training stage): one patch area and grid per step, and a batch size
that keeps the number of image tokens per step constant.

Step s draws n from a normal(0, 1) truncated to [-1, 1] and maps it linearly onto [log2 min, log2 max]:

    A_s = 2^(lo + (n + 1) / 2 * (hi - lo))  patches      (the paper: lo, hi = 7, 12, so A in [128, 4096], median 2^9.5)

and an aspect ratio r_s = height / width, log-uniform in [1 / R, R]. The step's grid (gh, gw) has gh / gw close to
r_s and gh * gw <= A_s; every image of the step is brought to that grid (``gh * p`` x ``gw * p`` pixels, the
aspect ratio decided per step, so a micro-batch is one dense tensor with no padding tokens). The global batch is

    B_s = floor(tokens_per_batch / (gh * gw)), rounded down to a multiple of batch_multiple

so B_s * gh * gw <= tokens_per_batch and within (batch_multiple * gh * gw) of it.

Every draw is keyed by (seed, step) only (never rank or worker), so all ranks agree on the shape and the batch size
of every step: DDP and FSDP2 stay in lockstep, and with batch_multiple divisible by ranks x grad_accum the global
batch does not depend on how many ranks share it. Step s holds the global samples [start(s), start(s) + B_s),
start(s) = B_0 + ... + B_{s-1}; a resumed run recomputes start(s) from the seed, so the data position and the
area sequence continue exactly. Draws come in blocks of steps (one vectorized draw per block), so start(s) costs
microseconds per thousand steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .distributed import DistInfo
from .guard import TrainingError

_BLOCK = 1024  # steps per vectorized draw
_TAG = 11  # keeps these generators apart from the other (seed, ...) keyed ones


@dataclass(frozen=True)
class StepShape:
    step: int
    area: int  # the drawn budget A_s in patches
    grid: tuple[int, int]  # (gh, gw) patches, gh * gw <= area
    batch_size: int  # global B_s
    start: int  # global index of the step's first sample

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


def truncnorm_to_log2(u: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Uniforms in [0, 1) -> n ~ normal(0, 1) truncated to [-1, 1] (inverse CDF) -> lo + (n + 1) / 2 * (hi - lo)."""
    c = 0.5 * (1 + math.erf(-1 / math.sqrt(2)))  # Phi(-1)
    p = c + u * (1 - 2 * c)  # uniform in [Phi(-1), Phi(1))
    n = torch.special.ndtri(torch.from_numpy(p).double()).numpy().clip(-1.0, 1.0)
    return lo + (n + 1) / 2 * (hi - lo)


def fit_grid(area: int, aspect: float) -> tuple[int, int]:
    """(gh, gw) with gh / gw close to ``aspect`` (height / width), gh * gw <= area, both >= 1."""
    gh, gw = max(1, round(math.sqrt(area * aspect))), max(1, round(math.sqrt(area / aspect)))
    while gh * gw > area:
        if gh / gw > aspect:
            gh -= 1
        else:
            gw -= 1
    if gh * gw < 2 <= area:  # prefix attention needs two patches
        gh, gw = (2, 1) if aspect >= 1 else (1, 2)
    return gh, gw


class NativeSchedule:
    """Shape and batch of every step of a native-resolution run (see the module docstring)."""

    def __init__(
        self,
        *,
        seed: int,
        min_patches: int,
        max_patches: int,
        tokens_per_batch: int,
        max_aspect: float = 2.0,
        batch_multiple: int = 1,
    ):
        if not 2 <= min_patches <= max_patches:
            raise ValueError(f"need 2 <= min_patches <= max_patches, got {min_patches}, {max_patches}")
        if max_aspect < 1:
            raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")
        if batch_multiple < 1 or tokens_per_batch < max_patches * batch_multiple:
            raise ValueError(
                f"tokens_per_batch {tokens_per_batch} must be at least max_patches x batch_multiple = "
                f"{max_patches} x {batch_multiple} (one full batch quantum at the largest area)"
            )
        self.seed, self.min_patches, self.max_patches = seed, min_patches, max_patches
        self.tokens_per_batch, self.max_aspect, self.batch_multiple = tokens_per_batch, max_aspect, batch_multiple
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
        self._block_starts = [0]  # global index of the first sample of block b

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(areas, grids [n, 2], batch sizes, cumulative starts within the block) of steps [b*_BLOCK, (b+1)*_BLOCK)."""
        if b not in self._blocks:
            rng = np.random.default_rng([self.seed, _TAG, b])
            u = rng.random(_BLOCK)
            log_r = rng.uniform(-math.log(self.max_aspect), math.log(self.max_aspect), _BLOCK)
            x = truncnorm_to_log2(u, math.log2(self.min_patches), math.log2(self.max_patches))
            areas = np.clip(np.floor(np.exp2(x) + 1e-9).astype(np.int64), self.min_patches, self.max_patches)
            grids = np.array([fit_grid(int(a), math.exp(r)) for a, r in zip(areas, log_r, strict=True)])
            q = self.batch_multiple
            sizes = (self.tokens_per_batch // grids.prod(1)) // q * q
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            if len(self._blocks) > 4:
                self._blocks.clear()
            self._blocks[b] = (areas, grids, sizes, starts)
        return self._blocks[b]

    def _block_start(self, b: int) -> int:
        while len(self._block_starts) <= b:
            k = len(self._block_starts) - 1
            self._block_starts.append(self._block_starts[k] + int(self._block(k)[2].sum()))
        return self._block_starts[b]

    def __call__(self, step: int) -> StepShape:
        b, i = divmod(step, _BLOCK)
        areas, grids, sizes, starts = self._block(b)
        gh, gw = (int(v) for v in grids[i])
        return StepShape(step, int(areas[i]), (gh, gw), int(sizes[i]), self._block_start(b) + int(starts[i]))


def native_schedule(cfg, info: DistInfo) -> NativeSchedule | None:
    """The run's per-step areas and batch sizes (data.native), or None for fixed-resolution training."""
    nat = cfg.data.native
    if not nat.enabled:
        return None
    quantum = info.world_size * cfg.train.grad_accum
    if nat.batch_multiple % quantum:
        raise TrainingError(
            f"data.native.batch_multiple={nat.batch_multiple} is not divisible by ranks x train.grad_accum = "
            f"{info.world_size} x {cfg.train.grad_accum}: every step's batch must split into equal micro-batches"
        )
    return NativeSchedule(
        seed=cfg.seed,
        min_patches=nat.min_patches,
        max_patches=nat.max_patches,
        tokens_per_batch=nat.tokens_per_batch,
        max_aspect=nat.max_aspect,
        batch_multiple=nat.batch_multiple,
    )
