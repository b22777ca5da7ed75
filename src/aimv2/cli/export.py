"""``aimv2 export``: an encoder as a deployable graph (ONNX), checked in onnxruntime against PyTorch."""

from __future__ import annotations

import sys
from pathlib import Path

DESCRIPTION = """Export a frozen AIMv2 encoder to ONNX: input "pixels" float32 [B, 3, H, W] (normalized as
aimv2.preprocessing says), output "features" float32 [B, N, D], the patch features after the final norm.

The batch size is dynamic. For a native (sin-cos) encoder H and W are dynamic too, any multiples of the patch
size; an encoder with a learned position embedding is exported at its own resolution (pass --set img_size=336 to
export a 224 checkpoint at 336, its position embedding resized once, on load).

The weights are inside OUT, one file to copy or serve, up to protobuf's 2 GiB limit (AIMv2-L and smaller); a
larger encoder (huge, 1B, 3B) keeps them in OUT.data, which must stay beside OUT (onnxruntime reads it from there).

After writing, the graph is run in onnxruntime against the PyTorch model (two batch sizes, and two grids for a
native encoder) and the largest difference is printed; --no-check skips it.

examples:
  aimv2 export runs/tiny encoder.onnx
  aimv2 export aimv2-large-patch14-224 --pretrained aimv2-large.onnx
  aimv2 export hf:apple/aimv2-large-patch14-native native.onnx
"""


def add_arguments(parser) -> None:
    parser.add_argument(
        "encoder", metavar="ENCODER", help="model name, checkpoint file, HF folder, hf:REPO or run folder"
    )
    parser.add_argument("out", metavar="OUT", help="the .onnx file to write")
    parser.add_argument("--format", choices=("onnx",), default="onnx", help="onnx (the one format so far)")
    parser.add_argument("--checkpoint", metavar="FILE", help="weights for ENCODER when ENCODER is a model name")
    parser.add_argument("--pretrained", action="store_true", help="ENCODER is a published name: Apple's weights")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="encoder config override"
    )
    parser.add_argument("--opset", type=int, help="ONNX opset, 18 to 25 (default: the exporter's)")
    parser.add_argument("--no-check", action="store_true", help="do not compare onnxruntime with PyTorch")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT (and OUT.data, the weights of a graph over 2 GiB) if they exist",
    )


def run(args) -> int:
    from ..errors import MissingPackageError
    from ..eval.frozen_encoder import load_frozen_encoder
    from ..weights.atomic import check_writable
    from ..weights.onnx_export import check_onnx, check_opset, export_onnx, onnx_input_shape, weights_file
    from .encoder_args import note_random_init, parse_overrides

    def fail(msg: str) -> int:
        print(f"aimv2 export: error: {msg}", file=sys.stderr)
        return 2

    out = Path(args.out)
    if out.suffix != ".onnx":
        return fail(f"OUT must end in .onnx, got {out}")
    existing = [f for f in (out, weights_file(out)) if f.exists()]
    if existing and not args.overwrite:
        return fail(
            f"{' and '.join(map(str, existing))} exist{'s' * (len(existing) == 1)}; pass --overwrite to replace"
        )
    check_opset(args.opset)
    check_writable(out)
    note_random_init(args)
    encoder = load_frozen_encoder(  # a bad ENCODER is the command's one error line (cli/errors.py)
        args.encoder, checkpoint=args.checkpoint, overrides=parse_overrides(args.overrides), pretrained=args.pretrained
    )
    try:
        import onnxscript  # noqa: F401  (what torch.onnx.export needs for this path)
    except ImportError:
        raise MissingPackageError("ONNX export needs onnx and onnxscript: pip install 'aimv2[onnx]'") from None
    export_onnx(encoder, out, opset=args.opset)
    dynamic = "batch, H and W" if encoder.cfg.pos_embed == "sincos" else "batch"
    data = weights_file(out)
    if data.exists():  # weights over 2 GiB: beside the graph (onnx_export.MAX_SINGLE_FILE_BYTES)
        where = f"the graph; its weights in {data} ({data.stat().st_size / 2**20:.1f} MiB): keep the two together"
    else:
        where = "weights inside"
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {where}; dynamic: {dynamic})")
    if not args.no_check:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise MissingPackageError(
                "the check needs onnxruntime: pip install 'aimv2[onnx]', or pass --no-check"
            ) from None
        grids = [None] if encoder.cfg.pos_embed != "sincos" else [(2, 3), (4, 1)]
        shapes = [onnx_input_shape(encoder, b, g) for b in (1, 3) for g in grids]
        print(f"onnxruntime vs PyTorch: max |diff| {check_onnx(out, encoder, shapes):.2e} over inputs {shapes}")
    return 0
