"""The GPU check: one command on one H100/H200 from a fresh machine, one JSON and one table.

    make test                                    # (or: pip install -e ".[test]") the project's install, nothing else
    .venv/bin/python benchmarks/gpu_suite.py     # about 5-7 minutes on one H100/H200
    .venv/bin/python benchmarks/gpu_suite.py --smoke   # every code path at toy size on CPU (CI: under a minute)

Writes ``benchmarks/results/gpu_<device>/gpu_suite.json`` and ``table.md`` (``<device>`` from the CUDA name,
e.g. ``gpu_nvidia_h200``; ``--smoke`` writes to a temporary folder unless ``--out-dir`` is given), anew after every
part, so that a run cut short by a time limit keeps the parts it finished (``pending`` lists the others). Parts, each
skipped with one line saying why when what it needs is missing (no CUDA, no NCCL, no timm), and each recorded
with its error, without stopping the others, if it fails (the script then exits 1):

- ``checks``: on the device, (a) no leakage: perturbing an encoder patch past a sample's prefix leaves every
  earlier position's features unchanged, and perturbing a caption token leaves the earlier logits unchanged,
  while the perturbed position itself changes (so the check can fail); (b) parity: loss and gradients of the
  AIMv2 model under the flex, sdpa and matmul attention backends agree, and our encoder's features equal timm's
  on the same weights; (c) DDP and FSDP2 on NCCL (gloo with ``--smoke``) with one process group of size 1:
  three AdamW steps give the same losses as the unwrapped model.
- ``pretrain``: the AIMv2-L pretraining step (ViT-L/14 at 224 px with the paper's 1024 x 12 decoder, bf16
  autocast, the prefix mask through FlexAttention, compiled as the trainer compiles on one process: the whole
  model as one graph): samples/s, MFU against the datasheet's dense bf16 peak (H100 SXM and H200: 989 TFLOP/s),
  peak memory. ``pretrain_ac``: the same with activation checkpointing; ``pretrain_sdpa``: the prefix mask through
  SDPA with a dense mask instead (``ratios`` holds the FlexAttention / SDPA step speed).
- ``encoder``: inference images/s of our encoder against timm's, bf16 autocast, eager and ``torch.compile``.
- ``native``: recompiles of the per-block compiled native-resolution encoder (``dynamic=True``) over a run of
  changing image sizes; a well-behaved run compiles once per block stack, not once per size.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from machine import machine_info

from aimv2.config import OptimConfig
from aimv2.models.attention import set_attention_backend
from aimv2.objectives import create_pretraining_model
from aimv2.train.grad_clip import clip_gradients
from aimv2.train.metrics import flops_per_sample, peak_flops
from aimv2.train.optim import build_optimizer

HERE = Path(__file__).resolve().parent


class Skip(Exception):
    """A part cannot run here; the message says what is missing."""


# Sizes: the real run on one GPU, and the toy ones of --smoke (CPU, seconds).
FULL = dict(
    encoder="aimv2-large-patch14-224",
    overrides={},  # the paper's decoder: 1024 x 12
    native="aimv2-large-patch14-native",
    native_sizes=[(224, 224), (224, 336), (336, 448), (448, 224), (280, 392), (392, 392)],
    vocab=32000,
    text_len=77,
    batch=64,
    infer_batch=128,
    steps=10,
    warmup=3,
    compile_backend="inductor",
)
SMOKE = dict(
    encoder="aimv2-tiny-patch8-64",
    overrides=dict(depth=2, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2, decoder_mlp_hidden_dim=128),
    native="aimv2-tiny-patch8-native",
    native_sizes=[(32, 32), (32, 48), (48, 64)],
    vocab=97,
    text_len=8,
    batch=4,
    infer_batch=4,
    steps=2,
    warmup=1,
    compile_backend="eager",  # dynamo traces every path; no C++ build
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bf16(device: torch.device, enabled: bool = True):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def pretrain_model(size: dict, device: torch.device, encoder: str | None = None, **extra):
    torch.manual_seed(0)
    over = dict(size["overrides"], **extra)
    return create_pretraining_model(
        encoder or size["encoder"], vocab_size=size["vocab"], decoder_max_text_len=size["text_len"], **over
    ).to(device)


def batch_for(model, size: dict, device: torch.device, B: int | None = None):
    g = torch.Generator().manual_seed(1)
    B = B or size["batch"]
    enc = model.encoder.cfg
    n = enc.grid_size[0] * enc.grid_size[1]
    images = torch.randn(B, 3, *enc.image_hw, generator=g)
    text = torch.randint(3, size["vocab"], (B, size["text_len"]), generator=g)
    text[: B // 2, -size["text_len"] // 4 :] = 0  # padded captions
    prefix = torch.randint(1, n, (B,), generator=g)
    return images.to(device), text.to(device), prefix.to(device)


def timm_twin(ours, device: torch.device):
    """timm's model with our encoder's weights (timm's layout, strict load), or Skip without timm."""
    try:
        import timm
        from safetensors.torch import load_file
    except ImportError as e:
        raise Skip(f"timm is not installed ({e}); pip install -e '.[test]'") from e
    from aimv2.weights import save_encoder
    from aimv2.weights.timm_args import timm_model_args

    arch, kwargs = timm_model_args(ours.cfg)
    tm = timm.create_model(arch, pretrained=False, **kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        tm.load_state_dict(load_file(save_encoder(ours, Path(tmp) / "timm.safetensors", layout="timm")), strict=True)
    return tm.to(device).eval()


# ------------------------------------------------------------------------------------------------ checks


def check_leakage(size: dict, device: torch.device) -> dict:
    model = pretrain_model(size, device).eval()
    images, text, prefix = batch_for(model, size, device)
    n = prefix.new_tensor(model.encoder.cfg.grid_size[0] * model.encoder.cfg.grid_size[1])
    prefix = torch.minimum(prefix, n - 2)  # the perturbed patch j = N - 2 lies past every prefix
    p = model.encoder.cfg.patch_size
    gw = model.encoder.cfg.grid_size[1]
    j = int(n) - 2
    with torch.no_grad():
        feats = model.encoder(images, prefix)
        moved = images.clone()
        r, c = divmod(j, gw)
        moved[:, :, r * p : (r + 1) * p, c * p : (c + 1) * p] += 1.0
        feats2 = model.encoder(moved, prefix)
        logits = model(images, text, prefix).text_logits
        t2 = text.clone()
        t2[:, -2] = 3 + (t2[:, -2] - 2) % (size["vocab"] - 3)  # another real token: the input of the last position
        logits2 = model(images, t2, prefix).text_logits  # [B, T, V]: position t predicts token t from tokens < t
    earlier = (feats2[:, :j] - feats[:, :j]).abs().max().item()
    at_j = (feats2[:, j] - feats[:, j]).abs().max().item()
    text_earlier = (logits2[:, :-1] - logits[:, :-1]).abs().max().item()
    text_last = (logits2[:, -1] - logits[:, -1]).abs().max().item()
    ok = earlier < 1e-5 and text_earlier < 1e-5 and at_j > 1e-3 and text_last > 1e-3
    return dict(
        ok=ok,
        encoder_earlier_max_diff=earlier,
        encoder_perturbed_diff=at_j,
        text_earlier_max_diff=text_earlier,
        text_perturbed_diff=text_last,
    )


def loss_and_grads(model, batch, backend: str) -> tuple[float, dict]:
    set_attention_backend(backend)
    try:
        loss = model(*batch).loss
        loss.backward()
    finally:
        set_attention_backend("auto")
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def check_parity(size: dict, device: torch.device) -> dict:
    model = pretrain_model(size, device)
    batch = batch_for(model, size, device, B=4)
    backends = ["sdpa", "matmul"] + (["flex"] if device.type == "cuda" else [])  # flex has no CPU backward
    runs = {b: loss_and_grads(model, batch, b) for b in backends}
    ref_loss, ref_g = runs["sdpa"]
    g_max = max(g.abs().max().item() for g in ref_g.values())
    out: dict = {"backends": {}}
    ok = True
    for b, (loss, g) in runs.items():
        d_grad = max((g[n] - ref_g[n]).abs().max().item() for n in ref_g)
        out["backends"][b] = dict(loss=loss, loss_diff=abs(loss - ref_loss), max_grad_diff=d_grad)
        ok &= abs(loss - ref_loss) < 1e-4 * max(1.0, abs(ref_loss)) and d_grad < 1e-3 * g_max
    try:
        tm = timm_twin(model.encoder.eval(), device)
        with torch.no_grad():
            x = batch[0][:2]
            out["timm_max_abs_diff"] = (model.encoder(x) - tm.forward_features(x)).abs().max().item()
        ok &= out["timm_max_abs_diff"] < 1e-3
    except Skip as e:
        out["timm"] = f"skipped: {e}"
    out["ok"] = bool(ok)
    return out


def check_wrapped_training(size: dict, device: torch.device) -> dict:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from aimv2.train.parallelize import apply_fsdp

    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_available() or (backend == "nccl" and not dist.is_nccl_available()):
        raise Skip(f"torch.distributed with {backend} is not available in this build")
    with tempfile.TemporaryDirectory() as tmp:
        store = dist.FileStore(os.path.join(tmp, "store"), 1)
        dist.init_process_group(backend, store=store, rank=0, world_size=1)
        try:
            runs = {}
            for name in ("plain", "ddp", "fsdp2"):
                model = pretrain_model(size, device)
                step_model = model
                if name == "ddp":
                    step_model = DDP(model, device_ids=[device.index or 0] if device.type == "cuda" else None)
                elif name == "fsdp2":
                    step_model = apply_fsdp(model, None)
                opt = build_optimizer(model, OptimConfig())
                batch = batch_for(model, size, device, B=4)
                losses = []
                for _ in range(3):
                    loss = step_model(*batch).loss
                    loss.backward()
                    clip_gradients(model, 1.0)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    losses.append(loss.item())
                runs[name] = losses
        finally:
            dist.destroy_process_group()
    diffs = {n: max(abs(a - b) for a, b in zip(runs[n], runs["plain"], strict=True)) for n in ("ddp", "fsdp2")}
    return dict(ok=all(d < 1e-4 for d in diffs.values()), backend=backend, losses=runs, max_loss_diff=diffs)


def part_checks(size: dict, device: torch.device) -> dict:
    out = {}
    for name, fn in [("leakage", check_leakage), ("parity", check_parity), ("ddp_fsdp2", check_wrapped_training)]:
        out[name] = run_part(name, fn, size, device)
    return out


# ------------------------------------------------------------------------------------------------ speed


def timed_median(fn, reps: int, warmup: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def part_encoder(size: dict, device: torch.device) -> dict:
    from aimv2.models.registry import build_encoder

    torch.manual_seed(0)
    ours = build_encoder(size["encoder"], **{k: v for k, v in size["overrides"].items() if k == "depth"})
    ours = ours.to(device).eval()
    tm = timm_twin(ours, device)
    models = {"ours": ours, "timm": tm.forward_features}
    models["ours+compile"] = torch.compile(ours, backend=size["compile_backend"])
    models["timm+compile"] = torch.compile(tm.forward_features, backend=size["compile_backend"])
    x = torch.randn(size["infer_batch"], 3, *ours.cfg.image_hw, device=device)
    out = {}
    with torch.inference_mode(), bf16(device):
        for name, fn in models.items():
            t = timed_median(lambda fn=fn: fn(x), size["steps"], size["warmup"], device)
            out[f"{name} bf16 img/s"] = size["infer_batch"] / statistics.median(t)
    out["ours/timm bf16 img/s"] = out["ours bf16 img/s"] / out["timm bf16 img/s"]
    out["ours/timm bf16 img/s, compiled"] = out["ours+compile bf16 img/s"] / out["timm+compile bf16 img/s"]
    return out


def pretrain_step_speed(size: dict, device: torch.device, attention: str, ac: bool) -> dict:
    from aimv2.train.parallelize import apply_activation_checkpointing, apply_compile

    set_attention_backend(attention)
    try:
        model = pretrain_model(size, device)
        model.predictions_keep_grad = False  # the trainer reads only the loss terms
        if ac:
            apply_activation_checkpointing(model)
        apply_compile(model, backend=size["compile_backend"], whole=True)  # as the trainer compiles on one process
        opt = build_optimizer(model, OptimConfig())
        images, text, prefix = batch_for(model, size, device)
        enc = model.encoder.cfg
        flops = flops_per_sample(model, enc.grid_size[0] * enc.grid_size[1], size["text_len"])

        def step():
            with bf16(device):
                loss = model(images, text, prefix).loss
            loss.backward()
            clip_gradients(model, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = timed_median(step, size["steps"], size["warmup"], device)
        sps = size["batch"] / statistics.median(times)
        peak = peak_flops(device, bf16=True)
        return {
            "step_s": statistics.median(times),
            "samples_per_s": sps,
            "tflops": sps * flops / 1e12,
            "mfu": sps * flops / peak if peak else None,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        }
    finally:
        set_attention_backend("auto")
        torch._dynamo.reset()


def default_attention_step(size: dict, device: torch.device, ac: bool) -> dict:
    """The step with the prefix mask's default backend: FlexAttention on CUDA (``auto`` on the CPU of --smoke)."""
    attention = "flex" if device.type == "cuda" else "auto"
    return {f"{attention}, AC {'on' if ac else 'off'}": pretrain_step_speed(size, device, attention, ac)}


def part_pretrain(size: dict, device: torch.device) -> dict:
    """The step as a run takes it by default (activation checkpointing off): the MFU of the issue."""
    return default_attention_step(size, device, ac=False)


def part_pretrain_ac(size: dict, device: torch.device) -> dict:
    return default_attention_step(size, device, ac=True)


def part_pretrain_sdpa(size: dict, device: torch.device) -> dict:
    """The prefix mask through SDPA with a dense mask instead (the ratio to ``pretrain`` is in ``ratios``)."""
    return {"sdpa+mask, AC off": pretrain_step_speed(size, device, "sdpa", False)}


def part_native(size: dict, device: torch.device) -> dict:
    from torch._dynamo.utils import counters

    from aimv2.models.registry import build_encoder
    from aimv2.train.parallelize import apply_compile

    torch._dynamo.reset()
    enc = build_encoder(size["native"]).to(device)
    apply_compile(enc, dynamic=True, backend=size["compile_backend"])
    before = counters["stats"]["unique_graphs"]
    per_size = []
    with torch.no_grad(), bf16(device):
        for h, w in size["native_sizes"]:
            x = torch.randn(2, 3, h, w, device=device)
            n = enc.cfg.patch_size
            enc(x, prefix_len=torch.full((2,), (h // n) * (w // n) // 2, device=device))
            per_size.append({"size": [h, w], "graphs_so_far": counters["stats"]["unique_graphs"] - before})
    graphs = counters["stats"]["unique_graphs"] - before
    torch._dynamo.reset()
    return dict(sizes=len(size["native_sizes"]), graphs_compiled=graphs, per_size=per_size)


# ------------------------------------------------------------------------------------------------ driver

# The parts in the order a full run takes them: correctness first, then the number the suite exists for (the
# pretraining step's MFU), then the rest; each is written to disk before the next starts.
PARTS = {
    "checks": part_checks,
    "pretrain": part_pretrain,
    "pretrain_ac": part_pretrain_ac,
    "pretrain_sdpa": part_pretrain_sdpa,
    "encoder": part_encoder,
    "native": part_native,
}


def run_part(name: str, fn, size: dict, device: torch.device):
    t0 = time.perf_counter()
    try:
        out = fn(size, device)
    except Skip as e:
        print(f"[{name}] skipped: {e}", flush=True)
        return {"skipped": str(e)}
    except Exception as e:  # a failing part is recorded; the others still run
        traceback.print_exc()
        print(f"[{name}] FAILED: {type(e).__name__}: {e}", flush=True)
        return {"error": f"{type(e).__name__}: {e}"}
    out = dict(out, seconds=time.perf_counter() - t0)
    print(f"[{name}] done in {out['seconds']:.0f}s", flush=True)
    return out


def failed(results) -> list[str]:
    """Names of parts (and checks) that errored or whose check came out not ok."""
    bad = []
    for name, r in results.items():
        if isinstance(r, dict):
            if "error" in r or r.get("ok") is False:
                bad.append(name)
            bad += [f"{name}.{n}" for n in failed({k: v for k, v in r.items() if isinstance(v, dict)})]
    return bad


def table(results: dict) -> str:
    """The results as a markdown table (one row per number)."""
    rows = ["| part | measure | value |", "|---|---|---|"]

    def walk(prefix: str, d: dict):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(f"{prefix} / {k}" if prefix else k, v)
            elif isinstance(v, (int, float, bool, str)) and k != "seconds":
                shown = f"{v:.4g}" if isinstance(v, float) else str(v)
                rows.append(f"| {prefix} | {k} | {shown} |")

    walk("", results)
    return "\n".join(rows) + "\n"


def ratios(results: dict) -> dict:
    """The FlexAttention / SDPA-with-mask step speed, once both pretraining parts have a number."""
    a, b = results.get("pretrain", {}), results.get("pretrain_sdpa", {})
    flex = next((v for k, v in a.items() if k.endswith("AC off")), None)
    sdpa = b.get("sdpa+mask, AC off")
    if isinstance(flex, dict) and isinstance(sdpa, dict):
        return {"pretrain/pretrain_sdpa samples/s": flex["samples_per_s"] / sdpa["samples_per_s"]}
    return {}


def write_results(out_dir: Path, info: dict, results: dict, seconds: float, pending: list[str]) -> dict:
    """``gpu_suite.json`` and ``table.md`` of the parts run so far; ``pending`` names the parts not yet run."""
    if r := ratios(results):
        results = dict(results, ratios=r)
    record = dict(info, seconds=seconds, results=results, failed=failed(results), pending=pending)
    (out_dir / "gpu_suite.json").write_text(json.dumps(record, indent=2) + "\n")
    head = f"{info['device']}, {info['date']}, {seconds:.0f}s"
    if pending:
        head += f"; not run yet: {', '.join(pending)}"
    (out_dir / "table.md").write_text(head + "\n\n" + table(results))
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="every code path at toy size on CPU (CI)")
    ap.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated subset to run, in this order (default: {','.join(PARTS)}: the checks, then the "
        "pretraining step's MFU)",
    )
    ap.add_argument("--out-dir", type=Path, help="default: benchmarks/results/gpu_<device>/ (a temp dir with --smoke)")
    args = ap.parse_args(argv)
    size = SMOKE if args.smoke else FULL
    if args.smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", 0)
    else:
        print("no CUDA device: run on a machine with an H100/H200, or use --smoke for the CPU code paths")
        return 2
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)"
    out_dir = args.out_dir
    if out_dir is None:
        slug = re.sub(r"[^a-z0-9]+", "_", dev_name.lower()).strip("_")
        out_dir = Path(tempfile.mkdtemp()) if args.smoke else HERE / "results" / f"gpu_{slug}"
    names = args.parts.split(",")
    if unknown := [n for n in names if n not in PARTS]:
        ap.error(f"--parts: unknown part(s) {', '.join(unknown)}; choose from {','.join(PARTS)}")
    t0 = time.perf_counter()
    results: dict = {}
    info = dict(
        machine_info(("torch", "timm")),
        device=dev_name,
        smoke=args.smoke,
        command="python benchmarks/gpu_suite.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        results[name] = part_checks(size, device) if name == "checks" else run_part(name, PARTS[name], size, device)
        # written after every part, so a run stopped by a time limit still leaves what it measured
        record = write_results(out_dir, info, results, time.perf_counter() - t0, pending=names[i + 1 :])
    print(table(record["results"]))
    print(f"wrote {out_dir / 'gpu_suite.json'} and table.md in {time.perf_counter() - t0:.0f}s")
    if bad := failed(results):
        print(f"FAILED: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
