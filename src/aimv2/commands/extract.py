"""``aimv2 extract``: features of every image under a folder, written to a .safetensors or .npy file."""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

from ._features_args import (
    add_encoder_arguments,
    add_native_arguments,
    encoder_img_size,
    load_encoder_from_args,
    native_transform,
    plain_warnings,
    resolve_device,
)

HELP = "extract features of a folder of images"

DESCRIPTION = """Run a frozen AIMv2 encoder over every image under IMAGES_DIR (recursively, sorted by path) and save
the features.

Each image is converted to RGB (transparency composited over white, 16-bit greys scaled), its short side
resized to --img-size (bicubic) and center cropped, then normalized with --mean-std. Images that cannot be
decoded are skipped and named in a warning; the run goes on.

Output, by the extension of OUT:
  .safetensors  tensor "features" float32, metadata "paths" (JSON list, relative to IMAGES_DIR, one per row)
                plus the settings used
  .npy          the features array; the paths go to a sibling OUT-without-.npy + ".paths.txt", one per line

Feature shape: [n, N, D] patch tokens after the final norm (N = (img_size/patch)^2), or [n, D] with
--pool mean. --blocks averages the normalized outputs of several blocks instead of taking the last one.

--native (encoders with sin-cos position embeddings, e.g. aimv2-large-patch14-native) keeps every image's aspect
ratio instead: each is resized to at most --max-patches patches, both sides multiples of the patch size, and
images of the same grid are batched together. Patch tokens then differ in number per image: the .safetensors
file holds "features" [sum of N_i, D] (the images' tokens one after another), "offsets" long [n + 1] (image i is
rows offsets[i]:offsets[i+1]) and "grids" long [n, 2] (gh, gw, row-major tokens); with --pool mean "features"
is [n, D] and "grids" is written too.

examples:
  aimv2 extract aimv2-large-patch14-224 --checkpoint model.safetensors photos/ feats.safetensors
  aimv2 extract runs/tiny photos/ feats.npy --pool mean --bf16
  aimv2 extract aimv2-large-patch14-224 --checkpoint model.safetensors photos/ f.safetensors --blocks -4,-3,-2,-1
  aimv2 extract aimv2-large-patch14-native --checkpoint native.safetensors photos/ f.safetensors --native
"""


def add_arguments(parser) -> None:
    parser.add_argument("encoder", metavar="ENCODER", help="model name, checkpoint file, HF folder or run folder")
    parser.add_argument("images", metavar="IMAGES_DIR", help="folder of images (searched recursively)")
    parser.add_argument("out", metavar="OUT", help="output file: .safetensors or .npy")
    parser.add_argument(
        "--pool", choices=("none", "mean"), default="none", help="none: keep patch tokens; mean: average them"
    )
    add_native_arguments(parser)
    add_encoder_arguments(parser)


def write_features(out: Path, features, paths: list[str], settings: dict, extra: dict | None = None) -> list[Path]:
    """Write features [n, ...] and their image paths (and ``extra`` tensors, .safetensors only); returns the files
    written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        import numpy as np

        np.save(out, features.numpy())
        paths_file = out.with_suffix(".paths.txt")
        paths_file.write_text("".join(p + "\n" for p in paths), encoding="utf-8")
        return [out, paths_file]
    from safetensors.torch import save_file

    metadata = {k: json.dumps(v) for k, v in settings.items()}
    metadata["paths"] = json.dumps(paths)
    save_file({"features": features.contiguous(), **(extra or {})}, str(out), metadata=metadata)
    return [out]


def run(args) -> int:
    import torch

    from ..data.sources.folders import ImageFiles
    from ..data.transforms import eval_transform
    from ..eval.features import extract_features, extract_native_features, native_shape_groups

    out = Path(args.out)
    if out.suffix not in (".safetensors", ".npy"):
        print(f"aimv2 extract: error: OUT must end in .safetensors or .npy, got {str(out)!r}", file=sys.stderr)
        return 2
    if args.native and out.suffix == ".npy" and args.pool == "none":
        print(
            "aimv2 extract: error: --native patch tokens differ in number per image; write a .safetensors file "
            "(features + offsets + grids) or use --pool mean",
            file=sys.stderr,
        )
        return 2
    try:
        encoder = load_encoder_from_args(args)
        img_size = encoder_img_size(encoder, args.img_size)
        transform = eval_transform(img_size, crop_pct=args.crop_pct)
        groups = None
        if args.native:
            transform = native_transform(encoder, args)
        dataset = ImageFiles.from_folder(args.images, transform)
        if args.native:
            groups = native_shape_groups(dataset.paths, args.max_patches, encoder.cfg.patch_size)
    except (ValueError, FileNotFoundError) as e:
        print(f"aimv2 extract: error: {e}", file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    encoder.to(device)
    with plain_warnings():
        extract = extract_features if groups is None else partial(extract_native_features, groups=groups)
        result = extract(
            encoder,
            dataset,
            batch_size=args.batch_size,
            num_workers=args.workers,
            device=device,
            dtype="bf16" if args.bf16 else "fp32",
            blocks=args.blocks,
            pool=args.pool,
            mean_std=args.mean_std,
            progress=False if args.no_progress else None,
            desc="extract",
        )
    root = Path(args.images)
    paths = [dataset.paths[i].relative_to(root).as_posix() for i in result["indices"].tolist()]
    settings = {
        "encoder": args.encoder,
        "checkpoint": args.checkpoint,
        "img_size": img_size,
        "crop_pct": args.crop_pct,
        "mean_std": args.mean_std,
        "blocks": args.blocks,
        "pool": args.pool,
        "dtype": "bf16" if args.bf16 else "fp32",
        "skipped": [e.path for e in result["errors"]],
    }
    extra, features = {}, result["features"]
    if args.native:
        settings.update(native=True, max_patches=args.max_patches)
        extra["grids"] = result["grids"]
        if isinstance(features, list):  # ragged patch tokens: concatenated, with offsets
            sizes = torch.tensor([f.shape[0] for f in features])
            extra["offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
            features = torch.cat(features)
    written = write_features(out, features, paths, settings, extra if out.suffix == ".safetensors" else None)
    shape = "x".join(map(str, features.shape))
    skipped = f", {len(result['errors'])} unreadable skipped" if result["errors"] else ""
    print(f"extracted {len(paths)} images{skipped}: features [{shape}] {features.dtype}".replace("torch.", ""))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
