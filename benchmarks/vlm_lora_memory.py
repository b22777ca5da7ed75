"""Peak memory of VLM stage 2 with LoRA (vlm.lora.rank > 0) against full stage 2 (the whole LM trains), and stage 1
(the LM frozen) as the floor: what LoRA saves is the LM's gradients and AdamW state.

Each variant trains a few steps in a fresh interpreter (peak_memory.py: on CPU the process's peak RSS above its
RSS before the run, with glibc's mmap threshold fixed so that RSS follows live tensors; on CUDA the allocator's peak
above what was allocated before). The block covers reading the encoder and the LM, building, and the steps, so
the numbers are whole-run peaks. The LM is a random Llama read from a folder (`aimv2 vlm tiny-lm --width W --depth
D`), the encoder a random aimv2-tiny at 32 px: nothing downloads.

    python benchmarks/vlm_lora_memory.py [--width 512] [--depth 8] [--device cpu|cuda]
        [--out benchmarks/results/vlm_lora_memory_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VARIANTS = {
    "stage 1 (LM frozen)": ["vlm.stage=1"],
    "stage 2, full LM": ["vlm.stage=2"],
    "stage 2, LoRA r=8 (q,k,v,o)": ["vlm.stage=2", "vlm.lora.rank=8", "vlm.lora.alpha=16"],
    "stage 2, LoRA r=64 all-linear": ["vlm.stage=2", "vlm.lora.rank=64", "vlm.lora.alpha=128",
                                      "vlm.lora.target_modules=all-linear"],
}  # fmt: skip


def child(args) -> None:
    sys.path.insert(0, str(HERE))
    from peak_memory import PeakMemory, release_freed_memory

    release_freed_memory()
    import torch

    from aimv2.config import load_config
    from aimv2.config.vlm import VLMConfig
    from aimv2.train.vlm_task import train_vlm

    overrides = [
        "vlm.encoder=aimv2-tiny-patch8-64",
        "vlm.encoder_overrides={depth: 2, img_size: 32}",
        f"vlm.lm={args.lm}",
        f"out_dir={args.run}",
        "vlm.max_length=64",
        f"train.batch_size={args.batch}",
        f"train.steps={args.steps}",
        f"train.checkpoint_every={args.steps}",
        f"train.device={args.device}",
        "train.progress=false",
        "data.num_workers=0",
        "log.tensorboard=false",
        *VARIANTS[args.variant],
    ]
    cfg = load_config(ROOT / "configs/vlm-tiny-stage2.yaml", overrides, VLMConfig)
    with PeakMemory(args.device) as m:
        last = train_vlm(cfg)
    from aimv2.weights.lm import load_vlm_run

    model, _, _ = load_vlm_run(args.run)
    trained = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n or n.startswith("projector"))
    if "full" in args.variant:
        trained += sum(p.numel() for p in model.lm.parameters())
    Path(args.out).write_text(json.dumps({"peak_mib": m.mib, "trained_params": trained, "loss": last.get("loss")}))
    del torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--lm", help=argparse.SUPPRESS)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        return child(args)

    from aimv2.weights.lm import build_tiny_lm

    result = {"device": args.device, "lm": {"width": args.width, "depth": args.depth}, "batch": args.batch,
              "steps": args.steps, "variants": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        lm = build_tiny_lm(Path(tmp) / "lm", width=args.width, depth=args.depth, heads=8)
        for i, variant in enumerate(VARIANTS):
            out = Path(tmp) / f"{i}.json"
            cmd = [sys.executable, __file__, "--variant", variant, "--lm", str(lm), "--run", f"{tmp}/run{i}",
                   "--batch", str(args.batch), "--steps", str(args.steps), "--device", args.device,
                   "--out", str(out)]  # fmt: skip
            subprocess.run(cmd, check=True)
            result["variants"][variant] = json.loads(out.read_text())
    full = result["variants"]["stage 2, full LM"]["peak_mib"]
    for variant, r in result["variants"].items():
        r["vs_full_stage2"] = None if not (full and r["peak_mib"]) else r["peak_mib"] / full
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f} MiB"
        print(
            f"{variant:<32} peak {peak:>9}  trained params {r['trained_params']:>11,}  x{r['vs_full_stage2'] or 0:.2f}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
