"""`aimv2 pretrain CONFIG [key=value ...]`."""

from __future__ import annotations

import logging
import os

DESCRIPTION = """Pretrain a vision encoder with the AIMv2 objective (next-patch regression + captioning).

A run is one YAML file plus dotted overrides; every key has a default (see src/aimv2/config/schema.py).
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

model.objective picks the baselines (cap, cappa, aimv1, clip) or distillation (distill): a student
encoder trained on a frozen teacher's patch features, model.distill.teacher=RUN_FOLDER|FILE|NAME.

Multi-process: torchrun --nproc_per_node=N -m aimv2 pretrain CONFIG train.parallel=fsdp

--dry-run shows what the run would be and does nothing else (no out_dir, no lock, no data read
beyond listing files): the ??? values still to give, parameter counts (encoder / decoder / total)
of the model built on the meta device, FLOPs of one training step (forward + backward, measured
with torch's FlopCounterMode), the data sources (weight, how many shards each pattern expands to
and how many exist), steps per epoch where the data's size is known, the global batch and the
schedule. The paper's runs are in configs/paper/ (AIMv2 L/H/1B/3B at 224, high-res 336/448,
native); see what one would do before renting the GPUs for it.

optim.weight_decay is torch AdamW's (p <- p * (1 - lr_t * wd)); optim.decoupled_weight_decay is
Apple's fully decoupled decay (p <- p * (1 - wd * lr_t / lr), the paper's 1e-4). Set one.

examples:
  aimv2 pretrain configs/tiny-synthetic.yaml
  aimv2 pretrain configs/tiny-synthetic.yaml train.steps=50 out_dir=runs/smoke data.num_workers=0
  aimv2 pretrain configs/tiny-synthetic.yaml train.precision=bf16 optim.lr=5e-4
  aimv2 pretrain configs/tiny-synthetic.yaml model.objective=distill model.distill.teacher=runs/tiny-synthetic
  aimv2 pretrain configs/paper/aimv2-large-224.yaml --dry-run
  aimv2 pretrain configs/paper/aimv2-3b-224.yaml --dry-run data.mixture.0.shards='dfn/{00000..09999}.tar'
"""


def add_arguments(p) -> None:
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=100")
    p.add_argument("--quiet", action="store_true", help="only warnings and errors on stderr")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="resolve the config and report model size, FLOPs/step, data sources, steps/epoch and schedule; "
        "train nothing, write nothing",
    )


def run(args) -> int:
    from ..config import load_config
    from ..train import train

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    if args.dry_run:
        from ..train.dry_run import dry_run, format_dry_run

        print(format_dry_run(dry_run(args.config, args.overrides)))
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.quiet:
        cfg.train.progress = False
    last = train(cfg)
    if last and int(os.environ.get("RANK", "0")) == 0:
        parts = [("image", "image_loss"), ("text", "text_loss")]
        if cfg.model.objective == "distill":  # the teacher's features first; image and text with the AIMv2 part
            parts = [("cosine", "distill_cosine"), ("smooth-l1", "distill_smooth_l1")] + (
                parts if cfg.model.distill.aimv2 > 0 else []
            )
        shown = ", ".join(f"{name} {last[key]:.4f}" for name, key in parts)
        print(
            f"done: step {last['step']} loss {last['loss']:.4f} ({shown}); encoder at {cfg.out_dir}/encoder.safetensors"
        )
    return 0
