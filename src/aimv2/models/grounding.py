"""Grounding (referring expression comprehension) on the encoder's dense features, the OWL-ViT way: every patch
proposes one box and embeds itself; a small text tower embeds the phrase; a patch's score for the phrase is the
scaled cosine of the two embeddings. The answer is the box of the best-scoring patch.

    pixels [B, 3, S, S] -> DenseEncoder (last block) -> tokens [B, h*w, D]
        box head:   MLP(tokens) + the patch's own position as a prior -> boxes [B, h*w, 4] cxcywh in [0, 1]
        class head: Linear(tokens) -> patch embeddings [B, h*w, E]
    phrase bytes [B, L] -> TextTower -> phrase embedding [B, E]
    scores [B, h*w] = scale * cos(patch, phrase) + shift    (a logit per patch: "is this patch the phrase's object")

The box prior is OWL-ViT's: the head predicts an offset to the logit of the patch's centre and of a box one patch
wide, so an untrained head already proposes each patch's own square. The text tower reads UTF-8 bytes (no tokenizer
file, any language), a few pre-norm transformer blocks with a learned position embedding, mean-pooled over the
bytes that are not padding (0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dense import DenseEncoder
from .encoder import VisionEncoder

PAD = 0  # byte value 0 never appears in text: the padding id of the byte tokenizer


def encode_phrases(phrases: list[str], max_len: int) -> torch.Tensor:
    """UTF-8 bytes of each phrase as ids 1..256 (0 is padding), cut at ``max_len``: long [B, max_len]."""
    out = torch.zeros(len(phrases), max_len, dtype=torch.long)
    for i, p in enumerate(phrases):
        ids = list(p.encode("utf-8"))[:max_len]
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long) + 1
    return out


class TextTower(nn.Module):
    """Bytes -> one phrase embedding: a small pre-norm transformer, mean-pooled over the real bytes."""

    def __init__(self, dim: int, depth: int, heads: int, max_len: int, out_dim: int):
        super().__init__()
        self.embed = nn.Embedding(257, dim, padding_idx=PAD)
        self.pos = nn.Parameter(torch.zeros(1, max_len, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pad = tokens == PAD  # [B, L]
        x = self.embed(tokens) + self.pos[:, : tokens.shape[1]]
        x = self.norm(self.blocks(x, src_key_padding_mask=pad))
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        return self.proj((x * keep).sum(1) / keep.sum(1).clamp(min=1))  # [B, out_dim]


def box_prior(grid: tuple[int, int], device=None) -> torch.Tensor:
    """Logits of each patch's own box (centre, one patch wide and high), cxcywh: [h*w, 4] (OWL-ViT's box bias)."""
    h, w = grid
    ys, xs = torch.meshgrid(
        (torch.arange(h, device=device) + 0.5) / h, (torch.arange(w, device=device) + 0.5) / w, indexing="ij"
    )
    cxcywh = torch.stack([xs, ys, torch.full_like(xs, 1 / w), torch.full_like(ys, 1 / h)], -1).reshape(-1, 4)
    return torch.logit(cxcywh.clamp(1e-4, 1 - 1e-4))


class GroundingModel(nn.Module):
    """Boxes and phrase scores per patch (see the module docstring)."""

    def __init__(self, encoder: VisionEncoder, embed_dim: int = 64, text_dim: int = 64, text_depth: int = 2,
                 text_heads: int = 2, max_text_len: int = 64):  # fmt: skip
        super().__init__()
        self.dense = DenseEncoder(encoder, global_blocks=())
        d = encoder.embed_dim
        self.box_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d), nn.GELU(), nn.Linear(d, 4))
        nn.init.zeros_(self.box_head[-1].weight)  # start at the prior: each patch's own box
        nn.init.zeros_(self.box_head[-1].bias)
        self.patch_embed = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, embed_dim))
        self.text = TextTower(text_dim, text_depth, text_heads, max_text_len, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(2.3))  # exp(2.3) = 10
        self.logit_shift = nn.Parameter(torch.tensor(-2.0))

    @property
    def encoder(self) -> VisionEncoder:
        return self.dense.encoder

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, S, S] normalized, tokens [B, L] -> (boxes [B, N, 4] cxcywh in [0, 1], scores [B, N])."""
        (fmap,) = self.dense(images)  # [B, D, h, w]
        B, D, h, w = fmap.shape
        feats = fmap.flatten(2).transpose(1, 2)  # [B, N, D]
        boxes = torch.sigmoid(self.box_head(feats) + box_prior((h, w), feats.device))
        patch = F.normalize(self.patch_embed(feats), dim=-1)
        phrase = F.normalize(self.text(tokens), dim=-1)
        scores = torch.einsum("bnd,bd->bn", patch, phrase) * self.logit_scale.exp() + self.logit_shift
        return boxes, scores
