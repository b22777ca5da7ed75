"""Whether bf16 pays on this CPU: the question behind the trainer's warning and the benchmarks' default precisions.

bf16 autocast on the CPU is fast only where oneDNN runs its matmuls: x86 with AVX-512 (native with the BF16
instructions or AMX tiles, near fp32 speed without them) and Arm with its BF16 extension. Elsewhere (x86 with
AVX2 only, e.g. AMD EPYC before Zen 4) PyTorch falls back to a generic loop that widens each element: on a 2-core
AMD EPYC (AVX2) a bf16 matmul ran at 0.9-1.4 GFLOP/s against 70-133 in fp32, at 512 x 512 and 1024 x 1024
(``python -c "import aimv2.train.precision as p; print(p.matmul_speeds())"``), so ``train.precision=bf16`` there
is a large slowdown, not a speed-up.

The test is PyTorch's own: the predicate it asks before it routes a bf16 matmul to oneDNN.
"""

from __future__ import annotations

import time

import torch


def cpu_bf16_is_fast() -> bool:
    """True where PyTorch has fast (oneDNN) bf16 matmuls on this CPU; unknown counts as True (nothing to warn about)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


def matmul_speeds(n: int = 512, reps: int = 5) -> dict[str, float]:
    """GFLOP/s of an n x n matmul on the CPU in fp32 and in bf16, best of ``reps`` (a quick look, not a benchmark)."""
    speeds = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        speeds[name] = 2 * n**3 / best / 1e9
    return speeds
