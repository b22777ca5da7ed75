"""Questions about a synthetic scene with exact answers: the built-in VQA data of the VLM (and its held-out test).

A scene's spec (:mod:`.scenes`) knows every object's shape, colour, size and position, so every answer here is
true by construction. The question types, each asked only where its answer is unambiguous:

    count       "How many shapes are there?"                     "3"
    colour      "What colour is the star?"                       the star is the only star
    shape       "What shape is the red object?"                  the only red object
    size        "What size is the circle?"                       small | medium | large, the only circle
    position    "Is the star left or right of the circle?"       both unique, centres >= 0.1 of the side apart
    background  "What colour is the background?"                 the background's hue name

Scenes come from two disjoint streams keyed by ``split``: ``train`` and ``heldout`` (the evaluation scenes, never
trained on). Sample ``i`` of a split is a pure function of ``(seed, split, i)``. Stage 1 of a VLM trains on
captions (:func:`caption_conversation`), stage 2 on multi-turn question conversations (:func:`qa_conversation`);
both are LLaVA's record format (``{"image", "conversations": [{"from": "human"|"gpt", "value"}]}``).
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

import numpy as np
import torch

from ..sources.llava import to_messages
from .captions import caption, caption_words
from .scenes import SceneSpec, render, sample_scene

QUESTION_TYPES = ("count", "colour", "shape", "size", "position", "background")
SPLITS = {"train": 0, "heldout": 1}
MIN_DX = 0.1  # least horizontal distance of two centres (fraction of the side) for a left/right question
CAPTION_PROMPT = "<image>\nDescribe the image."


# The words the question templates below use besides the scene vocabulary (a tokenizer can be built from them).
QUESTION_WORDS = "how many shapes are there what colour is the object shape size or left right of background".split()


def text_words() -> list[str]:
    """Every word, number and punctuation mark a built-in caption, question or answer can contain, sorted."""
    numbers = [str(n) for n in range(10)]  # counts (a scene has at most a handful of objects)
    return sorted(set(caption_words()) | set(QUESTION_WORDS) | {"describe", "image"} | set(numbers) | set(",.:?"))


class QA(NamedTuple):
    kind: str  # one of QUESTION_TYPES
    question: str
    answer: str


def scene_questions(spec: SceneSpec) -> dict[str, list[QA]]:
    """Every unambiguous question about ``spec``, by type (a type may have none)."""
    objs = spec.objects
    shapes, colours = Counter(o.shape for o in objs), Counter(o.colour for o in objs)
    unique_shape = [o for o in objs if shapes[o.shape] == 1]
    out: dict[str, list[QA]] = {k: [] for k in QUESTION_TYPES}
    n = len(objs)
    out["count"].append(QA("count", "How many shapes are there?", str(n)))
    out["background"].append(QA("background", "What colour is the background?", spec.background.colour))
    for o in unique_shape:
        out["colour"].append(QA("colour", f"What colour is the {o.shape}?", o.colour))
        out["size"].append(QA("size", f"What size is the {o.shape}?", o.size))
    for o in objs:
        if colours[o.colour] == 1:
            out["shape"].append(QA("shape", f"What shape is the {o.colour} object?", o.shape))
    for a in unique_shape:
        for b in unique_shape:
            if a is not b and abs(a.x - b.x) >= MIN_DX:
                side = "left" if a.x < b.x else "right"
                out["position"].append(QA("position", f"Is the {a.shape} left or right of the {b.shape}?", side))
    return out


def question_scene(index: int, seed: int = 0, split: str = "train") -> tuple[SceneSpec, np.random.Generator]:
    """Scene ``index`` of ``split`` and the generator that goes on to draw its questions."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    rng = np.random.default_rng([seed, 7, SPLITS[split], index])
    return sample_scene(rng), rng


def sample_questions(spec: SceneSpec, rng: np.random.Generator, turns: int) -> list[QA]:
    """Up to ``turns`` questions of distinct types, the types and the question within each drawn from ``rng``."""
    by_type = {k: v for k, v in scene_questions(spec).items() if v}
    kinds = list(by_type)
    order = rng.permutation(len(kinds))[:turns]
    return [by_type[kinds[k]][int(rng.integers(len(by_type[kinds[k]])))] for k in order]


def _record(image: str, pairs: list[tuple[str, str]]) -> dict:
    conv = []
    for i, (q, a) in enumerate(pairs):
        conv.append({"from": "human", "value": f"<image>\n{q}" if i == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return {"image": image, "conversations": conv}


def qa_conversation(index: int, seed: int = 0, split: str = "train", turns: int = 3) -> tuple[SceneSpec, dict]:
    """(scene, LLaVA record) of ``turns`` questions about scene ``index`` of ``split``."""
    spec, rng = question_scene(index, seed, split)
    qas = sample_questions(spec, rng, turns)
    return spec, _record(f"{split}-{index:09d}.png", [(q.question, q.answer) for q in qas])


def caption_conversation(index: int, seed: int = 0, split: str = "train") -> tuple[SceneSpec, dict]:
    """(scene, LLaVA record) asking for a caption of scene ``index`` of ``split`` (stage 1's image-caption pairs)."""
    spec, rng = question_scene(index, seed, split)
    rec = {"image": f"{split}-{index:09d}.png", "conversations": []}
    rec["conversations"] = [
        {"from": "human", "value": CAPTION_PROMPT},
        {"from": "gpt", "value": caption(spec, rng)},
    ]
    return spec, rec


def heldout_questions(n_scenes: int, seed: int = 0) -> list[tuple[int, QA]]:
    """The evaluation set: for each of the first ``n_scenes`` held-out scenes one question of every type it has
    (the first of each), as (scene index, QA)."""
    out = []
    for i in range(n_scenes):
        spec, _ = question_scene(i, seed, "heldout")
        for qas in scene_questions(spec).values():
            if qas:
                out.append((i, qas[0]))
    return out


class SyntheticConversations:
    """``ds[i]`` = (uint8 image [3, H, W], chat messages) of scene ``i`` of ``split``: captions (``kind="caption"``,
    stage 1) or ``turns`` questions (``kind="qa"``, stage 2). ``length`` None: endless (no epochs)."""

    def __init__(
        self, kind: str, *, seed: int, size: tuple[int, int], split: str = "train", turns: int = 3, length=None
    ):
        if kind not in ("caption", "qa"):
            raise ValueError(f"kind must be caption or qa, got {kind!r}")
        self.kind, self.seed, self.size, self.split, self.turns, self.length = kind, seed, size, split, turns, length

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("an endless synthetic stream has no length")
        return self.length

    def record(self, i: int) -> tuple[SceneSpec, dict]:
        if self.kind == "caption":
            return caption_conversation(i, self.seed, self.split)
        return qa_conversation(i, self.seed, self.split, self.turns)

    def __getitem__(self, i: int):
        spec, rec = self.record(i)
        image = np.asarray(render(spec, self.size)).transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(image)), to_messages(rec)
