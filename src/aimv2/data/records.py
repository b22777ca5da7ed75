"""The one validation layer for the annotation files users bring (LLaVA conversations, COCO detection sets,
RefCOCO-style referring expressions, VQA question files): read the JSON, and name the file, the record and the key
of whatever is wrong, with what to do, in the one-line form of aimv2.errors.

    doc = read_json(path, "a COCO detection file")           # JSON syntax errors name the file, line and column
    rows = read_json_records(path, "a LLaVA conversation file")  # a JSON list, or JSON lines (one object each)
    bbox = field(record, "bbox", list, where=RecordAt(path, "annotations", 7), fix="give [x, y, width, height]")

A structural fault (a key missing, a value of the wrong type) is a :class:`RecordError`: the file is not what the
reader expects, so the command stops before its first step. A sample whose *content* cannot be used (an image that
is missing or does not decode) is skipped and counted instead (aimv2.data.faults); that is the readers' business.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError


class RecordError(DataError):
    """A record of an annotation file lacks a key, or holds a value of the wrong type or range."""


@dataclass(frozen=True)
class RecordAt:
    """Where a record is: ``file``, the list it is in (``section``, e.g. "annotations"; "" for a top-level list)
    and its ``index`` there (0-based, as ``json.load`` gives it)."""

    file: str | os.PathLike
    section: str = ""
    index: int | None = None

    def __str__(self) -> str:
        parts = [str(self.file)]
        if self.section:
            parts.append(self.section)
        if self.index is not None:
            parts.append(f"record {self.index}")
        return ", ".join(parts)


def read_json(path: str | os.PathLike, what: str):
    """The parsed JSON document at ``path``; ``what`` ("a COCO detection file") completes the error messages."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, f"{what} not found; check the path", str(path))
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(
            f"invalid JSON: {e.msg} ({path}, line {e.lineno}, column {e.colno}); fix the file there ({what})"
        ) from None


def read_json_records(path: str | os.PathLike, what: str) -> list:
    """The records of a file that is either one JSON list or JSON lines (one value per non-blank line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, f"{what} not found; check the path", str(path))
    text = path.read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("["):
        records = read_json(path, what)
    else:
        records = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise RecordError(
                    f"invalid JSON line: {e.msg} ({path}, line {n}, column {e.colno}); fix the line there ({what}: "
                    "a JSON list, or one JSON object per line)"
                ) from None
    if not isinstance(records, list):
        raise RecordError(f"{path} holds a JSON {type(records).__name__}, not a list of records; give {what}")
    if not records:
        raise RecordError(f"{path} holds no records; give {what} with at least one")
    return records


def field(record, key: str, types: type | tuple[type, ...], *, where: RecordAt, fix: str, optional: bool = False):
    """``record[key]`` checked to be an instance of ``types`` (bool is never taken for a number); a missing key is
    ``None`` when ``optional``, else a :class:`RecordError` naming file, record and key, ending with ``fix``."""
    if not isinstance(record, dict):
        raise RecordError(f"a JSON {type(record).__name__}, not an object ({where}); {fix}")
    if key not in record:
        if optional:
            return None
        raise RecordError(f"no {key!r} ({where}); {fix}")
    value = record[key]
    types = types if isinstance(types, tuple) else (types,)
    numeric = any(t in (int, float) for t in types)
    if not isinstance(value, types) or (numeric and isinstance(value, bool)):
        names = " or ".join(t.__name__ for t in types)
        raise RecordError(f"{key!r} is a {type(value).__name__}, not a {names} ({where}); {fix}")
    return value
