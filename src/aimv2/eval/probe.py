"""Probes on frozen features: attentive (the AIMv1/AIMv2 protocol), linear and kNN.

The trunk is frozen, so its features are computed once (and cached, see ``feature_cache.py``) and the probe trains
on them directly: an epoch over ImageNet's patch tokens costs a few small matmuls, not a ViT forward.

Attentive probe (AIMv1, kept by AIMv2): one learned query with no q projection attends over the patch tokens
through bias-free k and v projections, with as many heads as the trunk; the tokens are first normalized by a
non-affine BatchNorm; outputs are averaged over queries and a linear layer classifies. Optimizer: AdamW (0.9, 0.999),
cosine schedule with linear warmup, gradient clipping at 3.0.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

METHODS = ("attentive", "linear", "knn")


class AttentiveProbe(nn.Module):
    """Cross-attention pooling of tokens [B, N, D] by learned queries, then a linear classifier -> [B, C]."""

    def __init__(self, dim: int, num_classes: int, num_heads: int, num_queries: int = 1, batchnorm: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"feature width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if batchnorm else nn.Identity()
        self.query = nn.Parameter(torch.randn(1, num_queries, dim) * 0.02)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        H, Q = self.num_heads, self.query.shape[1]
        x = self.bn(x.transpose(1, 2)).transpose(1, 2)  # [B, N, D], statistics over batch and tokens
        q = self.query.expand(B, Q, D).reshape(B, Q, H, D // H).transpose(1, 2)  # [B, H, Q, hd]
        k = self.k(x).reshape(B, N, H, D // H).transpose(1, 2)  # [B, H, N, hd]
        v = self.v(x).reshape(B, N, H, D // H).transpose(1, 2)  # [B, H, N, hd]
        pooled = F.scaled_dot_product_attention(q, k, v)  # [B, H, Q, hd]
        pooled = pooled.transpose(1, 2).reshape(B, Q, D).mean(dim=1)  # [B, D]
        return self.linear(pooled)  # [B, C]


class LinearProbe(nn.Module):
    """Mean of the tokens (if given [B, N, D]) -> non-affine BatchNorm -> linear classifier -> [B, C]."""

    def __init__(self, dim: int, num_classes: int, batchnorm: bool = True):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if batchnorm else nn.Identity()
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            x = x.mean(dim=1)  # [B, D]
        return self.linear(self.bn(x))  # [B, C]


@dataclass
class ProbeConfig:
    """Hyperparameters of a probe. Defaults follow the papers, with 50 epochs (feature-level epochs are cheap)."""

    method: str = "attentive"
    epochs: int = 50
    lr: float = 1e-3
    weight_decay: float = 0.1
    batch_size: int = 256
    warmup_epochs: float = 5.0
    clip_grad: float = 3.0
    betas: tuple[float, float] = (0.9, 0.999)
    seed: int = 0
    num_heads: int = 8  # attentive: set to the trunk's head count
    num_queries: int = 1
    batchnorm: bool = True
    k: int = 20  # knn: neighbours
    temperature: float = 0.07  # knn: vote weight exp(cos / T)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """lr multiplier: linear warmup from ~0 to 1 over ``warmup`` steps, then cosine to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _param_groups(head: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; biases and the learned query are not decayed."""
    decay = [p for n, p in head.named_parameters() if p.ndim >= 2 and n != "query"]
    rest = [p for n, p in head.named_parameters() if not (p.ndim >= 2 and n != "query")]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def train_head(
    head: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: ProbeConfig,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
) -> list[float]:
    """Train ``head`` on features x [n, ...] and labels y [n]; returns the mean loss of each epoch.

    Batches are drawn by a generator seeded with ``cfg.seed``, so a run is reproducible.
    """
    device = torch.device(device)
    head.to(device).train()
    n = x.shape[0]
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    warmup = min(total, round(cfg.warmup_epochs * steps_per_epoch))
    opt = torch.optim.AdamW(_param_groups(head, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, total, warmup))
    gen = torch.Generator().manual_seed(cfg.seed)
    progress = sys.stderr.isatty() if progress is None else progress
    losses = []
    for _ in tqdm(range(cfg.epochs), desc=f"{cfg.method} probe", unit="epoch", file=sys.stderr, disable=not progress):
        order = torch.randperm(n, generator=gen)
        total_loss = 0.0
        for i in range(0, n, cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            if idx.numel() == 1 and n > 1:  # BatchNorm needs 2 samples; fold a lone last sample into no step
                continue
            xb, yb = x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)
            loss = F.cross_entropy(head(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad > 0:
                nn.utils.clip_grad_norm_(head.parameters(), cfg.clip_grad)
            opt.step()
            sched.step()
            total_loss += loss.item() * idx.numel()
        losses.append(total_loss / n)
    return losses


def topk_accuracy(scores: torch.Tensor, y: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Percent of rows of scores [n, C] whose label is among the k highest, for each k <= C."""
    out = {}
    for k in ks:
        if k <= scores.shape[1]:
            hit = (scores.topk(k, dim=1).indices == y[:, None]).any(dim=1)  # [n]
            out[f"top{k}"] = 100.0 * hit.float().mean().item()
    return out


@torch.no_grad()
def predict(head: nn.Module, x: torch.Tensor, device: torch.device | str = "cpu", batch_size: int = 1024):
    """Logits [n, C] of a trained head, in eval mode (BatchNorm uses its running statistics)."""
    head.to(device).eval()
    return torch.cat([head(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, x.shape[0], batch_size)])


@torch.no_grad()
def knn_scores(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    device: torch.device | str = "cpu",
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted kNN votes [n_val, C]: cosine similarity, the k nearest vote with weight exp(sim / T) (DINO's rule)."""
    if train_x.ndim == 3:
        train_x, val_x = train_x.mean(dim=1), val_x.mean(dim=1)  # [n, D]
    bank = F.normalize(train_x.float().to(device), dim=1)  # [n_train, D]
    labels = train_y.to(device)
    k = min(k, bank.shape[0])
    out = []
    for i in range(0, val_x.shape[0], chunk):
        q = F.normalize(val_x[i : i + chunk].float().to(device), dim=1)  # [b, D]
        sim, nn_idx = (q @ bank.T).topk(k, dim=1)  # [b, k]
        votes = torch.zeros(q.shape[0], num_classes, device=device)
        votes.scatter_add_(1, labels[nn_idx], (sim / temperature).exp())  # [b, C]
        out.append(votes.cpu())
    return torch.cat(out)


def run_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    cfg: ProbeConfig,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
) -> dict:
    """Fit ``cfg.method`` on the training features and score the validation ones.

    Returns ``{"method", "top1", ["top5",] "n_train", "n_val", "num_classes", ...hyperparameters}``; accuracies in
    percent. The head's initialization is seeded by ``cfg.seed`` without touching the global RNG.
    """
    if cfg.method == "knn":
        scores = knn_scores(train_x, train_y, val_x, num_classes, cfg.k, cfg.temperature, device)
        hparams = {"k": cfg.k, "temperature": cfg.temperature}
    else:
        dim = train_x.shape[-1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            if cfg.method == "attentive":
                if train_x.ndim != 3:
                    raise ValueError(f"the attentive probe needs token features [n, N, D], got {tuple(train_x.shape)}")
                head = AttentiveProbe(dim, num_classes, cfg.num_heads, cfg.num_queries, cfg.batchnorm)
            else:
                head = LinearProbe(dim, num_classes, cfg.batchnorm)
        losses = train_head(head, train_x, train_y, cfg, device, progress)
        scores = predict(head, val_x, device)
        hparams = {k: v for k, v in asdict(cfg).items() if k not in ("method", "k", "temperature")}
        if cfg.method == "linear":
            hparams = {k: v for k, v in hparams.items() if k not in ("num_heads", "num_queries")}
        hparams["final_train_loss"] = round(losses[-1], 6) if losses else None
    result = {"method": cfg.method, **topk_accuracy(scores, val_y)}
    result.update(n_train=int(train_x.shape[0]), n_val=int(val_x.shape[0]), num_classes=num_classes, **hparams)
    return result
