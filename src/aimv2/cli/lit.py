"""`aimv2 lit CONFIG [key=value ...]`."""

from __future__ import annotations

import logging
import os

DESCRIPTION = """Train a text tower and an attention-pool head against a frozen AIMv2 encoder with the symmetric
contrastive (CLIP) loss: LiT, the paper's zero-shot evaluation. Same data, tokenizer, optimizer, DDP, metrics and
resumable checkpoints as `aimv2 pretrain`; the encoder is given by lit.encoder (a pretraining run folder, an
encoder checkpoint in any layout, or a model name for a random-init control).

Outputs in out_dir:
  config.yaml       the resolved config
  metrics.jsonl     one JSON object per logged step (loss, acc = in-batch image->text top-1, logit_scale, lr,
                    grad_norm, samples_per_s)
  tokenizer.json    the tokenizer the run used (zero-shot prompts are encoded with it)
  checkpoints/      resumable training state
  lit.safetensors   the LiT model in our layout, its config in the header (`aimv2 zeroshot OUT_DIR ...`)

Re-running the same command on an existing out_dir resumes. Multi-process (embeddings all-gathered, so the
contrastive batch is the global batch): torchrun --nproc_per_node=N -m aimv2 lit CONFIG

examples:
  aimv2 lit configs/lit-tiny.yaml lit.encoder=runs/tiny-synthetic
  aimv2 lit configs/lit-tiny.yaml lit.encoder=aimv2-tiny-patch8-64 lit.encoder_overrides.depth=6 out_dir=runs/lit-random
"""


def add_arguments(p) -> None:
    p.add_argument("config", help="YAML config file (see configs/lit-tiny.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. lit.encoder=runs/tiny")
    p.add_argument("--quiet", action="store_true", help="only warnings and errors on stderr")


def run(args) -> int:
    from ..config import LitConfig, load_config
    from ..train import train_lit

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    cfg = load_config(args.config, args.overrides, cls=LitConfig)
    if args.quiet:
        cfg.train.progress = False
    last = train_lit(cfg)
    if last and int(os.environ.get("RANK", "0")) == 0:
        print(
            f"done: step {last['step']} loss {last['loss']:.4f} in-batch acc {last['acc']:.3f}; "
            f"model at {cfg.out_dir}/lit.safetensors"
        )
    return 0
