"""What makes a run folder resumable: the config check before a run continues, the state every checkpoint
carries (weights, optimizer, skip counters, every rank's RNG and data position) and reading it back."""

from __future__ import annotations

from pathlib import Path

from ..config.parse import saved_config_dict
from ..config.version import canonical_decay
from ..weights.atomic import crash_point
from ..weights.run_folder import list_checkpoints
from . import checkpointing as ckpt
from .distributed import DistInfo, all_gather_objects, barrier
from .guard import NonFiniteGuard, TrainingError

# keys that may change between the run that wrote a folder and the one resuming it: length, cadence, workers, logs
FREE_KEYS = {
    ("train", "steps"),
    ("train", "progress"),
    ("train", "checkpoint_every"),
    ("train", "log_every"),
    ("train", "keep_last"),
    ("data", "num_workers"),
    ("data", "prefetch_factor"),
    ("log",),
}


def check_same_config(cfg, out_dir: Path) -> None:
    """Resuming with a different model or data would silently mix two runs: refuse unless only the length,
    cadence, worker count or logging changed."""
    path = out_dir / "config.yaml"
    if not path.exists() or not list_checkpoints(out_dir):
        return
    old = saved_config_dict(path)  # in today's form, when an earlier version wrote it
    new = canonical_decay(cfg.to_dict())
    for section, defaults in type(cfg)().to_dict().items():  # keys added since that run was written: defaults
        if isinstance(defaults, dict) and isinstance(old.get(section), dict):
            old[section] = {**defaults, **old[section]}
    old = canonical_decay(old)  # the same decay in either convention is the same run
    diffs = []
    for section, values in new.items():
        if not isinstance(values, dict):
            if old.get(section) != values and section != "out_dir":
                diffs.append(f"{section}: {old.get(section)!r} -> {values!r}")
            continue
        for k, v in values.items():
            if (section, k) in FREE_KEYS or (section,) in FREE_KEYS:
                continue
            if old.get(section, {}).get(k) != v:
                diffs.append(f"{section}.{k}: {old.get(section, {}).get(k)!r} -> {v!r}")
    if diffs:
        raise TrainingError(
            f"{out_dir} holds a run with a different config ({'; '.join(diffs)}). Resuming would mix two runs: "
            f"use another out_dir, or restore the original values."
        )


def save_run_state(
    model,
    optimizer,
    out_dir: Path,
    step: int,
    guard: NonFiniteGuard,
    keep_last: int,
    info: DistInfo,
    positions: dict,
    extra: dict | None = None,
    export=None,
) -> None:
    """A resumable checkpoint (all ranks take part): weights, optimizer, skip counters, every rank's RNG and data
    position, plus ``extra`` fields; then rank 0 calls ``export(model_sd)`` to write the run's weights file."""
    model_sd, optim_sd = ckpt.gather_state(model, optimizer)
    per_rank = all_gather_objects((ckpt.rng_state(), positions), info)
    if info.is_main:
        state = {
            "bad_in_row": guard.bad_in_row,
            "skipped_steps": guard.skipped,
            "rng": [r for r, _ in per_rank],
            "data_position": [p for _, p in per_rank],  # per rank: {worker: raw samples passed} (shards)
            **(extra or {}),
        }
        ckpt.save_checkpoint(out_dir, step, model_sd, optim_sd, state, keep_last)
        crash_point(f"before-export:{step}")
        if export is not None:
            export(model_sd)
    barrier(info)


def weights_file_stale(out_dir: Path, name: str) -> bool:
    """The run's exported weights (encoder.safetensors, lit.safetensors) are missing or older than its newest
    checkpoint: a run killed between writing a checkpoint and exporting from it. Every consumer (probe, extract,
    convert) reads the export, so it must always be the newest checkpoint's weights."""
    ckpts = list_checkpoints(out_dir)
    path = out_dir / name
    return bool(ckpts) and (not path.exists() or path.stat().st_mtime < ckpts[-1].stat().st_mtime)


def shard_positions(state: dict, info: DistInfo, num_workers: int) -> dict:
    """This rank's {worker: {source: raw samples passed}} from a checkpoint; the shard split needs the same ranks
    and workers as the run that wrote it."""
    saved = state.get("data_position") or []
    workers = max(1, num_workers)
    if len(saved) != info.world_size or any(p and len(p) != workers for p in saved):
        raise TrainingError(
            f"the checkpoint was written by {len(saved)} rank(s) reading shards with "
            f"{max((len(p) for p in saved), default=0)} worker(s) each; resuming a shard stream exactly needs the "
            f"same layout: run with {len(saved)} process(es) and data.num_workers={max(len(p) for p in saved)}"
        )
    return dict(saved[info.rank])
