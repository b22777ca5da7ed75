"""``aimv2 convert``: rewrite an encoder checkpoint in Apple's, transformers' or our key layout.

The work is in ``aimv2.weights.convert_checkpoint``; this module is the command line around it, and
turns every expected failure (missing file, pickle file, wrong layout, mismatched tensors) into one line
on stderr rather than a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

DESCRIPTION = """Convert an AIMv2 encoder checkpoint between key layouts. The source layout is detected.

layouts:
  apple   Apple's released model.safetensors (preprocessor.*, trunk.*). Loads in timm
          (aimv2_* models) and in Apple's ml-aim; training runs write their encoder.safetensors so.
          Apple's LiT files (image_encoder.* + text_encoder.*) are read too: the image trunk is kept.
  hf      a transformers save_pretrained folder (config.json + model.safetensors) that
          transformers.Aimv2VisionModel.from_pretrained(OUT) loads with identical outputs, and a
          preprocessor_config.json that AutoImageProcessor.from_pretrained(OUT) reads (--mean-std).
  timm    timm's aimv2_* names (fc1_g / fc1_x): timm.create_model(ARCH, **KWARGS).load_state_dict(sd)
          loads it strictly; ARCH and KWARGS are printed, and stored in the file's metadata.
          Native (sin-cos) encoders have no timm form.
  aimv2   our module names (aimv2.models.encoder), one .safetensors file.

SRC is a .safetensors file, a transformers folder (single or sharded model.safetensors) or a training
run folder (encoder.safetensors). Tensors keep their dtype and bits; every file we write carries the
model config in its safetensors metadata, so `aimv2.create_model(name, checkpoint=OUT)` can check it.
Pickle files (.bin, .pt, .pth) are never unpickled: convert them to safetensors yourself first.

examples:
  aimv2 convert aimv2-large-patch14-224/model.safetensors --to hf hf-aimv2-large/
  aimv2 convert hf-aimv2-large/ --to apple aimv2-large.safetensors
  aimv2 convert runs/tiny --to hf runs/tiny/hf
  aimv2 convert runs/tiny --to timm runs/tiny/timm.safetensors
  aimv2 convert runs/lit --lit --to hf runs/lit/hf
  aimv2 convert my-encoder.safetensors --to apple out.safetensors --name aimv2-large-patch14-336
"""


def add_arguments(parser) -> None:
    parser.add_argument("src", metavar="SRC", help="checkpoint file, transformers folder or run folder")
    parser.add_argument("--to", required=True, metavar="LAYOUT", help="apple | hf | timm | aimv2")
    parser.add_argument("out", metavar="OUT", help="output .safetensors file (apple, aimv2) or folder (hf)")
    parser.add_argument(
        "--name",
        default=None,
        help="model name (e.g. aimv2-large-patch14-224) when the checkpoint carries no config and its shapes "
        "do not tell; also checked against the checkpoint when given",
    )
    parser.add_argument(
        "--mean-std",
        choices=("imagenet", "clip"),
        default=None,
        help="--to hf: the normalization written to preprocessor_config.json: imagenet (what our training uses, "
        "the default) or clip (Apple's published weights; the default for a --lit file of theirs)",
    )
    parser.add_argument(
        "--lit",
        action="store_true",
        help="SRC is a LiT model (ours, Apple's aimv2-large-patch14-224-lit, a transformers Aimv2Model, or "
        "hf:REPO): --to hf writes a folder transformers.Aimv2Model.from_pretrained loads; apple | aimv2 one file",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args) -> int:
    from ..weights import LAYOUTS, convert_checkpoint, convert_lit

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")

    def fail(msg: str) -> int:
        print(f"aimv2 convert: error: {msg}", file=sys.stderr)
        return 2

    if args.to not in LAYOUTS:
        return fail(f"unknown layout {args.to!r}: choose {', '.join(LAYOUTS)} (see aimv2 convert --help)")
    out = Path(args.out)
    if args.to != "hf" and out.suffix != ".safetensors":
        return fail(f"OUT for --to {args.to} is one file and must end in .safetensors, got {out}")
    if args.to == "hf" and out.suffix == ".safetensors":  # a folder named like a file would be read as one
        return fail(f"OUT for --to hf is a folder (config.json, model.safetensors), got {out}; give a folder name")
    if args.to == "hf" and out.is_file():  # --overwrite replaces a folder, it does not turn a file into one
        return fail(f"OUT for --to hf is a folder, and {out} is a file; remove it or choose another path")
    if out.exists() and not args.overwrite:
        return fail(f"{out} exists; pass --overwrite to replace it")
    if out.exists() and out.resolve() == Path(args.src).resolve():
        return fail("OUT is SRC; write the conversion elsewhere")
    if args.lit:
        written = convert_lit(args.src, args.to, out, mean_std=args.mean_std)
    else:
        written = convert_checkpoint(args.src, args.to, out, name=args.name, mean_std=args.mean_std or "imagenet")
    print(f"wrote {args.to} layout to {written}")
    if args.to == "timm":
        from safetensors import safe_open

        with safe_open(written, "pt") as f:
            meta = f.metadata()
        kwargs = "".join(f", {k}={v!r}" for k, v in json.loads(meta["timm_kwargs"]).items())
        print(f"load it with: timm.create_model({meta['timm_model']!r}{kwargs}).load_state_dict(load_file(OUT))")
    return 0
