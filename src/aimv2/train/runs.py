"""A finished (or running) pretraining run folder read back as a model: encoder + decoder + tokenizer.

Only a run folder has the decoder (``encoder.safetensors`` and released checkpoints hold the encoder alone), so
whatever needs the decoder after training (captioning, continued pretraining) starts here. The folder is read by
the one run-folder reader (``aimv2.weights.read_run``); the model is rebuilt from the run's own ``config.yaml`` with
:func:`build_model`, the function the trainer itself uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import Config
from ..data.tokenizer import Tokenizer
from ..models.baselines import create_baseline_model
from ..models.pretrain import AIMv2Pretrainer, create_pretraining_model
from ..weights import RunError, read_run
from ..weights.run_folder import CKPT_DIR


def build_model(cfg: Config, vocab_size: int, pad_id: int, eos_id: int = 1) -> AIMv2Pretrainer | nn.Module:
    """The pretraining model a config describes (decoder context = the tokenizer's unless set): AIMv2, or one of
    the baselines of ``model.objective`` / ``model.separate_decoders`` (models/baselines.py)."""
    m = cfg.model
    if m.objective != "aimv2" or m.separate_decoders:
        return create_baseline_model(
            m.objective,
            m.encoder,
            vocab_size=vocab_size,
            pad_id=pad_id,
            eos_id=eos_id,
            alpha=m.alpha,
            encoder_attention=m.encoder_attention,
            separate_decoders=m.separate_decoders,
            clip_pool=m.clip.pool,
            clip_text_size=m.clip.text_size,
            clip_projection_dim=m.clip.projection_dim,
            clip_init_temperature=m.clip.init_temperature,
            encoder_overrides=m.encoder_overrides,
            decoder_overrides={"max_text_len": cfg.data.context_length, **m.decoder},
        )
    dec = {f"decoder_{k}": v for k, v in cfg.model.decoder.items()}
    dec.setdefault("decoder_max_text_len", cfg.data.context_length)
    return create_pretraining_model(
        cfg.model.encoder,
        vocab_size=vocab_size,
        pad_id=pad_id,
        alpha=cfg.model.alpha,
        **cfg.model.encoder_overrides,
        **dec,
    )


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
    model = build_model(cfg, tokenizer.vocab_size, tokenizer.pad_id)
    try:
        model.load_state_dict(state.model, strict=True)
    except RuntimeError as e:
        raise RunError(f"{state.path} does not match the model of {run.path}/config.yaml: {e}") from e
    return PretrainedRun(model.to(device).eval(), tokenizer, cfg, state.step, state.path)
