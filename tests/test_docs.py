"""The documentation against the code: generated pages are current, every code block says how it is checked, and
the blocks marked `run` run as written."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# The line right before every fenced block says how it is checked; `run` blocks are run below.
MARKS = ("run", "needs data", "needs gpu", "needs download", "slow", "output")
MARK = re.compile(r"^<!-- docs: (?P<mark>[a-z ]+) -->$")


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, DOCS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pages() -> list[Path]:
    incoming = sorted((ROOT / "docs-incoming").glob("*.md")) if (ROOT / "docs-incoming").is_dir() else []
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md")), *incoming]


def code_blocks(path: Path) -> list[tuple[int, str | None, str, str]]:
    """(line, mark or None, language, body) of every fenced block of a Markdown file."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        stripped = lines[i].strip()
        if stripped.startswith("```"):
            fence, lang, start = stripped[: len(stripped) - len(stripped.lstrip("`"))], stripped.lstrip("`"), i
            i += 1
            while i < len(lines) and lines[i].strip() != fence:
                i += 1
            m = MARK.match(lines[start - 1].strip()) if start else None
            body = "\n".join(line[len(lines[start]) - len(lines[start].lstrip()) :] for line in lines[start + 1 : i])
            blocks.append((start + 1, m["mark"] if m else None, lang.strip(), body))
        i += 1
    return blocks


def run_blocks() -> list:
    return [
        pytest.param(path, lang, body, id=f"{path.relative_to(ROOT)}:{line}")
        for path in pages()
        if "docs-incoming" not in path.parts
        for line, mark, lang, body in code_blocks(path)
        if mark == "run"
    ]


def test_generated_pages_are_current():
    stale = load_script("gen_pages").stale()
    names = ", ".join(str(p.relative_to(ROOT)) for p in stale)
    assert not stale, f"generated docs are stale: {names}; regenerate with `python docs/gen_pages.py`"


def test_every_code_block_carries_a_mark():
    problems = []
    for path in pages():
        for line, mark, _, _ in code_blocks(path):
            if mark not in MARKS:
                problems.append(f"{path.relative_to(ROOT)}:{line}")
    assert not problems, f"code blocks without a `<!-- docs: {' | '.join(MARKS)} -->` line before them: {problems}"


def test_code_blocks_are_found():
    """The parser of the two tests above finds blocks, marks and bodies (so they cannot pass on nothing)."""
    blocks = code_blocks(DOCS / "getting-started.md")
    marks = [mark for _, mark, _, _ in blocks]
    assert "run" in marks and "slow" in marks and len(blocks) >= 4
    assert any(lang == "python" and "create_pretraining_model" in body for _, _, lang, body in blocks)


def commands(body: str) -> list[list[str]]:
    """The shell commands of a block, one per line (continuations joined, comments dropped)."""
    return [shlex.split(line, comments=True) for line in body.replace("\\\n", " ").splitlines() if line.strip()]


@pytest.mark.parametrize(("path", "lang", "body"), run_blocks())
def test_run_block(path, lang, body, tmp_path, monkeypatch):
    """A block marked `run` runs as written, in an empty folder that sees the checkout's configs/: Python in this
    process; shell blocks of `aimv2` commands only through `aimv2.cli.main` in this process too, other shell blocks
    through bash with `aimv2` as this interpreter's `-m aimv2`."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    if lang == "python":
        exec(compile(body, f"{path.name}-block", "exec"), {"__name__": "__docs__"})
    elif lang in ("bash", "sh", "shell") and all(c[:1] == ["aimv2"] for c in commands(body)):
        from aimv2.cli import main

        for command in commands(body):
            assert main(command[1:]) == 0, f"{path.name}: `{' '.join(command)}` failed"
    elif lang in ("bash", "sh", "shell"):
        script = re.sub(r"(?m)^(\s*)aimv2 ", rf"\1{sys.executable} -m aimv2 ", body)
        env = dict(subprocess_env(), COLUMNS="100")
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{path.name} block failed:\n{script}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
    else:
        pytest.fail(f"a `run` block in {lang or 'no language'}: mark it output, or give it python or bash")
    assert os.getcwd() == str(tmp_path)


def test_documented_ranges_are_the_ones_the_checks_enforce():
    """Every numeric range the config page shows is enforced as shown: a value just outside each bound is refused
    with an error naming the key, the bound itself passes unless the interval is open there."""
    from aimv2.config import Config, ConfigError, LitConfig, validate
    from aimv2.config.detection import DetectionConfig, check_detection
    from aimv2.config.vlm import VLMConfig, validate_vlm

    # the section a key is in -> (its run config, with the required keys set; that config's validator)
    def vlm_config():
        cfg = VLMConfig()
        cfg.vlm.encoder, cfg.vlm.lm = "aimv2-tiny-patch8-64", "lm-folder"
        return cfg

    def detection_config():
        cfg = DetectionConfig()
        cfg.detect.encoder = "aimv2-tiny-patch8-64"
        return cfg

    runs = {
        "lit.": (LitConfig, validate),
        "vlm.": (vlm_config, validate_vlm),
        "detect.": (detection_config, check_detection),
    }

    valid, _ = load_script("gen_pages")._valid_values()
    interval = re.compile(r"^(?P<lo_open>[\[(])(?P<lo>-?[\d.e+-]+), (?P<hi>-?[\d.e+-]+|inf)(?P<hi_open>[\])])$")
    checked = 0
    for key, text in valid.items():
        m = interval.match(text)
        if not m or "[" in key:
            continue
        lo, hi = float(m["lo"]), float(m["hi"])

        def config_with(value, key=key):
            make, _ = runs.get(key.split(".")[0] + ".", (Config, validate))
            cfg = make()
            cfg.data.native.enabled = key.startswith("data.native.")
            *path, name = key.split(".")
            target = cfg
            for part in path:
                target = getattr(target, part)
            current = getattr(target, name)
            setattr(target, name, type(current)(value) if isinstance(current, int | float) else value)
            if key.startswith("lit."):
                cfg.lit.encoder = "aimv2-tiny-patch8-64"
            return cfg

        step = 1  # outside every bound, for integer and float keys alike
        for bad in [lo - step if m["lo_open"] == "[" else lo] + (
            [hi + step if m["hi_open"] == "]" else hi] * (hi < 1e30)
        ):
            with pytest.raises(ConfigError, match=re.escape(key)):
                runs.get(key.split(".")[0] + ".", (Config, validate))[1](config_with(bad))
        checked += 1
    assert checked >= 15, f"only {checked} ranges parsed from the config page"


def test_readme_is_a_landing_page_that_opens_with_the_two_commands():
    """The README's first code block is `make demo` then `make test`, and it stays short (the rest is in docs/)."""
    readme = ROOT / "README.md"
    first = code_blocks(readme)[0][3].splitlines()
    assert [line.split()[:2] for line in first] == [["make", "demo"], ["make", "test"]]
    assert len(readme.read_text().splitlines()) <= 200
