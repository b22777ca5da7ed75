"""Counting the samples a data reader had to skip, so that bad data never stops a run and is never silent.

Web-scale shards always hold some broken samples: a truncated JPEG, an HTML error page saved as ``.jpg``, a sample
whose caption file is missing or empty, a shard cut off by an interrupted copy, a shard that is not there. One bad
sample in a billion must not kill a week-long run, so readers skip it; but a wrong path or a wrong caption field
would then turn the whole epoch into skips, so every skip is counted by kind, logged (rate-limited), and the reader
stops with a clear error once the skip rate passes a threshold (:meth:`FaultCounter.check`).

A :class:`FaultCounter` is a plain picklable object: each DataLoader worker keeps its own, and the counts of several
workers or ranks add up with :meth:`FaultCounter.merge`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from ..errors import UserError

log = logging.getLogger(__name__)

# kind -> what it means; the kinds a shard reader reports.
FAULT_KINDS: dict[str, str] = {
    "bad_image": "image bytes that do not decode (truncated file, not an image)",
    "no_image": "sample without an image member (jpg, jpeg, png, webp)",
    "no_caption": "sample without the caption field(s) asked for",
    "empty_caption": "caption that is empty or only whitespace",
    "bad_caption": "caption member that is not UTF-8 text or valid JSON",
    "truncated_shard": "shard that ends in the middle of a member (interrupted download or copy)",
    "unreadable_shard": "shard that cannot be opened (missing path, no permission, failing pipe: command)",
    "bad_member": "tar member that cannot be grouped into a sample (e.g. a duplicate name)",
    "no_answer": "conversation with nothing to learn: no gpt turn, or its first answer past vlm.max_length",
    # the kinds below are parts of a sample left out; the sample itself trains (PART_KINDS)
    "bad_box": "annotated box with no area inside its image (left out of the targets)",
    "dropped_turns": "answered turns dropped from conversations longer than vlm.max_length (the sample is kept)",
}
# kinds that count parts of samples (boxes, turns), not skipped samples: outside the ``data_skipped`` total
PART_KINDS = frozenset({"bad_box", "dropped_turns"})


def caption_fault(value, name: str) -> tuple[str, str] | None:
    """(fault kind, description) for a caption value read from a table that cannot be trained on, else None."""
    if value is None:
        return "no_caption", f"no {name!r}"
    if not isinstance(value, str):
        return "bad_caption", f"{name} is a {type(value).__name__}"
    if not value.strip():
        return "empty_caption", f"{name} is empty"
    return None


class FaultRateError(UserError, RuntimeError):
    """Too many samples were skipped: the input is probably not what the reader was told it is."""


@dataclass
class FaultCounter:
    """Samples read and samples skipped, by kind, with the first place each kind was seen.

    ``max_rate`` is the largest tolerated fraction of skips among everything read; it is only enforced once
    ``min_samples`` samples (good or skipped) have been seen, so that one bad sample among the first three does not
    stop a run. ``log_every_s`` limits the warnings: the first fault of each kind is logged, then at most one
    summary line per kind every ``log_every_s`` seconds.
    """

    max_rate: float = 0.5
    min_samples: int = 100
    log_every_s: float = 30.0
    samples: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    first: dict[str, str] = field(default_factory=dict)  # kind -> "where: what" of its first occurrence
    _last_log: dict[str, float] = field(default_factory=dict, repr=False, compare=False)

    @property
    def skipped(self) -> int:
        """Samples skipped (the parts of samples left out, PART_KINDS, are counted but are no skipped samples)."""
        return sum(n for k, n in self.counts.items() if k not in PART_KINDS)

    @property
    def rate(self) -> float:
        seen = self.samples + self.skipped
        return self.skipped / seen if seen else 0.0

    def ok(self) -> None:
        """Count one sample that came through."""
        self.samples += 1

    def fault(self, kind: str, where: str, what: str = "") -> None:
        """Count one skip of ``kind`` at ``where`` (shard and key), log it rate-limited, and enforce the threshold."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; valid: {', '.join(FAULT_KINDS)}")
        n = self.counts.get(kind, 0) + 1
        self.counts[kind] = n
        detail = f"{where}: {what}" if what else where
        self.first.setdefault(kind, detail)
        now = time.monotonic()
        if n == 1 or now - self._last_log.get(kind, 0.0) >= self.log_every_s:
            self._last_log[kind] = now
            log.warning("skipped %s (%s so far, %.1f%% of samples): %s", kind, n, 100 * self.rate, detail)
        self.check()

    def check(self) -> None:
        """Raise :class:`FaultRateError` once ``min_samples`` were seen if the skip rate exceeds ``max_rate``."""
        if self.samples + self.skipped >= self.min_samples and self.rate > self.max_rate:
            raise FaultRateError(
                f"skipped {self.skipped} of {self.samples + self.skipped} samples ({100 * self.rate:.0f}% > "
                f"{100 * self.max_rate:.0f}% allowed: {self.describe()}); check the data's path and format (caption "
                "field, image members), or allow more with data.max_fault_rate"
            )

    def describe(self) -> str:
        """One line: the count of each kind, the most frequent first, with its first occurrence."""
        if not self.counts:
            return "no faults"
        parts = [f"{k} x{n} (first: {self.first.get(k, '?')})" for k, n in self.most_common()]
        return "; ".join(parts)

    def most_common(self) -> list[tuple[str, int]]:
        return sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))

    def merge(self, other: FaultCounter) -> FaultCounter:
        """Add ``other``'s counts into this counter (in place) and return it."""
        self.samples += other.samples
        for k, n in other.counts.items():
            self.counts[k] = self.counts.get(k, 0) + n
        for k, where in other.first.items():
            self.first.setdefault(k, where)
        return self

    def by_kind(self) -> list[int]:
        """The skip counts in the order of :data:`FAULT_KINDS` (what a batch carries to the trainer's metrics)."""
        return [self.counts.get(k, 0) for k in FAULT_KINDS]

    def as_dict(self) -> dict:
        """JSON-ready summary: ``samples``, ``skipped`` (total), ``skipped_by_kind``, ``first`` example per kind."""
        return {
            "samples": self.samples,
            "skipped": self.skipped,
            "skipped_by_kind": dict(self.most_common()),
            "first": dict(self.first),
        }

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_last_log"] = {}  # monotonic clock values mean nothing in another process
        return state
