"""Labelled probe splits of the built-in scenes: how many objects, and the shape or colour of the largest one.

A probe asks what a frozen encoder's features know; these tasks have labels that are exact by construction (they are
read off the :class:`~aimv2.data.synthetic.scenes.SceneSpec`, never annotated), balanced, and hard enough to need the
scene's content rather than a colour histogram. :func:`write_probe_splits` writes them as image folders, which
``aimv2 probe --train DIR --val DIR`` reads like any other labelled folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from .scenes import SceneSpec, render, sample_scene
from .vocabulary import COLOURS, SHAPES

PROBE_TASKS = ("count", "shape", "colour")
_PROBE_TAG = 7_770_001  # keeps probe generators apart from the caption stream's default_rng([seed, index])
_SPLITS = {"train": 0, "val": 1}


def probe_classes(task: str) -> list[str]:
    """Class names (folder names) of a probe task."""
    if task == "count":
        return ["1", "2", "3", "4"]
    if task == "shape":
        return list(SHAPES)
    if task == "colour":
        return list(COLOURS)
    raise ValueError(f"unknown probe task {task!r}; choose from {', '.join(PROBE_TASKS)}")


def probe_label(spec: SceneSpec, task: str) -> str:
    """The class of a scene for ``task``: its number of objects, or the shape / colour of its largest object."""
    if task == "count":
        return str(len(spec.objects))
    if task == "shape":
        return spec.largest().shape
    if task == "colour":
        return spec.largest().colour
    raise ValueError(f"unknown probe task {task!r}; choose from {', '.join(PROBE_TASKS)}")


def probe_scene(task: str, split: str, index: int, seed: int = 0) -> tuple[SceneSpec, str]:
    """Scene ``index`` of a probe split and its class. Classes cycle with the index, so any prefix is balanced.

    Train and val draw from different generators (``split`` is part of the seed), so no scene is in both. Shape and
    colour scenes have 1-4 objects of which exactly one is large (the one to classify) on a varied background: the
    label needs finding that object among distractors, not reading off a global colour statistic.
    """
    classes = probe_classes(task)
    label = classes[index % len(classes)]
    rng = np.random.default_rng([seed, _PROBE_TAG, _SPLITS[split], PROBE_TASKS.index(task), index])
    if task == "count":
        spec = sample_scene(rng, n_objects=int(label))
    elif task == "shape":
        spec = sample_scene(rng, main_shape=label)
    else:
        spec = sample_scene(rng, main_colour=label)
    return spec, label


def write_probe_splits(
    out_dir: str | os.PathLike,
    task: str = "shape",
    n_train: int = 2000,
    n_val: int = 500,
    size: int = 64,
    seed: int = 0,
    *,
    overwrite: bool = False,
) -> dict:
    """Write ``out_dir/train/<class>/<index>.png`` and ``out_dir/val/<class>/<index>.png`` for ``task``.

    ``n_train`` / ``n_val`` are images per split in total, spread over the classes as evenly as possible (class
    counts differ by at most one). ``<index>`` is the scene index, so :func:`probe_scene` regenerates any file's
    scene. Also writes ``out_dir/probe.json`` describing the splits, and returns the same dictionary. Refuses to
    write into existing ``train``/``val`` folders unless ``overwrite`` (which deletes those two folders first).
    """
    classes = probe_classes(task)
    out = Path(out_dir)
    for split in _SPLITS:
        if (out / split).exists():
            if not overwrite:
                raise FileExistsError(f"{out / split} exists; pass overwrite=True to replace it")
            shutil.rmtree(out / split)
    counts: dict[str, dict[str, int]] = {}
    for split, n in (("train", n_train), ("val", n_val)):
        counts[split] = dict.fromkeys(classes, 0)
        for c in classes:
            (out / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            spec, label = probe_scene(task, split, i, seed)
            render(spec, size).save(out / split / label / f"{i:06d}.png", compress_level=1)
            counts[split][label] += 1
    info = {"task": task, "classes": classes, "size": size, "seed": seed, "counts": counts}
    (out / "probe.json").write_text(json.dumps(info, indent=1) + "\n")
    return info
