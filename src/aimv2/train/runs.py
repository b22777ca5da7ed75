"""A finished (or running) pretraining run folder read back as a model: encoder + decoder + tokenizer.

Only a run folder has the decoder (``encoder.safetensors`` and released checkpoints hold the encoder alone), so
whatever needs the decoder after training (captioning, continued pretraining) starts here. The model is rebuilt
from the run's own ``config.yaml`` with ``objectives.build_model``, the function the trainer itself uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config, ConfigError, load_config
from ..data.tokenizer import Tokenizer
from ..objectives import AIMv2Pretrainer, build_model
from . import checkpointing as ckpt


class RunError(ValueError):
    """The folder is not a pretraining run that can caption (no config, tokenizer, checkpoint or decoder)."""


@dataclass
class PretrainedRun:
    # encoder + decoder(s) with the latest checkpoint's weights, eval mode: AIMv2 or a baseline (cap, separate)
    model: AIMv2Pretrainer
    tokenizer: Tokenizer
    config: Config  # the run's resolved training config
    step: int  # training step of the checkpoint
    checkpoint: Path


def load_pretraining_run(run_dir: str | Path, *, device: str | torch.device = "cpu") -> PretrainedRun:
    """The whole pretraining model (encoder + decoder) and tokenizer of a run folder, from its latest checkpoint.

    Only a run folder has the decoder: ``encoder.safetensors`` and released checkpoints hold the encoder alone.
    The model is rebuilt from the run's own ``config.yaml`` exactly as training built it, and the checkpoint is
    read with ``torch.load(weights_only=True)`` (tensors and plain containers only, never arbitrary pickles).
    """
    run = Path(run_dir)
    what = "captioning needs a pretraining run folder (config.yaml, tokenizer.json, checkpoints/ as written by "
    what += "`aimv2 pretrain`): only its checkpoints hold the decoder"
    if run.is_file():
        raise RunError(f"{run} is a file; {what}. Encoder-only files such as encoder.safetensors have no decoder.")
    if not run.is_dir():
        raise RunError(f"{run} does not exist; {what}")
    if not (run / "config.yaml").is_file():
        raise RunError(f"{run} has no config.yaml; {what}")
    try:
        cfg = load_config(run / "config.yaml")
    except (ConfigError, ValueError) as e:
        raise RunError(f"{run}/config.yaml cannot be read: {e}") from e
    if not (run / "tokenizer.json").is_file():
        raise RunError(f"{run} has no tokenizer.json; {what}")
    tokenizer = Tokenizer.from_file(run / "tokenizer.json", context_length=cfg.data.context_length)
    found = ckpt.list_checkpoints(run)
    if not found:
        raise RunError(
            f"{run} has no checkpoint in {run / ckpt.CKPT_DIR} yet: the first is written after "
            f"train.checkpoint_every={cfg.train.checkpoint_every} steps and at the end of the run"
        )
    path = found[-1]
    try:  # mmap: the optimizer state in the same file is never read into memory
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise RunError(f"{path} cannot be read as a training checkpoint: {type(e).__name__}: {e}") from e
    sd = state.get("model") if isinstance(state, dict) else None
    if not isinstance(sd, dict) or not any(k.startswith(("decoder.", "text_decoder.")) for k in sd):
        kind = f" (model.objective={cfg.model.objective}: no caption decoder)" if cfg.model.objective != "aimv2" else ""
        raise RunError(f"{path} holds no caption decoder weights{kind}, so it cannot caption")
    model = build_model(cfg, tokenizer.vocab_size, tokenizer.pad_id)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise RunError(f"{path} does not match the model of {run}/config.yaml: {e}") from e
    return PretrainedRun(model.to(device).eval(), tokenizer, cfg, int(state.get("step", 0)), path)
