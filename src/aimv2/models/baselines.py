"""The paper's baselines and ablations, trained in the same harness as AIMv2 (same encoder, data, optimizer).

    objective   encoder attention           decoder(s)                               loss
    aimv2       prefix                      one causal decoder, pixels + caption     text + alpha * image
    separate    prefix                      a pixel decoder and a caption decoder    text + alpha * image
    cap         prefix or bidirectional     a caption decoder (no pixel head)        text
    aimv1       prefix                      an image-only decoder (no text)          image
    clip        bidirectional               none: pooled patches vs a text tower     symmetric InfoNCE

``GenerativeBaseline`` covers the decoder rows (``separate`` is AIMv2 with ``model.separate_decoders=true``),
``CLIPBaseline`` the contrastive one. Both return :class:`PretrainOutput`: a loss part the objective does not have
is a zero tensor (so every run logs ``loss``, ``image_loss`` and ``text_loss``) and a prediction it does not make
is None. ``loss`` is always what is minimized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .decoder import DecoderConfig, MultimodalDecoder, default_decoder_config
from .encoder import VisionEncoder
from .layers import RMSNorm, init_trunk_linear_
from .lit import AttentionPoolHead, TextTower, contrastive_loss, text_config
from .pretrain import PretrainOutput, caption_loss, image_regression_loss, resolve_prefix_len
from .registry import build_encoder, model_size

OBJECTIVES = ("aimv2", "cap", "aimv1", "clip")


class GenerativeBaseline(nn.Module):
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
        self.alpha = alpha if text_decoder is not None else 1.0  # the trainer weighs image_loss by model.alpha
        self.bidirectional = bidirectional
        self.patch_size = encoder.cfg.patch_size

    def forward(
        self, images: torch.Tensor, text: torch.Tensor, prefix_len: torch.Tensor | int | None = None
    ) -> PretrainOutput:
        B, _, H, W = images.shape
        N = (H // self.patch_size) * (W // self.patch_size)
        if self.bidirectional:  # every patch sees every patch: the whole image is the prefix
            prefix_len = torch.full((B,), N, dtype=torch.long, device=images.device)  # [B]
            feats = self.encoder(images, prefix_len=None)  # [B, N, D_enc]
        else:
            prefix_len = resolve_prefix_len(prefix_len, B, N, images.device)  # [B]
            feats = self.encoder(images, prefix_len=prefix_len)  # [B, N, D_enc]
        zero = images.new_zeros((), dtype=torch.float32)

        image_pred, image_loss = None, zero
        if self.pixel_decoder is not None:
            image_pred, _ = self.pixel_decoder(feats, None)  # [B, N-1, P]: position k predicts patch k+1
            image_loss = image_regression_loss(image_pred, images, prefix_len, self.patch_size)

        text_logits, text_loss = None, zero
        if self.text_decoder is not None:
            _, text_logits = self.text_decoder(feats, text)  # [B, T, V]: position t predicts text[:, t]
            text_loss = caption_loss(text_logits, text, self.pad_id)

        loss = text_loss + self.alpha * image_loss
        return PretrainOutput(loss, image_loss, text_loss, image_pred, text_logits, prefix_len)


@dataclass
class CLIPOutput(PretrainOutput):
    image_embeds: torch.Tensor  # [B, P] unit norm
    text_embeds: torch.Tensor  # [B, P] unit norm
    logit_scale: torch.Tensor  # scalar: exp of the clamped learned log scale (1 / temperature)


class CLIPBaseline(nn.Module):
    """Contrastive baseline: bidirectional encoder -> mean or attention pool -> projection, against a causal text
    tower pooled at the first EOS -> projection; learned temperature. The modules carry LiT's names (``head``,
    ``text``, ``image_proj``, ``text_proj``, ``logit_scale``).

    ``forward`` scores the pairs of the batch it is given. Under several processes the trainer all-gathers
    ``image_embeds`` / ``text_embeds`` and calls :func:`contrastive_loss` with the gathered tensors (train/lit.py).
    """

    def __init__(
        self,
        encoder: VisionEncoder,
        text_tower: TextTower,
        *,
        pool: str = "mean",
        projection_dim: int | None = None,
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
    ):
        super().__init__()
        if pool not in ("mean", "attention"):
            raise ValueError(f"CLIP pool must be mean or attention, got {pool!r}")
        de, dt = encoder.cfg.embed_dim, text_tower.cfg.embed_dim
        proj = projection_dim or de
        self.encoder = encoder
        self.head = AttentionPoolHead(de, encoder.cfg.num_heads) if pool == "attention" else None
        self.text = text_tower
        self.image_proj = nn.Linear(de, proj, bias=False)
        self.text_proj = nn.Linear(dt, proj, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.init_temperature = init_temperature
        self.max_log_logit_scale = math.log(max_logit_scale)
        self.alpha = 0.0  # no image loss: the trainer's weighting of image_loss is moot
        self.patch_size = encoder.cfg.patch_size
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        init_trunk_linear_(self.text.blocks)
        nn.init.normal_(self.text.token_embed.weight, std=0.02)
        nn.init.normal_(self.text.pos_embed, std=0.01)
        for m in self.text.modules():
            if isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        if self.head is not None:
            nn.init.normal_(self.head.cls_token, std=0.02)
            for lin in (self.head.k, self.head.v, self.head.linear):
                nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(self.head.linear.bias)
        for proj in (self.image_proj, self.text_proj):
            nn.init.normal_(proj.weight, std=proj.in_features**-0.5)
        self.logit_scale.fill_(math.log(1.0 / self.init_temperature))

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), the log clamped to [0, ln max_logit_scale] (as LiT)."""
        return self.logit_scale.clamp(0.0, self.max_log_logit_scale).exp()

    def forward(
        self, images: torch.Tensor, text: torch.Tensor, prefix_len: torch.Tensor | int | None = None
    ) -> CLIPOutput:
        """``prefix_len`` is ignored: the encoder is bidirectional (prefix_len comes back as N)."""
        B, _, H, W = images.shape
        N = (H // self.patch_size) * (W // self.patch_size)
        feats = self.encoder(images, prefix_len=None)  # [B, N, D_enc]
        pooled = feats.mean(dim=1) if self.head is None else self.head(feats)  # [B, D_enc]
        img = F.normalize(self.image_proj(pooled), dim=-1)  # [B, P]
        txt = F.normalize(self.text_proj(self.text(text)), dim=-1)  # [B, P]
        s = self.scale()
        loss = contrastive_loss(img, txt, s)  # this batch's pairs; the trainer uses the gathered batch
        zero = images.new_zeros((), dtype=torch.float32)
        full = torch.full((B,), N, dtype=torch.long, device=images.device)
        return CLIPOutput(loss, zero, zero, None, None, full, img, txt, s)


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
        return CLIPBaseline(
            encoder,
            TextTower(tcfg),
            pool=clip_pool,
            projection_dim=clip_projection_dim,
            init_temperature=clip_init_temperature,
        )
    if objective == "cap":
        text_decoder = MultimodalDecoder(dcfg, e.embed_dim, None)
        return GenerativeBaseline(
            encoder,
            pixel_decoder=None,
            text_decoder=text_decoder,
            pad_id=pad_id,
            bidirectional=encoder_attention == "bidirectional",
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
