"""Captions generated from a :class:`~aimv2.data.synthetic.scenes.SceneSpec`: true by construction, varied in form.

The captioning half of the AIMv2 objective only teaches the encoder what the text makes it predict, so the captions
name what is in the image (colours, shapes, sizes, counts, the background) and where things are relative to each
other, in several template families so that a decoder cannot learn one fixed sentence. Identical objects are
grouped into counts ("two red circles"); spatial relations are only stated when they hold, with a margin, for every
pair of objects they talk about.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .scenes import Background, SceneObject, SceneSpec
from .vocabulary import BACKGROUNDS, COLOURS, SHAPES, SIZES

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}
PLURALS = {s: (s + "es" if s.endswith(("s", "x", "sh", "ch")) else s + "s") for s in SHAPES}
# relation -> its phrasings; "a left of b" is stated only if b.x - a.x > RELATION_MARGIN and |dx| > |dy|
RELATION_WORDS = {
    "left": ("left of", "to the left of"),
    "right": ("right of", "to the right of"),
    "above": ("above",),
    "below": ("below",),
}
RELATION_MARGIN = 0.12
FAMILIES = ("list", "count", "relation", "order")
# Words the templates use besides the scene vocabulary (kept here so a tokenizer can be built without sampling).
TEMPLATE_WORDS = (
    "a an and of on against there is are picture image objects object shapes shape from to the left right "
    "above below top bottom background gradient noisy textured"
).split()


def caption_words() -> list[str]:
    """Every word a synthetic caption can contain, sorted (punctuation: ``,`` and ``:``)."""
    words = set(TEMPLATE_WORDS) | set(NUMBER_WORDS.values()) | set(SIZES) | set(COLOURS) | set(BACKGROUNDS)
    words |= set(SHAPES) | set(PLURALS.values())
    return sorted(words)


@dataclass
class Group:
    """Objects that one phrase describes together: same colour and shape (and size, if sizes are mentioned)."""

    size: str | None
    colour: str
    shape: str
    members: list[SceneObject]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _groups(objects: list[SceneObject], with_size: bool) -> list[Group]:
    groups: dict[tuple, Group] = {}
    for o in objects:
        key = (o.size if with_size else None, o.colour, o.shape)
        groups.setdefault(key, Group(*key, members=[])).members.append(o)
    return list(groups.values())


def group_phrase(g: Group) -> str:
    """ "a small red circle", "an orange star", "three blue squares"."""
    n = len(g.members)
    noun = g.shape if n == 1 else PLURALS[g.shape]
    words = [w for w in (g.size, g.colour, noun) if w]
    head = _article(words[0]) if n == 1 else NUMBER_WORDS[n]
    return " ".join([head, *words])


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def relation(a: SceneObject, b: SceneObject) -> str | None:
    """Where ``a`` is relative to ``b`` (left, right, above, below), or None if not clearly one of them."""
    dx, dy = b.x - a.x, b.y - a.y  # image y grows downwards
    if abs(dx) > abs(dy) and abs(dx) > RELATION_MARGIN:
        return "left" if dx > 0 else "right"
    if abs(dy) > abs(dx) and abs(dy) > RELATION_MARGIN:
        return "above" if dy > 0 else "below"
    return None


def group_relation(g1: Group, g2: Group) -> str | None:
    """The relation that holds between every member of ``g1`` and every member of ``g2``, or None."""
    rels = {relation(a, b) for a in g1.members for b in g2.members}
    return rels.pop() if len(rels) == 1 and None not in rels else None


def background_phrase(bg: Background, rng: np.random.Generator) -> str:
    """ "on a grey background", "against a noisy teal background", "on a beige gradient"."""
    c = bg.colour
    options = {
        "solid": [f"{c} background"],
        "gradient": [f"{c} gradient background", f"{c} gradient"],
        "noise": [f"noisy {c} background", f"textured {c} background"],
    }[bg.kind]
    text = options[int(rng.integers(len(options)))]
    prep = "on" if rng.random() < 0.75 else "against"
    return f"{prep} {_article(text)} {text}"


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _list(groups: list[Group], rng: np.random.Generator) -> str:
    phrases = [group_phrase(groups[k]) for k in rng.permutation(len(groups))]
    body = _join(phrases)
    prefix = _pick(rng, ["", "a picture of ", "an image of ", "there is "])
    if prefix == "there is " and not phrases[0].startswith(("a ", "an ")):
        prefix = "there are "
    return prefix + body


def _count(spec: SceneSpec, groups: list[Group], rng: np.random.Generator) -> str:
    n = len(spec.objects)
    noun = _pick(rng, ["object", "shape"]) + ("s" if n > 1 else "")
    phrases = [group_phrase(groups[k]) for k in rng.permutation(len(groups))]
    return f"{NUMBER_WORDS[n]} {noun}: {_join(phrases)}"


def _relation(groups: list[Group], rng: np.random.Generator) -> str | None:
    n = len(groups)
    pairs = [(i, j, group_relation(groups[i], groups[j])) for i in range(n) for j in range(n) if i != j]
    pairs = [p for p in pairs if p[2] is not None]
    if not pairs:
        return None
    i, j, r = _pick(rng, pairs)
    text = f"{group_phrase(groups[i])} {_pick(rng, RELATION_WORDS[r])} {group_phrase(groups[j])}"
    rest = [group_phrase(g) for k, g in enumerate(groups) if k not in (i, j)]
    return text + (", and " + _join(rest) if rest else "")


def _order(spec: SceneSpec, with_size: bool, rng: np.random.Generator) -> str | None:
    """ "from left to right: a red circle, a blue square and a red circle" -- only if the gaps are clear."""
    axis = _pick(rng, ["x", "y"])
    objs = sorted(spec.objects, key=lambda o: getattr(o, axis))
    coords = [getattr(o, axis) for o in objs]
    if len(objs) < 2 or min(b - a for a, b in zip(coords, coords[1:], strict=False)) <= RELATION_MARGIN:
        return None
    phrases = [group_phrase(Group(o.size if with_size else None, o.colour, o.shape, [o])) for o in objs]
    lead = "from left to right" if axis == "x" else "from top to bottom"
    return f"{lead}: {_join(phrases)}"


def caption(spec: SceneSpec, rng: np.random.Generator) -> str:
    """A caption naming every object of ``spec`` (colour and shape, sizes half the time), in a random family:
    a plain list, a count ("three objects: ..."), a spatial relation, or an ordering along one axis; the background
    is named three times out of four. Families that do not apply (no clear relation) fall back to the list."""
    with_size = bool(rng.random() < 0.5)
    groups = _groups(spec.objects, with_size)
    family = _pick(rng, FAMILIES)
    text = None
    if family == "count":
        text = _count(spec, groups, rng)
    elif family == "relation":
        text = _relation(groups, rng)
    elif family == "order":
        text = _order(spec, with_size, rng)
    if text is None:
        text = _list(groups, rng)
    if rng.random() < 0.75:
        text += " " + background_phrase(spec.background, rng)
    return text


_WORD = re.compile(r"[a-z]+|[,:]")


def caption_tokens(text: str) -> list[str]:
    """Words and punctuation of a caption (for vocabulary checks)."""
    return _WORD.findall(text)
