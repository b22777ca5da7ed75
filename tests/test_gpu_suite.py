"""benchmarks/gpu_suite.py --smoke: every part of the GPU check at toy size on CPU, so the script cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_suite_smoke_runs_every_part(tmp_path):
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/gpu_suite.py"), "--smoke", "--out-dir", str(tmp_path)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert res["failed"] == [] and res["smoke"]
    parts = res["results"]
    for check in ("leakage", "parity", "ddp_fsdp2"):
        assert parts["checks"][check]["ok"] is True, check
    for part in ("encoder", "pretrain", "native"):
        assert "error" not in parts[part] and "skipped" not in parts[part], parts[part]
    assert parts["checks"]["parity"]["timm_max_abs_diff"] < 1e-4  # timm is a test dependency: the twin ran
    assert (tmp_path / "table.md").read_text().count("|") > 20
