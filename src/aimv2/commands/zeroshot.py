"""`aimv2 zeroshot LIT --images DIR`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

HELP = "zero-shot classification of an image folder with a LiT model"
DESCRIPTION = """Zero-shot classification of an image folder (one sub-folder per class) with a LiT model.

Each class is embedded by a prompt ensemble: every template filled with the class name, the normalized text
embeddings averaged. An image gets the class of highest cosine similarity. Prints top-1, top-5 and per-class
accuracy (percent); the last line of stdout is a JSON object with at least top1.

LIT: a LiT run folder (lit.safetensors + tokenizer.json, from `aimv2 lit`), our lit.safetensors, Apple's
aimv2-large-patch14-224-lit model.safetensors, or a transformers Aimv2Model folder. Files without our tokenizer
next to them need --tokenizer (a tokenizer.json whose eos id is the model's).

examples:
  aimv2 zeroshot runs/lit-tiny --images probe/val --templates templates.txt
  aimv2 zeroshot runs/lit-tiny --images probe/val --classnames names.txt --dtype bf16
"""


def add_arguments(p) -> None:
    p.add_argument("lit", metavar="LIT", help="LiT run folder or checkpoint (ours, Apple's or transformers')")
    p.add_argument("--images", required=True, help="image folder with one sub-folder per class")
    p.add_argument(
        "--classnames",
        metavar="FILE",
        help="class names file, one name per line: a display name for each class folder, in sorted folder order "
        "(the format of probe --classnames)",
    )
    p.add_argument("--templates", help="prompt templates, one per line with {} for the class name")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the one in the LiT run folder)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for the images")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="autocast dtype of the forward passes")
    p.add_argument(
        "--mean-std",
        choices=["imagenet", "clip"],
        help="pixel normalization (default: what the LiT run trained with; clip for Apple's and transformers' files)",
    )


def _tokenizer(args, model, source: Path):
    from ..data.tokenizer import Tokenizer, UnknownSpecialToken

    path = Path(args.tokenizer) if args.tokenizer else None
    if path is None:
        folder = source if source.is_dir() else source.parent
        if (folder / "tokenizer.json").is_file():
            path = folder / "tokenizer.json"
    if path is None:
        raise SystemExit(f"error: no tokenizer.json next to {source}; pass --tokenizer FILE")
    length = model.cfg.text.context_length
    try:
        tok = Tokenizer.from_file(path, context_length=length)
    except UnknownSpecialToken as e:
        if e.what != "pad":
            raise
        # a file that names no pad token (CLIP's): pad with the eos token, since the text tower pools at the first
        # eos and, being causal, never reads what follows it
        from tokenizers import Tokenizer as HFTokenizer

        eos = HFTokenizer.from_file(str(path)).id_to_token(model.cfg.text.eos_id)
        if eos is None:
            raise
        tok = Tokenizer.from_file(path, context_length=length, pad_token=eos)
    if tok.eos_id != model.cfg.text.eos_id:
        raise SystemExit(
            f"error: {path} ends captions with id {tok.eos_id} but the model pools at eos id {model.cfg.text.eos_id}"
        )
    return tok


def run(args) -> int:
    from ..checkpoints import CheckpointError
    from ..data.classnames import folder_labels, read_classnames
    from ..data.sources.folders import find_classes
    from ..eval.zeroshot import DEFAULT_TEMPLATES, read_templates, zeroshot_classify
    from ..lit_checkpoints import build_lit, read_lit
    from ._features_args import plain_warnings, resolve_device

    try:
        ckpt = read_lit(args.lit)
        model = build_lit(ckpt)
        tok = _tokenizer(args, model, Path(args.lit))
        templates = read_templates(args.templates) if args.templates else list(DEFAULT_TEMPLATES)
        names = None
        if args.classnames:  # one name per class folder, in folder order
            listed = read_classnames(args.classnames)
            names = [listed[c] for c in folder_labels(find_classes(args.images), listed, args.images)]
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    mean_std = args.mean_std or ckpt.metadata.get("mean_std") or ("imagenet" if ckpt.layout == "aimv2" else "clip")
    with plain_warnings():
        res = zeroshot_classify(
            model,
            tok,
            args.images,
            classnames=names,
            templates=templates,
            batch_size=args.batch_size,
            num_workers=args.workers,
            device=resolve_device(args.device),
            dtype=args.dtype,
            mean_std=mean_std,
        )
    print(
        f"zero-shot: top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  ({res['n']} images, "
        f"{len(res['classes'])} classes, chance {res['chance']:.2f}%, {len(templates)} templates)"
    )
    for folder, name in zip(res["classes"], res["names"], strict=True):
        label = folder if name == folder else f"{folder} ({name})"
        print(f"  {label:24s} {res['per_class'][folder]:6.2f}%")
    keys = ("top1", "top5", "chance", "n", "per_class")
    print(json.dumps({k: res[k] for k in keys} | {"templates": len(templates)}))
    return 0
