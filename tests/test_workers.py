"""How many image-decoding processes the loaders start (aimv2/data/workers.py): never more than the CPUs by
default, never more than there are batches, and the features the same with workers as without."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

import aimv2
from aimv2.cli import build_parser
from aimv2.data.sources.folders import ImageFiles
from aimv2.data.transforms import eval_transform
from aimv2.data.workers import default_workers, loader_workers, usable_cpus
from aimv2.eval import features as features_module
from aimv2.eval.features import extract_features


def test_usable_cpus_is_the_affinity_mask():
    assert usable_cpus() == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("cpus", [1, 2, 3, 16])
def test_default_is_the_cap_or_the_cpus(monkeypatch, cpus):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    assert default_workers(4) == min(4, cpus)
    assert default_workers(2) == min(2, cpus)


@pytest.mark.parametrize(
    ("requested", "samples", "batch", "expected"),
    [(4, 3, 64, 1), (4, 64, 64, 1), (4, 65, 64, 2), (4, 1000, 64, 4), (0, 1000, 64, 0), (4, 0, 64, 0)],
)
def test_no_more_workers_than_batches(requested, samples, batch, expected):
    assert loader_workers(requested, samples, batch) == expected


def test_negative_workers_is_a_clear_error():
    with pytest.raises(ValueError, match="workers must be >= 0"):
        loader_workers(-1, 10, 4)


@pytest.mark.parametrize("cpus", [1, 3, 16])
def test_commands_default_to_the_usable_cpus(monkeypatch, cpus):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    parser = build_parser()
    commands = {
        "extract": (["extract", "a", "b", "c.safetensors"], 4),
        "caption": (["caption", "a", "b", "c.safetensors"], 2),
        "zeroshot": (["zeroshot", "runs/lit", "--images", "val"], 4),
    }
    for command, (argv, cap) in commands.items():
        assert parser.parse_args(argv).workers == min(cap, cpus), command


def test_extract_starts_one_worker_for_one_batch_and_matches_inline(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 44, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    ds = ImageFiles.from_folder(tmp_path, eval_transform(32))
    torch.manual_seed(0)
    encoder = aimv2.create_model("aimv2-tiny-patch8-32", depth=1).eval()
    started = []
    real_loader = features_module.DataLoader

    def recording_loader(*args, **kwargs):
        started.append(kwargs["num_workers"])
        return real_loader(*args, **kwargs)

    monkeypatch.setattr(features_module, "DataLoader", recording_loader)
    with_workers = extract_features(encoder, ds, batch_size=64, num_workers=4, device="cpu")
    inline = extract_features(encoder, ds, batch_size=64, num_workers=0, device="cpu")
    assert started == [1, 0]
    torch.testing.assert_close(with_workers["features"], inline["features"], rtol=0, atol=0)
