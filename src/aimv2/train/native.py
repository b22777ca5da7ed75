"""Native-resolution training (the paper's post-training stage): a patch area per step, and a batch size that keeps
the number of image tokens per step constant.

Step s draws n from a normal(0, 1) truncated to [-1, 1] and maps it linearly onto [log2 min, log2 max]:

    A_s = 2^(lo + (n + 1) / 2 * (hi - lo))  patches      (the paper: lo, hi = 7, 12, so A in [128, 4096], median 2^9.5)

Two ways to shape the images of a step (``data.native.mode``):

    per_image  (the paper's recipe, the default) every image keeps its own aspect ratio r_i = height / width: its
               grid (gh_i, gw_i) = fit_grid(A_s, r_i) has gh_i * gw_i <= A_s and gh_i / gw_i within one patch of
               r_i. The built-in scenes draw r_i log-uniform in [1 / R, R] per sample (keyed by the sample's
               global index) and are rendered straight at that grid; folder, hf and shard images keep their own
               ratio. A micro-batch is patch tokens [B, A_s, p*p*3], image i's n_i = gh_i * gw_i real patches
               first, in its own raster order, then padding that attention and losses mask out.
    per_step   one aspect ratio r_s per step, log-uniform in [1 / R, R], and one grid fit_grid(A_s, r_s) for every
               image of the step (each scaled to cover it and cropped): a dense [B, 3, gh*p, gw*p] tensor with no
               padding, but most images are not seen at their own shape. Kept for comparison, and it is what run
               folders written before ``mode`` existed resume with.

The global batch is B_s = floor(tokens_per_batch / L_s), rounded down to a multiple of batch_multiple, where L_s is the
step's sequence length: A_s per image (padded), gh * gw per step. So B_s * L_s <= tokens_per_batch, within
(batch_multiple * L_s) of it.

Why padding rather than packing several images into one sequence: one A_s per step and grids that fill A_s closely
(fit_grid gives up at most a row or column of patches) leave little to pad. benchmarks/native_speed.py counts it
over 2000 steps with aspect ratios in [1/2, 2]: 2.1% of the image positions at the paper's areas (2^7 to 2^12) and
8.1% at native-tiny's (2^4 to 2^6), and times it: per image ran at 1.02x the image tokens/s of one grid per step
(native-tiny on CPU, benchmarks/results/native_speed_cpu.json). Packing could win back those few percent but needs
block-diagonal prefix and causal masks over sequences several images long, whose dense attention (SDPA on CPU)
grows with the square of the packed length; padding keeps one image per row, the encoder's own prefix pattern and
a key mask (AttentionMask.key_valid), which models/attention.py's attend() hands to whichever backend runs it.

Every draw is keyed by (seed, step) only (a scene's aspect ratio by (seed, sample index); never rank or worker),
so all ranks agree on the shape and the batch size of every step: DDP and FSDP2 stay in lockstep, and with
batch_multiple divisible by ranks x grad_accum the global batch does not depend on how many ranks share it. Step s
holds the global samples [start(s), start(s) + B_s), start(s) = B_0 + ... + B_{s-1}; a resumed run recomputes
start(s) from the seed, so the data position and the area sequence continue exactly. Draws come in blocks of steps
(one vectorized draw per block), so start(s) costs microseconds per thousand steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from ..weights.atomic import atomic_write
from ..weights.run_folder import list_checkpoints
from .distributed import DistInfo
from .guard import TrainingError

_BLOCK = 1024  # steps per vectorized draw
_TAG = 11  # keeps these generators apart from the other (seed, ...) keyed ones
MODES = ("per_image", "per_step")


@dataclass(frozen=True)
class StepShape:
    step: int
    area: int  # the drawn budget A_s in patches
    grid: tuple[int, int]  # per_step: the step's (gh, gw), gh * gw <= area; per_image: every image has its own
    batch_size: int  # global B_s
    start: int  # global index of the step's first sample
    per_image: bool = False

    @property
    def num_patches(self) -> int:
        """Sequence length of the step: A_s for per-image grids (each image padded to it), else gh * gw."""
        return self.area if self.per_image else self.grid[0] * self.grid[1]


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
        mode: str = "per_step",
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
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
        self.per_image = mode == "per_image"
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
            lengths = areas if self.per_image else grids.prod(1)  # tokens per image, padding included
            sizes = (self.tokens_per_batch // lengths) // q * q
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
        start = self._block_start(b) + int(starts[i])
        return StepShape(step, int(areas[i]), (gh, gw), int(sizes[i]), start, self.per_image)

    def image_aspect(self, global_index: int) -> float:
        """The aspect ratio (height / width) of sample ``global_index`` where the data has none of its own (the
        built-in scenes): log-uniform in [1 / max_aspect, max_aspect], keyed by (seed, index) alone."""
        rng = np.random.default_rng([self.seed, _TAG, 1, int(global_index)])
        return math.exp(rng.uniform(-math.log(self.max_aspect), math.log(self.max_aspect)))


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
        mode=nat.mode or "per_image",  # unset outside a run folder (resolve_native_mode): a new run's default
    )


def resolve_native_mode(cfg, out_dir: Path, *, migrate: bool = False) -> None:
    """Set ``data.native.mode`` where the config leaves it unset (null): the mode of the run ``out_dir`` already
    holds, so a resumed run keeps its shapes; per_image for a new run. A run folder written before the key existed
    has ``data.native`` without ``mode``: a native run there trained one grid per step. ``migrate`` (rank 0, holding
    the run's lock) writes the key into such a config.yaml (per_step; in a run without native resolution, where it
    means nothing, this run's value), so the folder says what it was trained with and the resume check compares
    like with like."""
    nat = cfg.data.native
    path = out_dir / "config.yaml"
    doc, saved = None, None
    if path.is_file() and list_checkpoints(out_dir):
        doc = yaml.safe_load(path.read_text()) or {}
        saved = doc.get("data", {}).get("native") if isinstance(doc.get("data"), dict) else None
    saved = saved if isinstance(saved, dict) else None
    legacy = saved is not None and "mode" not in saved
    if nat.mode is None:
        if saved is not None and saved.get("mode") in MODES:
            nat.mode = saved["mode"]
        else:
            nat.mode = "per_step" if legacy and saved.get("enabled") else "per_image"
    if legacy:
        saved["mode"] = "per_step" if saved.get("enabled") else nat.mode
        if migrate:
            atomic_write(path, lambda tmp: Path(tmp).write_text(yaml.safe_dump(doc, sort_keys=False)))
