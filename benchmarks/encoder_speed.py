"""Inference throughput of our AIMv2 encoder against timm's and transformers' implementations.

What it measures: images per second of one forward pass (patch features after the final norm) of

- ``ours``: ``aimv2.models.registry.build_encoder(model)``,
- ``timm``: ``timm.create_model("aimv2_large_patch14_224")`` (``forward_features``),
- ``hf``: ``transformers.Aimv2VisionModel`` with ``attn_implementation="sdpa"`` (``last_hidden_state``),
- ``ours+compile`` (with ``--compile``): ``torch.compile`` of ours, mostly of interest on a GPU,

all holding the same random weights: ours are saved in Apple's layout with ``aimv2.weights.save_encoder``
and loaded into timm through its ``checkpoint_filter_fn``, and exported with ``aimv2.weights.export_hf``
for transformers. Before timing, the fp32 outputs of the others are compared with ours (``max_abs_diff``) so
the numbers are known to come from the same function.

How: eval mode and ``torch.inference_mode``, the same input batch for every model, PyTorch's default thread
count. Each precision (``fp32``; ``bf16`` is ``torch.autocast`` with bfloat16 over fp32 weights) first warms
every model up, then runs ``--reps`` rounds; in each round every model does one timed forward, in an order
that rotates from round to round, so a drift in machine load hits all models alike. Throughput is
``batch_size / median(forward time)``.

How to read it: the table gives the median img/s per model and precision, with the best and worst round in
brackets, then the ratios ``ours/timm`` and ``ours/hf`` (above 1: ours is faster) three ways: of the medians,
paired (median over rounds of the two models' time ratio within a round) and of the best rounds. On a shared
machine absolute numbers drift from run to run and a single slow round can move a median; the ratios,
measured interleaved, are the meaningful part, and when the three disagree the load was uneven.

Peak memory: the most one forward needed above what was held before it (activations and temporaries, not the
weights), per model and precision, measured after the timing in a fresh process running this script with
``--memory-only`` (one warmup and one measured forward each), because on CPU the measurement needs a malloc
setting that would slow the timed forwards (see ``peak_memory.py``).

``--out`` writes all of it, with every single timing and the machine (CPU model, core count, library versions),
to a JSON file; its ``ratios`` and ``peak_memory_mib`` are what ``run_all.py`` summarizes.

    python benchmarks/encoder_speed.py --reps 5 --out benchmarks/results/encoder_speed_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import machine
import torch
from peak_memory import PeakMemory, fmt_mib, measure_in_fresh_process, release_freed_memory

from aimv2.models.registry import build_encoder, model_size, parse_model_name
from aimv2.weights import export_hf, save_encoder

Forward = Callable[[torch.Tensor], torch.Tensor]
LABELS = {"hf": "transformers"}  # how ratio names spell a model


# ------------------------------------------------------------------------------------------ machine
def machine_info(device: torch.device) -> dict:
    info = machine.machine_info(("timm", "transformers"))
    info.update(
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        torch=torch.__version__,
        mkldnn=torch.backends.mkldnn.is_available(),
        device=str(device),
    )
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ------------------------------------------------------------------------------------------ models
def timm_name(name: str) -> str:
    """``aimv2-large-patch14-224`` -> ``aimv2_large_patch14_224`` (timm's name for the same model)."""
    cfg = parse_model_name(name)
    return f"aimv2_{model_size(name).lower()}_patch{cfg.patch_size}_{cfg.image_hw[0]}"


def build_models(name: str, device: torch.device, want_compile: bool) -> tuple[dict[str, Forward], dict[str, str]]:
    """The forward functions to time, keyed by model label, and a note for each model that was skipped."""
    torch.manual_seed(0)
    ours = build_encoder(name).eval()
    models: dict[str, Forward] = {"ours": ours}
    modules = [ours]
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_encoder(ours, Path(tmp) / "model.safetensors", layout="apple")
        try:
            import timm
            from safetensors.torch import load_file
            from timm.models.vision_transformer import checkpoint_filter_fn

            tname = timm_name(name)
            if not timm.is_model(tname):
                raise LookupError(f"timm has no model {tname}")
            tm = timm.create_model(tname, pretrained=False, num_classes=0)
            tm.load_state_dict(checkpoint_filter_fn(load_file(ckpt), tm), strict=True)
            models["timm"] = tm.eval().forward_features
            modules.append(tm)
        except (ImportError, LookupError) as e:
            skipped["timm"] = str(e)
        try:
            from transformers import Aimv2VisionModel

            hf = Aimv2VisionModel.from_pretrained(
                export_hf(ours, Path(tmp) / "hf"), attn_implementation="sdpa", dtype=torch.float32
            )
            hf.eval()
            models["hf"] = lambda x, hf=hf: hf(pixel_values=x).last_hidden_state
            modules.append(hf)
        except ImportError as e:
            skipped["hf"] = str(e)
    for m in modules:
        m.to(device)
    if want_compile:
        models["ours+compile"] = torch.compile(ours)
    return models, skipped


# ------------------------------------------------------------------------------------------ timing
def precision_context(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision {precision!r}: choose fp32 or bf16")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Forward, x: torch.Tensor, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn(x)
    sync(device)
    return time.perf_counter() - t0


@torch.inference_mode()
def check_outputs(models: dict[str, Forward], x: torch.Tensor) -> dict[str, float]:
    """fp32 max |other - ours| over the output features: the models must compute the same function."""
    ref = models["ours"](x).float()
    return {k: (fn(x).float() - ref).abs().max().item() for k, fn in models.items() if k != "ours"}


@torch.inference_mode()
def run_precision(
    models: dict[str, Forward], x: torch.Tensor, precision: str, reps: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    labels = list(models)
    times: dict[str, list[float]] = {k: [] for k in labels}
    with precision_context(precision, device):
        for k in labels:
            for _ in range(warmup):
                t = timed(models[k], x, device)
                print(f"  [{precision}] warmup {k:<13} {t:7.3f} s", flush=True)
        for r in range(reps):
            order = labels[r % len(labels) :] + labels[: r % len(labels)]  # rotate: no model always goes first
            for k in order:
                times[k].append(timed(models[k], x, device))
            print(f"  [{precision}] rep {r + 1}/{reps}: " + "  ".join(f"{k} {times[k][-1]:.3f}s" for k in labels))
    return times


@torch.inference_mode()
def measure_memory(
    models: dict[str, Forward], x: torch.Tensor, precisions: list[str], device: torch.device
) -> dict[str, float | None]:
    """Peak MiB above the weights of one forward per model and precision, after a warmup forward (the first
    forward also pages in transformers' memory-mapped weights); keys ``"<model> <precision>"``, None: unknown."""
    mems: dict[str, float | None] = {}
    for p in precisions:
        with precision_context(p, device):
            for k, fn in models.items():
                fn(x)
                with PeakMemory(device) as m:
                    fn(x)
                mems[f"{k} {p}"] = m.mib
                print(f"  [{p}] peak memory {k}: {fmt_mib(m.mib)}", flush=True)
    return mems


def summarize(times: dict[str, dict[str, list[float]]], mems: dict[str, float | None], batch: int) -> dict:
    """img/s per model (median and best round) and ratios against ours, three ways:

    - ``median``: ratio of the median img/s (what the brief table shows);
    - ``paired``: median over rounds of (their time / our time) in the same round, robust to load drifts that
      last longer than a round;
    - ``best``: ratio of the fastest rounds, the least disturbed estimate on a busy machine.

    ``ratios_by_precision`` holds all three; the flat ``ratios`` (the suite's summary) the median and paired ones
    and, per precision, their peak memory over ours (above 1: ours needs less).
    """
    out: dict = {"throughput": {}, "ratios_by_precision": {}, "ratios": {}, "peak_memory_mib": mems}
    for prec, per_model in times.items():
        out["throughput"][prec] = {
            k: {
                "median_img_s": batch / statistics.median(ts),
                "best_img_s": batch / min(ts),
                "worst_img_s": batch / max(ts),
            }
            for k, ts in per_model.items()
        }
        pairs = [("ours", k) for k in ("timm", "hf") if k in per_model]
        if "ours+compile" in per_model:
            pairs.append(("ours+compile", "ours"))
        out["ratios_by_precision"][prec] = {
            f"{a}/{b}": {
                "median": statistics.median(per_model[b]) / statistics.median(per_model[a]),
                "paired": statistics.median(tb / ta for ta, tb in zip(per_model[a], per_model[b], strict=True)),
                "best": min(per_model[b]) / min(per_model[a]),
            }
            for a, b in pairs
        }
        for a, b in pairs:
            r = out["ratios_by_precision"][prec][f"{a}/{b}"]
            name = f"{LABELS.get(a, a)}/{LABELS.get(b, b)} {prec} img/s"
            out["ratios"][f"{name} (median)"] = r["median"]
            out["ratios"][f"{name} (paired)"] = r["paired"]
        ours = mems.get(f"ours {prec}")
        for k in ("timm", "hf"):
            mib = mems.get(f"{k} {prec}")
            if ours and mib is not None:
                out["ratios"][f"{LABELS.get(k, k)}/ours {prec} peak memory"] = mib / ours
    return out


def print_table(summary: dict, batch: int) -> None:
    precs = list(summary["throughput"])
    labels = list(summary["throughput"][precs[0]])
    print(f"\nimages/s at batch {batch}: median [best, worst round]")
    print(f"{'model':<14}" + "".join(f"{p:>26}" for p in precs))
    for k in labels:
        cells = []
        for p in precs:
            v = summary["throughput"][p][k]
            cells.append(f"{v['median_img_s']:.3f} [{v['best_img_s']:.3f}, {v['worst_img_s']:.3f}]")
        print(f"{k:<14}" + "".join(f"{c:>26}" for c in cells))
    print("\nratios (above 1: the first is faster): median img/s, paired per-round, best round")
    for p in precs:
        for name, r in summary["ratios_by_precision"][p].items():
            print(f"{p:<6}{name:<20} median {r['median']:.3f}   paired {r['paired']:.3f}   best {r['best']:.3f}")
    print("\npeak memory of one forward above the weights")
    for name, mib in summary["peak_memory_mib"].items():
        print(f"  {name:<20} {fmt_mib(mib)}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="aimv2-large-patch14-224")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5, help="timed rounds per precision (one forward per model each)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed forwards per model and precision")
    ap.add_argument("--precisions", help=machine.PRECISIONS_HELP)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="add torch.compile of ours (compiles in the warmup)")
    ap.add_argument("--out", type=Path, help="write the result as JSON here")
    ap.add_argument("--memory-only", action="store_true", help="only measure each model's peak memory (no timing)")
    args = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if args.memory_only:
        release_freed_memory()  # before anything is allocated, so that RSS follows the live tensors
    precisions = machine.resolve_precisions(args.precisions, torch.device(args.device).type)
    for p in precisions:
        precision_context(p, torch.device("cpu"))  # validate before the slow part

    device = torch.device(args.device)
    info = machine_info(device)
    print(
        f"{args.model}, batch {args.batch_size}, "
        + ("peak memory only" if args.memory_only else f"{args.reps} rounds")
        + f", on {info['cpu_model']} "
        f"({info['nproc']} cores, {info['torch_threads']} torch threads), torch {info['torch']}"
        + (f", {info['gpu']}" if "gpu" in info else ""),
        flush=True,
    )
    t0 = time.perf_counter()
    models, skipped = build_models(args.model, device, args.compile)
    for k, why in skipped.items():
        print(f"  skipping {k}: {why}")
    print(f"  built {', '.join(models)} in {time.perf_counter() - t0:.1f} s", flush=True)

    img = parse_model_name(args.model).image_hw
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, *img, generator=gen).to(device)
    if args.memory_only:
        mems = measure_memory(models, x, precisions, device)
        if args.out:
            machine.write_record(args.out, {"peak_memory_mib": mems})
        return {"peak_memory_mib": mems}
    diffs = check_outputs({k: v for k, v in models.items() if k != "ours+compile"}, x)
    print("  fp32 max |output - ours|: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()), flush=True)

    times = {p: run_precision(models, x, p, args.reps, args.warmup, device) for p in precisions}
    if hasattr(os, "getloadavg"):
        info["loadavg_at_end"] = os.getloadavg()  # 1, 5, 15 min: well above the core count means shared cores
    del models  # the memory run builds its own; free these first
    measured = measure_in_fresh_process(__file__, [*argv, "--precisions", ",".join(precisions)]) or {}
    mems = {f"{k} {p}": measured.get(f"{k} {p}") for p in precisions for k in times[precisions[0]]}
    summary = summarize(times, mems, args.batch_size)
    print_table(summary, args.batch_size)

    result = {
        "command": " ".join(["python", "benchmarks/encoder_speed.py", *argv]),
        "model": args.model,
        "timm_model": timm_name(args.model) if "timm" in times[precisions[0]] else None,
        "batch_size": args.batch_size,
        "reps": args.reps,
        "warmup": args.warmup,
        "machine": info,
        "skipped": skipped,
        "fp32_max_abs_diff_vs_ours": diffs,
        **summary,
        "seconds_per_batch": times,
    }
    if args.out:
        machine.write_record(args.out, result)
        print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
