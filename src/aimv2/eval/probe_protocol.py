"""The probe protocol of the AIMv2 paper end to end: a frozen encoder and a labelled train and val source in, top-1
out. ``aimv2 probe`` is this function behind an argument parser; the demo and the ablations call it directly.

The steps, in order:
  1. open both sources (image folders, shards, HF datasets) with the encoder's evaluation transform, or the
     aspect-keeping native resize, and check they name the same classes;
  2. compute each source's features once, served from the on-disk cache when the same weights, data, transform and
     settings were seen before (native grids differ per image and are computed each time);
  3. optionally add seeded augmented views of every training image (never cached: they are the point);
  4. optionally choose lr x weight decay on a stratified held-out part of train: val never takes part;
  5. fit the head on all of train and score val once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..data.transforms import TrainTransform
from .datasets import AugmentedViews, align_classes, open_labeled_source
from .feature_cache import cached_features
from .features import STORE_DTYPES, default_device, extract_features, extract_native_features, native_shape_groups
from .frozen_encoder import FeatureSettings, feature_transform, image_size
from .probe import ProbeConfig, grid_search, probe_features, stratified_split


@dataclass
class ProbeSettings:
    """Everything about a probe run except the head's hyperparameters (those are :class:`ProbeConfig`)."""

    features: FeatureSettings = field(default_factory=FeatureSettings)
    # sources: where a shard's label is (cls, or json:NAME), the names of integer labels, HF dataset columns
    label_key: str = "cls"
    classnames: list[str] | None = None
    image_column: str = "image"
    label_column: str = "label"
    # the feature cache, and the dtype features are kept in (bf16 halves the attentive probe's patch tokens)
    cache_dir: str | None = None
    use_cache: bool = True
    cache_dtype: str = "fp32"
    # augmented views added to the training set: N random resized crops + flips per image, seeded by the probe seed
    train_views: int = 0
    # lr x wd grid scored on a held-out fraction of each training class; None: the ProbeConfig's value only
    grid_lr: list[float] | None = None
    grid_wd: list[float] | None = None
    holdout: float = 0.1


@dataclass
class ProbeResult:
    """What a probe run measured. ``metrics`` is the JSON object ``aimv2 probe`` prints last: top1, top5 (5 classes
    or more), per_class (class name -> percent), method, n_train, n_val, num_classes, the hyperparameters used, how
    they were chosen, the feature settings and timings."""

    metrics: dict
    classes: list[str]
    confusion: list[list[int]]  # [C, C] counts, rows true class, columns predicted
    grid: list[dict] | None  # one row per (lr, weight_decay) tried, with its held-out top-1; None without a grid
    notes: list[str]  # readable lines: the classes, and per split the feature shape and whether it was cached
    head: nn.Module | None = None  # the trained head (eval mode, CPU); None for knn

    @property
    def top1(self) -> float:
        return self.metrics["top1"]

    def report(self) -> dict:
        """The full report (:func:`aimv2.eval.report.write_report` writes it): metrics, classes, grid, confusion."""
        return {**self.metrics, "classes": self.classes, "grid": self.grid, "confusion": self.confusion}


def check_probe(cfg: ProbeConfig, settings: ProbeSettings) -> None:
    """ValueError for combinations the protocol cannot run, before any work is done."""
    if cfg.method == "knn" and (settings.grid_lr or settings.grid_wd):
        raise ValueError("--grid-lr / --grid-wd tune the attentive and linear probes; knn has no lr or wd")
    if cfg.method != "knn" and cfg.epochs < 1:  # 0 epochs: a head that never trained, reported as a score
        raise ValueError(f"--epochs must be >= 1 for a {cfg.method} probe, got {cfg.epochs}")
    if cfg.method == "knn" and cfg.k < 1:
        raise ValueError(f"--k must be >= 1 neighbour, got {cfg.k}")
    if settings.train_views < 0:
        raise ValueError(f"--train-views must be >= 0, got {settings.train_views}")
    if settings.features.native and (cfg.method == "attentive" or settings.train_views):
        raise ValueError(
            "--native probes mean-pooled features (--method linear or knn, no --train-views): the attentive "
            "head would need per-image token masks for images with different numbers of patches"
        )


def run_probe(
    encoder: nn.Module,
    train: str,
    val: str,
    cfg: ProbeConfig | None = None,
    settings: ProbeSettings | None = None,
    *,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> ProbeResult:
    """Probe frozen ``encoder`` on the labelled sources ``train`` and ``val`` (paths or patterns; the kind is
    detected). ``cfg.num_heads`` None means the trunk's head count. ``log`` receives the grid's lines as they come.
    User errors (bad sources, impossible settings) raise ValueError or FileNotFoundError.
    """
    cfg = cfg or ProbeConfig()
    settings = settings or ProbeSettings()
    fs = settings.features
    check_probe(cfg, settings)
    if cfg.num_heads is None:
        cfg = replace(cfg, num_heads=getattr(getattr(encoder, "cfg", None), "num_heads", 8))
    transform = feature_transform(encoder, fs)
    source_kw = dict(
        label_key=settings.label_key,
        classnames=settings.classnames,
        image_column=settings.image_column,
        label_column=settings.label_column,
    )
    train_ds = open_labeled_source(train, transform, **source_kw)
    val_ds = open_labeled_source(val, transform, **source_kw)
    classes = align_classes(train_ds, val_ds)
    if fs.native and not all(hasattr(d, "paths") for d in (train_ds, val_ds)):
        raise ValueError("--native reads image folders (class sub-folders), not shards or HF datasets")
    device = default_device() if device is None else torch.device(device)
    notes = [f"classes: {len(classes)}; train images: {len(train_ds)}; val images: {len(val_ds)}"]

    encoder.to(device)
    t0 = time.perf_counter()
    extract = dict(
        blocks=fs.blocks,
        pool="none" if cfg.method == "attentive" else "mean",
        dtype=fs.dtype,
        mean_std=fs.mean_std,
        batch_size=fs.batch_size,
        num_workers=fs.num_workers,
        device=device,
        progress=progress,
    )
    feats = {
        split: _split_features(encoder, ds, split, settings, extract, notes)
        for split, ds in (("train", train_ds), ("val", val_ds))
    }
    x, y, ids = feats["train"]["features"], feats["train"]["labels"], feats["train"]["indices"]
    if settings.train_views:  # each row keeps its source image, so a held-out image takes all its views with it
        views_ds = AugmentedViews(train_ds, TrainTransform(image_size(encoder, fs)), settings.train_views, cfg.seed)
        views = extract_features(encoder, views_ds, desc="train views", store=settings.cache_dtype, **extract)
        n_views = settings.train_views
        notes.append(f"train views: {list(views['features'].shape)} computed ({n_views} per image, not cached)")
        all_x = torch.cat([x, views["features"].to(x.dtype)])
        all_y = torch.cat([y, views["labels"]])
        all_ids = torch.cat([ids, views["indices"] % len(train_ds)])
    else:
        all_x, all_y, all_ids = x, y, ids
    t1 = time.perf_counter()
    encoder.cpu()

    grid, selection = None, {"hparams_from": "command line"}
    if settings.grid_lr or settings.grid_wd:
        plain, rows = (x, y, ids), (all_x, all_y, all_ids)
        cfg, grid, selection = _choose_hparams(cfg, settings, plain, rows, len(classes), device, progress, log)
    result = probe_features(all_x, all_y, feats["val"]["features"], feats["val"]["labels"], len(classes), cfg, device,
                            progress=progress, keep_head=True)  # fmt: skip
    t2 = time.perf_counter()

    confusion, head = result.pop("confusion"), result.pop("head")
    result["per_class"] = dict(zip(classes, result["per_class"], strict=True))
    result.update(selection)
    result.update(
        img_size=image_size(encoder, fs),
        native=fs.native,
        max_patches=fs.max_patches if fs.native else None,
        mean_std=fs.mean_std,
        blocks=fs.blocks,
        dtype=fs.dtype,
        cache_dtype=settings.cache_dtype,
        train_views=settings.train_views,
        skipped_train=len(feats["train"]["errors"]) + len(getattr(train_ds, "skipped", [])),
        skipped_val=len(feats["val"]["errors"]) + len(getattr(val_ds, "skipped", [])),
        features_seconds=round(t1 - t0, 3),
        probe_seconds=round(t2 - t1, 3),
    )
    return ProbeResult(metrics=result, classes=classes, confusion=confusion, grid=grid, notes=notes, head=head)


def _split_features(encoder: nn.Module, dataset, split: str, settings: ProbeSettings, extract: dict, notes: list):
    """Features of one source: cached center crops, or per-image native grids (batched by shape, mean-pooled)."""
    fs = settings.features
    if fs.native:
        groups = native_shape_groups(dataset.paths, fs.max_patches, encoder.cfg.patch_size)
        f = extract_native_features(encoder, dataset, groups, desc=f"features {split}", **extract)
        f["features"] = f["features"].to(STORE_DTYPES[settings.cache_dtype])
        shape = list(f["features"].shape)
        notes.append(f"{split} features: {shape} native, {len(groups)} grids, computed (not cached)")
        return f
    f = cached_features(encoder, dataset, cache_dir=settings.cache_dir, use_cache=settings.use_cache,
                        store=settings.cache_dtype, desc=f"features {split}", **extract)  # fmt: skip
    how = f"cached ({f['cache_path']})" if f["cached"] else "computed"
    notes.append(f"{split} features: {list(f['features'].shape)} {f['features'].dtype} {how}")
    return f


def _choose_hparams(cfg: ProbeConfig, settings: ProbeSettings, plain: tuple, rows: tuple, num_classes: int, device,
                    progress, log) -> tuple[ProbeConfig, list[dict], dict]:  # fmt: skip
    """The grid: every (lr, wd) trained on train minus a stratified held-out part (``rows``: the center crops and
    views, with their source image ids), scored on the held-out center crops (``plain``); returns ``cfg`` with the
    best pair (ties: lower lr), the grid table and how the pair was chosen."""
    (x, y, ids), (all_x, all_y, all_ids) = plain, rows
    lrs, wds = settings.grid_lr or [cfg.lr], settings.grid_wd or [cfg.weight_decay]
    log = log or (lambda line: None)
    _, held = stratified_split(y, settings.holdout, cfg.seed)
    fit_rows = ~torch.isin(all_ids, ids[held])
    log(
        f"grid: {len(lrs)} lr x {len(wds)} wd, trained on {int(fit_rows.sum())} train rows, scored on "
        f"{held.numel()} held-out train images ({settings.holdout:g} of each class, seed {cfg.seed}); val unused"
    )
    best, grid = grid_search(all_x[fit_rows], all_y[fit_rows], x[held], y[held], num_classes, cfg, lrs, wds, device,
                             progress=progress, log=log)  # fmt: skip
    best_top1 = max(r["holdout_top1"] for r in grid)
    log(f"chosen: lr {best['lr']:g}, wd {best['weight_decay']:g} (held-out top-1 {best_top1:.2f}%)")
    selection = {
        "hparams_from": "grid on held-out train",
        "grid_lr": lrs,
        "grid_wd": wds,
        "holdout": settings.holdout,
        "holdout_top1": best_top1,
    }
    return replace(cfg, lr=best["lr"], weight_decay=best["weight_decay"]), grid, selection
