"""Inference of a frozen encoder on CPU in fp32, bf16, fp16 and int8: images/s, peak memory, and what each loses.

What it measures, for one encoder (``--encoder``: a model name, a checkpoint, a run folder or ``hf:REPO``) on a
batch of real photos (the first ``--images`` JPEGs of the CC12M shard, preprocessed by ``aimv2.preprocessing``):

- ``fp32``: the plain forward;
- ``bf16`` / ``fp16``: ``torch.autocast`` over the fp32 weights (what ``--dtype`` does in extract, probe and
  zeroshot);
- ``int8``: torchao's int8 dynamic-activation / int8-weight quantization of every linear layer
  (``aimv2.eval.quantize.quantize_int8``), ``int8-wo`` its int8 weight-only variant.

How: eval mode, ``torch.inference_mode``, PyTorch's default thread count. Every variant is warmed up, then
``--reps`` rounds; in each round every variant does one timed forward of the batch, in an order that rotates from
round to round, so that a drift in the machine's load hits all of them alike. Throughput is
``batch / median(forward time)``; ``vs fp32 (paired)`` is the median over rounds of fp32's time over the
variant's time in the same round (above 1: faster than fp32).

Quality: the cosine similarity of each variant's patch features with fp32's, per token (mean and minimum over
the batch's tokens).

Probe top-1: a linear probe (mean-pooled features, 200 epochs of batch 32) is trained once, on fp32 features of a
labelled split of the built-in scenes (``--probe-task``, default colour: 9 classes; ``--probe-train`` / ``--probe-val``
images, rendered at the encoder's size), then the same head classifies the val split's features of every variant,
computed through ``aimv2.eval.features.extract_features`` as ``extract`` and ``probe`` compute them (``--dtype``).
That is what serving a head trained in fp32 with another dtype costs: ``top1`` per variant, its difference from
fp32's, and ``agree``, the percent of val images whose predicted class is fp32's (more sensitive than top-1 on a
small split). The encoder is the one timed; by default a random init (no released weights are reachable offline,
and pretraining a base-size encoder is not cheap), so the head reads random features: colour is what they
separate well above chance, which makes a changed prediction visible.

Memory, per variant, measured in a fresh process (``--memory-only``, see ``peak_memory.py``: the measurement
needs a malloc setting that would slow the timed forwards): ``weights`` is the size of the model's state as
saved (int8 keeps about a quarter of fp32's bytes), ``forward peak`` the most one warm forward of the batch held
above what the process held before it (activations and temporaries).

    python benchmarks/inference_speed.py --out benchmarks/results/inference_speed_cpu.json
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import machine
import torch
import torch.nn.functional as F
from peak_memory import PeakMemory, measure_in_fresh_process, release_freed_memory
from PIL import Image

import aimv2
from aimv2.data.synthetic.probes import probe_classes, write_probe_splits
from aimv2.eval.datasets import open_labeled_source
from aimv2.eval.features import extract_features
from aimv2.eval.frozen_encoder import load_frozen_encoder
from aimv2.eval.probe import ProbeConfig, predict, probe_features
from aimv2.eval.quantize import quantize_int8

SHARD = Path(__file__).resolve().parents[1].parent / "shared/data/cc12m-train-0000.tar"
VARIANTS = ("fp32", "bf16", "fp16", "int8", "int8-wo")
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cc12m_batch(n: int, encoder) -> torch.Tensor:
    """The first ``n`` photos of the shard as the encoder's normalized input [n, 3, H, W]."""
    prep = aimv2.preprocessing(encoder)
    images = []
    with tarfile.open(SHARD) as tar:
        for m in tar:
            if m.name.endswith(".jpg"):
                images.append(prep(Image.open(io.BytesIO(tar.extractfile(m).read()))))
                if len(images) == n:
                    break
    return torch.stack(images)


def build(spec: str, variant: str):
    """(forward, model) for ``variant`` of the encoder ``spec``; each variant gets its own copy of the weights."""
    model = load_frozen_encoder(spec)
    if variant in ("int8", "int8-wo"):
        quantize_int8(model, "dynamic" if variant == "int8" else "weight-only")
    if variant in AUTOCAST:

        def forward(x, model=model, dtype=AUTOCAST[variant]):
            with torch.autocast("cpu", dtype=dtype):
                return model(x).float()

        return forward, model
    return model, model


def feature_dtype(variant: str) -> str:
    """The ``dtype`` of ``extract_features`` (and of ``--dtype``) that runs ``variant``'s model."""
    return "int8" if variant.startswith("int8") else variant


def probe_top1(models: dict, args) -> dict:
    """Top-1 per variant of one linear head trained on fp32 features (see the module docstring)."""
    fp32 = models["fp32"]
    prep = aimv2.preprocessing(fp32)
    kw = dict(pool="mean", mean_std=prep.mean_std, batch_size=args.images, device="cpu", progress=False)
    with tempfile.TemporaryDirectory() as d:
        write_probe_splits(d, args.probe_task, args.probe_train, args.probe_val, size=prep.img_size[0], seed=0)
        train, val = (open_labeled_source(f"{d}/{s}", prep.pil_transform()) for s in ("train", "val"))
        t0 = time.perf_counter()
        tr = extract_features(fp32, train, dtype="fp32", **kw)
        va = {v: extract_features(m, val, dtype=feature_dtype(v), **kw) for v, m in models.items()}
        seconds = time.perf_counter() - t0
    classes = len(probe_classes(args.probe_task))
    cfg = ProbeConfig(method="linear", epochs=200, batch_size=32)  # ~1000 steps: 50 epochs of 256 would be ~50
    fit = probe_features(tr["features"], tr["labels"], va["fp32"]["features"], va["fp32"]["labels"], classes, cfg,
                         keep_head=True, progress=False)  # fmt: skip
    preds = {v: predict(fit["head"], f["features"]).argmax(1) for v, f in va.items()}
    labels = va["fp32"]["labels"]
    rows = {}
    for v, pred in preds.items():
        top1 = 100.0 * (pred == labels).float().mean().item()
        agree = 100.0 * (pred == preds["fp32"]).float().mean().item()
        rows[v] = {"probe_top1": top1, "probe_top1_vs_fp32": top1 - fit["top1"], "probe_agree_fp32": agree}
    assert abs(rows["fp32"]["probe_top1"] - fit["top1"]) < 1e-9  # the head scored its own val split alike
    info = {"task": args.probe_task, "classes": classes, "n_train": len(train), "n_val": len(val),
            "chance": 100.0 / classes, "head": "linear, mean-pooled features, trained on fp32 features",
            "features_seconds": round(seconds, 1)}  # fmt: skip
    return {"rows": rows, "info": info}


def weight_mib(model: torch.nn.Module) -> float:
    """The bytes of the model's state as saved (int8 tensors count their int8 data and scales)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell() / 2**20


def measure_memory(args) -> dict:
    release_freed_memory()
    x = cc12m_batch(args.images, load_frozen_encoder(args.encoder))
    peaks = {}
    for v in VARIANTS:
        fwd, model = build(args.encoder, v)
        with torch.inference_mode():
            fwd(x)  # warm: one-time buffers are not the forward's
            with PeakMemory("cpu") as m:
                fwd(x)
        peaks[v] = {"weights_mib": weight_mib(model), "forward_peak_mib": m.mib}
        del fwd, model
        print(f"  {v}: weights {peaks[v]['weights_mib']:.0f} MiB, forward peak {m.mib} MiB", flush=True)
    return peaks


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoder", default="aimv2-base-patch14-224", help="model name, checkpoint, run or hf:REPO")
    ap.add_argument("--images", type=int, default=8, help="batch of real CC12M photos (default: 8)")
    ap.add_argument("--reps", type=int, default=3, help="timed rounds (default: 3)")
    ap.add_argument("--probe-task", default="colour", help="built-in probe task: colour, shape or count")
    ap.add_argument("--probe-train", type=int, default=135, help="probe training images (default: 135)")
    ap.add_argument("--probe-val", type=int, default=90, help="probe val images, per variant (default: 90)")
    ap.add_argument("--no-probe", action="store_true", help="skip the probe top-1 (speed, memory, cosine only)")
    ap.add_argument("--out", type=Path, help="write the results as JSON")
    ap.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_only:
        result = {"peak_memory_mib": measure_memory(args)}
        args.out.write_text(json.dumps(result))
        return result

    built = {v: build(args.encoder, v) for v in VARIANTS}
    fwds = {v: f for v, (f, _) in built.items()}
    x = cc12m_batch(args.images, load_frozen_encoder(args.encoder))
    with torch.inference_mode():
        ref = fwds["fp32"](x)
        quality = {}
        for v, f in fwds.items():  # also the warmup
            cos = F.cosine_similarity(f(x).float(), ref, dim=-1)  # [B, N]
            quality[v] = {"cos_mean": float(cos.mean()), "cos_min": float(cos.min())}
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for r in range(args.reps):
            order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
            for v in order:
                t0 = time.perf_counter()
                fwds[v](x)
                times[v].append(time.perf_counter() - t0)
            print(f"round {r + 1}/{args.reps}: " + ", ".join(f"{v} {times[v][-1]:.2f}s" for v in VARIANTS), flush=True)
    probe = None if args.no_probe else probe_top1({v: m for v, (_, m) in built.items()}, args)
    del fwds, built
    script_args = ["--encoder", args.encoder, "--images", str(args.images)]
    mems = measure_in_fresh_process(__file__, script_args) or {}
    rows = {}
    for v in VARIANTS:
        paired = statistics.median(a / b for a, b in zip(times["fp32"], times[v], strict=True))
        rows[v] = {
            "img_per_s": args.images / statistics.median(times[v]),
            "vs_fp32_paired": paired,
            **quality[v],
            **(probe["rows"][v] if probe else {}),
            **mems.get(v, {"weights_mib": None, "forward_peak_mib": None}),
            "times_s": times[v],
        }
    print(f"\n{args.encoder}, batch {args.images} CC12M photos, {torch.get_num_threads()} threads")
    print(f"{'variant':8s} {'img/s':>7s} {'vs fp32':>8s} {'cos mean':>9s} {'cos min':>8s} {'probe top1':>11s} "
          f"{'agree':>6s} {'weights MiB':>12s} {'fwd peak MiB':>13s}")  # fmt: skip
    fmt = lambda m: "-" if m is None else f"{m:.0f}"
    pct = lambda r, k: f"{r[k]:.1f}" if k in r else "-"
    for v, r in rows.items():
        print(
            f"{v:8s} {r['img_per_s']:7.2f} {r['vs_fp32_paired']:7.2f}x {r['cos_mean']:9.5f} {r['cos_min']:8.5f} "
            f"{pct(r, 'probe_top1'):>11s} {pct(r, 'probe_agree_fp32'):>6s} {fmt(r['weights_mib']):>12s} "
            f"{fmt(r['forward_peak_mib']):>13s}"
        )
    if probe:
        i = probe["info"]
        print(f"probe: {i['task']}, {i['n_train']} train / {i['n_val']} val scenes, chance {i['chance']:.1f}%")
    result = {
        "encoder": args.encoder,
        "batch": args.images,
        "reps": args.reps,
        "probe": probe["info"] if probe else None,
        "variants": rows,
        "machine": {**machine.machine_info(("torchao",)), "torch_threads": torch.get_num_threads()},
        "command": "python benchmarks/inference_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    if args.out:
        machine.write_record(args.out, result)
    return result


if __name__ == "__main__":
    main()
