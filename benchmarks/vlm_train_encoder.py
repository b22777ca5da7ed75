"""VLM stage 2 with the encoder frozen (the paper), unfrozen at the LM's lr (one lr for everything, what the
reports of a collapsing loss / NaN gradient norm do), and unfrozen with the recipe (vlm.encoder_lr_mult,
vlm.encoder_warmup_steps, optionally vlm.encoder_layer_decay): loss, gradient norm and held-out VQA accuracy.

Tiny and on CPU: a random aimv2-tiny encoder at 16 px, the tiny Llama, built-in scenes; nothing downloads.

    python benchmarks/vlm_train_encoder.py [--steps 200] [--out benchmarks/results/vlm_train_encoder_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch

from aimv2.config import load_config
from aimv2.config.vlm import VLMConfig
from aimv2.eval.vqa import evaluate_vqa, synthetic_vqa_samples
from aimv2.train.vlm_task import train_vlm
from aimv2.weights import create_model, save_encoder
from aimv2.weights.lm import build_tiny_lm, load_vlm_run

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ["vlm.encoder_lr_mult=0.1", "vlm.encoder_warmup_steps=50"]  # the tested recipe (not the defaults)
VARIANTS = {
    "frozen encoder": [],
    "unfrozen, one lr (mult 1, no warmup)": ["vlm.train_encoder=true", "vlm.encoder_lr_mult=1.0",
                                             "vlm.encoder_warmup_steps=0"],
    "unfrozen, recipe (mult 0.1, warmup 50)": ["vlm.train_encoder=true", *RECIPE],
    "unfrozen, recipe + layer decay 0.75": ["vlm.train_encoder=true", *RECIPE, "vlm.encoder_layer_decay=0.75"],
}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--scenes", type=int, default=40)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    result = {"steps": args.steps, "lr": args.lr, "scenes": args.scenes, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        torch.manual_seed(1)
        save_encoder(create_model("aimv2-tiny-patch8-64", depth=4, img_size=16), d / "encoder.safetensors")
        lm = build_tiny_lm(d / "lm")
        for i, (name, extra) in enumerate(VARIANTS.items()):
            run = d / f"run{i}"
            overrides = [f"vlm.encoder={d / 'encoder.safetensors'}", "vlm.encoder_overrides={depth: 4, img_size: 16}",
                         f"vlm.lm={lm}", f"out_dir={run}", "train.batch_size=16", f"train.steps={args.steps}",
                         f"train.checkpoint_every={args.steps}", "train.log_every=5", f"optim.lr={args.lr}",
                         "train.progress=false", "data.num_workers=0", "log.tensorboard=false", *extra]  # fmt: skip
            train_vlm(load_config(ROOT / "configs/vlm-tiny-stage2.yaml", overrides, VLMConfig))
            rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            rows = [r for r in rows if "loss" in r]
            norms = [r.get("grad_norm", float("nan")) for r in rows]
            model, tok, cfg = load_vlm_run(run)
            vqa = evaluate_vqa(model, tok, synthetic_vqa_samples(args.scenes, model.image_size, seed=cfg.seed))
            r = {
                "loss_first": rows[0]["loss"],
                "loss_last": rows[-1]["loss"],
                "loss_min": min(r["loss"] for r in rows),
                "grad_norm_max": max(norms),
                "grad_norm_last": norms[-1],
                "non_finite_grad_norms": sum(not math.isfinite(n) for n in norms),
                "vqa_accuracy": vqa["accuracy"],
                **{k: v for k, v in vqa.items() if k.startswith("accuracy/")},
            }
            result["variants"][name] = r
            print(f"{name:<40} loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}  grad norm max "
                  f"{r['grad_norm_max']:.2f} last {r['grad_norm_last']:.2f}  vqa {r['vqa_accuracy']:.3f}",
                  flush=True)  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
