"""LiT training: a text tower and an attention-pool head learn to match a frozen AIMv2 encoder (``aimv2 lit``).

The same machinery as pretraining: the data sources, step streams and tokenizer (``sources.py``, ``data.py``), the
optimizer and schedule, DDP, metrics, atomic resumable checkpoints and the config/override system. What differs is
the model (``models/lit.py``) and the loss: the symmetric contrastive loss over the **global** batch. Under
torchrun every rank embeds its slice, gathers all ranks' embeddings with a gradient-carrying all-gather, and scores
its rows against every column. The gather's backward sums each rank's gradient into the slice's owner, and DDP
averages the parameter gradients, so the update is exactly that of one process on the whole batch.

Outputs in ``out_dir``: config.yaml, metrics.jsonl, tokenizer.json, checkpoints/ (resumable) and
``lit.safetensors`` (the whole model in our layout, the config in its header) for ``aimv2 zeroshot``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import LitConfig
from ..data.transforms import normalize
from ..models.lit import LiT, LiTConfig, contrastive_loss, text_config
from ..weights import LIT_FILE, load_encoder, save_lit
from . import checkpointing as ckpt
from .data import ShardStepBatches, StepBatches, make_loader
from .loop import NonFiniteGuard, _autocast, _check_same_config, _clip, _device, _saved_positions, save_run_state
from .metrics import MetricsLogger
from .optim import build_optimizer, lr_at, set_lr
from .parallelize import DistInfo, init_distributed, parallelize
from .sources import build_source

log = logging.getLogger("aimv2.train")


def build_lit_model(cfg: LitConfig, encoder, vocab_size: int, eos_id: int) -> LiT:
    """``encoder`` (frozen) and fresh towers sized by ``lit`` and the tokenizer."""
    text = text_config(
        cfg.lit.text_size,
        **{"vocab_size": vocab_size, "eos_id": eos_id, "context_length": cfg.data.context_length, **cfg.lit.text},
    )
    lit_cfg = LiTConfig(
        encoder=encoder.cfg,
        text=text,
        projection_dim=cfg.lit.projection_dim,
        init_temperature=cfg.lit.init_temperature,
        encoder_name=encoder.name,
    )
    return LiT(lit_cfg, encoder=encoder).freeze_encoder()


def gather_embeddings(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """[b, P] on each rank -> [W*b, P], rank order; gradients flow back to every rank's slice."""
    if not info.distributed:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def lit_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """This rank's share of the global contrastive loss (its rows against every rank's columns)."""
    all_img, all_txt = gather_embeddings(img, info), gather_embeddings(txt, info)
    return contrastive_loss(img, txt, scale, all_img, all_txt, offset=info.rank * img.shape[0])


def train_lit(cfg: LitConfig) -> dict:
    """Run (or resume) the LiT training described by ``cfg``; returns the last logged metrics."""
    cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    info = init_distributed("cuda" if cuda else "cpu")
    device = _device(cfg, info)
    out_dir = Path(cfg.out_dir)
    torch.manual_seed(cfg.seed)  # identical init on every rank
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _check_same_config(cfg, out_dir)
        ckpt.atomic_write(out_dir / "config.yaml", cfg.save)
    # every rank reads the encoder itself (no broadcast of a 300M-parameter model); a model name is a random one,
    # the same on every rank under the seed (a control run)
    encoder = load_encoder(cfg.lit.encoder, **cfg.lit.encoder_overrides)
    img_size = encoder.cfg.image_hw
    if info.is_main:
        source = build_source(cfg, out_dir, save=True, rank=info.rank, world_size=info.world_size, img_size=img_size)
    if info.distributed:
        dist.barrier()
    if not info.is_main:
        source = build_source(cfg, out_dir, save=False, rank=info.rank, world_size=info.world_size, img_size=img_size)
    tok = source.tokenizer
    torch.manual_seed(cfg.seed)
    model = build_lit_model(cfg, encoder, tok.vocab_size, tok.eos_id).to(device)
    step_model = parallelize(model, cfg.train, info, device)
    optimizer = build_optimizer(model, cfg.optim)
    meta = {"mean_std": cfg.data.mean_std}

    start_step, bad_in_row, skipped = 0, 0, 0
    state = ckpt.load_latest(out_dir)
    if state is not None:
        ckpt.restore(model, optimizer, state)
        start_step, bad_in_row, skipped = state["step"], state["bad_in_row"], state["skipped_steps"]
        ckpt.set_rng_state(state["rng"][min(info.rank, len(state["rng"]) - 1)])
        if source.shards is not None:
            saved = _saved_positions(state, info, cfg.data.num_workers)
            for name, samples, _ in source.shards:
                samples.skip = {w: pos.get(name, 0) for w, pos in saved.items()}
        if info.is_main:
            log.info("resuming %s from step %d", out_dir, start_step)
    if start_step >= cfg.train.steps:
        if info.is_main:
            log.info("%s already finished (%d steps); nothing to do", out_dir, start_step)
            if not (out_dir / LIT_FILE).exists():
                save_lit(model, out_dir / LIT_FILE, metadata=meta)
        return {}

    common = dict(
        global_batch=cfg.train.batch_size,
        rank=info.rank,
        world_size=info.world_size,
        start_step=start_step,
        steps=cfg.train.steps,
        encode_text=tok.encode,
        seed=cfg.seed,
        patch_size=model.cfg.encoder.patch_size,
    )
    if source.shards is not None:
        stream = ShardStepBatches(source.shards, **common)
    else:
        stream = StepBatches(source.sample_fn, length=source.length, **common)
    positions = {}
    if source.shards is not None:
        workers = range(max(1, cfg.data.num_workers))
        positions = {w: {name: s.skip.get(w, 0) for name, s, _ in source.shards} for w in workers}
    loader = make_loader(stream, cfg.data.num_workers, cfg.data.prefetch_factor, pin_memory=device.type == "cuda")
    autocast = _autocast(cfg, device)
    metrics = MetricsLogger(
        out_dir,
        cfg,
        start_step,
        enabled=info.is_main,
        total_steps=cfg.train.steps,
        desc="lit",
        show={"loss": "loss", "acc": "acc", "logit_scale": "scale"},
    )

    guard = NonFiniteGuard(bad_in_row, skipped, cfg.train.max_bad_steps, out_dir / ckpt.CKPT_DIR, info.is_main, metrics)
    model.train()
    model.encoder.eval()  # frozen: inference behaviour, whatever the towers do
    last: dict = {}
    t_last, samples_since = time.perf_counter(), 0
    for batch in loader:
        step = batch.step
        if source.shards is not None:
            positions[batch.worker] = batch.position
        lr = lr_at(step, cfg.train.steps, cfg.optim)
        set_lr(optimizer, lr)
        images = normalize(batch.images, cfg.data.mean_std, device)  # [b, 3, H, W]
        text = batch.text.to(device, non_blocking=True)  # [b, T]
        with autocast():
            out = step_model(images, text)
            loss = lit_loss(out.image_embeds, out.text_embeds, out.logit_scale, info)
        loss.backward()
        with torch.no_grad():  # in-batch retrieval accuracy (image -> its caption among this rank's), a cheap signal
            acc = (out.logits_per_image.argmax(1) == torch.arange(len(text), device=device)).float().mean()
        stats = torch.stack([loss.detach().float(), acc]) / info.world_size
        if info.distributed:
            dist.all_reduce(stats)
        grad_norm = _clip(model, cfg.optim.grad_clip)
        finite = bool(torch.isfinite(stats).all() and torch.isfinite(grad_norm))
        guard.step(optimizer, finite, step, "lower optim.lr or use train.precision=fp32")
        samples_since += cfg.train.batch_size
        done = step + 1
        if done % cfg.train.log_every == 0 or done == cfg.train.steps:
            dt = time.perf_counter() - t_last
            last = {
                "step": done,
                "loss": stats[0].item(),
                "acc": stats[1].item(),
                "logit_scale": out.logit_scale.item(),
                "lr": lr,
                "grad_norm": grad_norm.item(),
                "samples_per_s": samples_since / dt,
                "skipped_steps": guard.skipped,
            }
            metrics.log(last)
            t_last, samples_since = time.perf_counter(), 0
        metrics.advance(done, last)
        if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps:
            save_run_state(
                model,
                optimizer,
                out_dir,
                done,
                guard,
                cfg.train.keep_last,
                info,
                positions,
                export=lambda sd: _export(model, sd, out_dir / LIT_FILE, meta),
            )
    metrics.close()
    if info.distributed:
        dist.barrier()
    return last


def _export(model: LiT, model_sd: dict, path: Path, meta: dict) -> None:
    """lit.safetensors from the gathered state dict (a meta-device model: no second copy of the weights)."""
    with torch.device("meta"):
        export = LiT(dataclasses.replace(model.cfg))
    export.load_state_dict(model_sd, strict=True, assign=True)
    save_lit(export, path, metadata=meta)  # atomic
