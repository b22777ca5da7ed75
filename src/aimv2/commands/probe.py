"""``aimv2 probe``: fit a probe on a frozen encoder's features of a train folder, report accuracy on a val folder."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace

from ._features_args import (
    add_encoder_arguments,
    add_native_arguments,
    encoder_img_size,
    load_encoder_from_args,
    native_transform,
    plain_warnings,
    resolve_device,
)

HELP = "train a probe on frozen features and report top-1"

DESCRIPTION = """Measure how well a frozen encoder's features classify images: the protocol of the AIMv2 paper.

--train and --val are labelled image sources of one of three kinds, detected from the path:
  image folder    one sub-folder per class: train/cat/*.jpg, train/dog/*.jpg, ...
  webdataset      a .tar file, a brace pattern (shards/{000..009}.tar) or a folder of .tar files; a sample's
                  label is its .cls member (integer text, webdataset's convention) or --label-key, e.g.
                  json:label for a key of its .json member (integers, or class names as text)
  HF datasets     a save_to_disk folder (one split: DIR/train, not DIR), or .parquet / .arrow files (a file, a
                  folder of them, or a quoted glob); --image-column and --label-column name the columns
Class names: a ClassLabel column's names; else --classnames FILE (one name per line, line c names label c);
else the sub-folder names, the text labels, or "0".."max" for integer labels. Train and val must agree.
Unreadable images (and samples without an image or a label) are skipped, counted and named on stderr.

The encoder runs once per source; its features are cached on disk (--cache-dir, else $AIMV2_CACHE/features,
else ~/.cache/aimv2/features) under a key covering the weights, the data, the preprocessing and the settings, so
probing again with other hyperparameters, or another grid, skips the encoder.

methods:
  attentive  the paper's probe: non-affine BatchNorm on the patch tokens, one learned query (no q projection)
             attending through bias-free k and v with as many heads as the trunk, linear classifier.
             AdamW (0.9, 0.999), cosine schedule with warmup, gradient clipping 3.0.
  linear     mean of the patch tokens -> non-affine BatchNorm -> linear classifier, same optimizer.
  knn        cosine k-nearest neighbours (k=20) on mean-pooled features, votes weighted exp(sim / T).

The attentive probe caches every patch token: n x N x D float32 on disk and in memory (10k images through
ViT-L/14 at 224 px: about 10 GB); --cache-dtype bf16 halves that. linear and knn keep one vector per image.

Hyperparameters: the paper sweeps lr in {5e-5 ... 2e-3} and wd in {0.05, 0.1}. --grid-lr / --grid-wd train
every pair on the train source minus a stratified held-out part (--holdout, seeded by --seed), pick the best
held-out top-1 (ties: lower lr), retrain it on all of train and score val once. Val never takes part in the
choice. The grid prints on stderr.

Output: readable lines, then as the LAST line of stdout one JSON object with top1, top5 (5 classes or more;
percent), per_class (class -> percent), method, n_train, n_val and the hyperparameters used (lr, weight_decay,
...). --out REPORT.json also writes the grid table and the confusion matrix, and REPORT.png (the matrix).

examples:
  aimv2 probe runs/tiny --train probe/train --val probe/val
  aimv2 probe aimv2-large-patch14-224 --checkpoint model.safetensors --train in1k/train --val in1k/val --bf16 \\
      --cache-dtype bf16
  aimv2 probe runs/tiny --train 'shards/train-{000..015}.tar' --val shards/val.tar --classnames classes.txt
  aimv2 probe runs/tiny --train shards/train/ --val shards/val/ --label-key json:label
  aimv2 probe runs/tiny --train hf/food/train --val hf/food/validation --image-column img --label-column label
  aimv2 probe runs/tiny --train 'parquet/train-*.parquet' --val parquet/val.parquet --method knn
  aimv2 probe runs/tiny --train probe/train --val probe/val --grid-lr 5e-5,1e-4,2e-4,5e-4,1e-3,2e-3 \\
      --grid-wd 0.05,0.1 --holdout 0.1 --train-views 2 --out reports/tiny.json
"""


def float_list(kind: str, minimum: float, inclusive: bool):
    """argparse type: comma-separated numbers, each >= (or >) ``minimum``."""

    def parse(text: str) -> list[float]:
        values = []
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            try:
                v = float(part)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{kind}: {part!r} is not a number (in {text!r})") from None
            if not math.isfinite(v) or v < minimum or (v == minimum and not inclusive):
                bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
                raise argparse.ArgumentTypeError(f"{kind}: {part} must be {bound}")
            values.append(v)
        if not values:
            raise argparse.ArgumentTypeError(f"{kind}: no value in {text!r}")
        return sorted(set(values))

    return parse


def fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return v


def add_arguments(parser) -> None:
    parser.add_argument("encoder", metavar="ENCODER", help="model name, checkpoint file, HF folder or run folder")
    parser.add_argument("--train", required=True, metavar="SRC", help="training images: class folders, shards or HF")
    parser.add_argument("--val", required=True, metavar="SRC", help="validation images, same kinds, same classes")
    parser.add_argument(
        "--method", choices=("attentive", "linear", "knn"), default="attentive", help="(default: attentive)"
    )
    parser.add_argument("--out", metavar="REPORT.json", help="write a JSON report and a confusion-matrix PNG beside it")
    s = parser.add_argument_group("sources (shards and Hugging Face datasets)")
    s.add_argument(
        "--label-key",
        default="cls",
        help="shards: the label member, an extension (cls) or json:NAME for a key of the .json (default: cls)",
    )
    s.add_argument("--classnames", metavar="FILE", help="class names, one per line; line c names label c")
    s.add_argument("--image-column", default="image", help="HF datasets: the image column (default: image)")
    s.add_argument("--label-column", default="label", help="HF datasets: the label column (default: label)")
    p = parser.add_argument_group("probe training (attentive, linear)")
    p.add_argument("--epochs", type=int, default=50, help="passes over the cached features (default: 50)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    p.add_argument("--wd", type=float, default=0.1, help="AdamW weight decay (default: 0.1)")
    p.add_argument("--probe-batch-size", type=int, default=256, help="(default: 256)")
    p.add_argument("--warmup-epochs", type=float, default=5.0, help="linear warmup before the cosine (default: 5)")
    p.add_argument("--clip-grad", type=float, default=3.0, help="gradient norm clip, 0 for none (default: 3.0)")
    p.add_argument("--heads", type=int, help="attention heads of the attentive head (default: the trunk's)")
    p.add_argument("--queries", type=int, default=1, help="learned queries, averaged (default: 1)")
    p.add_argument("--no-bn", action="store_true", help="no BatchNorm on the features")
    p.add_argument(
        "--seed", type=int, default=0, help="seeds the head's init, the batch order, the held-out split and the views"
    )
    g = parser.add_argument_group("hyperparameter grid (selected on held-out train, never on val)")
    g.add_argument(
        "--grid-lr",
        type=float_list("--grid-lr", 0.0, False),
        metavar="LRS",
        help="comma-separated learning rates to try, e.g. 5e-5,1e-4,2e-4,5e-4,1e-3,2e-3 (default: --lr only)",
    )
    g.add_argument(
        "--grid-wd",
        type=float_list("--grid-wd", 0.0, True),
        metavar="WDS",
        help="comma-separated weight decays to try, e.g. 0.05,0.1 (default: --wd only)",
    )
    g.add_argument(
        "--holdout",
        type=fraction,
        default=0.1,
        help="fraction of each training class held out to score the grid (default: 0.1)",
    )
    g.add_argument(
        "--train-views",
        type=int,
        default=0,
        metavar="N",
        help="add N augmented views (random resized crop + flip, seeded by --seed) of every training image to its "
        "center crop; their features are computed each run, NOT cached (default: 0)",
    )
    k = parser.add_argument_group("knn")
    k.add_argument("--k", type=int, default=20, help="neighbours (default: 20)")
    k.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(sim / T) (default: 0.07)")
    c = parser.add_argument_group("feature cache")
    c.add_argument("--cache-dir", help="where cached features live (default: $AIMV2_CACHE/features or ~/.cache/...)")
    c.add_argument("--no-cache", action="store_true", help="neither read nor write cached features")
    c.add_argument(
        "--cache-dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="dtype features are kept in, in memory and on disk; bf16 halves the attentive probe's tokens "
        "(default: fp32)",
    )
    n = parser.add_argument_group("native resolution (linear and knn probes on image folders)")
    add_native_arguments(n)
    add_encoder_arguments(parser)


def _datasets(args, transform):
    from ..data.classnames import read_classnames
    from ..eval.datasets import align_classes, open_labeled_source

    classnames = read_classnames(args.classnames) if args.classnames else None
    kw = dict(
        label_key=args.label_key,
        classnames=classnames,
        image_column=args.image_column,
        label_column=args.label_column,
    )
    train = open_labeled_source(args.train, transform, **kw)
    val = open_labeled_source(args.val, transform, **kw)
    classes = align_classes(train, val)
    return train, val, classes


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run(args) -> int:
    import torch

    from ..data.transforms import TrainTransform, eval_transform
    from ..eval.datasets import AugmentedViews
    from ..eval.feature_cache import cached_features
    from ..eval.features import STORE_DTYPES, extract_features, extract_native_features, native_shape_groups
    from ..eval.probe import ProbeConfig, grid_search, run_probe, stratified_split

    try:
        if args.method == "knn" and (args.grid_lr or args.grid_wd):
            raise ValueError("--grid-lr / --grid-wd tune the attentive and linear probes; knn has no lr or wd")
        if args.train_views < 0:
            raise ValueError(f"--train-views must be >= 0, got {args.train_views}")
        encoder = load_encoder_from_args(args)
        img_size = encoder_img_size(encoder, args.img_size)
        transform = eval_transform(img_size, crop_pct=args.crop_pct)
        if args.native:
            if args.method == "attentive" or args.train_views:
                raise ValueError(
                    "--native probes mean-pooled features (--method linear or knn, no --train-views): the attentive "
                    "head would need per-image token masks for images with different numbers of patches"
                )
            transform = native_transform(encoder, args)
        with plain_warnings():
            train, val, classes = _datasets(args, transform)
        if args.native and not all(hasattr(d, "paths") for d in (train, val)):
            raise ValueError("--native reads image folders (class sub-folders), not shards or HF datasets")
        heads = args.heads or getattr(getattr(encoder, "cfg", None), "num_heads", 8)
        cfg = ProbeConfig(
            method=args.method,
            epochs=args.epochs,
            lr=args.lr,
            weight_decay=args.wd,
            batch_size=args.probe_batch_size,
            warmup_epochs=args.warmup_epochs,
            clip_grad=args.clip_grad,
            seed=args.seed,
            num_heads=heads,
            num_queries=args.queries,
            batchnorm=not args.no_bn,
            k=args.k,
            temperature=args.temperature,
        )
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"aimv2 probe: error: {e}", file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    encoder.to(device)
    dtype = "bf16" if args.bf16 else "fp32"
    progress = False if args.no_progress else None
    print(f"classes: {len(classes)}; train images: {len(train)}; val images: {len(val)}")
    settings = dict(
        blocks=args.blocks,
        pool="none" if args.method == "attentive" else "mean",
        dtype=dtype,
        mean_std=args.mean_std,
        store=args.cache_dtype,
        batch_size=args.batch_size,
        num_workers=args.workers,
        device=device,
        progress=progress,
    )
    feats = {}
    t0 = time.perf_counter()
    with plain_warnings():
        for split, dataset in (("train", train), ("val", val)):
            if args.native:  # per-image grids: batches grouped by shape, features mean-pooled, not cached
                groups = native_shape_groups(dataset.paths, args.max_patches, encoder.cfg.patch_size)
                nat = {k: v for k, v in settings.items() if k != "store"}
                f = extract_native_features(encoder, dataset, groups, desc=f"features {split}", **nat)
                f["features"] = f["features"].to(STORE_DTYPES[args.cache_dtype])
                feats[split] = f
                shapes = len(groups)
                print(f"{split} features: {list(f['features'].shape)} native, {shapes} grids, computed (not cached)")
                continue
            f = cached_features(
                encoder, dataset, cache_dir=args.cache_dir, use_cache=not args.no_cache, desc=f"features {split}",
                **settings,
            )  # fmt: skip
            feats[split] = f
            how = f"cached ({f['cache_path']})" if f["cached"] else "computed"
            print(f"{split} features: {list(f['features'].shape)} {f['features'].dtype} {how}")
        views = None
        if args.train_views:
            augment = TrainTransform(img_size)
            views = extract_features(
                encoder, AugmentedViews(train, augment, args.train_views, args.seed), desc="train views", **settings
            )
            print(f"train views: {list(views['features'].shape)} computed ({args.train_views} per image, not cached)")
    t1 = time.perf_counter()
    encoder.cpu()

    plain_x, plain_y, plain_ids = feats["train"]["features"], feats["train"]["labels"], feats["train"]["indices"]
    if views is not None:  # every row's source image, so a held-out image takes all its views with it
        all_x = torch.cat([plain_x, views["features"].to(plain_x.dtype)])
        all_y = torch.cat([plain_y, views["labels"]])
        all_ids = torch.cat([plain_ids, views["indices"] % len(train)])
    else:
        all_x, all_y, all_ids = plain_x, plain_y, plain_ids
    grid, selection = None, {"hparams_from": "command line"}
    if args.grid_lr or args.grid_wd:
        lrs, wds = args.grid_lr or [args.lr], args.grid_wd or [args.wd]
        try:
            keep, held = stratified_split(plain_y, args.holdout, args.seed)
        except ValueError as e:
            print(f"aimv2 probe: error: {e}", file=sys.stderr)
            return 2
        held_ids = plain_ids[held]
        fit_rows = ~torch.isin(all_ids, held_ids)
        _log(
            f"grid: {len(lrs)} lr x {len(wds)} wd, trained on {int(fit_rows.sum())} train rows, scored on "
            f"{held.numel()} held-out train images ({args.holdout:g} of each class, seed {args.seed}); val unused"
        )
        best, grid = grid_search(
            all_x[fit_rows], all_y[fit_rows], plain_x[held], plain_y[held], len(classes), cfg, lrs, wds,
            device, progress=progress, log=_log,
        )  # fmt: skip
        best_top1 = max(r["holdout_top1"] for r in grid)
        _log(f"chosen: lr {best['lr']:g}, wd {best['weight_decay']:g} (held-out top-1 {best_top1:.2f}%)")
        cfg = replace(cfg, lr=best["lr"], weight_decay=best["weight_decay"])
        selection = {
            "hparams_from": "grid on held-out train",
            "grid_lr": lrs,
            "grid_wd": wds,
            "holdout": args.holdout,
            "holdout_top1": best_top1,
        }
    result = run_probe(all_x, all_y, feats["val"]["features"], feats["val"]["labels"], len(classes), cfg, device,
                       progress=progress)  # fmt: skip
    t2 = time.perf_counter()
    confusion = result.pop("confusion")
    result["per_class"] = dict(zip(classes, result["per_class"], strict=True))
    top5 = f", top-5 {result['top5']:.2f}%" if "top5" in result else ""
    print(f"{args.method} probe: top-1 {result['top1']:.2f}%{top5} on {result['n_val']} val images")
    result.update(selection)
    result.update(
        encoder=args.encoder,
        checkpoint=args.checkpoint,
        img_size=img_size,
        native=args.native,
        max_patches=args.max_patches if args.native else None,
        mean_std=args.mean_std,
        blocks=args.blocks,
        dtype=dtype,
        cache_dtype=args.cache_dtype,
        train_views=args.train_views,
        skipped_train=len(feats["train"]["errors"]) + len(getattr(train, "skipped", [])),
        skipped_val=len(feats["val"]["errors"]) + len(getattr(val, "skipped", [])),
        features_seconds=round(t1 - t0, 3),
        probe_seconds=round(t2 - t1, 3),
    )
    if args.out:
        from ..eval.report import write_report

        report = {**result, "classes": classes, "grid": grid, "confusion": confusion}
        png = write_report(args.out, report, classes)
        print(f"report: {args.out} and {png}")
    print(json.dumps(result))
    return 0
