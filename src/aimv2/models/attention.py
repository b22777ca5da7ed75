"""Who may attend whom, described as data, and the one function that computes attention with it.

Three patterns occur in AIMv2 and its uses:

    full       every query sees every key                      (inference, probes, the LiT image tower)
    causal     query i sees keys j <= i                        (the decoder, the text tower)
    prefix     causal, plus keys j < prefix_len[b] for every   (the encoder during pretraining: its first
               query of sample b                                prefix_len[b] patches are bidirectional)

and any of them may have padding keys (``key_valid[b, j] == False``) that no query attends, when samples of
different lengths share a batch. :class:`AttentionMask` holds the pattern instead of a materialized
[B, 1, N, N] tensor, so :func:`attend` can hand each backend the form it runs fastest with: the ``is_causal``
flag of ``scaled_dot_product_attention`` where that is exact, a boolean mask otherwise.

Masks are boolean with ``True`` meaning "may attend". A query row is never fully masked: key 0 is always a
real token and every pattern lets every query see it, so no softmax sees only -inf.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(eq=False)
class AttentionMask:
    """The attention pattern of one forward pass over sequences of ``seq_len`` tokens.

    causal: query i sees keys j <= i.
    prefix_len: [B] long, with ``causal``: keys j < prefix_len[b] are also seen by every query of sample b.
        A prefix of 0 or 1 is plain causal; ``seq_len`` is full attention.
    key_valid: [B, N] bool, False at padding keys (seen by no query). Key 0 must be valid.
    """

    seq_len: int
    causal: bool = False
    prefix_len: torch.Tensor | None = None
    key_valid: torch.Tensor | None = None
    dense: torch.Tensor | None = field(init=False, repr=False, default=None)  # bool [B or 1, 1, N, N], or None

    def __post_init__(self):
        if self.prefix_len is not None and not self.causal:
            raise ValueError("prefix_len needs causal=True (a prefix is the bidirectional start of a causal mask)")
        # Built once per forward pass and shared by every layer that attends with this pattern.
        self.dense = self.materialize()

    @property
    def is_plain_causal(self) -> bool:
        return self.causal and self.prefix_len is None and self.key_valid is None

    @property
    def is_full(self) -> bool:
        return not self.causal and self.key_valid is None

    def materialize(self) -> torch.Tensor | None:
        """The pattern as a boolean [B or 1, 1, N, N] tensor; None where it is full or plain causal (SDPA's
        ``attn_mask=None`` / ``is_causal=True`` do those exactly and faster)."""
        if self.is_full or self.is_plain_causal:
            return None
        N = self.seq_len
        device = (self.prefix_len if self.prefix_len is not None else self.key_valid).device
        allowed = torch.ones(1, 1, N, N, dtype=torch.bool, device=device)
        if self.causal:
            idx = torch.arange(N, device=device)
            allowed = (idx[None, :] <= idx[:, None])[None, None]  # [1, 1, N, N]: key j <= query i
            if self.prefix_len is not None:
                in_prefix = idx[None, :] < self.prefix_len.reshape(-1, 1)  # [B, N]: key j in sample b's prefix
                allowed = allowed | in_prefix[:, None, None, :]  # [B, 1, N, N]
        if self.key_valid is not None:
            allowed = allowed & self.key_valid[:, None, None, :]  # [B, 1, N, N]
        return allowed


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask | torch.Tensor | None, is_causal: bool
) -> torch.Tensor:
    """Scaled dot-product attention of q, k, v [B, H, N, hd] under ``mask`` -> [B, H, N, hd].

    mask: an :class:`AttentionMask`, a boolean tensor broadcastable to [B, H, N, N] (True = may attend), or None
    (full attention, or causal when ``is_causal``).
    """
    if isinstance(mask, AttentionMask):
        is_causal = mask.is_plain_causal
        mask = mask.dense
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)
