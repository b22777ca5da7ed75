"""LiT (locked-image text tuning) on an AIMv2 encoder: how the paper measures zero-shot classification.

    image side                                           text side
    pixels [B, 3, H, W]                                  ids [B, T] (right-padded, EOS after the caption)
      -> VisionEncoder (frozen in LiT)   [B, N, De]        -> token embedding + learned position   [B, T, Dt]
      -> attention-pool head             [B, De]           -> depth x causal pre-norm Block        [B, T, Dt]
                                                           -> final RMSNorm, take the first EOS    [B, Dt]
      -> image_proj (no bias)            [B, P]            -> text_proj (no bias)                  [B, P]
      -> L2 normalize                                      -> L2 normalize
                      logits = exp(clamp(logit_scale, 0, ln 100)) * image @ text.T

The text tower is causal, so the state at the first EOS has read the whole caption and nothing after it: padding
cannot change an embedding. The pooling head is AIMv1/AIMv2's attentive probe: one learned query (no q projection)
attends over the patch features with bias-free k and v projections and the encoder's number of heads, then a
linear layer with bias. Module names follow Apple's checkpoint (``head.k``, ``head.v``, ``head.linear``,
``head.cls_token``) so the key maps in ``weights/keymaps.py`` stay short.

Official size (Apple's ``aimv2-large-patch14-224-lit``): text 768 wide, 12 blocks, 6 heads, SwiGLU 2048, CLIP BPE
vocabulary 49408 with EOS 49407, context 77, projection 768, logit scale initialised to ln(1/0.07).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .encoder import EncoderConfig, VisionEncoder
from .layers import Block, RMSNorm, init_trunk_linear_


@dataclass
class TextConfig:
    """The text tower. Defaults are Apple's LiT text tower."""

    vocab_size: int = 49408
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 6
    mlp_hidden_dim: int = 2048
    context_length: int = 77
    eos_id: int = 49407  # pooling reads the first position holding this id
    norm_eps: float = 1e-5


# Text tower sizes by name: (embed_dim, depth, num_heads, mlp_hidden_dim). "base" is Apple's LiT tower; "tiny" trains
# in minutes on a CPU against the tiny encoder.
TEXT_SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (192, 4, 3, 512),
    "small": (384, 8, 6, 1024),
    "base": (768, 12, 6, 2048),
}


@dataclass
class LiTConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    text: TextConfig = field(default_factory=TextConfig)
    projection_dim: int = 768
    head_num_heads: int | None = None  # None: the encoder's number of heads (as Apple's head)
    init_temperature: float = 0.07  # logit_scale starts at ln(1 / init_temperature)
    max_logit_scale: float = 100.0  # exp(logit_scale) is clamped to [1, max_logit_scale]
    encoder_name: str | None = None

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


def text_config(size: str = "base", **overrides) -> TextConfig:
    """A named text tower size with field overrides (e.g. ``vocab_size``, ``eos_id``, ``context_length``)."""
    if size not in TEXT_SIZES:
        raise ValueError(f"unknown text tower size {size!r}; choose from {', '.join(TEXT_SIZES)}")
    dim, depth, heads, hidden = TEXT_SIZES[size]
    return TextConfig(**{"embed_dim": dim, "depth": depth, "num_heads": heads, "mlp_hidden_dim": hidden, **overrides})


def official_lit_config() -> LiTConfig:
    """Apple's ``aimv2-large-patch14-224-lit``."""
    from .registry import parse_model_name

    name = "aimv2-large-patch14-224"
    return LiTConfig(encoder=parse_model_name(name), text=TextConfig(), projection_dim=768, encoder_name=name)


class TextTower(nn.Module):
    """Causal transformer over caption ids, pooled at the first EOS: ids [B, T] -> [B, D]."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.context_length, cfg.embed_dim))  # [T, D], Apple's shape
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_hidden_dim, cfg.norm_eps) for _ in range(cfg.depth)
        )
        self.norm = RMSNorm(cfg.embed_dim, cfg.norm_eps)

    def forward_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Per-position states after the final norm: [B, T] -> [B, T, D]. Position t sees only ids[:, :t+1]."""
        B, T = ids.shape
        if T > self.cfg.context_length:
            raise ValueError(f"text of {T} tokens is longer than the context length {self.cfg.context_length}")
        x = self.token_embed(ids) + self.pos_embed[:T].to(self.token_embed.weight.dtype)  # [B, T, D]
        for blk in self.blocks:
            x = blk(x, is_causal=True)
        return self.norm(x)

    def eos_index(self, ids: torch.Tensor) -> torch.Tensor:
        """Position of the first EOS of each row: long [B]. A row without one (a caption cut at the context length)
        is pooled at its last position, which under causal attention is the one that has read all of it."""
        is_eos = ids == self.cfg.eos_id  # [B, T]
        first = is_eos.int().argmax(dim=-1)  # [B]: 0 when there is none
        return torch.where(is_eos.any(dim=-1), first, ids.shape[1] - 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.forward_tokens(ids)  # [B, T, D]
        return x[torch.arange(ids.shape[0], device=ids.device), self.eos_index(ids)]  # [B, D]


class AttentionPoolHead(nn.Module):
    """One learned query attends over the patch features: [B, N, D] -> [B, D].

    The query is the ``cls_token`` itself (no q projection); k and v are bias-free; the heads split D as in the
    encoder; the pooled vector goes through ``linear`` (with bias), as in Apple's LiT head.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"head width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.linear = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        H, hd = self.num_heads, D // self.num_heads
        q = self.cls_token.to(x.dtype).expand(B, -1, -1).view(B, 1, H, hd).transpose(1, 2)  # [B, H, 1, hd]
        k = self.k(x).view(B, N, H, hd).transpose(1, 2)  # [B, H, N, hd]
        v = self.v(x).view(B, N, H, hd).transpose(1, 2)  # [B, H, N, hd]
        y = F.scaled_dot_product_attention(q, k, v)  # [B, H, 1, hd]
        y = y.transpose(1, 2).reshape(B, 1, D).mean(dim=1)  # [B, D]: the mean over the (one) query
        return self.linear(y)


class LiTOutput(NamedTuple):
    image_embeds: torch.Tensor  # [B, P], unit norm
    text_embeds: torch.Tensor  # [B, P], unit norm
    logit_scale: torch.Tensor  # scalar: exp of the clamped log scale
    logits_per_image: torch.Tensor  # [B, B]: logit_scale * image @ text.T
    logits_per_text: torch.Tensor  # [B, B]: its transpose


class LiT(nn.Module):
    """Image tower (AIMv2 encoder + attention-pool head) and text tower, projected into one embedding space."""

    def __init__(self, cfg: LiTConfig, encoder: VisionEncoder | None = None):
        super().__init__()
        self.cfg = cfg
        if encoder is not None and encoder.cfg != cfg.encoder:
            raise ValueError(f"the encoder given ({encoder.cfg}) does not match the config ({cfg.encoder})")
        self.encoder = encoder if encoder is not None else VisionEncoder(cfg.encoder, name=cfg.encoder_name)
        de, dt = cfg.encoder.embed_dim, cfg.text.embed_dim
        self.head = AttentionPoolHead(de, cfg.head_num_heads or cfg.encoder.num_heads)
        self.text = TextTower(cfg.text)
        self.image_proj = nn.Linear(de, cfg.projection_dim, bias=False)
        self.text_proj = nn.Linear(dt, cfg.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))
        self.max_log_logit_scale = math.log(cfg.max_logit_scale)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights(encoder=encoder is None)

    @torch.no_grad()
    def init_weights(self, encoder: bool = True) -> None:
        """Fresh towers: xavier-uniform trunk linears (as the encoder), token embeddings and the query std 0.02,
        text positions std 0.01, projections with fan-in scaling. ``encoder=False`` keeps the given encoder."""
        if encoder:
            self.encoder.init_weights()
        init_trunk_linear_(self.text.blocks)
        nn.init.normal_(self.text.token_embed.weight, std=0.02)
        nn.init.normal_(self.text.pos_embed, std=0.01)
        nn.init.ones_(self.text.norm.weight)
        for m in self.text.blocks.modules():
            if isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
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
        return F.normalize(self.image_proj(self.head(patches)), dim=-1)

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
        return LiTOutput(img, txt, s, logits, logits.t())


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
    labels = torch.arange(offset, offset + image_embeds.shape[0], device=image_embeds.device)  # [b]
    logits_i2t = logit_scale * image_embeds @ all_text_embeds.t()  # [b, B]
    logits_t2i = logit_scale * text_embeds @ all_image_embeds.t()  # [b, B]
    return (F.cross_entropy(logits_i2t.float(), labels) + F.cross_entropy(logits_t2i.float(), labels)) / 2
