"""Values checked where they enter: every rule a config must satisfy, with the fix in the message."""

from __future__ import annotations

from .schema import Config, LitConfig


class ConfigError(ValueError):
    pass


def validate(cfg: Config) -> None:
    t, o = cfg.train, cfg.optim
    checks = [
        (t.steps >= 1, "train.steps must be >= 1"),
        (t.batch_size >= 1, "train.batch_size must be >= 1"),
        (t.grad_accum >= 1, "train.grad_accum must be >= 1"),
        (
            t.batch_size % t.grad_accum == 0,
            f"train.batch_size ({t.batch_size}) must be divisible by train.grad_accum ({t.grad_accum})",
        ),
        (t.precision in ("auto", "fp32", "bf16"), f"train.precision must be auto|fp32|bf16, got {t.precision!r}"),
        (t.parallel in ("ddp", "fsdp"), f"train.parallel must be ddp|fsdp, got {t.parallel!r}"),
        (t.device in ("auto", "cpu", "cuda"), f"train.device must be auto|cpu|cuda, got {t.device!r}"),
        (t.checkpoint_every >= 1, "train.checkpoint_every must be >= 1"),
        (t.keep_last >= 1, "train.keep_last must be >= 1"),
        (t.log_every >= 1, "train.log_every must be >= 1"),
        (o.lr > 0, "optim.lr must be > 0"),
        (0 <= o.min_lr <= o.lr, "optim.min_lr must be in [0, optim.lr]"),
        (o.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
        (o.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (cfg.data.mean_std in ("imagenet", "clip"), "data.mean_std must be imagenet or clip"),
        (cfg.data.num_workers >= 0, "data.num_workers must be >= 0"),
        (cfg.data.context_length >= 2, "data.context_length must be >= 2"),
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
        (0 < cfg.data.max_fault_rate <= 1, "data.max_fault_rate must be in (0, 1]"),
        (t.freeze_encoder_steps >= 0, "train.freeze_encoder_steps must be >= 0"),
        (
            t.freeze_encoder_steps == 0 or bool(cfg.model.init_from),
            "train.freeze_encoder_steps warms up a decoder on a pretrained encoder: set model.init_from=PATH too",
        ),
        (
            all(isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in o.lr_mult.values()),
            f"optim.lr_mult values must be numbers >= 0, got {o.lr_mult!r}",
        ),
    ]
    if isinstance(cfg, Config):
        m = cfg.model
        attention = {"aimv2": ("auto", "prefix"), "aimv1": ("auto", "prefix"), "clip": ("auto", "bidirectional")}
        checks += [
            (
                m.objective in ("aimv2", "cap", "aimv1", "clip"),
                f"model.objective must be aimv2, cap, aimv1 or clip, got {m.objective!r}",
            ),
            (
                m.encoder_attention in attention.get(m.objective, ("auto", "prefix", "bidirectional")),
                f"model.encoder_attention={m.encoder_attention!r} does not fit model.objective={m.objective!r} "
                "(prefix: aimv2, aimv1, cap; bidirectional: cap, clip)",
            ),
            (
                not m.separate_decoders or m.objective == "aimv2",
                "model.separate_decoders applies to model.objective=aimv2 only",
            ),
            (m.clip.pool in ("mean", "attention"), f"model.clip.pool must be mean or attention, got {m.clip.pool!r}"),
            (m.clip.init_temperature > 0, "model.clip.init_temperature must be > 0"),
            # the contrastive loss couples every pair of the batch: micro-batches would change it, not just split it
            (m.objective != "clip" or t.grad_accum == 1, "model.objective=clip needs train.grad_accum=1"),
            (m.objective != "clip" or not cfg.data.native.enabled, "model.objective=clip does not support data.native"),
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
            (cfg.lit.projection_dim >= 1, "lit.projection_dim must be >= 1"),
            (cfg.lit.init_temperature > 0, "lit.init_temperature must be > 0"),
        ]
    nat = cfg.data.native
    if nat.enabled:
        checks += [
            (nat.min_patches >= 2, f"data.native.min_patches must be >= 2, got {nat.min_patches}"),
            (
                nat.max_patches >= nat.min_patches,
                f"data.native.max_patches ({nat.max_patches}) must be >= data.native.min_patches ({nat.min_patches})",
            ),
            (nat.max_aspect >= 1, f"data.native.max_aspect must be >= 1, got {nat.max_aspect}"),
            (nat.batch_multiple >= 1, "data.native.batch_multiple must be >= 1"),
            (
                nat.batch_multiple % t.grad_accum == 0,
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
