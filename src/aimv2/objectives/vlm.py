"""A vision-language model as LLaVA builds it, with an AIMv2 (or any of our) encoder: the paper's headline use.

    image [B, 3, H, W]
      -> views (objectives/tiling.py: the image itself, or a global view + N x M tiles)   [B*V, 3, h, w]
      -> vision encoder, features of one block (the last by default), frozen by default   [B*V, n, D_enc]
      -> optional k x k token pooling                                                     [B*V, n', D_enc]
      -> projector: Linear -> GELU -> Linear                                              [B, K = V*n', D_lm]
      -> spliced into the LM's token embeddings where the prompt had ``<image>``          [B, T - 1 + K, D_lm]
      -> the causal LM (any transformers ``*ForCausalLM``) with ``inputs_embeds``          logits [B, T - 1 + K, V]

The loss is next-token cross-entropy on the answer tokens only: the data (data/chat.py) marks prompt, chat markup
and padding positions with the label -100, and the image's K positions get -100 here. Returned as a sum and a
count (objectives/base.py), so micro-batches and ranks add up to the loss of the whole batch.

LLaVA's two stages are two settings of the same module: stage 1 trains the projector only (encoder and LM frozen:
``requires_grad`` off, so the optimizer never sees them), stage 2 the projector and the LM. The encoder stays frozen
in both, as in the paper, unless ``train_encoder``. The module does no I/O: the encoder and the LM come built
(aimv2.weights.load_encoder, aimv2.weights.lm.load_causal_lm).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.encoder import VisionEncoder
from .base import LossTerms, count
from .tiling import num_views, pool_tokens, split_views

IGNORE = -100  # the label of a position without loss (transformers' and torch's ignore_index)


@dataclass
class VLMOutput:
    loss: torch.Tensor  # mean cross-entropy over this batch's answer tokens
    logits: torch.Tensor  # [B, L, vocab]
    terms: LossTerms


class Projector(nn.Sequential):
    """LLaVA-1.5's 2-layer MLP from the encoder's width to the LM's."""

    def __init__(self, d_in: int, d_out: int, hidden: int | None = None):
        hidden = hidden or d_out
        super().__init__(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))


def splice(
    embeds: torch.Tensor,
    image_tokens: torch.Tensor,
    placeholder: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None = None,
    has_image: torch.Tensor | None = None,
):
    """Put each sample's K image tokens where its (single) placeholder was.

    embeds [B, T, D] (the placeholder's own embedding is dropped), image_tokens [B, K, D], placeholder [B] its
    index, attention_mask [B, T], labels [B, T] or None. Output position j of sample b holds text position j
    before the placeholder p_b, image token j - p_b for p_b <= j < p_b + K, and text position j - K + 1 after:
    prompts of any length, padded on either side, keep their order. Returns (embeds [B, T-1+K, D], mask, labels)
    with mask 1 and label -100 on the image positions. A sample without an image (``has_image`` [B] bool False,
    ``placeholder`` = T: past its text) keeps all its text and gets K - 1 masked image positions after it."""
    B, T, D = embeds.shape
    K = image_tokens.shape[1]
    j = torch.arange(T - 1 + K, device=embeds.device).unsqueeze(0)  # [1, L]
    p = placeholder.unsqueeze(1)  # [B, 1]
    is_image = (j >= p) & (j < p + K)  # [B, L]
    src = torch.where(j < p, j, j - K + 1).clamp(0, T - 1)  # [B, L] the text position each output reads
    text = embeds.gather(1, src.unsqueeze(-1).expand(-1, -1, D))
    image = image_tokens.gather(1, (j - p).clamp(0, K - 1).unsqueeze(-1).expand(-1, -1, D))
    out = torch.where(is_image.unsqueeze(-1), image.to(text.dtype), text)
    on = torch.ones_like(src) if has_image is None else has_image.long().unsqueeze(1).expand_as(src)
    mask = torch.where(is_image, on, attention_mask.gather(1, src))
    if labels is not None:
        labels = torch.where(is_image, torch.full_like(src, IGNORE), labels.gather(1, src))
    return out, mask, labels


class VisionLanguageModel(nn.Module):
    """Encoder + projector + causal LM; see the module docstring."""

    input_names = ("images", "input_ids", "labels", "attention_mask")
    whole_batch = False

    def __init__(
        self,
        encoder: VisionEncoder,
        lm: nn.Module,
        image_token_id: int,
        *,
        stage: int = 1,
        train_encoder: bool = False,
        block: int = -1,
        tiles: tuple[int, int] = (1, 1),
        pool: int = 1,
        projector_hidden: int | None = None,
    ):
        super().__init__()
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 (projector only) or 2 (projector + LM), got {stage}")
        self.encoder, self.lm = encoder, lm
        self.image_token_id, self.stage, self.block = image_token_id, stage, block
        self.tiles, self.pool = tuple(tiles), pool
        self.projector = Projector(encoder.embed_dim, lm.get_input_embeddings().embedding_dim, projector_hidden)
        encoder.requires_grad_(train_encoder)
        lm.requires_grad_(stage == 2)

    # ------------------------------------------------------------------ image side
    @property
    def image_size(self) -> tuple[int, int]:
        """The input (H, W) the model takes: the tile grid at the encoder's resolution."""
        h, w = self.encoder.cfg.image_hw
        return self.tiles[0] * h, self.tiles[1] * w

    @property
    def tokens_per_image(self) -> int:
        gh, gw = self.encoder.cfg.grid_size
        return num_views(self.tiles) * (gh // self.pool) * (gw // self.pool)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> the encoder's chosen block, views concatenated in tiling order: [B, K, D_enc]."""
        B = images.shape[0]
        views = split_views(images, self.tiles, self.encoder.cfg.image_hw)  # [B, V, 3, h, w]
        frozen = not any(p.requires_grad for p in self.encoder.parameters())
        with torch.no_grad() if frozen else contextlib.nullcontext():
            (feats,) = self.encoder.forward_features(views.flatten(0, 1), blocks=[self.block])  # [B*V, n, D]
        feats = pool_tokens(feats, self.encoder.cfg.grid_size, self.pool)  # [B*V, n', D]
        return feats.reshape(B, -1, feats.shape[-1])  # [B, V*n', D]

    def embed(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels=None):
        """The LM's input embeddings with the projected image tokens at the placeholder: (embeds, mask, labels)."""
        is_image = input_ids == self.image_token_id  # [B, T]
        per_sample = is_image.sum(1)
        if not bool((per_sample <= 1).all()):
            raise ValueError(
                f"every sample needs at most one <image> placeholder (token {self.image_token_id}) in its prompt; "
                f"got {per_sample.tolist()}"
            )
        has_image = per_sample == 1  # [B] a text-only sample has none: no image tokens reach its text
        placeholder = torch.where(has_image, is_image.int().argmax(1), input_ids.shape[1])  # [B]
        # the placeholder's id may lie past the embedding table (added to the tokenizer only): embed a 0 there
        text = self.lm.get_input_embeddings()(input_ids.masked_fill(is_image, 0))  # [B, T, D_lm]
        image = self.projector(self.image_features(images))  # [B, K, D_lm]
        return splice(text, image, placeholder, attention_mask, labels, None if has_image.all() else has_image)

    # ------------------------------------------------------------------ loss
    def loss_counts(self, images, input_ids, labels, attention_mask) -> dict[str, torch.Tensor]:
        """Answer tokens that are predicted (every labelled position but the first, which nothing precedes)."""
        return {"text_loss": count((labels[:, 1:] != IGNORE).sum())}

    def forward(self, images, input_ids, labels, attention_mask) -> VLMOutput:
        embeds, mask, labels = self.embed(images, input_ids, attention_mask, labels)  # [B, L, D], [B, L], [B, L]
        logits = self.lm(inputs_embeds=embeds, attention_mask=mask).logits  # [B, L, vocab]
        target = labels[:, 1:]  # position t predicts token t + 1
        total = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE, reduction="sum"
        )
        n = count((target != IGNORE).sum(), device=total.device)
        terms = LossTerms({"text_loss": total}, {"text_loss": n}, {"text_loss": 1.0})
        return VLMOutput(terms.loss(), logits, terms)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def generate(self, images, input_ids, attention_mask, **kwargs) -> torch.Tensor:
        """New token ids [B, <= max_new_tokens] after each prompt (left-padded for a batch), through the LM's
        ``generate`` with its KV cache: greedy by default, sampled with ``do_sample=True`` (temperature, top_p)."""
        embeds, mask, _ = self.embed(images, input_ids, attention_mask)
        return self.lm.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
