"""Detection AP and grounding accuracy on held-out built-in scenes: the encoder from AIMv2 pretraining vs the CLIP
baseline vs random init.

Laptop scale, on CPU. Two tiny encoders are pretrained with the same data, steps and batch (configs/tiny-synthetic.yaml:
AIMv2, and model.objective=clip), then each of the three encoders gets the same FCOS head on its ViTDet pyramid,
trained for the same steps on built-in scenes (seed 0) with the encoder frozen (by default: at this budget the
frozen protocol measures the features, not how fast a fine-tune recovers from them), for >= 2 seeds. AP, AP50 and
AP75 come from pycocotools on scenes of a seed no training run uses. Grounding (aimv2 ground: OWL-ViT's head, the
scenes' referring expressions) is trained the same way on each encoder and scored by RefCOCO's metric, the share of
phrases whose top box overlaps theirs at IoU >= 0.5. A picture of predicted boxes on held-out scenes is written for
the AIMv2 encoder.

    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/detection_compare.py --work runs/detcmp

Writes benchmarks/results/detection_tiny_<device>.json, detection_tiny_boxes.png and detection_tiny_grounding.png
(phrases and boxes of the AIMv2 grounder on held-out scenes) (or --out-prefix). The
protocol's defaults (400 pretraining steps, the demo's) take hours on a laptop's CPU; --device cuda runs it on a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from aimv2.config import Config, load_config
from aimv2.config.detection import DetectionConfig
from aimv2.config.grounding import GroundingConfig
from aimv2.data.synthetic.boxes import SyntheticDetection, coco_document
from aimv2.data.synthetic.referring import SyntheticGrounding
from aimv2.eval.detection import coco_eval, draw, load_detector, predict_coco
from aimv2.eval.grounding import evaluate_grounding, load_grounder
from aimv2.train.detection_task import train_detection
from aimv2.train.grounding_task import train_grounding
from aimv2.train.tasks import train

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT_SEED = 12345
QUIET = ["train.progress=false", "log.tensorboard=false", "data.num_workers=1"]


def pretrain(work: Path, objective: str, steps: int, batch: int, depth: int, device: str) -> Path:
    out = work / f"pretrain-{objective}"
    cfg = load_config(
        ROOT / "configs/tiny-synthetic.yaml",
        [
            f"out_dir={out}",
            f"model.objective={objective}",
            f"model.encoder_overrides={{depth: {depth}}}",
            f"train.steps={steps}",
            f"train.batch_size={batch}",
            f"train.checkpoint_every={steps}",
            "optim.warmup_steps=20",
            f"train.device={device}",
            *QUIET,
        ],
        cls=Config,
    )
    t = time.perf_counter()
    last = train(cfg)
    print(f"pretrained {objective}: {steps} steps in {time.perf_counter() - t:.0f} s, last {last}", flush=True)
    return out


def detect(work: Path, name: str, encoder: str, depth: int, seed: int, args) -> dict:
    out = work / f"detect-{name}-seed{seed}"
    overrides = [
        f"out_dir={out}",
        f"seed={seed}",
        f"detect.encoder={encoder}",
        f"detect.train_blocks={args.train_blocks}",
        "detect.layer_decay=1.0",
        f"detect.out_channels={args.det_channels}",
        "detect.scales=[2.0, 1.0, 0.5]",  # strides 4, 8, 16 (+ 32): the scenes' objects are 9-22 px wide
        f"train.steps={args.det_steps}",
        f"train.batch_size={args.det_batch}",
        f"train.checkpoint_every={args.det_steps}",
        "train.log_every=25",
        "optim.warmup_steps=20",
        f"train.device={args.device}",
        *QUIET,
    ]
    if encoder.startswith("aimv2-"):
        overrides.append(f"detect.encoder_overrides={{depth: {depth}}}")
    cfg = load_config(ROOT / "configs/detect-tiny.yaml", overrides, cls=DetectionConfig)
    t = time.perf_counter()
    torch.manual_seed(seed)
    last = train_detection(cfg)
    model, _ = load_detector(out)
    model.to(args.device)
    data = SyntheticDetection(HELD_OUT_SEED, cfg.detect.image_size, args.eval_scenes)
    truth = coco_document(args.eval_scenes, HELD_OUT_SEED, cfg.detect.image_size)
    stats = coco_eval(truth, predict_coco(model, data, batch_size=32, device=args.device))
    row = {"encoder": name, "seed": seed, "final_loss": last.get("loss"), **stats}
    print(f"{name} seed {seed}: AP {stats['AP']:.3f} AP50 {stats['AP50']:.3f} ({time.perf_counter() - t:.0f} s)")
    return row


def ground(work: Path, name: str, encoder: str, depth: int, seed: int, args) -> dict:
    out = work / f"ground-{name}-seed{seed}"
    overrides = [
        f"out_dir={out}",
        f"seed={seed}",
        f"ground.encoder={encoder}",
        f"ground.train_blocks={args.train_blocks}",
        f"train.steps={args.det_steps}",
        f"train.batch_size={args.det_batch}",
        f"train.checkpoint_every={args.det_steps}",
        "train.log_every=25",
        "optim.warmup_steps=20",
        f"train.device={args.device}",
        *QUIET,
    ]
    if encoder.startswith("aimv2-"):
        overrides.append(f"ground.encoder_overrides={{depth: {depth}}}")
    cfg = load_config(ROOT / "configs/ground-tiny.yaml", overrides, cls=GroundingConfig)
    t = time.perf_counter()
    last = train_grounding(cfg)
    model, _ = load_grounder(out)
    data = SyntheticGrounding(HELD_OUT_SEED, cfg.ground.image_size, args.eval_scenes)
    stats, _ = evaluate_grounding(model.to(args.device), data, batch_size=32, device=args.device)
    row = {"encoder": name, "seed": seed, "final_loss": last.get("loss"), **stats}
    print(f"{name} seed {seed}: grounding accuracy {stats['accuracy']:.3f} ({time.perf_counter() - t:.0f} s)")
    return row


def picture(run: Path, path: Path, n: int = 8) -> None:
    model, meta = load_detector(run)
    data = SyntheticDetection(HELD_OUT_SEED, meta["detect"].image_size, n)
    tiles = []
    for i in range(n):
        img, _, _ = data[i]
        (det,) = model.predict(img[None].float() / 255)
        big = torch.nn.functional.interpolate(img[None].float(), scale_factor=4, mode="nearest")[0].byte()
        det = {**det, "boxes": det["boxes"] * 4}
        tiles.append(torch.from_numpy(np.array(draw(big, det, meta["categories"], 0.3))).permute(2, 0, 1))
    grid = make_grid(tiles, nrow=4, padding=4, pad_value=255)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


def grounding_picture(run: Path, path: Path, n: int = 8, scale: int = 4) -> None:
    """Held-out scenes with the phrase under each: the grounder's top box (green where IoU >= 0.5 with the true
    box, red otherwise) and the true box (white)."""
    from PIL import ImageDraw
    from torchvision.ops import box_iou
    from torchvision.utils import draw_bounding_boxes

    from aimv2.eval.grounding import ground_phrases

    model, meta = load_grounder(run)
    data = SyntheticGrounding(HELD_OUT_SEED, meta["ground"].image_size, n)
    tiles = []
    for i in range(n):
        fitted, phrase, truth = data.fitted(i)
        boxes, scores = ground_phrases(model, fitted, [phrase])
        hit = float(box_iou(boxes, truth[None])[0, 0]) >= 0.5
        big = torch.nn.functional.interpolate(fitted.pixels[None].float(), scale_factor=scale, mode="nearest")[0]
        drawn = draw_bounding_boxes(
            big.byte(), torch.cat([truth[None], boxes]) * scale, colors=["white", "lime" if hit else "red"], width=2
        )
        tile = Image.new("RGB", (drawn.shape[2], drawn.shape[1] + 30), "white")
        tile.paste(Image.fromarray(drawn.permute(1, 2, 0).numpy()), (0, 0))
        ImageDraw.Draw(tile).text((4, drawn.shape[1] + 8), f"{phrase} ({scores[0]:.2f})", fill="black")
        tiles.append(torch.from_numpy(np.array(tile)).permute(2, 0, 1))
    grid = make_grid(tiles, nrow=4, padding=4, pad_value=255)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="folder for the runs (reused when present)")
    p.add_argument("--pretrain-steps", type=int, default=400, help="default 400: the demo's")
    p.add_argument("--pretrain-batch", type=int, default=64)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--det-steps", type=int, default=150)
    p.add_argument("--det-batch", type=int, default=16)
    p.add_argument("--det-channels", type=int, default=32, help="pyramid and head width")
    p.add_argument("--train-blocks", type=int, default=0, help="0 frozen (default), -1 full fine-tune")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--eval-scenes", type=int, default=200)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out-prefix", type=Path, default=ROOT / "benchmarks/results/detection_tiny")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    encoders = {
        "aimv2": str(pretrain(args.work, "aimv2", args.pretrain_steps, args.pretrain_batch, args.depth, args.device)),
        "clip": str(pretrain(args.work, "clip", args.pretrain_steps, args.pretrain_batch, args.depth, args.device)),
        "random": "aimv2-tiny-patch8-64",
    }
    rows = [detect(args.work, name, enc, args.depth, s, args) for name, enc in encoders.items() for s in args.seeds]
    grounding = [ground(args.work, n, enc, args.depth, s, args) for n, enc in encoders.items() for s in args.seeds]
    summary = {}
    for name in encoders:
        aps = [r["AP"] for r in rows if r["encoder"] == name]
        ap50 = [r["AP50"] for r in rows if r["encoder"] == name]
        acc = [r["accuracy"] for r in grounding if r["encoder"] == name]
        summary[name] = {
            "AP_mean": statistics.mean(aps),
            "AP_std": statistics.stdev(aps) if len(aps) > 1 else 0.0,
            "AP50_mean": statistics.mean(ap50),
            "grounding_acc_mean": statistics.mean(acc),
            "grounding_acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
        }
    picture(
        args.work / f"detect-aimv2-seed{args.seeds[0]}", args.out_prefix.with_name(args.out_prefix.name + "_boxes.png")
    )
    grounding_picture(
        args.work / f"ground-aimv2-seed{args.seeds[0]}",
        args.out_prefix.with_name(args.out_prefix.name + "_grounding.png"),
    )
    result = {
        "protocol": {
            "pretrain": {"config": "configs/tiny-synthetic.yaml", "steps": args.pretrain_steps,
                         "batch_size": args.pretrain_batch, "depth": args.depth},
            "detector": {"config": "configs/detect-tiny.yaml", "kind": "fcos", "scales": [2.0, 1.0, 0.5],
                         "train_blocks": args.train_blocks, "out_channels": args.det_channels,
                         "steps": args.det_steps, "batch_size": args.det_batch},
            "grounder": {"config": "configs/ground-tiny.yaml", "train_blocks": args.train_blocks,
                         "steps": args.det_steps, "batch_size": args.det_batch},
            "eval": {"scenes": args.eval_scenes, "seed": HELD_OUT_SEED, "metric": "pycocotools COCOeval bbox",
                     "grounding_metric": "top box at IoU >= 0.5 (RefCOCO's)"},
            "seeds": args.seeds,
        },
        "runs": rows,
        "grounding_runs": grounding,
        "device": args.device,
        "summary": summary,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - t0),
    }  # fmt: skip
    path = args.out_prefix.with_name(args.out_prefix.name + f"_{args.device}.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    for name, s in summary.items():
        print(f"{name:<7} AP {s['AP_mean']:.3f} +- {s['AP_std']:.3f}  AP50 {s['AP50_mean']:.3f}  grounding "
              f"{s['grounding_acc_mean']:.3f} +- {s['grounding_acc_std']:.3f}")  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
