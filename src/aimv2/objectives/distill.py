"""Feature distillation: a student encoder learns a frozen teacher encoder's patch features (``model.objective=
distill``). This is our recipe: Apple released encoders "distilled from AIMv2-3B" without saying how.

    images [B, 3, H, W] (normalized with the run's data.mean_std; the teacher sees the same normalization)
      teacher(images resized to the teacher's own image size)   -> [B, N_t, D_t]  frozen, eval, no grad, bidirectional
        feature grid resized to the student's (bilinear, antialiased when it shrinks) -> t [B, N, D_t]
      student encoder(images)                                   -> feats [B, N, D]
      projection(feats)                                         -> s [B, N, D_t]   (a learned linear map)
      distill_cosine    = sum over patches of 1 - cos(s, t)                       count B * N
      distill_smooth_l1 = sum over patches of mean over channels of smooth_l1(s, t; beta)   count B * N
      loss = cosine * distill_cosine + smooth_l1 * distill_smooth_l1 (+ aimv2 * (text_loss + alpha * image_loss))

The teacher's features are its final, normed patch features (what every downstream use of an encoder reads). The
projection is there at every width, also where the two widths agree: it keeps the student's own feature space free
of the teacher's scale and basis (FitNets' regressor, AM-RADIO's adaptor heads), and it is not exported
(``encoder.safetensors`` is the student alone).

With ``aimv2 == 0`` the student encodes bidirectionally (every patch sees every patch: the teacher does too). With
``aimv2 > 0`` it runs once, with the run's prefix attention, and both losses read that one forward: the AIMv2 part
(a causal decoder regressing the next patch and predicting the caption) keeps its no-leak guarantee, while the
distillation targets of every patch, prefix or not, are the teacher's.

The teacher is no registered module: it is not in ``state_dict``, ``parameters()`` (so neither in the optimizer nor
in DDP / FSDP2 wrapping) nor in any checkpoint; ``model.to`` leaves it where it is and the first forward moves it to
the batch's device. A run rebuilds it from its config (``model.distill.teacher``) when it resumes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.decoder import MultimodalDecoder
from ..models.encoder import VisionEncoder
from .aimv2 import (
    PretrainOutput,
    caption_terms,
    image_target_count,
    patch_regression_terms,
    pixel_targets,
    resolve_prefix_len,
)
from .base import LossTerms, count

PARTS = ("distill_cosine", "distill_smooth_l1")  # the loss parts distillation adds, counted per patch


def resize_grid(feats: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Patch features [B, gh * gw, D] on ``grid`` resampled to ``size`` (bilinear, antialiased where it shrinks)."""
    if tuple(grid) == tuple(size):
        return feats
    B, _, D = feats.shape
    x = feats.transpose(1, 2).reshape(B, D, *grid).float()
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x.flatten(2).transpose(1, 2)  # [B, size_h * size_w, D]


def distill_terms(
    student: torch.Tensor, teacher: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of 1 - cos, sum of channel-mean smooth-L1, count) over the patches of student and teacher features
    [B, N, D] (float32 sums)."""
    s, t = student.float(), teacher.float()
    cosine = (1 - F.cosine_similarity(s, t, dim=-1)).sum()
    smooth = F.smooth_l1_loss(s, t, beta=beta, reduction="none").mean(-1).sum()
    return cosine, smooth, count(s.shape[0] * s.shape[1], s.device)


class Distiller(nn.Module):
    """A student encoder (+ projection, + optionally the AIMv2 decoder) trained on a frozen teacher's features
    (an objective in the sense of objectives/base.py)."""

    input_names = ("images", "text", "prefix_len")
    whole_batch = False
    whole_graph = False  # the teacher's forward (no grad, its own device move) stays outside any compiled graph
    predictions_keep_grad = True  # False: image_pred / text_logits come back detached (set by the trainer)

    def __init__(
        self,
        encoder: VisionEncoder,
        teacher: VisionEncoder,
        *,
        decoder: MultimodalDecoder | None = None,
        pad_id: int = 0,
        alpha: float = 0.4,
        cosine: float = 1.0,
        smooth_l1: float = 1.0,
        smooth_l1_beta: float = 1.0,
        aimv2: float = 0.0,
    ):
        super().__init__()
        if (aimv2 > 0) != (decoder is not None):
            raise ValueError("the AIMv2 part of distillation needs a decoder exactly when its weight aimv2 > 0")
        self.encoder = encoder
        self.projection = nn.Linear(encoder.cfg.embed_dim, teacher.cfg.embed_dim)
        self.decoder = decoder
        # outside the registered modules (see the module docstring): a plain attribute, frozen and in eval mode
        object.__setattr__(self, "teacher", teacher.requires_grad_(False).eval())
        self.pad_id, self.alpha = pad_id, alpha
        self.weights = dict(zip(PARTS, (cosine, smooth_l1), strict=True))
        self.beta, self.aimv2 = smooth_l1_beta, aimv2
        self.patch_size = encoder.cfg.patch_size

    @torch.no_grad()
    def teacher_features(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The teacher's final patch features of ``images`` [B, 3, H, W] on the student's ``grid``: float32 [B, N, D_t].
        The teacher sees the images at its own image size (bilinear, antialiased where it shrinks)."""
        teacher = self.teacher
        if next(teacher.parameters()).device != images.device:
            teacher.to(images.device)
        size = teacher.cfg.image_hw
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
        p = teacher.cfg.patch_size
        feats = teacher(images)  # [B, N_t, D_t] bidirectional
        return resize_grid(feats, (size[0] // p, size[1] // p), grid).float()

    def forward(
        self, images: torch.Tensor, text: torch.Tensor, prefix_len: torch.Tensor | int | None = None
    ) -> PretrainOutput:
        B, _, H, W = images.shape
        grid = (H // self.patch_size, W // self.patch_size)
        N = grid[0] * grid[1]
        target = self.teacher_features(images, grid)  # [B, N, D_t]
        if self.decoder is None:  # distillation only: bidirectional, like the teacher
            prefix_len = torch.full((B,), N, dtype=torch.long, device=images.device)
            feats = self.encoder(images)  # [B, N, D]
        else:  # one prefix forward for both losses
            prefix_len = resolve_prefix_len(prefix_len, B, N, images.device)
            feats = self.encoder(images, prefix_len=prefix_len)
        cos_sum, l1_sum, n = distill_terms(self.projection(feats), target, self.beta)
        zero, none = images.new_zeros((), dtype=torch.float32), count(0, images.device)
        image_pred, text_logits = None, None
        image_sum, image_n, text_sum, text_n = zero, none, zero, none
        if self.decoder is not None:
            image_pred, text_logits = self.decoder(feats, text)  # [B, N-1, P], [B, T, V]
            image_sum, image_n = patch_regression_terms(image_pred, pixel_targets(images, self.patch_size), prefix_len)
            text_sum, text_n = caption_terms(text_logits, text, self.pad_id)
        terms = LossTerms(
            sums={
                "distill_cosine": cos_sum,
                "distill_smooth_l1": l1_sum,
                "image_loss": image_sum,
                "text_loss": text_sum,
            },
            counts={"distill_cosine": n, "distill_smooth_l1": n, "image_loss": image_n, "text_loss": text_n},
            weights={**self.weights, "image_loss": self.aimv2 * self.alpha, "text_loss": self.aimv2},
        )
        return PretrainOutput.from_terms(terms, image_pred, text_logits, prefix_len, self.predictions_keep_grad)

    def loss_counts(self, images: torch.Tensor, text: torch.Tensor, prefix_len: torch.Tensor) -> dict:
        """The valid targets forward will count: every patch for distillation; with the AIMv2 part, its non-prefix
        patches and non-pad tokens."""
        N = (images.shape[-2] // self.patch_size) * (images.shape[-1] // self.patch_size)
        counts = dict.fromkeys(PARTS, count(len(images) * N))
        if self.decoder is None:
            return {**counts, "image_loss": count(0), "text_loss": count(0)}
        text_n = count((text != self.pad_id).sum())
        return {**counts, "image_loss": image_target_count(prefix_len, N), "text_loss": text_n}
