"""The AIMv2 multimodal decoder: one causal transformer shared by both modalities.

    image features [B, N, D_enc] -> Linear (bias)                       [B, N, D]
    [BOS] + caption tokens[:, :-1] -> embedding + learned position      [B, T, D]
    concat (image first)                                                [B, N + T, D]
      -> depth x causal pre-norm Block -> RMSNorm                       [B, N + T, D]
      -> pixel head on image positions 0..N-2 (predicts patches 1..N-1) [B, N - 1, p*p*3]
      -> text head on BOS + tokens 0..T-2 (predicts tokens 0..T-1)      [B, T, V]

Image positions come first, so causality alone guarantees that image predictions never see the
caption, and that the caption is predicted from the whole image.

Images padded to a common length (native resolution, ``image_len``): image b has ``image_len[b]`` real positions
first, then padding whose keys no query sees, so its patch predictions and its caption read its own real patches
only. The decoder has no image position embedding (the encoder's features carry it), so a row computes what the
same image alone would: the padding between its patches and its caption is invisible.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .attention import AttentionMask
from .init import init_blocks_, variance_scaling_trunc_
from .layers import KV, Block, RMSNorm
from .moe import MoEConfig, MoESwiGLU, moe_config


@dataclass
class DecoderConfig:
    """The paper's decoder is 1024 wide, 12 blocks, 8 heads for every encoder size."""

    embed_dim: int = 1024
    depth: int = 12
    num_heads: int = 8
    mlp_hidden_dim: int = 2816
    vocab_size: int = 32000
    max_text_len: int = 77  # BOS + caption tokens fed to the decoder (= the tokenizer's context length)
    norm_eps: float = 1e-5
    moe: MoEConfig = field(default_factory=MoEConfig)  # experts > 0: every block's SwiGLU a mixture of experts

    def __post_init__(self):
        self.moe = moe_config(self.moe)

    def to_dict(self) -> dict:
        return asdict(self)


# Scaled-down decoders for the research encoder sizes (the official sizes use the paper's 1024 x 12).
DECODER_SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (192, 4, 3, 512),
    "small": (384, 6, 6, 1024),
}


def default_decoder_config(encoder_size: str, **overrides) -> DecoderConfig:
    if encoder_size in DECODER_SIZES:
        dim, depth, heads, hidden = DECODER_SIZES[encoder_size]
        cfg = DecoderConfig(embed_dim=dim, depth=depth, num_heads=heads, mlp_hidden_dim=hidden)
    else:
        cfg = DecoderConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise ValueError(f"unknown decoder option {k!r}; valid: {sorted(asdict(cfg))}")
        setattr(cfg, k, moe_config(v) if k == "moe" else v)
    return cfg


@dataclass
class DecoderCache:
    """Keys and values of every decoder layer for the positions decoded so far (image, BOS, caption tokens).

    The image positions are computed once per image; each caption step then costs one position per layer
    instead of a forward over the whole ``N + t`` sequence.
    """

    kv: list[KV]  # per block: (k, v) each [B, H, N + text_len, head_dim]
    text_len: int  # text positions already in the cache, BOS included

    def select(self, index: torch.Tensor) -> DecoderCache:
        """The cache of rows ``index`` [B'] (beam search keeps the parents of the surviving hypotheses)."""
        return DecoderCache([(k[index], v[index]) for k, v in self.kv], self.text_len)


class MultimodalDecoder(nn.Module):
    """``patch_dim=None``: no pixel head (a captioning decoder); ``text=False``: no BOS, token embedding, text
    positions or text head (an image-only decoder). The baselines use these; AIMv2 has both."""

    def __init__(
        self, cfg: DecoderConfig, encoder_dim: int, patch_dim: int | None, *, text: bool = True, parallel: bool = False
    ):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.image_proj = nn.Linear(encoder_dim, D, bias=True)
        if text:
            self.bos = nn.Parameter(torch.zeros(1, 1, D))
            self.tok_embed = nn.Embedding(cfg.vocab_size, D)
            self.text_pos = nn.Parameter(torch.zeros(1, cfg.max_text_len, D))
        # CapPa's parallel prediction: the [MASK] input of every text position (big_vision's extra embedding row)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D)) if parallel and text else None
        self.blocks = nn.ModuleList(
            Block(D, cfg.num_heads, cfg.mlp_hidden_dim, cfg.norm_eps, moe=cfg.moe) for _ in range(cfg.depth)
        )
        self.norm = RMSNorm(D, cfg.norm_eps)
        self.pixel_head = nn.Linear(D, patch_dim, bias=False) if patch_dim is not None else None
        self.text_head = nn.Linear(D, cfg.vocab_size, bias=False) if text else None
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Apple's (ml-l3m's) init, tensor by tensor (the table in ``aimv2.models.init``): Xavier trunk (q, k, v
        each on its own [D, D]), PyTorch's default image projection, BOS and tokens normal(0.02), text positions
        normal(0.01), heads truncated-normal fan-in scaling 1/(1+depth) with timm's truncation correction."""
        init_blocks_(self.blocks)
        self.image_proj.reset_parameters()
        if self.text_head is not None:
            nn.init.normal_(self.bos, std=0.02)
            nn.init.normal_(self.tok_embed.weight, std=0.02)
            nn.init.normal_(self.text_pos, std=0.01)
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)  # as the token embeddings
        for head in (h for h in (self.pixel_head, self.text_head) if h is not None):
            variance_scaling_trunc_(head.weight, 1.0 / (1 + self.cfg.depth))
        for m in self.modules():
            if isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def balance_loss(self) -> torch.Tensor | None:
        """The load-balancing loss of the last forward: the mean over blocks of each mixture's E * sum_e f_e * P_e
        (models/moe.py); None without ``moe``."""
        layers = [b.mlp.balance for b in self.blocks if isinstance(b.mlp, MoESwiGLU)]
        return torch.stack(layers).mean() if layers else None

    def embed_text(self, text_in: torch.Tensor) -> torch.Tensor:
        """[BOS] + tokens -> [B, 1 + T_in, D] with learned positions (0 = BOS)."""
        B, T_in = text_in.shape
        if T_in + 1 > self.cfg.max_text_len:
            raise ValueError(
                f"caption of {T_in + 1} positions (BOS included) exceeds decoder.max_text_len="
                f"{self.cfg.max_text_len}; truncate captions or raise max_text_len"
            )
        x = torch.cat([self.bos.expand(B, -1, -1), self.tok_embed(text_in)], dim=1)  # [B, 1 + T_in, D]
        return x + self.text_pos[:, : T_in + 1]

    def forward(
        self,
        image_feats: torch.Tensor,
        text: torch.Tensor | None,
        image_len: torch.Tensor | None = None,
        parallel: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """image_feats [B, N, D_enc], text [B, T] (right-padded) ->
        (pixel predictions [B, N - 1, p*p*3] for patches 1..N-1, text logits [B, T, V] for tokens 0..T-1).
        A part the decoder does not have (no pixel head; no text: pass ``text=None``) comes back as None.
        image_len: [B] real image positions per row when images are padded to N (None: all N are real); then
        image_pred[b, k] for k >= image_len[b] - 1 predicts padding and has no meaning.
        parallel: bool [B] (a decoder built with ``parallel=True``): rows whose text inputs are all [MASK] and whose
        text positions attend to every text position (CapPa's parallel prediction); the image positions stay causal.
        """
        B, N, _ = image_feats.shape
        T = text.shape[1] if text is not None else 0
        img = self.image_proj(image_feats)  # [B, N, D]
        if T:
            txt = self.embed_text(text[:, :-1])  # [B, T, D]: BOS + tokens 0..T-2
            if parallel is not None:  # parallel rows: [MASK] at every text position, nothing of the caption
                masked = self.mask_token.to(txt.dtype) + self.text_pos[:, :T].to(txt.dtype)  # [1, T, D]
                txt = torch.where(parallel.to(txt.device)[:, None, None], masked, txt)
            x = torch.cat([img, txt], dim=1)  # [B, N + T, D]
        else:
            x = img  # [B, N, D]: image-only decoder
        mask = None  # plain causal
        if parallel is not None:
            if image_len is not None:
                raise ValueError("parallel prediction takes images of one grid (image_len=None)")
            pos = torch.arange(N + T, device=x.device)
            causal = pos[None, :] <= pos[:, None]  # [L, L]
            text_block = (pos[:, None] >= N) & (pos[None, :] >= N)  # text queries x text keys
            rows = parallel.to(x.device)[:, None, None, None]  # [B, 1, 1, 1]
            mask = causal | (text_block & rows)  # [B, 1, L, L] True = may attend
        if image_len is not None:
            key_valid = torch.ones(B, N + T, dtype=torch.bool, device=x.device)  # [B, N + T]
            key_valid[:, :N] = torch.arange(N, device=x.device)[None, :] < image_len.to(x.device)[:, None]
            mask = AttentionMask(N + T, causal=True, key_valid=key_valid)
        for blk in self.blocks:
            x = blk(x, mask, is_causal=True)
        x = self.norm(x)
        image_pred = self.pixel_head(x[:, : N - 1]) if self.pixel_head is not None else None  # [B, N - 1, p*p*3]
        text_logits = self.text_head(x[:, N : N + T]) if T else None  # [B, T, V]
        return image_pred, text_logits

    # ------------------------------------------------------------------ incremental decoding (captioning)
    @torch.no_grad()
    def start(self, image_feats: torch.Tensor) -> tuple[torch.Tensor, DecoderCache]:
        """Image positions + BOS, for generation: image_feats [B, N, D_enc] ->
        (logits of caption token 0 [B, V], cache). The same values as ``forward``'s ``text_logits[:, 0]``."""
        B = image_feats.shape[0]
        img = self.image_proj(image_feats)  # [B, N, D]
        bos = self.embed_text(image_feats.new_zeros(B, 0, dtype=torch.long))  # [B, 1, D]
        x = torch.cat([img, bos], dim=1)  # [B, N + 1, D]
        kv = []
        for blk in self.blocks:
            x, layer_kv = blk.forward_cached(x, None)
            kv.append(layer_kv)
        logits = self.text_head(self.norm(x[:, -1]))  # [B, V]
        return logits, DecoderCache(kv, text_len=1)

    @torch.no_grad()
    def extend(self, tokens: torch.Tensor, cache: DecoderCache) -> tuple[torch.Tensor, DecoderCache]:
        """Feed the next caption tokens [B, L] after the cached positions ->
        (logits [B, L, V] where [:, i] predicts the token after tokens[:, i], the grown cache)."""
        L = tokens.shape[1]
        t0 = cache.text_len  # text position of tokens[:, 0] (0 is BOS)
        if t0 + L > self.cfg.max_text_len:
            raise ValueError(
                f"caption of {t0 + L} positions (BOS included) exceeds decoder.max_text_len={self.cfg.max_text_len}"
            )
        x = self.tok_embed(tokens) + self.text_pos[:, t0 : t0 + L]  # [B, L, D]
        kv = []
        for blk, past in zip(self.blocks, cache.kv, strict=True):
            x, layer_kv = blk.forward_cached(x, past)
            kv.append(layer_kv)
        logits = self.text_head(self.norm(x))  # [B, L, V]
        return logits, DecoderCache(kv, text_len=t0 + L)
