"""Where the two-matmul attention stops beating the fused kernel: the crossover behind ``CPU_MATMUL_UP_TO``.

What it measures: the time of one attention call's forward and backward (as in a training step) through
``aimv2.models.attention``'s ``sdpa`` and ``matmul`` backends, per dtype (fp32; bf16 as autocast produces it) and
sequence length, for the two patterns training uses: the encoder's prefix mask (a boolean [B, 1, N, N]) and the
decoder's plain causal flag. The two backends alternate call by call, so load from other jobs hits both alike;
the median of ``--reps`` calls is kept. Both are first checked to compute the same values.

With ``--compile`` each backend's forward is a ``torch.compile``d function (backward through AOTAutograd), as
attention runs inside a compiled model: there the matmul way's mask, softmax and casts fuse into one kernel, so its
crossover is longer; it gives ``CPU_MATMUL_UP_TO_COMPILED``.

It prints, per dtype, the longest length up to which ``matmul`` was faster for both patterns at every length
measured (the crossover), in the form of ``aimv2.models.attention.CPU_MATMUL_UP_TO``; a dtype where ``matmul``
loses already at the shortest length gets no entry (SDPA always).

    python benchmarks/attention_crossover.py --out benchmarks/results/attention_crossover_cpu.json
    python benchmarks/attention_crossover.py --lengths 64,256,1024 --reps 5     # quicker
    python benchmarks/attention_crossover.py --compile --out benchmarks/results/attention_crossover_cpu_compiled.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from machine import machine_info, write_record

from aimv2.models.attention import AttentionMask, additive_mask, causal_additive_mask, matmul_attention

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def inputs(B: int, H: int, N: int, hd: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(B, H, N, hd, generator=g, device=device).to(dtype).requires_grad_() for _ in range(3)]


def pattern_mask(pattern: str, B: int, N: int, device: torch.device) -> torch.Tensor | None:
    if pattern == "causal":
        return None
    prefix = torch.randint(1, N, (B,), generator=torch.Generator().manual_seed(1)).to(device)
    return AttentionMask(N, causal=True, prefix_len=prefix).dense  # [B, 1, N, N]


def sdpa_forward(q, k, v, mask):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)


def matmul_forward(q, k, v, mask):
    bias = causal_additive_mask(q.shape[-2], q.device) if mask is None else additive_mask(mask)
    return matmul_attention(q, k, v, bias)


FORWARD = {"sdpa": sdpa_forward, "matmul": matmul_forward}


def run(forward, q, k, v, mask, grad_out) -> None:
    forward(q, k, v, mask).backward(grad_out)
    for t in (q, k, v):
        t.grad = None


def measure(pattern: str, dtype: torch.dtype, N: int, args, device: torch.device) -> dict:
    q, k, v = inputs(args.batch_size, args.heads, N, args.head_dim, dtype, device)
    mask = pattern_mask(pattern, args.batch_size, N, device)
    with torch.no_grad():  # the same function, else the timing compares nothing
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        bias = causal_additive_mask(N, device) if mask is None else additive_mask(mask)
        b = matmul_attention(q, k, v, bias)
        diff = (a.float() - b.float()).abs().max().item()
    if diff > (1e-4 if dtype == torch.float32 else 5e-2):
        raise SystemExit(f"sdpa and matmul differ by {diff:.2e} ({pattern}, {dtype}, N={N})")
    grad_out = torch.randn_like(q)
    forward = dict(FORWARD)
    if args.compile:  # fresh graphs per shape (torch.compile keeps only a few shapes of a function before eager)
        torch.compiler.reset()
        forward = {name: torch.compile(fn, dynamic=False) for name, fn in FORWARD.items()}
    times: dict[str, list[float]] = {"sdpa": [], "matmul": []}
    for r in range(args.warmup + args.reps):
        for backend in ("sdpa", "matmul") if r % 2 else ("matmul", "sdpa"):
            t0 = time.perf_counter()
            run(forward[backend], q, k, v, mask, grad_out)
            if r >= args.warmup:
                times[backend].append(time.perf_counter() - t0)
    sdpa, mm = statistics.median(times["sdpa"]), statistics.median(times["matmul"])
    return {"sdpa_ms": 1e3 * sdpa, "matmul_ms": 1e3 * mm, "sdpa/matmul time": sdpa / mm, "max_abs_diff": diff}


def crossover(rows: list[dict], dtype: str) -> int | None:
    """The longest N such that matmul was faster at every measured length <= N, for every pattern."""
    best = None
    for N in sorted({r["seq_len"] for r in rows}):
        at = [r for r in rows if r["dtype"] == dtype and r["seq_len"] == N]
        if not all(r["sdpa/matmul time"] > 1.0 for r in at):
            break
        best = N
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="64,96,128,256,333,512,1024,2048")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="time both backends compiled (see above)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    device = torch.device(args.device)
    rows = []
    for dname in args.dtypes.split(","):
        for N in (int(x) for x in args.lengths.split(",")):
            for pattern in ("prefix", "causal"):
                r = dict(dtype=dname, seq_len=N, pattern=pattern, **measure(pattern, DTYPES[dname], N, args, device))
                rows.append(r)
                print(
                    f"{dname:>5} N={N:>5} {pattern:>6}: sdpa {r['sdpa_ms']:8.2f} ms  matmul {r['matmul_ms']:8.2f} ms"
                    f"  sdpa/matmul {r['sdpa/matmul time']:.2f}",
                    flush=True,
                )
    cross = {d: crossover(rows, d) for d in args.dtypes.split(",")}
    name = "CPU_MATMUL_UP_TO_COMPILED" if args.compile else "CPU_MATMUL_UP_TO"
    print(name + " = {" + ", ".join(f"{d}: {n}" for d, n in cross.items() if n) + "}")
    if args.out:
        info = dict(
            command="python benchmarks/attention_crossover.py " + " ".join(sys.argv[1:]),
            **machine_info(("torch",)),
            threads=torch.get_num_threads(),
            shape=dict(batch=args.batch_size, heads=args.heads, head_dim=args.head_dim),
            reps=args.reps,
            compiled=args.compile,
            rows=rows,
            matmul_faster_up_to=cross,
        )
        write_record(args.out, info)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
