"""Does training every image at its own aspect ratio help on images of other shapes? A per-image native run
(data.native.mode=per_image) against a one-grid-per-step run (mode=per_step), at equal compute, probed on held-out
scenes rendered at 1:2 and 2:1.

Both runs are configs/native-tiny.yaml scaled down to fit a few CPU minutes (the same model, seed, schedule of areas
and token budget per step, padding included: per_image spends part of its budget on padding, per_step none, so
equal compute means per_image sees slightly fewer real patches; both numbers are recorded). The probe splits are the
built-in labelled scenes (``aimv2.data.synthetic.probes``: shape and colour of the largest object, count), held out
from the captioned training stream, half rendered tall (2:1) and half wide (1:2); each run's frozen encoder is
probed with ``aimv2 probe --native`` (each image at its own grid, mean-pooled patch tokens, linear probe), and so is
the same encoder with random weights, the floor both runs should clear. Running it again with the same ``--work``
reuses the finished runs (a finished run folder trains no further) and the probe images.

    OMP_NUM_THREADS=1 python benchmarks/native_probe.py --out benchmarks/results/native_probe_cpu.json

One seed, small probe sets: differences of a point or two are within the noise (the probe's own spread across
seeds is printed by nothing here; read the result as a sanity check of the direction, not a measurement of it).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import torch
from machine import write_record

from aimv2.cli import main as cli
from aimv2.config import load_config
from aimv2.data.synthetic.probes import probe_scene
from aimv2.data.synthetic.scenes import render
from aimv2.train import train
from aimv2.train.distributed import DistInfo
from aimv2.train.native import fit_grid, native_schedule

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"tall (2:1)": (64, 32), "wide (1:2)": (32, 64)}  # (H, W) pixels: 8 x 4 and 4 x 8 patches of 8 px


def write_split(out: Path, task: str, split: str, n: int) -> None:
    """``n`` scenes of ``task``'s ``split``, alternately tall and wide, as class folders."""
    sizes = list(SHAPES.values())
    for i in range(n):
        spec, label = probe_scene(task, split, i)
        (out / split / label).mkdir(parents=True, exist_ok=True)
        render(spec, sizes[i % 2]).save(out / split / label / f"{i:05d}.png", compress_level=1)


def probe(encoder: list[str], data: Path, cache: Path) -> dict:
    args = ["probe", *encoder, "--train", str(data / "train"), "--val", str(data / "val"), "--native"]
    args += ["--max-patches", "64", "--method", "linear", "--workers", "0", "--no-progress"]
    args += ["--cache-dir", str(cache), "--device", "cpu"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli(args)
    if rc != 0:
        raise SystemExit(f"aimv2 probe failed ({rc}): {buf.getvalue()[-2000:]}")
    return json.loads(buf.getvalue().strip().splitlines()[-1])


def seen(cfg, steps: int) -> dict:
    """Images, real patches and computed image positions (padding included) of a run's ``steps`` steps, from its
    schedule (the same draws the run made)."""
    sched = native_schedule(cfg, DistInfo())
    images = real = computed = 0
    for i in range(steps):
        s = sched(i)
        images += s.batch_size
        computed += s.batch_size * s.num_patches
        if s.per_image:
            real += sum(math.prod(fit_grid(s.area, sched.image_aspect(s.start + k))) for k in range(s.batch_size))
        else:
            real += s.batch_size * s.num_patches
    return {"images_seen": images, "real_patches": real, "computed_patches": computed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--encoder-depth", type=int, default=4)
    p.add_argument("--tokens-per-batch", type=int, default=1024)
    p.add_argument("--tasks", nargs="+", default=["shape", "colour", "count"])
    p.add_argument("--n-train", type=int, default=800)
    p.add_argument("--n-val", type=int, default=400)
    p.add_argument("--work", type=Path, help="folder for the runs and probe data (default: a temporary one)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="native-probe-"))
    overrides = [
        f"model.encoder_overrides={{depth: {args.encoder_depth}}}",
        "model.decoder={embed_dim: 128, depth: 2, num_heads: 2, mlp_hidden_dim: 384}",
        f"train.steps={args.steps}",
        f"train.checkpoint_every={args.steps}",
        "train.log_every=25",
        "train.progress=false",
        "log.tensorboard=false",
        f"data.native.tokens_per_batch={args.tokens_per_batch}",
        f"optim.warmup_steps={max(1, args.steps // 6)}",
    ]
    runs, train_info = {}, {}
    for mode in ("per_image", "per_step"):
        out = work / f"run-{mode}"
        record = out / "native_probe_train.json"  # this script's record of the run (kept for a rerun on --work)
        if not record.exists():
            t0 = time.perf_counter()
            cfg = load_config(
                ROOT / "configs/native-tiny.yaml", [*overrides, f"data.native.mode={mode}", f"out_dir={out}"]
            )
            train(cfg)
            rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            info = {"seconds": time.perf_counter() - t0, **seen(load_config(out / "config.yaml"), args.steps)}
            info.update({k: rows[-1][k] for k in ("loss", "image_loss", "text_loss")})
            record.write_text(json.dumps(info))
        train_info[mode] = json.loads(record.read_text())
        runs[mode] = out
        print(f"{mode}: {train_info[mode]}", flush=True)
    results = {}
    for task in args.tasks:
        data = work / f"probe-{task}"
        if not (data / "val").exists():
            write_split(data, task, "train", args.n_train)
            write_split(data, task, "val", args.n_val)
        encoders = {mode: [str(run)] for mode, run in runs.items()}
        # the same encoder untrained: what the probe reads off random features (a floor for both runs)
        encoders["random init"] = ["aimv2-tiny-patch8-native", "--set", f"depth={args.encoder_depth}"]
        results[task] = {mode: probe(enc, data, work / "cache") for mode, enc in encoders.items()}
        print(task, {m: r["top1"] for m, r in results[task].items()}, flush=True)
    table = {task: {m: r["top1"] for m, r in res.items()} for task, res in results.items()}
    info = {
        "config": "configs/native-tiny.yaml",
        "overrides": overrides,
        "probe": {"method": "linear", "native": True, "max_patches": 64, "n_train": args.n_train, "n_val": args.n_val},
        "probe_shapes": {k: list(v) for k, v in SHAPES.items()},
        "train": train_info,
        "top1": table,
        "per_image_minus_per_step": {t: v["per_image"] - v["per_step"] for t, v in table.items()},
        "device": platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(info["top1"]), json.dumps(info["per_image_minus_per_step"]))
    if args.out:
        write_record(args.out, info)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
