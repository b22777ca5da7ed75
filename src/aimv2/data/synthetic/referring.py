"""Referring expressions of the built-in scenes: a phrase that picks exactly one object of a scene, and its box.

    "the red square"                          when no other object is a red square
    "the red square left of the blue circle"  when there are several red squares and exactly one of them is left of
                                              a blue circle (left / right of: by centre x, above / below: by centre y)

A phrase is checked against every object of the scene before it is used, so its referent is unique by construction
(:func:`refers_to`). Scenes are the captioning stream's (synthetic_scene), so an image, its boxes and its phrases
are all pure functions of (seed, index).
"""

from __future__ import annotations

import numpy as np
import torch

from ..letterbox import Fitted
from .boxes import object_box
from .dataset import synthetic_scene
from .scenes import SceneObject, SceneSpec, render

RELATIONS = {
    "left of": lambda a, b: a.x < b.x - 0.05,
    "right of": lambda a, b: a.x > b.x + 0.05,
    "above": lambda a, b: a.y < b.y - 0.05,
    "below": lambda a, b: a.y > b.y + 0.05,
}


def name(obj: SceneObject) -> str:
    return f"{obj.colour} {obj.shape}"


def refers_to(phrase: tuple[str, str | None, str | None], objects: list[SceneObject]) -> list[int]:
    """Indices of the objects a (name, relation, other name) phrase describes."""
    what, rel, other = phrase
    out = []
    for i, a in enumerate(objects):
        if name(a) != what:
            continue
        if rel is None or any(j != i and name(b) == other and RELATIONS[rel](a, b) for j, b in enumerate(objects)):
            out.append(i)
    return out


def text(phrase: tuple[str, str | None, str | None]) -> str:
    what, rel, other = phrase
    return f"the {what}" if rel is None else f"the {what} {rel} the {other}"


def referring_expression(spec: SceneSpec, rng: np.random.Generator) -> tuple[str, int] | None:
    """(phrase, object index) naming exactly one object of the scene, or None if none can; a relation is used half
    of the time it can be (and always when the name alone is not unique)."""
    objects = spec.objects
    for t in rng.permutation(len(objects)):
        t = int(t)
        plain = (name(objects[t]), None, None)
        related = [
            (name(objects[t]), rel, name(b))
            for j, b in enumerate(objects)
            for rel in RELATIONS
            if j != t and refers_to((name(objects[t]), rel, name(b)), objects) == [t]
        ]
        unique = refers_to(plain, objects) == [t]
        if related and (not unique or rng.random() < 0.5):
            return text(related[int(rng.integers(len(related)))]), t
        if unique:
            return text(plain), t
    return None


def scene_phrase(index: int, seed: int, size: int):
    """(spec, phrase, box xyxy at ``size`` px) of the first scene from ``index`` on that has a referring phrase."""
    k = index
    while True:
        spec, _ = synthetic_scene(k, seed)
        found = referring_expression(spec, np.random.default_rng([seed, k, 7]))
        if found is not None:
            phrase, t = found
            return spec, phrase, object_box(spec.objects[t], (size, size))
        k += 1_000_003  # a scene with no unique phrase (rare): a far, fixed other one


class SyntheticGrounding:
    """Built-in scenes as a grounding set: item i is (uint8 [3, S, S], phrase, box float [4] xyxy px), a pure
    function of (seed, i). ``length`` None is endless (training)."""

    def __init__(self, seed: int = 0, size: int = 64, length: int | None = None):
        self.seed, self.size, self.length = seed, size, length

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("an endless synthetic grounding stream has no length")
        return self.length

    def __getitem__(self, i: int):
        spec, phrase, box = scene_phrase(i, self.seed, self.size)
        img = torch.from_numpy(np.array(render(spec, self.size))).permute(2, 0, 1).contiguous()
        return img, phrase, torch.tensor(box, dtype=torch.float32)

    def fitted(self, i: int) -> tuple[Fitted, str, torch.Tensor]:
        """(the image as the model's input, the phrase, its box in original pixels): what evaluation reads."""
        img, phrase, box = self[i]
        return Fitted(img, (1.0, 1.0), (self.size, self.size)), phrase, box
