"""benchmarks/gpu_suite.py --smoke: every part of the GPU check at toy size on CPU, so the script cannot rot."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def import_suite(monkeypatch):
    """benchmarks/gpu_suite.py as a module (it imports its neighbours, such as machine.py, by their names)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("gpu_suite")


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
    for part in ("pretrain", "pretrain_ac", "pretrain_sdpa", "encoder", "native"):
        assert "error" not in parts[part] and "skipped" not in parts[part], parts[part]
    assert parts["ratios"]["pretrain/pretrain_sdpa samples/s"] > 0
    assert parts["checks"]["parity"]["timm_max_abs_diff"] < 1e-4  # timm is a test dependency: the twin ran
    assert (tmp_path / "table.md").read_text().count("|") > 20
    assert res["pending"] == []


def test_gpu_suite_writes_what_it_has_after_each_part(tmp_path, monkeypatch):
    """A run cut short (the GPU lease's time limit) keeps the parts it finished: the files are written after every
    part, naming the parts still to run."""
    gpu_suite = import_suite(monkeypatch)
    seen = []

    def fake_part(size, device):
        if seen:  # the part before this one is already on disk
            seen.append(json.loads((tmp_path / "gpu_suite.json").read_text())["pending"])
        else:
            seen.append(None)
        return {"value": 1.0}

    for name in ("encoder", "pretrain", "native"):
        monkeypatch.setitem(gpu_suite.PARTS, name, fake_part)
    assert gpu_suite.main(["--smoke", "--parts", "pretrain,encoder,native", "--out-dir", str(tmp_path)]) == 0
    assert seen == [None, ["encoder", "native"], ["native"]]
    res = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert list(res["results"]) == ["pretrain", "encoder", "native"] and res["pending"] == []


def test_gpu_suite_names_an_unknown_part(capsys, monkeypatch):
    gpu_suite = import_suite(monkeypatch)
    with pytest.raises(SystemExit) as e:
        gpu_suite.main(["--smoke", "--parts", "checks,mfu"])
    assert e.value.code == 2
    assert (
        "unknown part(s) mfu; choose from checks,pretrain,pretrain_ac,pretrain_sdpa,encoder,native"
        in capsys.readouterr().err
    )
