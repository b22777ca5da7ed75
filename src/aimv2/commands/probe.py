"""``aimv2 probe``: fit a probe on a frozen encoder's features of a train folder, report accuracy on a val folder."""

from __future__ import annotations

import json
import sys
import time

from ._features_args import (
    add_encoder_arguments,
    encoder_img_size,
    load_encoder_from_args,
    plain_warnings,
    resolve_device,
)

HELP = "train a probe on frozen features and report top-1"

DESCRIPTION = """Measure how well a frozen encoder's features classify images: the protocol of the AIMv2 paper.

--train and --val are image folders with one sub-folder per class (train/cat/*.jpg, train/dog/*.jpg, ...);
both must have the same class names. The encoder runs once per folder; its features are cached on disk
(--cache-dir, else $AIMV2_CACHE/features, else ~/.cache/aimv2/features) under a key covering the weights,
the files, the preprocessing and the settings, so probing again with other hyperparameters skips the encoder.

methods:
  attentive  the paper's probe: non-affine BatchNorm on the patch tokens, one learned query (no q projection)
             attending through bias-free k and v with as many heads as the trunk, linear classifier.
             AdamW (0.9, 0.999), cosine schedule with warmup, gradient clipping 3.0.
  linear     mean of the patch tokens -> non-affine BatchNorm -> linear classifier, same optimizer.
  knn        cosine k-nearest neighbours on mean-pooled features, votes weighted exp(sim / T).

The attentive probe caches every patch token: n x N x D float32 on disk and in memory (10k images through
ViT-L/14 at 224 px: about 10 GB); linear and knn cache one mean-pooled vector per image.

The paper trains 100 epochs and sweeps lr in {5e-5 ... 2e-3} and wd in {0.05, 0.1}; on cached features a sweep
is cheap. Output: readable lines, then as the LAST line of stdout one JSON object with top1 (percent), top5
(5 classes or more), n_train, n_val, method and the hyperparameters.

examples:
  aimv2 probe runs/tiny --train probe/train --val probe/val
  aimv2 probe aimv2-large-patch14-224 --checkpoint model.safetensors --train in1k/train --val in1k/val --bf16
  aimv2 probe runs/tiny --train probe/train --val probe/val --method knn --k 20
"""


def add_arguments(parser) -> None:
    parser.add_argument("encoder", metavar="ENCODER", help="model name, checkpoint file, HF folder or run folder")
    parser.add_argument("--train", required=True, metavar="DIR", help="training images, one sub-folder per class")
    parser.add_argument("--val", required=True, metavar="DIR", help="validation images, same class sub-folders")
    parser.add_argument(
        "--method", choices=("attentive", "linear", "knn"), default="attentive", help="(default: attentive)"
    )
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
    p.add_argument("--seed", type=int, default=0, help="seeds the head's init and the batch order (default: 0)")
    k = parser.add_argument_group("knn")
    k.add_argument("--k", type=int, default=20, help="neighbours (default: 20)")
    k.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(sim / T) (default: 0.07)")
    c = parser.add_argument_group("feature cache")
    c.add_argument("--cache-dir", help="where cached features live (default: $AIMV2_CACHE/features or ~/.cache/...)")
    c.add_argument("--no-cache", action="store_true", help="neither read nor write cached features")
    add_encoder_arguments(parser)


def _datasets(args, transform):
    from ..data.folders import ImageFiles

    train = ImageFiles.from_class_folders(args.train, transform)
    val = ImageFiles.from_class_folders(args.val, transform)
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise ValueError(
            "train and val have different classes: "
            f"only in train: {only_train or 'none'}; only in val: {only_val or 'none'}"
        )
    return train, val


def run(args) -> int:
    from ..data.transforms import eval_transform
    from ..eval.feature_cache import cached_features
    from ..eval.probe import ProbeConfig, run_probe

    try:
        encoder = load_encoder_from_args(args)
        img_size = encoder_img_size(encoder, args.img_size)
        transform = eval_transform(img_size, crop_pct=args.crop_pct)
        train, val = _datasets(args, transform)
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
    except (ValueError, FileNotFoundError) as e:
        print(f"aimv2 probe: error: {e}", file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    encoder.to(device)
    dtype = "bf16" if args.bf16 else "fp32"
    print(f"classes: {len(train.classes)}; train images: {len(train)}; val images: {len(val)}")
    feats = {}
    t0 = time.perf_counter()
    with plain_warnings():
        for split, dataset in (("train", train), ("val", val)):
            feats[split] = cached_features(
                encoder,
                dataset,
                cache_dir=args.cache_dir,
                use_cache=not args.no_cache,
                blocks=args.blocks,
                pool="none" if args.method == "attentive" else "mean",
                dtype=dtype,
                mean_std=args.mean_std,
                batch_size=args.batch_size,
                num_workers=args.workers,
                device=device,
                progress=False if args.no_progress else None,
                desc=f"features {split}",
            )
            f = feats[split]
            how = f"cached ({f['cache_path']})" if f["cached"] else "computed"
            print(f"{split} features: {list(f['features'].shape)} {how}")
    t1 = time.perf_counter()
    encoder.cpu()
    result = run_probe(
        feats["train"]["features"],
        feats["train"]["labels"],
        feats["val"]["features"],
        feats["val"]["labels"],
        len(train.classes),
        cfg,
        device,
        progress=False if args.no_progress else None,
    )
    t2 = time.perf_counter()
    top5 = f", top-5 {result['top5']:.2f}%" if "top5" in result else ""
    print(f"{args.method} probe: top-1 {result['top1']:.2f}%{top5} on {result['n_val']} val images")
    result.update(
        encoder=args.encoder,
        checkpoint=args.checkpoint,
        img_size=img_size,
        mean_std=args.mean_std,
        blocks=args.blocks,
        dtype=dtype,
        skipped_train=len(feats["train"]["errors"]),
        skipped_val=len(feats["val"]["errors"]),
        features_seconds=round(t1 - t0, 3),
        probe_seconds=round(t2 - t1, 3),
    )
    print(json.dumps(result))
    return 0
