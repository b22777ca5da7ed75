"""What every training objective returns, and the one place where its loss is put together.

An objective is an ``nn.Module`` that owns its model parts and whose ``forward`` returns an output with
``terms``: for each part of its loss (``image_loss``, ``text_loss``, ``contrastive_loss``, ...) the **sum** of the
per-target losses over the batch it was given and the **number** of valid targets in that sum (non-prefix patches,
non-pad tokens, image-text pairs). It returns sums rather than means because means of micro-batches and ranks with
different valid counts do not average to the mean of the whole batch; sums divided by the global counts do:

    loss = sum over parts k of  weight_k * sum_k / count_k          (LossTerms.loss: the only place of this formula)

With this batch's own counts that is the objective's loss on the batch (``PretrainOutput.loss``); with the counts of
the global batch (every micro-batch on every rank, all-reduced before the first backward) it is the trainer's
per-micro-batch share of the global loss, so one step's gradient is exactly that of one process on the whole
batch.

Besides ``forward``, an objective tells the trainer what it needs without running the model:

    input_names          the batch fields forward takes, in order (e.g. images, text, prefix_len)
    loss_counts(**inputs) -> {part: count}   the same counts forward will report, from the inputs alone
    whole_batch          True when the loss couples the samples of a batch (contrastive negatives): the batch
                         is then never split into micro-batches
    whole_graph          (optional, default False) True when forward traces as one graph without breaks, so
                         ``train.compile`` on one process compiles the whole model rather than each block
    predictions_keep_grad  (optional, default True) what the trainer, which reads only ``terms``, sets to False:
                         the predictions an output carries beside its terms (logits, regressed patches) then come
                         back detached, while the loss keeps its graph. A compiled forward hands autograd every
                         differentiable output, and backward then gets a gradient of zeros for each unused one (for
                         the caption logits [B, T, vocab]: 79 MB filled and added per step at the sizes of
                         ``benchmarks/l3m_compare.py``)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LossTerms:
    sums: dict[str, torch.Tensor]  # part -> float32 scalar: the sum of that part's per-target losses
    counts: dict[str, torch.Tensor]  # part -> scalar: how many valid targets that sum has
    weights: dict[str, float]  # part -> its weight in the loss
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # logged, never minimized (e.g. retrieval accuracy)

    def loss(self, counts: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """sum_k weight_k * sum_k / count_k, with this batch's counts or with ``counts`` (the global batch's).
        A part with no valid target in the whole batch (count 0) contributes 0."""
        counts = self.counts if counts is None else counts
        means = self.means(counts)
        return torch.stack([w * means[k] for k, w in self.weights.items()]).sum()

    def means(self, counts: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """{part: sum / count}: each part's mean over its valid targets (0 where there are none)."""
        counts = self.counts if counts is None else counts
        return {k: s / counts[k].clamp(min=1).to(s.dtype) for k, s in self.sums.items()}


def count(n: torch.Tensor | int, device=None) -> torch.Tensor:
    """A valid-target count as a float64 scalar (exact for any batch, and all-reducible with the others)."""
    return torch.as_tensor(n, dtype=torch.float64, device=device)
