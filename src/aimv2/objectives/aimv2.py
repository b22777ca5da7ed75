"""The AIMv2 pretraining objective, readable top to bottom.

    images [B, 3, H, W], text [B, T], prefix_len [B] (M_b drawn uniformly in {1, ..., N-1})
      encoder(images, prefix_len)           -> feats [B, N, D_enc]  (prefix attention)
      decoder(feats, text)                  -> image_pred [B, N-1, p*p*3], text_logits [B, T, V]
      image_pred[:, k] regresses patch k+1, normalized per patch; loss only where k+1 >= M_b
      text_logits[:, t] predicts text[:, t]; loss only on non-pad tokens
      loss = text_loss + alpha * image_loss   (each a mean over its valid targets: LossTerms.loss)

Native resolution with every image at its own aspect ratio: ``images`` are patch tokens [B, A, p*p*3] (image b's
n_b = gh_b * gw_b patches first, in its own raster order, then padding) and ``grid_hw`` [B, 2] their grids. M_b is
drawn in {1, ..., n_b - 1}, the encoder and decoder mask the padding out (``forward_tokens``, ``image_len``), and
only image b's real patches are targets: each row is that image trained alone at its own grid.

The losses are computed once, as sums over valid targets with their counts (``PretrainOutput.terms``); the means
in the output and the trainer's global-batch loss are both ``LossTerms.loss`` of those sums (objectives/base.py).

Why the prefix targets are excluded: encoder features of prefix patches see the whole prefix, so a
prediction of patch k+1 < M would be read off a feature that already contains it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..models.decoder import DecoderConfig, MultimodalDecoder, default_decoder_config
from ..models.encoder import VisionEncoder
from ..models.registry import build_encoder, model_size
from .base import LossTerms, count
from .token_cross_entropy import token_cross_entropy_sum


@dataclass
class PretrainOutput:
    loss: torch.Tensor  # scalar: text_loss + alpha * image_loss (+ moe.balance_weight * balance_loss with MoE)
    image_loss: torch.Tensor  # scalar: MSE per patch, averaged over non-prefix target patches of the batch
    text_loss: torch.Tensor  # scalar: cross-entropy averaged over non-pad tokens of the batch
    image_pred: torch.Tensor  # [B, N-1, p*p*3]; image_pred[:, k] predicts patch k+1
    text_logits: torch.Tensor  # [B, T, V]; text_logits[:, t] predicts text[:, t]
    prefix_len: torch.Tensor  # [B] the prefix lengths used (N: fully bidirectional)
    terms: LossTerms  # the sums and valid counts behind the three losses above (what the trainer reads)
    # The baselines (objectives/generative.py) return the same type: a loss part their objective does not have is
    # a zero tensor with count 0 (so metrics keep their keys) and a prediction it does not make is None.

    @classmethod
    def from_terms(
        cls, terms: LossTerms, image_pred, text_logits, prefix_len: torch.Tensor, keep_grad: bool = True
    ) -> PretrainOutput:
        """The output whose losses are ``terms`` divided by this batch's own counts; without ``keep_grad`` the
        predictions are detached (the objective's ``predictions_keep_grad``, objectives/base.py)."""
        means = terms.means()
        if not keep_grad:
            image_pred, text_logits = (None if t is None else t.detach() for t in (image_pred, text_logits))
        return cls(terms.loss(), means["image_loss"], means["text_loss"], image_pred, text_logits, prefix_len, terms)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, p*p*C], patches in raster order, values in (row, col, channel) order."""
    B, C, H, W = images.shape
    p = patch_size
    x = images.reshape(B, C, H // p, p, W // p, p)  # [B, C, gh, p, gw, p]
    x = x.permute(0, 2, 4, 3, 5, 1)  # [B, gh, gw, p, p, C]
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def patch_targets(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalized targets of patch values [B, N, P]: (x - mean) / sqrt(var + eps), unbiased var, float32."""
    x = patches.float()
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=True)
    return (x - mean) / torch.sqrt(var + eps)


def pixel_targets(images: torch.Tensor, patch_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalized pixel targets of images [B, C, H, W]: float32 [B, N, p*p*C]."""
    return patch_targets(patchify(images, patch_size), eps)


def image_loss_mask(prefix_len: torch.Tensor, num_patches: int, image_len: torch.Tensor | None = None) -> torch.Tensor:
    """bool [B, N-1]: True where image_pred[:, k] has a target, i.e. patch k+1 is not in the prefix (and, for
    padded images, is one of image b's ``image_len[b]`` real patches)."""
    k = torch.arange(num_patches - 1, device=prefix_len.device)
    valid = (k[None, :] + 1) >= prefix_len[:, None]
    if image_len is not None:
        valid &= (k[None, :] + 1) < image_len.to(prefix_len.device)[:, None]
    return valid


def resolve_prefix_len(prefix_len: torch.Tensor | int | None, batch: int, num_patches: int, device) -> torch.Tensor:
    """None -> one uniform draw per sample in {1, ..., N-1} from torch's RNG (the trainer passes its own draws);
    an int -> the same length for every sample. Returns long [B] on ``device``."""
    if prefix_len is None:
        return torch.randint(1, num_patches, (batch,), device=device)
    if isinstance(prefix_len, int):
        return torch.full((batch,), prefix_len, dtype=torch.long, device=device)
    return prefix_len.to(device)


def patch_regression_terms(
    image_pred: torch.Tensor, targets: torch.Tensor, prefix_len: torch.Tensor, image_len: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared error of image_pred [B, N-1, P] (position k predicts patch k+1) against normalized patch targets
    [B, N, P], averaged over a patch's values and summed over the non-prefix (real) target patches; returns
    (sum float32, count)."""
    N = image_pred.shape[1] + 1
    target = targets[:, 1:]  # [B, N-1, P]
    per_patch = (image_pred.float() - target).pow(2).mean(dim=-1)  # [B, N-1]
    valid = image_loss_mask(prefix_len, N, image_len)  # [B, N-1]
    # where, not a product: a padding row's prediction may be anything (even inf) and must not reach the sum
    return torch.where(valid, per_patch, 0.0).sum(), count(valid.sum())


def image_regression_terms(
    image_pred: torch.Tensor, images: torch.Tensor, prefix_len: torch.Tensor, patch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`patch_regression_terms` of images [B, C, H, W]."""
    return patch_regression_terms(image_pred, pixel_targets(images, patch_size), prefix_len)


def caption_terms(text_logits: torch.Tensor, text: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy of text_logits [B, T, V] against text [B, T], summed over non-pad tokens;
    returns (sum float32, count). The sum is ``F.cross_entropy``'s with a one-pass backward (token_cross_entropy.py)."""
    return token_cross_entropy_sum(text_logits, text, pad_id), count((text != pad_id).sum())


def pretraining_terms(
    image_sum: torch.Tensor, image_count: torch.Tensor, text_sum: torch.Tensor, text_count: torch.Tensor, alpha: float
) -> LossTerms:
    """The two parts of every generative pretraining loss: ``text_loss + alpha * image_loss``."""
    return LossTerms(
        sums={"image_loss": image_sum, "text_loss": text_sum},
        counts={"image_loss": image_count, "text_loss": text_count},
        weights={"image_loss": alpha, "text_loss": 1.0},
    )


def image_target_count(prefix_len: torch.Tensor, num_patches: int | torch.Tensor) -> torch.Tensor:
    """How many patches image_regression_terms sums over, from the prefix lengths alone: sum_b (N_b - M_b)
    (``num_patches``: one N for all, or [B] for images of their own grids)."""
    return count((num_patches - prefix_len).sum())


class PrefixSampler:
    """Draws prefix lengths M ~ U{1, ..., N-1}, one per sample, from generators keyed by where the draw
    happens: (seed, rank, worker, step) for a batch, or (seed, global sample index) per sample.

    The reference code seeds one sampler in the parent process, so every data worker and every rank
    repeats the same sequence. Keyed draws are distinct across workers, ranks and steps and reproducible
    on resume. The trainer keys by global sample index, which is unique to (rank, worker, step, position)
    and also independent of how many ranks share the batch.
    """

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def __call__(
        self, batch_size: int, num_patches: int | torch.Tensor, *, rank: int = 0, worker: int = 0, step: int = 0
    ) -> torch.Tensor:
        """[B] draws in [1, N_b - 1] (``num_patches``: one N, or [B] per image)."""
        n = num_patches.numpy() if isinstance(num_patches, torch.Tensor) else num_patches
        self._check(int(np.min(n)))
        rng = np.random.default_rng([self.seed, 0, rank, worker, step])
        return torch.from_numpy(rng.integers(1, n, size=batch_size)).long()  # [B] in [1, N_b - 1]

    def per_sample(self, indices: torch.Tensor, num_patches: int | torch.Tensor) -> torch.Tensor:
        """One draw per global sample index: [B] -> [B] in [1, N_b - 1] (``num_patches``: one N, or [B] per image)."""
        n = torch.as_tensor(num_patches).expand(len(indices)).tolist()
        self._check(min(n, default=2))
        draws = [
            np.random.default_rng([self.seed, 1, int(i)]).integers(1, n_b) for i, n_b in zip(indices, n, strict=True)
        ]
        return torch.tensor(draws, dtype=torch.long)

    @staticmethod
    def _check(num_patches: int) -> None:
        if num_patches < 2:
            raise ValueError(f"prefix attention needs at least 2 patches per image, got {num_patches}")


class AIMv2Pretrainer(nn.Module):
    """Encoder + multimodal decoder + the AIMv2 loss (an objective in the sense of objectives/base.py)."""

    input_names = ("images", "text", "prefix_len", "grid_hw")
    whole_batch = False
    whole_graph = True  # the dense path compiles as one graph (native batches keep per-block graphs)
    predictions_keep_grad = True  # False: image_pred / text_logits come back detached (set by the trainer)

    def __init__(self, encoder: VisionEncoder, decoder: MultimodalDecoder, *, pad_id: int = 0, alpha: float = 0.4):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.pad_id = pad_id
        self.alpha = alpha
        self.patch_size = encoder.cfg.patch_size
        if decoder.cfg.moe.enabled:  # routes have data-dependent sizes: graph breaks, so compile per block
            self.whole_graph = False

    def forward(
        self,
        images: torch.Tensor,
        text: torch.Tensor,
        prefix_len: torch.Tensor | int | None = None,
        grid_hw: torch.Tensor | None = None,
    ) -> PretrainOutput:
        """images: pixels [B, 3, H, W] (one grid for the batch; ``grid_hw`` is then not read), or patch tokens
        [B, A, p*p*3] of images at their own grids ``grid_hw`` [B, 2], each padded to A."""
        B = images.shape[0]
        if images.ndim == 4:  # one grid: the dense path
            N = (images.shape[-2] // self.patch_size) * (images.shape[-1] // self.patch_size)
            prefix_len = resolve_prefix_len(prefix_len, B, N, images.device)  # [B]
            feats = self.encoder(images, prefix_len=prefix_len)  # [B, N, D_enc]
            targets, image_len = pixel_targets(images, self.patch_size), None  # [B, N, P]
        else:  # own grids, padded: image b's n_b real patches first
            image_len = grid_hw.to(images.device).prod(1)  # [B]
            if prefix_len is None:  # one uniform draw per image in {1, ..., n_b - 1}
                prefix_len = (torch.rand(B, device=images.device) * (image_len - 1)).long() + 1
            prefix_len = resolve_prefix_len(prefix_len, B, images.shape[1], images.device)  # [B]
            feats = self.encoder.forward_tokens(images, grid_hw, prefix_len=prefix_len)  # [B, A, D_enc]
            targets = patch_targets(images)  # [B, A, P]
        image_pred, text_logits = self.decoder(feats, text, image_len)  # [B, N-1, P], [B, T, V]

        # image: regress normalized patch k+1 from position k, only for non-prefix (real) targets
        image_sum, image_count = patch_regression_terms(image_pred, targets, prefix_len, image_len)
        # text: next-token cross-entropy over non-pad tokens
        text_sum, text_count = caption_terms(text_logits, text, self.pad_id)
        terms = pretraining_terms(image_sum, image_count, text_sum, text_count, self.alpha)
        balance = self.decoder.balance_loss()  # a mixture-of-experts decoder's load balancing (models/moe.py)
        if balance is not None:  # one value per micro-batch: the trainer averages it over micro-batches and ranks
            terms.sums["balance_loss"], terms.counts["balance_loss"] = balance.float(), count(1, balance.device)
            terms.weights["balance_loss"] = self.decoder.cfg.moe.balance_weight
        return PretrainOutput.from_terms(terms, image_pred, text_logits, prefix_len, self.predictions_keep_grad)

    def loss_counts(
        self, images: torch.Tensor, text: torch.Tensor, prefix_len: torch.Tensor, grid_hw: torch.Tensor | None = None
    ) -> dict:
        """The valid targets forward will count, without running the model: non-prefix patches, non-pad tokens."""
        if images.ndim == 4:
            n = (images.shape[-2] // self.patch_size) * (images.shape[-1] // self.patch_size)
        else:
            n = grid_hw.to(prefix_len.device).prod(1)  # [B] each image's own patches
        counts = {"image_loss": image_target_count(prefix_len, n), "text_loss": count((text != self.pad_id).sum())}
        if self.decoder.cfg.moe.enabled:
            counts["balance_loss"] = count(1)
        return counts


def create_pretraining_model(
    encoder_name: str, *, vocab_size: int, pad_id: int = 0, alpha: float = 0.4, **overrides
) -> AIMv2Pretrainer:
    """Encoder ``encoder_name`` + the AIMv2 decoder, ready to pretrain.

    overrides: encoder config fields (``img_size=64``, ``depth=6``) and decoder fields prefixed with
    ``decoder_`` (``decoder_embed_dim``, ``decoder_depth``, ``decoder_num_heads``,
    ``decoder_mlp_hidden_dim``, ``decoder_max_text_len``). Research sizes get scaled-down decoders.
    """
    dec_over = {k.removeprefix("decoder_"): v for k, v in overrides.items() if k.startswith("decoder_")}
    enc_over = {k: v for k, v in overrides.items() if not k.startswith("decoder_")}
    encoder = build_encoder(encoder_name, **enc_over)
    dcfg: DecoderConfig = default_decoder_config(model_size(encoder_name), vocab_size=vocab_size, **dec_over)
    decoder = MultimodalDecoder(dcfg, encoder.cfg.embed_dim, encoder.cfg.patch_dim)
    return AIMv2Pretrainer(encoder, decoder, pad_id=pad_id, alpha=alpha)
