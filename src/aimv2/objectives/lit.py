"""Two towers trained contrastively: LiT (locked-image text tuning, how the paper measures zero-shot
classification) and the CLIP baseline, which is the same module with a trainable, randomly initialised encoder.

    image side                                           text side (models/text.py)
    pixels [B, 3, H, W]                                  ids [B, T] (right-padded, EOS after the caption)
      -> VisionEncoder (frozen in LiT)   [B, N, De]        -> token embedding + learned position   [B, T, Dt]
      -> attention or mean pool          [B, De]           -> depth x causal pre-norm Block        [B, T, Dt]
                                                           -> final RMSNorm, take the first EOS    [B, Dt]
      -> image_proj (no bias)            [B, P]            -> text_proj (no bias)                  [B, P]
      -> L2 normalize                                      -> L2 normalize
                      logits = exp(clamp(logit_scale, 0, ln 100)) * image @ text.T

The pooling head is AIMv1/AIMv2's attentive probe (models/heads.py); ``pool="mean"`` (the CLIP baseline's
default) averages the patch features instead and has no head. Module names follow Apple's checkpoint (``head.k``,
``head.v``, ``head.linear``, ``head.cls_token``) so the key maps in ``weights/keymaps.py`` stay short.

The training loss is the symmetric InfoNCE over the **global** batch: each rank scores its rows against every
rank's columns. The gathering is not done here (no ``torch.distributed`` in the library's modules): the trainer
sets ``gather_rows`` to a gradient-carrying all-gather, whose backward sums each rank's gradient into the slice's
owner; with DDP's gradient average the update is exactly that of one process on the whole batch.

Official size (Apple's ``aimv2-large-patch14-224-lit``): text 768 wide, 12 blocks, 6 heads, SwiGLU 2048, CLIP BPE
vocabulary 49408 with EOS 49407, context 77, projection 768, logit scale initialised to ln(1/0.07).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..models.encoder import EncoderConfig, VisionEncoder
from ..models.heads import AttentionPoolHead
from ..models.init import init_blocks_
from ..models.layers import RMSNorm
from ..models.registry import parse_model_name
from ..models.text import TextConfig, TextTower
from .base import LossTerms, count

POOLS = ("attention", "mean")


@dataclass
class LiTConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    text: TextConfig = field(default_factory=TextConfig)
    projection_dim: int = 768
    head_num_heads: int | None = None  # None: the encoder's number of heads (as Apple's head)
    init_temperature: float = 0.07  # logit_scale starts at ln(1 / init_temperature)
    max_logit_scale: float = 100.0  # exp(logit_scale) is clamped to [1, max_logit_scale]
    encoder_name: str | None = None
    pool: str = "attention"  # attention (LiT, Apple's head) | mean (the CLIP baseline's default: no head)

    def __post_init__(self):
        if isinstance(self.encoder, dict):
            self.encoder = EncoderConfig(**self.encoder)
        if isinstance(self.text, dict):
            self.text = TextConfig(**self.text)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["encoder"] = self.encoder.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LiTConfig:
        return cls(**d)


def official_lit_config() -> LiTConfig:
    """Apple's ``aimv2-large-patch14-224-lit``."""
    name = "aimv2-large-patch14-224"
    return LiTConfig(encoder=parse_model_name(name), text=TextConfig(), projection_dim=768, encoder_name=name)


class LiTOutput(NamedTuple):
    image_embeds: torch.Tensor  # [B, P], unit norm
    text_embeds: torch.Tensor  # [B, P], unit norm
    logit_scale: torch.Tensor  # scalar: exp of the clamped log scale
    logits_per_image: torch.Tensor  # [B, B]: logit_scale * image @ text.T
    logits_per_text: torch.Tensor  # [B, B]: its transpose
    terms: LossTerms | None = None  # the contrastive loss over the (gathered) batch, as a sum over rows + count


class LiT(nn.Module):
    """Image tower (AIMv2 encoder + pooling) and text tower, projected into one embedding space; an objective in
    the sense of objectives/base.py (its loss: ``contrastive_loss``)."""

    input_names = ("images", "text")
    whole_batch = True  # every pair is a negative of every other: a micro-batch would see fewer negatives
    extra_parts: tuple[str, ...] = ()  # loss parts reported as 0 (the CLIP baseline keeps the pretraining keys)

    def __init__(self, cfg: LiTConfig, encoder: VisionEncoder | None = None):
        super().__init__()
        self.cfg = cfg
        if encoder is not None and encoder.cfg != cfg.encoder:
            raise ValueError(f"the encoder given ({encoder.cfg}) does not match the config ({cfg.encoder})")
        if cfg.pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {cfg.pool!r}")
        self.encoder = encoder if encoder is not None else VisionEncoder(cfg.encoder, name=cfg.encoder_name)
        de, dt = cfg.encoder.embed_dim, cfg.text.embed_dim
        heads = cfg.head_num_heads or cfg.encoder.num_heads
        self.head = AttentionPoolHead(de, heads) if cfg.pool == "attention" else None
        self.text = TextTower(cfg.text)
        self.image_proj = nn.Linear(de, cfg.projection_dim, bias=False)
        self.text_proj = nn.Linear(dt, cfg.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))
        self.max_log_logit_scale = math.log(cfg.max_logit_scale)
        # [b, P] -> ([B, P] every rank's rows in rank order, offset of this rank's first row); set by the trainer
        self.gather_rows: Callable[[torch.Tensor], tuple[torch.Tensor, int]] | None = None
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights(encoder=encoder is None)

    @torch.no_grad()
    def init_weights(self, encoder: bool = True) -> None:
        """Fresh towers: xavier-uniform trunk linears (as the encoder), token embeddings and the query std 0.02,
        text positions std 0.01, projections with fan-in scaling. ``encoder=False`` keeps the given encoder."""
        if encoder:
            self.encoder.init_weights()
        init_blocks_(self.text.blocks)
        nn.init.normal_(self.text.token_embed.weight, std=0.02)
        nn.init.normal_(self.text.pos_embed, std=0.01)
        nn.init.ones_(self.text.norm.weight)
        for m in self.text.blocks.modules():
            if isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        if self.head is not None:
            nn.init.normal_(self.head.cls_token, std=0.02)
            for lin in (self.head.k, self.head.v, self.head.linear):
                nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(self.head.linear.bias)
        for proj in (self.image_proj, self.text_proj):
            nn.init.normal_(proj.weight, std=proj.in_features**-0.5)
        self.logit_scale.fill_(math.log(1.0 / self.cfg.init_temperature))

    @property
    def encoder_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.encoder.parameters())

    def freeze_encoder(self) -> LiT:
        """Lock the image encoder (LiT): no gradients, and its forward runs without autograd."""
        self.encoder.requires_grad_(False)
        return self

    def scale(self) -> torch.Tensor:
        """exp(logit_scale) with the log clamped to [0, ln max_logit_scale]: the temperature never exceeds 1 and
        the logits never get sharper than the cap, which keeps the contrastive loss stable."""
        return self.logit_scale.clamp(0.0, self.max_log_logit_scale).exp()

    def image_features(self, patches: torch.Tensor) -> torch.Tensor:
        """Encoder features [B, N, De] -> unit-norm image embeddings [B, P]."""
        pooled = self.head(patches) if self.head is not None else patches.mean(dim=1)  # [B, De]
        return F.normalize(self.image_proj(pooled), dim=-1)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalized pixels [B, 3, H, W] -> unit-norm image embeddings [B, P]. A frozen encoder runs under
        ``no_grad``, so training the head stores none of the encoder's activations."""
        if self.encoder_frozen:
            with torch.no_grad():
                patches = self.encoder(pixels)  # [B, N, De]
        else:
            patches = self.encoder(pixels)
        return self.image_features(patches)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] (first EOS = end of caption) -> unit-norm text embeddings [B, P]."""
        return F.normalize(self.text_proj(self.text(ids)), dim=-1)

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor) -> LiTOutput:
        img = self.encode_image(pixels)  # [B, P]
        txt = self.encode_text(ids)  # [B, P]
        s = self.scale()
        logits = s * img @ txt.t()  # [B_img, B_txt]
        return LiTOutput(img, txt, s, logits, logits.t(), self.loss_terms(img, txt, s))

    def loss_terms(self, img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> LossTerms:
        """The contrastive loss of this batch's rows against the gathered batch's columns (see the module doc),
        with the in-batch retrieval accuracy (image -> its caption among all gathered captions) as a statistic."""
        all_img, offset = self.gather_rows(img) if self.gather_rows is not None else (img, 0)
        all_txt, _ = self.gather_rows(txt) if self.gather_rows is not None else (txt, 0)
        per_row, i2t = contrastive_rows(img, txt, scale, all_img, all_txt, offset)  # [b], [b, B]
        labels = torch.arange(offset, offset + len(img), device=img.device)
        zero = img.new_zeros((), dtype=torch.float32)
        return LossTerms(
            sums={"contrastive_loss": per_row.sum(), **{k: zero for k in self.extra_parts}},
            counts={"contrastive_loss": count(len(img), img.device), **{k: count(0) for k in self.extra_parts}},
            weights={"contrastive_loss": 1.0},
            stats={"acc": (i2t.argmax(1) == labels).float().mean().detach(), "logit_scale": scale.detach()},
        )

    def loss_counts(self, images: torch.Tensor, text: torch.Tensor) -> dict:
        """One target per image-text pair (and none for the reported-as-zero parts)."""
        return {"contrastive_loss": count(len(images), images.device), **{k: count(0) for k in self.extra_parts}}


class LiTTower(nn.Module):
    """One tower of a LiT model as a module of its own, for code that calls a model on one input (feature
    extraction, ONNX export): ``forward`` is ``lit.encode_image`` (``which="image"``: pixels [B, 3, H, W]) or
    ``lit.encode_text`` (``which="text"``: ids [B, T]), unit-norm embeddings [B, P] either way."""

    def __init__(self, lit: LiT, which: str):
        super().__init__()
        if which not in ("image", "text"):
            raise ValueError(f"a LiT tower is 'image' or 'text', not {which!r}")
        self.lit = lit
        self.which = which

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lit.encode_image(x) if self.which == "image" else self.lit.encode_text(x)


class CLIPBaseline(LiT):
    """The paper's contrastive baseline: the same two towers as LiT, with a randomly initialised, trainable,
    bidirectional encoder. It reports ``image_loss`` and ``text_loss`` as 0 so that every pretraining run logs the
    same keys."""

    extra_parts = ("image_loss", "text_loss")


def contrastive_rows(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    all_image_embeds: torch.Tensor,
    all_text_embeds: torch.Tensor,
    offset: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric InfoNCE: (image->text CE + text->image CE) / 2 for each of this shard's b rows against the
    B columns of the whole batch (positives on the diagonal shifted by ``offset``). Returns ([b] float32, the
    image->text logits [b, B])."""
    labels = torch.arange(offset, offset + image_embeds.shape[0], device=image_embeds.device)  # [b]
    logits_i2t = logit_scale * image_embeds @ all_text_embeds.t()  # [b, B]
    logits_t2i = logit_scale * text_embeds @ all_image_embeds.t()  # [b, B]
    i2t = F.cross_entropy(logits_i2t.float(), labels, reduction="none")
    t2i = F.cross_entropy(logits_t2i.float(), labels, reduction="none")
    return (i2t + t2i) / 2, logits_i2t


def contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    all_image_embeds: torch.Tensor | None = None,
    all_text_embeds: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP): mean of image->text and text->image cross-entropy, the positives on the diagonal.

    image_embeds, text_embeds: [b, P] this shard's pairs (unit norm). ``all_*``: [B, P] the pairs of the whole batch
    (every shard's, in order; this shard's rows start at ``offset``) to use as negatives; None means this shard is
    the batch. Each shard scores its b rows against all B columns, so the mean of the shards' losses is the loss of
    the whole batch and a B x B logit matrix is never built on one device. Returns the mean over this shard's rows.
    """
    all_image_embeds = image_embeds if all_image_embeds is None else all_image_embeds
    all_text_embeds = text_embeds if all_text_embeds is None else all_text_embeds
    per_row, _ = contrastive_rows(image_embeds, text_embeds, logit_scale, all_image_embeds, all_text_embeds, offset)
    return per_row.mean()
