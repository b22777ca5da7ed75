"""Training throughput at native resolution vs fixed resolution, at the same image-token budget per step.

Fixed: every step is the full grid (max_patches) and batch tokens_per_batch // max_patches. Native: the steps of
``aimv2.train.native.NativeSchedule`` (area 2^n patches, truncated-normal n, one aspect ratio per step, batch
tokens_per_batch // patches). Both run full optimizer steps (forward, backward, clip, AdamW) of the same model on
uint8 batches normalized as in training, interleaved (one fixed step, one native step, ...) so that load on a
shared machine affects both alike. Printed: image tokens/s and all tokens/s (image patches + caption tokens, as
the trainer's ``tokens_per_s``) of each, and native / fixed ratios. Caption tokens per image are the same in
both, so native steps with small areas carry more captions per step: the "all tokens" ratio is the cost per
token processed, the "image tokens" ratio what the budget buys.

``--compile`` compiles each block as ``train.compile=true`` does (native: symbolic shapes, one graph for every
(B, N); fixed: static) and reports how many graphs dynamo compiled for each mode.

    python benchmarks/native_speed.py --out benchmarks/results/native_speed_cpu.json   # native-tiny's model, CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from aimv2.data.transforms import normalize
from aimv2.models import create_pretraining_model
from aimv2.train.config import OptimConfig
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
    args = p.parse_args()

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
    side = int(args.max_patches**0.5)
    fixed_grid = (side, args.max_patches // side)
    fixed_B = args.tokens_per_batch // (fixed_grid[0] * fixed_grid[1]) // args.batch_multiple * args.batch_multiple
    gen = torch.Generator().manual_seed(0)

    def step(mode: str, i: int) -> tuple[float, int, int]:
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
        return time.perf_counter() - t0, B * gh * gw, B * args.text_len

    graphs, warm_graphs = {}, {}
    for mode in ("fixed", "native"):
        before = _graph_count()
        for i in range(args.warmup):
            step(mode, 10_000 + i)  # warmup steps come from elsewhere in the schedule
        warm_graphs[mode] = _graph_count() - before
        graphs[mode] = 0
    totals = {mode: [0.0, 0, 0] for mode in ("fixed", "native")}
    for i in range(args.steps):
        for mode in ("fixed", "native") if i % 2 == 0 else ("native", "fixed"):
            before = _graph_count()
            dt, img, txt = step(mode, i)
            graphs[mode] += _graph_count() - before
            t = totals[mode]
            t[0], t[1], t[2] = t[0] + dt, t[1] + img, t[2] + txt
    shapes = [sched(i) for i in range(args.steps)] + [sched(10_000 + i) for i in range(args.warmup)]
    results = {
        mode: {
            "seconds": t[0],
            "image_tokens_per_s": t[1] / t[0],
            "tokens_per_s": (t[1] + t[2]) / t[0],
            "samples_per_s": t[2] / args.text_len / t[0],
            "graphs_in_warmup": warm_graphs[mode] if args.compile else None,
            "graphs_in_timed_steps": graphs[mode] if args.compile else None,  # their compile time is in "seconds"
            "distinct_shapes": len({(s.batch_size, s.grid) for s in shapes}) if mode == "native" else 1,
        }
        for mode, t in totals.items()
    }
    shapes = shapes[: args.steps]
    ratio_img = results["native"]["image_tokens_per_s"] / results["fixed"]["image_tokens_per_s"]
    ratio_all = results["native"]["tokens_per_s"] / results["fixed"]["tokens_per_s"]
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
    }
    print(
        f"{args.encoder} {overrides}; budget {args.tokens_per_batch} image tokens/step; fixed {fixed_grid} x "
        f"{fixed_B}; native areas {args.min_patches}-{args.max_patches}; device {info['device']}, "
        f"{info['threads']} threads, compile={args.compile}"
    )
    print(f"{'mode':>6} | {'image tok/s':>11} | {'all tok/s':>9} | {'samples/s':>9} | graphs warmup+timed | shapes")
    for mode, r in results.items():
        print(
            f"{mode:>6} | {r['image_tokens_per_s']:11.0f} | {r['tokens_per_s']:9.0f} | {r['samples_per_s']:9.1f} | "
            f"{r['graphs_in_warmup']}+{r['graphs_in_timed_steps']} | {r['distinct_shapes']}"
        )
    print(f"native/fixed: image tokens/s {ratio_img:.2f}x, all tokens/s {ratio_all:.2f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(info, indent=2) + "\n")
        print(f"wrote {args.out}")


def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


if __name__ == "__main__":
    main()
