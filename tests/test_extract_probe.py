"""Feature extraction, the feature cache, probes and the extract/probe commands, on generated image folders."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import aimv2
from aimv2.cli import main
from aimv2.data.sources.folders import ImageFiles, ReadError, list_images
from aimv2.data.transforms import eval_transform, normalize
from aimv2.eval.feature_cache import cached_features
from aimv2.eval.features import UnreadableImagesWarning, extract_features
from aimv2.eval.probe import ProbeConfig, probe_features, topk_accuracy

MODEL = "aimv2-tiny-patch8-64"
COLOURS = {"blue": (20, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30), "yellow": (230, 220, 20)}


def tiny_encoder(seed=0):
    torch.manual_seed(seed)
    return aimv2.create_model(MODEL, depth=2).eval()


def write_class_folder(root, per_class, seed):
    """Solid-colour images (jittered, varied sizes) in one sub-folder per colour."""
    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            colour = tuple(int(v) for v in np.clip(np.array(rgb) + rng.integers(-25, 26, 3), 0, 255))
            Image.new("RGB", (40 + 3 * i, 36), colour).save(root / name / f"{i:02d}.png")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    write_class_folder(root / "train", 12, seed=0)
    write_class_folder(root / "val", 6, seed=1)
    (root / "train" / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return root


def test_list_images_is_recursive_sorted_and_filtered(tmp_path):
    for rel in ["b/2.JPG", "a/z/1.png", "a/0.webp", "c.txt", ".hidden/3.png", "a/.4.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    rel = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert rel == ["a/0.webp", "a/z/1.png", "b/2.JPG"]


def test_extract_skips_corrupt_and_matches_direct_forward(folders):
    encoder = tiny_encoder()
    transform = eval_transform(64)
    ds = ImageFiles.from_class_folders(folders / "train", transform)
    assert ds.classes == sorted(COLOURS) and len(ds) == 4 * 12 + 1
    with pytest.warns(UnreadableImagesWarning, match="broken.png"):
        out = extract_features(encoder, ds, batch_size=16, device="cpu")
    feats, idx = out["features"], out["indices"]
    assert feats.shape == (48, 64, 192) and feats.dtype == torch.float32
    assert len(out["errors"]) == 1 and "broken.png" in out["errors"][0].path
    bad = next(i for i, p in enumerate(ds.paths) if p.name == "broken.png")
    assert bad not in idx.tolist() and idx.tolist() == sorted(set(range(len(ds))) - {bad})
    assert out["labels"].tolist() == [ds.labels[i] for i in idx.tolist()]
    # the same images through the encoder directly
    pixels = torch.stack([transform(Image.open(ds.paths[i])) for i in idx[:5].tolist()])
    with torch.no_grad():
        ref = encoder(normalize(pixels, "imagenet"))
    torch.testing.assert_close(feats[:5], ref)


def test_blocks_pool_and_bf16(folders):
    encoder = tiny_encoder()
    ds = ImageFiles.from_folder(folders / "val", eval_transform(64))
    last = extract_features(encoder, ds, device="cpu")["features"]
    torch.testing.assert_close(extract_features(encoder, ds, blocks=[-1], device="cpu")["features"], last)
    both = extract_features(encoder, ds, blocks=[0, 1], device="cpu")["features"]
    first = extract_features(encoder, ds, blocks=[0], device="cpu")["features"]
    torch.testing.assert_close(both, (first + last) / 2)
    pooled = extract_features(encoder, ds, pool="mean", device="cpu")["features"]
    torch.testing.assert_close(pooled, last.mean(1))
    stacked = extract_features(encoder, ds, blocks=[0, 1], block_reduce="stack", device="cpu")["features"]
    assert stacked.shape == (24, 2, 64, 192)
    bf16 = extract_features(encoder, ds, dtype="bf16", device="cpu")["features"]
    assert bf16.dtype == torch.float32 and (bf16 - last).abs().mean() < 0.05 * last.abs().mean()


def count_forwards(encoder):
    calls = []
    encoder.patch_embed.register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_feature_cache_reuse_and_invalidation(folders, tmp_path):
    encoder = tiny_encoder()
    calls = count_forwards(encoder)
    ds = ImageFiles.from_folder(folders / "val", eval_transform(64))
    kw = dict(cache_dir=tmp_path, device="cpu", batch_size=8)
    first = cached_features(encoder, ds, **kw)
    assert not first["cached"] and len(calls) == 3 and first["cache_path"].is_file()
    again = cached_features(encoder, ds, **kw)
    assert again["cached"] and len(calls) == 3  # no encoder forward at all
    torch.testing.assert_close(again["features"], first["features"], rtol=0, atol=0)
    assert again["indices"].tolist() == first["indices"].tolist()
    # a new encoder object with the same weights still hits
    same = tiny_encoder()
    assert cached_features(same, ds, **kw)["cached"]
    # other weights, other transform, other settings -> recomputed
    with torch.no_grad():
        encoder.blocks[1].mlp.fc2.weight[0, 0] += 1e-3
    assert not cached_features(encoder, ds, **kw)["cached"] and len(calls) == 6
    ds_crop = ImageFiles.from_folder(folders / "val", eval_transform(64, crop_pct=0.875))
    assert not cached_features(encoder, ds_crop, **kw)["cached"]
    assert not cached_features(encoder, ds, pool="mean", **kw)["cached"]
    assert not cached_features(encoder, ds, mean_std="clip", **kw)["cached"]
    assert cached_features(encoder, ds, **kw)["cached"]
    assert len(list(tmp_path.glob("*.safetensors"))) == 5


def test_cache_dir_from_environment(folders, tmp_path, monkeypatch):
    monkeypatch.setenv("AIMV2_CACHE", str(tmp_path))
    ds = ImageFiles.from_folder(folders / "val" / "red", eval_transform(64))
    out = cached_features(tiny_encoder(), ds, device="cpu")
    assert out["cache_path"].parent == tmp_path / "features"


def features_of(folder, encoder):
    ds = ImageFiles.from_class_folders(folder, eval_transform(64))
    with pytest.warns(UnreadableImagesWarning) if "train" in str(folder) else _nothing():
        out = extract_features(encoder, ds, device="cpu")
    return out["features"], out["labels"]


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_attentive_probe_separates_colours_and_not_shuffled_labels(folders):
    encoder = tiny_encoder()
    xt, yt = features_of(folders / "train", encoder)
    xv, yv = features_of(folders / "val", encoder)
    cfg = ProbeConfig(method="attentive", num_heads=3, epochs=30, seed=0)
    res = probe_features(xt, yt, xv, yv, len(COLOURS), cfg)
    assert res["top1"] == 100.0 and res["n_train"] == 48 and res["n_val"] == 24
    assert probe_features(xt, yt, xv, yv, len(COLOURS), cfg) == res  # deterministic given the seed
    shuffled = yt[torch.randperm(len(yt), generator=torch.Generator().manual_seed(0))]
    chance = probe_features(xt, shuffled, xv, yv, len(COLOURS), cfg)
    assert chance["top1"] <= 50.0  # chance is 25%
    for method in ("linear", "knn"):
        assert probe_features(xt, yt, xv, yv, len(COLOURS), ProbeConfig(method=method, epochs=30, k=5))["top1"] == 100.0


def test_topk_accuracy():
    scores = torch.tensor([[0.0, 1, 2, 3, 4, 5], [5.0, 4, 3, 2, 1, 0]])
    y = torch.tensor([5, 5])
    assert topk_accuracy(scores, y) == {"top1": 50.0, "top5": 50.0}
    assert topk_accuracy(scores[:, :4], torch.tensor([3, 0])) == {"top1": 100.0}


def test_extract_command_writes_safetensors_and_npy(folders, tmp_path, capsys):
    args = [MODEL, str(folders / "train"), "--set", "depth=2", "--workers", "0", "--no-progress"]
    assert main(["extract", *args[:2], str(tmp_path / "f.safetensors"), *args[2:], "--pool", "mean"]) == 0
    assert "warning: 1 of 49 images could not be read" in capsys.readouterr().err
    with safe_open(tmp_path / "f.safetensors", "pt") as f:
        feats, meta = f.get_tensor("features"), f.metadata()
    paths = json.loads(meta["paths"])
    assert feats.shape == (48, 192) and len(paths) == 48 and paths[0] == "blue/00.png"
    assert "red/broken.png" not in paths and "broken.png" in meta["skipped"]
    assert main(["extract", *args[:2], str(tmp_path / "f.npy"), *args[2:], "--pool", "mean"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "f.npy"), feats.numpy())  # same seeded random init
    assert (tmp_path / "f.paths.txt").read_text().splitlines() == paths
    assert "1 unreadable skipped" in capsys.readouterr().out
    assert main(["extract", *args[:2], str(tmp_path / "f.pt")]) == 2


def test_probe_command_last_line_is_json(folders, tmp_path, capsys):
    common = ["--set", "depth=2", "--workers", "0", "--no-progress", "--cache-dir", str(tmp_path), "--epochs", "20"]
    argv = ["probe", MODEL, "--train", str(folders / "train"), "--val", str(folders / "val"), *common]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "broken.png" in captured.err
    lines = captured.out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["method"] == "attentive" and result["top1"] == 100.0 and "top5" not in result
    assert result["n_train"] == 48 and result["n_val"] == 24 and result["num_heads"] == 3 and result["lr"] == 1e-3
    assert main(argv) == 0  # second run: features from the cache, same answer
    out = capsys.readouterr().out
    assert "cached" in out and json.loads(out.strip().splitlines()[-1])["top1"] == result["top1"]


def test_run_probe_in_process_is_the_command(folders, tmp_path, capsys):
    """`aimv2.eval.run_probe` is the whole protocol: called directly it gives the command's result, and takes a
    grid and views the same way."""
    from aimv2.eval import FeatureSettings, ProbeConfig, ProbeSettings, load_frozen_encoder, run_probe

    common = ["--set", "depth=2", "--workers", "0", "--no-progress", "--no-cache", "--epochs", "5"]
    argv = ["probe", MODEL, "--train", str(folders / "train"), "--val", str(folders / "val"), *common]
    assert main([*argv, "--grid-lr", "1e-3,2e-3", "--train-views", "1"]) == 0
    command = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    encoder = load_frozen_encoder(MODEL, overrides={"depth": 2})
    settings = ProbeSettings(FeatureSettings(num_workers=0), use_cache=False, grid_lr=[1e-3, 2e-3], train_views=1)
    lines = []
    with pytest.warns(UnreadableImagesWarning):
        result = run_probe(encoder, str(folders / "train"), str(folders / "val"), ProbeConfig(epochs=5), settings,
                           progress=False, log=lines.append)  # fmt: skip
    assert result.top1 == command["top1"] and result.metrics["per_class"] == command["per_class"]
    assert result.metrics["lr"] == command["lr"] and result.metrics["num_heads"] == 3
    assert result.classes == sorted(COLOURS) and len(result.grid) == 2 and any("chosen" in x for x in lines)
    report = result.report()
    assert report["confusion"] == result.confusion and sum(map(sum, report["confusion"])) == 24


def test_probe_command_clear_errors(folders, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    val = tmp_path / "val"
    write_class_folder(val, 1, seed=2)
    (val / "purple").mkdir()
    Image.new("RGB", (8, 8), (128, 0, 128)).save(val / "purple" / "0.png")
    common = ["--set", "depth=2", "--workers", "0", "--no-cache"]
    assert main(["probe", MODEL, "--train", str(tmp_path / "empty"), "--val", str(val), *common]) == 2
    assert "no class sub-folders" in capsys.readouterr().err
    assert main(["probe", MODEL, "--train", str(folders / "train"), "--val", str(val), *common]) == 2
    assert "only in val: ['purple']" in capsys.readouterr().err
    (tmp_path / "empty" / "cat").mkdir()
    assert main(["probe", MODEL, "--train", str(tmp_path / "empty"), "--val", str(val), *common]) == 2
    assert "no images" in capsys.readouterr().err


def test_truncated_jpeg_is_a_read_error_not_a_crash(tmp_path):
    Image.new("RGB", (64, 64), (10, 120, 30)).save(tmp_path / "ok.jpg", quality=90)
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    ds = ImageFiles.from_folder(tmp_path, eval_transform(32))
    cut, _, index = ds[0]
    assert ds.paths[0].name == "cut.jpg" and index == 0
    assert isinstance(cut, ReadError) and "cut.jpg" in cut.path and "truncated" in cut.error.lower()
    assert ds[1][0].shape == (3, 32, 32)
