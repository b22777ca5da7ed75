"""Detection: torchvision's heads on the pyramid, COCO data from the scene generator (checked with pycocotools and
against the rendered pixels), AP on a hand-made prediction file, mIoU by hand, and training through the trainer
(resume, and 2-process DDP against micro-batches)."""

import itertools
import json
import subprocess

import numpy as np
import pytest
import torch
from conftest import ROOT, TORCHRUN_AIMV2, read_metrics, subprocess_env
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

import aimv2
from aimv2.cli import main
from aimv2.config import load_config
from aimv2.config.detection import DetectionConfig, DetectorConfig
from aimv2.data.sources.coco import CocoDetection, collate_detection
from aimv2.data.synthetic.boxes import SyntheticDetection, object_box, scene_label_map, write_coco
from aimv2.data.synthetic.dataset import synthetic_scene
from aimv2.data.synthetic.scenes import Background, SceneObject, SceneSpec, render
from aimv2.data.synthetic.vocabulary import SHAPES
from aimv2.data.transforms import mean_std
from aimv2.eval.detection import coco_eval, load_detector, mean_iou
from aimv2.objectives.detection import LOSS_PARTS, build_detection_model, to_targets
from aimv2.train.detection_task import train_detection
from aimv2.weights import load_encoder


def tiny_detector(kind, **kw):
    torch.manual_seed(0)
    enc = aimv2.create_model("aimv2-tiny-patch8-64", depth=1)
    d = DetectorConfig(encoder="x", kind=kind, out_channels=32, image_size=64, **kw)
    return build_detection_model(d, enc, len(SHAPES) + 1, mean_std("imagenet"))


@pytest.mark.parametrize("kind", ["fcos", "retinanet", "faster_rcnn"])
def test_torchvision_detector_takes_the_backbone_and_trains_a_step(kind):
    model = tiny_detector(kind)
    images, boxes, labels = collate_detection([SyntheticDetection(0, 64)[i] for i in range(3)])
    images = images.float() / 255
    torch.manual_seed(1)  # Faster R-CNN samples proposals: the same draws for both calls
    out = model(images, boxes, labels)
    torch.manual_seed(1)
    ref = model.detector(list(images), to_targets(boxes, labels))  # torchvision's own loss dict
    assert set(out.terms.sums) == set(ref)
    for k, v in ref.items():  # sums of per-image means over 3 images, counted as 3
        torch.testing.assert_close(out.terms.sums[k], v.detach() * 3)
        assert out.terms.counts[k] == 3
    torch.testing.assert_close(out.loss, sum(ref.values()))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = model.encoder.blocks[0].mlp.fc1.weight.detach().clone()
    out.loss.backward()
    opt.step()
    assert not torch.equal(before, model.encoder.blocks[0].mlp.fc1.weight)  # the encoder learns through the head
    dets = model.predict(images)
    assert len(dets) == 3 and dets[0]["boxes"].shape[-1] == 4


def test_bf16_autocast_step_is_finite_and_close_to_fp32():
    model = tiny_detector("fcos")
    images, boxes, labels = collate_detection([SyntheticDetection(0, 64)[i] for i in range(2)])
    images = images.float() / 255
    fp32 = model(images, boxes, labels).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what the trainer does with train.precision=bf16
        bf16 = model(images, boxes, labels).loss
    bf16.backward()
    assert torch.isfinite(bf16) and abs(bf16.item() - fp32.item()) < 0.05 * fp32.item()


def test_frozen_and_partly_trained_encoders_and_layer_decay():
    model = tiny_detector("fcos", train_blocks=0)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.detector.backbone.pyramid.parameters())
    torch.manual_seed(0)
    enc = aimv2.create_model("aimv2-tiny-patch8-64", depth=4)
    d = DetectorConfig(encoder="x", out_channels=32, train_blocks=2)
    model = build_detection_model(d, enc, 8, mean_std("imagenet"))
    trains = [any(p.requires_grad for p in b.parameters()) for b in model.encoder.blocks]
    assert trains == [False, False, True, True] and not model.encoder.patch_embed.proj.weight.requires_grad
    prefix = "detector.backbone.dense.encoder.blocks"
    assert model.layer_decay_mults(0.5) == {f"{prefix}.2": 0.25, f"{prefix}.3": 0.5}  # frozen blocks left out
    enc = aimv2.create_model("aimv2-tiny-patch8-64", depth=4)  # a fresh one: the first build froze some blocks
    full = build_detection_model(DetectorConfig(encoder="x", out_channels=32), enc, 8, mean_std("imagenet"))
    mults = full.layer_decay_mults(0.5)
    assert mults[f"{prefix}.0"] == 0.5**4 and mults["detector.backbone.dense.encoder.pos_embed"] == 0.5**5


@pytest.mark.parametrize("shape", SHAPES)
def test_boxes_are_tight_around_the_rendered_pixels(shape):
    obj = SceneObject(shape, "red", "large", x=0.45, y=0.55, radius=0.16, rotation=12.0, rgb=(220, 40, 40))
    spec = SceneSpec([obj], Background("solid", "grey", (128, 128, 128)))
    pixels = np.asarray(render(spec, 96)).astype(int)
    ys, xs = np.nonzero(np.abs(pixels - 128).max(-1) > 60)  # pixels mostly covered by the shape
    x0, y0, x1, y1 = object_box(obj, (96, 96))
    assert abs(xs.min() - x0) <= 1 and abs(ys.min() - y0) <= 1
    assert abs(xs.max() + 1 - x1) <= 1 and abs(ys.max() + 1 - y1) <= 1


def test_scene_coco_json_loads_in_pycocotools_and_the_loader_reads_it_back(tmp_path):
    path = write_coco(tmp_path / "scenes", 6, seed=3, size=64)
    coco = COCO(str(path))  # pycocotools' own loader and index
    assert len(coco.getImgIds()) == 6 and [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SHAPES)
    synth = SyntheticDetection(3, 64)
    assert len(coco.getAnnIds()) == sum(len(synth[i][2]) for i in range(6))
    ann = coco.loadAnns(coco.getAnnIds(imgIds=[1]))[0]
    m = coco.annToMask(ann)  # the polygon rasterized by pycocotools
    assert abs(m.sum() - ann["area"]) / ann["area"] < 0.15
    x, y, w, h = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(m)))  # the mask's box is the box
    assert np.allclose([x, y, w, h], ann["bbox"], atol=1.5)

    loaded = CocoDetection(path, tmp_path / "scenes" / "images", size=64)
    for i in range(6):
        a, b = loaded[i], synth[i]
        assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])  # PNG is lossless; labels are shape ids
        torch.testing.assert_close(a[1], b[1], atol=1e-4, rtol=0)
    half = CocoDetection(path, tmp_path / "scenes" / "images", size=32)
    torch.testing.assert_close(half[0][1], synth[0][1] / 2, atol=1e-4, rtol=0)


def test_label_maps_agree_with_pycocotools_masks_of_the_polygons(tmp_path):
    path = write_coco(tmp_path / "scenes", 3, seed=4, size=64)
    coco = COCO(str(path))
    for image_id in coco.getImgIds():
        spec, _ = synthetic_scene(image_id - 1, 4)
        ref = np.zeros((64, 64), int)
        for ann in sorted(coco.loadAnns(coco.getAnnIds(imgIds=[image_id])), key=lambda a: a["id"]):  # draw order
            ref[coco.annToMask(ann) > 0] = ann["category_id"]
        labels = scene_label_map(spec, 64).numpy()
        assert (labels == ref).mean() > 0.97  # the two rasterizers differ only on edge pixels
        assert set(np.unique(labels)) == set(np.unique(ref))


def test_ap_of_a_hand_made_prediction_file(tmp_path):
    """Class 1: two objects, one found (score .9) and one false alarm (.8): precision 1 up to recall 1/2, so COCO's
    101-point AP is 51/101 at every IoU threshold. Class 2: two objects, one found exactly (.7), one with IoU 2/3
    (.6): AP 1 at IoU 0.50-0.65 (4 thresholds), 51/101 at 0.70-0.95 (6)."""
    sq = lambda x, y: [x, y, 40, 40]  # noqa: E731
    gt = {
        "images": [{"id": 1, "width": 200, "height": 200}, {"id": 2, "width": 200, "height": 200}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": sq(10, 10), "area": 1600, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": sq(100, 100), "area": 1600, "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 2, "bbox": sq(10, 120), "area": 1600, "iscrowd": 0},
            {"id": 4, "image_id": 2, "category_id": 2, "bbox": sq(50, 50), "area": 1600, "iscrowd": 0},
        ],
    }
    preds = [
        {"image_id": 1, "category_id": 1, "bbox": sq(10, 10), "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": sq(150, 10), "score": 0.8},
        {"image_id": 1, "category_id": 2, "bbox": sq(10, 120), "score": 0.7},
        {"image_id": 2, "category_id": 2, "bbox": sq(58, 50), "score": 0.6},  # shifted 8 px: IoU 32/48
    ]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "preds.json").write_text(json.dumps(preds))
    stats = coco_eval(tmp_path / "gt.json", tmp_path / "preds.json")
    half = 51 / 101
    assert stats["AP50"] == pytest.approx((half + 1) / 2, abs=1e-9)
    assert stats["AP75"] == pytest.approx(half, abs=1e-9)
    assert stats["AP"] == pytest.approx((half + (4 + 6 * half) / 10) / 2, abs=1e-9)


def test_mean_iou_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 0, 2, 2]])
    # class 0: tp 3, fp 0, fn 1 -> 3/4; class 1: tp 2, fp 1, fn 1 -> 2/4; class 2: tp 0, fp 1 -> 0; ignored pixel out
    out = mean_iou(pred, target, num_classes=4)
    assert out["IoU"][:3] == [0.75, 0.5, 0.0] and np.isnan(out["IoU"][3])
    assert out["mIoU"] == pytest.approx(1.25 / 3)


TINY = [
    "detect.encoder=aimv2-tiny-patch8-64",
    "detect.encoder_overrides={depth: 2}",
    "detect.image_size=64",  # smaller leaves FCOS's GroupNorm a 1 x 1 top level
    "detect.out_channels=32",
    "detect.train_blocks=1",
    "detect.layer_decay=0.5",
    "train.batch_size=2",
    "train.log_every=1",
    "train.progress=false",
    "log.tensorboard=false",
    "data.num_workers=0",
    "optim.warmup_steps=1",
]


def run(tmp_path, name, steps, *extra):
    overrides = [*TINY, f"out_dir={tmp_path / name}", f"train.steps={steps}", "train.checkpoint_every=2", *extra]
    cfg = load_config("configs/detect-tiny.yaml", overrides, cls=DetectionConfig)
    return train_detection(cfg)


@pytest.mark.slow
def test_detection_training_resumes_exactly_and_its_model_evaluates(tmp_path, capsys):
    run(tmp_path, "straight", 3)
    run(tmp_path, "resumed", 2)
    run(tmp_path, "resumed", 3)  # continues from the step-2 checkpoint
    a, meta = load_detector(tmp_path / "straight")
    b, _ = load_detector(tmp_path / "resumed")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    torch.manual_seed(0)
    init = load_encoder("aimv2-tiny-patch8-64", depth=2)
    assert torch.equal(a.encoder.blocks[0].attn.qkv.weight, init.blocks[0].attn.qkv.weight)  # frozen block 0
    assert not torch.equal(a.encoder.blocks[1].attn.qkv.weight, init.blocks[1].attn.qkv.weight)
    saved = (tmp_path / "straight" / "config.yaml").read_text()
    assert "detector.backbone.dense.encoder.blocks.1: 0.5" in saved  # layer decay, as the optimizer used it
    assert meta["categories"] == list(SHAPES)

    assert main(["detect", "eval", str(tmp_path / "straight"), "--synthetic", "4"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["images"] == 4 and 0 <= result["AP"] <= 1
    write_coco(tmp_path / "coco", 2, seed=5, size=48)
    image = str(tmp_path / "coco" / "images" / "000000.png")
    assert main(["detect", "predict", str(tmp_path / "straight"), image, "--out", str(tmp_path / "pred")]) == 0
    records = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert all(r["category_id"] in range(1, 8) and len(r["bbox"]) == 4 for r in records)
    assert (tmp_path / "pred" / "000000.boxes.png").is_file()


@pytest.mark.slow
def test_two_process_ddp_trains_like_one_process_with_two_micro_batches(tmp_path):
    """2-process DDP (gloo) on a global batch of 4 against one process taking it in 2 micro-batches of 2: rank r
    holds the r-th contiguous half, which is the r-th micro-batch, so FCOS normalizes over the same images and the
    losses, gradient norms and weights agree up to float summation order. (Taken whole by one process, the batch
    gives a step-2 loss 2e-4 away and weights 1e-3 away: FCOS's normalization differs, and these tolerances see it.)"""
    steps = ["train.batch_size=4", "train.checkpoint_every=3"]
    run(tmp_path, "single", 3, *steps, "train.grad_accum=2")
    overrides = [*TINY, f"out_dir={tmp_path / 'ddp'}", "train.steps=3", *steps, "train.parallel=ddp"]
    cmd = [*TORCHRUN_AIMV2, "detect", "train", str(ROOT / "configs/detect-tiny.yaml"), *overrides]
    r = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = [read_metrics(tmp_path / n) for n in ("single", "ddp")]
    assert len(metrics[0]) == len(metrics[1]) == 3
    for s, m in zip(*metrics, strict=True):
        for key in ("loss", "grad_norm", *LOSS_PARTS["fcos"]):
            assert m[key] == pytest.approx(s[key], rel=1e-5), (key, s, m)
    a, _ = load_detector(tmp_path / "single")
    b, _ = load_detector(tmp_path / "ddp")
    unlearnable = biases_a_channel_norm_removes(a)
    assert len(unlearnable) == 8  # FCOS's two towers: 4 x (conv, GroupNorm of one channel per group, ReLU)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        if k not in unlearnable:  # their gradient is 0 up to rounding, which AdamW scales into lr-sized steps
            torch.testing.assert_close(vb, va, rtol=1e-4, atol=3e-5, msg=k)  # ~1e-3 between 1 and 2 micro-batches


def biases_a_channel_norm_removes(model: torch.nn.Module) -> set[str]:
    """Names of conv biases followed by a GroupNorm with one channel per group: a per-channel constant the norm
    subtracts again, so their true gradient is exactly 0."""
    out = set()
    for name, seq in model.named_modules():
        if isinstance(seq, torch.nn.Sequential):
            for i, (conv, norm) in enumerate(itertools.pairwise(seq)):
                if isinstance(conv, torch.nn.Conv2d) and conv.bias is not None and isinstance(norm, torch.nn.GroupNorm):
                    if norm.num_groups == norm.num_channels:
                        out.add(f"{name}.{i}.bias")
    return out


def test_detect_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["detect", "eval", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "detector.safetensors not found" in err
    cfg = load_config("configs/detect-tiny.yaml", ["detect.encoder=x", "detect.kind=yolo"], cls=DetectionConfig)
    with pytest.raises(ValueError, match="detect.kind must be one of fcos, retinanet, faster_rcnn"):
        train_detection(cfg)


def test_segmentation_probe_learns_on_frozen_features():
    from aimv2.data.synthetic.boxes import SyntheticSegmentation
    from aimv2.eval.segmentation import SegmentationProbe, evaluate_segmentation, train_segmentation_probe

    torch.manual_seed(0)
    enc = aimv2.create_model("aimv2-tiny-patch8-64", depth=1, img_size=32)
    frozen = {k: v.clone() for k, v in enc.state_dict().items()}
    train = SyntheticSegmentation(0, 32)
    probe = train_segmentation_probe(enc, train, len(SHAPES) + 1, steps=30, batch_size=8, lr=3e-3)
    val = SyntheticSegmentation(9, 32, length=16)
    after = evaluate_segmentation(probe, val, len(SHAPES) + 1)
    untrained = evaluate_segmentation(SegmentationProbe(enc, len(SHAPES) + 1).eval(), val, len(SHAPES) + 1)
    assert after["IoU"][0] > 0.8 and after["mIoU"] > 3 * untrained["mIoU"]  # 30 steps: the background is found
    assert all(torch.equal(v, enc.state_dict()[k]) for k, v in frozen.items())
