"""``aimv2 probe``: fit a probe on a frozen encoder's features of a train folder, report accuracy on a val folder."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .encoder_args import (
    add_encoder_arguments,
    add_native_arguments,
    encoder_from_args,
    feature_settings,
    parse_overrides,
    plain_warnings,
    resolve_device,
)

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
  aimv2 probe runs/tiny --train probe/train --val probe/val --runtime onnxruntime --dtype int8 --save p.safetensors
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
    parser.add_argument(
        "--save",
        metavar="PROBE.safetensors",
        help="keep the trained head as a classifier (with its class names, encoder and feature settings) for "
        "`aimv2 classify PROBE IMAGES`; attentive and linear probes",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --save file")
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


def run(args) -> int:
    from ..data.classnames import read_classnames
    from ..eval.probe import ProbeConfig
    from ..eval.probe_protocol import ProbeSettings, run_probe
    from ..eval.report import write_report

    if args.save and (args.method == "knn" or not args.save.endswith(".safetensors")):
        what = (
            "knn keeps no head: use --method linear or attentive"
            if args.method == "knn"
            else "must end in .safetensors"
        )
        print(f"aimv2 probe: error: --save {args.save}: {what}", file=sys.stderr)
        return 2
    if args.save and Path(args.save).exists() and not args.overwrite:
        raise ValueError(f"--save {args.save} exists; pass --overwrite to replace it, or choose another path")
    from ..weights.atomic import check_writable

    for flag, out in (("--save", args.save), ("--out", args.out)):  # before the features, not after the probe
        if out:
            check_writable(out, flag)
    cfg = ProbeConfig(
        method=args.method,
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.wd,
        batch_size=args.probe_batch_size,
        warmup_epochs=args.warmup_epochs,
        clip_grad=args.clip_grad,
        seed=args.seed,
        num_heads=args.heads,
        num_queries=args.queries,
        batchnorm=not args.no_bn,
        k=args.k,
        temperature=args.temperature,
    )
    settings = ProbeSettings(
        features=feature_settings(args),
        label_key=args.label_key,
        classnames=read_classnames(args.classnames) if args.classnames else None,
        image_column=args.image_column,
        label_column=args.label_column,
        cache_dir=args.cache_dir,
        use_cache=not args.no_cache,
        cache_dtype=args.cache_dtype,
        train_views=args.train_views,
        grid_lr=args.grid_lr,
        grid_wd=args.grid_wd,
        holdout=args.holdout,
    )
    device = resolve_device(args.device, args.runtime)
    with plain_warnings():
        result = run_probe(
            encoder_from_args(args),
            args.train,
            args.val,
            cfg,
            settings,
            device=device,
            progress=False if args.no_progress else None,
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )
    metrics = result.metrics
    metrics.update(encoder=args.encoder, checkpoint=args.checkpoint)
    print("\n".join(result.notes))
    top5 = f", top-5 {metrics['top5']:.2f}%" if "top5" in metrics else ""
    print(f"{args.method} probe: top-1 {metrics['top1']:.2f}%{top5} on {metrics['n_val']} val images")
    if args.out:
        png = write_report(args.out, result.report(), result.classes)
        print(f"report: {args.out} and {png}")
    if args.save:
        from ..eval.classifier import EncoderSpec, save_classifier

        spec = EncoderSpec(args.encoder, args.checkpoint, args.pretrained, parse_overrides(args.overrides),
                           getattr(args, "seed", 0))  # fmt: skip
        print(f"classifier: {save_classifier(args.save, result.head, result.classes, spec, settings.features)}")
    print(json.dumps(metrics))
    return 0
