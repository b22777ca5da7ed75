"""Training-step throughput, MFU and peak memory of the AIMv2 objective, ours against a straightforward baseline.

What it measures: samples/s of full optimizer steps (forward, backward, gradient clipping, AdamW) on a fixed model
and batch, for each precision asked (``fp32``; ``bf16`` is autocast over fp32 weights), of

- ``ours``: ``aimv2.models.create_pretraining_model`` and ``aimv2.train.optim.build_optimizer``, as the trainer runs
  (on the CPU with freed host memory kept, ``aimv2.train.host_memory``, which the baseline then shares);
- ``baseline``: the same architecture, weights and loss computed the plain way (``baseline_model.py``: attention as
  ``softmax(q k^T / sqrt(d) + mask) v`` with a materialized additive mask, RMSNorm and cross-entropy written out,
  AdamW's per-parameter loop), so the ratio says what our way of computing buys.

Before timing, both compute the loss and gradients of the same batch; the script prints the largest differences
and stops if they exceed the tolerance, so the two are known to compute the same function. The timed steps
interleave every (model, precision) variant in a rotating order, so load from other jobs hits all alike.

MFU = achieved FLOP/s / peak FLOP/s, with the model FLOPs counted as in training (3x the forward matmuls and
attention, ``aimv2.train.metrics.flops_per_sample``), the same count for both models. The peak is the datasheet's
dense peak on known GPUs; on a CPU, where no datasheet number applies, it is the best large-matmul FLOP/s measured
in this run for the same dtype ("MFU vs measured matmul peak"), so the ratio says how close the step is to what
the machine's matmul kernels can do. Peak memory is the most a step needed above what was held before it
(activations, gradients, temporaries; not weights or optimizer state), measured after the timing in a fresh
process running this script with ``--memory-only`` (one warmup and one measured step per variant), because on CPU
the measurement needs a malloc setting that would slow the timed steps (see ``peak_memory.py``).

    python benchmarks/train_speed.py                        # tiny-synthetic model, batch 64, fp32 and bf16, CPU
    python benchmarks/train_speed.py --encoder aimv2-large-patch14-224 --batch-size 32 --device cuda \\
        --precisions bf16 --compile                         # the paper's ViT-L + decoder on a GPU
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from baseline_model import plain_copy, plain_optimizer
from machine import PRECISIONS_HELP, resolve_precisions, write_record
from peak_memory import PeakMemory, fmt_mib, measure_in_fresh_process, release_freed_memory

from aimv2.config import OptimConfig
from aimv2.models.attention import BACKENDS, set_attention_backend
from aimv2.objectives import create_pretraining_model
from aimv2.train.grad_clip import clip_gradients
from aimv2.train.host_memory import keep_freed_host_memory
from aimv2.train.metrics import flops_per_sample, peak_flops
from aimv2.train.optim import build_optimizer

# |baseline - ours| allowed before timing, relative to max(1, |loss|) and to the largest gradient entry
TOLERANCE = {"fp32": {"loss": 1e-5, "grad": 1e-4}, "bf16": {"loss": 5e-3, "grad": 5e-2}}


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


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def check_same_function(models: dict, batch: tuple, precisions: list[str], device: torch.device) -> dict:
    """Loss and gradients of every model on one batch against ours: max |difference| per precision (no step)."""
    report = {}
    for prec in precisions:
        losses, grads = {}, {}
        for name, (model, _opt, loss_fn) in models.items():
            with _autocast(device, prec):
                loss = loss_fn(*batch)
            loss.backward()
            losses[name] = loss.item()
            grads[name] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
            model.zero_grad(set_to_none=True)
        g_max = max(g.abs().max().item() for g in grads["ours"].values())
        for name in models:
            if name == "ours":
                continue
            d_loss = abs(losses[name] - losses["ours"])
            d_grad = max((grads[name][n] - g).abs().max().item() for n, g in grads["ours"].items())
            report[f"{name} {prec}"] = dict(loss=losses["ours"], max_abs_diff_loss=d_loss, max_abs_diff_grad=d_grad)
            print(
                f"  {prec} {name} vs ours: loss {losses['ours']:.6f}, max |diff| loss {d_loss:.2e}, "
                f"gradients {d_grad:.2e} (largest gradient {g_max:.2e})",
                flush=True,
            )
            tol = TOLERANCE.get(prec, TOLERANCE["bf16"])
            if d_loss > tol["loss"] * max(1.0, abs(losses["ours"])) or d_grad > tol["grad"] * g_max:
                raise SystemExit(f"{name} does not compute the same function as ours in {prec} (tolerance {tol})")
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="aimv2-tiny-patch8-64")
    p.add_argument("--encoder-depth", type=int, default=6, help="encoder depth override (default 6, the demo's)")
    p.add_argument("--decoder", default="192,3,3,512", help="decoder width,depth,heads,mlp (default: the demo's)")
    p.add_argument("--paper-decoder", action="store_true", help="the paper's 1024 x 12 decoder, full encoder depth")
    p.add_argument("--vocab", type=int, default=521, help="vocabulary size (default: the built-in tokenizer's)")
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant (model x precision)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    p.add_argument("--precisions", help=PRECISIONS_HELP)
    p.add_argument("--no-baseline", action="store_true", help="time ours only")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="compile both whole (train.compile on 1 process)")
    p.add_argument("--attention", default="auto", choices=BACKENDS, help="ours' attention backend (as train.attention)")
    p.add_argument(
        "--activation-checkpointing", action="store_true", help="checkpoint each block of ours (as in training)"
    )
    p.add_argument("--out", type=Path, help="write the results as JSON")
    p.add_argument(
        "--profile", type=Path, help="instead of timing: torch.profiler over one step of each variant, tables to here"
    )
    p.add_argument("--memory-only", action="store_true", help="only measure each variant's peak memory (no timing)")
    args = p.parse_args()
    device = torch.device(args.device)
    host_memory = "not the CPU"
    if args.memory_only:
        release_freed_memory()  # before anything is allocated, so that RSS follows the live tensors
    elif device.type == "cpu":  # as the trainer does on the CPU (both models share this process, hence it)
        host_memory = keep_freed_host_memory() or "kept (keep_freed_host_memory)"
    set_attention_backend(args.attention)
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
    model.predictions_keep_grad = False  # as the trainer runs it: only the loss terms are read
    models = {"ours": (model, build_optimizer(model, OptimConfig()), lambda x, t, m: model(x, t, prefix_len=m).loss)}
    if not args.no_baseline:
        base = plain_copy(model)  # before compile: the same weights, names unchanged
        models["baseline"] = (base, plain_optimizer(base, OptimConfig()), base)
    if args.activation_checkpointing:
        from aimv2.train.parallelize import apply_activation_checkpointing

        apply_activation_checkpointing(model)
    if args.compile:
        from aimv2.train.parallelize import apply_compile

        for m_, _, _ in models.values():
            apply_compile(m_, whole=True)  # as the trainer compiles on one process
    enc = model.encoder.cfg
    n_patches = enc.grid_size[0] * enc.grid_size[1]
    B = args.batch_size
    images = torch.randn(B, 3, *enc.image_hw, device=device)
    text = torch.randint(3, args.vocab, (B, args.text_len), device=device)
    text[: B // 2, -args.text_len // 4 :] = 0  # half the captions end in padding, as short captions do
    prefix = torch.randint(1, n_patches, (B,), device=device)
    batch = (images, text, prefix)
    flops = flops_per_sample(model, n_patches, args.text_len)
    precisions = resolve_precisions(args.precisions, device.type)

    variants = [(name, prec) for prec in precisions for name in models]
    if args.profile:
        return profile_steps(models, variants, batch, device, args.profile)
    if args.memory_only:
        return write_memory(args.out, {f"{n} {p_}": step_memory(models, (n, p_), batch, device) for n, p_ in variants})

    print(f"{args.encoder} {overrides or '(paper decoder)'} batch {B}, device {device}", flush=True)
    check = check_same_function(models, batch, precisions, device) if len(models) > 1 else {}

    for v in variants:  # warmup (optimizer state, compilation)
        for _ in range(args.warmup):
            train_step(models, v, batch, device)
    times: dict = {v: [] for v in variants}
    for r in range(args.steps):
        for v in variants[r % len(variants) :] + variants[: r % len(variants)]:  # rotate: no variant always first
            times[v].append(train_step(models, v, batch, device))
        print(f"  step {r + 1}/{args.steps}: " + "  ".join(f"{n} {p_} {times[(n, p_)][-1]:.3f}s" for n, p_ in variants))

    measured = measure_in_fresh_process(__file__, [*sys.argv[1:], "--precisions", ",".join(precisions)]) or {}
    mems = {v: measured.get(f"{v[0]} {v[1]}") for v in variants}
    peaks = {}
    for prec in precisions:
        peak = peak_flops(device, bf16=prec == "bf16")
        peaks[prec] = (peak, "datasheet") if peak else (matmul_peak(device, _dtype(prec)), "measured matmul")
    results: dict = {name: {} for name in models}
    for name, prec in variants:
        dt = statistics.median(times[(name, prec)])
        sps = B / dt
        peak, kind = peaks[prec]
        results[name][prec] = {
            "step_s": dt,
            "step_s_all": times[(name, prec)],
            "samples_per_s": sps,
            "tflops": sps * flops / 1e12,
            "peak_tflops": peak / 1e12,
            "peak_kind": kind,
            "mfu": sps * flops / peak,
            "peak_memory_mib": mems[(name, prec)],
        }
    ratios, headline = {}, {}
    for prec in precisions:
        o = results["ours"][prec]
        headline[f"ours {prec} samples/s"] = o["samples_per_s"]
        headline[f"ours {prec} MFU % ({o['peak_kind']} peak)"] = 100 * o["mfu"]
        if "baseline" in results:
            b = results["baseline"][prec]
            headline[f"baseline {prec} MFU % ({b['peak_kind']} peak)"] = 100 * b["mfu"]
            ratios[f"ours/baseline {prec} samples/s"] = o["samples_per_s"] / b["samples_per_s"]
            paired = [tb / to for to, tb in zip(o["step_s_all"], b["step_s_all"], strict=True)]
            ratios[f"ours/baseline {prec} samples/s, paired"] = statistics.median(paired)
            if o["peak_memory_mib"] and b["peak_memory_mib"] is not None:
                ratios[f"baseline/ours {prec} peak memory"] = b["peak_memory_mib"] / o["peak_memory_mib"]
    if len(precisions) == 2:
        a, b_ = precisions
        ratios[f"ours {b_}/{a} samples/s"] = results["ours"][b_]["samples_per_s"] / results["ours"][a]["samples_per_s"]

    info = {
        "encoder": args.encoder,
        "overrides": overrides,
        "batch_size": B,
        "text_len": args.text_len,
        "vocab": args.vocab,
        "compile": args.compile,
        "attention": args.attention,
        "activation_checkpointing": args.activation_checkpointing,
        "host_memory": host_memory,
        "command": "python benchmarks/train_speed.py " + " ".join(sys.argv[1:]),
        "steps": args.steps,
        "warmup": args.warmup,
        "gflops_per_sample": flops / 1e9,
        "params_m": sum(p_.numel() for p_ in model.parameters()) / 1e6,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "same_function_check": check,
        "results": results,
        "ratios": ratios,
        "peak_memory_mib": {f"{n} {p_}": results[n][p_]["peak_memory_mib"] for n, p_ in variants},
        "headline": headline,
    }
    print(
        f"{args.encoder} {overrides or '(paper decoder)'} batch {B}, {info['params_m']:.1f}M params, "
        f"{info['gflops_per_sample']:.2f} GFLOP/sample (train), device {info['device']}, {info['threads']} threads"
    )
    head = f"{'model':>8} {'precision':>9} | {'step s':>7} | {'samples/s':>9} | {'TFLOP/s':>7} | {'peak':>7} |"
    print(f"{head} {'MFU':>6}")
    for name, prec in variants:
        r = results[name][prec]
        print(
            f"{name:>8} {prec:>9} | {r['step_s']:7.3f} | {r['samples_per_s']:9.1f} | {r['tflops']:7.3f} | "
            f"{r['peak_tflops']:7.3f} | {100 * r['mfu']:5.1f}%  ({r['peak_kind']} peak), "
            f"peak memory {fmt_mib(r['peak_memory_mib'])}"
        )
    print("ratios (above 1: ours is faster / needs less):")
    for k, v in ratios.items():
        print(f"  {k}: {v:.2f}x")
    if args.out:
        write_record(args.out, info)
        print(f"wrote {args.out}")


def train_step(models: dict, variant: tuple[str, str], batch: tuple, device: torch.device) -> float:
    """One full optimizer step of ``variant`` (model name, precision); returns its seconds."""
    name, precision = variant
    model, opt, loss_fn = models[name]
    _sync(device)
    t0 = time.perf_counter()
    with _autocast(device, precision):
        loss = loss_fn(*batch)
    loss.backward()
    if name == "ours":  # as the trainer clips (train/grad_clip.py); the baseline the plain way, torch's
        clip_gradients(model, 1.0)
    else:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    _sync(device)
    return time.perf_counter() - t0


def profile_steps(models: dict, variants: list, batch: tuple, device: torch.device, out: Path) -> None:
    """One profiled step per variant after a warmup step: the ops by self time, printed and written to ``out``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    text = []
    for v in variants:
        train_step(models, v, batch, device)
        with profile(activities=activities) as prof:
            train_step(models, v, batch, device)
        table = prof.key_averages().table(sort_by=sort, row_limit=20)
        text.append(f"== {v[0]} {v[1]}\n{table}")
        print(text[-1], flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(text))


def step_memory(models: dict, variant: tuple[str, str], batch: tuple, device: torch.device) -> float | None:
    """Peak MiB of one step of ``variant`` after a warmup step (which creates the optimizer state)."""
    train_step(models, variant, batch, device)
    with PeakMemory(device) as m:
        train_step(models, variant, batch, device)
    print(f"  peak memory {variant[0]} {variant[1]}: {fmt_mib(m.mib)}", flush=True)
    return m.mib


def write_memory(out: Path | None, mems: dict) -> None:
    """The ``--memory-only`` result: ``{"peak_memory_mib": {variant: MiB}}``."""
    if out:
        write_record(out, {"peak_memory_mib": mems})


def _dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


if __name__ == "__main__":
    main()
