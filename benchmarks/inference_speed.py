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
import time
from pathlib import Path

import machine
import torch
import torch.nn.functional as F
from peak_memory import PeakMemory, measure_in_fresh_process, release_freed_memory
from PIL import Image

import aimv2
from aimv2.eval.frozen_encoder import load_frozen_encoder
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


@torch.inference_mode()
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoder", default="aimv2-base-patch14-224", help="model name, checkpoint, run or hf:REPO")
    ap.add_argument("--images", type=int, default=8, help="batch of real CC12M photos (default: 8)")
    ap.add_argument("--reps", type=int, default=3, help="timed rounds (default: 3)")
    ap.add_argument("--out", type=Path, help="write the results as JSON")
    ap.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_only:
        result = {"peak_memory_mib": measure_memory(args)}
        args.out.write_text(json.dumps(result))
        return result

    fwds = {v: build(args.encoder, v)[0] for v in VARIANTS}
    x = cc12m_batch(args.images, load_frozen_encoder(args.encoder))
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
    del fwds
    script_args = ["--encoder", args.encoder, "--images", str(args.images)]
    mems = measure_in_fresh_process(__file__, script_args) or {}
    rows = {}
    for v in VARIANTS:
        paired = statistics.median(a / b for a, b in zip(times["fp32"], times[v], strict=True))
        rows[v] = {
            "img_per_s": args.images / statistics.median(times[v]),
            "vs_fp32_paired": paired,
            **quality[v],
            **mems.get(v, {"weights_mib": None, "forward_peak_mib": None}),
            "times_s": times[v],
        }
    print(f"\n{args.encoder}, batch {args.images} CC12M photos, {torch.get_num_threads()} threads")
    print(f"{'variant':8s} {'img/s':>7s} {'vs fp32':>8s} {'cos mean':>9s} {'cos min':>8s} {'weights MiB':>12s} "
          f"{'fwd peak MiB':>13s}")  # fmt: skip
    fmt = lambda m: "-" if m is None else f"{m:.0f}"
    for v, r in rows.items():
        print(
            f"{v:8s} {r['img_per_s']:7.2f} {r['vs_fp32_paired']:7.2f}x {r['cos_mean']:9.5f} {r['cos_min']:8.5f} "
            f"{fmt(r['weights_mib']):>12s} {fmt(r['forward_peak_mib']):>13s}"
        )
    result = {
        "encoder": args.encoder,
        "batch": args.images,
        "reps": args.reps,
        "variants": rows,
        "machine": {**machine.machine_info(("torchao",)), "torch_threads": torch.get_num_threads()},
        "command": "python benchmarks/inference_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
