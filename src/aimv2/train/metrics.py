"""Training metrics: metrics.jsonl (always), TensorBoard, optional Weights & Biases, a progress bar,
and the FLOP count behind the MFU estimate."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch

log = logging.getLogger("aimv2.train")

# Dense peak FLOP/s per device (NVIDIA's datasheets) for bf16, and for fp32 without tensor cores; by the first
# substring of the CUDA name that matches, so the H100's PCIe and NVL cards come before the SXM one ("H100").
_PEAKS_BF16 = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "4090": 165e12,
}
_PEAKS_FP32 = {
    "H200": 67e12,
    "H100 PCIe": 51e12,
    "H100 NVL": 60e12,
    "H100": 67e12,
    "A100": 19.5e12,
    "L40S": 91.6e12,
    "A10G": 31.2e12,
    "4090": 82.6e12,
}


def peak_flops(device: torch.device, bf16: bool) -> float | None:
    """The device's dense peak, or None where it is not known (CPUs): then no MFU is reported."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    table = _PEAKS_BF16 if bf16 else _PEAKS_FP32
    return next((v for k, v in table.items() if k in name), None)


def _stack_flops(n_tokens: int, dim: int, hidden: int, depth: int) -> float:
    """Forward FLOPs of a stack of attention + SwiGLU blocks over n_tokens (no causal discount)."""
    return depth * (2 * n_tokens * (4 * dim * dim + 3 * dim * hidden) + 4 * n_tokens * n_tokens * dim)


def encoder_forward_flops(e, num_patches: int) -> float:
    """Forward FLOPs of an encoder of config ``e`` over ``num_patches`` patches: blocks and patch embedding."""
    blocks = _stack_flops(num_patches, e.embed_dim, e.mlp_hidden_dim, e.depth)
    return blocks + 2 * num_patches * e.patch_dim * e.embed_dim  # + the patch embedding


def flops_per_sample(model, num_patches: int, text_len: int) -> float:
    """Training FLOPs of one image-text pair: 3x the forward (forward + backward), matmuls and attention; a frozen
    encoder (LiT) runs forward only, and so does a distillation teacher (at its own grid), whose features the
    student's projection maps to."""
    e = model.encoder.cfg
    enc = encoder_forward_flops(e, num_patches)
    frozen = not any(p.requires_grad for p in model.encoder.parameters())
    fwd, teacher_fwd = 0.0, 0.0
    teacher = getattr(model, "teacher", None)  # distillation: forward only, outside the trained modules
    if teacher is not None:
        t = teacher.cfg
        teacher_fwd = encoder_forward_flops(t, t.grid_size[0] * t.grid_size[1])
        fwd += 2 * num_patches * e.embed_dim * t.embed_dim  # the projection
    if getattr(model, "decoder", None) is not None:  # AIMv2: one decoder over image + text
        d = model.decoder.cfg
        seq = num_patches + text_len
        fwd += 2 * num_patches * e.embed_dim * d.embed_dim  # image projection
        hidden = d.mlp_hidden_dim * (d.moe.top_k if d.moe.enabled else 1)  # a token runs through top_k experts
        fwd += _stack_flops(seq, d.embed_dim, hidden, d.depth)
        fwd += 2 * num_patches * d.embed_dim * e.patch_dim + 2 * text_len * d.embed_dim * d.vocab_size  # heads
    for name, seq in (("pixel_decoder", num_patches), ("text_decoder", num_patches + text_len)):  # baselines
        dec = getattr(model, name, None)
        if dec is not None:
            d = dec.cfg
            fwd += 2 * num_patches * e.embed_dim * d.embed_dim  # image projection
            fwd += _stack_flops(seq, d.embed_dim, d.mlp_hidden_dim, d.depth)
            fwd += 2 * num_patches * d.embed_dim * e.patch_dim if name == "pixel_decoder" else 0
            fwd += 2 * text_len * d.embed_dim * d.vocab_size if name == "text_decoder" else 0
    text = getattr(model, "text", None)  # LiT / CLIP: the text tower (head and projections neglected)
    if text is not None:
        t = text.cfg
        fwd += _stack_flops(text_len, t.embed_dim, t.mlp_hidden_dim, t.depth)
    return 3 * fwd + (1 if frozen else 3) * enc + teacher_fwd


def keep_metrics_until(path: Path, step: int) -> None:
    """Cut ``metrics.jsonl`` after its last line of a step <= ``step``: the lines past the resumed step were logged
    by the killed run after its last checkpoint and will be logged again. The file is only ever appended to and
    truncated, never rewritten, so a kill here leaves it whole; a torn last line (a crash mid-write, a full disk)
    or any line that is not JSON ends what is kept, with a warning naming the file and the line."""
    keep = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                row_step = int(row["step"])
            except (ValueError, KeyError, TypeError):
                if line.strip():
                    log.warning("%s line %d is not a metrics record (a torn write?); it and what follows are dropped",
                                path, number)  # fmt: skip
                break
            if not line.endswith(b"\n") or row_step > step:
                break
            keep += len(line)
    if keep < path.stat().st_size:
        os.truncate(path, keep)


class MetricsLogger:
    """Writes metrics on rank 0 only. On resume, drops lines past the resumed step (keep_metrics_until)."""

    def __init__(
        self,
        out_dir: Path,
        cfg,
        start_step: int,
        enabled: bool,
        total_steps: int,
        desc: str = "pretrain",
        show: dict[str, str] | None = None,
    ):
        self.enabled = enabled
        # metric -> short name, for the log line and the progress bar
        self.show = show or {"loss": "loss", "image_loss": "img", "text_loss": "txt"}
        self.path = Path(out_dir) / "metrics.jsonl"
        self.tb = self.wandb = self.bar = None
        if not enabled:
            return
        if self.path.exists():
            keep_metrics_until(self.path, start_step)
        self.file = open(self.path, "a")
        if cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=start_step + 1)
        if cfg.log.wandb:
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError("log.wandb=true needs the wandb package: pip install 'aimv2[wandb]'") from e
            self.wandb = wandb.init(
                project=cfg.log.wandb_project,
                config=cfg.to_dict(),
                dir=str(out_dir),
                resume="allow",
                name=Path(out_dir).name,
            )
        if cfg.train.progress:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps, initial=start_step, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True
            )

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        step = row["step"]
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float):
                    self.tb.add_scalar(f"train/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=step)
        if self.bar is None:
            shown = " ".join(f"{short} {row[k]:.4f}" for k, short in self.show.items() if k in row)
            log.info("step %d %s lr %.2e %.1f samples/s", step, shown, row["lr"], row["samples_per_s"])

    def advance(self, done: int, last: dict) -> None:
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            if last:
                self.bar.set_postfix({s: f"{last[k]:.3f}" for k, s in self.show.items() if k in last}, refresh=False)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.bar is not None:
            self.bar.close()
