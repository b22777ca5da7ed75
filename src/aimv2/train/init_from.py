"""``model.init_from``: start a pretraining run from earlier weights (post-training at a higher resolution,
continued pretraining) instead of a random init.

Sources, told apart by what is on disk:

- a training run folder (``config.yaml`` + ``checkpoints/step_*.pt``): the encoder and, with
  ``model.init_decoder`` (default), the decoder of its latest checkpoint;
- anything ``aimv2.weights.read_checkpoint`` reads: an encoder ``.safetensors`` file in Apple's, transformers'
  or our layout, or a transformers ``save_pretrained`` folder. These hold no decoder: it starts fresh (see
  ``train.freeze_encoder_steps`` to warm it up on the frozen encoder).

The encoder goes through ``aimv2.create_model`` with this run's model and ``img_size``, so a
learned position embedding is resized to the new grid (224 -> 336: 16x16 -> 24x24) and anything else that
does not fit (width, depth, patch size, heads) is an error naming both sides; the decoder is checked
strictly too. Nothing is loaded unless everything fits. The caller applies this only to a run with no
checkpoint of its own: a resumed run keeps its own weights (resume wins) and its provenance record.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..config import Config, ConfigError
from ..objectives.aimv2 import AIMv2Pretrainer
from ..weights import CheckpointError, create_model, is_run_folder, read_checkpoint, read_run
from ..weights.resolve import check_state_dict

log = logging.getLogger("aimv2.train")


class InitFromError(ConfigError):
    """model.init_from names something that cannot start this run; the message says what and why."""


def init_from(model: AIMv2Pretrainer, cfg: Config) -> dict:
    """Load ``cfg.model.init_from`` into ``model`` (unwrapped, before parallelize) and return the record the
    run's checkpoints keep: ``{"path", "kind", "layout", "step", "decoder", "pos_embed"}``."""
    spec = cfg.model.init_from
    path = Path(spec)
    key = f"model.init_from={spec}"
    if not path.exists():
        raise InitFromError(
            f"{key}: no such file or folder (expected a training run folder, an encoder .safetensors file in "
            "Apple's, transformers' or our layout, or a transformers save_pretrained folder)"
        )
    decoder_sd, step = None, None
    try:
        if is_run_folder(path):  # its latest step checkpoint: the encoder and the decoder
            run = read_run(path)
            state = run.latest()
            enc_ckpt, decoder_sd, step = run.encoder(state), state.part("decoder."), state.step
            kind = "run"
        else:
            enc_ckpt = read_checkpoint(path)
            kind = "encoder"
        target = model.encoder.cfg
        # this run's model, with its own img_size: a learned embedding of another grid is resized
        overrides = {**cfg.model.encoder_overrides, "img_size": target.img_size}
        encoder = create_model(cfg.model.encoder, checkpoint=enc_ckpt, **overrides)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise InitFromError(f"{key}: {e}") from e
    if encoder.cfg != target:  # create_model took this run's name and overrides: a bug if it differs
        raise InitFromError(f"{key}: built {encoder.cfg} but this run's encoder is {target}")
    src_grid = None
    if enc_ckpt.state_dict.get("pos_embed") is not None:
        n = enc_ckpt.state_dict["pos_embed"].shape[1]
        c = enc_ckpt.config
        src_grid = c.grid_size if c is not None and c.grid_size[0] * c.grid_size[1] == n else None
    with torch.no_grad():
        model.encoder.load_state_dict(encoder.state_dict(), strict=True)

    take_decoder = decoder_sd is not None and cfg.model.init_decoder
    if take_decoder:
        try:
            check_state_dict(decoder_sd, model.decoder, f"{key}: the decoder of that run")
        except CheckpointError as e:
            raise InitFromError(
                f"{e}\n  (the source run's decoder differs from this run's model.decoder / data.context_length / "
                "tokenizer; set model.init_decoder=false to start a fresh decoder)"
            ) from e
        with torch.no_grad():
            model.decoder.load_state_dict(decoder_sd, strict=True)
    pe = "sin-cos" if target.pos_embed == "sincos" else "{}x{}".format(*target.grid_size)
    if src_grid is not None and tuple(src_grid) != tuple(target.grid_size):
        pe = "{}x{} -> {}x{} (resized)".format(*src_grid, *target.grid_size)
    record = {
        "path": str(spec),
        "kind": kind,
        "layout": enc_ckpt.layout,
        "step": step,
        "decoder": bool(take_decoder),
        "pos_embed": pe,
    }
    dec_note = "decoder from the run" if take_decoder else "fresh decoder"
    if decoder_sd is not None and not cfg.model.init_decoder:
        dec_note += " (model.init_decoder=false)"
    log.info(
        "initialized from %s: encoder (%s layout, position embedding %s), %s",
        enc_ckpt.source,
        enc_ckpt.layout,
        pe,
        dec_note,
    )
    return record
