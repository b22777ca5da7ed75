"""A finished (or running) pretraining run folder read back as a model: encoder + decoder + tokenizer.

Only a run folder has the decoder (``encoder.safetensors`` and released checkpoints hold the encoder alone), so
whatever needs the decoder after training (captioning, continued pretraining) starts here. The folder is read by
the one run-folder reader (``aimv2.weights.read_run``); the model is rebuilt from the run's own ``config.yaml`` with
``objectives.build_model``, the function the trainer itself uses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config
from ..data.tokenizer import Tokenizer
from ..objectives import AIMv2Pretrainer, build_model
from .errors import RunError
from .run_folder import CKPT_DIR, read_run


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
    The folder is read by ``aimv2.weights.read_run``; the model is rebuilt from the run's own ``config.yaml``
    exactly as training built it. Every way the folder falls short is a :class:`RunError` that says so.
    """
    what = "captioning needs a pretraining run folder (config.yaml, tokenizer.json, checkpoints/ as written by "
    what += "`aimv2 pretrain`): only its checkpoints hold the decoder"
    if Path(run_dir).is_file():
        raise RunError(f"{run_dir} is a file; {what}. Encoder-only files such as encoder.safetensors have no decoder.")
    run = read_run(run_dir, why=what)
    cfg = run.config
    if run.tokenizer_file is None:
        raise RunError(f"{run.path} has no tokenizer.json; {what}")
    tokenizer = Tokenizer.from_file(run.tokenizer_file, context_length=cfg.data.context_length)
    state = run.latest()
    if state is None:
        raise RunError(
            f"{run.path} has no checkpoint in {run.path / CKPT_DIR} yet: the first is written after "
            f"train.checkpoint_every={cfg.train.checkpoint_every} steps and at the end of the run"
        )
    if not any(k.startswith(("decoder.", "text_decoder.")) for k in state.model):
        kind = f" (model.objective={cfg.model.objective}: no caption decoder)" if cfg.model.objective != "aimv2" else ""
        raise RunError(f"{state.path} holds no caption decoder weights{kind}, so it cannot caption")
    build_cfg, weights = cfg, state.model
    if cfg.model.objective == "distill":  # its AIMv2 part is AIMv2's encoder + decoder; projection and teacher train
        build_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, objective="aimv2"))
        weights = {k: v for k, v in state.model.items() if not k.startswith("projection.")}
    model = build_model(build_cfg, tokenizer.vocab_size, tokenizer.pad_id)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise RunError(f"{state.path} does not match the model of {run.path}/config.yaml: {e}") from e
    return PretrainedRun(model.to(device).eval(), tokenizer, cfg, state.step, state.path)
