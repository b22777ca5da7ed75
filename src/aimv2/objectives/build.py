"""The objective a run config describes, built the same way by the trainer and by everything that reads a run
folder back (captioning, continued pretraining): one function per kind of run."""

from __future__ import annotations

from torch import nn

from ..config import Config, LitConfig
from ..models.encoder import VisionEncoder
from ..models.text import text_config
from .aimv2 import create_pretraining_model
from .generative import create_baseline_model
from .lit import LiT, LiTConfig


def build_model(cfg: Config, vocab_size: int, pad_id: int, eos_id: int = 1) -> nn.Module:
    """The pretraining objective of ``cfg.model`` (decoder context = ``data.context_length`` unless set): AIMv2, or
    one of the baselines of ``model.objective`` / ``model.separate_decoders`` (objectives/generative.py)."""
    m = cfg.model
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
