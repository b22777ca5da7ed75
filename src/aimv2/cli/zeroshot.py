"""`aimv2 zeroshot LIT --images DIR`."""

from __future__ import annotations

import json

from ..eval.quantize import INFERENCE_DTYPES
from .encoder_args import add_runtime_arguments, add_workers_argument

DESCRIPTION = """--images is a folder with one sub-folder per class; folder names are the class names unless
--classnames renames them.

Each class is embedded by a prompt ensemble: every template filled with the class name, the normalized text
embeddings averaged. An image gets the class of highest cosine similarity. Prints top-1, top-5 and per-class
accuracy (percent); the last line of stdout is a JSON object with at least top1.

LIT: a LiT run folder (lit.safetensors + tokenizer.json, from `aimv2 lit`), our lit.safetensors, Apple's
aimv2-large-patch14-224-lit model.safetensors, or a transformers Aimv2Model folder. Files without our tokenizer
next to them need --tokenizer (a tokenizer.json whose eos id is the model's).

examples:
  aimv2 zeroshot runs/lit-tiny --images probe/val --templates templates.txt
  aimv2 zeroshot runs/lit-tiny --images probe/val --classnames names.txt --dtype bf16
  aimv2 zeroshot runs/lit-tiny --images probe/val --runtime onnxruntime --dtype int8

--runtime onnxruntime exports both towers to ONNX once (the image tower at the encoder's size, the text tower at
the context length; cached as for extract) and runs them on the CPU; with --dtype int8 both are quantized
dynamically, or the image tower statically with --calibrate DIR.
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
    add_workers_argument(p, 4)
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument(
        "--dtype",
        choices=INFERENCE_DTYPES,
        default="fp32",
        help="bf16 / fp16: autocast of the forward passes; int8: the linear layers of both towers quantized by "
        "torchao (pip install 'aimv2[int8]'), or with --runtime onnxruntime both towers' graphs by "
        "onnxruntime.quantization (default: fp32)",
    )
    add_runtime_arguments(p)
    p.add_argument(
        "--mean-std",
        choices=["imagenet", "clip"],
        help="pixel normalization (default: what the LiT run trained with; clip for Apple's and transformers' files)",
    )


def run(args) -> int:
    from ..data.classnames import folder_labels, read_classnames
    from ..data.sources.folders import find_classes
    from ..data.transforms import eval_transform
    from ..eval.onnx_runtime import check_ort_dtype, folder_calibration, onnx_lit, require_onnxruntime
    from ..eval.quantize import check_dtype, for_inference
    from ..eval.zeroshot import DEFAULT_TEMPLATES, load_lit_classifier, read_templates, zeroshot_classify
    from .encoder_args import plain_warnings, resolve_device

    device = resolve_device(args.device, args.runtime)
    if args.runtime == "onnxruntime":
        check_ort_dtype(args.dtype)
        require_onnxruntime()  # said before the model is read
    else:
        check_dtype(args.dtype)  # a missing torchao is said before the model is read
        if args.calibrate:
            raise ValueError("--calibrate sets up onnxruntime's static int8; pass --runtime onnxruntime --dtype int8")
    lit = load_lit_classifier(args.lit, tokenizer=args.tokenizer, mean_std=args.mean_std)
    model, dtype = lit.model, args.dtype
    if args.runtime == "onnxruntime":
        calibration = calibration_id = None
        if args.calibrate:
            if args.dtype != "int8":
                raise ValueError("--calibrate calibrates int8; add --dtype int8, or leave --calibrate out")
            transform = eval_transform(lit.model.cfg.encoder.image_hw)
            calibration, calibration_id = folder_calibration(args.calibrate, transform, lit.mean_std)
        model = onnx_lit(lit.model, dtype=args.dtype, calibration=calibration, calibration_id=calibration_id)
        dtype = "fp32"  # the graphs are what they are: no autocast, no torchao
    else:
        for_inference(model, args.dtype)
    templates = read_templates(args.templates) if args.templates else list(DEFAULT_TEMPLATES)
    names = None
    if args.classnames:  # one name per class folder, in folder order
        listed = read_classnames(args.classnames)
        names = [listed[c] for c in folder_labels(find_classes(args.images), listed, args.images)]
    with plain_warnings():
        res = zeroshot_classify(
            model,
            lit.tokenizer,
            args.images,
            classnames=names,
            templates=templates,
            batch_size=args.batch_size,
            num_workers=args.workers,
            device=device,
            dtype=dtype,
            mean_std=lit.mean_std,
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
