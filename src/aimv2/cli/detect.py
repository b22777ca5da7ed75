"""``aimv2 detect train|eval|predict|synth``: object detection with the encoder as a ViTDet backbone."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import tempfile
from pathlib import Path

from ..errors import DataError, UserError
from .sub_actions import run_action

log = logging.getLogger(__name__)

HELD_OUT_SEED = 12345  # built-in scenes of this seed are never a training config's default

DESCRIPTION = """Object detection on the encoder's dense features: a ViTDet simple feature pyramid on the last
block's map (optionally windowed attention in most blocks) under one of torchvision's detectors (FCOS,
RetinaNet, Faster R-CNN), trained by the same trainer as pretraining (resume, bf16, DDP, metrics).

actions:
  train CONFIG [key=value ...]   train a detector (see configs/detect-tiny.yaml); writes out_dir/detector.safetensors
  eval RUN                       COCO AP, AP50, AP75 (pycocotools) of a run on held-out built-in scenes or a
                                 COCO JSON + image folder; the last line of stdout is JSON
  predict RUN IMAGES...          detections of image files as COCO results JSON, and the images with boxes drawn
  synth OUT --n N                write built-in scenes as a COCO detection set (OUT/images, OUT/annotations.json)

examples:
  aimv2 detect train configs/detect-tiny.yaml detect.encoder=runs/tiny-synthetic out_dir=runs/det
  aimv2 detect eval runs/det --synthetic 200
  aimv2 detect synth coco-scenes/ --n 100 --seed 7
  aimv2 detect eval runs/det --annotations coco-scenes/annotations.json --images coco-scenes/images
  aimv2 detect predict runs/det coco-scenes/images/000000.png --out preds/"""

TRAIN_DESCRIPTION = """Train a detector from a YAML config plus key=value overrides. detect.encoder is a pretraining
run folder, an encoder checkpoint (any layout) or a model name (random init); detect.train_blocks chooses a
frozen (0), partly (k last blocks) or fully (-1) fine-tuned encoder, detect.layer_decay the layer-wise lr decay.
Data: the built-in scenes (data.source=synthetic) or data.source=folder data.folder=IMAGES
detect.annotations=COCO_JSON. Re-running on an existing out_dir resumes.

examples:
  aimv2 detect train configs/detect-tiny.yaml detect.encoder=runs/tiny-synthetic
  aimv2 detect train configs/detect-tiny.yaml detect.encoder=aimv2-tiny-patch8-64 detect.train_blocks=0"""


EVAL_DESCRIPTION = f"""COCO AP (pycocotools COCOeval, boxes): AP (IoU 0.50:0.95), AP50, AP75 and by object size.
Without --annotations: held-out built-in scenes (--synthetic N of --seed, default {HELD_OUT_SEED}, a seed no
training config uses). With --annotations JSON --images DIR: a COCO set (its categories must be the
model's). Every image is seen as in training and predict: aspect kept, long side detect.image_size, padded to the
square; boxes are mapped back to its own pixels. Missing area / iscrowd are filled as pycocotools fills results
(w * h, 0); unreadable images are left out with a warning. The last line of stdout is JSON.

examples:
  aimv2 detect eval runs/det --synthetic 500
  aimv2 detect eval runs/det --annotations val.json --images val/ --predictions val-preds.json"""

PREDICT_DESCRIPTION = """Detect objects in image files with a run's model (boxes in each image's own pixels; an
image is seen as in training and eval: aspect kept, long side detect.image_size, padded to the square).
Writes OUT/predictions.json (COCO results: image_id, file_name, category_id, bbox [x, y, w, h], score) and
OUT/NAME.boxes.png, the image with the detections scoring at least --min-score drawn. image_id is the COCO id of
the image with the same file_name in --annotations JSON, else the position on the command line (1, 2, ...).

examples:
  aimv2 detect predict runs/det scenes/images/000000.png scenes/images/000001.png --out preds/
  aimv2 detect predict runs/det scenes/images/*.png --annotations scenes/annotations.json --out preds/"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    fmt = argparse.RawDescriptionHelpFormatter

    t = sub.add_parser("train", help="train a detector", description=TRAIN_DESCRIPTION, formatter_class=fmt)
    t.add_argument("config", help="YAML config file (see configs/detect-tiny.yaml)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. detect.train_blocks=0")
    t.add_argument("--quiet", action="store_true", help="only warnings and errors on stderr")
    t.set_defaults(_action=run_train)

    e = sub.add_parser("eval", help="COCO AP of a detection run", description=EVAL_DESCRIPTION, formatter_class=fmt)
    e.add_argument("run_dir", metavar="RUN", help="a detection run folder (holds detector.safetensors)")
    e.add_argument("--annotations", metavar="JSON", help="COCO ground truth of the images in --images")
    e.add_argument("--images", metavar="DIR", help="the folder the JSON's file_name entries are in")
    e.add_argument("--synthetic", type=int, default=200, metavar="N", help="else: N built-in scenes (default 200)")
    e.add_argument("--seed", type=int, default=HELD_OUT_SEED, help=f"their seed (default {HELD_OUT_SEED}: held out)")
    e.add_argument("--predictions", metavar="JSON", help="also write the detections as COCO results JSON")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--device", default="cpu")
    e.set_defaults(_action=run_eval)

    p = sub.add_parser("predict", help="detect objects in image files, write JSON and drawn images",
                       description=PREDICT_DESCRIPTION, formatter_class=fmt)  # fmt: skip
    p.add_argument("run_dir", metavar="RUN", help="a detection run folder (holds detector.safetensors)")
    p.add_argument("images", nargs="+", metavar="IMAGES", help="image files")
    p.add_argument("--out", required=True, metavar="DIR", help="writes predictions.json and IMAGE.boxes.png here")
    p.add_argument(
        "--annotations",
        metavar="JSON",
        help="a COCO file listing the images: write its image ids "
        "(matched by file_name) instead of numbering the images in the order given",
    )
    p.add_argument("--min-score", type=float, default=0.3, help="draw detections scoring at least this (default 0.3)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(_action=run_predict)

    s = sub.add_parser("synth", help="write built-in scenes as a COCO detection set")
    s.add_argument("out", metavar="OUT")
    s.add_argument("--n", type=int, required=True, help="number of scenes")
    s.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    s.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    s.add_argument("--no-masks", action="store_true", help="boxes only, no segmentation polygons")
    s.add_argument("--overwrite", action="store_true", help="replace a set already in OUT (its images too)")
    s.set_defaults(_action=run_synth)
    parser.set_defaults(_parser=parser)


run = run_action


def run_train(args) -> int:
    from ..config import load_config
    from ..config.detection import DetectionConfig
    from ..train.detection_task import train_detection

    logging.getLogger().setLevel(logging.WARNING if args.quiet else logging.INFO)
    cfg = load_config(args.config, args.overrides, cls=DetectionConfig)
    if args.quiet:
        cfg.train.progress = False
    last = train_detection(cfg)
    if last:
        print(f"done: step {last['step']} loss {last['loss']:.4f}; model at {cfg.out_dir}/detector.safetensors")
    return 0


def check_writable(path: str | Path, what: str) -> Path:
    """``path`` can be written (its folder made if need be): checked before the work, not after it."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} is a folder ({path}); give a file path")
    blocking = next((p for p in path.parents if p.is_file()), None)
    if blocking is not None:
        raise UserError(f"the folder of {what} is a file ({blocking}); choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=path.parent):  # PermissionError / read-only file system now
        pass
    return path


def check_categories(dataset, meta: dict, annotations: str) -> None:
    """The COCO file's categories are the model's (same ids, same names), or one line naming the difference."""
    model = dict(zip(meta["category_ids"], meta["categories"], strict=True))
    data = {c["id"]: c["name"] for c in dataset.categories}
    if data == model:
        return
    fix = "evaluate on a set annotated with the model's categories (or train a model on this set's)"
    missing, extra = sorted(set(model) - set(data)), sorted(set(data) - set(model))
    if missing or extra:
        parts = [f"{len(set(data) & set(model))} of the model's {len(model)} category ids"]
        parts += [f"missing {', '.join(f'{i} {model[i]!r}' for i in missing)}"] if missing else []
        parts += [f"not in the model: {', '.join(f'{i} {data[i]!r}' for i in extra)}"] if extra else []
        raise DataError(f"the categories of {annotations} are not the model's: {'; '.join(parts)}; {fix}")
    renamed = [f"{i} is {data[i]!r} there, {model[i]!r} in the model" for i in sorted(model) if model[i] != data[i]]
    raise DataError(f"the categories of {annotations} have other names than the model's ({', '.join(renamed)}); {fix}")


def run_eval(args) -> int:
    from ..data.sources.coco import CocoDetection
    from ..data.synthetic.boxes import SyntheticDetection, coco_document
    from ..eval.detection import coco_eval, load_detector, predict_coco

    if bool(args.annotations) != bool(args.images):
        raise ValueError("--annotations and --images go together (a COCO JSON and its image folder)")
    if not args.annotations and args.synthetic < 1:
        raise ValueError(f"--synthetic {args.synthetic} scenes is nothing to evaluate; give at least 1")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be at least 1")
    if args.predictions:
        check_writable(args.predictions, "--predictions")
    model, meta = load_detector(args.run_dir)
    size = meta["detect"].image_size
    if args.annotations:
        dataset = CocoDetection(args.annotations, args.images, size, max_fault_rate=1.0)
        check_categories(dataset, meta, args.annotations)
        truth = dataset.document
    else:
        dataset = SyntheticDetection(args.seed, size, args.synthetic)
        truth = coco_document(args.synthetic, args.seed, size)
    results = predict_coco(model.to(args.device), dataset, args.batch_size, args.device, progress=True,
                           category_ids=meta["category_ids"])  # fmt: skip
    faults = getattr(dataset, "faults", None)
    if faults is not None and faults.skipped:
        if not faults.samples:
            raise DataError(f"no readable image in {args.images} ({faults.describe()}); check --images")
        log.warning("left out %d unreadable images (%s); their objects count as missed", faults.skipped,
                    faults.describe())  # fmt: skip
    if args.predictions:
        Path(args.predictions).write_text(json.dumps(results))
    stats = coco_eval(truth, results)
    print("  ".join(f"{k} {v:.3f}" for k, v in stats.items()))
    print(json.dumps({"images": len(dataset), "detections": len(results), **stats}))
    return 0


def image_ids_by_file(annotations: str, files: list[str]) -> list[int]:
    """The COCO image id of each file: the image whose file_name the path ends with (a path relative to the image
    folder, or only the name), or one line naming the file that has none."""
    from ..data.sources.coco import read_coco

    images = read_coco(annotations)["images"]
    by_name: dict[str, list[dict]] = {}
    for im in images:
        by_name.setdefault(Path(im["file_name"]).name, []).append(im)
    ids = []
    for file in files:
        posix = Path(file).as_posix()
        candidates = by_name.get(Path(file).name, [])
        exact = [im for im in candidates if posix == im["file_name"] or posix.endswith("/" + im["file_name"])]
        found = exact or (candidates if len(candidates) == 1 else [])
        if len(found) != 1:
            why = "no image" if not candidates else f"{len(candidates)} images"
            raise DataError(
                f"{why} of {annotations} has the file_name of {file}; give the image files the JSON lists (matched "
                "by file_name), or leave out --annotations to number the images in the order given"
            )
        ids.append(found[0]["id"])
    return ids


def run_predict(args) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from ..data.letterbox import letterbox
    from ..data.transforms import to_rgb
    from ..eval.detection import coco_records, detect_fitted, draw, load_detector

    files = [str(f) for f in args.images]
    for file in files:
        if not Path(file).is_file():
            raise FileNotFoundError(errno.ENOENT, "image not found", file)
    ids = image_ids_by_file(args.annotations, files) if args.annotations else list(range(1, len(files) + 1))
    out = Path(args.out)
    if out.is_file():
        raise UserError(f"--out is a file ({out}); give a folder")
    model, meta = load_detector(args.run_dir)
    model.to(args.device)
    size = meta["detect"].image_size
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for image_id, file in zip(ids, files, strict=True):
        try:
            with Image.open(file) as im:
                im.load()
                fitted = letterbox(im, size)  # the one resize policy of train and eval (data/letterbox.py)
                original = torch.from_numpy(np.array(to_rgb(im))).permute(2, 0, 1).contiguous()
        except OSError as e:
            raise DataError(f"image {file} cannot be read ({type(e).__name__}: {e}); give a readable image") from e
        (det,) = detect_fitted(model, [fitted], args.device)  # boxes in this image's pixels
        records += coco_records(image_id, det, meta["category_ids"], file_name=file)
        draw(original, det, meta["categories"], args.min_score).save(out / f"{Path(file).stem}.boxes.png")
    (out / "predictions.json").write_text(json.dumps(records))
    print(f"{len(records)} detections of {len(files)} images: {out}/predictions.json and *.boxes.png")
    return 0


def run_synth(args) -> int:
    from ..data.synthetic.boxes import write_coco

    if args.n < 1:
        raise ValueError(f"--n {args.n} scenes is nothing to write; give at least 1")
    if args.size < 16:
        raise ValueError(f"--size {args.size} is too small for a scene; give at least 16 pixels")
    out = Path(args.out)
    if out.is_file():
        raise UserError(f"OUT is a file ({out}); give a folder")
    existing = [p for p in (out / "annotations.json", out / "images") if p.exists()]
    if existing and not args.overwrite:
        raise UserError(f"{existing[0]} exists; pass --overwrite to replace the set, or choose another OUT")
    if args.overwrite and (out / "images").is_dir():  # no image of the earlier set is left behind
        for stale in (out / "images").glob("[0-9][0-9][0-9][0-9][0-9][0-9].png"):
            stale.unlink()
    path = write_coco(args.out, args.n, seed=args.seed, size=args.size, masks=not args.no_masks)
    print(f"{args.n} scenes: {path} and {out / 'images'}")
    return 0
