"""``aimv2 visualize``: PCA of an encoder's patch features as colours, and one block's attention per head."""

from __future__ import annotations

import argparse

from .encoder_args import encoder_from_args, plain_warnings, resolve_device

DESCRIPTION = """What an encoder sees, as pictures. For every IMAGE it writes to --out:

  STEM-pca.png        the image and the first three principal components of its patch features as RGB, fitted
                      over the patches of all the given images together (so a colour means the same thing in
                      every picture), each patch's colour shown over the pixels it covers
  STEM-attention.png  the image and, per head of block --block, the attention of the --query patch over all
                      patches (mean: the attention each patch receives, averaged over all queries), then the
                      mean over heads

The image is preprocessed as for evaluation (short side resized to --size, center crop; the encoder's own
resolution by default); any size divisible by the patch works, non-square too (--size HxW), as the encoder resizes
its position embedding. The attention is the bidirectional one of inference, recomputed from the block's own qkv
weights on the input its attention received: softmax(q k^T / sqrt(head_dim)) per head.

ENCODER is a model name (random weights, seeded by --seed; with --pretrained Apple's published weights), a
checkpoint in any layout, a transformers folder, a training run folder or hf:OWNER/NAME[@REVISION].

examples:
  aimv2 visualize runs/tiny-synthetic scene.png --out vis/
  aimv2 visualize aimv2-large-patch14-224 --pretrained cat.jpg dog.jpg --out vis/ --block -4 --query 120
  aimv2 visualize aimv2-large-patch14-native --checkpoint native.safetensors wide.jpg --size 224x448 --out vis/
"""


def parse_size(text: str) -> tuple[int, int]:
    """``"64"`` -> (64, 64); ``"64x96"`` -> (64, 96) (height x width)."""
    try:
        parts = [int(t) for t in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected SIZE or HEIGHTxWIDTH in pixels, e.g. 224 or 224x448, got {text!r}")
    return (parts[0], parts[-1])


def parse_query(text: str) -> int | str:
    if text == "mean":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a patch index (row-major, from 0) or mean, got {text!r}") from None


def add_arguments(parser) -> None:
    parser.add_argument("encoder", metavar="ENCODER", help="model name, checkpoint file, HF folder or run folder")
    parser.add_argument("images", metavar="IMAGE", nargs="+", help="image files")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the pictures (created if missing)")
    parser.add_argument("--block", type=int, default=-1, help="block whose attention is shown, negative from the end "
                        "(default: -1, the last)")  # fmt: skip
    parser.add_argument("--query", type=parse_query, default="mean", help="patch index whose attention is shown "
                        "(row-major from the top left, negative from the end), or mean (default)")  # fmt: skip
    parser.add_argument("--size", type=parse_size, help="SIZE or HxW in pixels, multiples of the patch (default: "
                        "the encoder's resolution)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace pictures already in --out")
    g = parser.add_argument_group("encoder")
    g.add_argument("--checkpoint", metavar="FILE", help="weights for ENCODER when ENCODER is a model name")
    g.add_argument("--pretrained", action="store_true", help="ENCODER is a published name: Apple's weights")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="encoder config override, repeatable (e.g. --set depth=2)")  # fmt: skip
    g.add_argument("--seed", type=int, default=0, help="seed of a random-init encoder (a bare model name)")
    g.add_argument("--mean-std", choices=("imagenet", "clip"), help="normalization (default: CLIP's for Apple's "
                   "published weights, else ImageNet's)")  # fmt: skip
    g.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    parser.set_defaults(dtype=None, bf16=False)  # what encoder_from_args reads: the float32 encoder


def run(args) -> int:
    from pathlib import Path

    from PIL import Image

    from ..eval.visualize import features_and_attention, pca_rgb, query_maps, save_attention_figure, save_pca_figure
    from ..weights import preprocessing

    out = Path(args.out)
    stems = [Path(p).stem for p in args.images]
    if len(set(stems)) < len(stems):
        raise ValueError("two IMAGEs have the same file name (their pictures would overwrite each other); rename one")
    targets = [out / f"{s}-{kind}.png" for s in stems for kind in ("pca", "attention")]
    if not args.overwrite and (taken := [str(t) for t in targets if t.exists()]):
        raise FileExistsError(f"{taken[0]} exists ({len(taken)} of the pictures); pass --overwrite to replace them")
    encoder = encoder_from_args(args)
    device = resolve_device(args.device)
    encoder.to(device)
    prep = preprocessing(encoder, img_size=args.size, mean_std=args.mean_std)
    p = encoder.cfg.patch_size
    H, W = prep.img_size
    if H % p or W % p:
        raise ValueError(f"--size {H}x{W} is not a multiple of the patch size {p}; give e.g. {H - H % p or p}x"
                         f"{W - W % p or p}")  # fmt: skip
    grid = (H // p, W // p)
    to_uint8 = prep.pil_transform()
    images, features, maps = [], [], []
    with plain_warnings():
        for path in args.images:
            with Image.open(path) as img:
                image = to_uint8(img)  # RGB (transparency over white), resized, cropped
            feats, weights = features_and_attention(encoder, prep.normalize(image[None], device), args.block)
            images.append(image)
            features.append(feats[0].cpu())
            maps.append(query_maps(weights, grid, args.query)[0].cpu())
    colours = pca_rgb(features, [grid] * len(features))
    out.mkdir(parents=True, exist_ok=True)
    block = args.block % len(encoder.blocks)
    name = Path(str(args.encoder).rstrip("/")).name + (" (random init)" if _random(args) else "")
    name += f" + {Path(args.checkpoint).name}" if args.checkpoint else ""
    for stem, image, rgb, m in zip(stems, images, colours, maps, strict=True):
        save_pca_figure(image, rgb, out / f"{stem}-pca.png", f"{name}, {H}x{W}, {grid[0]}x{grid[1]} patches")
        save_attention_figure(image, m, args.query, p, out / f"{stem}-attention.png", f"{name}, block {block}")
    print(f"wrote {len(targets)} pictures of {len(stems)} images to {out}/ ({H}x{W} px, {grid[0]}x{grid[1]} "
          f"patches, block {block}, {m.shape[0]} heads)")  # fmt: skip
    return 0


def _random(args) -> bool:
    from ..eval.frozen_encoder import is_random_init

    return is_random_init(args.encoder, args.checkpoint, args.pretrained)
