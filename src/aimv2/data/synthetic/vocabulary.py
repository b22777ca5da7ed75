"""What a synthetic scene can hold, by name: object colours, background hues and kinds, shapes, sizes.

These names are the whole vocabulary the generated text talks about, and the class names of the probe tasks. They
sit in a module of their own because everything in :mod:`aimv2.data.synthetic` reads them: the scene sampler and
renderer (:mod:`.scenes`, which also needs the RGB values and radii), the caption templates (:mod:`.captions`) and
the probe splits (:mod:`.probes`), without any of those having to import another just for a list of words.
"""

from __future__ import annotations

# Object colours: name -> base RGB. Each object gets this plus a small per-channel jitter, so "red" is a family of
# reds and the name (not an exact pixel value) is what a model has to learn.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 215, 40),
    "green": (45, 165, 65),
    "blue": (40, 90, 225),
    "purple": (140, 60, 190),
    "pink": (245, 135, 195),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}

# Background hues: name -> base RGB. Object colours too close to one (scenes.MIN_CONTRAST) are never drawn on it.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "black": (22, 22, 26),
    "white": (238, 238, 238),
    "beige": (222, 206, 170),
    "navy": (28, 36, 92),
    "teal": (28, 112, 112),
    "olive": (112, 112, 40),
    "maroon": (98, 26, 36),
    "lavender": (196, 186, 228),
}
BACKGROUND_KINDS = ("solid", "gradient", "noise")

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon")

# Size name -> radius as a fraction of the image side (before the scene sampler's small jitter). The ranges do not
# overlap, so the largest object of a scene with a single "large" one is unambiguous.
SIZES: dict[str, float] = {"small": 0.075, "medium": 0.11, "large": 0.16}
