"""Detection on a user's COCO set: one resize policy (aspect kept, long side to the input, padded) for training,
`detect eval` and `detect predict`, so the same image gives the same boxes through both commands; boxes back in
original pixels exactly; COCO image ids in predict's output; files without area / iscrowd; eval's AP against
pycocotools run independently on its predictions."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import aimv2
from aimv2.cli import main
from aimv2.config.detection import DetectionConfig, DetectorConfig
from aimv2.data.sources.coco import CocoDetection
from aimv2.data.transforms import mean_std
from aimv2.objectives.detection import DetectionObjective, build_detection_model
from aimv2.train.detection_task import DetectionTask

CATEGORIES = [{"id": 4, "name": "cat"}, {"id": 9, "name": "dog"}]
SIZES = {7: (96, 48), 3: (40, 80), 12: (64, 64)}  # image id -> (width, height): wide, tall, square


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster than several fighting over a busy machine's cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_set(root, with_area=False):
    """Three images of other aspects with gapped ids; annotations without area / iscrowd unless ``with_area``."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for image_id, (w, h) in SIZES.items():
        name = f"img{image_id}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / name)
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
    boxes = [(7, 4, [12, 12, 48, 24]), (7, 9, [60, 5, 30, 30]), (3, 4, [5, 40, 20, 30]), (12, 9, [10, 10, 20, 20])]
    for n, (image_id, cat, bbox) in enumerate(boxes):
        ann = {"id": 100 + n, "image_id": image_id, "category_id": cat, "bbox": bbox}
        annotations.append({**ann, "area": bbox[2] * bbox[3], "iscrowd": 0} if with_area else ann)
    path = root / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A random tiny FCOS run folder (detector.safetensors) over the two categories, keeping every detection."""
    out = tmp_path_factory.mktemp("det")
    torch.manual_seed(0)
    enc = aimv2.create_model("aimv2-tiny-patch8-64", depth=1)
    d = DetectorConfig(
        encoder="x", out_channels=32, image_size=64, scales=[1.0, 0.5], score_thresh=0.0, detections_per_img=10
    )
    model = build_detection_model(d, enc, len(CATEGORIES) + 1, mean_std("imagenet"))
    task = DetectionTask(DetectionConfig(detect=d), enc)
    task.categories, task.category_ids = [c["name"] for c in CATEGORIES], [c["id"] for c in CATEGORIES]
    task.export(model, model.state_dict(), out)
    return out


def by_image(records):
    out = {}
    for r in records:
        out.setdefault(r["image_id"], []).append((r["category_id"], r["score"], r["bbox"]))
    return {k: sorted(v, key=lambda t: -t[1]) for k, v in out.items()}


def test_predict_and_eval_give_the_same_boxes_on_non_square_images(tmp_path, run_dir, capsys):
    ann = write_set(tmp_path)
    preds = tmp_path / "eval-preds.json"
    argv = ["detect", "eval", str(run_dir), "--annotations", str(ann), "--images", str(tmp_path / "images")]
    assert main([*argv, "--predictions", str(preds)]) == 0
    files = [str(tmp_path / "images" / f"img{i}.png") for i in (12, 3, 7)]  # not the JSON's order
    assert (
        main(["detect", "predict", str(run_dir), *files, "--annotations", str(ann), "--out", str(tmp_path / "p")]) == 0
    )
    from_eval = by_image(json.loads(preds.read_text()))
    from_predict = by_image(json.loads((tmp_path / "p" / "predictions.json").read_text()))
    assert set(from_predict) == set(from_eval) == set(SIZES)  # the COCO ids, matched by file_name
    for image_id, rows in from_eval.items():
        assert len(rows) == len(from_predict[image_id]) == 10
        for (c1, s1, b1), (c2, s2, b2) in zip(rows, from_predict[image_id], strict=True):
            assert c1 == c2 and s1 == pytest.approx(s2, abs=1e-6)
            np.testing.assert_allclose(b1, b2, atol=1e-3)
        w, h = SIZES[image_id]
        for _, _, (x, y, bw, bh) in rows:  # within the image, never on the padding
            assert -1e-4 <= x and x + bw <= w + 1e-4 and -1e-4 <= y and y + bh <= h + 1e-4


def test_boxes_go_back_to_original_pixels_exactly_and_ap_is_pycocotools(tmp_path, run_dir, monkeypatch, capsys):
    """A detector that always answers one box at input pixels (8, 8, 40, 24): the wide 96 x 48 image is resized by
    2/3 (to 64 x 32, padded), so that box is (12, 12, 60, 36) there, exactly its cat (the old squash to the square
    made it (12, 6, 60, 18)); on the tall 40 x 80 image (scale 0.8) it is (10, 10, 50, 30), clipped to the image:
    (10, 10, 40, 30), a miss. eval's AP equals COCOeval run on its own prediction file."""
    answer = {
        "boxes": torch.tensor([[8.0, 8.0, 40.0, 24.0]]),
        "scores": torch.tensor([0.9]),
        "labels": torch.tensor([1]),
    }
    monkeypatch.setattr(DetectionObjective, "predict", lambda self, images: [dict(answer) for _ in images])
    ann = write_set(tmp_path)
    preds = tmp_path / "preds.json"
    argv = ["detect", "eval", str(run_dir), "--annotations", str(ann), "--images", str(tmp_path / "images")]
    assert main([*argv, "--predictions", str(preds)]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    records = by_image(json.loads(preds.read_text()))
    assert records[7] == [(4, pytest.approx(0.9), pytest.approx([12.0, 12.0, 48.0, 24.0], abs=1e-5))]
    assert records[3] == [(4, pytest.approx(0.9), pytest.approx([10.0, 10.0, 30.0, 20.0], abs=1e-5))]
    # pycocotools on its own, from the file completed by hand (area w * h, iscrowd 0)
    doc = json.loads(ann.read_text())
    for a in doc["annotations"]:
        a.update(area=a["bbox"][2] * a["bbox"][3], iscrowd=0)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = doc
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(str(preds)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert stats["AP"] == pytest.approx(ev.stats[0]) and stats["AP50"] == pytest.approx(ev.stats[1])
    assert stats["AP50"] > 0.1  # one of the four objects found: the mapping back is exact


def test_training_items_are_letterboxed_like_eval(tmp_path):
    ann = write_set(tmp_path, with_area=True)
    data = CocoDetection(ann, tmp_path / "images", size=64)
    pixels, boxes, labels = data[1]  # ids sorted: 3, 7, 12
    assert pixels.shape == (3, 64, 64) and int(pixels[:, 32:].sum()) == 0  # 64 x 32, padded below
    ref = np.asarray(Image.open(tmp_path / "images" / "img7.png").resize((64, 32), Image.Resampling.BILINEAR))
    assert torch.equal(pixels[:, :32], torch.from_numpy(ref.copy()).permute(2, 0, 1))
    torch.testing.assert_close(boxes, torch.tensor([[12.0, 12.0, 60.0, 36.0], [60.0, 5.0, 90.0, 35.0]]) * 2 / 3)
    assert labels.tolist() == [1, 2]  # ids 4, 9 -> labels 1, 2
