"""Options shared by the commands that run a frozen encoder over image folders (``extract``, ``probe``)."""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from pathlib import Path

from ..data.transforms import MEAN_STD


def add_encoder_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("encoder and preprocessing")
    g.add_argument(
        "--checkpoint",
        metavar="FILE",
        help="weights for ENCODER when ENCODER is a model name (a .safetensors file or folder in any layout)",
    )
    g.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="encoder config override, repeatable (e.g. --set depth=2 for a quick check)",
    )
    g.add_argument(
        "--img-size",
        "--resolution",
        dest="img_size",
        type=int,
        help="resize the short side to this, then center crop it (default: the encoder's); a learned position "
        "embedding is resized to the new grid, e.g. a 224 checkpoint evaluated at 336 runs on a 24x24 grid",
    )
    g.add_argument(
        "--crop-pct", type=float, default=1.0, help="resize to img_size/crop_pct before the crop (default: 1.0)"
    )
    g.add_argument(
        "--mean-std",
        choices=sorted(MEAN_STD),
        default="imagenet",
        help="normalization: imagenet (Apple's training code) or clip (Apple's published preprocessor configs)",
    )
    g.add_argument(
        "--blocks",
        type=parse_blocks,
        help="comma-separated block indices (negative from the end) whose normalized outputs are averaged, "
        "e.g. -4,-3,-2,-1 (default: the last block)",
    )
    r = parser.add_argument_group("running")
    r.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    r.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the encoder (features stay float32)")
    r.add_argument("--batch-size", type=int, default=64, help="images per encoder forward (default: 64)")
    r.add_argument("--workers", type=int, default=4, help="image decoding processes, 0 decodes inline (default: 4)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar (it is off anyway when not a tty)")


def add_native_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--native",
        action="store_true",
        help="keep each image's aspect ratio, at most --max-patches patches (sin-cos encoders); batches group by shape",
    )
    parser.add_argument(
        "--max-patches", type=int, default=1024, help="--native: patches per image at most (default: 1024)"
    )


def native_transform(encoder, args):
    """--native: the NativeResize transform for ``encoder`` (a ValueError naming the problem if it cannot)."""
    from ..data.transforms import NativeResize

    cfg = encoder.cfg
    if cfg.pos_embed != "sincos":
        raise ValueError(
            f"--native needs an encoder with sin-cos position embeddings (a -native model); {args.encoder} has a "
            f"learned {cfg.grid_size} grid"
        )
    if args.max_patches < 2:
        raise ValueError(f"--max-patches must be >= 2, got {args.max_patches}")
    return NativeResize(args.max_patches, cfg.patch_size)


def parse_blocks(text: str) -> list[int] | None:
    """``"-4,-3,-2,-1"`` -> [-4, -3, -2, -1]; ``""`` -> None."""
    if not text.strip():
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = _value(value.strip())
    return out


def load_encoder_from_args(args):
    """The encoder named by ``args.encoder`` (+ ``--checkpoint``, ``--set``), in eval mode.

    A model name without a checkpoint is a randomly initialized encoder (seeded by ``args.seed``, else 0);
    anything else (a file, an HF folder, a run folder) is read by :func:`aimv2.weights.load_encoder`.
    """
    import torch

    from ..models import parse_model_name
    from ..weights import create_model, load_encoder

    overrides = parse_overrides(args.overrides)
    spec = args.encoder
    if args.checkpoint:
        return create_model(spec, checkpoint=args.checkpoint, **overrides).eval()
    try:
        parse_model_name(spec)
        is_name = not Path(spec).exists()
    except ValueError:
        is_name = False
    if is_name:  # random init, seeded: the same command gives the same encoder (and reuses cached features)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(getattr(args, "seed", 0))
            return create_model(spec, **overrides).eval()
    return load_encoder(spec, **overrides).eval()


def encoder_img_size(encoder, override: int | None):
    if override is not None:
        return override
    cfg = getattr(encoder, "cfg", None)
    return cfg.image_hw if cfg is not None else 224


def resolve_device(name: str | None):
    import torch

    return torch.device(name) if name else torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def plain_warnings():
    """Print warnings as ``warning: message`` on stderr (not Python's file:line form) while a command runs."""
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original
