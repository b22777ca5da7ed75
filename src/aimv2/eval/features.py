"""Frozen-encoder features of an image dataset: batched, no grad, eval mode, optional bf16/fp16 autocast or int8.

Workers decode and resize to uint8; the main process moves uint8 batches to the device and normalizes there
(:func:`aimv2.data.transforms.normalize`). Features come back as float32 on the CPU, in dataset order, with the
unreadable images left out and reported.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..data.sources.folders import ReadError, collate_skip
from ..data.transforms import normalize
from ..data.workers import loader_workers
from ..errors import DataError
from .quantize import is_int8

# the autocast of the forward per inference dtype; int8 has none: its encoder's linear layers are int8 already
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": None}
STORE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # how features are kept (memory, cache files)
POOLS = ("none", "mean")
BLOCK_REDUCE = ("mean", "stack")


class UnreadableImagesWarning(UserWarning):
    """Some images could not be decoded; they were skipped and the run went on."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def describe_errors(errors: Sequence[ReadError], total: int, show: int = 10) -> str:
    """One message naming the unreadable files (the first ``show`` of them) and why."""
    lines = [f"{len(errors)} of {total} images could not be read and were skipped:"]
    lines += [f"  {e}" for e in errors[:show]]
    if len(errors) > show:
        lines.append(f"  ... and {len(errors) - show} more")
    return "\n".join(lines)


def encode(
    encoder: nn.Module,
    pixels: torch.Tensor,
    blocks: Sequence[int] | None = None,
    pool: str = "none",
    block_reduce: str = "mean",
) -> torch.Tensor:
    """Features of normalized pixels [B, 3, H, W].

    blocks: None for the encoder's output (last block, final norm); else block indices whose normalized outputs
        are averaged (``block_reduce="mean"``, as AIMv1's probes did) or stacked (``"stack"``) on dim 1.
    pool: ``"none"`` keeps the patch tokens [B, (K,) N, D]; ``"mean"`` averages them -> [B, (K,) D].
    """
    if blocks is None:
        feats = encoder(pixels)  # [B, N, D]
    else:
        outs = encoder.forward_features(pixels, blocks=list(blocks))  # K x [B, N, D]
        feats = torch.stack(outs, dim=1)  # [B, K, N, D]
        if block_reduce == "mean":
            feats = feats.float().mean(dim=1)  # [B, N, D]
    if pool == "mean":
        feats = feats.float().mean(dim=-2)  # [B, (K,) D]
    return feats


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    dtype: str = "fp32",
    blocks: Sequence[int] | None = None,
    pool: str = "none",
    block_reduce: str = "mean",
    mean_std: str | tuple = "imagenet",
    store: str = "fp32",
    progress: bool | None = None,
    desc: str = "features",
) -> dict:
    """Run ``encoder`` over ``dataset`` (samples ``(uint8 [3, H, W] | ReadError, label, index)``).

    dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast; weights stay as they are), or ``"int8"`` for an encoder
        quantized by :func:`aimv2.eval.quantize.for_inference` (a ValueError for one that is not: quantizing here
        would change the caller's model behind its back).
    store: ``"fp32"`` or ``"bf16"``: the dtype the features are kept in (bf16 halves the memory of patch tokens).
    progress: a tqdm bar on stderr; None shows it only when stderr is a terminal.
    Returns ``{"features": float32 (or bf16) [n, ...], "labels": long [n], "indices": long [n], "errors": [ReadError]}``
    where n counts the readable images and ``indices`` are their positions in ``dataset``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if dtype == "int8" and not (is_int8(encoder) or getattr(encoder, "is_int8", False) is True):
        raise ValueError(
            "dtype int8 needs an int8 encoder; quantize it first: aimv2.eval.quantize.for_inference(encoder, 'int8')"
        )
    if store not in STORE_DTYPES:
        raise ValueError(f"store must be one of {list(STORE_DTYPES)}, got {store!r}")
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    if block_reduce not in BLOCK_REDUCE:
        raise ValueError(f"block_reduce must be one of {BLOCK_REDUCE}, got {block_reduce!r}")
    device = default_device() if device is None else torch.device(device)
    progress = sys.stderr.isatty() if progress is None else progress
    total = len(dataset)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=loader_workers(num_workers, total, batch_size),
        collate_fn=collate_skip,
        pin_memory=device.type == "cuda",
    )
    was_training = encoder.training
    encoder.eval()
    out = labels = indices = None
    filled = 0
    errors: list[ReadError] = []
    try:
        with tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not progress, dynamic_ncols=True) as bar:
            for images, batch_labels, batch_indices, batch_errors in loader:
                errors += batch_errors
                if images is not None:
                    pixels = normalize(images, mean_std, device)  # float32 [B, 3, H, W]
                    with torch.autocast(device.type, dtype=DTYPES[dtype], enabled=DTYPES[dtype] is not None):
                        feats = encode(encoder, pixels, blocks, pool, block_reduce)
                    feats = feats.float().cpu()  # [B, ...]
                    if out is None:  # preallocate once the feature shape is known
                        out = torch.empty(total, *feats.shape[1:], dtype=STORE_DTYPES[store])
                        labels = torch.empty(total, dtype=torch.long)
                        indices = torch.empty(total, dtype=torch.long)
                    b = feats.shape[0]
                    out[filled : filled + b] = feats
                    labels[filled : filled + b] = batch_labels
                    indices[filled : filled + b] = batch_indices
                    filled += b
                bar.update(len(batch_labels) + len(batch_errors))
    finally:
        encoder.train(was_training)
    if out is None:  # the error says it all: no warning listing the same files first
        raise _nothing_readable(errors, total)
    if errors:
        warnings.warn(describe_errors(errors, total), UnreadableImagesWarning, stacklevel=2)
    if filled < total:  # copy so the result does not keep the unused tail alive
        out, labels, indices = out[:filled].clone(), labels[:filled].clone(), indices[:filled].clone()
    return {"features": out, "labels": labels, "indices": indices, "errors": errors}


def _nothing_readable(errors: list[ReadError], total: int) -> DataError:
    if not total:
        return DataError("no images to read; check the folder or dataset given")
    first = errors[0] if errors else None
    where = f"first: {first.path}: {first.error}" if first is not None else "no readable file"
    return DataError(f"none of the {total} images could be read ({where}); check that the files are images")


def native_shape_groups(paths: Sequence, max_patches: int, patch_size: int) -> dict[tuple[int, int], list[int]]:
    """{patch grid: dataset indices} of image files resized by :class:`~aimv2.data.transforms.NativeResize`,
    from the files' headers (no decoding). Unreadable files go to grid (0, 0): their batch reports them."""
    from PIL import Image

    from ..data.transforms import native_grid

    groups: dict[tuple[int, int], list[int]] = {}
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as img:
                W, H = img.size
            grid = native_grid((H, W), max_patches, patch_size)
        except Exception:  # noqa: BLE001 - any unreadable file: the reader names the reason later
            grid = (0, 0)
        groups.setdefault(grid, []).append(i)
    return groups


def extract_native_features(encoder: nn.Module, dataset: Dataset, groups: dict, **kw) -> dict:
    """:func:`extract_features` over images of different grids (native resolution): one pass per grid (batches
    share one shape), results back in dataset order. ``features`` is a tensor [n, (K,) D] when pooled, else a
    list of n tensors [N_i, D] (N_i the image's own number of patches); ``grids`` long [n, 2] per image."""
    from torch.utils.data import Subset

    feats, labels, indices, grids, errors = [], [], [], [], []
    total = len(dataset)
    for grid, idx in sorted(groups.items()):
        with warnings.catch_warnings():  # one warning for the whole dataset below
            warnings.simplefilter("ignore", UnreadableImagesWarning)
            try:
                r = extract_features(encoder, Subset(dataset, idx), **kw)
            except DataError:
                if grid != (0, 0):
                    raise
                r = None
        if r is None:  # a group of only unreadable files
            errors += [dataset[i][0] for i in idx]
            continue
        errors += r["errors"]
        feats += list(r["features"].unbind(0))
        labels.append(r["labels"])
        indices.append(r["indices"])  # the samples carry their dataset index
        grids += [grid] * len(r["labels"])
    if not feats:
        raise _nothing_readable(errors, total)
    if errors:
        warnings.warn(describe_errors(errors, total), UnreadableImagesWarning, stacklevel=2)
    order = torch.cat(indices).argsort()
    feats = [feats[i] for i in order.tolist()]
    pooled = feats[0].ndim == 1 or kw.get("pool") == "mean"
    return {
        "features": torch.stack(feats) if pooled else feats,
        "labels": torch.cat(labels)[order],
        "indices": torch.cat(indices)[order],
        "grids": torch.tensor(grids, dtype=torch.long)[order],
        "errors": errors,
    }
