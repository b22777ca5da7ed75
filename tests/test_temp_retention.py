"""A test run leaves (almost) nothing in the temp folder: pytest keeps every test's tmp_path of its last three runs
by default (a full run writes several GB of full-size checkpoints), so pyproject.toml keeps a run's folders only for
the tests that failed, and conftest.py points the caches a run fills (HF datasets' arrow copies, our feature cache)
into that base temp. Checked on a generated test file run by pytest in a child process with this project's pytest
settings, in a temp root of its own."""

import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import ROOT, subprocess_env

MB = 1 << 20

INNER = """
import os

import pytest


@pytest.fixture(scope="session")
def big(tmp_path_factory):
    path = tmp_path_factory.mktemp("big") / "weights.bin"
    path.write_bytes(os.urandom(4 << 20))
    return path


def test_writes_into_tmp_path(big, tmp_path):
    (tmp_path / "features.bin").write_bytes(os.urandom(4 << 20))


def test_fails_when_asked():
    assert not os.environ.get("INNER_FAIL")
"""


def _size(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _run(tmp_path, fail: bool) -> subprocess.CompletedProcess:
    env = subprocess_env()
    env["PYTEST_DEBUG_TEMPROOT"] = str(tmp_path / "temp")  # pytest's base temp goes under it
    env["INNER_FAIL"] = "1" if fail else ""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(ROOT / "pyproject.toml")]
    cmd += ["--rootdir", str(tmp_path / "inner"), str(tmp_path / "inner")]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)


def test_a_run_leaves_its_temp_folder_empty_and_a_failed_run_only_its_failures(tmp_path):
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "test_inner.py").write_text(textwrap.dedent(INNER))
    (tmp_path / "temp").mkdir()

    r = _run(tmp_path, fail=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert _size(tmp_path / "temp") < MB / 10, sorted(p for p in (tmp_path / "temp").rglob("*"))

    # a failing run keeps its folders (the failed test's, to look into, and the session's) until the next run
    for _ in range(2):
        r = _run(tmp_path, fail=True)
        assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    runs = sorted(p.name for p in (tmp_path / "temp").glob("pytest-of-*/pytest-[0-9]*"))
    assert len(runs) == 1, runs
    assert _size(tmp_path / "temp") < 6 * MB  # the session fixture's file; the passing test's folder is gone


def test_caches_point_into_the_base_temp(tmp_path_factory):
    """conftest.py's session fixture: HF datasets' cache and our feature cache live in the run's base temp."""
    import os

    base = tmp_path_factory.getbasetemp()
    for key in ("HF_DATASETS_CACHE", "AIMV2_CACHE"):
        assert base in Path(os.environ[key]).parents, (key, os.environ[key])
    from aimv2.eval.feature_cache import default_cache_dir

    assert base in default_cache_dir().parents
