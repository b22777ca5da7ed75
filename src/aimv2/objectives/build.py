"""The objective a run config describes, built the same way by the trainer and by everything that reads a run
folder back (captioning, continued pretraining): one function per kind of run."""

from __future__ import annotations

from torch import nn

from ..config import Config, LitConfig
from ..models.decoder import MultimodalDecoder, default_decoder_config
from ..models.encoder import VisionEncoder
from ..models.registry import build_encoder, model_size
from ..models.text import text_config
from .aimv2 import create_pretraining_model
from .distill import Distiller
from .generative import create_baseline_model
from .lit import LiT, LiTConfig


def build_model(
    cfg: Config, vocab_size: int, pad_id: int, eos_id: int = 1, teacher: VisionEncoder | None = None
) -> nn.Module:
    """The pretraining objective of ``cfg.model`` (decoder context = ``data.context_length`` unless set): AIMv2, or
    one of the baselines of ``model.objective`` / ``model.separate_decoders`` (objectives/generative.py), or
    distillation from ``teacher`` (model.objective=distill: the caller loads ``model.distill.teacher``; objectives
    read no files)."""
    m = cfg.model
    if m.objective == "distill":
        if teacher is None:
            raise ValueError("model.objective=distill needs its teacher encoder (model.distill.teacher), loaded")
        if (m.decoder.get("moe") or {}).get("experts"):
            raise ValueError("model.decoder.moe is for model.objective=aimv2; remove it for model.objective=distill")
        d = m.distill
        student, decoder = build_encoder(m.encoder, **m.encoder_overrides), None
        if d.aimv2 > 0:  # the AIMv2 part: its decoder, sized as model.objective=aimv2 sizes it
            dec = {"max_text_len": cfg.data.context_length, **m.decoder}
            dcfg = default_decoder_config(model_size(m.encoder), vocab_size=vocab_size, **dec)
            decoder = MultimodalDecoder(dcfg, student.cfg.embed_dim, student.cfg.patch_dim)
        return Distiller(
            student,
            teacher,
            decoder=decoder,
            pad_id=pad_id,
            alpha=m.alpha,
            cosine=d.cosine,
            smooth_l1=d.smooth_l1,
            smooth_l1_beta=d.smooth_l1_beta,
            aimv2=d.aimv2,
        )
    if m.objective != "aimv2" or m.separate_decoders:
        if (m.decoder.get("moe") or {}).get("experts"):  # only the AIMv2 objective adds the balance loss
            raise ValueError(
                "model.decoder.moe is for model.objective=aimv2 with one decoder; remove it for "
                f"model.objective={m.objective}" + (" and model.separate_decoders=true" if m.separate_decoders else "")
            )
        return create_baseline_model(
            m.objective,
            m.encoder,
            vocab_size=vocab_size,
            pad_id=pad_id,
            eos_id=eos_id,
            alpha=m.alpha,
            encoder_attention=m.encoder_attention,
            separate_decoders=m.separate_decoders,
            clip_pool=m.clip.pool,
            clip_text_size=m.clip.text_size,
            clip_projection_dim=m.clip.projection_dim,
            clip_init_temperature=m.clip.init_temperature,
            cappa_parallel_prob=m.cappa_parallel_prob,
            encoder_overrides=m.encoder_overrides,
            decoder_overrides={"max_text_len": cfg.data.context_length, **m.decoder},
        )
    dec = {f"decoder_{k}": v for k, v in m.decoder.items()}
    dec.setdefault("decoder_max_text_len", cfg.data.context_length)
    return create_pretraining_model(
        m.encoder, vocab_size=vocab_size, pad_id=pad_id, alpha=m.alpha, **m.encoder_overrides, **dec
    )


def build_lit_model(cfg: LitConfig, encoder: VisionEncoder, vocab_size: int, eos_id: int) -> LiT:
    """LiT on ``encoder`` (frozen) with fresh towers sized by ``cfg.lit`` and the tokenizer."""
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
