"""Values checked where they enter: every rule a config must satisfy, with the fix in the message."""

from __future__ import annotations

import math

from ..errors import UserError
from .schema import Config, LitConfig

# The backends of aimv2.models.attention (config sits below models and cannot import it; a test keeps both equal).
ATTENTION_BACKENDS = ("auto", "sdpa", "flex", "matmul")


class ConfigError(UserError, ValueError):
    """A config that cannot be run: the message names the key, the value and the valid range."""


def in_range(key: str, value, lo: float, hi: float = math.inf, *, open_lo: bool = False, open_hi: bool = False):
    """(ok, message) for a number that must be finite and in [lo, hi] (``open_lo``/``open_hi``: the bound itself is
    excluded). NaN and infinities are refused everywhere: no hyperparameter means anything at inf."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if open_lo else value >= lo) and (value < hi if open_hi else value <= hi)
    interval = f"{'(' if open_lo else '['}{_num(lo)}, {_num(hi)}{')' if open_hi or hi == math.inf else ']'}"
    kind = "an integer" if isinstance(value, int) and not isinstance(value, bool) else "a finite number"
    return ok, f"{key}={value!r} is out of range; give {kind} in {interval}"


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


# The most a weight may shrink in one step at the peak lr through weight decay alone. AdamW recipes shrink by
# lr x wd ~ 1e-4 (e.g. 1e-3 x 0.1); a value far above is a misread convention, not a choice.
MAX_DECAY_PER_STEP = {"weight_decay": 1e-3, "decoupled_weight_decay": 1e-2}


def decay_checks(o) -> list[tuple[bool, str]]:
    """The two weight-decay keys: at most one set, each a number >= 0."""
    wd, dwd = o.weight_decay, o.decoupled_weight_decay
    return [
        (
            wd is None or dwd is None,
            f"optim.weight_decay={wd} and optim.decoupled_weight_decay={dwd} are both set; keep one (weight_decay "
            f"w is decoupled_weight_decay w x optim.lr)",
        ),
        in_range("optim.weight_decay", 0.0 if wd is None else wd, 0),
        in_range("optim.decoupled_weight_decay", 0.0 if dwd is None else dwd, 0),
    ]


def decay_bound_checks(o) -> list[tuple[bool, str]]:
    """The sanity bound on the per-step shrink, with the value that was probably meant."""
    wd, dwd = o.weight_decay or 0.0, o.decoupled_weight_decay or 0.0
    lim_wd, lim_dwd = MAX_DECAY_PER_STEP["weight_decay"], MAX_DECAY_PER_STEP["decoupled_weight_decay"]
    return [
        (
            o.lr * wd <= lim_wd,
            f"optim.weight_decay={wd:g} at optim.lr={o.lr:g} shrinks weights by {100 * o.lr * wd:.2g}% a step "
            f"(lr x wd, more than {100 * lim_wd:g}%); AdamW recipes use 0.01 to 0.2 (the paper's decay is "
            "optim.weight_decay: 0.1 at lr 1e-3, or optim.decoupled_weight_decay: 1e-4 at any lr)",
        ),
        (
            dwd <= lim_dwd,
            f"optim.decoupled_weight_decay={dwd:g} shrinks weights by {100 * dwd:.3g}% a step at the peak lr (more "
            f"than {100 * lim_dwd:g}%); you probably meant optim.weight_decay: {dwd:g} (AdamW convention, "
            f"lr x {dwd:g} a step); the paper's decoupled value is 1e-4",
        ),
    ]


def distill_checks(d, active: bool) -> list[tuple[bool, str]]:
    """model.distill: weights >= 0 always; with model.objective=distill (``active``) a teacher and something to
    distill."""
    ranges = [
        in_range("model.distill.cosine", d.cosine, 0),
        in_range("model.distill.smooth_l1", d.smooth_l1, 0),
        in_range("model.distill.smooth_l1_beta", d.smooth_l1_beta, 0),
        in_range("model.distill.aimv2", d.aimv2, 0),
    ]
    if not active:
        return ranges
    return [
        (
            bool(d.teacher),
            "model.objective=distill needs model.distill.teacher=TEACHER: a model name, a .safetensors checkpoint, "
            "a pretraining run folder or hf:REPO",
        ),
        *ranges,
        (
            not (d.cosine == 0 and d.smooth_l1 == 0),
            "model.distill.cosine and model.distill.smooth_l1 are both 0, so nothing is distilled; give one a "
            "weight > 0 (or train model.objective=aimv2)",
        ),
        (
            isinstance(d.teacher_overrides, dict),
            f"model.distill.teacher_overrides must be a mapping such as {{img_size: 64}}, got {d.teacher_overrides!r}",
        ),
    ]


def validate(cfg: Config, *, decay_bound: bool = True) -> None:
    """Every rule; ``decay_bound=False`` skips the weight-decay bound (a migrated config an earlier run trained
    with, whose value is history, not a choice to question)."""
    t, o, d = cfg.train, cfg.optim, cfg.data
    checks = [
        in_range("seed", cfg.seed, 0, 2**32 - 1),  # numpy's and every DataLoader worker's seed range
        in_range("train.steps", t.steps, 1),
        in_range("train.batch_size", t.batch_size, 1),
        in_range("train.grad_accum", t.grad_accum, 1),
        (
            t.grad_accum < 1 or t.batch_size % t.grad_accum == 0,  # < 1: the range check above reports it
            f"train.batch_size ({t.batch_size}) must be divisible by train.grad_accum ({t.grad_accum})",
        ),
        (t.precision in ("auto", "fp32", "bf16"), f"train.precision must be auto|fp32|bf16, got {t.precision!r}"),
        (t.parallel in ("ddp", "fsdp"), f"train.parallel must be ddp|fsdp, got {t.parallel!r}"),
        (t.device in ("auto", "cpu", "cuda"), f"train.device must be auto|cpu|cuda, got {t.device!r}"),
        (
            t.attention in ATTENTION_BACKENDS,
            f"train.attention must be {'|'.join(ATTENTION_BACKENDS)}, got {t.attention!r}",
        ),
        in_range("train.checkpoint_every", t.checkpoint_every, 1),
        in_range("train.keep_last", t.keep_last, 1),
        in_range("train.log_every", t.log_every, 1),
        in_range("train.max_bad_steps", t.max_bad_steps, 1),  # 0 would stop the run on its first, finite, step
        in_range("optim.lr", o.lr, 0, open_lo=True),
        in_range("optim.init_lr", o.init_lr, 0),
        (0 <= o.min_lr <= o.lr, f"optim.min_lr={o.min_lr!r} is out of range; give a number in [0, optim.lr={o.lr:g}]"),
        in_range("optim.warmup_steps", o.warmup_steps, 0),
        *decay_checks(o),
        *(decay_bound_checks(o) if decay_bound else []),
        in_range("optim.betas[0]", o.betas[0], 0, 1, open_hi=True),
        in_range("optim.betas[1]", o.betas[1], 0, 1, open_hi=True),
        in_range("optim.eps", o.eps, 0, open_lo=True),
        in_range("optim.grad_clip", o.grad_clip, 0),  # 0 disables clipping
        (d.mean_std in ("imagenet", "clip"), f"data.mean_std must be imagenet or clip, got {d.mean_std!r}"),
        in_range("data.num_workers", d.num_workers, 0),
        in_range("data.prefetch_factor", d.prefetch_factor, 1),
        in_range("data.shuffle_buffer", d.shuffle_buffer, 0),
        in_range("data.context_length", d.context_length, 2),
        (
            d.synthetic_length is None or d.synthetic_length >= 1,
            f"data.synthetic_length={d.synthetic_length!r} is out of range; give an integer >= 1 or null (endless)",
        ),
        (
            cfg.data.source in ("synthetic", "shards", "folder", "hf"),
            f"data.source must be synthetic, shards, folder or hf, got {cfg.data.source!r}",
        ),
        (cfg.data.source != "hf" or bool(cfg.data.hf_files), "data.source=hf needs data.hf_files=GLOB"),
        (cfg.data.source != "folder" or bool(cfg.data.folder), "data.source=folder needs data.folder=PATH"),
        (
            cfg.data.source != "shards" or bool(cfg.data.shards) != bool(cfg.data.mixture),
            "data.source=shards needs either data.shards=PATH_OR_PATTERN or a data.mixture list (not both)",
        ),
        in_range("data.max_fault_rate", d.max_fault_rate, 0, 1, open_lo=True),
        in_range("train.freeze_encoder_steps", t.freeze_encoder_steps, 0),
        (
            t.freeze_encoder_steps == 0 or bool(cfg.model.init_from),
            "train.freeze_encoder_steps warms up a decoder on a pretrained encoder: set model.init_from=PATH too",
        ),
        (
            all(in_range("", v, 0)[0] for v in o.lr_mult.values()),
            f"optim.lr_mult values must be finite numbers >= 0, got {o.lr_mult!r}",
        ),
        (
            all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in o.lr_warmup.values()),
            f"optim.lr_warmup values must be whole numbers of steps >= 0, got {o.lr_warmup!r}",
        ),
    ]
    if isinstance(cfg, Config):
        m = cfg.model
        attention = {"aimv2": ("auto", "prefix"), "aimv1": ("auto", "prefix"), "clip": ("auto", "bidirectional")}
        attention["distill"] = ("auto",)  # bidirectional, or prefix with model.distill.aimv2 > 0
        checks += [
            (
                m.objective in ("aimv2", "cap", "cappa", "aimv1", "clip", "distill"),
                f"model.objective must be aimv2, cap, cappa, aimv1, clip or distill, got {m.objective!r}",
            ),
            (
                m.encoder_attention in attention.get(m.objective, ("auto", "prefix", "bidirectional")),
                f"model.encoder_attention={m.encoder_attention!r} does not fit model.objective={m.objective!r} "
                "(prefix: aimv2, aimv1, cap, cappa; bidirectional: cap, cappa, clip; distill: auto only, which is "
                "bidirectional, or prefix with model.distill.aimv2 > 0)",
            ),
            (
                not m.separate_decoders or m.objective == "aimv2",
                "model.separate_decoders applies to model.objective=aimv2 only",
            ),
            (m.clip.pool in ("mean", "attention"), f"model.clip.pool must be mean or attention, got {m.clip.pool!r}"),
            in_range("model.alpha", m.alpha, 0),  # the pixel loss's weight; 0 is captioning only
            (
                0 <= m.cappa_parallel_prob <= 1,
                f"model.cappa_parallel_prob must be in [0, 1], got {m.cappa_parallel_prob!r}",
            ),
            in_range("model.clip.init_temperature", m.clip.init_temperature, 0, open_lo=True),
            # the contrastive loss couples every pair of the batch: micro-batches would change it, not just split it
            (m.objective != "clip" or t.grad_accum == 1, "model.objective=clip needs train.grad_accum=1"),
            (m.objective != "clip" or not cfg.data.native.enabled, "model.objective=clip does not support data.native"),
            *distill_checks(m.distill, active=m.objective == "distill"),
            (
                m.objective == "aimv2" and not m.separate_decoders or not m.init_from or not m.init_decoder,
                "model.init_from with a decoder needs objective=aimv2 (shared decoder): set model.init_decoder=false",
            ),
        ]
    if isinstance(cfg, LitConfig):
        checks += [
            (bool(cfg.lit.encoder), "lit.encoder is required: a pretraining run folder, a checkpoint or a model name"),
            # the contrastive loss couples every pair of the batch: micro-batches would change it, not just split it
            (t.grad_accum == 1, "LiT needs train.grad_accum=1 (the contrastive batch is the global batch)"),
            (t.parallel == "ddp", "LiT trains with train.parallel=ddp (the frozen encoder is replicated)"),
            in_range("lit.projection_dim", cfg.lit.projection_dim, 1),
            in_range("lit.init_temperature", cfg.lit.init_temperature, 0, open_lo=True),
        ]
    nat = cfg.data.native
    if nat.enabled:
        checks += [
            (
                nat.mode in (None, "per_image", "per_step"),
                f"data.native.mode must be per_image or per_step (or null: the run folder's), got {nat.mode!r}",
            ),
            (
                nat.mode == "per_step"
                or not isinstance(cfg, Config)
                or cfg.model.objective == "aimv2"
                and not cfg.model.separate_decoders,
                f"data.native.mode={nat.mode or 'per_image (the default)'} trains model.objective=aimv2 with its "
                "shared decoder only; the baselines take one grid per step: set data.native.mode=per_step",
            ),
            in_range("data.native.min_patches", nat.min_patches, 2),
            (
                nat.max_patches >= nat.min_patches,
                f"data.native.max_patches ({nat.max_patches}) must be >= data.native.min_patches ({nat.min_patches})",
            ),
            in_range("data.native.max_aspect", nat.max_aspect, 1),
            in_range("data.native.batch_multiple", nat.batch_multiple, 1),
            (
                t.grad_accum < 1 or nat.batch_multiple % t.grad_accum == 0,
                f"data.native.batch_multiple ({nat.batch_multiple}) must be divisible by train.grad_accum "
                f"({t.grad_accum}): every step's batch is split into equal micro-batches",
            ),
            (
                nat.tokens_per_batch >= nat.max_patches * nat.batch_multiple,
                f"data.native.tokens_per_batch ({nat.tokens_per_batch}) is smaller than data.native.max_patches x "
                f"data.native.batch_multiple = {nat.max_patches * nat.batch_multiple}: a step at the largest area "
                f"would have no images; raise tokens_per_batch or lower max_patches",
            ),
        ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
