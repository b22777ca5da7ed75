"""Procedural scenes of 1-4 coloured shapes: what a scene holds, how one is drawn at random, and how it is rendered.

The built-in dataset (:mod:`.dataset`) needs images whose content is known exactly, so that captions
(:mod:`.captions`) can be generated from the scene and probe labels (:mod:`.probes`) re-derived from it, and which
cost next to nothing to make: a tiny model on two cores must never wait for data. A :class:`SceneSpec` is that exact
content, in image-size-independent units (positions and radii are fractions of the image side), so one scene renders
at any resolution. Text about a scene is made elsewhere, from the spec: this module knows nothing of words.

Everything random is drawn from a ``numpy.random.Generator`` handed in by the caller; the same generator state gives
the same scene, on any machine and in any process. :func:`render` itself is a pure function of the spec and size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .vocabulary import BACKGROUND_KINDS, BACKGROUNDS, COLOURS, SHAPES, SIZES

COLOUR_JITTER = 18  # max per-channel offset from the base colour
MIN_CONTRAST = 120.0  # least Euclidean RGB distance between an object colour and the background it is drawn on
SIZE_JITTER = 0.08  # radii vary by this fraction around their size's SIZES entry
# Shapes reach at most this far (in radii) from their centre; placement keeps them inside the image.
EXTENT = 1.1
# Centres of two objects are at least OVERLAP * (extent_a + extent_b) apart: < 1 allows a light overlap of corners.
OVERLAP = 0.9


def _contrast_ok(colour: str, background: str) -> bool:
    a, b = np.array(COLOURS[colour], float), np.array(BACKGROUNDS[background], float)
    return float(np.linalg.norm(a - b)) >= MIN_CONTRAST


# background name -> object colours that may be drawn on it
ALLOWED_COLOURS: dict[str, tuple[str, ...]] = {
    bg: tuple(c for c in COLOURS if _contrast_ok(c, bg)) for bg in BACKGROUNDS
}


@dataclass
class SceneObject:
    """One shape. ``x``, ``y`` (centre, y down) and ``radius`` are fractions of the image side."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    radius: float
    rotation: float = 0.0  # degrees, counter-clockwise
    rgb: tuple[int, int, int] = (0, 0, 0)  # the jittered colour actually drawn


@dataclass
class Background:
    """A background: ``kind`` is solid, gradient (linear, along ``angle`` degrees) or noise (smooth blotches plus
    grain, drawn from ``seed``); ``strength`` is the gradient's half-range or the noise's standard deviation."""

    kind: str
    colour: str
    rgb: tuple[int, int, int]
    angle: float = 0.0
    strength: float = 0.0
    seed: int = 0


@dataclass
class SceneSpec:
    """The whole content of one synthetic image: objects drawn in list order (later ones on top) on a background."""

    objects: list[SceneObject]
    background: Background

    def largest(self) -> SceneObject:
        """The object with the largest radius (the subject of the ``shape`` and ``colour`` probes)."""
        return max(self.objects, key=lambda o: o.radius)


def _jitter(rgb: Sequence[int], rng: np.random.Generator, amount: int) -> tuple[int, int, int]:
    offsets = rng.random(3).tolist()  # plain floats: numpy calls on 3-vectors cost more than the arithmetic
    return tuple(min(255, max(0, c + round((2 * u - 1) * amount))) for c, u in zip(rgb, offsets, strict=True))


def sample_background(rng: np.random.Generator, *, needs: Sequence[str] = ()) -> Background:
    """A random background on which every colour in ``needs`` may be drawn."""
    names = [bg for bg in BACKGROUNDS if all(c in ALLOWED_COLOURS[bg] for c in needs)]
    name = names[int(rng.integers(len(names)))]
    kind = BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))]
    strength = {"solid": 0.0, "gradient": float(rng.uniform(20, 40)), "noise": float(rng.uniform(8, 16))}[kind]
    return Background(
        kind=kind,
        colour=name,
        rgb=_jitter(BACKGROUNDS[name], rng, 10),
        angle=float(rng.uniform(0, 360)),
        strength=strength,
        seed=int(rng.integers(2**31)),
    )


def _place(rng: np.random.Generator, radius: float, placed: list[SceneObject], tries: int = 60) -> tuple | None:
    """A centre for an object of ``radius`` inside the image and clear of ``placed``, or None after ``tries``."""
    ext = EXTENT * radius
    for _ in range(tries):
        x, y = rng.uniform(ext, 1 - ext, size=2)
        if all(math.hypot(x - o.x, y - o.y) >= OVERLAP * (ext + EXTENT * o.radius) for o in placed):
            return float(x), float(y)
    return None


def sample_scene(
    rng: np.random.Generator,
    *,
    n_objects: int | None = None,
    max_objects: int = 4,
    main_shape: str | None = None,
    main_colour: str | None = None,
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] | None = None,
) -> SceneSpec:
    """A random scene of ``n_objects`` (default: uniform in 1..max_objects) objects.

    ``main_shape`` / ``main_colour`` make the first object the only large one, with that shape / colour, and the
    others small or medium: the labelled probes need a scene whose largest object is unambiguous and of a chosen
    class. Colours too close to the background are never drawn (see :data:`ALLOWED_COLOURS`).
    """
    n = int(rng.integers(1, max_objects + 1)) if n_objects is None else n_objects
    if n < 1:
        raise ValueError(f"n_objects must be positive, got {n}")
    has_main = main_shape is not None or main_colour is not None
    background = sample_background(rng, needs=[main_colour] if main_colour else [])
    palette = [c for c in (colours or COLOURS) if c in ALLOWED_COLOURS[background.colour]]
    size_names = list(SIZES)
    objects: list[SceneObject] = []
    for i in range(n):
        main = has_main and i == 0
        shape = main_shape if main and main_shape else shapes[int(rng.integers(len(shapes)))]
        colour = main_colour if main and main_colour else palette[int(rng.integers(len(palette)))]
        if main:
            size = "large"
        elif has_main:
            size = size_names[int(rng.integers(2))]  # small or medium: never rivals the main object
        else:
            size = size_names[int(rng.integers(len(size_names)))]
        # Crowded scenes may leave no room: shrink one size at a time; a small object always finds a place.
        while True:
            radius = SIZES[size] * float(rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER))
            pos = _place(rng, radius, objects, tries=60 if size != "small" else 2000)
            if pos is not None or size == "small":
                break
            size = size_names[size_names.index(size) - 1]
        if pos is None:
            raise RuntimeError("could not place a small object; too many objects for the image")
        rotation = (
            float(rng.uniform(-15, 15)) if shape in ("square", "cross", "diamond") else float(rng.uniform(0, 360))
        )
        objects.append(
            SceneObject(
                shape=shape,
                colour=colour,
                size=size,
                x=pos[0],
                y=pos[1],
                radius=radius,
                rotation=rotation,
                rgb=_jitter(COLOURS[colour], rng, COLOUR_JITTER),
            )
        )
    order = rng.permutation(n)  # draw order (who is on top) independent of which object is the main one
    return SceneSpec(objects=[objects[k] for k in order], background=background)


# --- rendering -------------------------------------------------------------------------------------------------------


def _regular(n: int, r: float = 1.0, phase: float = 90.0) -> np.ndarray:
    a = np.deg2rad(phase + 360.0 / n * np.arange(n))
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


def _star() -> np.ndarray:
    outer, inner = _regular(5, 1.1), _regular(5, 0.45, 90 + 36)
    return np.stack([outer, inner], 1).reshape(-1, 2)


_W = 0.34  # half-width of a cross's arms
# Unit outlines (radius 1, y up), all within EXTENT. Sizes are tuned so the shapes look about equally big.
OUTLINES: dict[str, np.ndarray] = {
    "square": _regular(4, 1.0, 45),
    "triangle": _regular(3, 1.1),
    "star": _star(),
    "cross": np.array(
        [(-_W, 1), (_W, 1), (_W, _W), (1, _W), (1, -_W), (_W, -_W), (_W, -1), (-_W, -1), (-_W, -_W), (-1, -_W)]
        + [(-1, _W), (-_W, _W)],
        float,
    ),
    "diamond": np.array([(0, 1.1), (0.7, 0), (0, -1.1), (-0.7, 0)], float),
    "hexagon": _regular(6, 1.0),
}


def _background(bg: Background, size: int | tuple[int, int]) -> Image.Image:
    """The background alone, as a ``size`` x ``size`` (or ``(height, width)``) RGB image."""
    h, w = (size, size) if isinstance(size, int) else size
    if bg.kind == "solid":
        return Image.new("RGB", (w, h), bg.rgb)
    base = np.asarray(bg.rgb, np.float32)
    if bg.kind == "gradient":
        ty = (np.arange(h, dtype=np.float32) + 0.5) / h - 0.5
        tx = (np.arange(w, dtype=np.float32) + 0.5) / w - 0.5
        a = math.radians(bg.angle)
        ramp = (math.cos(a) * tx[None, :] + math.sin(a) * ty[:, None]) * (2 * bg.strength)  # [H, W] in +-strength
        pixels = base + ramp[:, :, None]
    elif bg.kind == "noise":
        g = np.random.default_rng(bg.seed)
        # blotches mostly in brightness, a little in hue, so a "noisy grey" background still reads as grey
        coarse = g.normal(0, bg.strength, (5, 5, 1)) + g.normal(0, bg.strength * 0.4, (5, 5, 3))
        blotches = Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8), "RGB")
        smooth = np.asarray(blotches.resize((w, h), Image.Resampling.BILINEAR), np.float32) - 128
        grain = g.standard_normal((h, w, 1), dtype=np.float32) * (bg.strength * 0.4)
        pixels = base + smooth + grain
    else:
        raise ValueError(f"unknown background kind {bg.kind!r}")
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "RGB")


def render(spec: SceneSpec, size: int | tuple[int, int] = 64, supersample: int | None = None) -> Image.Image:
    """Draw ``spec`` as a ``size`` x ``size`` RGB image, or ``(height, width)`` for any aspect ratio.

    On a non-square canvas, centres scale with each side (x with the width, y with the height) and radii with the
    short side, so shapes stay undistorted, inside the image, and in the same relative places (captions that name
    positions stay true); a square canvas gives exactly the square rendering. Shapes are drawn at ``supersample``
    times the size and box-filtered down (antialiased edges); the default picks 4x for tiny images, 2x up to 128 px
    and 1x above, where PIL's edges are already smooth enough.
    """
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if min(h, w) < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    ss = supersample or (4 if max(h, w) <= 48 else 2 if max(h, w) <= 128 else 1)
    img = _background(spec.background, (h, w))
    if ss > 1:  # nearest up then box down gives the background back exactly; only shape edges get blended
        img = img.resize((w * ss, h * ss), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(img)
    sh, sw = h * ss, w * ss
    for o in spec.objects:
        cx, cy, r = o.x * sw, o.y * sh, o.radius * min(sh, sw)
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=o.rgb)
            continue
        a = math.radians(o.rotation)
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        pts = OUTLINES[o.shape] @ rot.T * r
        draw.polygon([(cx + px, cy - py) for px, py in pts.tolist()], fill=o.rgb)  # y up -> image rows down
    return img.reduce(ss) if ss > 1 else img
