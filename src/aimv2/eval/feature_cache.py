"""On-disk cache of frozen features, so probes (and their hyperparameter sweeps) run the encoder once per dataset.

A cache entry is a safetensors file named by a hash of everything the features depend on: the encoder's weights
(every state_dict tensor's bytes) and config, the data (the source's ``fingerprint()``: for files their path, size,
mtime and label), the transform's settings, the normalization, the blocks, pooling, the autocast dtype and the
storage dtype (fp32, or bf16 at half the size). Change any of them and the key changes; nothing is ever served
stale. Entries are written atomically (temporary file, then rename), so an interrupted run leaves no half file.

Location: ``--cache-dir``, else ``$AIMV2_CACHE/features``, else ``~/.cache/aimv2/features``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..data.sources.folders import ReadError
from ..data.transforms import mean_std as resolve_mean_std
from .features import UnreadableImagesWarning, describe_errors, extract_features

CACHE_FORMAT = "aimv2-features-v1"


def default_cache_dir() -> Path:
    root = os.environ.get("AIMV2_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "aimv2") / "features"


def weights_digest(module: nn.Module) -> str:
    """Hash of every state_dict entry's name, dtype, shape and bytes (blake2b: ~1 s per GB on one core)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in module.state_dict().items():
        for part, plain in _plain_tensors(name, t.detach()):
            h.update(f"{part}|{plain.dtype}|{tuple(plain.shape)}".encode())
            if not plain.is_meta:
                h.update(plain.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _plain_tensors(name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """``t``, or the plain tensors a tensor subclass is made of (torchao's int8 weights: their int8 data, scales
    and zero points), each named after its place and, for a subclass, its type and settings."""
    if not hasattr(t, "__tensor_flatten__"):
        return [(name, t)]
    inner, settings = t.__tensor_flatten__()
    prefix = f"{name}|{type(t).__qualname__}|{settings!r}"
    return [part for attr in inner for part in _plain_tensors(f"{prefix}.{attr}", getattr(t, attr))]


def encoder_description(encoder: nn.Module) -> dict:
    """The encoder's class and config: what, besides its weights, decides its features."""
    cfg = getattr(encoder, "cfg", None)
    config = cfg.to_dict() if hasattr(cfg, "to_dict") else repr(encoder)
    return {"class": f"{type(encoder).__module__}.{type(encoder).__qualname__}", "config": config}


def cache_key(
    encoder: nn.Module,
    dataset,
    *,
    mean_std,
    blocks,
    pool: str,
    dtype: str,
    block_reduce: str = "mean",
    store: str = "fp32",
) -> str:
    """Hex digest identifying the features of ``dataset`` under ``encoder`` and these settings."""
    if not hasattr(dataset, "fingerprint"):
        raise TypeError(f"{type(dataset).__name__} has no fingerprint(); the feature cache cannot key it")
    key = {
        "format": CACHE_FORMAT,
        "encoder": encoder_description(encoder),
        "weights": weights_digest(encoder),
        "images": dataset.fingerprint(),
        "transform": repr(getattr(dataset, "transform", None)),
        "mean_std": resolve_mean_std(mean_std),
        "blocks": list(blocks) if blocks is not None else None,
        "block_reduce": block_reduce if blocks is not None else None,
        "pool": pool,
        "dtype": dtype,
        "store": store,
    }
    blob = json.dumps(key, sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=20).hexdigest()


def _save_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(path: Path) -> dict | None:
    """A cache entry as extract_features' dict, or None if it is damaged (it is then recomputed, never trusted)."""
    try:
        tensors = load_file(path)
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        errors = [ReadError(p, e) for p, e in json.loads(meta.get("errors", "[]"))]
        return {
            "features": tensors["features"],
            "labels": tensors["labels"],
            "indices": tensors["indices"],
            "errors": errors,
        }
    except Exception:
        return None


def cached_features(
    encoder: nn.Module,
    dataset,
    *,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    blocks: Sequence[int] | None = None,
    pool: str = "none",
    dtype: str = "fp32",
    block_reduce: str = "mean",
    mean_std: str | tuple = "imagenet",
    store: str = "fp32",
    **extract_kwargs,
) -> dict:
    """:func:`extract_features`, served from the cache when the same features were computed before.

    Returns the dict of :func:`extract_features` plus ``cache_path`` (None when caching is off) and ``cached``
    (True when nothing was computed). A hit reports the unreadable images of the original run again.
    """
    settings = dict(blocks=blocks, pool=pool, dtype=dtype, block_reduce=block_reduce, mean_std=mean_std, store=store)
    if not use_cache:
        result = extract_features(encoder, dataset, **settings, **extract_kwargs)
        return {**result, "cache_path": None, "cached": False}
    key = cache_key(encoder, dataset, **settings)
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = path / f"{key}.safetensors"
    hit = _load(path) if path.is_file() else None
    if hit is not None:
        if hit["errors"]:
            warnings.warn(describe_errors(hit["errors"], len(dataset)), UnreadableImagesWarning, stacklevel=2)
        return {**hit, "cache_path": path, "cached": True}
    result = extract_features(encoder, dataset, **settings, **extract_kwargs)
    meta = {"format": CACHE_FORMAT, "errors": json.dumps([[e.path, e.error] for e in result["errors"]])}
    tensors = {k: result[k] for k in ("features", "labels", "indices")}
    _save_atomic(path, tensors, meta)
    return {**result, "cache_path": path, "cached": False}
