"""Inference of a frozen encoder on CPU, PyTorch and onnxruntime: images/s, peak memory, and what each loses.

What it measures, for one encoder (``--encoder``: a model name, a checkpoint, a run folder or ``hf:REPO``) on a
batch of real photos (the first ``--images`` JPEGs of the CC12M shard, preprocessed by ``aimv2.preprocessing``):

- ``fp32``: the plain forward;
- ``bf16`` / ``fp16``: ``torch.autocast`` over the fp32 weights (what ``--dtype`` does in extract, probe and
  zeroshot);
- ``int8``: torchao's int8 dynamic-activation / int8-weight quantization of every linear layer
  (``aimv2.eval.quantize.quantize_int8``), ``int8-wo`` its int8 weight-only variant;
- ``fp32-compile`` / ``int8-compile``: the same under ``torch.compile`` (compiled during the warmup);
- ``ort-fp32``, ``ort-int8`` (dynamic), ``ort-int8-static``: the encoder exported to ONNX and run by onnxruntime
  (``--runtime onnxruntime``, ``aimv2.eval.onnx_runtime``), its session on all usable CPUs; the static variant is
  calibrated on the 24 photos of the shard after the timed batch (on the probe's train split for the probe).

``--variants`` picks some (default: all but fp16, int8-wo and the onnxruntime int8 with the other weight scales,
``ort-int8-pc``: dynamic per-channel, ``ort-int8-static-pc``: static per-channel); fp32 is always measured, as the
baseline. The issue's targets are printed as MET or MISSED: ort-int8 >= 3x torch eager fp32 (paired) at <= 1 point
of probe top-1 lost, ort-fp32 >= 1.3x; ``--profile`` adds onnxruntime's share of operator time per ONNX operator type.

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
import contextlib
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
from aimv2.eval.onnx_runtime import folder_calibration, onnx_encoder, usable_cpus
from aimv2.eval.probe import ProbeConfig, predict, probe_features
from aimv2.eval.quantize import quantize_int8
from aimv2.weights.onnx_quantize import quantize_onnx

SHARD = Path(__file__).resolve().parents[1].parent / "shared/data/cc12m-train-0000.tar"
ALL_VARIANTS = ("fp32", "bf16", "fp16", "int8", "int8-wo", "fp32-compile", "int8-compile", "ort-fp32", "ort-int8",
                "ort-int8-static", "ort-int8-pc", "ort-int8-static-pc", "ort-int8-static-pt")  # fmt: skip
# each int8 recipe with its weight scales set explicitly (-pc per-channel, -pt per-tensor), measured against the
# defaults of aimv2.eval.onnx_runtime.PER_CHANNEL (per-tensor for both recipes: ort-int8-static-pt is ort-int8-static)
OTHER_SCALES = {"ort-int8-pc": True, "ort-int8-static-pc": True, "ort-int8-static-pt": False}  # vs the defaults
DEFAULT_VARIANTS = "fp32,bf16,fp32-compile,int8,int8-compile,ort-fp32,ort-int8,ort-int8-static"
TARGETS = {"ort-int8": 3.0, "ort-fp32": 1.3}  # x torch eager fp32 (paired); ort-int8 also <= 1 point of top-1 lost
CALIBRATION = 24  # CC12M photos after the timed batch (the shard has 32) that calibrate ort-int8-static
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


def build(spec: str, variant: str, calibration=None):
    """(forward, model) for ``variant`` of the encoder ``spec``; each variant gets its own copy of the weights.
    ``calibration``: (batches function, id) that calibrates ``ort-int8-static``."""
    model = load_frozen_encoder(spec)
    if variant.startswith("ort-"):
        cal, cal_id = calibration if "static" in variant else (None, None)
        dtype = "int8" if "int8" in variant else "fp32"
        pc = OTHER_SCALES.get(variant)
        ort = onnx_encoder(model, dtype=dtype, calibration=cal, calibration_id=cal_id, per_channel=pc)
        return ort, ort
    if variant.startswith("int8"):
        quantize_int8(model, "weight-only" if variant == "int8-wo" else "dynamic")
    if variant.endswith("-compile"):
        model = torch.compile(model)
    if variant in AUTOCAST:

        def forward(x, model=model, dtype=AUTOCAST[variant]):
            with torch.autocast("cpu", dtype=dtype):
                return model(x).float()

        return forward, model
    return model, model


def cc12m_calibration(encoder, skip: int, n: int = CALIBRATION):
    """The (batches function, id) of ``n`` CC12M photos after the first ``skip`` (not the timed ones)."""
    photos = cc12m_batch(skip + n, encoder)[skip:]
    return (lambda: iter(photos.split(8))), f"cc12m[{skip}:{skip + n}]"


def feature_dtype(variant: str) -> str:
    """The ``dtype`` of ``extract_features`` (and of ``--dtype``) that runs ``variant``'s model."""
    return "int8" if "int8" in variant else variant if variant in AUTOCAST else "fp32"


def probe_top1(variants: list[str], args) -> dict:
    """Top-1 per variant of one linear head trained on fp32 features (see the module docstring). The variants are
    built here, ``ort-int8-static`` calibrated on the probe's train split (images like the ones encoded)."""
    fp32 = load_frozen_encoder(args.encoder)
    prep = aimv2.preprocessing(fp32)
    kw = dict(pool="mean", mean_std=prep.mean_std, batch_size=args.images, device="cpu", progress=False)
    with tempfile.TemporaryDirectory() as d:
        write_probe_splits(d, args.probe_task, args.probe_train, args.probe_val, size=prep.img_size[0], seed=0)
        train, val = (open_labeled_source(f"{d}/{s}", prep.pil_transform()) for s in ("train", "val"))
        calibration = folder_calibration(f"{d}/train", prep.pil_transform(), prep.mean_std)
        t0 = time.perf_counter()
        tr = extract_features(fp32, train, dtype="fp32", **kw)
        va = {}
        for v in variants:
            _, model = build(args.encoder, v, calibration)
            va[v] = extract_features(model, val, dtype=feature_dtype(v), **kw)
            del model
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
    encoder = load_frozen_encoder(args.encoder)
    x = cc12m_batch(args.images, encoder)
    calibration = cc12m_calibration(encoder, args.images)
    peaks = {}
    for v in args.variants:
        fwd, model = build(args.encoder, v, calibration)
        with torch.inference_mode():
            fwd(x)  # warm: one-time buffers are not the forward's
            with PeakMemory("cpu") as m:
                fwd(x)
        mib = model.path.stat().st_size / 2**20 if v.startswith("ort-") else weight_mib(model)
        peaks[v] = {"weights_mib": mib, "forward_peak_mib": m.mib}
        del fwd, model
        print(f"  {v}: weights {peaks[v]['weights_mib']:.0f} MiB, forward peak {m.mib} MiB", flush=True)
    return peaks


def check_targets(rows: dict, with_probe: bool) -> dict:
    """The issue's targets against the paired ratios (and the probe's top-1 lost), printed MET or MISSED."""
    out = {}
    for v, speedup in TARGETS.items():
        if v not in rows:
            continue
        r = rows[v]
        ok = r["vs_fp32_paired"] >= speedup
        what = f"{v}: {r['vs_fp32_paired']:.2f}x torch eager fp32 (target >= {speedup}x)"
        if v == "ort-int8" and with_probe:
            lost = -r["probe_top1_vs_fp32"]
            ok = ok and lost <= 1.0
            what += f", probe top-1 lost {lost:.1f} points (target <= 1)"
        print(f"target {'MET' if ok else 'MISSED'}: {what}")
        out[v] = {"met": ok, "said": what}
    return out


def ort_profile(model, x: torch.Tensor, top: int = 8) -> dict:
    """The share of one forward's operator time per ONNX operator type (onnxruntime's profiler), largest first."""
    import onnxruntime

    with tempfile.TemporaryDirectory() as d:
        opts = onnxruntime.SessionOptions()
        opts.enable_profiling = True
        opts.profile_file_prefix = f"{d}/ort"
        opts.intra_op_num_threads = usable_cpus()
        sess = onnxruntime.InferenceSession(str(model.path), opts, providers=["CPUExecutionProvider"])
        sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            per_op[op] = per_op.get(op, 0.0) + e["dur"]
    total = sum(per_op.values()) or 1.0
    ranked = sorted(per_op.items(), key=lambda kv: -kv[1])
    return {k: v / total for k, v in ranked[:top]}


def gemm_ceiling(model: torch.nn.Module, x: torch.Tensor, reps: int = 5) -> dict:
    """What this CPU's matrix multiplies can do at the encoder's own shapes, to read the speedups against.

    The forward's FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on the fp32 encoder. The rates
    are those of one GEMM of its largest linear layer (the batch's tokens x its input width -> its output width):
    torch fp32 (``F.linear``, as the forward calls it), onnxruntime fp32 (a one-MatMul graph) and onnxruntime int8
    (the same graph through ``quantize_dynamic``, as ``ort-int8`` quantizes the encoder).
    ``int8_over_torch_eager`` is the int8 GEMM's rate over the rate the eager fp32 forward reaches: the speedup
    ort-int8 could reach if the whole forward ran at the int8 GEMM's rate.
    """
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    cfg = model.cfg
    n = (x.shape[-2] // cfg.patch_size) * (x.shape[-1] // cfg.patch_size)  # patch tokens per image
    # FlopCounterMode counts the linear layers and the patch conv; SDPA's two products it does not count on CPU:
    # 2 * (2 * N^2 * D) per image and block
    attention = 4.0 * x.shape[0] * n * n * cfg.embed_dim * cfg.depth
    flops = counter.get_total_flops() + attention
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    big = max(linears, key=lambda m: m.weight.numel())
    tokens = x.shape[0] * n
    a = torch.randn(tokens, big.in_features)
    weight = big.weight.detach()  # [out, in]: torch's own layout, as the forward calls it
    w = weight.T.contiguous()  # [in, out]: the exported graph's MatMul initializer
    gemm_flops = 2.0 * tokens * big.in_features * big.out_features

    def timed(fn) -> float:
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    rates = {}
    with torch.inference_mode():
        rates["torch_fp32"] = gemm_flops / timed(lambda: F.linear(a, weight))
    with tempfile.TemporaryDirectory() as d:
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["a", "w"], ["y"])],
            "gemm",
            [helper.make_tensor_value_info("a", TensorProto.FLOAT, list(a.shape))],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [tokens, big.out_features])],
            [numpy_helper.from_array(w.numpy(), "w")],
        )
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        proto.ir_version = 10  # what onnxruntime 1.2x reads (onnx's newest may be ahead of it)
        onnx.save(proto, f"{d}/fp32.onnx")
        with contextlib.redirect_stderr(io.StringIO()):  # the quantizer's pre-processing advice
            quantize_onnx(f"{d}/fp32.onnx", f"{d}/int8.onnx", mode="dynamic", input_name="a")
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = usable_cpus()
        feed = {"a": a.numpy()}
        for name in ("fp32", "int8"):
            sess = onnxruntime.InferenceSession(f"{d}/{name}.onnx", opts, providers=["CPUExecutionProvider"])
            rates[f"ort_{name}"] = gemm_flops / timed(lambda sess=sess: sess.run(None, feed))
    return {
        "forward_gflop": flops / 1e9,
        "gemm": [tokens, big.in_features, big.out_features],
        "gflops": {k: v / 1e9 for k, v in rates.items()},
        "cpu_flags": machine.cpu_flags(),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoder", default="aimv2-base-patch14-224", help="model name, checkpoint, run or hf:REPO")
    ap.add_argument("--images", type=int, default=8, help="batch of real CC12M photos (default: 8)")
    ap.add_argument("--reps", type=int, default=3, help="timed rounds (default: 3)")
    ap.add_argument("--probe-task", default="colour", help="built-in probe task: colour, shape or count")
    ap.add_argument("--probe-train", type=int, default=135, help="probe training images (default: 135)")
    ap.add_argument("--probe-val", type=int, default=90, help="probe val images, per variant (default: 90)")
    ap.add_argument("--no-probe", action="store_true", help="skip the probe top-1 (speed, memory, cosine only)")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, of {', '.join(ALL_VARIANTS)}")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak memory (its process builds every variant)")
    ap.add_argument("--profile", action="store_true", help="onnxruntime's per-operator time of the ort variants")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the GEMM rates of this CPU at the encoder's shapes")
    ap.add_argument("--out", type=Path, help="write the results as JSON")
    ap.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    if unknown := set(args.variants) - set(ALL_VARIANTS):
        ap.error(f"unknown variants {sorted(unknown)}: choose from {', '.join(ALL_VARIANTS)}")
    if "fp32" not in args.variants:
        args.variants.insert(0, "fp32")  # the baseline of every ratio
    if args.memory_only:
        result = {"peak_memory_mib": measure_memory(args)}
        args.out.write_text(json.dumps(result))
        return result

    encoder = load_frozen_encoder(args.encoder)
    x = cc12m_batch(args.images, encoder)
    calibration = cc12m_calibration(encoder, args.images)
    del encoder
    variants = args.variants
    t0 = time.perf_counter()
    built = {v: build(args.encoder, v, calibration) for v in variants}
    print(f"built {len(built)} variants in {time.perf_counter() - t0:.0f}s (ONNX exports cached)", flush=True)
    fwds = {v: f for v, (f, _) in built.items()}
    with torch.inference_mode():
        ref = fwds["fp32"](x)
        quality = {}
        for v, f in fwds.items():  # also the warmup (and torch.compile's compilation)
            f(x)
            cos = F.cosine_similarity(f(x).float(), ref, dim=-1)  # [B, N]
            quality[v] = {"cos_mean": float(cos.mean()), "cos_min": float(cos.min())}
        times: dict[str, list[float]] = {v: [] for v in variants}
        for r in range(args.reps):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            for v in order:
                t0 = time.perf_counter()
                fwds[v](x)
                times[v].append(time.perf_counter() - t0)
            print(f"round {r + 1}/{args.reps}: " + ", ".join(f"{v} {times[v][-1]:.2f}s" for v in variants), flush=True)
    profiles = {v: ort_profile(m, x) for v, (_, m) in built.items() if args.profile and v.startswith("ort-")}
    ceiling = None if args.no_ceiling else gemm_ceiling(built["fp32"][1], x)
    del fwds, built
    probe = None if args.no_probe else probe_top1(variants, args)
    script_args = ["--encoder", args.encoder, "--images", str(args.images), "--variants", ",".join(variants)]
    mems = {} if args.no_memory else measure_in_fresh_process(__file__, script_args) or {}
    rows = {}
    for v in variants:
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
    print(f"{'variant':15s} {'img/s':>7s} {'vs fp32':>8s} {'cos mean':>9s} {'cos min':>8s} {'probe top1':>11s} "
          f"{'agree':>6s} {'weights MiB':>12s} {'fwd peak MiB':>13s}")  # fmt: skip
    fmt = lambda m: "-" if m is None else f"{m:.0f}"
    pct = lambda r, k: f"{r[k]:.1f}" if k in r else "-"
    for v, r in rows.items():
        print(
            f"{v:15s} {r['img_per_s']:7.2f} {r['vs_fp32_paired']:7.2f}x {r['cos_mean']:9.5f} {r['cos_min']:8.5f} "
            f"{pct(r, 'probe_top1'):>11s} {pct(r, 'probe_agree_fp32'):>6s} {fmt(r['weights_mib']):>12s} "
            f"{fmt(r['forward_peak_mib']):>13s}"
        )
    if probe:
        i = probe["info"]
        print(f"probe: {i['task']}, {i['n_train']} train / {i['n_val']} val scenes, chance {i['chance']:.1f}%")
    targets = check_targets(rows, probe is not None)
    if ceiling:
        g = ceiling["gflops"]
        for r in rows.values():
            r["gflops"] = ceiling["forward_gflop"] / statistics.median(r["times_s"])  # the batch's FLOPs
        eager = rows["fp32"]["gflops"]
        ceiling["torch_eager_fp32_share_of_gemm"] = eager / g["torch_fp32"]
        ceiling["int8_over_torch_eager"] = g["ort_int8"] / eager
        ceiling["ort_fp32_over_torch_eager"] = g["ort_fp32"] / eager
        print(
            f"GEMM rates at {'x'.join(map(str, ceiling['gemm']))} (CPU flags {' '.join(ceiling['cpu_flags'])}): "
            + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in g.items())
        )
        print(
            f"the eager fp32 forward ({ceiling['forward_gflop']:.0f} GFLOP) runs at {eager:.0f} GFLOP/s, "
            f"{ceiling['torch_eager_fp32_share_of_gemm']:.0%} of torch's fp32 GEMM: at most "
            f"{ceiling['ort_fp32_over_torch_eager']:.2f}x for ort-fp32 and "
            f"{ceiling['int8_over_torch_eager']:.2f}x for ort-int8 if every FLOP ran at its GEMM's rate"
        )
    for v, p in profiles.items():
        print(
            f"{v} per operator (onnxruntime profile, one forward): " + ", ".join(f"{k} {s:.0%}" for k, s in p.items())
        )
    result = {
        "encoder": args.encoder,
        "batch": args.images,
        "reps": args.reps,
        "probe": probe["info"] if probe else None,
        "variants": rows,
        "targets": targets,
        "ort_profile": profiles or None,
        "gemm_ceiling": ceiling,
        "machine": {
            **machine.machine_info(("torchao", "onnxruntime")),
            "torch_threads": torch.get_num_threads(),
            "onnxruntime_threads": usable_cpus(),
        },  # fmt: skip
        "command": "python benchmarks/inference_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    if args.out:
        machine.write_record(args.out, result)
    return result


if __name__ == "__main__":
    main()
