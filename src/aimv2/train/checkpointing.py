"""Atomic, resumable training checkpoints.

A checkpoint holds everything that decides the rest of the run: model, optimizer, step (which is also
the data position, see ``train/data.py``), skipped-step counters and every RNG. It is written to a
temporary name, fsynced and renamed, so a kill at any moment leaves either the old or the new file,
never a torn one. Full (unsharded) state dicts are gathered from DDP/FSDP2 through
``torch.distributed.checkpoint.state_dict`` and written by rank 0; ``torch.load`` reads them back with
``weights_only=True`` (our own files only: released weights load from safetensors).
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..weights.atomic import atomic_write
from ..weights.run_folder import checkpoint_path, list_checkpoints
from .guard import TrainingError

DISK_MARGIN = 1.1  # free space a save asks for: the state's size plus 10% (torch.save's zip overhead, metadata)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full state dicts on CPU (collective under DDP/FSDP: every rank must call it)."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def state_bytes(*state_dicts: dict) -> int:
    """The bytes of every tensor in (nested) state dicts: what a checkpoint of them will take on disk."""

    def size(x) -> int:
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, dict):
            return sum(size(v) for v in x.values())
        if isinstance(x, list | tuple):
            return sum(size(v) for v in x)
        return 0

    return sum(size(sd) for sd in state_dicts)


def check_free_disk(folder: Path, needed: int, what: str) -> None:
    """Refuse a write that cannot fit, before it starts (a full disk mid-write costs the time of the whole save)."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise TrainingError(
            f"not enough free disk for {what} in {folder}: {needed / 2**20:.0f} MiB needed, {free / 2**20:.0f} MiB "
            "free; free some space (or lower train.keep_last), then re-run the same command to resume"
        )


def save_checkpoint(out_dir: str | Path, step: int, model_sd: dict, optim_sd: dict, extra: dict, keep_last: int):
    """Write checkpoints/step_XXXXXXXX.pt atomically and keep only the last ``keep_last``. Rank 0 only.

    The free disk is checked first; a write that still fails leaves no partial file (atomic_write) and the older
    checkpoints untouched: they are pruned only after the new one is complete."""
    path = checkpoint_path(out_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_free_disk(path.parent, int(state_bytes(model_sd, optim_sd) * DISK_MARGIN), f"the step-{step} checkpoint")
    state = {"step": step, "model": model_sd, "optimizer": optim_sd, **extra}
    try:
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise TrainingError(
                f"the disk of {path.parent} filled up while writing the step-{step} checkpoint (no partial file was "
                "left; the previous checkpoints are intact): free some space, then re-run the same command"
            ) from e
        raise
    except RuntimeError as e:  # torch.save's writer reports a failed write as a RuntimeError (inline_container.cc)
        raise TrainingError(
            f"writing the step-{step} checkpoint to {path.parent} failed ({str(e).splitlines()[0][:160]}); no "
            "partial file was left and the previous checkpoints are intact: check the disk, then re-run"
        ) from e
    for old in list_checkpoints(out_dir)[:-keep_last]:
        old.unlink(missing_ok=True)


def restore(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, stateless: nn.Module | None = None):
    """Load full state dicts into a (possibly DDP/FSDP-wrapped) model and its optimizer.

    ``stateless``: a submodule whose parameters have no optimizer state in this checkpoint (the encoder, saved
    during a frozen-encoder warm-up: it never took an optimizer step); they are left without state, exactly as
    in the run that wrote it. Every other parameter's state must be there."""
    set_model_state_dict(model, state["model"], options=StateDictOptions(full_state_dict=True, strict=True))
    strict = stateless is None
    set_optimizer_state_dict(
        model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True, strict=strict)
    )
    if stateless is not None:
        skip = {id(p) for p in stateless.parameters()}
        lacking = [
            p for g in optimizer.param_groups for p in g["params"] if id(p) not in skip and p not in optimizer.state
        ]
        if lacking:
            raise RuntimeError(
                f"the checkpoint has no optimizer state for {len(lacking)} parameter(s) outside the encoder"
            )
        for p in stateless.parameters():
            optimizer.state.pop(p, None)
