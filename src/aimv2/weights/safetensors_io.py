"""Which files hold a checkpoint, and reading and writing them as safetensors.

A checkpoint is one ``.safetensors`` file, a folder of ours holding one (a run folder's ``encoder.safetensors``,
a LiT run's ``lit.safetensors``), or a transformers ``save_pretrained`` folder (``model.safetensors`` or a
sharded index, with its ``config.json``). Nothing here unpickles: ``.bin``/``.pt``/``.pth`` files are refused by
name, never opened, because loading a pickle can run code.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..data.records import read_json
from .atomic import atomic_write
from .errors import CheckpointError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def refuse_pickle(path: Path) -> None:
    """Raise for a pickle file, with the one-line conversion a user who trusts it can run themselves."""
    if path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: {path.suffix} files are pickles and we never unpickle them (loading one can run code). "
            'If you trust it, convert it yourself: python -c "import torch; from safetensors.torch import '
            f"save_file; save_file(torch.load('{path.name}', weights_only=True), '{path.stem}.safetensors')\""
        )


def checkpoint_files(
    path: Path, run_file: str = "encoder.safetensors", what: str = "run folder"
) -> tuple[list[Path], dict | None]:
    """The safetensors files that hold the checkpoint at ``path``, and its config.json if any.

    ``path`` is a file, a folder of ours holding ``run_file``, or a transformers folder (``model.safetensors`` or a
    sharded index). Pickles are refused by name, never opened."""
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_file():
        refuse_pickle(path)
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: expected a .safetensors file, a transformers folder or a {what}")
        return [path], None
    config = read_json(path / "config.json", "a transformers config.json") if (path / "config.json").is_file() else None
    for name in (run_file, "model.safetensors"):
        if (path / name).is_file():
            return [path / name], config
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "a transformers index of weight files")
        if not isinstance(weight_map, dict) or not isinstance(weight_map.get("weight_map"), dict):
            raise CheckpointError(f"no weight_map in {index}; give a transformers model.safetensors.index.json")
        shards = sorted(set(weight_map["weight_map"].values()))
        return [path / s for s in shards], config
    pickled = [p for p in sorted(path.iterdir()) if p.suffix in PICKLE_SUFFIXES]
    if pickled:
        refuse_pickle(pickled[0])
    raise CheckpointError(
        f"{path}: no {run_file} ({what}), model.safetensors or model.safetensors.index.json (transformers folder) in it"
    )


def read_safetensors(files: list[Path]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of ``files`` (the shards of one checkpoint) and the first file's metadata."""
    raw: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as sf:
                metadata = metadata or dict(sf.metadata() or {})
            raw.update(load_file(f))
        except Exception as e:  # safetensors raises its own error type for a corrupt header
            raise CheckpointError(
                f"not a readable safetensors file ({f}: {e}); check the file, it may be cut short or not safetensors"
            ) from e
    return raw, metadata


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """One safetensors file of CPU-contiguous copies of ``tensors``, atomically (a training run rewrites its
    ``encoder.safetensors`` while others may read it). ``"format": "pt"`` is added: transformers writes it, and
    its older versions refuse a file without it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", **metadata}))
    return path
