"""Options shared by the commands that run a frozen encoder over image folders (``extract``, ``probe``), and their
translation into the library's settings."""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from pathlib import Path

from ..data.transforms import MEAN_STD
from ..data.workers import default_workers
from ..eval.onnx_runtime import RUNTIMES
from ..eval.quantize import INFERENCE_DTYPES


def add_encoder_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("encoder and preprocessing")
    g.add_argument(
        "--checkpoint",
        metavar="FILE",
        help="weights for ENCODER when ENCODER is a model name (a .safetensors file or folder in any layout)",
    )
    g.add_argument(
        "--pretrained",
        action="store_true",
        help="ENCODER is a published name (e.g. aimv2-large-patch14-224): Apple's weights from the Hugging Face "
        "cache, downloaded the first time; or give ENCODER as hf:apple/NAME[@REVISION]",
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
    r.add_argument(
        "--dtype",
        choices=INFERENCE_DTYPES,
        default=None,
        help="bf16 / fp16: autocast of the encoder forward; int8: its linear layers quantized by torchao (int8 "
        "weights and activations; pip install 'aimv2[int8]'), or with --runtime onnxruntime by "
        "onnxruntime.quantization (which runs fp32 and int8 only). Features stay float32 (default: fp32). On CPUs "
        "onnxruntime int8 is the fast one, torchao's int8 saves 3/4 of the weight memory but need not be faster; "
        "bf16 and fp16 pay off on GPUs (benchmarks/inference_speed.py measures speed and what each loses)",
    )
    r.add_argument("--bf16", action="store_true", help="the same as --dtype bf16")
    add_runtime_arguments(r)
    r.add_argument("--batch-size", type=int, default=64, help="images per encoder forward (default: 64)")
    add_workers_argument(r, 4)
    r.add_argument("--no-progress", action="store_true", help="no progress bar (it is off anyway when not a tty)")


def add_runtime_arguments(group) -> None:
    """``--runtime`` and ``--calibrate``: the encoder run by PyTorch, or exported to ONNX and run by onnxruntime."""
    group.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="torch",
        help="torch: PyTorch runs the encoder; onnxruntime: it is exported to ONNX once (cached under "
        "$AIMV2_ONNX_CACHE, else $AIMV2_CACHE/onnx, else ~/.cache/aimv2/onnx) and onnxruntime runs it on the CPU, "
        "--dtype fp32 or int8 (onnxruntime.quantization; pip install 'aimv2[onnx]'): the fast path on CPUs "
        "(default: torch)",
    )
    group.add_argument(
        "--calibrate",
        metavar="DIR",
        help="--runtime onnxruntime --dtype int8: static int8, its activation ranges set by 32 images "
        "under DIR (images like the ones you will encode); without it int8 is dynamic (ranges per batch)",
    )


def add_workers_argument(group, cap: int) -> None:
    """``--workers``: ``cap`` image-decoding processes by default, fewer where fewer CPUs are usable."""
    n = default_workers(cap)
    help_ = f"image decoding processes, 0 decodes inline (default: {cap}, fewer on fewer CPUs; here {n})"
    group.add_argument("--workers", type=int, default=n, help=help_)


def note_random_init(args) -> None:
    """One line on stderr when ``ENCODER`` is a bare model name, i.e. random weights (frozen_encoder)."""
    from ..eval.frozen_encoder import random_init_note

    if note := random_init_note(args.encoder, args.checkpoint, args.pretrained, getattr(args, "seed", 0)):
        print(f"note: {note}", file=sys.stderr)


def add_native_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--native",
        action="store_true",
        help="keep each image's aspect ratio, at most --max-patches patches (sin-cos encoders); batches group by shape",
    )
    parser.add_argument(
        "--max-patches", type=int, default=1024, help="--native: patches per image at most (default: 1024)"
    )


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


def encoder_from_args(args):
    """The frozen encoder named by ``ENCODER`` (+ ``--checkpoint``, ``--set``) as ``--runtime`` and ``--dtype`` run
    it: PyTorch's (quantized by torchao for int8), or onnxruntime's (fp32 or int8) exported from it; a bare model
    name is a random init seeded by ``--seed`` (else 0)."""
    from ..eval.frozen_encoder import load_frozen_encoder
    from ..eval.onnx_runtime import runtime_encoder

    overrides = parse_overrides(args.overrides)
    note_random_init(args)

    def load(dtype: str):
        return load_frozen_encoder(args.encoder, checkpoint=args.checkpoint, overrides=overrides,
                                   seed=getattr(args, "seed", 0), pretrained=args.pretrained, dtype=dtype)  # fmt: skip

    if not hasattr(args, "runtime"):  # a command without the feature options (visualize): PyTorch's encoder
        return load(encoder_dtype(args))
    return runtime_encoder(load, feature_settings(args))


def feature_settings(args):
    """The :class:`~aimv2.eval.frozen_encoder.FeatureSettings` the encoder and native options name."""
    from ..eval.frozen_encoder import FeatureSettings

    return FeatureSettings(
        img_size=args.img_size,
        crop_pct=args.crop_pct,
        mean_std=args.mean_std,
        blocks=args.blocks,
        dtype=encoder_dtype(args),
        batch_size=args.batch_size,
        num_workers=args.workers,
        native=args.native,
        max_patches=args.max_patches,
        runtime=args.runtime,
        calibrate=str(Path(args.calibrate).resolve()) if args.calibrate else None,
    )


def encoder_dtype(args) -> str:
    """``--dtype``, or bf16 for ``--bf16``; both given must agree."""
    if args.bf16 and args.dtype not in (None, "bf16"):
        print(f"aimv2: error: --bf16 and --dtype {args.dtype} disagree; pass one of them", file=sys.stderr)
        raise SystemExit(2)
    return "bf16" if args.bf16 else (args.dtype or "fp32")


def resolve_device(name: str | None, runtime: str = "torch"):
    """``--device``, else cuda when there is one; the CPU for ``--runtime onnxruntime`` (its CPU provider)."""
    import torch

    from ..eval.features import default_device

    if runtime == "onnxruntime":
        if name and torch.device(name).type != "cpu":
            raise ValueError(f"--runtime onnxruntime runs on the CPU, not --device {name}; on GPUs use --runtime torch")
        return torch.device("cpu")
    return torch.device(name) if name else default_device()


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
