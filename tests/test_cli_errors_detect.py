"""Bad input to `aimv2 detect`, as test_cli_errors.py checks the other commands: each row of CASES builds its bad
input in a fresh folder and names a fragment the one error line must hold (the file, the record, the key, the
range); the command exits with status 2, one line on stderr, no traceback. Then what is not an error: unreadable
images and boxes outside their image are skipped and counted (metrics.jsonl's data_skipped/<kind>, the file named
in the warning), and `detect synth --overwrite` leaves no image of the earlier set."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, read_metrics
from PIL import Image

import aimv2
from aimv2.cli import main
from aimv2.config.detection import DetectionConfig, DetectorConfig
from aimv2.data.synthetic.boxes import CATEGORIES
from aimv2.data.transforms import mean_std
from aimv2.objectives.detection import build_detection_model
from aimv2.train.detection_task import DetectionTask

LINE = re.compile(r"aimv2 (detect|ground) [a-z]+: error: \S.*")
TRAIN = [
    "detect",
    "train",
    "--quiet",
    str(ROOT / "configs" / "detect-tiny.yaml"),
    "detect.encoder=aimv2-tiny-patch8-64",
    "detect.encoder_overrides={depth: 2}",
    "detect.out_channels=32",
    "detect.scales=[1.0, 0.5]",
    "detect.image_size=32",
    "train.batch_size=2",
    "train.log_every=1",
    "train.progress=false",
    "log.tensorboard=false",
    "data.num_workers=0",
    "optim.warmup_steps=1",
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster than several fighting over a busy machine's cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory) -> Path:
    """A random tiny detection run folder over the seven shape categories of the built-in scenes."""
    out = tmp_path_factory.mktemp("det")
    torch.manual_seed(0)
    enc = aimv2.create_model("aimv2-tiny-patch8-64", depth=1)
    d = DetectorConfig(encoder="x", out_channels=32, scales=[1.0, 0.5])
    model = build_detection_model(d, enc, len(CATEGORIES) + 1, mean_std("imagenet"))
    task = DetectionTask(DetectionConfig(detect=d), enc)
    task.categories, task.category_ids = [c["name"] for c in CATEGORIES], [c["id"] for c in CATEGORIES]
    task.export(model, model.state_dict(), out)
    return out


def coco_set(t: Path, *, images=None, annotations=None, categories=None, bad: dict | None = None) -> tuple[Path, Path]:
    """A COCO JSON (t/ann.json) and its folder (t/images) of 40 x 30 images; ``bad`` maps file names to the bytes
    written instead of a PNG."""
    folder = t / "images"
    folder.mkdir(parents=True, exist_ok=True)
    if images is None:
        images = [{"id": i, "file_name": f"{i}.png", "width": 40, "height": 30} for i in (1, 2, 3, 4)]
    for im in images:
        if "file_name" in im:
            rgb = np.random.default_rng(im["id"]).integers(0, 255, (30, 40, 3), dtype=np.uint8)
            Image.fromarray(rgb).save(folder / im["file_name"], format="PNG")
    for name, data in (bad or {}).items():
        (folder / name).write_bytes(data)
    if annotations is None:
        annotations = [
            {"id": 10 + i, "image_id": im["id"], "category_id": 1, "bbox": [5, 5, 20, 15]}
            for i, im in enumerate(images)
        ]
    doc = {"images": images, "annotations": annotations, "categories": categories or CATEGORIES[:2]}
    (t / "ann.json").write_text(json.dumps(doc))
    return t / "ann.json", folder


def truncated_jpeg() -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.full((30, 40, 3), 128, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()[:200]


def _train_on(t: Path, *extra, **kw):
    ann, folder = coco_set(t, **kw)
    argv = [*TRAIN, f"out_dir={t / 'run'}", "data.source=folder", f"data.folder={folder}", f"detect.annotations={ann}"]
    return [*argv, "train.steps=1", *extra]


def _no_annotations(t: Path):
    return _train_on(t, annotations=[]), "training on nothing"


def _only_crowd(t: Path):
    crowd = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 1}]
    return _train_on(t, annotations=crowd), "no box to train on"


def _ann(**change):
    a = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}
    a.update(change)
    return [{k: v for k, v in a.items() if v is not None}]


def _eval(t: Path, run: Path, *extra, **kw):
    ann, folder = coco_set(t, **kw)
    return ["detect", "eval", str(run), "--annotations", str(ann), "--images", str(folder), *extra]


def _synth_over_set(t: Path):
    assert main(["detect", "synth", str(t / "set"), "--n", "2"]) == 0
    return ["detect", "synth", str(t / "set"), "--n", "3"], "--overwrite"


def _predictions_unwritable(t: Path, shapes_run: Path):
    (t / "afile").write_text("")
    return _eval(t, shapes_run, "--predictions", str(t / "afile" / "p.json")), "the folder of --predictions is a file"


def _predict_file_not_listed(t: Path, shapes_run: Path):
    ann, folder = coco_set(t)
    Image.new("RGB", (20, 20)).save(t / "other.png")
    argv = ["detect", "predict", str(shapes_run), str(t / "other.png"), "--annotations", str(ann), "--out", str(t)]
    return argv, "other.png"


GROUND_TRAIN = [
    "ground",
    "train",
    "--quiet",
    str(ROOT / "configs" / "ground-tiny.yaml"),
    "ground.encoder=aimv2-tiny-patch8-64",
    "ground.encoder_overrides={depth: 1}",
    "ground.image_size=32",
    "train.batch_size=2",
    "train.steps=1",
    "train.progress=false",
    "log.tensorboard=false",
    "data.num_workers=0",
]


def _refs(t: Path, records, name: str = "refs.json"):
    coco_set(t)
    (t / name).write_text(records if isinstance(records, str) else json.dumps(records))
    argv = [*GROUND_TRAIN, f"out_dir={t / 'run'}", "data.source=folder", f"data.folder={t / 'images'}"]
    return [*argv, f"ground.annotations={t / name}"]


REF = {"file_name": "1.png", "bbox": [2, 2, 10, 10], "sentences": ["the thing"]}

IMAGE_NO_HEIGHT = [{"id": 1, "file_name": "1.png", "width": 40}]
SAME_IDS_OTHER_NAMES = [{**c, "name": f"thing{c['id']}"} for c in CATEGORIES]

CASES = {
    "no annotations": _no_annotations,
    "only crowd annotations": _only_crowd,
    "unknown category_id": lambda t: (_train_on(t, annotations=_ann(category_id=99)), "category_id 99 is not in"),
    "unknown image_id": lambda t: (_train_on(t, annotations=_ann(image_id=42)), "image_id 42 is not in 'images'"),
    "annotation without bbox": lambda t: (_train_on(t, annotations=_ann(bbox=None)), "no 'bbox' ("),
    "bbox of 3 numbers": lambda t: (_train_on(t, annotations=_ann(bbox=[1, 2, 3])), "annotations, record 0"),
    "image without height": lambda t: (_train_on(t, images=IMAGE_NO_HEIGHT, annotations=[]), "no 'height'"),
    "images empty": lambda t: (_train_on(t, images=[], annotations=[]), "'images' is an empty list"),
    "invalid JSON": lambda t: ([*_train_on(t), f"detect.annotations={_broken_json(t)}"], "broken.json, line 1"),
    "all images unreadable": lambda t: (
        _train_on(t, bad={f"{i}.png": b"text, not an image" for i in (1, 2, 3, 4)}),
        "bad_image x4",
    ),
    "fault rate": lambda t: (
        _train_on(
            t, "data.max_fault_rate=0.2", "train.steps=2", bad={"2.png": truncated_jpeg(), "3.png": b"not an image"}
        ),
        "bad_image",
    ),
    "out_channels 0": lambda t: (_train_on(t, "detect.out_channels=0"), "detect.out_channels=0"),
    "scales empty": lambda t: (_train_on(t, "detect.scales=[]"), "detect.scales"),
    "scales repeated": lambda t: (_train_on(t, "detect.scales=[1.0, 1.0]"), "distinct"),
    "train_blocks beyond depth": lambda t: (_train_on(t, "detect.train_blocks=5"), "beyond the encoder's 2 blocks"),
    "image_size not a patch multiple": lambda t: (_train_on(t, "detect.image_size=36"), "patch size 8"),
    "window_size 0": lambda t: (_train_on(t, "detect.window_size=0"), "detect.window_size"),
    "global_blocks beyond depth": lambda t: (_train_on(t, "detect.global_blocks=[7]"), "detect.global_blocks"),
    "score_thresh 2": lambda t: (_train_on(t, "detect.score_thresh=2"), "detect.score_thresh=2"),
    "synth over an existing set": _synth_over_set,
    "synth --n -3": lambda t: (["detect", "synth", str(t / "s"), "--n", "-3"], "--n -3"),
    "eval --synthetic 0": lambda t, shapes_run: (
        ["detect", "eval", str(shapes_run), "--synthetic", "0"],
        "--synthetic 0",
    ),
    "eval on 2 of 7 categories": lambda t, shapes_run: (_eval(t, shapes_run), "2 of the model's 7 category ids"),
    "eval on renamed categories": lambda t, shapes_run: (
        _eval(t, shapes_run, categories=SAME_IDS_OTHER_NAMES),
        "1 is 'thing1' there, 'circle' in the model",
    ),
    "eval --predictions unwritable": _predictions_unwritable,
    "predict file not in --annotations": _predict_file_not_listed,
    "ground: record without bbox": lambda t: (
        _refs(t, [REF, {k: v for k, v in REF.items() if k != "bbox"}]),
        "no 'bbox' (",
    ),
    "ground: record without sentences": lambda t: (
        _refs(t, [{k: v for k, v in REF.items() if k != "sentences"}]),
        "record 0); give each record",
    ),
    "ground: empty sentence": lambda t: (_refs(t, [{**REF, "sentences": [" "]}]), "not a phrase"),
    "ground: box without area": lambda t: (_refs(t, [{**REF, "bbox": [1, 1, 0, 5]}]), "has no area"),
    "ground: split with no record": lambda t: ([*_refs(t, [REF]), "ground.split=val"], "split 'val'"),
    "ground: pickled refs file": lambda t: (_refs(t, "\x80\x04K\x01.", name="refs(unc).p"), "invalid JSON"),
    "ground: text_dim not a multiple of heads": lambda t: (
        [*GROUND_TRAIN, "ground.text_dim=30", "ground.text_heads=4"],
        "ground.text_dim=30",
    ),
    "ground: train_blocks beyond depth": lambda t: ([*GROUND_TRAIN, "ground.train_blocks=3"], "beyond the encoder"),
    "ground eval --synthetic 0": lambda t: (["ground", "eval", str(t), "--synthetic", "0"], "--synthetic 0"),
    "ground eval without a run": lambda t: (["ground", "eval", str(t)], "grounder.safetensors not found"),
}


def _broken_json(t: Path) -> Path:
    (t / "broken.json").write_text('{"images": [,]}')
    return t / "broken.json"


def _fixtures(case, request, tmp_path):
    names = case.__code__.co_varnames[: case.__code__.co_argcount]
    return [tmp_path if n == "t" else request.getfixturevalue(n) for n in names]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_detect_input_is_one_line_and_status_2(name, request, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AIMV2_DEBUG", raising=False)
    case = CASES[name]
    argv, fragment = case(*_fixtures(case, request, tmp_path))
    capsys.readouterr()  # what the fixtures printed
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and LINE.fullmatch(lines[0]), err
    assert err.splitlines()[-1] == lines[0] and "Traceback" not in err
    assert fragment in lines[0], lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before the first step


def test_unreadable_images_and_outside_boxes_are_skipped_and_counted(tmp_path, caplog):
    """A truncated JPEG and a text file among six images, and a box wholly outside its image: two steps train, the
    bad images are replaced by the next readable ones and counted by kind in metrics.jsonl, each file named."""
    images = [{"id": i, "file_name": f"{i}.png", "width": 40, "height": 30} for i in range(1, 7)]
    images[1]["file_name"], images[3]["file_name"] = "trunc.jpg", "text.jpg"
    annotations = [{"id": i, "image_id": i, "category_id": 2, "bbox": [4, 4, 20, 12]} for i in range(1, 7)]
    annotations.append({"id": 99, "image_id": 1, "category_id": 1, "bbox": [50, 40, 10, 10]})  # beyond 40 x 30
    bad = {"trunc.jpg": truncated_jpeg(), "text.jpg": b"<html>not found</html>"}
    argv = _train_on(tmp_path, "data.max_fault_rate=0.5", images=images, annotations=annotations, bad=bad)
    argv = [a for a in argv if a != "train.steps=1"] + ["train.steps=2"]
    with caplog.at_level("WARNING"):
        assert main(argv) == 0
    warnings = "\n".join(r.getMessage() for r in caplog.records)
    assert "trunc.jpg" in warnings and "bad_box" in warnings and "annotations, record 6" in warnings
    last = read_metrics(tmp_path / "run")[-1]
    assert last["data_skipped/bad_image"] >= 2 and last["data_skipped/bad_box"] == 1, last
    assert last["data_skipped"] == last["data_skipped/bad_image"]  # a box left out is no skipped sample


def test_synth_overwrite_leaves_no_stale_images(tmp_path, capsys):
    assert main(["detect", "synth", str(tmp_path), "--n", "4", "--no-masks"]) == 0
    assert main(["detect", "synth", str(tmp_path), "--n", "2", "--no-masks", "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["000000.png", "000001.png"]
    assert len(json.loads((tmp_path / "annotations.json").read_text())["images"]) == 2
