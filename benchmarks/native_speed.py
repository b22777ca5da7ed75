"""Training throughput at native resolution vs fixed resolution, at the same image-token budget per step.

Three modes, each a full optimizer step (forward, backward, clip, AdamW) of the same model on uint8 batches
normalized as in training, interleaved (one step of each, in rotating order) so that load on a shared machine
affects all alike:

    fixed      every step the full grid (max_patches), batch tokens_per_batch // max_patches
    per_step   ``NativeSchedule(mode="per_step")``: area 2^n patches (truncated-normal n), one aspect ratio and one
               grid per step, batch tokens_per_batch // (gh * gw): dense, no padding ("native" in earlier results)
    per_image  ``NativeSchedule(mode="per_image")``: the same areas, every image at the grid of its own aspect ratio
               (drawn per image as for the built-in scenes), patch tokens padded to the area, batch
               tokens_per_batch // area: the budget counts the padding, which is computed and masked

Printed: image tokens/s (real patches only: padding is not an image token) and all tokens/s (+ caption tokens, as
the trainer's ``tokens_per_s``), the padding fraction (padding / all computed image positions), model FLOP/s
(``aimv2.train.metrics.flops_per_sample`` at the computed length, as the trainer's MFU counts them) and peak memory
of each, and the ratios to fixed. The padding fraction is also counted (not timed) over 2000 steps at the paper's
areas (128 to 4096), for the choice of padding over packing in ``aimv2/train/native.py``.

How to read the ratios. At an equal image-token budget the two modes do different amounts of work per image
token, by the recipe and not by the implementation: a native step at a small area holds more images, hence more
captions for the decoder, and one at a large area pays attention quadratic in its patches. So:

- ``model FLOP/s`` is the cost of the variable shapes themselves (kernels at odd sizes, recompiles, the loader):
  the work done per second. The issue's target (>= 0.9x) is about this: "the variable shapes must not cost much".
- ``image tokens/s`` is what the budget buys: the FLOP/s ratio times the ratio of work per image token (fixed /
  native FLOPs per image token, printed), which is what the image tokens/s ratio would be at equal FLOP/s. For
  per_image that work includes the padding, which is computed but is no image token.
- ``all tokens/s`` counts captions too (the trainer's ``tokens_per_s``).

Peak memory (the most a step needed above what was held before it: activations, gradients, temporaries) is measured
after the timing, in a fresh process running this script with ``--memory-only`` (see ``peak_memory.py``): for
per_step and per_image, the largest over the timed steps' shapes.

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
from machine import write_record
from peak_memory import PeakMemory, fmt_mib, max_mib, measure_in_fresh_process, release_freed_memory

from aimv2.config import OptimConfig
from aimv2.data.transforms import normalize
from aimv2.objectives import create_pretraining_model
from aimv2.train.grad_clip import clip_gradients
from aimv2.train.metrics import flops_per_sample
from aimv2.train.native import NativeSchedule, fit_grid
from aimv2.train.optim import build_optimizer

MODES = ("fixed", "per_step", "per_image")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _batch(B: int, gh: int, gw: int, p: int, text_len: int, vocab: int, gen: torch.Generator):
    images = torch.randint(0, 256, (B, 3, gh * p, gw * p), dtype=torch.uint8, generator=gen)
    text = torch.randint(3, vocab, (B, text_len), generator=gen)
    prefix = torch.randint(1, gh * gw, (B,), generator=gen)
    return images, text, prefix, None


def _grids(sched: NativeSchedule, step: int) -> torch.Tensor:
    """Per-image grids of a per_image step: long [B_s, 2], each image's aspect drawn by its global index."""
    s = sched(step)
    return torch.tensor([fit_grid(s.area, sched.image_aspect(s.start + k)) for k in range(s.batch_size)])


def _token_batch(grids: torch.Tensor, area: int, p: int, text_len: int, vocab: int, gen: torch.Generator):
    """Patch tokens uint8 [B, area, p*p*3] (image b's own patches, zeros after), text, prefixes in [1, n_b - 1]."""
    B, n = len(grids), grids.prod(1)
    tokens = torch.randint(0, 256, (B, area, p * p * 3), dtype=torch.uint8, generator=gen)
    tokens[torch.arange(area)[None, :] >= n[:, None]] = 0
    text = torch.randint(3, vocab, (B, text_len), generator=gen)
    prefix = 1 + (torch.rand(B, generator=gen) * (n - 1)).long()
    return tokens, text, prefix, grids


def padding_fraction(sched: NativeSchedule, steps: int) -> float:
    """Padding / all image positions over ``steps`` per_image steps (counted, not timed)."""
    real = total = 0
    for i in range(steps):
        s, g = sched(i), _grids(sched, i)
        real, total = real + int(g.prod(1).sum()), total + s.batch_size * s.area
    return 1 - real / total


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
    for mode in MODES:
        torch.manual_seed(0)
        model = create_pretraining_model(
            args.encoder, vocab_size=args.vocab, decoder_max_text_len=args.text_len, **overrides
        ).to(device)
        model.predictions_keep_grad = False  # as the trainer runs it: only the loss terms are read
        if args.compile:
            from aimv2.train.parallelize import apply_compile

            apply_compile(model, dynamic=mode != "fixed" and not args.static_native)
        models[mode] = (model, build_optimizer(model, OptimConfig()))
    ps = models["fixed"][0].encoder.cfg.patch_size
    geometry = dict(
        min_patches=args.min_patches,
        max_patches=args.max_patches,
        tokens_per_batch=args.tokens_per_batch,
        batch_multiple=args.batch_multiple,
    )
    sched = NativeSchedule(seed=0, mode="per_step", **geometry)
    per_image = NativeSchedule(seed=0, mode="per_image", **geometry)
    fixed_patches = args.fixed_patches or args.max_patches
    side = int(fixed_patches**0.5)
    fixed_grid = (side, fixed_patches // side)
    fixed_B = args.tokens_per_batch // (fixed_grid[0] * fixed_grid[1]) // args.batch_multiple * args.batch_multiple
    gen = torch.Generator().manual_seed(0)

    def step(mode: str, i: int) -> tuple[float, int, int, float, int]:
        """(seconds, real image tokens, text tokens, FLOPs, computed image positions) of one optimizer step."""
        if mode == "per_image":
            area = per_image(i).area
            images, text, prefix, grids = _token_batch(_grids(per_image, i), area, ps, args.text_len, args.vocab, gen)
            B, length, real = len(grids), area, int(grids.prod(1).sum())
        else:
            B, (gh, gw) = (fixed_B, fixed_grid) if mode == "fixed" else (sched(i).batch_size, sched(i).grid)
            images, text, prefix, grids = _batch(B, gh, gw, ps, args.text_len, args.vocab, gen)
            length = real = gh * gw
            real *= B
        model, opt = models[mode]
        _sync(device)
        t0 = time.perf_counter()
        x = normalize(images, "imagenet", device)
        out = model(x, text.to(device), prefix.to(device), None if grids is None else grids.to(device))
        out.loss.backward()
        clip_gradients(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        flops = B * flops_per_sample(model, length, args.text_len)
        return time.perf_counter() - t0, real, B * args.text_len, flops, B * length

    if args.memory_only:
        peak = {}
        for mode in MODES:
            step(mode, 10_000)  # the optimizer state exists before the measured steps, as in training
            measured = []
            for i in range(args.steps if mode != "fixed" else 2):
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
    for mode in MODES:
        before = _graph_count()
        for i in range(args.warmup):
            step(mode, 10_000 + i)  # warmup steps come from elsewhere in the schedule
        warm_graphs[mode] = _graph_count() - before
        graphs[mode] = 0
    # seconds, real image tokens, text tokens, FLOPs, computed image positions
    totals = {mode: [0.0, 0, 0, 0.0, 0] for mode in MODES}
    for i in range(args.steps):
        for mode in MODES[i % 3 :] + MODES[: i % 3]:  # rotating order
            before = _graph_count()
            for k, v in enumerate(step(mode, i)):
                totals[mode][k] += v
            graphs[mode] += _graph_count() - before
    steps = [*range(args.steps), *(10_000 + i for i in range(args.warmup))]
    distinct = {
        "fixed": 1,
        "per_step": len({(sched(i).batch_size, sched(i).grid) for i in steps}),
        "per_image": len({(per_image(i).batch_size, per_image(i).area) for i in steps}),  # (B, A): the tensor shape
    }
    results = {
        mode: {
            "seconds": t[0],
            "image_tokens_per_s": t[1] / t[0],
            "tokens_per_s": (t[1] + t[2]) / t[0],
            "samples_per_s": t[2] / args.text_len / t[0],
            "padding_fraction": 1 - t[1] / t[4],
            "model_tflops": t[3] / t[0] / 1e12,
            "flops_per_image_token": t[3] / t[1],
            "graphs_in_warmup": warm_graphs[mode] if args.compile else None,
            "graphs_in_timed_steps": graphs[mode] if args.compile else None,  # their compile time is in "seconds"
            "distinct_shapes": distinct[mode],
        }
        for mode, t in totals.items()
    }
    fixed = results["fixed"]
    ratios = {}
    for mode in ("per_step", "per_image"):
        r = results[mode]
        ratios[f"{mode}/fixed model FLOP/s"] = r["model_tflops"] / fixed["model_tflops"]
        ratios[f"{mode}/fixed image tokens/s"] = r["image_tokens_per_s"] / fixed["image_tokens_per_s"]
        ratios[f"fixed/{mode} work per image token"] = fixed["flops_per_image_token"] / r["flops_per_image_token"]
        ratios[f"{mode}/fixed all tokens/s"] = r["tokens_per_s"] / fixed["tokens_per_s"]
    ratios["per_image/per_step image tokens/s"] = (
        results["per_image"]["image_tokens_per_s"] / results["per_step"]["image_tokens_per_s"]
    )
    paper_work = paper_scale_work_ratio()
    ratios["fixed/per_step work per image token, AIMv2-L at the paper's geometry (counted)"] = paper_work
    paper = dict(min_patches=128, max_patches=4096, tokens_per_batch=32 * 8192, batch_multiple=8, mode="per_image")
    pad_counted = {
        "this geometry": padding_fraction(per_image, 2000),
        "paper geometry (128-4096 patches)": padding_fraction(NativeSchedule(seed=0, **paper), 2000),
    }
    measured = measure_in_fresh_process(__file__, sys.argv[1:]) or {}
    peak = {mode: measured.get(mode) for mode in MODES}
    for mode in ("per_step", "per_image"):
        if peak["fixed"] and peak[mode]:
            ratios[f"fixed/{mode} peak memory"] = peak["fixed"] / peak[mode]
    info = {
        "encoder": args.encoder,
        "overrides": overrides,
        "text_len": args.text_len,
        "native": {
            **geometry,
            "per_step_steps": [[sched(i).grid[0], sched(i).grid[1], sched(i).batch_size] for i in range(args.steps)],
            "per_image_steps": [[per_image(i).area, per_image(i).batch_size] for i in range(args.steps)],
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
        "padding_fraction_counted": pad_counted,
        "ratios": ratios,
        "peak_memory_mib": peak,
    }
    print(
        f"{args.encoder} {overrides}; budget {args.tokens_per_batch} image tokens/step; fixed {fixed_grid} x "
        f"{fixed_B}; native areas {args.min_patches}-{args.max_patches}; device {info['device']}, "
        f"{info['threads']} threads, compile={args.compile}"
    )
    print(
        f"{'mode':>9} | {'image tok/s':>11} | {'all tok/s':>9} | {'samples/s':>9} | {'padding':>7} | {'TFLOP/s':>7} | "
        f"{'GFLOP/img tok':>13} | graphs warmup+timed | shapes | peak memory"
    )
    for mode, r in results.items():
        print(
            f"{mode:>9} | {r['image_tokens_per_s']:11.0f} | {r['tokens_per_s']:9.0f} | {r['samples_per_s']:9.1f} | "
            f"{r['padding_fraction']:7.1%} | {r['model_tflops']:7.4f} | {r['flops_per_image_token'] / 1e9:13.4f} | "
            f"{r['graphs_in_warmup']}+{r['graphs_in_timed_steps']} | {r['distinct_shapes']} | {fmt_mib(peak[mode])}"
        )
    for mode in ("per_step", "per_image"):
        f, i, w = (ratios[f"{mode}/fixed {k}"] for k in ("model FLOP/s", "image tokens/s", "all tokens/s"))
        work = ratios[f"fixed/{mode} work per image token"]
        print(
            f"{mode}/fixed: model FLOP/s {f:.2f}x (the cost of variable shapes); image tokens/s {i:.2f}x = "
            f"{f:.2f} x {work:.2f} (the second factor: the recipe's work per image token, padding included); "
            f"all tokens/s {w:.2f}x"
        )
    print(f"per_image/per_step image tokens/s {ratios['per_image/per_step image tokens/s']:.2f}x")
    print(
        "padding fraction, counted over 2000 per_image steps: "
        + ", ".join(f"{k} {v:.1%}" for k, v in pad_counted.items())
    )
    print(
        f"for scale: AIMv2-L with the paper's decoder at the paper's geometry (fixed 256 patches, native 128-4096, "
        f"77-token captions) has fixed/per_step FLOPs per image token {paper_work:.2f} (counted, not timed)"
    )
    if args.out:
        write_record(args.out, info)
        print(f"wrote {args.out}")


def paper_scale_work_ratio(steps: int = 2000) -> float:
    """Fixed / native FLOPs per image token for AIMv2-L with the paper's decoder (32k vocabulary, 77-token
    captions) at the paper's geometry (fixed 224 px = 256 patches; native areas 128 to 4096, budget 32 x 8192
    tokens): what equal FLOP/s would give as the image-tokens/s ratio at full scale. Counted, not timed."""
    with torch.device("meta"):
        model = create_pretraining_model("aimv2-large-patch14-native", vocab_size=32000, decoder_max_text_len=77)
    sched = NativeSchedule(seed=0, min_patches=128, max_patches=4096, tokens_per_batch=32 * 8192, batch_multiple=8)
    # per_step: gh * gw patches per image, no padding
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
