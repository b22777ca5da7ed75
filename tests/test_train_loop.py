"""The training loop end to end on the built-in data: outputs, kill -9 + resume bit-identical,
2-process DDP and FSDP2 (gloo) matching single-process training, NaN handling."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN, kill9_after_checkpoint, read_metrics, subprocess_env
from safetensors.torch import load_file

import aimv2

ROOT = Path(__file__).resolve().parents[1]


def _cmd(out_dir, *extra):
    return [
        sys.executable,
        "-m",
        "aimv2",
        "pretrain",
        str(ROOT / "configs/tiny-synthetic.yaml"),
        *TINY_RUN,
        f"out_dir={out_dir}",
        *extra,
    ]


def test_outputs_and_encoder_loads(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run(
        _cmd(out, "train.steps=4", "train.checkpoint_every=2"),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    for name in ("config.yaml", "metrics.jsonl", "encoder.safetensors", "tokenizer.json"):
        assert (out / name).exists(), name
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss", "image_loss", "text_loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s"):
        assert all(key in r for r in rows), key
    assert len(list((out / "checkpoints").iterdir())) == 2  # keep_last
    enc = aimv2.create_model("aimv2-tiny-patch8-64", checkpoint=out / "encoder.safetensors", depth=2, img_size=32)
    assert enc(torch.randn(1, 3, 32, 32)).shape == (1, 16, 192)
    # re-running a finished run does nothing and keeps the outputs
    r = subprocess.run(
        _cmd(out, "train.steps=4", "train.checkpoint_every=2"),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0 and len(read_metrics(out)) == 4


def test_changed_config_on_existing_run_is_refused(tmp_path):
    out = tmp_path / "run"
    subprocess.run(
        _cmd(out, "train.steps=2", "train.checkpoint_every=2"),
        env=subprocess_env(),
        check=True,
        timeout=300,
        capture_output=True,
    )
    r = subprocess.run(
        _cmd(out, "train.steps=2", "optim.lr=0.002"), env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 2 and "different config" in r.stderr and "optim.lr" in r.stderr


@pytest.mark.slow
def test_kill9_and_resume_is_bit_identical(tmp_path):
    steps = ["train.steps=10", "train.checkpoint_every=2"]
    ref = tmp_path / "ref"
    subprocess.run(_cmd(ref, *steps), env=subprocess_env(), check=True, timeout=300, capture_output=True)

    out = tmp_path / "killed"
    for kill_after in (2, 6):  # kill twice, at different moments after a checkpoint exists
        kill9_after_checkpoint(_cmd(out, *steps), out, kill_after)
    subprocess.run(_cmd(out, *steps), env=subprocess_env(), check=True, timeout=300, capture_output=True)

    a, b = load_file(ref / "encoder.safetensors"), load_file(out / "encoder.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra, rb = read_metrics(ref), read_metrics(out)
    assert [r["step"] for r in rb] == list(range(1, 11))
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp", "grad_accum", "activation_checkpointing", "compile"])
def test_two_process_training_matches_single_process(tmp_path, parallel):
    """2-process DDP / FSDP2 (gloo), 2 accumulation micro-batches, activation checkpointing and torch.compile
    train like one eager process on the same batch."""
    steps = ["train.steps=3", "train.checkpoint_every=3"]
    single = tmp_path / "single"
    subprocess.run(_cmd(single, *steps), env=subprocess_env(), check=True, timeout=300, capture_output=True)
    multi = tmp_path / parallel
    if parallel == "grad_accum":
        cmd = _cmd(multi, *steps, "train.grad_accum=2")
    elif parallel in ("activation_checkpointing", "compile"):
        cmd = _cmd(multi, *steps, f"train.{parallel}=true")
    else:
        torchrun = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "aimv2",
            "pretrain",
        ]
        cmd = torchrun + _cmd(multi, *steps, f"train.parallel={parallel}")[4:]
    r = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    # compiled kernels fuse and reorder float ops: close, not equal up to summation order only
    rel, wtol = (1e-4, 1e-3) if parallel == "compile" else (1e-5, 1e-5)
    for s, m in zip(read_metrics(single), read_metrics(multi), strict=True):
        # the global-batch loss, not an average of per-rank means: equal up to float summation order
        for key in ("loss", "image_loss", "text_loss", "grad_norm"):
            assert m[key] == pytest.approx(s[key], rel=rel), (key, s, m)
    a, b = load_file(single / "encoder.safetensors"), load_file(multi / "encoder.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=10 * wtol, atol=wtol)


def test_nan_losses_skip_steps_then_stop_with_checkpoint_intact(tmp_path, monkeypatch):
    from aimv2.config import load_config
    from aimv2.objectives import aimv2 as pretrain
    from aimv2.train import TrainingError, train

    out = tmp_path / "nan"
    cfg = load_config(
        ROOT / "configs/tiny-synthetic.yaml",
        [*TINY_RUN, f"out_dir={out}", "train.steps=8", "train.checkpoint_every=2", "train.max_bad_steps=3"],
    )
    original = pretrain.pixel_targets
    calls = {"n": 0}

    def poisoned(images, patch_size, eps=1e-6):
        calls["n"] += 1
        t = original(images, patch_size, eps)
        return t * float("nan") if calls["n"] > 2 else t  # steps 3.. are non-finite

    monkeypatch.setattr(pretrain, "pixel_targets", poisoned)
    with pytest.raises(TrainingError, match="3 consecutive steps"):
        train(cfg)
    ck = sorted((out / "checkpoints").glob("step_*.pt"))
    assert [p.name for p in ck] == ["step_00000002.pt", "step_00000004.pt"]  # skipped steps leave weights alone
    state = torch.load(ck[-1], weights_only=True)
    assert state["skipped_steps"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_prefix_lengths_differ_across_ranks_and_workers_and_layouts_agree():
    """Each (rank, worker) stream draws its own prefixes; 2 ranks x 2 workers cover the same global batches
    (same samples, same prefixes) as 1 rank x 1 worker."""
    from torch.utils.data import DataLoader

    from aimv2.train.data import StepBatches

    def sample(index, global_index):
        return torch.full((3, 32, 32), index % 255, dtype=torch.uint8), f"caption {index}"

    def stream(rank, world, start_step=0):
        return StepBatches(
            sample,
            global_batch=16,
            rank=rank,
            world_size=world,
            start_step=start_step,
            steps=4,
            encode_text=lambda caps: torch.ones(len(caps), 4, dtype=torch.long),
            seed=0,
            length=None,
            patch_size=8,
        )

    seen = {}
    for rank in range(2):
        for b in DataLoader(stream(rank, 2), batch_size=None, num_workers=2):
            seen[(rank, b.step)] = b
    prefix_seqs = [tuple(b.prefix_len.tolist()) for b in seen.values()]
    assert len(set(prefix_seqs)) == len(prefix_seqs)  # no two (rank, worker, step) share a prefix sequence
    all_idx = torch.cat([b.indices for b in seen.values()])
    assert len(set(all_idx.tolist())) == len(all_idx) == 64  # disjoint samples
    single = {b.step: b for b in DataLoader(stream(0, 1), batch_size=None, num_workers=0)}
    for step, b in single.items():
        both = [seen[(0, step)], seen[(1, step)]]
        assert torch.equal(b.indices, torch.cat([x.indices for x in both]))
        assert torch.equal(b.prefix_len, torch.cat([x.prefix_len for x in both]))
    # resuming at step 2 gives the same batches as the uninterrupted stream
    for b in stream(0, 1, start_step=2):
        assert torch.equal(b.prefix_len, single[b.step].prefix_len) and torch.equal(b.images, single[b.step].images)


SHARD = ROOT.parent / "shared/data/cc12m-train-0000.tar"


@pytest.mark.skipif(not SHARD.exists(), reason="the shared CC12M test shard is not next to the repository")
def test_pretrain_on_real_shard_resumes_the_stream_exactly(tmp_path):
    """The same config keys train on webdataset shards; resuming from a checkpoint continues each worker's
    stream after its saved position (same batches, same weights as the uninterrupted run)."""
    import shutil

    steps = [
        "train.steps=4",
        "train.checkpoint_every=2",
        "data.source=shards",
        f"data.shards={SHARD}",
        "data.augment=true",
        "data.shuffle_buffer=8",
        "data.num_workers=2",
    ]
    ref = tmp_path / "ref"
    subprocess.run(_cmd(ref, *steps), env=subprocess_env(), check=True, timeout=300, capture_output=True)
    resumed = tmp_path / "resumed"
    shutil.copytree(ref, resumed)
    (resumed / "checkpoints" / "step_00000004.pt").unlink()  # as if killed after the step-2 checkpoint
    (resumed / "encoder.safetensors").unlink()
    state = torch.load(resumed / "checkpoints" / "step_00000002.pt", weights_only=True)
    assert sorted(state["data_position"][0]) == [0, 1]  # {worker: {source: position}}
    assert all(pos["shards"] > 0 for pos in state["data_position"][0].values())
    subprocess.run(_cmd(resumed, *steps), env=subprocess_env(), check=True, timeout=300, capture_output=True)
    a, b = load_file(ref / "encoder.safetensors"), load_file(resumed / "encoder.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["loss"] for r in read_metrics(ref)] == [r["loss"] for r in read_metrics(resumed)]
    # a different worker layout cannot continue the streams exactly: refused with the fix
    (resumed / "checkpoints" / "step_00000004.pt").unlink()
    r = subprocess.run(
        _cmd(resumed, *steps[:-1], "data.num_workers=1"),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "data.num_workers=2" in r.stderr


def test_pretrain_on_a_weighted_mixture_of_synth_shards_and_resume(tmp_path):
    """Two sources sampled 3:1, reported per source in metrics.jsonl; resume continues both streams exactly."""
    import shutil

    from aimv2.cli import main

    for name, seed in (("a", 0), ("b", 1)):
        args = ["data", "synth", str(tmp_path / name), "--n", "40", "--shard-size", "10", "--size", "32"]
        assert main([*args, "--seed", str(seed)]) == 0
    mixture = (
        f"data.mixture=[{{name: a, shards: '{tmp_path / 'a'}/{{00000..00003}}.tar', weight: 3}}, "
        f"{{name: b, shards: '{tmp_path / 'b'}', weight: 1, caption: 'json:caption'}}]"
    )
    steps = ["train.steps=4", "train.checkpoint_every=2", "data.source=shards", mixture, "data.augment=false"]
    ref = tmp_path / "ref"
    r = subprocess.run(_cmd(ref, *steps), env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_metrics(ref)
    assert all(abs(row["mix/a"] + row["mix/b"] - 1) < 1e-9 for row in rows)
    share_a = sum(row["mix/a"] for row in rows) / len(rows)
    assert 0.5 < share_a < 0.95  # 32 draws at p = 0.75
    resumed = tmp_path / "resumed"
    shutil.copytree(ref, resumed)
    (resumed / "checkpoints" / "step_00000004.pt").unlink()
    subprocess.run(_cmd(resumed, *steps), env=subprocess_env(), check=True, timeout=300, capture_output=True)
    a, b = load_file(ref / "encoder.safetensors"), load_file(resumed / "encoder.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_skipped_shard_samples_are_counted_in_metrics(tmp_path):
    """Corrupt images and missing captions in shards are skipped, and the counts by kind reach metrics.jsonl
    (summed over the DataLoader workers), so a run's data problems are visible without reading worker logs."""
    import io

    import webdataset as wds

    from aimv2.data.synthetic.dataset import synthetic_sample

    (tmp_path / "shards").mkdir()
    with wds.TarWriter(str(tmp_path / "shards" / "00000.tar")) as sink:
        for i in range(30):
            image, caption = synthetic_sample(i, 0, 32)
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            sample = {"__key__": f"{i:06d}", "png": buf.getvalue(), "txt": caption}
            if i % 10 == 3:
                sample["png"] = b"not an image"
            if i % 10 == 7:
                del sample["txt"]
            sink.write(sample)
    steps = ["train.steps=2", "data.source=shards", f"data.shards={tmp_path / 'shards'}", "data.augment=false"]
    r = subprocess.run(
        _cmd(tmp_path / "run", *steps), env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    row = read_metrics(tmp_path / "run")[-1]
    assert row["data_skipped/bad_image"] >= 1 and row["data_skipped/no_caption"] >= 1
    assert row["data_skipped"] == row["data_skipped/bad_image"] + row["data_skipped/no_caption"]
    assert "data_skipped/no_image" not in row  # kinds that did not happen are left out


def test_pretrain_on_a_captioned_image_folder(tmp_path):
    """Images with sidecar captions (one unreadable file, counted and replaced) train through data.source=folder,
    and the skip reaches metrics.jsonl as for shards."""
    from aimv2.data.synthetic.dataset import synthetic_sample

    folder = tmp_path / "pairs"
    folder.mkdir()
    for i in range(12):
        image, caption = synthetic_sample(i, size=32)
        image.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(caption)
    (folder / "005.png").write_bytes(b"not a png")
    out = tmp_path / "run"
    steps = [
        "train.steps=2",
        "train.checkpoint_every=2",
        "data.source=folder",
        f"data.folder={folder}",
        "data.augment=true",
        "data.max_fault_rate=1.0",
    ]
    r = subprocess.run(_cmd(out, *steps), env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_metrics(out)
    assert [m["step"] for m in rows] == [1, 2]
    assert rows[-1]["data_skipped"] == rows[-1]["data_skipped/bad_image"] >= 1  # the replaced file, in the metrics


def test_pretrain_on_local_hf_datasets_parquet(tmp_path):
    """A parquet table (image bytes + text, one undecodable row) trains through data.source=hf."""
    import io

    datasets = pytest.importorskip("datasets")
    from aimv2.data.synthetic.dataset import synthetic_sample

    rows = {"image": [], "text": []}
    for i in range(10):
        image, caption = synthetic_sample(i, size=32)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        rows["image"].append({"bytes": buf.getvalue(), "path": None})
        rows["text"].append(caption)
    rows["image"][3] = {"bytes": b"garbage", "path": None}
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "pairs.parquet"))
    out = tmp_path / "run"
    steps = [
        "train.steps=2",
        "train.checkpoint_every=2",
        "data.source=hf",
        f"data.hf_files={tmp_path}/*.parquet",
        "data.max_fault_rate=1.0",
    ]
    r = subprocess.run(_cmd(out, *steps), env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_metrics(out)
    assert [m["step"] for m in rows] == [1, 2]
    assert rows[-1]["data_skipped/bad_image"] >= 1

    from aimv2.data.sources.hf import HFImageText

    ds = HFImageText(str(tmp_path / "pairs.parquet"))
    assert ds.get_item(3) is None and ds.faults.counts == {"bad_image": 1}
    image, caption = ds.get_item(4)
    assert image.mode == "RGB" and caption == synthetic_sample(4, size=32)[1]


@pytest.mark.parametrize(
    "objective,dynamic,want",
    [("aimv2", False, True), ("aimv2", True, False), ("other", False, False)],
)
def test_compile_takes_the_whole_model_only_where_it_is_one_graph(monkeypatch, objective, dynamic, want):
    """train.compile on one process: the whole AIMv2 model as one graph at fixed shapes; per block at native
    resolution (shapes change every step) and for objectives that do not declare ``whole_graph``."""
    from aimv2.config import TrainConfig
    from aimv2.objectives import create_pretraining_model
    from aimv2.train import parallelize as par
    from aimv2.train.distributed import DistInfo

    calls = []
    monkeypatch.setattr(par, "apply_compile", lambda model, dynamic, whole: calls.append((dynamic, whole)))
    model = create_pretraining_model("aimv2-tiny-patch8-32", vocab_size=64, decoder_depth=1)
    if objective == "other":
        model.whole_graph = False
    assert par.parallelize(model, TrainConfig(compile=True), DistInfo(), torch.device("cpu"), dynamic) is model
    assert calls == [(dynamic, want)]


MOE_DECODER = "model.decoder={embed_dim: 64, depth: 1, num_heads: 2, mlp_hidden_dim: 128, moe: {experts: 4}}"
DISTILL = [
    "model.objective=distill",
    "model.distill.teacher=aimv2-tiny-patch8-64",  # a random teacher: the same on every rank under the seed
    "model.distill.teacher_overrides={depth: 1, img_size: 32}",
    "model.distill.aimv2=0.5",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("objective", "extra"),
    [("cappa", ["model.objective=cappa"]), ("moe", [MOE_DECODER]), ("distill", DISTILL)],
    ids=["cappa", "moe", "distill"],
)
def test_two_process_ddp_matches_single_process_for_every_objective(tmp_path, objective, extra):
    """CapPa (its parallel rows drawn per global sample), the mixture-of-experts decoder (every expert's weights in
    every backward, so DDP never waits for an unused one) and distillation (the teacher outside DDP's modules) train
    under 2-process DDP (gloo) like one process. The MoE balance loss is one value per forward (a micro-batch or a
    rank's share), averaged over them, as megablocks' is: its one-process reference runs the same two micro-batches
    of 4 (against one batch of 8 the balance loss differs from step 1 on)."""
    steps = ["train.steps=3", "train.checkpoint_every=3", *extra]
    single = tmp_path / "single"
    accum = ["train.grad_accum=2"] if objective == "moe" else []
    subprocess.run(_cmd(single, *steps, *accum), env=subprocess_env(), check=True, timeout=300, capture_output=True)
    multi = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "aimv2"]
    r = subprocess.run(
        torchrun + _cmd(multi, *steps)[3:], env=subprocess_env(), capture_output=True, text=True, timeout=400
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_metrics(single)
    keys = [k for k in rows[0] if k.endswith("_loss") or k.startswith("distill_")] + ["loss", "grad_norm"]
    assert {"balance_loss", "distill_cosine"} & set(keys) or objective == "cappa", keys
    for s, m in zip(rows, read_metrics(multi), strict=True):
        for key in keys:
            assert m[key] == pytest.approx(s[key], rel=1e-5), (key, s, m)
    a, b = load_file(single / "encoder.safetensors"), load_file(multi / "encoder.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
