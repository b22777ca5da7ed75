"""Grounding: the Hungarian matcher against brute force, RefCOCO's metric against a hand count, referring phrases
that name exactly one object (checked by a separate reading of the phrase), a score that follows the phrase (same
image, two phrases, two objects), training through the trainer with an exact resume, and the RefCOCO-style loader
(JSON and parquet) through `aimv2 ground eval` and `predict`."""

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import kill9_after_checkpoint, read_metrics, subprocess_env
from PIL import Image

import aimv2
from aimv2.cli import main
from aimv2.config import load_config
from aimv2.config.grounding import GrounderConfig, GroundingConfig
from aimv2.data.sources.refcoco import RefCocoStyle
from aimv2.data.synthetic.boxes import object_box
from aimv2.data.synthetic.dataset import synthetic_scene
from aimv2.data.synthetic.referring import referring_expression
from aimv2.data.synthetic.scenes import Background, SceneObject, SceneSpec, render
from aimv2.data.transforms import mean_std
from aimv2.eval.grounding import grounding_accuracy, load_grounder
from aimv2.models.grounding import encode_phrases
from aimv2.objectives.grounding import build_grounding_model, hungarian_match
from aimv2.train.grounding_task import train_grounding

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n,m", [(1, 1), (3, 1), (3, 3), (4, 2), (5, 3)])
def test_hungarian_matching_is_the_brute_force_optimum(n, m):
    rng = np.random.default_rng(n * 10 + m)
    for _ in range(20):
        cost = torch.from_numpy(rng.normal(size=(n, m)))
        rows, cols = hungarian_match(cost)
        assert sorted(cols.tolist()) == list(range(m)) and len(set(rows.tolist())) == m  # each target, distinct rows
        best = min(sum(cost[r, c] for c, r in enumerate(p)) for p in itertools.permutations(range(n), m))
        assert float(cost[rows, cols].sum()) == pytest.approx(float(best))


def test_accuracy_at_iou_half_by_hand():
    target = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 20], [20, 20, 30, 30], [0, 0, 4, 4]])
    pred = torch.tensor(
        [
            [0.0, 0, 10, 10],  # IoU 1: hit
            [5, 0, 15, 10],  # IoU 50 / 150 = 1/3: miss
            [0, 0, 10, 10],  # IoU 100 / 200 = 1/2: hit (>= 0.5)
            [0, 0, 5, 5],  # disjoint: miss
            [0, 0, 4, 3],  # IoU 12 / 16 = 3/4: hit
        ]
    )
    assert grounding_accuracy(pred, target) == pytest.approx(3 / 5)


COLOUR_WORDS = r"(\w+) (\w+)"


def naive_referents(phrase: str, objects) -> list[int]:
    """A second reading of a scene phrase: who is '<colour> <shape>' [and '<relation>' the '<colour> <shape>']."""
    m = re.fullmatch(rf"the {COLOUR_WORDS}(?: (left of|right of|above|below) the {COLOUR_WORDS})?", phrase)
    assert m, phrase
    colour, shape, rel, colour2, shape2 = m.groups()
    side = {"left of": lambda a, b: b.x - a.x, "right of": lambda a, b: a.x - b.x,
            "above": lambda a, b: b.y - a.y, "below": lambda a, b: a.y - b.y}  # fmt: skip
    out = []
    for i, a in enumerate(objects):
        if (a.colour, a.shape) != (colour, shape):
            continue
        others = [b for j, b in enumerate(objects) if j != i and (b.colour, b.shape) == (colour2, shape2)]
        if rel is None or any(side[rel](a, b) > 0.05 for b in others):
            out.append(i)
    return out


def test_scene_phrases_name_exactly_one_object():
    relations = 0
    for i in range(300):
        spec, _ = synthetic_scene(i, 5)
        found = referring_expression(spec, np.random.default_rng([5, i, 7]))
        if found is None:
            continue
        phrase, t = found
        assert naive_referents(phrase, spec.objects) == [t], (i, phrase)
        relations += " of " in phrase or "above" in phrase or "below" in phrase
    assert relations >= 10  # "the red square left of the blue circle" kinds are there


def two_object_scene():
    objs = [
        SceneObject("square", "red", "large", x=0.27, y=0.3, radius=0.2, rgb=(220, 40, 40)),
        SceneObject("circle", "blue", "large", x=0.73, y=0.7, radius=0.2, rgb=(40, 90, 225)),
    ]
    return SceneSpec(objs, Background("solid", "grey", (128, 128, 128)))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster than several fighting over a busy machine's cores (88 s -> 2 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_the_score_follows_the_phrase():
    """One image with a red square and a blue circle, two phrases: after a short fit of the head and the text tower
    (the encoder frozen), each phrase's top box is its own object and not the other one, so the per-patch score
    depends on the phrase, not on the image alone."""
    torch.manual_seed(0)
    spec = two_object_scene()
    size = 32
    image = torch.from_numpy(np.array(render(spec, size))).permute(2, 0, 1).float()[None] / 255
    phrases = ["the red square", "the blue circle"]
    boxes = torch.tensor([object_box(o, (size, size)) for o in spec.objects])
    enc = aimv2.create_model("aimv2-tiny-patch8-64", depth=1)
    g = GrounderConfig(encoder="x", image_size=size, embed_dim=32, text_dim=32, text_depth=1, max_text_len=24,
                       train_blocks=0)  # fmt: skip
    model = build_grounding_model(g, enc, mean_std("imagenet"))
    images, tokens = image.expand(2, -1, -1, -1), encode_phrases(phrases, 24)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(40):
        opt.zero_grad()
        model(images, tokens, boxes).loss.backward()
        opt.step()
    pred, _ = model.predict(images, tokens)
    from torchvision.ops import box_iou

    iou = box_iou(pred, boxes)  # [phrase, object]
    assert iou[0, 0] >= 0.5 and iou[1, 1] >= 0.5, iou
    assert iou[0, 1] < 0.2 and iou[1, 0] < 0.2, iou


TINY = [
    "ground.encoder=aimv2-tiny-patch8-64",
    "ground.encoder_overrides={depth: 2}",
    "ground.image_size=32",
    "ground.embed_dim=32",
    "ground.text_dim=32",
    "ground.text_depth=1",
    "ground.train_blocks=1",
    "train.batch_size=2",
    "train.log_every=1",
    "train.progress=false",
    "log.tensorboard=false",
    "data.num_workers=0",
    "optim.warmup_steps=1",
]


def run(out, steps, *extra):
    overrides = [*TINY, f"out_dir={out}", f"train.steps={steps}", "train.checkpoint_every=2", *extra]
    return train_grounding(load_config("configs/ground-tiny.yaml", overrides, cls=GroundingConfig))


def ground_cmd(out, *extra):
    cfg = str(ROOT / "configs/ground-tiny.yaml")
    return [sys.executable, "-m", "aimv2", "ground", "train", cfg, *TINY, f"out_dir={out}", *extra]


@pytest.mark.slow
def test_grounding_training_resumes_exactly_after_kill_9(tmp_path):
    """`aimv2 ground train` killed with SIGKILL mid-run (after its step-2 checkpoint), then run again with the same
    command, ends with the weights and losses of the run that was never interrupted, bit for bit; the frozen block
    stays as initialized."""
    steps = ["train.steps=6", "train.checkpoint_every=2"]
    subprocess.run(ground_cmd(tmp_path / "straight", *steps), env=subprocess_env(), check=True, timeout=300,
                   capture_output=True)  # fmt: skip
    killed = tmp_path / "killed"
    kill9_after_checkpoint(ground_cmd(killed, *steps), killed, 2)
    assert not (killed / "grounder.safetensors").exists() or len(read_metrics(killed)) < 6  # it did die mid-run
    subprocess.run(ground_cmd(killed, *steps), env=subprocess_env(), check=True, timeout=300, capture_output=True)
    a, _ = load_grounder(tmp_path / "straight")
    b, _ = load_grounder(killed)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    ra, rb = read_metrics(tmp_path / "straight"), read_metrics(killed)
    assert [r["step"] for r in rb][-6:] == list(range(1, 7))
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb][-6:]
    torch.manual_seed(0)
    init = aimv2.create_model("aimv2-tiny-patch8-64", depth=2)
    assert torch.equal(a.encoder.blocks[0].attn.qkv.weight, init.blocks[0].attn.qkv.weight)


def refs_set(root):
    """Two non-square images and three records (four phrases) in the RefCOCO style."""
    (root / "img").mkdir(parents=True)
    spec = two_object_scene()
    render(spec, 48).resize((96, 48)).save(root / "img" / "wide.png")
    render(spec, 48).save(root / "img" / "square.png")
    return [
        {"file_name": "wide.png", "bbox": [10, 5, 30, 20], "sentences": [{"sent": "the red square"}], "split": "val"},
        {"file_name": "wide.png", "bbox": [60, 20, 25, 25], "sentences": ["the blue circle", "blue one"],
         "split": "val"},
        {"file_name": "square.png", "bbox": [4, 4, 20, 20], "phrase": "the red square", "split": "train"},
    ]  # fmt: skip


def test_refcoco_style_json_and_parquet_read_alike_and_eval_runs(tmp_path, capsys):
    records = refs_set(tmp_path)
    (tmp_path / "refs.json").write_text(json.dumps(records))
    rows = [  # parquet wants one type per column: sentences as strings
        {"file_name": r["file_name"], "bbox": r["bbox"], "split": r["split"],
         "sentences": [s if isinstance(s, str) else s["sent"] for s in r.get("sentences", [r.get("phrase")])]}
        for r in records
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "refs.parquet")
    a = RefCocoStyle(tmp_path / "refs.json", tmp_path / "img", 32)
    b = RefCocoStyle(tmp_path / "refs.parquet", tmp_path / "img", 32)
    assert a.samples == b.samples and len(a) == 4
    val = RefCocoStyle(tmp_path / "refs.parquet", tmp_path / "img", 32, split="val")
    assert [s[1] for s in val.samples] == ["the red square", "the blue circle", "blue one"]
    pixels, phrase, box = val[0]  # 96 x 48 -> 32 x 16, padded: the box at 1/3
    assert pixels.shape == (3, 32, 32) and int(pixels[:, 16:].sum()) == 0
    torch.testing.assert_close(box, torch.tensor([10.0, 5, 40, 25]) / 3)

    run(tmp_path / "run", 1)
    argv = ["ground", "eval", str(tmp_path / "run"), "--annotations", str(tmp_path / "refs.parquet")]
    assert main([*argv, "--images", str(tmp_path / "img"), "--split", "val"]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["phrases"] == 3 and 0 <= stats["accuracy"] <= 1
    out = tmp_path / "pred"
    argv = ["ground", "predict", str(tmp_path / "run"), str(tmp_path / "img" / "wide.png"), "--out", str(out)]
    assert main([*argv, "--phrase", "the red square", "--phrase", "the blue circle"]) == 0
    boxes = json.loads((out / "boxes.json").read_text())
    assert [r["phrase"] for r in boxes] == ["the red square", "the blue circle"]
    for r in boxes:  # in the image's own pixels
        x, y, w, h = r["bbox"]
        assert 0 <= x and x + w <= 96 + 1e-4 and 0 <= y and y + h <= 48 + 1e-4
    assert Image.open(out / "wide.phrases.png").size == (96, 48)


def test_unreadable_images_of_a_refs_file_are_skipped_and_counted(tmp_path, caplog):
    from conftest import read_metrics

    records = refs_set(tmp_path)
    (tmp_path / "img" / "broken.jpg").write_bytes(b"<html>not an image</html>")
    records.append({"file_name": "broken.jpg", "bbox": [1, 1, 5, 5], "sentences": ["the thing"]})
    (tmp_path / "refs.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    data = [f"ground.annotations={tmp_path / 'refs.jsonl'}", "data.source=folder", f"data.folder={tmp_path / 'img'}"]
    with caplog.at_level("WARNING"):
        run(tmp_path / "run", 3, *data, "data.max_fault_rate=0.5")  # 5 phrases, 6 read: the broken one once
    assert "broken.jpg" in "\n".join(r.getMessage() for r in caplog.records)
    assert read_metrics(tmp_path / "run")[-1]["data_skipped/bad_image"] == 1
