"""The built-in synthetic dataset: deterministic samples, captions true to the scene, a stream split without gaps or
duplicates across ranks and workers, resumable, and balanced probe splits whose labels match their scenes."""

import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from aimv2.data.synthetic.captions import caption, caption_tokens, caption_words
from aimv2.data.synthetic.dataset import SyntheticCaptions, SyntheticCaptionStream, synthetic_sample, synthetic_scene
from aimv2.data.synthetic.probes import probe_classes, probe_label, probe_scene, write_probe_splits
from aimv2.data.synthetic.scenes import (
    ALLOWED_COLOURS,
    EXTENT,
    Background,
    SceneObject,
    SceneSpec,
    render,
    sample_scene,
)
from aimv2.data.synthetic.vocabulary import BACKGROUND_KINDS, BACKGROUNDS, COLOURS, SHAPES, SIZES

# --- a small independent parser of the caption grammar ---

_NUM = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4}
_PLURAL = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
_SHAPE_WORD = {**{s: s for s in SHAPES}, **{p: s for s, p in _PLURAL.items()}}
GROUP = (
    rf"\b(?:{'|'.join(_NUM)}) (?:(?:{'|'.join(SIZES)}) )?(?:{'|'.join(COLOURS)}) "
    rf"(?:{'|'.join(sorted(_SHAPE_WORD, key=len, reverse=True))})\b"
)
_GROUP_PARTS = re.compile(
    rf"\b({'|'.join(_NUM)}) (?:({'|'.join(SIZES)}) )?({'|'.join(COLOURS)}) "
    rf"({'|'.join(sorted(_SHAPE_WORD, key=len, reverse=True))})\b"
)
_REL = {"left of": "left", "to the left of": "left", "right of": "right", "to the right of": "right"}
_REL.update({"above": "above", "below": "below"})
RELATION = re.compile(rf"({GROUP}) ({'|'.join(sorted(_REL, key=len, reverse=True))}) ({GROUP})")
BACKGROUND = re.compile(rf" (?:on|against) an? (noisy |textured )?({'|'.join(BACKGROUNDS)})( gradient)?( background)?$")


def parse_group(text):
    m = _GROUP_PARTS.fullmatch(text)
    return _NUM[m[1]], m[2], m[3], _SHAPE_WORD[m[4]]


def members(spec, size, colour, shape):
    return [o for o in spec.objects if o.colour == colour and o.shape == shape and size in (None, o.size)]


def check_caption(spec: SceneSpec, text: str):
    """Asserts that ``text`` says only true things about ``spec`` and names every object."""
    assert text == text.lower() and text == text.strip()
    assert set(caption_tokens(text)) <= set(caption_words()) | {",", ":"}, text
    body = text
    m = BACKGROUND.search(text)
    if m:
        kind = "noise" if m[1] else "gradient" if m[3] else "solid"
        assert (m[2], kind) == (spec.background.colour, spec.background.kind), text
        body = text[: m.start()]
    # every object is named exactly once, with its colour, shape and (if given) size
    named = {}
    for g in re.findall(GROUP, body):
        n, size, colour, shape = parse_group(g)
        assert len(members(spec, size, colour, shape)) >= n, (text, g)
        named[(colour, shape)] = named.get((colour, shape), 0) + n
    truth = {}
    for o in spec.objects:
        truth[(o.colour, o.shape)] = truth.get((o.colour, o.shape), 0) + 1
    assert named == truth, text
    words = {"one": 1, "two": 2, "three": 3, "four": 4}
    if m := re.match(r"(one|two|three|four) (objects?|shapes?):", body):
        assert words[m[1]] == len(spec.objects), text
    if m := RELATION.search(body):
        a, b = members(spec, *parse_group(m[1])[1:]), members(spec, *parse_group(m[3])[1:])
        rel = _REL[m[2]]
        for p in a:
            for q in b:
                dx, dy = q.x - p.x, q.y - p.y
                ok = {"left": dx > 0.1 and abs(dx) > abs(dy), "right": dx < -0.1 and abs(dx) > abs(dy)}
                ok.update(above=dy > 0.1 and abs(dy) > abs(dx), below=dy < -0.1 and abs(dy) > abs(dx))
                assert ok[rel], (text, p, q)
    if m := re.match(r"from (left to right|top to bottom): ", body):
        axis = "x" if m[1] == "left to right" else "y"
        listed = [parse_group(g)[2:] for g in re.findall(GROUP, body)]
        ordered = [(o.colour, o.shape) for o in sorted(spec.objects, key=lambda o: getattr(o, axis))]
        assert listed == ordered, text


# --- samples and scenes ---


def test_same_seed_and_index_same_sample_and_others_differ():
    img, text = synthetic_sample(123, seed=7)
    img2, text2 = synthetic_sample(123, seed=7)
    assert img.mode == "RGB" and img.size == (64, 64)
    assert np.array_equal(np.asarray(img), np.asarray(img2)) and text == text2
    for other in (synthetic_sample(124, seed=7), synthetic_sample(123, seed=8)):
        assert not np.array_equal(np.asarray(img), np.asarray(other[0]))
    texts = {synthetic_scene(i)[1] for i in range(50)}
    assert len(texts) > 40  # captions vary


@pytest.mark.parametrize("size", [8, 32, 100, 224])
def test_renders_any_size_and_shapes_carry_their_colour(size):
    for i in range(10):
        spec, _ = synthetic_scene(i)
        img = np.asarray(render(spec, size))
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
        if size >= 32:  # the topmost object's centre pixel is exactly its colour
            top = spec.objects[-1]
            px = img[min(int(top.y * size), size - 1), min(int(top.x * size), size - 1)]
            assert np.abs(px.astype(int) - top.rgb).max() <= 1, (spec, px)


def test_scenes_are_valid_and_varied():
    seen = {k: set() for k in ("shape", "colour", "size", "bg", "kind", "n")}
    for i in range(400):
        spec, _ = synthetic_scene(i, seed=1)
        assert 1 <= len(spec.objects) <= 4
        seen["n"].add(len(spec.objects))
        seen["bg"].add(spec.background.colour)
        seen["kind"].add(spec.background.kind)
        for o in spec.objects:
            ext = EXTENT * o.radius
            assert ext <= o.x <= 1 - ext and ext <= o.y <= 1 - ext
            assert o.colour in ALLOWED_COLOURS[spec.background.colour]
            lo, hi = SIZES[o.size] * 0.92, SIZES[o.size] * 1.08
            assert lo - 1e-9 <= o.radius <= hi + 1e-9
            seen["shape"].add(o.shape), seen["colour"].add(o.colour), seen["size"].add(o.size)
        for a in spec.objects:  # at most a light overlap
            for b in spec.objects:
                if a is not b:
                    assert np.hypot(a.x - b.x, a.y - b.y) >= 0.85 * (a.radius + b.radius)
    assert seen["shape"] == set(SHAPES) and seen["colour"] == set(COLOURS) and seen["size"] == set(SIZES)
    assert seen["bg"] == set(BACKGROUNDS) and seen["kind"] == set(BACKGROUND_KINDS) and seen["n"] == {1, 2, 3, 4}


def test_captions_are_true_to_their_scenes():
    families = set()
    for i in range(600):
        spec, text = synthetic_scene(i, seed=3)
        check_caption(spec, text)
        families.add(text.split(" ")[0] if text.startswith("from") else "relation" if RELATION.search(text) else "")
        families.add("count" if re.match(r"\w+ (objects?|shapes?):", text) else "")
    assert {"from", "relation", "count"} <= families


def _obj(shape, colour, x, y, size="small"):
    return SceneObject(shape, colour, size, x, y, SIZES[size], 0.0, COLOURS[colour])


def test_identical_objects_are_counted_and_relations_follow_positions():
    bg = Background("solid", "grey", BACKGROUNDS["grey"])
    # two small red circles on the left, one blue square on the right, all at the same height
    spec = SceneSpec(
        [_obj("circle", "red", 0.15, 0.3), _obj("circle", "red", 0.2, 0.7), _obj("square", "blue", 0.8, 0.5)], bg
    )
    relations = set()
    for k in range(200):
        text = caption(spec, np.random.default_rng(k))
        check_caption(spec, text)
        if not text.startswith("from"):
            assert re.search(r"\btwo (small )?red circles\b", text), text
        if m := RELATION.search(text):
            relations.add(_REL[m[2]])
    assert relations == {"left", "right"}  # stated both ways round; never above/below
    # the circles are not clearly apart horizontally, so no left-to-right ordering is claimed
    assert not any(caption(spec, np.random.default_rng(k)).startswith("from left") for k in range(200))


def test_probe_conditioning_gives_a_unique_largest_object():
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        spec = sample_scene(rng, main_shape=shape)
        assert [o.size for o in spec.objects].count("large") == 1 and spec.largest().shape == shape
    for colour in COLOURS:
        spec = sample_scene(rng, main_colour=colour)
        assert spec.largest().colour == colour and spec.largest().size == "large"
    for n in range(1, 5):
        assert len(sample_scene(rng, n_objects=n).objects) == n


# --- datasets ---


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def test_map_style_dataset():
    ds = SyntheticCaptions(5, seed=2, size=16, offset=10, transform=to_tensor)
    assert len(ds) == 5
    img, text = ds[3]
    ref_img, ref_text = synthetic_sample(13, seed=2, size=16)
    assert img.shape == (3, 16, 16) and img.dtype == torch.uint8 and text == ref_text
    assert torch.equal(img, to_tensor(ref_img))
    assert ds[-1][1] == ds[4][1]
    with pytest.raises(IndexError):
        ds[5]
    assert len(list(ds)) == 5


@pytest.mark.parametrize("world_size,workers,batch", [(1, 1, 1), (2, 3, 4), (3, 2, 5)])
def test_stream_split_is_disjoint_and_complete(world_size, workers, batch):
    got = []
    for rank in range(world_size):
        s = SyntheticCaptionStream(rank=rank, world_size=world_size, start=5, batch_size=batch)
        for w in range(workers):
            it = s.indices(w, workers)
            got += [next(it) for _ in range(batch * 7)]
    n = world_size * workers * batch * 7
    assert sorted(got) == list(range(5, 5 + n))


def _run(stream, steps, batch, workers):
    loader = DataLoader(stream, batch_size=batch, num_workers=workers)
    out = []
    for k, (imgs, texts, idx) in enumerate(loader):
        out.append((imgs, list(texts), idx.tolist()))
        if k + 1 == steps:
            break
    return out


def test_stream_through_dataloader_workers_and_ranks_then_resume():
    world, batch, workers, steps = 2, 3, 2, 4
    kw = dict(seed=4, size=16, transform=to_tensor, world_size=world, batch_size=batch, with_index=True)
    runs = [_run(SyntheticCaptionStream(rank=r, **kw), steps + 2, batch, workers) for r in range(world)]
    # step k of rank r is block k * world + r: the first k steps consume exactly the first k * batch * world samples
    for k in range(steps):
        seen = sorted(i for r in range(world) for i in runs[r][k][2])
        assert seen == list(range(k * batch * world, (k + 1) * batch * world))
    for r in range(world):
        imgs, texts, idx = runs[r][1]
        ref = [synthetic_sample(i, seed=4, size=16) for i in idx]
        assert texts == [t for _, t in ref] and torch.equal(imgs, torch.stack([to_tensor(im) for im, _ in ref]))
    # resumed after `steps` steps (fewer workers this time): continues exactly where the run left off
    resumed = [
        _run(SyntheticCaptionStream(rank=r, start=steps * batch * world, **kw), 2, batch, 1) for r in range(world)
    ]
    for r in range(world):
        for k in range(2):
            assert resumed[r][k][2] == runs[r][steps + k][2] and resumed[r][k][1] == runs[r][steps + k][1]


def test_stream_rejects_bad_rank():
    with pytest.raises(ValueError):
        SyntheticCaptionStream(rank=2, world_size=2)


# --- probe splits ---


@pytest.mark.parametrize("task,n_train,n_val", [("shape", 23, 14), ("count", 8, 5), ("colour", 9, 9)])
def test_probe_splits_are_balanced_with_true_labels(tmp_path, task, n_train, n_val):
    info = write_probe_splits(tmp_path, task, n_train=n_train, n_val=n_val, size=24, seed=5)
    classes = probe_classes(task)
    pixels = {}
    for split, n in (("train", n_train), ("val", n_val)):
        counts = {c: len(list((tmp_path / split / c).glob("*.png"))) for c in classes}
        assert sum(counts.values()) == n and max(counts.values()) - min(counts.values()) <= 1
        assert counts == info["counts"][split]
        for c in classes:
            for f in (tmp_path / split / c).glob("*.png"):
                spec, label = probe_scene(task, split, int(f.stem), seed=5)
                assert label == c == probe_label(spec, task)  # re-derived from the scene itself
                arr = np.asarray(Image.open(f).convert("RGB"))
                assert np.array_equal(arr, np.asarray(render(spec, 24)))
                pixels[(split, f.stem)] = arr.tobytes()
    train = {v for (s, _), v in pixels.items() if s == "train"}
    assert not train & {v for (s, _), v in pixels.items() if s == "val"}
    with pytest.raises(FileExistsError):
        write_probe_splits(tmp_path, task, n_train=2, n_val=2, size=24)
    write_probe_splits(tmp_path, task, n_train=2, n_val=1, size=24, overwrite=True)
    assert sum(1 for _ in (tmp_path / "train").rglob("*.png")) == 2
