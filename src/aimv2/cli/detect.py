"""``aimv2 detect train|eval|predict|synth``: object detection with the encoder as a ViTDet backbone."""

from __future__ import annotations

import argparse
import errno
import json
import logging
from pathlib import Path

from .sub_actions import run_action

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
training config uses). With --annotations JSON --images DIR: a COCO set, images resized to the run's
detect.image_size and the boxes scaled back. The last line of stdout is JSON.

examples:
  aimv2 detect eval runs/det --synthetic 500
  aimv2 detect eval runs/det --annotations val.json --images val/ --predictions val-preds.json"""

PREDICT_DESCRIPTION = """Detect objects in image files with a run's model (boxes in each image's own pixels).
Writes OUT/predictions.json (COCO results: image_id in the order given, file_name, category_id, bbox [x, y, w, h],
score) and OUT/NAME.boxes.png, the image with the detections scoring at least --min-score drawn.

examples:
  aimv2 detect predict runs/det scenes/images/000000.png scenes/images/000001.png --out preds/"""


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
    p.add_argument("--min-score", type=float, default=0.3, help="draw detections scoring at least this (default 0.3)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(_action=run_predict)

    s = sub.add_parser("synth", help="write built-in scenes as a COCO detection set")
    s.add_argument("out", metavar="OUT")
    s.add_argument("--n", type=int, required=True, help="number of scenes")
    s.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    s.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    s.add_argument("--no-masks", action="store_true", help="boxes only, no segmentation polygons")
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


def run_eval(args) -> int:
    from ..data.sources.coco import CocoDetection
    from ..data.synthetic.boxes import SyntheticDetection, coco_document
    from ..eval.detection import coco_eval, load_detector, predict_coco

    model, meta = load_detector(args.run_dir)
    size = meta["detect"].image_size
    if bool(args.annotations) != bool(args.images):
        raise ValueError("--annotations and --images go together (a COCO JSON and its image folder)")
    if args.annotations:
        dataset, truth = CocoDetection(args.annotations, args.images, size), args.annotations
    else:
        dataset, truth = (
            SyntheticDetection(args.seed, size, args.synthetic),
            coco_document(args.synthetic, args.seed, size),
        )
    results = predict_coco(model.to(args.device), dataset, args.batch_size, args.device, progress=True)
    if args.predictions:
        Path(args.predictions).write_text(json.dumps(results))
    stats = coco_eval(truth, results)
    print("  ".join(f"{k} {v:.3f}" for k, v in stats.items()))
    print(json.dumps({"images": len(dataset), "detections": len(results), **stats}))
    return 0


def run_predict(args) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from ..data.transforms import to_rgb
    from ..eval.detection import draw, load_detector

    model, meta = load_detector(args.run_dir)
    model.to(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for image_id, file in enumerate(args.images, start=1):
        if not Path(file).is_file():
            raise FileNotFoundError(errno.ENOENT, "image not found", file)
        with Image.open(file) as im:
            pixels = torch.from_numpy(np.array(to_rgb(im))).permute(2, 0, 1).contiguous()  # [3, H, W]
        (det,) = model.predict(pixels[None].to(args.device).float() / 255)  # boxes in this image's pixels
        det = {k: v.cpu() for k, v in det.items()}
        for (x0, y0, x1, y1), s, k in zip(
            det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist(), strict=True
        ):
            records.append(
                {
                    "image_id": image_id,
                    "file_name": str(file),
                    "category_id": meta["category_ids"][k - 1],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "score": s,
                }
            )
        draw(pixels, det, meta["categories"], args.min_score).save(out / f"{Path(file).stem}.boxes.png")
    (out / "predictions.json").write_text(json.dumps(records))
    print(f"{len(records)} detections of {len(args.images)} images: {out}/predictions.json and *.boxes.png")
    return 0


def run_synth(args) -> int:
    from ..data.synthetic.boxes import write_coco

    path = write_coco(args.out, args.n, seed=args.seed, size=args.size, masks=not args.no_masks)
    print(f"{args.n} scenes: {path} and {Path(args.out) / 'images'}")
    return 0
