"""`aimv2 pretrain CONFIG [key=value ...]`."""

from __future__ import annotations

import logging
import os

DESCRIPTION = """Pretrain a vision encoder with the AIMv2 objective (next-patch regression + captioning).

A run is one YAML file plus dotted overrides; every key has a default (see src/aimv2/config.py).
Outputs in out_dir:
  config.yaml          the resolved config
  metrics.jsonl        one JSON object per logged step (loss, image_loss, text_loss, lr, grad_norm,
                       samples_per_s, tokens_per_s, mfu where the device's peak is known)
  tokenizer.json       the tokenizer the run used
  checkpoints/         resumable training state (the last train.keep_last)
  encoder.safetensors  the encoder in Apple's layout (aimv2.create_model, timm, `aimv2 convert --to hf`)
  tensorboard/         TensorBoard logs (log.tensorboard=true)

Re-running the same command on an existing out_dir resumes from its last checkpoint; the result is
bit-identical to an uninterrupted run. Raising train.steps continues a finished run.

Multi-process: torchrun --nproc_per_node=N -m aimv2 pretrain CONFIG train.parallel=fsdp

examples:
  aimv2 pretrain configs/tiny-synthetic.yaml
  aimv2 pretrain configs/tiny-synthetic.yaml train.steps=50 out_dir=runs/smoke data.num_workers=0
  aimv2 pretrain configs/tiny-synthetic.yaml train.precision=bf16 optim.lr=5e-4
"""


def add_arguments(p) -> None:
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=100")
    p.add_argument("--quiet", action="store_true", help="only warnings and errors on stderr")


def run(args) -> int:
    from ..config import load_config
    from ..train import train

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    cfg = load_config(args.config, args.overrides)
    if args.quiet:
        cfg.train.progress = False
    last = train(cfg)
    if last and int(os.environ.get("RANK", "0")) == 0:
        print(
            f"done: step {last['step']} loss {last['loss']:.4f} (image {last['image_loss']:.4f}, "
            f"text {last['text_loss']:.4f}); encoder at {cfg.out_dir}/encoder.safetensors"
        )
    return 0
