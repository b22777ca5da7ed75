"""Summed next-token cross-entropy with a one-pass backward: the caption loss over a 32000-way vocabulary.

    loss     = sum over valid rows i of  logsumexp(logits[i]) - logits[i, target[i]]
    d loss / d logits[i, v] = softmax(logits[i])[v] - [v == target[i]]     (0 on ignored rows)

Same values as ``F.cross_entropy(logits.float(), target, ignore_index=..., reduction="sum")``; what differs is what
a training step keeps and touches. ``F.cross_entropy`` keeps the whole [M, V] float32 log-softmax for its backward,
which then starts from a zero-filled [M, V] buffer with -1 scattered in (nll_loss's backward) and makes one more
[M, V] pass for the log-softmax's. Here the forward keeps only the [M] log-sum-exp (the logits are kept anyway,
as the output the model returns), and the backward is the one expression above, with the one-hot written as an
index comparison: under ``torch.compile`` that is a single fused pass over the logits that writes their gradient
and nothing else. Eager it is three in-place passes over one buffer, as fast as ``F.cross_entropy``.

Measured on the 2-core CPU in the compiled fp32 training step at the l3m comparison's sizes (M = 8 x 77,
V = 32000): the loss's kernels 25 ms -> 19 ms per step (torch.profiler), and the whole step about 3% shorter in
three paired runs against ``F.cross_entropy`` (two processes taking turns, where two identical ones differ by
about 1%). bf16 autocast: unchanged.
"""

from __future__ import annotations

import torch


def accumulation_dtype(logits: torch.Tensor) -> torch.dtype:
    """float32, or wider where the logits are (float64 in gradient checks)."""
    return torch.promote_types(logits.dtype, torch.float32)


class TokenCrossEntropy(torch.autograd.Function):
    """logits [M, V] (any float dtype), target [M] long, ignore_index int -> scalar sum, float32 or wider."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
        valid = target != ignore_index  # [M]
        safe = torch.where(valid, target, 0)  # [M]: an ignored row's target may be out of range
        x = logits.to(accumulation_dtype(logits))  # [M, V]; no copy in float32
        log_probs = torch.log_softmax(x, dim=-1)  # [M, V]; not kept (compiled: never written)
        picked = log_probs.gather(1, safe[:, None])[:, 0]  # [M] log p(target)
        lse = x[:, 0] - log_probs[:, 0]  # [M] log-sum-exp, read off any column
        ctx.save_for_backward(logits, lse, safe, valid)
        return torch.where(valid, -picked, 0.0).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, lse, safe, valid = ctx.saved_tensors
        scale = torch.where(valid, grad, 0.0)[:, None]  # [M, 1]: ignored rows get no gradient
        if torch.compiler.is_compiling():  # one fused pass: the one-hot as an index comparison
            one_hot = torch.arange(logits.shape[-1], device=logits.device) == safe[:, None]  # [M, V]
            d = (torch.exp(logits.to(lse.dtype) - lse[:, None]) - one_hot.to(lse.dtype)) * scale
        else:  # eager: in place, three passes over one [M, V] buffer
            d = torch.sub(logits.to(lse.dtype), lse[:, None]).exp_()
            d[torch.arange(d.shape[0], device=d.device), safe] -= 1.0
            d.mul_(scale)
        return d.to(logits.dtype), None, None


def token_cross_entropy_sum(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Cross-entropy of logits [..., V] against target [...], summed over targets != ignore_index (float32 or
    wider)."""
    return TokenCrossEntropy.apply(logits.flatten(0, -2), target.flatten(), ignore_index)
