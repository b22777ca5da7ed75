"""``aimv2 classify``: the top-k classes of images under a classifier saved by ``aimv2 probe ... --save``."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

DESCRIPTION = """Classify images with a probe saved by `aimv2 probe ENCODER ... --save PROBE.safetensors`.

The classifier file names its encoder (ENCODER as the probe was given it, with --checkpoint, --pretrained
and --set) and its feature settings (size, crop, normalization, blocks, dtype, native resolution); the images go
through the same preprocessing and encoder, then the saved head. IMAGES are files or folders (searched
recursively). Unreadable images are skipped and named in a warning.

Output: one line per image, `PATH  LABEL (PROB%)  LABEL (PROB%) ...`, best first; with --json one JSON object
per line, {"path": ..., "top": [{"label": ..., "prob": ...}, ...]}.

examples:
  aimv2 probe runs/tiny --train probe/train --val probe/val --method linear --save probe.safetensors
  aimv2 classify probe.safetensors photo.jpg more-photos/
  aimv2 classify probe.safetensors photos/ --top-k 1 --json > labels.jsonl
  aimv2 classify probe.safetensors photos/ --runtime onnxruntime --dtype int8
"""


def add_arguments(parser) -> None:
    parser.add_argument("probe", metavar="PROBE", help="a classifier file written by aimv2 probe --save")
    parser.add_argument("images", metavar="IMAGES", nargs="+", help="image files or folders")
    parser.add_argument("--top-k", type=int, default=5, help="labels shown per image (default: 5)")
    parser.add_argument("--json", action="store_true", help="one JSON object per image instead of text")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument(
        "--runtime",
        choices=("torch", "onnxruntime"),
        help="run the encoder in PyTorch or in onnxruntime (CPU; see aimv2 extract --help) (default: as the probe "
        "was trained)",
    )
    parser.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "fp16", "int8"),
        help="the encoder's inference dtype (default: the probe's); onnxruntime runs fp32 and int8",
    )
    parser.add_argument(
        "--calibrate", metavar="DIR", help="--runtime onnxruntime --dtype int8: static int8 (see extract)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (it is off anyway when not a tty)")


def run(args) -> int:
    from ..eval.classifier import image_paths, load_classifier
    from .encoder_args import plain_warnings, resolve_device

    if args.top_k < 1:
        print("aimv2 classify: error: --top-k must be >= 1", file=sys.stderr)
        return 2
    clf = load_classifier(args.probe)  # errors here are the command's one line (cli/errors.py)
    changes = {k: v for k in ("runtime", "dtype", "calibrate") if (v := getattr(args, k)) is not None}
    if changes:
        changes["calibrate"] = str(Path(changes["calibrate"]).resolve()) if changes.get("calibrate") else None
        clf.settings = replace(clf.settings, **changes)
    paths = image_paths(args.images)
    with plain_warnings():
        device = resolve_device(args.device, clf.settings.runtime)
        out = clf.predict(paths, device, progress=False if args.no_progress else None)
    k = min(args.top_k, len(clf.classes))
    probs, idx = out["probs"].topk(k, dim=-1)  # [n, k]
    for path, p, i in zip(out["paths"], probs.tolist(), idx.tolist(), strict=True):
        top = [(clf.classes[c], q) for c, q in zip(i, p, strict=True)]
        if args.json:
            print(json.dumps({"path": str(path), "top": [{"label": c, "prob": round(q, 6)} for c, q in top]}))
        else:
            print(f"{path}  " + "  ".join(f"{c} ({100 * q:.1f}%)" for c, q in top))
    return 0
