"""Class names: the one file format, and how a labelled source's raw labels become labels ``0 .. C-1`` with names.

The format (``aimv2 probe --classnames``, ``aimv2 zeroshot --classnames``) is a UTF-8 text file with one class name
per line, line ``c`` naming class ``c``; trailing blank lines are ignored and no name may repeat. It is what CLIP's
and most published class lists look like, and the same file serves every kind of source:

- integer labels (webdataset ``cls`` members, integer columns) index the file;
- text labels (``json:label`` fields, text columns) must be names in the file, whose order sets their labels;
- class sub-folders are text labels too: a file naming every folder sets their labels by name (so train and val
  folders agree even if one lacks a class). A file naming none of them, with one line per folder, gives the folders
  (sorted) their display names in order instead: ImageNet's ``n01440764`` ... folders with CLIP's ``tench`` ...

Without a file, integer labels are named ``"0" .. "max"`` and text labels (and folders) get their sorted names.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def read_classnames(path: str | os.PathLike) -> list[str]:
    """Class names from a text file, one per line (line c names class c); trailing blank lines ignored."""
    names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise ValueError(f"class names file {str(path)!r} is empty")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"class names file {str(path)!r} repeats {dup[:5]}")
    return names


def folder_labels(folders: Sequence[str], classnames: Sequence[str], what: str = "the image folder") -> list[int]:
    """The label of each class folder (``folders`` sorted, as :func:`~aimv2.data.sources.folders.find_classes`
    lists them) under a class names file: by name when the file names every folder, else by position when it has
    one display name per folder and names no folder but its own. Raises ValueError naming the folders it lacks."""
    index = {name: c for c, name in enumerate(classnames)}
    if all(f in index for f in folders):
        return [index[f] for f in folders]
    if len(classnames) == len(folders) and all(index.get(f, c) == c for c, f in enumerate(folders)):
        return list(range(len(folders)))
    missing = sorted(f for f in folders if f not in index)
    raise ValueError(
        f"{what}: class sub-folders {missing[:10]} are not in the class names file ({len(classnames)} names for "
        f"{len(folders)} folders: name every folder, or give one display name per folder in sorted folder order)"
    )


@dataclass
class ClassLabels:
    """Labels ``0 .. C-1`` of a source's samples, and the class names: ``classes[c]`` names label ``c``."""

    labels: list[int]
    classes: list[str]
    named: bool  # False when the names are just "0" .. "max" (integer labels, no file): only the count is known


def _as_int(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def class_labels(values: Sequence, classnames: Sequence[str] | None, what: str) -> ClassLabels:
    """Raw label values (ints, integer text, or class-name text) -> labels and names, as the module docstring says.

    ``what`` names the source in errors: a negative label, an integer beyond the file, text not in the file.
    """
    ints = [_as_int(v) for v in values]
    if all(i is not None for i in ints):
        if any(i < 0 for i in ints):
            raise ValueError(f"{what}: negative label {min(ints)}")
        top = max(ints, default=-1)
        if classnames is None:
            return ClassLabels(ints, [str(c) for c in range(top + 1)], named=False)
        if top >= len(classnames):
            raise ValueError(f"{what}: label {top} but the class names file has only {len(classnames)} names")
        return ClassLabels(ints, list(classnames), named=True)
    names = [str(v).strip() for v in values]
    classes = list(classnames) if classnames is not None else sorted(set(names))
    index = {n: c for c, n in enumerate(classes)}
    unknown = sorted({n for n in names if n not in index})
    if unknown:
        raise ValueError(f"{what}: labels {unknown[:5]} are not in the class names file")
    return ClassLabels([index[n] for n in names], classes, named=True)
