"""keep_freed_host_memory: large tensors freed and allocated again every step stop faulting in fresh pages; user
settings and other C libraries are left alone; the trainer applies it when it trains on the CPU.

The allocation behaviour is measured in a child process (the thresholds are process-wide and cannot be undone),
by the minor page faults the kernel counts for it (getrusage)."""

import json
import os
import platform
import subprocess
import sys

import pytest
from conftest import TINY_RUN, subprocess_env

from aimv2.train import host_memory

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's"
)

# A stand-in for a training step's big tensors (the logits and their gradient, a vocabulary-sized weight gradient,
# activations) allocated, written and freed 12 times; the faults of the last 4 "steps", and what the call said.
STEPS = r"""
import json, resource, sys, torch
from aimv2.train.host_memory import keep_freed_host_memory
why = keep_freed_host_memory() if sys.argv[1] == "keep" else "not called"
faults = []
for step in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.empty(n).fill_(1.0) for n in (20_000_000, 20_000_000, 12_000_000, 2_000_000, 2_000_000)]
    del tensors
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"why": why, "faults": faults[-4:]}))
"""
PAGES_PER_STEP = 56_000_000 * 4 // 4096  # every page of the step's tensors, if each were faulted in afresh


def _steps(mode: str, **env) -> dict:
    clean = {k: v for k, v in subprocess_env().items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    r = subprocess.run(
        [sys.executable, "-c", STEPS, mode], env={**clean, **env}, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


@glibc
def test_kept_memory_is_reused_instead_of_faulted_in_again():
    default = _steps("default")
    kept = _steps("keep")
    assert kept["why"] is None
    # glibc's own thresholds: the blocks over 32 MB are unmapped on free and faulted in again every step
    assert min(default["faults"]) > 0.5 * PAGES_PER_STEP, default
    assert max(kept["faults"]) < 0.02 * PAGES_PER_STEP, kept


@glibc
@pytest.mark.parametrize(
    "env, why",
    [
        ({"MALLOC_TRIM_THRESHOLD_": "131072"}, "MALLOC_TRIM_THRESHOLD_ is set"),
        ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}, "GLIBC_TUNABLES is set"),
        ({"LD_PRELOAD": "/nonexistent/libjemalloc.so"}, "another malloc is preloaded"),
    ],
)
def test_what_the_user_chose_is_left_alone(env, why):
    kept = _steps("keep", **env)
    assert kept["why"] == why
    if "LD_PRELOAD" not in env:  # (a missing preload only warns; glibc's malloc still runs)
        assert min(kept["faults"]) > 0.5 * PAGES_PER_STEP, kept  # the user's thresholds (glibc's defaults) rule


def test_outside_glibc_nothing_is_called(monkeypatch):
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setattr(host_memory.ctypes, "CDLL", lambda *a: pytest.fail("libc loaded outside glibc"))
    assert host_memory.keep_freed_host_memory() == "not glibc"


def test_the_trainer_keeps_host_memory_when_it_trains_on_the_cpu(tmp_path, monkeypatch):
    from aimv2.config import load_config
    from aimv2.train import train, trainer

    calls = []
    monkeypatch.setattr(trainer, "keep_freed_host_memory", lambda: calls.append(os.getpid()))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(
        os.path.join(root, "configs/tiny-synthetic.yaml"),
        [*TINY_RUN, f"out_dir={tmp_path / 'run'}", "train.steps=1", "train.device=cpu"],
    )
    train(cfg)
    assert calls == [os.getpid()]
