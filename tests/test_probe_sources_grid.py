"""Probe sources (folders, webdataset shards, HF datasets), kNN against a brute-force reference, the lr x wd grid on
held-out train, the bf16 cache, augmented views and the report files; small generated images, a 2-block tiny
encoder."""

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import aimv2
import aimv2.eval.features as features_mod
from aimv2.cli import main
from aimv2.data.sources.folders import ReadError
from aimv2.data.transforms import TrainTransform, eval_transform
from aimv2.eval.datasets import (
    AugmentedViews,
    HFClassSamples,
    ShardClassSamples,
    SkippedSamplesWarning,
    open_labeled_source,
    source_kind,
)
from aimv2.eval.feature_cache import cached_features
from aimv2.eval.features import UnreadableImagesWarning, extract_features
from aimv2.eval.probe import ProbeConfig, grid_search, knn_scores, probe_features, stratified_split

MODEL = "aimv2-tiny-patch8-64"
COLOURS = {"blue": (20, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30), "yellow": (230, 220, 20)}
FAST = ["--set", "depth=2", "--img-size", "32", "--workers", "0", "--no-progress"]


def png_bytes(rgb, size):
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="PNG")
    return buf.getvalue()


def make_split(root, name, per_class, seed):
    """The same jittered solid-colour PNGs written three ways: class folders, a webdataset shard, an HF dataset.

    Returns [(png bytes, label)] in folder order (class, then file name)."""
    import datasets
    import webdataset as wds

    rng = np.random.default_rng(seed)
    records = []
    for label, (cname, rgb) in enumerate(COLOURS.items()):
        (root / name / cname).mkdir(parents=True)
        for i in range(per_class):
            colour = tuple(int(v) for v in np.clip(np.array(rgb) + rng.integers(-25, 26, 3), 0, 255))
            data = png_bytes(colour, (34 + 2 * i, 32))
            (root / name / cname / f"{i:02d}.png").write_bytes(data)
            records.append((data, label))
    with wds.TarWriter(str(root / f"{name}.tar")) as sink:
        for k, (data, label) in enumerate(records):
            meta = json.dumps({"label": list(COLOURS)[label]})
            sink.write({"__key__": f"{k:06d}", "png": data, "cls": str(label), "json": meta})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(COLOURS))})
    table = {"image": [{"bytes": d, "path": None} for d, _ in records], "label": [lab for _, lab in records]}
    datasets.Dataset.from_dict(table, features=features).save_to_disk(str(root / f"{name}_hf"))
    return records


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    make_split(root, "train", 8, seed=0)
    make_split(root, "val", 4, seed=1)
    return root


def tiny_encoder(seed=0):
    torch.manual_seed(seed)
    return aimv2.create_model(MODEL, depth=2).eval()


def last_json(text):
    return json.loads(text.strip().splitlines()[-1])


# --- probes on synthetic features ------------------------------------------------------------------------------------


def separable_tokens(n_per_class, classes=5, tokens=8, dim=24, seed=0):
    """Class c: every token is centre c plus unit noise (the same centres for every seed)."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(1234)) * 2
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = torch.randn(len(y), tokens, dim, generator=g) + centres[y][:, None]
    return x, y


def test_attentive_probe_near_perfect_on_separable_and_chance_on_shuffled():
    xt, yt = separable_tokens(20, classes=10, tokens=6, dim=16, seed=0)
    xv, yv = separable_tokens(20, classes=10, tokens=6, dim=16, seed=1)
    cfg = ProbeConfig(method="attentive", num_heads=4, epochs=20, batch_size=32, lr=3e-3, seed=0)
    res = probe_features(xt, yt, xv, yv, 10, cfg)
    assert res["top1"] >= 98.0 and res["top5"] == 100.0
    assert all(a >= 90.0 for a in res["per_class"]) and sum(map(sum, res["confusion"])) == 200
    shuffled = yt[torch.randperm(len(yt), generator=torch.Generator().manual_seed(0))]
    chance = probe_features(xt, shuffled, xv, yv, 10, cfg)
    assert chance["top1"] <= 25.0  # chance is 10%; the real labels give ~100%


def reference_knn(train_x, train_y, val_x, num_classes, k, temperature):
    """Plain Python: cosine similarity to every train sample, the k largest vote with weight exp(sim / T)."""
    out = []
    for v in val_x.tolist():
        sims = []
        for t in train_x.tolist():
            dot = sum(a * b for a, b in zip(v, t, strict=True))
            sims.append(dot / (math.sqrt(sum(a * a for a in v)) * math.sqrt(sum(b * b for b in t))))
        nearest = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        for i in nearest:
            votes[int(train_y[i])] += math.exp(sims[i] / temperature)
        out.append(votes)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("tokens", [False, True])
def test_knn_equals_brute_force_reference(tokens):
    g = torch.Generator().manual_seed(0)
    shape = (50, 3, 16) if tokens else (50, 16)
    train_x, train_y = torch.randn(*shape, generator=g), torch.randint(0, 6, (50,), generator=g)
    val_x = torch.randn(17, *shape[1:], generator=g)
    scores = knn_scores(train_x, train_y, val_x, 6, k=20, temperature=0.07, chunk=5)
    flat = (lambda t: t.mean(1)) if tokens else (lambda t: t)
    ref = reference_knn(flat(train_x), train_y, flat(val_x), 6, 20, 0.07)
    torch.testing.assert_close(scores.double(), ref, rtol=1e-4, atol=1e-6)
    assert scores.argmax(1).tolist() == ref.argmax(1).tolist()
    res = probe_features(train_x, train_y, val_x, ref.argmax(1), 6, ProbeConfig(method="knn"))
    assert res["top1"] == 100.0 and res["k"] == 20


# --- held-out split and grid -----------------------------------------------------------------------------------------


def test_stratified_split_is_disjoint_stratified_and_seeded():
    y = torch.tensor([0] * 30 + [1] * 20 + [2] * 10 + [3] * 1)
    keep, held = stratified_split(y, 0.1, seed=5)
    assert set(keep.tolist()).isdisjoint(held.tolist()) and sorted(keep.tolist() + held.tolist()) == list(range(61))
    assert torch.bincount(y[held], minlength=4).tolist() == [3, 2, 1, 0]  # a lone sample stays in train
    again, held2 = stratified_split(y, 0.1, seed=5)
    assert held2.tolist() == held.tolist() and stratified_split(y, 0.1, seed=6)[1].tolist() != held.tolist()
    with pytest.raises(ValueError, match="fraction"):
        stratified_split(y, 1.0)


def test_grid_search_picks_best_held_out_and_breaks_ties_by_lower_lr():
    xt, yt = separable_tokens(10, tokens=4, dim=8, seed=0)
    keep, held = stratified_split(yt, 0.2, seed=0)
    cfg = ProbeConfig(method="linear", epochs=3, batch_size=16)
    lines = []
    best, table = grid_search(
        xt[keep], yt[keep], xt[held], yt[held], 5, cfg, [1e-6, 1e-2, 5e-2], [0.05], log=lines.append
    )
    assert len(table) == 3 and len(lines) == 3 and "held-out top-1" in lines[0]
    top = max(r["holdout_top1"] for r in table)
    assert best["lr"] == min(r["lr"] for r in table if r["holdout_top1"] == top) and best["weight_decay"] == 0.05
    with pytest.raises(ValueError, match="knn"):
        grid_search(xt, yt, xt, yt, 5, ProbeConfig(method="knn"), [1e-3], [0.1])


def test_grid_choice_never_depends_on_val(data, tmp_path, capsys):
    """Val with garbage labels (every image moved to the next class folder): same grid, same choice."""
    garbage = tmp_path / "garbage"
    names = list(COLOURS)
    for c, name in enumerate(names):
        (garbage / names[(c + 1) % 4]).mkdir(parents=True, exist_ok=True)
        for f in (data / "val" / name).iterdir():
            (garbage / names[(c + 1) % 4] / f"{name}_{f.name}").write_bytes(f.read_bytes())
    grid = ["--grid-lr", "1e-5,3e-3", "--grid-wd", "0.05,0.1", "--holdout", "0.25", "--method", "linear"]
    common = [*FAST, "--cache-dir", str(tmp_path / "cache"), "--epochs", "8", *grid]
    reports = []
    for val in (data / "val", garbage):
        out = tmp_path / f"{val.name}.json"
        assert (
            main(["probe", MODEL, "--train", str(data / "train"), "--val", str(val), *common, "--out", str(out)]) == 0
        )
        captured = capsys.readouterr()
        assert "val unused" in captured.err and "chosen: lr" in captured.err
        reports.append((last_json(captured.out), json.loads(out.read_text())))
    (good, good_report), (bad, bad_report) = reports
    assert good_report["grid"] == bad_report["grid"] and len(good_report["grid"]) == 4
    assert (good["lr"], good["weight_decay"]) == (bad["lr"], bad["weight_decay"])
    assert good["hparams_from"] == "grid on held-out train" and good["grid_lr"] == [1e-5, 3e-3]
    assert good["top1"] == 100.0 and bad["top1"] == 0.0  # the val labels matter only for the final score


# --- sources ---------------------------------------------------------------------------------------------------------


def test_source_kind_detection_and_errors(data, tmp_path):
    assert source_kind(str(data / "train")) == "folder"
    assert source_kind(str(data / "train.tar")) == "shards" and source_kind(str(tmp_path / "x-{0..3}.tar")) == "shards"
    assert source_kind(str(data / "train_hf")) == "hf" and source_kind("a/b.parquet") == "hf"
    folder = open_labeled_source(str(data / "val"))
    reordered = open_labeled_source(str(data / "val"), classnames=["yellow", "red", "green", "blue", "cyan"])
    assert reordered.classes[:4] == list(reversed(folder.classes))  # the file's order defines the labels
    assert [reordered.classes[y] for y in reordered.labels] == [folder.classes[y] for y in folder.labels]
    with pytest.raises(ValueError, match=r"\['yellow'\] are not in the class names file"):
        open_labeled_source(str(data / "val"), classnames=["blue", "green", "red"])
    (tmp_path / "loose").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "loose" / "a.png")
    with pytest.raises(ValueError, match="no class sub-folders.*1 images.*webdataset shards"):
        source_kind(str(tmp_path / "loose"))
    with pytest.raises(FileNotFoundError, match="does not exist; expected an image folder"):
        source_kind(str(tmp_path / "nope"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"\.txt file"):
        source_kind(str(tmp_path / "notes.txt"))


def test_shard_and_hf_sources_give_the_folder_features(data):
    encoder = tiny_encoder()
    t = eval_transform(32)
    folder = open_labeled_source(str(data / "train"), t)
    shards = open_labeled_source(str(data / "train.tar"), t)
    by_name = open_labeled_source(str(data / "train.tar"), t, label_key="json:label")
    hf = open_labeled_source(str(data / "train_hf"), t)
    assert isinstance(shards, ShardClassSamples) and isinstance(hf, HFClassSamples)
    assert folder.classes == hf.classes == by_name.classes == sorted(COLOURS) and shards.classes == ["0", "1", "2", "3"]
    ref = extract_features(encoder, folder, device="cpu", batch_size=16)
    for ds in (shards, by_name, hf):
        assert len(ds) == len(folder) and ds.transform is t
        out = extract_features(encoder, ds, device="cpu", batch_size=16)
        torch.testing.assert_close(out["features"], ref["features"], rtol=0, atol=0)
        assert out["labels"].tolist() == ref["labels"].tolist()
        assert ds.fingerprint() != folder.fingerprint()


def test_parquet_and_arrow_files_and_classnames(data, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    ds = datasets.load_from_disk(str(data / "val_hf"))
    images = ds.cast_column("image", datasets.Image(decode=False))["image"]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64")})
    plain = datasets.Dataset.from_dict({"img": list(images), "label": list(ds["label"])}, features=features)
    plain.to_parquet(str(tmp_path / "val.parquet"))
    (tmp_path / "classes.txt").write_text("\n".join(COLOURS) + "\n\n")
    t = eval_transform(32)
    pq = open_labeled_source(str(tmp_path / "val.parquet"), t, image_column="img", classnames=["a", "b", "c", "d"])
    assert pq.classes == ["a", "b", "c", "d"] and len(pq) == 16 and pq[0][0].shape == (3, 32, 32)
    arrow = sorted((data / "val_hf").glob("*.arrow"))
    hf = open_labeled_source(str(arrow[0]), t)
    assert hf.classes == sorted(COLOURS) and hf.labels == pq.labels
    torch.testing.assert_close(hf[5][0], pq[5][0])
    with pytest.raises(ValueError, match=r"no column\(s\) \['image'\].*--image-column"):
        open_labeled_source(str(tmp_path / "val.parquet"), t)


def test_corrupt_and_unlabelled_shard_samples_are_counted_not_fatal(tmp_path):
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "s.tar")) as sink:
        sink.write({"__key__": "a", "png": png_bytes((1, 2, 3), (8, 8)), "cls": "1"})
        sink.write({"__key__": "b", "png": b"not a png", "cls": "0"})
        sink.write({"__key__": "c", "png": png_bytes((1, 2, 3), (8, 8))})  # no label
        sink.write({"__key__": "d", "txt": "no image", "cls": "0"})
    with pytest.warns(SkippedSamplesWarning, match=r"(?s)2 of 4 samples.*s.tar:c: no label.*s.tar:d: no image"):
        ds = ShardClassSamples(str(tmp_path / "s.tar"), eval_transform(32))
    assert len(ds) == 2 and ds.labels == [1, 0] and ds.classes == ["0", "1"]
    bad = ds[1][0]
    assert isinstance(bad, ReadError) and bad.path.endswith("s.tar:b.png")
    with pytest.warns(UnreadableImagesWarning, match="s.tar:b.png"):
        out = extract_features(tiny_encoder(), ds, device="cpu")
    assert out["features"].shape[0] == 1 and len(out["errors"]) == 1
    with pytest.warns(SkippedSamplesWarning), pytest.raises(ValueError, match="no labelled image.*--label-key"):
        ShardClassSamples(str(tmp_path / "s.tar"), label_key="json:label")


def test_cut_off_probe_shard_keeps_the_samples_before_the_cut(tmp_path):
    import tarfile

    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "full.tar")) as sink:
        for k in range(4):
            sink.write({"__key__": f"k{k}", "cls": str(k % 2), "png": png_bytes((10 * k, 0, 0), (8, 8))})
    full = (tmp_path / "full.tar").read_bytes()
    with tarfile.open(tmp_path / "full.tar") as tar:
        cut_at = tar.getmember("k3.png").offset_data + 10  # inside the last image
    (tmp_path / "cut.tar").write_bytes(full[:cut_at])
    with pytest.warns(SkippedSamplesWarning, match=r"(?s)cut.tar: truncated_shard: ReadError"):
        ds = ShardClassSamples(str(tmp_path / "cut.tar"), eval_transform(8))
    assert len(ds) == 3 and ds.labels == [0, 1, 0] and not isinstance(ds[2][0], ReadError)
    torch.testing.assert_close(ds[2][0][:, 0, 0], torch.tensor([20, 0, 0], dtype=torch.uint8))


# --- cache ------------------------------------------------------------------------------------------------------------


def count_encodes(monkeypatch):
    calls = []
    original = features_mod.encode

    def counting(encoder, pixels, *a, **kw):
        calls.append(pixels.shape[0])
        return original(encoder, pixels, *a, **kw)

    monkeypatch.setattr(features_mod, "encode", counting)
    return calls


def test_cache_bf16_store_and_shard_source(data, tmp_path, monkeypatch):
    calls = count_encodes(monkeypatch)
    encoder = tiny_encoder()
    ds = open_labeled_source(str(data / "val.tar"), eval_transform(32))
    kw = dict(cache_dir=tmp_path, device="cpu", batch_size=8)
    fp32 = cached_features(encoder, ds, **kw)
    assert not fp32["cached"] and sum(calls) == 16
    assert cached_features(encoder, ds, **kw)["cached"] and sum(calls) == 16  # no forward at all
    bf16 = cached_features(encoder, ds, store="bf16", **kw)
    assert not bf16["cached"] and bf16["features"].dtype == torch.bfloat16
    again = cached_features(encoder, ds, store="bf16", **kw)
    assert again["cached"] and again["features"].dtype == torch.bfloat16 and sum(calls) == 32
    assert bf16["cache_path"].stat().st_size < 0.6 * fp32["cache_path"].stat().st_size
    torch.testing.assert_close(bf16["features"].float(), fp32["features"], rtol=1e-2, atol=1e-2)
    res = probe_features(again["features"], again["labels"], again["features"], again["labels"], 4,
                    ProbeConfig(num_heads=3, epochs=2))  # fmt: skip
    assert 0.0 <= res["top1"] <= 100.0


def test_probe_command_reuses_cache_and_recomputes_for_new_transform(data, tmp_path, monkeypatch, capsys):
    calls = count_encodes(monkeypatch)
    (tmp_path / "classes.txt").write_text("\n".join(COLOURS) + "\n")  # names the shard's integer labels as HF's
    base = ["probe", MODEL, "--train", str(data / "train.tar"), "--val", str(data / "val_hf"), "--method", "knn"]
    common = ["--set", "depth=2", "--workers", "0", "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    common += ["--classnames", str(tmp_path / "classes.txt")]
    assert main([*base, *common, "--img-size", "32"]) == 0
    first = last_json(capsys.readouterr().out)
    assert sum(calls) == 48 and first["top1"] == 100.0 and set(first["per_class"]) == set(COLOURS)
    calls.clear()
    assert main([*base, *common, "--img-size", "32"]) == 0
    assert calls == [] and last_json(capsys.readouterr().out)["top1"] == first["top1"]  # no encoder forward
    assert main([*base, *common, "--img-size", "48"]) == 0 and sum(calls) == 48  # other size: recomputed
    calls.clear()
    assert main([*base, *common, "--img-size", "32", "--crop-pct", "0.875"]) == 0 and sum(calls) == 48
    calls.clear()
    assert main([*base, *common, "--img-size", "32", "--seed", "1"]) == 0 and sum(calls) == 48  # other weights
    calls.clear()
    assert main([*base, *common, "--img-size", "32", "--train-views", "2"]) == 0
    assert sum(calls) == 2 * 32  # cached train and val; only the augmented views ran the encoder
    out = capsys.readouterr().out
    assert "not cached" in out and last_json(out)["n_train"] == 3 * 32


# --- augmented views ------------------------------------------------------------------------------------------------


def test_augmented_views_are_seeded_and_use_the_train_transform(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    ds = open_labeled_source(str(tmp_path), eval_transform(32))
    views = AugmentedViews(ds, TrainTransform(32, scale=(0.1, 0.3)), views=2, seed=0)
    assert len(views) == 2 * len(ds) and ds.transform.__class__.__name__ == "Compose"  # the source is untouched
    a, label, index = views[len(ds) + 3]
    assert index == len(ds) + 3 and label == ds.labels[3] and a.shape == (3, 32, 32)
    torch.testing.assert_close(views[len(ds) + 3][0], a, rtol=0, atol=0)  # same seed, same view
    assert not torch.equal(AugmentedViews(ds, TrainTransform(32, scale=(0.1, 0.3)), 2, seed=1)[3][0], views[3][0])
    different = [not torch.equal(views[i][0], views[len(ds) + i][0]) for i in range(len(ds))]
    assert any(different)


def test_train_transform_upsamples_small_jpeg_crops_instead_of_failing(tmp_path):
    """A crop smaller than the output (small images, as probe sets often hold) has no draft reduction: scale 1."""
    assert TrainTransform(32).draft_scale((20, 30)) == 1
    (tmp_path / "c").mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (40, 36, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "c" / "a.jpg")
    views = AugmentedViews(open_labeled_source(str(tmp_path), eval_transform(32)), TrainTransform(32), views=8)
    assert all(views[i][0].shape == (3, 32, 32) for i in range(8))


# --- command output and errors --------------------------------------------------------------------------------------


def test_out_writes_json_report_and_png(data, tmp_path, capsys):
    out = tmp_path / "reports" / "probe.json"
    argv = ["probe", MODEL, "--train", str(data / "train"), "--val", str(data / "val.tar"), "--label-key",
            "json:label", *FAST, "--no-cache", "--epochs", "5", "--cache-dtype", "bf16", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    line = last_json(capsys.readouterr().out)
    report = json.loads(out.read_text())
    assert {k: report[k] for k in line} == line
    assert report["classes"] == sorted(COLOURS) and report["grid"] is None and line["cache_dtype"] == "bf16"
    assert np.array(report["confusion"]).shape == (4, 4) and np.array(report["confusion"]).sum() == 16
    assert set(line["per_class"]) == set(COLOURS) and line["top1"] == 100.0
    with Image.open(out.with_suffix(".png")) as png:
        assert png.format == "PNG" and png.size[0] > 200
        png.verify()


def test_probe_command_errors(data, tmp_path, capsys):
    common = ["--set", "depth=2", "--workers", "0", "--no-cache"]
    base = ["probe", MODEL, "--train", str(data / "train")]
    with pytest.raises(SystemExit) as exc:
        main([*base, "--val", str(data / "val"), "--grid-lr", "1e-3,fast", *common])
    assert exc.value.code == 2 and "--grid-lr: 'fast' is not a number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--val", str(data / "val"), "--grid-wd", "-0.1", *common])
    assert "must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--val", str(data / "val"), "--holdout", "1.5", *common])
    assert "between 0 and 1" in capsys.readouterr().err
    assert main([*base, "--val", str(data / "val"), "--method", "knn", "--grid-lr", "1e-3", *common]) == 2
    assert "knn has no lr" in capsys.readouterr().err
    # shard labels are integers "0".."3", folder classes are colour names: a clear mismatch
    assert main([*base, "--val", str(data / "val.tar"), *common]) == 2
    assert (
        "only in train: ['blue', 'green', 'red', 'yellow']; only in val: ['0', '1', '2', '3']"
        in capsys.readouterr().err
    )
    (tmp_path / "empty").mkdir()
    assert main([*base, "--val", str(tmp_path / "empty"), *common]) == 2
    assert "holds nothing" in capsys.readouterr().err
    (tmp_path / "classes.txt").write_text("\n".join(COLOURS) + "\n")
    assert main([*base, "--val", str(data / "val.tar"), "--classnames", str(tmp_path / "classes.txt"), *common,
                 "--img-size", "32", "--method", "knn"]) == 0  # fmt: skip
    assert last_json(capsys.readouterr().out)["top1"] == 100.0
