"""The one reader of training run folders (what ``aimv2 pretrain`` writes in ``out_dir``).

A run folder holds ``config.yaml`` (the resolved run config), ``tokenizer.json``, ``checkpoints/step_XXXXXXXX.pt``
(the resumable training state: model, optimizer, step, RNGs) and, once training ends, ``encoder.safetensors``.
Only the step checkpoints hold the decoder, so whatever needs more than the encoder (captioning, continued
pretraining from a run) reads them here. They are our own files and are read with ``torch.load(weights_only=True)``
(tensors and plain containers only, never arbitrary pickles) and ``mmap``, so the optimizer state stored next to
the model is never read into memory.

The checkpoint naming lives here too, because reading and writing must agree on it; the writer
(``train/checkpointing.py``) imports it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config, ConfigError, load_config
from ..models.registry import model_config
from .errors import RunError
from .resolve import Checkpoint

CKPT_DIR = "checkpoints"
STEP_FILE = re.compile(r"^step_(\d{8})\.pt$")


# ------------------------------------------------------------------------------------------ naming
def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    """``out_dir/checkpoints/step_XXXXXXXX.pt``: eight digits, so names sort in step order."""
    return Path(out_dir) / CKPT_DIR / f"step_{step:08d}.pt"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """The run's step checkpoints, oldest first (temporary files of an interrupted write are not listed)."""
    d = Path(out_dir) / CKPT_DIR
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if STEP_FILE.match(p.name))


def load_latest(out_dir: str | Path) -> dict | None:
    """The whole latest training state (optimizer included, for resuming), or None before the first checkpoint."""
    ckpts = list_checkpoints(out_dir)
    if not ckpts:
        return None
    return torch.load(ckpts[-1], map_location="cpu", weights_only=True)


def load_latest_readable(out_dir: str | Path, set_aside: bool = True) -> tuple[dict | None, list[tuple[Path, str]]]:
    """The newest training state that can be read, for resuming, and the newer checkpoints it had to pass over
    (path, why). Each unreadable one (a truncated file from a crash, a full disk) is renamed to ``NAME.unreadable``,
    so that it is kept for inspection but never listed again (nor counted by ``train.keep_last``); ``set_aside=False``
    (the other ranks of a torchrun job) only passes over them."""
    skipped = []
    for path in reversed(list_checkpoints(out_dir)):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or "model" not in state or "step" not in state:
                raise ValueError("not a training checkpoint (no model or step)")
            return state, skipped
        except Exception as e:  # torch.load reports a torn file in many ways (zip, pickle, EOF errors)
            skipped.append((path, f"{type(e).__name__}: {e}".splitlines()[0][:200]))
            if set_aside:
                path.rename(path.with_name(path.name + ".unreadable"))
    return None, skipped


def is_run_folder(path: str | Path) -> bool:
    """A folder with a run config and at least one step checkpoint."""
    path = Path(path)
    return path.is_dir() and (path / "config.yaml").is_file() and bool(list_checkpoints(path))


# ------------------------------------------------------------------------------------------ reading a run
@dataclass
class TrainingState:
    """One step checkpoint's model weights (the optimizer state beside them stays unread on disk)."""

    path: Path
    step: int
    model: dict[str, torch.Tensor]  # the training model's state dict: encoder.*, decoder.* (or a baseline's parts)

    def part(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors under ``prefix`` (e.g. ``"decoder."``), with the prefix removed."""
        return {k.removeprefix(prefix): v for k, v in self.model.items() if k.startswith(prefix)}


@dataclass
class RunFolder:
    """A run folder with its config read; checkpoints are read on demand."""

    path: Path
    config: Config

    @property
    def tokenizer_file(self) -> Path | None:
        path = self.path / "tokenizer.json"
        return path if path.is_file() else None

    def checkpoints(self) -> list[Path]:
        return list_checkpoints(self.path)

    def latest(self) -> TrainingState | None:
        """The latest step checkpoint's model weights, or None before the first is written."""
        found = self.checkpoints()
        if not found:
            return None
        path = found[-1]
        try:  # mmap: the optimizer state in the same file is never read into memory
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise RunError(f"{path} cannot be read as a training checkpoint: {type(e).__name__}: {e}") from e
        model = state.get("model") if isinstance(state, dict) else None
        step = int(state.get("step", 0)) if isinstance(state, dict) else 0
        return TrainingState(path, step, model if isinstance(model, dict) else {})

    def encoder(self, state: TrainingState) -> Checkpoint:
        """The encoder of ``state`` as a Checkpoint in our layout, with the model the run's config names."""
        m = self.config.model
        cfg = model_config(m.encoder, **m.encoder_overrides)
        source = f"{self.path} (run, step {state.step})"
        return Checkpoint(state.part("encoder."), "aimv2", source, cfg, m.encoder)


def read_run(path: str | Path, why: str = "expected a training run folder written by `aimv2 pretrain`") -> RunFolder:
    """The run folder at ``path`` with its ``config.yaml`` parsed; ``why`` ends the error when it is not one."""
    run = Path(path)
    if run.is_file():
        raise RunError(f"{run} is a file; {why}")
    if not run.is_dir():
        raise RunError(f"{run} does not exist; {why}")
    if not (run / "config.yaml").is_file():
        raise RunError(f"{run} has no config.yaml; {why}")
    try:
        cfg = load_config(run / "config.yaml")
    except (ConfigError, ValueError) as e:
        raise RunError(f"{run}/config.yaml cannot be read: {e}") from e
    return RunFolder(run, cfg)
