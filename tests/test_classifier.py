"""Saved classifiers: ``aimv2 probe ... --save PROBE`` then ``aimv2 classify PROBE IMAGES``. The reference for the
probabilities is computed another way: features by ``aimv2 extract`` (same encoder and settings) through the
saved head's tensors applied by hand."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_extract_probe import MODEL, write_class_folder

from aimv2.cli import main


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("classify")
    write_class_folder(root / "train", 8, seed=0)
    write_class_folder(root / "val", 3, seed=1)
    return root


def test_probe_save_then_classify(folders, tmp_path, capsys):
    common = ["--set", "depth=2", "--workers", "0", "--no-progress", "--blocks=-2,-1", "--crop-pct", "0.875"]
    probe = tmp_path / "probe.safetensors"
    argv = ["probe", MODEL, "--train", str(folders / "train"), "--val", str(folders / "val"), "--method", "linear"]
    assert main([*argv, *common, "--no-cache", "--epochs", "20", "--save", str(probe)]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert main(["classify", str(probe), str(folders / "val"), "--json", "--top-k", "2", "--no-progress"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 12 and all(len(r["top"]) == 2 for r in rows)
    right = [r["top"][0]["label"] == r["path"].split("/")[-2] for r in rows]
    assert 100.0 * sum(right) / len(right) == pytest.approx(metrics["top1"])  # the probe's own val score

    # reference: extract's features (mean-pooled, same blocks, crop and seed) -> BatchNorm -> linear, by hand
    feats = tmp_path / "f.npy"
    assert main(["extract", MODEL, str(folders / "val"), str(feats), "--pool", "mean", *common]) == 0
    x = torch.from_numpy(np.load(feats))
    paths = (tmp_path / "f.paths.txt").read_text().splitlines()
    sd = load_file(probe)
    x = (x - sd["head.bn.running_mean"]) / torch.sqrt(sd["head.bn.running_var"] + 1e-6)
    probs = (x @ sd["head.linear.weight"].T + sd["head.linear.bias"]).softmax(-1)  # [12, 4]
    got = {r["path"]: r["top"][0]["prob"] for r in rows}
    for rel, p in zip(paths, probs, strict=True):
        assert got[str(folders / "val" / rel)] == pytest.approx(float(p.max()), abs=1e-4)


def test_save_and_classify_errors(folders, tmp_path, capsys):
    argv = ["probe", MODEL, "--train", str(folders / "train"), "--val", str(folders / "val"), "--method", "knn"]
    assert main([*argv, "--save", str(tmp_path / "p.safetensors")]) == 2
    assert main(["classify", str(tmp_path / "missing.safetensors"), str(folders / "val")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "aimv2 probe: error: --save " + str(tmp_path / "p.safetensors") + ": knn keeps no head: use " \
        "--method linear or attentive"  # fmt: skip
    assert err[1].startswith("aimv2 classify: error: no such classifier file")
