"""The pretraining loop: one process or many under torchrun, resumable bit for bit.

Re-running the same command on an existing ``out_dir`` resumes from its last checkpoint. Since the data
position is the step and every random draw is keyed by step or sample index, a run killed at any moment
and resumed ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import Config
from ..data.faults import FAULT_KINDS
from ..data.transforms import normalize
from . import checkpointing as ckpt
from .data import Batch, ShardStepBatches, StepBatches, make_loader
from .init_from import init_from
from .metrics import MetricsLogger, flops_per_sample, peak_flops
from .native import NativeSchedule
from .optim import build_optimizer, lr_at, set_lr
from .parallelize import DistInfo, init_distributed, parallelize
from .runs import build_model
from .sources import build_source

log = logging.getLogger("aimv2.train")


class TrainingError(RuntimeError):
    pass


class NonFiniteGuard:
    """Takes the optimizer step only when the loss and the gradient norm are finite; skipped steps are counted,
    and after ``max_bad`` in a row the run stops with the last checkpoint intact (a bad step never touches it)."""

    def __init__(self, bad_in_row: int, skipped: int, max_bad: int, ckpt_dir: Path, is_main: bool, metrics):
        self.bad_in_row, self.skipped, self.max_bad = bad_in_row, skipped, max_bad
        self.ckpt_dir, self.is_main, self.metrics = ckpt_dir, is_main, metrics

    def step(self, optimizer, finite: bool, step: int, hint: str) -> None:
        if finite:
            optimizer.step()
            self.bad_in_row = 0
        else:
            self.skipped += 1
            self.bad_in_row += 1
            if self.is_main:
                log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", step, self.bad_in_row)
        optimizer.zero_grad(set_to_none=True)
        if self.bad_in_row >= self.max_bad:
            self.metrics.close()
            raise TrainingError(
                f"{self.bad_in_row} consecutive steps had a non-finite loss or gradient (last at step {step}); "
                f"stopping. The last good checkpoint in {self.ckpt_dir} is intact: {hint}, then re-run the same "
                "command to resume."
            )


def _device(cfg: Config, info: DistInfo) -> torch.device:
    want = cfg.train.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def _autocast(cfg: Config, device: torch.device):
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


@dataclass
class _StepConsts:
    patch_size: int
    pad_id: int
    alpha: float
    contrastive: bool = False  # model.objective=clip: one loss over the whole (all-gathered) batch


def train(cfg: Config) -> dict:
    """Run (or resume) the pretraining described by ``cfg``; returns the last logged metrics."""
    cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    info = init_distributed("cuda" if cuda else "cpu")
    device = _device(cfg, info)
    out_dir = Path(cfg.out_dir)
    if info.is_main:  # rank 0 checks the folder and writes config and tokenizer before the others read them
        out_dir.mkdir(parents=True, exist_ok=True)
        _check_same_config(cfg, out_dir)
        ckpt.atomic_write(out_dir / "config.yaml", cfg.save)
        source = build_source(cfg, out_dir, save=True, rank=info.rank, world_size=info.world_size)
    if info.distributed:
        dist.barrier()
    if not info.is_main:
        source = build_source(cfg, out_dir, save=False, rank=info.rank, world_size=info.world_size)
    torch.manual_seed(cfg.seed)  # identical init on every rank
    model = build_model(cfg, source.tokenizer.vocab_size, source.tokenizer.pad_id, source.tokenizer.eos_id)
    origin = None  # where the weights came from (model.init_from); every checkpoint of the run keeps it
    if cfg.model.init_from and not ckpt.list_checkpoints(out_dir):  # resume wins: never re-apply init_from
        origin = init_from(model, cfg)
    model.to(device)
    enc_cfg = model.encoder.cfg
    step_model = parallelize(model, cfg.train, info, device, dynamic_shapes=cfg.data.native.enabled)
    optimizer = build_optimizer(model, cfg.optim)

    start_step, bad_in_row, skipped = 0, 0, 0
    state = ckpt.load_latest(out_dir)
    if state is not None:
        # written during the frozen-encoder warm-up: the encoder has no AdamW state yet (it never took a step)
        warming = state["step"] <= cfg.train.freeze_encoder_steps
        ckpt.restore(model, optimizer, state, stateless=model.encoder if warming else None)
        start_step, bad_in_row, skipped = state["step"], state["bad_in_row"], state["skipped_steps"]
        origin = state.get("init_from")
        ckpt.set_rng_state(state["rng"][min(info.rank, len(state["rng"]) - 1)])
        if source.shards is not None:
            saved = _saved_positions(state, info, cfg.data.num_workers)  # {worker: {source: position}}
            for name, samples, _ in source.shards:
                samples.skip = {w: pos.get(name, 0) for w, pos in saved.items()}
        if info.is_main:
            log.info("resuming %s from step %d", out_dir, start_step)
    if start_step >= cfg.train.steps:
        if info.is_main:
            log.info("%s already finished (%d steps); nothing to do", out_dir, start_step)
        _export_encoder(model, out_dir, info)
        return {}

    common = dict(
        global_batch=cfg.train.batch_size,
        rank=info.rank,
        world_size=info.world_size,
        start_step=start_step,
        steps=cfg.train.steps,
        encode_text=source.tokenizer.encode,
        seed=cfg.seed,
        patch_size=enc_cfg.patch_size,
        native=native_schedule(cfg, info),
    )
    if source.shards is not None:
        stream = ShardStepBatches(source.shards, **common)
    else:
        stream = StepBatches(source.sample_fn, length=source.length, native_fn=source.native_fn, **common)
    positions = {}  # shards: {worker: {source: raw samples that worker's stream has passed}} (what resume skips)
    mix = None  # shards: samples per source since the last log line
    data_skipped: dict[int, torch.Tensor] = {}  # shards: {worker: samples skipped by kind since this process started}
    if source.shards is not None:
        workers = range(max(1, cfg.data.num_workers))
        positions = {w: {name: s.skip.get(w, 0) for name, s, _ in source.shards} for w in workers}
        mix = torch.zeros(len(source.shards), dtype=torch.long)
    loader = make_loader(stream, cfg.data.num_workers, cfg.data.prefetch_factor, pin_memory=device.type == "cuda")
    autocast = _autocast(cfg, device)
    peak = peak_flops(device, bf16=autocast is not contextlib.nullcontext)
    metrics = MetricsLogger(out_dir, cfg, start_step, enabled=info.is_main, total_steps=cfg.train.steps)
    guard = NonFiniteGuard(bad_in_row, skipped, cfg.train.max_bad_steps, out_dir / ckpt.CKPT_DIR, info.is_main, metrics)

    consts = _StepConsts(enc_cfg.patch_size, source.tokenizer.pad_id, model.alpha, cfg.model.objective == "clip")
    model.train()
    last: dict = {}
    t_last, samples_since, tokens_since, flops_since = time.perf_counter(), 0, 0, 0.0
    for batch in loader:
        step = batch.step
        if mix is not None:
            positions[batch.worker] = batch.position
            mix += batch.source_counts
            data_skipped[batch.worker] = batch.skipped
        lr = lr_at(step, cfg.train.steps, cfg.optim)
        set_lr(optimizer, lr)
        losses = _train_step(step_model, batch, cfg, device, autocast, info, consts)
        if info.distributed:  # every rank takes the same skip decision and logs the global losses
            dist.all_reduce(losses)
        frozen = step < cfg.train.freeze_encoder_steps
        if frozen:  # the encoder's gradients were reduced like all others; drop them: no clip share, no AdamW step
            for p in model.encoder.parameters():
                p.grad = None
        elif step == cfg.train.freeze_encoder_steps > 0 and info.is_main:
            log.info("encoder unfrozen after %d steps of decoder warm-up", step)
        grad_norm = _clip(model, cfg.optim.grad_clip)
        finite = bool(torch.isfinite(losses).all() and torch.isfinite(grad_norm))
        guard.step(optimizer, finite, step, "lower optim.lr, raise optim.warmup_steps or use train.precision=fp32")
        global_batch = len(batch.text) * info.world_size  # varies per step with data.native
        n_patches = (batch.images.shape[-2] // consts.patch_size) * (batch.images.shape[-1] // consts.patch_size)
        samples_since += global_batch
        text_tokens = int((batch.text != source.tokenizer.pad_id).sum())
        tokens_since += (n_patches * len(batch.text) + text_tokens) * info.world_size
        flops_since += flops_per_sample(model, n_patches, cfg.data.context_length) * global_batch
        done = step + 1
        if done % cfg.train.log_every == 0 or done == cfg.train.steps:
            dt = time.perf_counter() - t_last
            sps = samples_since / dt
            last = {
                "step": done,
                "loss": losses[0].item(),
                "image_loss": losses[1].item(),
                "text_loss": losses[2].item(),
                "lr": lr,
                "grad_norm": grad_norm.item(),
                "samples_per_s": sps,
                "tokens_per_s": tokens_since / dt,
                "mfu": (flops_since / dt / info.world_size / peak) if peak else None,
                "skipped_steps": guard.skipped,
                **({"encoder_frozen": frozen} if cfg.train.freeze_encoder_steps else {}),
                **_mix_fractions(mix, source, info, device),
                **_skipped_samples(data_skipped, info, device),
            }
            if cfg.data.native.enabled:
                last["patches"] = n_patches  # this step's grid, gh * gw
                last["batch_size"] = global_batch
            metrics.log(last)
            t_last, samples_since, tokens_since, flops_since = time.perf_counter(), 0, 0, 0.0
            if mix is not None:
                mix.zero_()
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
                # model.init_from's record (path, kind, layout, step, decoder, pos_embed) or None
                extra={"init_from": origin},
                export=lambda sd: _write_encoder(sd, model.encoder.cfg, model.encoder.name, out_dir),
            )
    metrics.close()
    if info.distributed:
        dist.barrier()
    return last


def native_schedule(cfg: Config, info: DistInfo) -> NativeSchedule | None:
    """The run's per-step areas and batch sizes (data.native), or None for fixed-resolution training."""
    nat = cfg.data.native
    if not nat.enabled:
        return None
    quantum = info.world_size * cfg.train.grad_accum
    if nat.batch_multiple % quantum:
        raise TrainingError(
            f"data.native.batch_multiple={nat.batch_multiple} is not divisible by ranks x train.grad_accum = "
            f"{info.world_size} x {cfg.train.grad_accum}: every step's batch must split into equal micro-batches"
        )
    return NativeSchedule(
        seed=cfg.seed,
        min_patches=nat.min_patches,
        max_patches=nat.max_patches,
        tokens_per_batch=nat.tokens_per_batch,
        max_aspect=nat.max_aspect,
        batch_multiple=nat.batch_multiple,
    )


def _train_step(step_model, batch: Batch, cfg: Config, device, autocast, info: DistInfo, src: _StepConsts):
    """Forward/backward over grad_accum micro-batches; returns [loss, image_loss, text_loss] of the global batch.

    The objective averages over valid tokens of the whole batch (non-prefix patches, non-pad caption tokens),
    but each micro-batch on each rank only knows its own counts, and DDP/FSDP average gradients uniformly.
    Each micro-batch's mean is therefore reweighted by its share of the global count (two numbers all-reduced
    per step), which makes the gradient exactly that of the global mean, whatever the number of ranks and
    micro-batches.
    """
    accum = cfg.train.grad_accum
    images = normalize(batch.images, cfg.data.mean_std, device)  # [B, 3, H, W] float, on device
    text = batch.text.to(device, non_blocking=True)  # [B, T]
    prefix = batch.prefix_len.to(device)  # [B]
    B, _, H, W = images.shape
    micro = B // accum
    if micro == 0:
        raise TrainingError(f"per-rank batch {B} is smaller than train.grad_accum={accum}; lower grad_accum")
    if src.contrastive:
        return _contrastive_step(step_model, images, text, autocast, info)
    p = src.patch_size
    num_patches = (H // p) * (W // p)
    # valid targets per micro-batch: [accum, 2] = (image patches k+1 >= M, non-pad tokens)
    counts = torch.stack(
        [(num_patches - prefix).view(accum, micro).sum(1), (text != src.pad_id).view(accum, micro, -1).sum((1, 2))], 1
    ).double()
    totals = counts.sum(0)
    if info.distributed:
        dist.all_reduce(totals)
    share = counts * (accum * info.world_size) / totals.clamp(min=1)  # [accum, 2]; mean 1 over the global batch
    total = torch.zeros(3, device=device, dtype=torch.float64)
    for i in range(accum):
        sl = slice(i * micro, (i + 1) * micro)
        sync = i == accum - 1 or not info.distributed or not hasattr(step_model, "no_sync")
        with contextlib.nullcontext() if sync else step_model.no_sync():
            with autocast():
                out = step_model(images[sl], text[sl], prefix_len=prefix[sl])
            w_img, w_txt = share[i].float()
            image_part = torch.where(w_img > 0, out.image_loss * w_img, 0.0)
            text_part = torch.where(w_txt > 0, out.text_loss * w_txt, 0.0)
            ((text_part + src.alpha * image_part) / accum).backward()
        parts = torch.stack([image_part, text_part]).detach().double() / (accum * info.world_size)
        total += torch.cat([(parts[1] + src.alpha * parts[0]).view(1), parts])
    return total.float()  # this rank's share; summed over ranks it is the global batch's [loss, image, text]


def _contrastive_step(step_model, images, text, autocast, info: DistInfo) -> torch.Tensor:
    """CLIP baseline: each rank scores its pairs against every rank's (all-gathered embeddings, as LiT); the mean of
    the ranks' losses is the global batch's loss and DDP's gradient average makes it its gradient. Returns this
    rank's share of [loss, image_loss = 0, text_loss = 0]."""
    from .lit import lit_loss  # train/lit.py imports this module

    with autocast():
        out = step_model(images, text)
    loss = lit_loss(out.image_embeds, out.text_embeds, out.logit_scale, info)
    loss.backward()
    zero = torch.zeros((), device=loss.device)
    return torch.stack([loss.detach().float() / info.world_size, zero, zero])


def _clip(model, max_norm: float) -> torch.Tensor:
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
        norm = norm.full_tensor()
    return norm


def save_run_state(
    model,
    optimizer,
    out_dir: Path,
    step: int,
    guard: NonFiniteGuard,
    keep_last: int,
    info,
    positions: dict,
    extra: dict | None = None,
    export=None,
) -> None:
    """A resumable checkpoint (all ranks take part): weights, optimizer, skip counters, every rank's RNG and data
    position, plus ``extra`` fields; then rank 0 calls ``export(model_sd)`` to write the run's weights file."""
    model_sd, optim_sd = ckpt.gather_state(model, optimizer)
    per_rank = [(ckpt.rng_state(), positions)]
    if info.distributed:
        per_rank = [None] * info.world_size
        dist.all_gather_object(per_rank, (ckpt.rng_state(), positions))
    if info.is_main:
        state = {
            "bad_in_row": guard.bad_in_row,
            "skipped_steps": guard.skipped,
            "rng": [r for r, _ in per_rank],
            "data_position": [p for _, p in per_rank],  # per rank: {worker: raw samples passed} (shards)
            **(extra or {}),
        }
        ckpt.save_checkpoint(out_dir, step, model_sd, optim_sd, state, keep_last)
        if export is not None:
            export(model_sd)
    if info.distributed:
        dist.barrier()


def _mix_fractions(mix: torch.Tensor | None, source, info: DistInfo, device: torch.device) -> dict:
    """{"mix/NAME": share of the samples since the last log line} for a shard mixture (all ranks)."""
    if mix is None or len(source.shards) < 2:
        return {}
    counts = mix.to(device)
    if info.distributed:
        dist.all_reduce(counts)
    total = max(1, int(counts.sum()))
    return {f"mix/{name}": int(c) / total for (name, _, _), c in zip(source.shards, counts, strict=True)}


def _skipped_samples(skipped: dict[int, torch.Tensor], info: DistInfo, device: torch.device) -> dict:
    """{"data_skipped": n, "data_skipped/KIND": n, ...}: samples the shard readers of all ranks and workers skipped
    (corrupt images, missing captions, ...) since this process started; the kinds with none are left out."""
    if not skipped:
        return {}
    counts = torch.stack(list(skipped.values())).sum(0).to(device)  # [kinds]
    if info.distributed:
        dist.all_reduce(counts)
    out = {"data_skipped": int(counts.sum())}
    out.update({f"data_skipped/{k}": int(n) for k, n in zip(FAULT_KINDS, counts.tolist(), strict=True) if n})
    return out


def _saved_positions(state: dict, info: DistInfo, num_workers: int) -> dict:
    """This rank's {worker: position} from a checkpoint; the shard split needs the same ranks and workers."""
    saved = state.get("data_position") or []
    workers = max(1, num_workers)
    if len(saved) != info.world_size or any(p and len(p) != workers for p in saved):
        raise TrainingError(
            f"the checkpoint was written by {len(saved)} rank(s) reading shards with "
            f"{max((len(p) for p in saved), default=0)} worker(s) each; resuming a shard stream exactly needs the "
            f"same layout: run with {len(saved)} process(es) and data.num_workers={max(len(p) for p in saved)}"
        )
    return dict(saved[info.rank])


def _write_encoder(model_sd: dict, enc_cfg, name: str, out_dir: Path) -> None:
    """out_dir/encoder.safetensors in Apple's layout, from the gathered full state dict."""
    from ..models.encoder import VisionEncoder
    from ..weights import save_encoder

    with torch.device("meta"):
        enc = VisionEncoder(enc_cfg, name=name)
    sd = {k.removeprefix("encoder."): v for k, v in model_sd.items() if k.startswith("encoder.")}
    enc.load_state_dict(sd, strict=True, assign=True)
    ckpt.atomic_write(out_dir / "encoder.safetensors", lambda tmp: save_encoder(enc, tmp, layout="apple"))


def _export_encoder(model, out_dir: Path, info: DistInfo) -> None:
    if info.is_main and not (out_dir / "encoder.safetensors").exists():
        sd = {f"encoder.{k}": v.detach().cpu() for k, v in model.encoder.state_dict().items()}
        _write_encoder(sd, model.encoder.cfg, model.encoder.name, out_dir)


def _check_same_config(cfg: Config, out_dir: Path) -> None:
    """Resuming with a different model or data would silently mix two runs: refuse unless only the length changed."""
    import yaml

    path = out_dir / "config.yaml"
    if not path.exists() or not ckpt.list_checkpoints(out_dir):
        return
    old = yaml.safe_load(path.read_text())
    new = cfg.to_dict()
    for section, defaults in type(cfg)().to_dict().items():  # keys added since that run was written: defaults
        if isinstance(defaults, dict) and isinstance(old.get(section), dict):
            old[section] = {**defaults, **old[section]}
    free = {
        ("train", "steps"),
        ("train", "progress"),
        ("train", "checkpoint_every"),
        ("train", "log_every"),
        ("train", "keep_last"),
        ("data", "num_workers"),
        ("data", "prefetch_factor"),
        ("log",),
    }
    diffs = []
    for section, values in new.items():
        if not isinstance(values, dict):
            if old.get(section) != values and section != "out_dir":
                diffs.append(f"{section}: {old.get(section)!r} -> {values!r}")
            continue
        for k, v in values.items():
            if (section, k) in free or (section,) in free:
                continue
            if old.get(section, {}).get(k) != v:
                diffs.append(f"{section}.{k}: {old.get(section, {}).get(k)!r} -> {v!r}")
    if diffs:
        raise TrainingError(
            f"{out_dir} holds a run with a different config ({'; '.join(diffs)}). Resuming would mix two runs: "
            f"use another out_dir, or restore the original values."
        )
