"""The run folder as a small transactional store, tried by fault injection: two writers, kills at chosen points of
a save (AIMV2_CRASH_AT), a torn metrics line, a truncated newest checkpoint, a changed tokenizer file, a disk that
fills (simulated ENOSPC, and the free-space check), and steps that write non-finite weights."""

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_RUN, subprocess_env

from aimv2.config import ConfigError, load_config
from aimv2.train import TrainingError, train
from aimv2.weights.run_folder import list_checkpoints

RUN = [*TINY_RUN, "train.steps=4", "train.checkpoint_every=2", "train.keep_last=3"]


def _cfg(out: Path, *extra: str):
    return load_config(ROOT / "configs/tiny-synthetic.yaml", [*RUN, f"out_dir={out}", *extra])


def _cli(out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "aimv2", "pretrain", str(ROOT / "configs/tiny-synthetic.yaml"), *RUN]
    return subprocess.run(
        [*cmd, f"out_dir={out}", *extra], env={**subprocess_env(), **(env or {})}, capture_output=True, text=True
    )


def _steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _encoder(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "encoder.safetensors")


def _temp_files(out: Path) -> list[Path]:
    return [p for p in out.rglob(".tmp-*")]


def test_a_second_run_on_a_locked_folder_is_refused_and_a_dead_holder_leaves_no_lock(tmp_path):
    from aimv2.train.run_lock import RunLock

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(  # another process holds the folder's lock (as a running `aimv2 pretrain` does)
        [
            sys.executable,
            "-c",
            f"from aimv2.train.run_lock import RunLock; RunLock({str(out)!r}).acquire(); "
            "print('locked', flush=True); import time; time.sleep(60)",
        ],  # fmt: skip
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(TrainingError, match=rf"in use by another run \(pid {holder.pid} on host "):
            train(_cfg(out, "seed=1"))
        assert not (out / "metrics.jsonl").exists() and not (out / "config.yaml").exists()  # nothing was touched
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: its lock died with it (the .lock file still names it, and is stale, not binding)
    assert (out / ".lock").exists()
    train(_cfg(out))
    assert _steps(out) == [1, 2, 3, 4]
    with RunLock(out):  # and the finished run released it
        pass


@pytest.mark.parametrize("point", ["written:step_00000004.pt", "before-export:4", "written:encoder.safetensors"])
def test_a_kill_at_any_point_of_a_save_resumes_to_an_export_of_the_newest_checkpoint(tmp_path, point):
    out = tmp_path / "run"
    r = _cli(out, env={"AIMV2_CRASH_AT": point})
    assert r.returncode == 137, r.stderr[-2000:]
    if point.startswith("written:"):
        assert _temp_files(out)  # the kill left its temporary file behind
    r = _cli(out)  # the same command again: resume (or finish) and repair
    assert r.returncode == 0, r.stderr[-2000:]
    assert not _temp_files(out)
    assert [p.name for p in list_checkpoints(out)][-1] == "step_00000004.pt"
    state = torch.load(list_checkpoints(out)[-1], weights_only=True)
    enc = {k.removeprefix("encoder."): v for k, v in state["model"].items() if k.startswith("encoder.")}
    exported = _encoder(out)  # Apple's layout: compare a tensor present in both under a known name
    torch.testing.assert_close(exported["trunk.post_trunk_norm.weight"], enc["norm.weight"], rtol=0, atol=0)
    torch.testing.assert_close(exported["preprocessor.patchifier.proj.bias"], enc["patch_embed.proj.bias"])
    assert _steps(out) == [1, 2, 3, 4]


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path, caplog):
    out = tmp_path / "run"
    train(_cfg(out, "train.steps=2"))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # a crash mid-write, no newline
    train(_cfg(out, "train.steps=4"))
    assert _steps(out) == [1, 2, 3, 4]
    assert "metrics.jsonl line 3 is not a metrics record" in caplog.text
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    out = tmp_path / "run"
    train(_cfg(out))
    ref = torch.load(list_checkpoints(out)[-1], weights_only=True)["model"]
    newest = list_checkpoints(out)[-1]
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # a torn file (a disk that failed under it)
    last = train(_cfg(out))  # resumes from step 2 and redoes steps 3-4
    assert last["step"] == 4
    assert "skipped the unreadable checkpoint" in caplog.text and "step_00000004.pt" in caplog.text
    assert (newest.parent / "step_00000004.pt.unreadable").exists()
    again = torch.load(list_checkpoints(out)[-1], weights_only=True)["model"]
    for k in ref:  # the redone steps give the same weights (deterministic resume)
        torch.testing.assert_close(again[k], ref[k], rtol=0, atol=0)


def test_a_changed_tokenizer_file_is_refused_on_resume(tmp_path):
    from aimv2.data.tokenizer import default_synthetic_tokenizer

    tok_file = tmp_path / "tok.json"
    default_synthetic_tokenizer(context_length=24).save(tok_file)
    out = tmp_path / "run"
    train(_cfg(out, f"data.tokenizer={tok_file}", "train.steps=2"))
    train(_cfg(out, f"data.tokenizer={tok_file}", "train.steps=3"))  # unchanged: resumes
    spec = json.loads(tok_file.read_text())  # retrained in place: other ids for the same words
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    tok_file.write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match="is not the tokenizer this run trained with"):
        train(_cfg(out, f"data.tokenizer={tok_file}", "train.steps=4"))


def test_a_full_disk_leaves_the_last_checkpoint_and_no_partial_file(tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(_cfg(out, "train.steps=2"))
    before = [p.name for p in list_checkpoints(out)]
    real_save = torch.save

    def full_disk(obj, f, *a, **k):  # writes part of the file, then the disk is full
        Path(f).write_bytes(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(TrainingError, match="filled up while writing the step-4 checkpoint"):
        train(_cfg(out))
    assert [p.name for p in list_checkpoints(out)] == before and not _temp_files(out)
    monkeypatch.setattr(torch, "save", real_save)
    # the free-space check refuses before writing anything
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(TrainingError, match=r"not enough free disk for the step-4 checkpoint .* MiB needed"):
        train(_cfg(out))
    monkeypatch.undo()
    assert train(_cfg(out))["step"] == 4  # space again: the same command resumes


def test_a_step_that_writes_non_finite_weights_stops_the_run_before_any_save(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_step = torch.optim.AdamW.step

    def poisoned(self, *a, **k):
        result = real_step(self, *a, **k)
        if self.state[self.param_groups[0]["params"][0]]["step"] >= 3:  # step 3 overflows one weight
            self.param_groups[0]["params"][0].data.fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    with pytest.raises(TrainingError, match="wrote non-finite values into the weights"):
        train(_cfg(out))
    assert [p.name for p in list_checkpoints(out)] == ["step_00000002.pt"]  # the good one, nothing after it
    state = torch.load(list_checkpoints(out)[-1], weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_a_run_whose_last_steps_are_skipped_is_not_done(tmp_path, monkeypatch):
    from aimv2.objectives import aimv2 as objective

    real = objective.pixel_targets
    calls = {"n": 0}

    def nan_from_step_4(images, patch_size, eps=1e-6):
        calls["n"] += 1
        t = real(images, patch_size, eps)
        return t * float("nan") if calls["n"] >= 4 else t

    monkeypatch.setattr(objective, "pixel_targets", nan_from_step_4)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"the last 1 step\(s\) of the run \(up to step 4\) were skipped"):
        train(_cfg(out, "train.max_bad_steps=5"))
    assert [p.name for p in list_checkpoints(out)] == ["step_00000002.pt"]  # step 4 is not saved as finished
    state = torch.load(list_checkpoints(out)[-1], weights_only=True)["model"]
    torch.testing.assert_close(_encoder(out)["trunk.post_trunk_norm.weight"], state["encoder.norm.weight"])
