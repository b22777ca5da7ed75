"""Weights: everything that reads or writes model weights, so that ``aimv2.models`` stays free of I/O.

Getting a model:

- ``create_model(name, *, checkpoint=None, pretrained=False, revision=None, **overrides)``: the vision encoder,
  random, with the weights of a checkpoint in any layout (Apple, transformers, timm, ours; file, transformers
  folder or run folder), or with Apple's published weights of that name (``RELEASES``, through the Hub cache).
- ``load_encoder(spec, *, name=None, **overrides)``: the command line's ENCODER: a model name, a checkpoint
  file or folder, or a run folder in one string.
- ``load_lit(path, config=None)``: a LiT model (Apple's LiT file, transformers ``Aimv2Model``, ours);
  ``read_lit`` reads it without building, for the metadata beside the weights.

Feeding it: ``preprocessing(model_or_name)`` is the evaluation transform of an encoder (resize, crop, mean/std,
native mode), also written as a transformers ``preprocessor_config.json`` by ``export_hf``.

Writing: ``save_encoder`` (one safetensors file in a layout), ``export_hf`` (a transformers folder),
``convert_checkpoint`` (a file in another layout, bits unchanged), ``save_lit`` / ``export_hf_lit`` / ``convert_lit``.

Run folders: ``read_run`` gives a run's config, tokenizer file and latest step checkpoint (encoder and decoder
weights); the checkpoint naming (``CKPT_DIR``, ``list_checkpoints``) and ``atomic_write`` are in its modules.

Module map: ``keymaps`` (the layouts as data), ``layout`` (detection, conversion), ``safetensors_io`` (files,
pickle refusal), ``hf_config`` (config.json), ``resolve`` (shapes -> config, strict loading), ``encoders``,
``export``, ``lit``, ``released`` (Apple's Hub repositories, as data), ``hub`` (fetching them), ``run_folder``,
``atomic``, ``errors``.
"""

from .encoders import create_model, encoder_config_of, load_encoder, read_checkpoint
from .errors import CheckpointError, RunError
from .export import convert_checkpoint, export_hf, save_encoder
from .hub import download
from .keymaps import LAYOUTS
from .layout import convert_state_dict, detect_layout
from .lit import LIT_FILE, LiTCheckpoint, convert_lit, export_hf_lit, load_lit, read_lit, save_lit
from .preprocessing import Preprocessing, preprocessing
from .pretraining_run import PretrainedRun, load_pretraining_run
from .released import RELEASES, Release
from .resolve import Checkpoint
from .run_folder import RunFolder, TrainingState, is_run_folder, read_run

__all__ = [
    "LAYOUTS",
    "LIT_FILE",
    "Checkpoint",
    "CheckpointError",
    "LiTCheckpoint",
    "Preprocessing",
    "PretrainedRun",
    "RELEASES",
    "Release",
    "RunError",
    "RunFolder",
    "TrainingState",
    "convert_checkpoint",
    "convert_lit",
    "convert_state_dict",
    "create_model",
    "detect_layout",
    "download",
    "export_hf",
    "export_hf_lit",
    "is_run_folder",
    "encoder_config_of",
    "load_encoder",
    "load_lit",
    "load_pretraining_run",
    "preprocessing",
    "read_checkpoint",
    "read_lit",
    "read_run",
    "save_encoder",
    "save_lit",
]
