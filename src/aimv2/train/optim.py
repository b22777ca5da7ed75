"""AdamW with fully decoupled weight decay, the paper's parameter groups, warmup + cosine schedule.

Fully decoupled decay shrinks p <- p * (1 - wd * lr_t / lr_peak): the decay follows the schedule's
shape but not its scale. torch's AdamW applies p <- p * (1 - lr_t * wd'), so wd' = wd / lr_peak gives
exactly that update while keeping torch's fused/foreach kernels.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimConfig

# Parameters that never decay, besides every 1-D tensor (biases, norm scales).
NO_DECAY_NAMES = ("pos_embed", "text_pos", "bos", "cls_token", "logit_scale")


def param_groups(model: nn.Module, weight_decay: float, lr_peak: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.split(".")[-1]
        if p.ndim < 2 or leaf in NO_DECAY_NAMES or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay / lr_peak},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warmup from init_lr to lr over warmup_steps, then cosine to min_lr at total_steps."""
    if step < cfg.warmup_steps:
        return cfg.init_lr + (cfg.lr - cfg.init_lr) * step / cfg.warmup_steps
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
