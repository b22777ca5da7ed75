"""Training-step throughput and MFU of the AIMv2 objective (encoder + decoder, forward + backward + AdamW).

What it measures: samples/s of full optimizer steps on a fixed model and batch, for each precision asked,
interleaved (one step of each precision in turn) so that load on a shared machine affects all alike.

MFU = achieved FLOP/s / peak FLOP/s, with the model FLOPs counted as in training (3x the forward matmuls
and attention, ``aimv2.train.metrics.flops_per_sample``). The peak is the datasheet's dense peak on known
GPUs; on a CPU, where no datasheet number applies, it is the best large-matmul FLOP/s measured in this run
for the same dtype ("MFU vs measured matmul peak"), so the ratio says how close the step is to what the
machine's matmul kernels can do.

    python benchmarks/train_speed.py                        # tiny-synthetic model, batch 64, fp32 and bf16, CPU
    python benchmarks/train_speed.py --encoder aimv2-large-patch14-224 --batch-size 32 --device cuda \\
        --precisions bf16 --compile                         # the paper's ViT-L + decoder on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from aimv2.models import create_pretraining_model
from aimv2.train.config import OptimConfig
from aimv2.train.metrics import flops_per_sample, peak_flops
from aimv2.train.optim import build_optimizer


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="aimv2-tiny-patch8-64")
    p.add_argument("--encoder-depth", type=int, default=6, help="encoder depth override (default 6, the demo's)")
    p.add_argument("--decoder", default="192,3,3,512", help="decoder width,depth,heads,mlp (default: the demo's)")
    p.add_argument("--paper-decoder", action="store_true", help="the paper's 1024 x 12 decoder, full encoder depth")
    p.add_argument("--vocab", type=int, default=521, help="vocabulary size (default: the built-in tokenizer's)")
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=6, help="timed steps per precision")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile each block (as train.compile=true)")
    p.add_argument("--out", type=Path, help="write the results as JSON")
    args = p.parse_args()

    device = torch.device(args.device)
    overrides: dict = {}
    if not args.paper_decoder:
        w, d, h, m = (int(x) for x in args.decoder.split(","))
        overrides = dict(
            depth=args.encoder_depth,
            decoder_embed_dim=w,
            decoder_depth=d,
            decoder_num_heads=h,
            decoder_mlp_hidden_dim=m,
        )
    torch.manual_seed(0)
    model = create_pretraining_model(
        args.encoder, vocab_size=args.vocab, decoder_max_text_len=args.text_len, **overrides
    ).to(device)
    if args.compile:
        from aimv2.train.parallelize import apply_compile

        apply_compile(model)
    opt = build_optimizer(model, OptimConfig())
    enc = model.encoder.cfg
    n_patches = enc.grid_size[0] * enc.grid_size[1]
    B = args.batch_size
    images = torch.randn(B, 3, *enc.image_hw, device=device)
    text = torch.randint(3, args.vocab, (B, args.text_len), device=device)
    prefix = torch.randint(1, n_patches, (B,), device=device)
    flops = flops_per_sample(model, n_patches, args.text_len)

    def step(precision: str) -> float:
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(images, text, prefix_len=prefix)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - t0

    precisions = args.precisions.split(",")
    for prec in precisions:  # warmup (and compilation)
        step(prec), step(prec)
    times: dict[str, list[float]] = {p_: [] for p_ in precisions}
    for _ in range(args.steps):
        for prec in precisions:
            times[prec].append(step(prec))

    results = {}
    for prec in precisions:
        dt = statistics.median(times[prec])
        sps = B / dt
        peak = peak_flops(device, bf16=prec == "bf16")
        peak_kind = "datasheet"
        if peak is None:
            peak = matmul_peak(device, torch.bfloat16 if prec == "bf16" else torch.float32)
            peak_kind = "measured matmul"
        results[prec] = {
            "step_s": dt,
            "samples_per_s": sps,
            "tflops": sps * flops / 1e12,
            "peak_tflops": peak / 1e12,
            "peak_kind": peak_kind,
            "mfu": sps * flops / peak,
        }
    info = {
        "encoder": args.encoder,
        "overrides": overrides,
        "batch_size": B,
        "text_len": args.text_len,
        "vocab": args.vocab,
        "compile": args.compile,
        "gflops_per_sample": flops / 1e9,
        "params_m": sum(p_.numel() for p_ in model.parameters()) / 1e6,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "results": results,
    }
    print(
        f"{args.encoder} {overrides or '(paper decoder)'} batch {B}, {info['params_m']:.1f}M params, "
        f"{info['gflops_per_sample']:.2f} GFLOP/sample (train), device {info['device']}, {info['threads']} threads"
    )
    print(f"{'precision':>9} | {'step s':>7} | {'samples/s':>9} | {'TFLOP/s':>7} | {'peak':>7} | {'MFU':>6}")
    for prec, r in results.items():
        print(
            f"{prec:>9} | {r['step_s']:7.3f} | {r['samples_per_s']:9.1f} | {r['tflops']:7.3f} | "
            f"{r['peak_tflops']:7.3f} | {100 * r['mfu']:5.1f}%  ({r['peak_kind']} peak)"
        )
    if len(precisions) == 2:
        a, b = precisions
        print(f"{b}/{a} throughput ratio: {results[b]['samples_per_s'] / results[a]['samples_per_s']:.2f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(info, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
