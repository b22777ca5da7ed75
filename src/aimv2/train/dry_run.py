"""``aimv2 pretrain CONFIG --dry-run``: what a pretraining run would be, without running, loading or writing anything.

A paper-scale config is a promise of weeks on many GPUs; the cheap mistakes (a shard pattern that expands to
nothing, a schedule of the wrong length, the wrong model size) should show before the first step. The dry run
resolves the config (listing every ``???`` it still needs at once, instead of stopping at the first), builds the
model on the meta device (shapes only, no memory: a 3B model costs nothing) and reports:

- parameters: encoder, decoder (everything besides the encoder: decoder, heads), total;
- FLOPs of one training step (forward + backward), *measured*: torch's FlopCounterMode counts every matmul,
  convolution and attention of the real forward and backward on fake (meta-backed) tensors. Blocks of a stack are
  identical, so it measures models of 1 and 2 encoder / decoder blocks at batch 1 and extrapolates linearly in the
  depth and the batch, which is exact and keeps the 3B config to about a second;
- the data sources it would read: name, weight, how many shards a pattern expands to and how many exist;
- steps per epoch where the dataset's size is knowable (a folder, local files, ``data.synthetic_length``, shards
  with img2dataset's ``*_stats.json``), else ``unknown`` and how to make it known;
- the global batch and the schedule.
"""

from __future__ import annotations

import dataclasses
import json
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from ..config import REQUIRED, Config, ConfigError
from ..config.parse import resolve_config
from ..models.encoder import VisionEncoder
from ..models.moe import MoESwiGLU
from ..models.registry import model_config
from ..objectives.build import build_model
from ..weights import encoder_config_of
from .optim import adamw_weight_decay

ASSUMED_VOCAB = 32000  # SigLIP's SentencePiece vocabulary (the paper's), when data.tokenizer is still ???


@dataclass
class SourcePlan:
    """One source the run would read."""

    name: str
    weight: float  # share of the samples (weights normalized)
    spec: str  # the pattern / path as configured
    shards: int | None = None  # files the pattern expands to (None: not a shard source, or unresolved)
    present: int | None = None  # of those, local files that exist (None: remote URLs, not checked)
    samples: int | None = None  # known sample count (None: unknown)
    note: str = ""


@dataclass
class DryRun:
    config: str
    unresolved: list[str]
    encoder: str
    params: dict[str, int]  # encoder, decoder, total
    flops_per_step: tuple[float, float]  # (least, most): equal unless native resolution varies the area
    flops_note: str
    global_batch: str
    sources: list[SourcePlan]
    steps_per_epoch: str
    schedule: list[str]
    steps: int
    vocab: str


# torch counts the CUDA attention kernels but not the CPU one the fake tensors dispatch to: the same formulas
def _cpu_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kw) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
}


def _vocab(cfg: Config) -> tuple[int, str]:
    """The decoder's vocabulary size: from the tokenizer file, the built-in tokenizer, or SigLIP's when unresolved."""
    from ..data.tokenizer import Tokenizer, default_synthetic_tokenizer

    tok = cfg.data.tokenizer
    if tok is None:
        n = default_synthetic_tokenizer(cfg.data.context_length).vocab_size
        return n, f"{n:,} (the built-in tokenizer)"
    if tok == REQUIRED or not Path(tok).is_file():
        why = "unresolved" if tok == REQUIRED else f"{tok} not found"
        return ASSUMED_VOCAB, f"{ASSUMED_VOCAB:,} assumed (SigLIP's; data.tokenizer {why})"
    if tok.endswith(".model"):
        n = Tokenizer.from_sentencepiece(tok, context_length=cfg.data.context_length).vocab_size
    else:
        n = Tokenizer.from_file(tok, context_length=cfg.data.context_length, pad_token=cfg.data.pad_token).vocab_size
    return n, f"{n:,} ({tok})"


def _meta_model(cfg: Config, vocab: int, encoder_depth: int | None = None, decoder_depth: int | None = None):
    m = cfg.model
    enc = dict(m.encoder_overrides, **({"depth": encoder_depth} if encoder_depth else {}))
    dec = dict(m.decoder, **({"depth": decoder_depth} if decoder_depth else {}))
    small = dataclasses.replace(cfg, model=dataclasses.replace(m, encoder_overrides=enc, decoder=dec))
    with torch.device("meta"):
        model = build_model(small, vocab_size=vocab, pad_id=0, eos_id=1, teacher=_meta_teacher(cfg))
    for module in model.modules():  # mixtures of experts: balanced routes, which shape-only tensors can size
        if isinstance(module, MoESwiGLU):
            module.static_routing = True
    return model


def _meta_teacher(cfg: Config) -> VisionEncoder | None:
    """model.objective=distill: the teacher on the meta device, sized from its name, run folder or file metadata."""
    d = cfg.model.distill
    if cfg.model.objective != "distill":
        return None
    if d.teacher in (None, REQUIRED):
        raise ConfigError("--dry-run of model.objective=distill needs its teacher: give model.distill.teacher=TEACHER")
    tcfg = encoder_config_of(d.teacher, **d.teacher_overrides)
    if tcfg is None:
        raise ConfigError(
            f"--dry-run sizes model.distill.teacher={d.teacher!r} from a model name, a run folder or a .safetensors "
            "file with its config in the metadata; give one of those (or train without --dry-run)"
        )
    return VisionEncoder(tcfg)


def step_flops_per_image(cfg: Config, vocab: int, grid: tuple[int, int], dec_depth: int | None) -> float:
    """Training FLOPs (forward + backward) of one image-text pair at a ``grid`` of patches, measured; ``dec_depth``:
    the AIMv2 decoder's depth, extrapolated like the encoder's (None: other objectives, whose towers are measured
    whole)."""
    enc = model_config(cfg.model.encoder, **cfg.model.encoder_overrides)

    def measure(e: int, d: int | None) -> int:
        model = _meta_model(cfg, vocab, e, d)
        with FakeTensorMode(allow_non_fake_inputs=True):  # meta storage, CPU device: autocast and SDPA run as on CPU
            model = model.to_empty(device="cpu")
            if getattr(model, "teacher", None) is not None:  # distillation: the frozen teacher, no registered module
                model.teacher.to_empty(device="cpu")
            images = torch.empty(1, 3, grid[0] * enc.patch_size, grid[1] * enc.patch_size)
            text = torch.ones(1, cfg.data.context_length, dtype=torch.long)
            with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as counter:
                model(images, text).loss.backward()
        return counter.get_total_flops()

    base = measure(1, 1 if dec_depth else None)
    total = base + (enc.depth - 1) * (measure(2, 1 if dec_depth else None) - base)
    if dec_depth:
        total += (dec_depth - 1) * (measure(1, 2) - base)
    return float(total)


def _native_batches(cfg: Config) -> list[tuple[int, int, tuple[int, int]]]:
    """(area, images, grid) at the smallest and the largest area native training draws."""
    nat = cfg.data.native
    out = []
    for area in (nat.min_patches, nat.max_patches):
        h = 2 ** (int(math.log2(area)) // 2)  # a square-ish grid of ``area`` patches (the aspect does not change FLOPs)
        grid = (h, max(1, area // h))
        b = nat.tokens_per_batch // area // nat.batch_multiple * nat.batch_multiple
        out.append((area, b, grid))
    return out


def _stats_samples(urls: list[str]) -> int | None:
    """Samples in local shards per img2dataset's ``NNNNN_stats.json`` sidecars (``successes``), if every one has it."""
    total = 0
    for url in urls:
        stats = Path(url[: -len(".tar")] + "_stats.json") if url.endswith(".tar") else None
        if stats is None or not stats.is_file():
            return None
        total += int(json.loads(stats.read_text()).get("successes", 0))
    return total


def _shard_plan(name: str, weight: float, spec) -> SourcePlan:
    from ..data.sources.tar import expand_urls

    plan = SourcePlan(name, weight, str(spec))
    if spec == REQUIRED or spec is None:
        plan.note = "unresolved (???)"
        return plan
    try:
        urls = expand_urls(spec)
    except ValueError as e:
        plan.note = str(e)
        return plan
    plan.shards = len(urls)
    local = [u for u in urls if not u.startswith("pipe:") and "://" not in u]
    if len(local) == len(urls):
        plan.present = sum(Path(u).is_file() for u in local)
        plan.samples = _stats_samples(local) if plan.present == len(urls) else None
    else:
        plan.note = "remote: not checked"
    return plan


def _sources(cfg: Config) -> list[SourcePlan]:
    d = cfg.data
    if d.source == "synthetic":
        n = d.synthetic_length
        return [SourcePlan("synthetic", 1.0, "built-in scenes", samples=n, note="" if n else "an endless stream")]
    if d.source == "shards":
        entries = d.mixture or [{"name": "shards", "shards": d.shards}]
        weights = [float(e.get("weight", 1.0)) for e in entries]
        return [
            _shard_plan(str(e.get("name", f"source{i}")), w / sum(weights), e.get("shards"))
            for i, (e, w) in enumerate(zip(entries, weights, strict=True))
        ]
    spec = d.folder if d.source == "folder" else d.hf_files
    plan = SourcePlan(d.source, 1.0, str(spec))
    try:
        if d.source == "folder":
            from ..data.sources.captioned import CaptionedImages

            plan.samples = len(CaptionedImages(d.folder))
        else:
            from ..data.sources.hf import HFImageText

            plan.samples = len(HFImageText(d.hf_files, image_column=d.image_column, text_column=d.text_column))
    except (ValueError, FileNotFoundError, ImportError) as e:
        plan.note = str(e)
    return [plan]


def _steps_per_epoch(cfg: Config, sources: list[SourcePlan], batches: list[int]) -> str:
    known = [s for s in sources if s.samples]
    if len(sources) > 1:
        if len(known) < len(sources):
            return (
                "unknown (sources of unknown size: img2dataset's NNNNN_stats.json beside each shard makes a source's "
                "size known)"
            )
        return (
            "; ".join(
                f"{s.name}: {' to '.join(str(math.ceil(s.samples / (s.weight * b))) for b in sorted(set(batches)))}"
                for s in known
            )
            + " (steps to draw each source's samples once, by weight)"
        )
    if not known:
        how = {
            "synthetic": "set data.synthetic_length=N for a dataset of N scenes",
            "shards": "shards do not record their size: img2dataset's NNNNN_stats.json beside each shard make it "
            "known (or count with `aimv2 data inspect PATTERN`)",
        }.get(cfg.data.source, "the source could not be read")
        return f"unknown ({how})"
    n = known[0].samples
    return " to ".join(str(math.ceil(n / b)) for b in sorted(set(batches))) + f" ({n:,} samples)"


def _schedule(cfg: Config) -> list[str]:
    o, t = cfg.optim, cfg.train
    wd = adamw_weight_decay(o)
    decay = (
        f"decoupled {o.decoupled_weight_decay:g} (torch AdamW's {wd:.3g} at the peak lr)"
        if o.decoupled_weight_decay is not None
        else f"{wd:g} (torch AdamW: {o.lr * wd:.2g} a step at the peak lr)"
    )
    lines = [
        f"{t.steps:,} steps; warmup {o.warmup_steps:,} steps {o.init_lr:g} -> {o.lr:g}, cosine to {o.min_lr:g}",
        f"AdamW betas ({o.betas[0]:g}, {o.betas[1]:g}), eps {o.eps:g}, weight decay {decay}, grad clip {o.grad_clip:g}",
        f"precision {t.precision}, compile {str(t.compile).lower()}, parallel {t.parallel}, "
        f"activation checkpointing {str(t.activation_checkpointing).lower()}",
    ]
    if t.freeze_encoder_steps:
        lines.append(f"encoder frozen for the first {t.freeze_encoder_steps:,} steps (decoder warm-up)")
    if o.lr_mult:
        lines.append(f"lr multipliers {o.lr_mult}")
    return lines


def dry_run(path: str | Path, overrides: list[str] = ()) -> DryRun:
    """The report of ``aimv2 pretrain PATH --dry-run``; reads the config and the data listings, writes nothing."""
    cfg, unresolved = resolve_config(path, list(overrides))
    if not isinstance(cfg, Config):
        raise ConfigError("--dry-run describes pretraining configs")
    vocab, vocab_note = _vocab(cfg)
    model = _meta_model(cfg, vocab)
    n_enc = sum(p.numel() for p in model.encoder.parameters())
    n_all = sum(p.numel() for p in model.parameters())
    enc = model_config(cfg.model.encoder, **cfg.model.encoder_overrides)
    dec_depth = model.decoder.cfg.depth if getattr(model, "decoder", None) is not None else None
    if cfg.data.native.enabled:
        plans = _native_batches(cfg)
        per = [b * step_flops_per_image(cfg, vocab, grid, dec_depth) for _, b, grid in plans]
        batches = [b for _, b, _ in plans]
        batch = " to ".join(f"{b:,} images of {a:,} patches" for a, b, _ in plans)
        batch += f" (data.native: {cfg.data.native.tokens_per_batch:,} image tokens a step)"
        note = f"at the smallest and the largest area ({plans[0][0]} and {plans[1][0]} patches)"
    else:
        per = [cfg.train.batch_size * step_flops_per_image(cfg, vocab, enc.grid_size, dec_depth)] * 2
        batches = [cfg.train.batch_size]
        batch = f"{cfg.train.batch_size:,} images of {enc.grid_size[0] * enc.grid_size[1]:,} patches"
        note = f"{enc.image_hw[0]}x{enc.image_hw[1]} px, {cfg.data.context_length} text tokens"
    if cfg.train.grad_accum > 1:
        batch += f", {cfg.train.grad_accum} accumulation micro-steps"
    sources = _sources(cfg)
    return DryRun(
        config=str(path),
        unresolved=unresolved,
        encoder=cfg.model.encoder,
        params={"encoder": n_enc, "decoder": n_all - n_enc, "total": n_all},
        flops_per_step=(min(per), max(per)),
        flops_note=note,
        global_batch=batch,
        sources=sources,
        steps_per_epoch=_steps_per_epoch(cfg, sources, batches),
        schedule=_schedule(cfg),
        steps=cfg.train.steps,
        vocab=vocab_note,
    )


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _flops(lo: float, hi: float) -> str:
    return f"{lo:.3e}" if math.isclose(lo, hi, rel_tol=1e-9) else f"{lo:.3e} to {hi:.3e}"


def format_dry_run(r: DryRun) -> str:
    """The dry run as the command prints it."""
    p = r.params
    lines = [f"dry run of {r.config}: nothing is trained, loaded or written"]
    if r.unresolved:
        keys = textwrap.fill(", ".join(r.unresolved), 100, initial_indent=" " * 13, subsequent_indent=" " * 13)
        lines += ["unresolved   (???) give each as key=value before training:", keys]
    lines += [
        f"model        {r.encoder}: encoder {_count(p['encoder'])} ({p['encoder']:,}), decoder {_count(p['decoder'])} "
        f"({p['decoder']:,}), total {_count(p['total'])} ({p['total']:,}); vocabulary: {r.vocab}",
        f"FLOPs/step   {_flops(*r.flops_per_step)} (forward + backward, {r.flops_note}; FlopCounterMode); "
        f"x {r.steps:,} steps = {_flops(*(f * r.steps for f in r.flops_per_step))} in all",
        f"global batch {r.global_batch}",
        "data",
    ]
    for s in r.sources:
        files = "" if s.shards is None else f", {s.shards:,} shards"
        if s.present is not None:
            files += f" ({s.present:,} exist)"
        samples = f", {s.samples:,} samples" if s.samples else ""
        spec = "" if s.spec == REQUIRED else f"  {s.spec}"
        lines.append(f"  {s.name:<18} weight {s.weight:.2f}{spec}{files}{samples}{'  ' + s.note if s.note else ''}")
    lines.append(f"steps/epoch  {r.steps_per_epoch}")
    lines += ["schedule     " + r.schedule[0], *("             " + x for x in r.schedule[1:])]
    return "\n".join(lines)
