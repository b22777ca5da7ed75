"""The one training loop, for every objective: one process or many under torchrun, resumable bit for bit.

A run is a config plus a :class:`~aimv2.train.tasks.Task` (pretraining, LiT, ...: its data, how its objective is
built, which weights file it exports). Everything else is here, the same for every objective:

    run folder   one run at a time (train/run_lock.py); temporary files of killed writers removed; resume from
                 the newest *readable* checkpoint (weights, optimizer, step, skip counters, RNG, data positions);
                 the task's weights file re-exported whenever it is older than the newest checkpoint
    data stream  step-indexed batches (train/data.py): the data position is the step and every random draw is
                 keyed by step or sample index, so a run killed at any moment resumes to the same weights
    one step     the batch split into train.grad_accum micro-batches; each micro-batch's loss sums are divided
                 by the valid counts of the global batch (objectives/base.py), so the gradient is that of one
                 process on the whole batch, whatever the number of ranks and micro-batches
    freeze       train.freeze_encoder_steps: the encoder's gradients are dropped during a decoder warm-up
    clip         the global gradient norm, clipped to optim.grad_clip (train/grad_clip.py: torch's rule, with a
                 faster and more exact norm on the CPU)
    guard        the optimizer step only when the loss and the gradient norm are finite (train/guard.py)
    metrics      metrics.jsonl, TensorBoard, W&B, the progress bar (train/metrics.py)
    checkpoints  every train.checkpoint_every steps and at the end, then the task's weights file
    host memory  on the CPU, glibc's malloc keeps freed memory for the next step instead of faulting it in
                 afresh (train/host_memory.py; process-wide, and left alone where the user set MALLOC_* themselves)

The path of one batch:

    loader -> Batch (uint8 images [B, 3, H, W], token ids [B, T], prefix lengths [B]; this rank's slice)
      -> task.inputs (images normalized on the device)
      -> objective.loss_counts per micro-batch, summed over ranks: the global batch's valid targets
      -> per micro-batch: objective(...) -> LossTerms -> terms.loss(global counts) * world -> backward
         (DDP/FSDP average gradients over ranks, hence the * world)
      -> the logged sums all-reduced -> clip -> guard -> AdamW step -> metrics -> checkpoint
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch
from torch import nn

from ..data.faults import FAULT_KINDS, PART_KINDS
from ..objectives.base import LossTerms
from ..weights.atomic import atomic_write, remove_temp_files
from ..weights.run_folder import CKPT_DIR, list_checkpoints, load_latest_readable
from . import checkpointing as ckpt
from .data import make_loader
from .distributed import DistInfo, all_reduce_sum, barrier, init_distributed, row_gatherer
from .grad_clip import clip_gradients
from .guard import NonFiniteGuard, TrainingError
from .host_memory import keep_freed_host_memory
from .metrics import MetricsLogger, peak_flops
from .native import resolve_native_mode
from .optim import build_optimizer, lr_at, set_lr
from .parallelize import parallelize
from .precision import cpu_bf16_is_fast
from .resume import check_same_config, save_run_state, shard_positions, weights_file_stale
from .run_lock import RunLock

log = logging.getLogger("aimv2.train")


def fit(cfg, task) -> dict:
    """Run (or resume) the training that ``cfg`` and ``task`` describe; returns the last logged metrics."""
    info = init_distributed(device_type(cfg))
    device = pick_device(cfg, info)
    if device.type == "cpu":  # the step's own tensors live in host memory: keep it mapped between steps
        why_not = keep_freed_host_memory()
        log.debug("host memory: %s", f"glibc's thresholds left as they are ({why_not})" if why_not else "kept")
    out_dir = Path(cfg.out_dir)
    torch.manual_seed(cfg.seed)  # a task that builds weights before the data (LiT's encoder) builds them alike
    lock = RunLock(out_dir)
    if info.is_main:  # rank 0 owns the folder: it locks and checks it, writes config and tokenizer before the others
        out_dir.mkdir(parents=True, exist_ok=True)  # an OSError here (permission, read-only) is the CLI's one line
        lock.acquire()
        for tmp in remove_temp_files(out_dir):
            log.info("removed %s, left by a writer that was killed", tmp)
        resolve_native_mode(cfg, out_dir, migrate=True)  # before the check: a folder's own mode is part of its config
        check_same_config(cfg, out_dir)
        atomic_write(out_dir / "config.yaml", cfg.save)
    else:
        resolve_native_mode(cfg, out_dir)
    try:
        return fit_in_folder(cfg, task, info, device, out_dir)
    finally:
        lock.release()


def fit_in_folder(cfg, task, info: DistInfo, device: torch.device, out_dir: Path) -> dict:
    """The run itself, once the folder is this process's (see fit)."""
    task.prepare()  # every rank itself (no broadcast of a large encoder)
    if info.is_main:  # rank 0 writes what the data needs in the run folder (the tokenizer) before the others read it
        source = task.data(out_dir, info, save=True)
    barrier(info)
    if not info.is_main:
        source = task.data(out_dir, info, save=False)
    shards = getattr(source, "shards", None)  # webdataset sources: resumed by their saved read positions
    torch.manual_seed(cfg.seed)  # identical init on every rank
    model = task.build(source, fresh=not list_checkpoints(out_dir))  # resume wins over any init_from
    model.to(device)
    if model.whole_batch and cfg.train.grad_accum > 1:
        raise TrainingError(
            f"train.grad_accum={cfg.train.grad_accum}, but {type(model).__name__}'s loss compares every sample of "
            "the batch with every other (contrastive negatives), which micro-batches would change: use "
            "train.grad_accum=1"
        )
    if hasattr(model, "gather_rows"):
        model.gather_rows = row_gatherer(info)
    step_model = parallelize(model, cfg.train, info, device, dynamic_shapes=cfg.data.native.enabled)
    optimizer = build_optimizer(model, cfg.optim)

    start_step, bad_in_row, skipped = 0, 0, 0
    state, unreadable = load_latest_readable(out_dir, set_aside=info.is_main)
    for path, why in unreadable if info.is_main else []:
        log.warning("skipped the unreadable checkpoint %s (%s), kept as %s.unreadable", path, why, path.name)
    if state is not None:
        # written during the frozen-encoder warm-up: the encoder has no AdamW state yet (it never took a step)
        warming = state["step"] <= cfg.train.freeze_encoder_steps
        ckpt.restore(model, optimizer, state, stateless=model.encoder if warming else None)
        start_step, bad_in_row, skipped = state["step"], state["bad_in_row"], state["skipped_steps"]
        task.resumed(state)
        ckpt.set_rng_state(state["rng"][min(info.rank, len(state["rng"]) - 1)])
        if shards is not None:
            saved = shard_positions(state, info, cfg.data.num_workers)  # {worker: {source: position}}
            for name, samples, _ in shards:
                samples.skip = {w: pos.get(name, 0) for w, pos in saved.items()}
        if info.is_main:
            log.info("resuming %s from step %d", out_dir, start_step)
            if weights_file_stale(out_dir, task.weights_file):  # killed between a checkpoint and its export
                log.info("re-exporting %s from the step-%d checkpoint", task.weights_file, start_step)
                task.export(model, {k: v.detach().cpu() for k, v in model.state_dict().items()}, out_dir)
    if start_step >= cfg.train.steps:
        if info.is_main:
            log.info("%s already finished (%d steps); nothing to do", out_dir, start_step)
        return {}

    stream = task.stream(source, model, start_step, info)
    positions = {}  # shards: {worker: {source: raw samples that worker's stream has passed}} (what resume skips)
    mix = None  # shards: samples per source since the last log line
    data_skipped: dict[int, torch.Tensor] = {}  # {worker: samples skipped by kind since this process started}
    if shards is not None:
        workers = range(max(1, cfg.data.num_workers))
        positions = {w: {name: s.skip.get(w, 0) for name, s, _ in shards} for w in workers}
        mix = torch.zeros(len(shards), dtype=torch.long)
    loader = make_loader(stream, cfg.data.num_workers, cfg.data.prefetch_factor, pin_memory=device.type == "cuda")
    autocast = autocast_for(cfg, device)
    peak = peak_flops(device, bf16=autocast is not contextlib.nullcontext)
    metrics = MetricsLogger(
        out_dir, cfg, start_step, enabled=info.is_main, total_steps=cfg.train.steps, desc=task.name, show=task.show
    )
    guard = NonFiniteGuard(bad_in_row, skipped, cfg.train.max_bad_steps, out_dir / CKPT_DIR, info.is_main, metrics)

    model.train()
    if hasattr(model, "predictions_keep_grad"):  # only the loss terms are read here (objectives/base.py)
        model.predictions_keep_grad = False
    for child in model.children():  # a wholly frozen part (LiT's encoder) behaves as at inference
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            child.eval()
    last: dict = {}
    t_last, samples_since, tokens_since, flops_since = time.perf_counter(), 0, 0, 0.0
    for batch in loader:
        step = batch.step
        if mix is not None:
            positions[batch.worker] = batch.position
            mix += batch.source_counts
        if getattr(batch, "skipped", None) is not None:  # a data source that counts what it skipped
            data_skipped[batch.worker] = batch.skipped
        lr = lr_at(step, cfg.train.steps, cfg.optim)
        set_lr(optimizer, lr, step)
        values = train_step(step_model, model, task.inputs(batch, device), cfg.train.grad_accum, info, autocast)
        frozen = step < cfg.train.freeze_encoder_steps
        if frozen:  # the encoder's gradients were reduced like all others; drop them: no clip share, no AdamW step
            for p in model.encoder.parameters():
                p.grad = None
        elif step == cfg.train.freeze_encoder_steps > 0 and info.is_main:
            log.info("encoder unfrozen after %d steps of decoder warm-up", step)
        grad_norm = clip_gradients(model, cfg.optim.grad_clip)
        finite = all(bool(torch.isfinite(v)) for v in values.values()) and bool(torch.isfinite(grad_norm))
        guard.step(optimizer, finite, step)

        work = task.work(model, batch)  # this rank's samples, tokens and training FLOPs
        global_batch = work.samples * info.world_size  # varies per step with data.native
        samples_since += global_batch
        tokens_since += work.tokens * info.world_size
        flops_since += work.flops * info.world_size
        done = step + 1
        if done % cfg.train.log_every == 0 or done == cfg.train.steps:
            dt = time.perf_counter() - t_last
            last = {
                "step": done,
                **{k: v.item() for k, v in values.items()},
                "lr": lr,
                "grad_norm": grad_norm.item(),
                "samples_per_s": samples_since / dt,
                "tokens_per_s": tokens_since / dt,
                "mfu": (flops_since / dt / info.world_size / peak) if peak else None,
                "skipped_steps": guard.skipped,
                **({"encoder_frozen": frozen} if cfg.train.freeze_encoder_steps else {}),
                **mix_fractions(mix, shards, info, device),
                **skipped_samples(data_skipped, info, device),
            }
            if cfg.data.native.enabled:
                last["patches"] = work.patches  # this step's grid, gh * gw
                last["batch_size"] = global_batch
            metrics.log(last)
            t_last, samples_since, tokens_since, flops_since = time.perf_counter(), 0, 0, 0.0
            if mix is not None:
                mix.zero_()
        metrics.advance(done, last)
        if done == cfg.train.steps:
            guard.check_finished(done)  # never save (nor report done) a run whose last steps were skipped
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
                extra=task.checkpoint_extra(),
                export=lambda sd: task.export(model, sd, out_dir),
            )
    metrics.close()
    barrier(info)
    return last


def train_step(
    step_model: nn.Module, objective: nn.Module, inputs: dict[str, torch.Tensor], accum: int, info: DistInfo, autocast
) -> dict[str, torch.Tensor]:
    """Forward and backward of this rank's batch in ``accum`` micro-batches (gradients accumulate in ``.grad``).

    ``objective`` is the unwrapped module (its ``loss_counts`` and ``input_names``), ``step_model`` what to call
    (the same module or its DDP wrapper). Returns the global batch's {"loss", each part's mean, each statistic's
    mean over ranks}, identical on every rank, so every rank takes the same skip decision.
    """
    args = [inputs[k] for k in objective.input_names]
    micro = len(args[0]) // accum
    if micro == 0:
        raise TrainingError(f"per-rank batch {len(args[0])} is smaller than train.grad_accum={accum}; lower it")
    chunks = [[a[i * micro : (i + 1) * micro] for a in args] for i in range(accum)]
    local = [objective.loss_counts(*chunk) for chunk in chunks]
    parts = list(local[0])
    device = args[0].device
    totals = torch.stack([sum(c[k] for c in local).to(device, torch.float64) for k in parts])
    counts = dict(zip(parts, all_reduce_sum(totals, info), strict=True))  # the global batch's valid targets

    sums = torch.zeros(len(parts), dtype=torch.float64, device=device)
    stats: dict[str, torch.Tensor] = {}
    for i, chunk in enumerate(chunks):
        sync = i == accum - 1 or not info.distributed or not hasattr(step_model, "no_sync")
        with contextlib.nullcontext() if sync else step_model.no_sync():
            with autocast():
                terms: LossTerms = step_model(*chunk).terms
            (terms.loss(counts) * info.world_size).backward()
        sums += torch.stack([terms.sums[k].detach().double() for k in parts])
        for k, v in terms.stats.items():
            stats[k] = stats.get(k, 0.0) + v.detach().double() / (accum * info.world_size)
    packed = all_reduce_sum(torch.cat([sums, torch.stack(list(stats.values())) if stats else sums[:0]]), info)
    total = LossTerms(dict(zip(parts, packed[: len(parts)], strict=True)), counts, terms.weights)
    out = {"loss": total.loss(), **total.means()}
    out.update(zip(stats, packed[len(parts) :], strict=True))
    return {k: v.float() for k, v in out.items()}


def device_type(cfg) -> str:
    return "cuda" if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()) else "cpu"


def pick_device(cfg, info: DistInfo) -> torch.device:
    if device_type(cfg) == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def autocast_for(cfg, device: torch.device):
    """A context factory: bf16 autocast (train.precision=bf16, or auto on CUDA), else a no-op."""
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        if device.type == "cpu" and not cpu_bf16_is_fast():
            log.warning(
                "train.precision=bf16 on a CPU without fast bf16 matmuls (no AVX-512): they run many "
                "times slower than fp32 here (train/precision.py); train.precision: fp32 (or auto) trains faster"
            )
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def mix_fractions(mix: torch.Tensor | None, shards, info: DistInfo, device: torch.device) -> dict:
    """{"mix/NAME": share of the samples since the last log line} for a shard mixture (all ranks)."""
    if mix is None or len(shards) < 2:
        return {}
    counts = all_reduce_sum(mix.to(device), info)
    total = max(1, int(counts.sum()))
    return {f"mix/{name}": int(c) / total for (name, _, _), c in zip(shards, counts, strict=True)}


def skipped_samples(skipped: dict[int, torch.Tensor], info: DistInfo, device: torch.device) -> dict:
    """{"data_skipped": n, "data_skipped/KIND": n, ...}: samples the data readers of all ranks and workers skipped
    (corrupt images, missing captions, ...) since this process started; the kinds with none are left out."""
    if not skipped:
        return {}
    counts = all_reduce_sum(torch.stack(list(skipped.values())).sum(0).to(device), info)  # [kinds]
    samples = [int(n) for k, n in zip(FAULT_KINDS, counts.tolist(), strict=True) if k not in PART_KINDS]
    out = {"data_skipped": sum(samples)}  # whole samples; the parts of samples left out only by kind
    out.update({f"data_skipped/{k}": int(n) for k, n in zip(FAULT_KINDS, counts.tolist(), strict=True) if n})
    return out
