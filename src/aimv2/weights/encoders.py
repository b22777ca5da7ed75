"""Getting an encoder with weights: reading an encoder checkpoint, ``create_model`` and ``load_encoder``.

``create_model(name, checkpoint=...)`` is the library's way (the public contract); ``load_encoder(spec)`` is
the command line's ENCODER argument, where one string is a model name, a checkpoint file or folder, or a run
folder. Both end in the same strict load (``resolve.py``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from safetensors import safe_open

from ..models.encoder import EncoderConfig, VisionEncoder
from ..models.registry import build_encoder, model_config, with_overrides
from .errors import CheckpointError, RunError
from .hf_config import encoder_config_from_hf
from .hub import fetch_release, fetch_spec, is_hub_spec
from .layout import detect_layout, encoder_part, to_ours
from .resolve import Checkpoint, encoder_from_checkpoint, name_of
from .run_folder import RunFolder, is_run_folder, read_run
from .safetensors_io import PICKLE_SUFFIXES, checkpoint_files, read_safetensors

logger = logging.getLogger(__name__)

RUN_ENCODER = "encoder.safetensors"  # what a pretraining run writes when it ends


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read an encoder checkpoint into our layout: a ``.safetensors`` file, a transformers ``save_pretrained``
    folder (single or sharded) or a training run folder (its ``encoder.safetensors``, else, while the run has
    not finished, the encoder of its latest step checkpoint)."""
    path = Path(path)
    if path.is_dir() and not (path / RUN_ENCODER).is_file() and (run := _pretraining_run(path)) is not None:
        try:
            return run.encoder(run.latest())
        except RunError as e:  # an unreadable step checkpoint
            raise CheckpointError(str(e)) from e
    files, hf_config = checkpoint_files(path, RUN_ENCODER)
    raw, metadata = read_safetensors(files)
    layout = detect_layout(raw)
    sd = to_ours(encoder_part(raw, layout, str(path)), layout)
    config, name = None, None
    if "config" in metadata:
        try:
            config = EncoderConfig(**json.loads(metadata["config"]))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: its metadata config does not describe an encoder ({e})") from e
        name = metadata.get("name") or name_of(config)
    elif hf_config is not None:
        config = encoder_config_from_hf(hf_config, learned="pos_embed" in sd)
        name = name_of(config)
    return Checkpoint(sd, layout, str(path), config, name)


def _pretraining_run(path: Path) -> RunFolder | None:
    """The pretraining run at ``path``, or None: not a run, or another kind (a LiT run's config is not a
    pretraining config), which then fails as a folder without the file it should hold."""
    if not is_run_folder(path):
        return None
    try:
        return read_run(path)
    except RunError:
        return None


def create_model(
    name: str | None,
    *,
    checkpoint: str | os.PathLike | Checkpoint | None = None,
    pretrained: bool = False,
    revision: str | None = None,
    **overrides,
) -> VisionEncoder:
    """The AIMv2 vision encoder ``name`` (``aimv2-{size}-patch{p}-{res|native}``).

    pretrained: Apple's published weights for ``name`` (a name of ``aimv2.weights.RELEASES``, e.g.
        ``aimv2-large-patch14-224`` or ``aimv2-large-patch14-224-distilled``), from the Hugging Face cache,
        downloaded into it the first time (``HF_HUB_OFFLINE=1``: the cache only). ``revision`` pins a commit.

    checkpoint: a ``.safetensors`` file in Apple's, transformers', timm's or our layout, a transformers
        ``save_pretrained`` folder, or a training run folder (or a :class:`Checkpoint` already read); the
        layout is detected and every key must match (no silent partial load). ``name`` None takes the model
        from the checkpoint (our metadata, a config.json, a run's config, or the shapes of a named size).
    overrides: config fields, e.g. ``img_size=336`` (a learned position embedding is resized on load)
        or ``depth=6``.

    Without a checkpoint the weights are random (``init_weights``), as for pretraining from scratch.
    """
    if pretrained:
        if checkpoint is not None or name is None:
            raise ValueError("create_model(name, pretrained=True) takes a published name and no checkpoint")
        r, folder = fetch_release(name, revision=revision)
        model = create_model(r.model, checkpoint=folder, **overrides)
        model.mean_std = r.mean_std  # the release's normalization, for aimv2.weights.preprocessing
        return model
    if checkpoint is None:
        if name is None:
            raise ValueError("create_model needs a model name or a checkpoint")
        return build_encoder(name, **overrides)
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint)
    return encoder_from_checkpoint(ckpt, name, **overrides)


def encoder_config_of(spec: str | os.PathLike, **overrides) -> EncoderConfig | None:
    """The config of the encoder ``load_encoder(spec, **overrides)`` would give, read without its weights: from a model
    name, a run folder's ``config.yaml`` or a ``.safetensors`` file's metadata; None where only the weights tell
    (a transformers folder, a file without our metadata, a Hub repository, which would be downloaded)."""
    path = Path(spec)
    try:
        if is_hub_spec(spec):
            return None
        if is_run_folder(path):
            model = read_run(path).config.model
            return model_config(model.encoder, **{**model.encoder_overrides, **overrides})
        if path.is_file() and path.suffix == ".safetensors":
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
            return with_overrides(EncoderConfig(**json.loads(meta["config"])), overrides) if "config" in meta else None
        if path.exists():
            return None
        return model_config(str(spec), **overrides)
    except (ValueError, TypeError, KeyError, RunError, OSError):
        return None


def load_encoder(
    spec: str | os.PathLike, *, name: str | None = None, pretrained: bool = False, **overrides
) -> VisionEncoder:
    """An encoder from what a user types: a checkpoint file, a transformers folder, a run folder, a Hub
    repository (``hf:apple/aimv2-large-patch14-224[@REV]``), or a model name (random weights, with a warning;
    with ``pretrained`` Apple's published weights of that name). ``name`` states the model when the checkpoint
    cannot tell."""
    if is_hub_spec(spec):
        return create_model(name, checkpoint=fetch_spec(str(spec)), **overrides)
    if pretrained:
        return create_model(str(spec), pretrained=True, **overrides)
    if Path(spec).exists() or str(spec).endswith(".safetensors") or str(spec).endswith(PICKLE_SUFFIXES):
        return create_model(name, checkpoint=spec, **overrides)
    try:
        model = build_encoder(str(spec), **overrides)
    except ValueError as e:
        raise CheckpointError(f"{spec!r} is neither a checkpoint file or folder nor a model name: {e}") from e
    logger.warning("%s: no checkpoint given, the weights are random (untrained)", spec)
    return model
