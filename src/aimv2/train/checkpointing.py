"""Atomic, resumable training checkpoints.

A checkpoint holds everything that decides the rest of the run: model, optimizer, step (which is also
the data position, see ``train/data.py``), skipped-step counters and every RNG. It is written to a
temporary name, fsynced and renamed, so a kill at any moment leaves either the old or the new file,
never a torn one. Full (unsharded) state dicts are gathered from DDP/FSDP2 through
``torch.distributed.checkpoint.state_dict`` and written by rank 0; ``torch.load`` reads them back with
``weights_only=True`` (our own files only: released weights load from safetensors).
"""

from __future__ import annotations

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

# The naming and reading of run checkpoints are the run-folder reader's (aimv2.weights); the trainer uses them
# through this module as ckpt.CKPT_DIR, ckpt.list_checkpoints, ckpt.load_latest and ckpt.atomic_write.
from ..weights.atomic import atomic_write
from ..weights.run_folder import CKPT_DIR, checkpoint_path, list_checkpoints, load_latest  # noqa: F401


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


def save_checkpoint(out_dir: str | Path, step: int, model_sd: dict, optim_sd: dict, extra: dict, keep_last: int):
    """Write checkpoints/step_XXXXXXXX.pt atomically and keep only the last ``keep_last``. Rank 0 only."""
    path = checkpoint_path(out_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "model": model_sd, "optimizer": optim_sd, **extra}
    atomic_write(path, lambda tmp: torch.save(state, tmp))
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
