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
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..models.heads import AttentionPoolHead

METHODS = ("attentive", "linear", "knn")


class AttentiveProbe(nn.Module):
    """Non-affine BatchNorm of the tokens [B, N, D], then attentive pooling by learned queries straight into the
    classes (models/heads.py, the same head as LiT's) -> [B, C]."""

    def __init__(self, dim: int, num_classes: int, num_heads: int, num_queries: int = 1, batchnorm: bool = True):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if batchnorm else nn.Identity()
        self.head = AttentionPoolHead(dim, num_heads, num_queries=num_queries, out_dim=num_classes)
        with torch.no_grad():
            self.head.cls_token.normal_(std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(x.transpose(1, 2)).transpose(1, 2)  # [B, N, D], statistics over batch and tokens
        return self.head(x)  # [B, C]


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
    num_heads: int | None = None  # attentive: None = the trunk's head count (run_probe fills it in)
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
            xb = x[idx].to(device, non_blocking=True).float()  # features may be stored in bf16
            yb = y[idx].to(device, non_blocking=True)
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
    chunks = (x[i : i + batch_size].to(device).float() for i in range(0, x.shape[0], batch_size))
    return torch.cat([head(xb).float().cpu() for xb in chunks])


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


def per_class_accuracy(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> list[float | None]:
    """Percent correct among the samples of each class (None for a class with no sample)."""
    total = torch.bincount(y, minlength=num_classes)
    right = torch.bincount(y[pred == y], minlength=num_classes)
    return [100.0 * r / t if t else None for r, t in zip(right.tolist(), total.tolist(), strict=True)]


def confusion_matrix(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts [C, C]: row = true class, column = predicted class."""
    return torch.bincount(y * num_classes + pred, minlength=num_classes * num_classes).reshape(num_classes, -1)


def fit_predict(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    num_classes: int,
    cfg: ProbeConfig,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
) -> tuple[torch.Tensor, dict, nn.Module | None]:
    """Fit ``cfg.method`` on the training features; scores [n_val, C] of ``val_x``, the hyperparameters used and
    the trained head (None for knn, which keeps no head).

    The head's initialization is seeded by ``cfg.seed`` without touching the global RNG.
    """
    if cfg.method == "knn":
        scores = knn_scores(train_x, train_y, val_x, num_classes, cfg.k, cfg.temperature, device)
        return scores, {"k": cfg.k, "temperature": cfg.temperature}, None
    dim = train_x.shape[-1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if cfg.method == "attentive":
            if train_x.ndim != 3:
                raise ValueError(f"the attentive probe needs token features [n, N, D], got {tuple(train_x.shape)}")
            if cfg.num_heads is None:
                raise ValueError("the attentive probe needs num_heads (the trunk's head count)")
            head = AttentiveProbe(dim, num_classes, cfg.num_heads, cfg.num_queries, cfg.batchnorm)
        else:
            head = LinearProbe(dim, num_classes, cfg.batchnorm)
    losses = train_head(head, train_x, train_y, cfg, device, progress)
    scores = predict(head, val_x, device)
    hparams = {k: v for k, v in asdict(cfg).items() if k not in ("method", "k", "temperature")}
    if cfg.method == "linear":
        hparams = {k: v for k, v in hparams.items() if k not in ("num_heads", "num_queries")}
    hparams["final_train_loss"] = round(losses[-1], 6) if losses else None
    return scores, hparams, head.eval().cpu()


def probe_features(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    cfg: ProbeConfig,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
    keep_head: bool = False,
) -> dict:
    """Fit ``cfg.method`` on the training features and score the validation ones.

    Returns ``{"method", "top1", ["top5",] "per_class", "confusion", "n_train", "n_val", "num_classes",
    ...hyperparameters}``; accuracies in percent, ``per_class`` a list by label, ``confusion`` the [C, C] counts
    (rows true, columns predicted) as nested lists; with ``keep_head`` also ``"head"``, the trained head (None for
    knn), for saving the classifier.
    """
    scores, hparams, head = fit_predict(train_x, train_y, val_x, num_classes, cfg, device, progress)
    pred = scores.argmax(dim=1)
    result = {"method": cfg.method, **topk_accuracy(scores, val_y)}
    result["per_class"] = per_class_accuracy(pred, val_y, num_classes)
    result["confusion"] = confusion_matrix(pred, val_y, num_classes).tolist()
    result.update(n_train=int(train_x.shape[0]), n_val=int(val_x.shape[0]), num_classes=num_classes, **hparams)
    if keep_head:
        result["head"] = head
    return result


# --- hyperparameter selection on a held-out part of train ---------------------------------------------------------


def stratified_split(labels: torch.Tensor, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, held) index tensors: ``fraction`` of each class's samples held out (rounded; at least one of a class
    with two or more samples, never all of a class), chosen by a generator seeded with ``seed``. Disjoint, sorted."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction}")
    gen = torch.Generator().manual_seed(seed)
    held = []
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().flatten()
        n = idx.numel()
        k = min(n - 1, max(1 if n >= 2 else 0, round(fraction * n)))
        held.append(idx[torch.randperm(n, generator=gen)[:k]])
    held_idx = torch.cat(held).sort().values if held else torch.empty(0, dtype=torch.long)
    if held_idx.numel() == 0:
        raise ValueError("the held-out split is empty: every class has a single training sample")
    mask = torch.ones(labels.numel(), dtype=torch.bool)
    mask[held_idx] = False
    return mask.nonzero().flatten(), held_idx


def grid_search(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    held_x: torch.Tensor,
    held_y: torch.Tensor,
    num_classes: int,
    cfg: ProbeConfig,
    lrs: list[float],
    wds: list[float],
    device: torch.device | str = "cpu",
    progress: bool | None = None,
    log=None,
) -> tuple[dict, list[dict]]:
    """Train ``cfg`` with every (lr, weight decay) pair on (train_x, train_y), score top-1 on the held-out part.

    Takes no validation data at all: selection cannot see val. Returns ``({"lr", "weight_decay"} of the best pair,
    table)``, best = highest held-out top-1, ties broken by the lower lr, then the lower weight decay. ``log`` is
    called with a readable line per pair.
    """
    if cfg.method == "knn":
        raise ValueError("the lr x wd grid applies to the attentive and linear probes, not knn")
    table = []
    for lr in lrs:
        for wd in wds:
            trial = replace(cfg, lr=lr, weight_decay=wd)
            scores, _, _ = fit_predict(train_x, train_y, held_x, num_classes, trial, device, progress)
            top1 = topk_accuracy(scores, held_y, (1,))["top1"]
            table.append({"lr": lr, "weight_decay": wd, "holdout_top1": top1})
            if log is not None:
                log(f"  lr {lr:<8g} wd {wd:<6g} held-out top-1 {top1:6.2f}%")
    best = min(table, key=lambda r: (-r["holdout_top1"], r["lr"], r["weight_decay"]))
    return {"lr": best["lr"], "weight_decay": best["weight_decay"]}, table
