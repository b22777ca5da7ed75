"""The non-finite guard: a step whose loss or gradient is not finite never reaches the weights."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("aimv2.train")


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""


class NonFiniteGuard:
    """Takes the optimizer step only when the loss and the gradient norm are finite; skipped steps are counted,
    and after ``max_bad`` in a row the run stops with the last checkpoint intact (a bad step never touches it)."""

    HINT = "lower optim.lr, raise optim.warmup_steps or use train.precision=fp32"

    def __init__(self, bad_in_row: int, skipped: int, max_bad: int, ckpt_dir: Path, is_main: bool, metrics):
        self.bad_in_row, self.skipped, self.max_bad = bad_in_row, skipped, max_bad
        self.ckpt_dir, self.is_main, self.metrics = ckpt_dir, is_main, metrics

    def step(self, optimizer, finite: bool, step: int) -> None:
        if finite:
            optimizer.step()
            self.bad_in_row = 0
        else:
            self.skipped += 1
            self.bad_in_row += 1
            if self.is_main:
                log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", step, self.bad_in_row)
        optimizer.zero_grad(set_to_none=True)
        if self.bad_in_row >= self.max_bad:
            self.metrics.close()
            raise TrainingError(
                f"{self.bad_in_row} consecutive steps had a non-finite loss or gradient (last at step {step}); "
                f"stopping. The last good checkpoint in {self.ckpt_dir} is intact: {self.HINT}, then re-run the same "
                "command to resume."
            )
