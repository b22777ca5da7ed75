"""The non-finite guard: a step whose loss, gradient or resulting weights are not finite never reaches a checkpoint.

Before the optimizer step: a non-finite loss or gradient norm skips the step (counted; ``train.max_bad_steps`` in a
row stop the run). After it: the weights are checked too, because a finite gradient can still write inf or NaN
into them (an lr of 1e30, an overflowing AdamW moment). Such a step is not rolled back (that would need a second copy
of every weight); the run stops before anything is saved, so the last checkpoint, which was good, is what a resume
starts from. A run whose last step was skipped does not report "done" either (``check_finished``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import UserError

log = logging.getLogger("aimv2.train")


class TrainingError(UserError, RuntimeError):
    """The run cannot go on (a held out_dir, a full disk, non-finite steps, ...); the message says why and what to
    do, and the command prints it as its one error line."""


class NonFiniteGuard:
    """Takes the optimizer step only when the loss and the gradient norm are finite; skipped steps are counted,
    and after ``max_bad`` in a row the run stops with the last checkpoint intact (a bad step never touches it)."""

    HINT = "lower optim.lr, raise optim.warmup_steps or use train.precision=fp32"

    def __init__(self, bad_in_row: int, skipped: int, max_bad: int, ckpt_dir: Path, is_main: bool, metrics):
        self.bad_in_row, self.skipped, self.max_bad = bad_in_row, skipped, max(1, max_bad)
        self.ckpt_dir, self.is_main, self.metrics = ckpt_dir, is_main, metrics

    def step(self, optimizer, finite: bool, step: int) -> None:
        if finite:
            optimizer.step()
            self.bad_in_row = 0
            self.check_weights(optimizer, step)
        else:
            self.skipped += 1
            self.bad_in_row += 1
            if self.is_main:
                log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", step, self.bad_in_row)
        optimizer.zero_grad(set_to_none=True)
        if self.bad_in_row >= self.max_bad:
            self.stop(
                f"{self.bad_in_row} consecutive steps had a non-finite loss or gradient (last at step {step}); stopping"
            )

    def check_weights(self, optimizer, step: int) -> None:
        """Stop when the step just taken left a non-finite weight (one fused norm over all of them)."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.get_total_norm(params)
        if hasattr(norm, "full_tensor"):  # FSDP2 shards: the norm of the whole model
            norm = norm.full_tensor()
        if not torch.isfinite(norm):
            self.stop(f"the optimizer step of step {step} wrote non-finite values into the weights; stopping")

    def check_finished(self, steps: int) -> None:
        """A run is done only when its last step was good: refuse to report success on skipped final steps."""
        if self.bad_in_row:
            self.stop(f"the last {self.bad_in_row} step(s) of the run (up to step {steps}) were skipped as non-finite")

    def stop(self, what: str) -> None:
        self.metrics.close()
        raise TrainingError(
            f"{what}. The last good checkpoint in {self.ckpt_dir} is intact: {self.HINT}, then re-run the same "
            "command to resume."
        )
