"""Training throughput at native resolution vs fixed resolution, at the same image-token budget per step.

Fixed: every step is the full grid (max_patches) and batch tokens_per_batch // max_patches. Native: the steps of
``aimv2.train.native.NativeSchedule`` (area 2^n patches, truncated-normal n, one aspect ratio per step, batch
tokens_per_batch // patches). Both run full optimizer steps (forward, backward, clip, AdamW) of the same model on
uint8 batches normalized as in training, interleaved (one fixed step, one native step, ...) so that load on a
shared machine affects both alike. Printed: image tokens/s and all tokens/s (image patches + caption tokens, as
the trainer's ``tokens_per_s``), model FLOP/s (``aimv2.train.metrics.flops_per_sample``, as the trainer's MFU
counts them) and peak memory of each, and native / fixed ratios.

How to read the ratios. At an equal image-token budget the two modes do different amounts of work per image
token, by the recipe and not by the implementation: a native step at a small area holds more images, hence more
captions for the decoder, and one at a large area pays attention quadratic in its patches. So:

- ``model FLOP/s`` is the cost of the variable shapes themselves (kernels at odd sizes, recompiles, the loader):
  the work done per second. The issue's target (>= 0.9x) is about this: "the variable shapes must not cost much".
- ``image tokens/s`` is what the budget buys: the FLOP/s ratio times the ratio of work per image token (fixed /
  native FLOPs per image token, printed), which is what the image tokens/s ratio would be at equal FLOP/s.
- ``all tokens/s`` counts captions too (the trainer's ``tokens_per_s``).

Peak memory (the most a step needed above what was held before it: activations, gradients, temporaries) is measured
after the timing, in a fresh process running this script with ``--memory-only`` (see ``peak_memory.py``): for
native, the largest over the timed steps' shapes.

``--compile`` compiles each block as ``train.compile=true`` does (native: symbolic shapes, one graph for every
(B, N); fixed: static) and reports how many graphs dynamo compiled for each mode.

    python benchmarks/native_speed.py --out benchmarks/results/native_speed_cpu.json   # native-tiny's model, CPU
    python benchmarks/native_speed.py --encoder aimv2-tiny-patch14-native --min-patches 128 --max-patches 4096 \
        --fixed-patches 256 --tokens-per-batch 8192 --batch-multiple 1 --text-len 77   # the paper's geometry
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from peak_memory import PeakMemory, fmt_mib, max_mib, measure_in_fresh_process, release_freed_memory

from aimv2.config import OptimConfig
from aimv2.data.transforms import normalize
from aimv2.objectives import create_pretraining_model
from aimv2.train.metrics import flops_per_sample
from aimv2.train.native import NativeSchedule
from aimv2.train.optim import build_optimizer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _batch(B: int, gh: int, gw: int, p: int, text_len: int, vocab: int, gen: torch.Generator):
    images = torch.randint(0, 256, (B, 3, gh * p, gw * p), dtype=torch.uint8, generator=gen)
    text = torch.randint(3, vocab, (B, text_len), generator=gen)
    prefix = torch.randint(1, gh * gw, (B,), generator=gen)
    return images, text, prefix


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="aimv2-tiny-patch8-native")
    p.add_argument("--encoder-depth", type=int, default=6)
    p.add_argument("--decoder", default="192,3,3,512", help="decoder width,depth,heads,mlp (default: native-tiny's)")
    p.add_argument("--vocab", type=int, default=521)
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--min-patches", type=int, default=16)
    p.add_argument("--max-patches", type=int, default=64)
    p.add_argument("--tokens-per-batch", type=int, default=2048)
    p.add_argument(
        "--fixed-patches",
        type=int,
        help="patches of the fixed-resolution run, a square number (default: max-patches, native-tiny's 64 px model; "
        "the paper's fixed 224 px run has 256 patches against native areas of 128 to 4096)",
    )
    p.add_argument("--batch-multiple", type=int, default=8)
    p.add_argument("--steps", type=int, default=12, help="timed steps of each mode")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true")
    p.add_argument(
        "--static-native",
        action="store_true",
        help="--compile: compile the native model with static shapes too (to count the recompiles it would cost)",
    )
    p.add_argument("--out", type=Path)
    p.add_argument("--memory-only", action="store_true", help="only measure each mode's peak memory per step")
    args = p.parse_args()
    if args.memory_only:
        release_freed_memory()  # before anything allocates, so that RSS follows the live tensors

    device = torch.device(args.device)
    w, d, h, m = (int(x) for x in args.decoder.split(","))
    overrides = dict(
        depth=args.encoder_depth, decoder_embed_dim=w, decoder_depth=d, decoder_num_heads=h, decoder_mlp_hidden_dim=m
    )
    models = {}
    for mode in ("fixed", "native"):
        torch.manual_seed(0)
        model = create_pretraining_model(
            args.encoder, vocab_size=args.vocab, decoder_max_text_len=args.text_len, **overrides
        ).to(device)
        if args.compile:
            from aimv2.train.parallelize import apply_compile

            apply_compile(model, dynamic=mode == "native" and not args.static_native)
        models[mode] = (model, build_optimizer(model, OptimConfig()))
    ps = models["fixed"][0].encoder.cfg.patch_size
    sched = NativeSchedule(
        seed=0,
        min_patches=args.min_patches,
        max_patches=args.max_patches,
        tokens_per_batch=args.tokens_per_batch,
        batch_multiple=args.batch_multiple,
    )
    fixed_patches = args.fixed_patches or args.max_patches
    side = int(fixed_patches**0.5)
    fixed_grid = (side, fixed_patches // side)
    fixed_B = args.tokens_per_batch // (fixed_grid[0] * fixed_grid[1]) // args.batch_multiple * args.batch_multiple
    gen = torch.Generator().manual_seed(0)

    def step(mode: str, i: int) -> tuple[float, int, int, float]:
        if mode == "fixed":
            B, (gh, gw) = fixed_B, fixed_grid
        else:
            s = sched(i)
            B, (gh, gw) = s.batch_size, s.grid
        images, text, prefix = _batch(B, gh, gw, ps, args.text_len, args.vocab, gen)
        model, opt = models[mode]
        _sync(device)
        t0 = time.perf_counter()
        x = normalize(images, "imagenet", device)
        out = model(x, text.to(device), prefix_len=prefix.to(device))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        return (
            time.perf_counter() - t0,
            B * gh * gw,
            B * args.text_len,
            B * flops_per_sample(model, gh * gw, args.text_len),
        )

    if args.memory_only:
        peak = {}
        for mode in ("fixed", "native"):
            step(mode, 10_000)  # the optimizer state exists before the measured steps, as in training
            measured = []
            for i in range(args.steps if mode == "native" else 2):
                with PeakMemory(device) as mem:
                    step(mode, i)
                measured.append(mem.mib)
            peak[mode] = max_mib(measured)
        print("peak memory per step: " + ", ".join(f"{k} {fmt_mib(v)}" for k, v in peak.items()), flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"peak_memory_mib": peak}) + "\n")
        return

    graphs, warm_graphs = {}, {}
    for mode in ("fixed", "native"):
        before = _graph_count()
        for i in range(args.warmup):
            step(mode, 10_000 + i)  # warmup steps come from elsewhere in the schedule
        warm_graphs[mode] = _graph_count() - before
        graphs[mode] = 0
    totals = {mode: [0.0, 0, 0, 0.0] for mode in ("fixed", "native")}  # seconds, image tokens, text tokens, FLOPs
    for i in range(args.steps):
        for mode in ("fixed", "native") if i % 2 == 0 else ("native", "fixed"):
            before = _graph_count()
            for k, v in enumerate(step(mode, i)):
                totals[mode][k] += v
            graphs[mode] += _graph_count() - before
    shapes = [sched(i) for i in range(args.steps)] + [sched(10_000 + i) for i in range(args.warmup)]
    results = {
        mode: {
            "seconds": t[0],
            "image_tokens_per_s": t[1] / t[0],
            "tokens_per_s": (t[1] + t[2]) / t[0],
            "samples_per_s": t[2] / args.text_len / t[0],
            "model_tflops": t[3] / t[0] / 1e12,
            "flops_per_image_token": t[3] / t[1],
            "graphs_in_warmup": warm_graphs[mode] if args.compile else None,
            "graphs_in_timed_steps": graphs[mode] if args.compile else None,  # their compile time is in "seconds"
            "distinct_shapes": len({(s.batch_size, s.grid) for s in shapes}) if mode == "native" else 1,
        }
        for mode, t in totals.items()
    }
    shapes = shapes[: args.steps]
    ratio_img = results["native"]["image_tokens_per_s"] / results["fixed"]["image_tokens_per_s"]
    ratio_all = results["native"]["tokens_per_s"] / results["fixed"]["tokens_per_s"]
    ratio_flops = results["native"]["model_tflops"] / results["fixed"]["model_tflops"]
    work = results["fixed"]["flops_per_image_token"] / results["native"]["flops_per_image_token"]
    paper_work = paper_scale_work_ratio()
    measured = measure_in_fresh_process(__file__, sys.argv[1:]) or {}
    peak = {mode: measured.get(mode) for mode in ("fixed", "native")}
    info = {
        "encoder": args.encoder,
        "overrides": overrides,
        "text_len": args.text_len,
        "native": {
            "min_patches": args.min_patches,
            "max_patches": args.max_patches,
            "tokens_per_batch": args.tokens_per_batch,
            "batch_multiple": args.batch_multiple,
            "steps": [[s.grid[0], s.grid[1], s.batch_size] for s in shapes],
        },
        "fixed": {"grid": list(fixed_grid), "batch_size": fixed_B},
        "steps": args.steps,
        "compile": args.compile,
        "static_native": args.static_native,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "results": results,
        "native_over_fixed": {"image_tokens_per_s": ratio_img, "tokens_per_s": ratio_all},
        "ratios": {
            "native/fixed model FLOP/s": ratio_flops,
            "native/fixed image tokens/s": ratio_img,
            "fixed/native work per image token": work,
            "fixed/native work per image token, AIMv2-L at the paper's geometry (counted)": paper_work,
            "native/fixed all tokens/s": ratio_all,
            **(
                {"fixed/native peak memory": peak["fixed"] / peak["native"]} if peak["fixed"] and peak["native"] else {}
            ),
        },
        "peak_memory_mib": peak,
    }
    print(
        f"{args.encoder} {overrides}; budget {args.tokens_per_batch} image tokens/step; fixed {fixed_grid} x "
        f"{fixed_B}; native areas {args.min_patches}-{args.max_patches}; device {info['device']}, "
        f"{info['threads']} threads, compile={args.compile}"
    )
    print(
        f"{'mode':>6} | {'image tok/s':>11} | {'all tok/s':>9} | {'samples/s':>9} | {'TFLOP/s':>7} | "
        f"{'GFLOP/img tok':>13} | graphs warmup+timed | shapes"
    )
    for mode, r in results.items():
        print(
            f"{mode:>6} | {r['image_tokens_per_s']:11.0f} | {r['tokens_per_s']:9.0f} | {r['samples_per_s']:9.1f} | "
            f"{r['model_tflops']:7.4f} | {r['flops_per_image_token'] / 1e9:13.4f} | "
            f"{r['graphs_in_warmup']}+{r['graphs_in_timed_steps']} | {r['distinct_shapes']}"
        )
    print(
        f"native/fixed: model FLOP/s {ratio_flops:.2f}x (the cost of variable shapes; target >= 0.9x); image tokens/s "
        f"{ratio_img:.2f}x = {ratio_flops:.2f} x {work:.2f}, the second factor being the recipe's extra work per image "
        f"token (fixed/native FLOPs per image token: what equal FLOP/s would give); all tokens/s {ratio_all:.2f}x"
    )
    print(f"peak memory per step: fixed {fmt_mib(peak['fixed'])}, native {fmt_mib(peak['native'])} (largest shape)")
    print(
        f"for scale: AIMv2-L with the paper's decoder at the paper's geometry (fixed 256 patches, native 128-4096, "
        f"77-token captions) has fixed/native FLOPs per image token {paper_work:.2f} (counted, not timed)"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(info, indent=2) + "\n")
        print(f"wrote {args.out}")


def paper_scale_work_ratio(steps: int = 2000) -> float:
    """Fixed / native FLOPs per image token for AIMv2-L with the paper's decoder (32k vocabulary, 77-token
    captions) at the paper's geometry (fixed 224 px = 256 patches; native areas 128 to 4096, budget 32 x 8192
    tokens): what equal FLOP/s would give as the image-tokens/s ratio at full scale. Counted, not timed."""
    with torch.device("meta"):
        model = create_pretraining_model("aimv2-large-patch14-native", vocab_size=32000, decoder_max_text_len=77)
    sched = NativeSchedule(seed=0, min_patches=128, max_patches=4096, tokens_per_batch=32 * 8192, batch_multiple=8)
    flops = tokens = 0.0
    for i in range(steps):
        s = sched(i)
        flops += s.batch_size * flops_per_sample(model, s.num_patches, 77)
        tokens += s.batch_size * s.num_patches
    return flops_per_sample(model, 256, 77) / 256 / (flops / tokens)


def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


if __name__ == "__main__":
    main()
