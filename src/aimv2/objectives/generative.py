"""The paper's baselines and ablations, trained by the same trainer as AIMv2 (same encoder, data, optimizer).

    objective   encoder attention           decoder(s)                               loss
    aimv2       prefix                      one causal decoder, pixels + caption     text + alpha * image
    separate    prefix                      a pixel decoder and a caption decoder    text + alpha * image
    cap         prefix or bidirectional     a caption decoder (no pixel head)        text
    cappa       prefix or bidirectional     cap's decoder; a fraction of the rows     text
                                            predict in parallel from [MASK] inputs
    aimv1       prefix                      an image-only decoder (no text)          image
    clip        bidirectional               none: pooled patches vs a text tower     symmetric InfoNCE

``GenerativeBaseline`` covers the decoder rows (``separate`` is AIMv2 with ``model.separate_decoders=true``);
the contrastive row is :class:`~aimv2.objectives.lit.CLIPBaseline`, LiT's two towers with a trainable encoder
(objectives/lit.py). Both return :class:`PretrainOutput`: a loss part the
objective does not have is a zero sum with count 0 (so every run logs ``loss``, ``image_loss`` and ``text_loss``)
and a prediction it does not make is None. ``loss`` is always what is minimized.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.decoder import DecoderConfig, MultimodalDecoder, default_decoder_config
from ..models.encoder import VisionEncoder
from ..models.registry import build_encoder, model_size
from ..models.text import text_config
from .aimv2 import (
    PretrainOutput,
    caption_terms,
    image_regression_terms,
    image_target_count,
    pretraining_terms,
    resolve_prefix_len,
)
from .base import count
from .lit import CLIPBaseline, LiTConfig

OBJECTIVES = ("aimv2", "cap", "cappa", "aimv1", "clip")


class GenerativeBaseline(nn.Module):
    # the objective interface (objectives/base.py)
    input_names = ("images", "text", "prefix_len")
    whole_batch = False
    predictions_keep_grad = True  # False: image_pred / text_logits come back detached (set by the trainer)

    """Encoder + a pixel decoder and/or a caption decoder, each a causal :class:`MultimodalDecoder` over
    [image features] (+ [BOS, caption]).

    pixel_decoder only: AIMv1 (image-only next-patch regression; ``alpha`` is 1, the loss is the image loss).
    text_decoder only: captioning (``bidirectional=True`` encodes with full attention, else prefix attention).
    both: AIMv2 with separate decoders (loss = text + alpha * image).
    """

    def __init__(
        self,
        encoder: VisionEncoder,
        *,
        pixel_decoder: MultimodalDecoder | None,
        text_decoder: MultimodalDecoder | None,
        pad_id: int = 0,
        alpha: float = 0.4,
        bidirectional: bool = False,
        parallel_prob: float = 0.0,
    ):
        super().__init__()
        if pixel_decoder is None and text_decoder is None:
            raise ValueError("a generative baseline needs a pixel decoder, a text decoder or both")
        if bidirectional and pixel_decoder is not None:
            raise ValueError("next-patch regression needs prefix attention: a bidirectional encoder sees the target")
        self.encoder = encoder
        self.pixel_decoder = pixel_decoder
        self.text_decoder = text_decoder
        self.pad_id = pad_id
        self.alpha = alpha if text_decoder is not None else 1.0  # image only (AIMv1): the image loss is the loss
        self.bidirectional = bidirectional
        # CapPa (big_vision's masked_pred_prob with masking_ratio 1): in training, each row predicts its caption in
        # parallel from [MASK] inputs with this probability, else autoregressively
        self.parallel_prob = parallel_prob
        self.patch_size = encoder.cfg.patch_size

    def forward(
        self, images: torch.Tensor, text: torch.Tensor, prefix_len: torch.Tensor | int | None = None
    ) -> PretrainOutput:
        B, _, H, W = images.shape
        N = (H // self.patch_size) * (W // self.patch_size)
        drawn_prefix = prefix_len if isinstance(prefix_len, torch.Tensor) else None  # the trainer's keyed draw
        if self.bidirectional:  # every patch sees every patch: the whole image is the prefix
            prefix_len = torch.full((B,), N, dtype=torch.long, device=images.device)  # [B]
            feats = self.encoder(images, prefix_len=None)  # [B, N, D_enc]
        else:
            prefix_len = resolve_prefix_len(prefix_len, B, N, images.device)  # [B]
            feats = self.encoder(images, prefix_len=prefix_len)  # [B, N, D_enc]
        zero = images.new_zeros((), dtype=torch.float32)

        image_pred, image_sum, image_count = None, zero, count(0, images.device)
        if self.pixel_decoder is not None:
            image_pred, _ = self.pixel_decoder(feats, None)  # [B, N-1, P]: position k predicts patch k+1
            image_sum, image_count = image_regression_terms(image_pred, images, prefix_len, self.patch_size)

        text_logits, text_sum, text_count = None, zero, count(0, images.device)
        if self.text_decoder is not None:
            parallel = None
            if self.parallel_prob > 0 and self.training:
                parallel = self.parallel_rows(text, drawn_prefix)  # [B]
            _, text_logits = self.text_decoder(feats, text, parallel=parallel)  # [B, T, V]: t predicts text[:, t]
            text_sum, text_count = caption_terms(text_logits, text, self.pad_id)

        terms = pretraining_terms(image_sum, image_count, text_sum, text_count, self.alpha)
        return PretrainOutput.from_terms(terms, image_pred, text_logits, prefix_len, self.predictions_keep_grad)

    def parallel_rows(self, text: torch.Tensor, prefix_len: torch.Tensor | None) -> torch.Tensor:
        """CapPa's draw, bool [B]: row b predicts in parallel with probability ``parallel_prob``. Keyed by the row's
        prefix length (which the trainer draws per global sample index) and caption, so the same sample at the same
        step draws the same on resume, on any number of ranks; without prefix lengths, the global RNG."""
        if prefix_len is None:
            return torch.rand(len(text), device=text.device) < self.parallel_prob
        weights = torch.arange(1, text.shape[1] + 1, device=text.device)
        keys = (prefix_len.to(text.device) * 1_000_003 + (text * weights).sum(1)).tolist()
        u = [torch.rand(1, generator=torch.Generator().manual_seed(int(k) & 0xFFFF_FFFF)).item() for k in keys]
        return torch.tensor(u, device=text.device) < self.parallel_prob

    def loss_counts(self, images: torch.Tensor, text: torch.Tensor, prefix_len: torch.Tensor) -> dict:
        """The valid targets forward will count: non-prefix patches (pixel decoder), non-pad tokens (text)."""
        N = (images.shape[-2] // self.patch_size) * (images.shape[-1] // self.patch_size)
        image = image_target_count(prefix_len, N) if self.pixel_decoder is not None else count(0, images.device)
        text_n = count((text != self.pad_id).sum()) if self.text_decoder is not None else count(0, images.device)
        return {"image_loss": image, "text_loss": text_n}


def create_baseline_model(
    objective: str,
    encoder_name: str,
    *,
    vocab_size: int,
    pad_id: int = 0,
    eos_id: int = 1,
    alpha: float = 0.4,
    encoder_attention: str = "auto",
    separate_decoders: bool = False,
    clip_pool: str = "mean",
    clip_text_size: str = "auto",
    clip_projection_dim: int | None = None,
    clip_init_temperature: float = 0.07,
    cappa_parallel_prob: float = 0.75,
    encoder_overrides: dict | None = None,
    decoder_overrides: dict | None = None,
) -> nn.Module:
    """The model of one objective (see the table above) on encoder ``encoder_name``.

    ``decoder_overrides``: DecoderConfig fields (each decoder gets the same size). CLIP: the text tower is the
    encoder's size for tiny|small and LiT's base otherwise (``clip_text_size`` picks another), with the decoder's
    ``max_text_len`` as its context length. ``objective="aimv2"`` without separate decoders is
    :func:`aimv2.create_pretraining_model`'s model; build it there.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)}")
    encoder = build_encoder(encoder_name, **(encoder_overrides or {}))
    dcfg: DecoderConfig = default_decoder_config(
        model_size(encoder_name), vocab_size=vocab_size, **(decoder_overrides or {})
    )
    e = encoder.cfg
    if objective == "clip":
        size = clip_text_size
        if size == "auto":
            size = model_size(encoder_name) if model_size(encoder_name) in ("tiny", "small") else "base"
        tcfg = text_config(size, vocab_size=vocab_size, eos_id=eos_id, context_length=dcfg.max_text_len)
        cfg = LiTConfig(
            encoder=e,
            text=tcfg,
            projection_dim=clip_projection_dim or e.embed_dim,
            init_temperature=clip_init_temperature,
            encoder_name=encoder.name,
            pool=clip_pool,
        )
        return CLIPBaseline(cfg, encoder=encoder)
    if objective in ("cap", "cappa"):
        text_decoder = MultimodalDecoder(dcfg, e.embed_dim, None, parallel=objective == "cappa")
        return GenerativeBaseline(
            encoder,
            pixel_decoder=None,
            text_decoder=text_decoder,
            pad_id=pad_id,
            bidirectional=encoder_attention == "bidirectional",
            parallel_prob=cappa_parallel_prob if objective == "cappa" else 0.0,
        )
    if objective == "aimv1":
        pixel_decoder = MultimodalDecoder(dcfg, e.embed_dim, e.patch_dim, text=False)
        return GenerativeBaseline(encoder, pixel_decoder=pixel_decoder, text_decoder=None, pad_id=pad_id)
    if not separate_decoders:
        raise ValueError("objective aimv2 with one shared decoder is aimv2.create_pretraining_model")
    return GenerativeBaseline(
        encoder,
        pixel_decoder=MultimodalDecoder(dcfg, e.embed_dim, e.patch_dim, text=False),
        text_decoder=MultimodalDecoder(dcfg, e.embed_dim, None),
        pad_id=pad_id,
        alpha=alpha,
    )
