"""Every anticipated user error through the real `aimv2` command: exit status 2, exactly one line on stderr,
`aimv2 COMMAND: error: ...`, no traceback; `--debug` (or AIMV2_DEBUG=1) adds the traceback; a bug keeps it.

Each row of CASES builds its bad input in a fresh folder and names a fragment the line must hold (the file, the
key, the valid range), so a message that loses its "where" fails too."""

import errno
import io
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import QUIET, ROOT, TINY_RUN, subprocess_env

from aimv2.cli import main

PRETRAIN = ["pretrain", str(ROOT / "configs" / "tiny-synthetic.yaml"), *TINY_RUN, "train.steps=1", "--quiet"]
# every ablate row must be refused before the first run starts (the old code trained the points before a bad one)
ABLATE = ["ablate", str(ROOT / "configs" / "tiny-synthetic.yaml"), *TINY_RUN, "--steps", "1", "--out-dir", "abl"]
LINE = re.compile(r"aimv2 [a-z]+( [a-z]+)?: error: \S.*")


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory) -> Path:
    """A random tiny encoder (32 px, 2 blocks) in Apple's layout."""
    from aimv2 import create_model
    from aimv2.weights import save_encoder

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("enc") / "encoder.safetensors"
    save_encoder(create_model("aimv2-tiny-patch8-32", depth=2), path)
    return path


@pytest.fixture(scope="module")
def lit_run(tmp_path_factory, encoder_file) -> Path:
    """A one-step LiT run against the tiny encoder: enough for `aimv2 zeroshot` to load."""
    out = tmp_path_factory.mktemp("lit") / "run"
    lit = [f"out_dir={out}", f"lit.encoder={encoder_file}", "lit.text.depth=1", "train.steps=1", "train.batch_size=8"]
    assert main(["lit", str(ROOT / "configs" / "lit-tiny.yaml"), *lit, *QUIET, "--quiet"]) == 0
    return out


def _images(folder: Path, n: int = 2, broken: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        if broken:
            (folder / f"{i}.jpg").write_bytes(b"not a jpeg")
        else:
            from PIL import Image

            Image.new("RGB", (40, 40), (40 * i, 90, 200)).save(folder / f"{i}.png")
    return folder


def _bad_shard(path: Path, n: int = 120) -> Path:
    """A webdataset tar whose every image is garbage: the fault rate trips after the first 100 samples."""
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            for name, data in ((f"{i:04d}.jpg", b"not a jpeg"), (f"{i:04d}.txt", b"a caption")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _yaml_syntax(t: Path):
    (t / "bad.yaml").write_text("train:\n  steps: 1\n   batch_size: 8\n")
    return ["pretrain", str(t / "bad.yaml")], "bad.yaml, line 3"


def _read_only_out_dir(t: Path, monkeypatch):
    # the tests may run as root, for whom chmod does not make a folder read-only: the file system says no instead
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if str(self).startswith(str(t / "ro")):
            raise PermissionError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    return [*PRETRAIN, f"out_dir={t / 'ro' / 'run'}"], "read-only file system"


def _init_from_unreadable(t: Path):
    (t / "enc.safetensors").write_bytes(b"\x00" * 64)
    return [*PRETRAIN, f"out_dir={t / 'run'}", f"model.init_from={t / 'enc.safetensors'}"], "enc.safetensors"


def _jsonl_all_bad_utf8(t: Path):
    (t / "c.jsonl").write_bytes(b'{"path": "a.png", "caption": "caf\xe9"}\n')
    argv = [*PRETRAIN, f"out_dir={t / 'run'}", "data.source=folder", f"data.folder={t / 'c.jsonl'}"]
    return argv, "bad_caption"


def _convert_onto_file(t: Path, encoder_file: Path):
    (t / "out").write_text("a file, not a folder")
    return ["convert", str(encoder_file), "--to", "hf", str(t / "out"), "--overwrite"], "is a file"


def _extract(t: Path, encoder_file: Path, *extra: str, broken: bool = False, out: str = "f.safetensors"):
    images = _images(t / "img", broken=broken)
    return ["extract", str(encoder_file), str(images), str(t / out), "--workers", "0", "--no-progress", *extra]


def _extract_exists(t: Path, encoder_file: Path):
    (t / "f.safetensors").write_bytes(b"earlier features")
    return _extract(t, encoder_file), "--overwrite"


def _extract_unwritable(t: Path, encoder_file: Path):
    (t / "afile").write_text("")
    return _extract(t, encoder_file, out="afile/f.safetensors"), "OUT's folder is a file"


def _export_onto_weights_file(t: Path, encoder_file: Path):
    (t / "enc.onnx.data").write_bytes(b"the weights of an earlier, larger export")
    return ["export", str(encoder_file), str(t / "enc.onnx"), "--no-check"], "enc.onnx.data exists"


def _templates_with_braces(t: Path, lit_run: Path):
    (t / "templates.txt").write_text("a photo of a {}.\na {} in {style} style\n")
    images = _images(t / "img" / "cat")
    return ["zeroshot", str(lit_run), "--images", str(images.parent), "--templates", str(t / "templates.txt")], "line 2"


def _zeroshot_flat_folder(t: Path, lit_run: Path):
    return ["zeroshot", str(lit_run), "--images", str(_images(t / "flat"))], "class sub-folders"


def _tokenizer_exists(t: Path):
    (t / "caps.txt").write_text("a red square\na blue circle\n" * 20)
    (t / "tok.json").write_text("{}")
    return ["tokenizer", "train", str(t / "caps.txt"), "--vocab-size", "300", "--out", str(t / "tok.json")], "tok.json"


def _probe_file(t: Path, encoder: Path, dim: int = 192, **edit) -> Path:
    """A linear classifier file as `aimv2 probe --save` writes it, for ``encoder``, its head ``dim`` wide."""
    from aimv2.eval.classifier import EncoderSpec, save_classifier
    from aimv2.eval.frozen_encoder import FeatureSettings
    from aimv2.eval.probe import LinearProbe

    head, spec = LinearProbe(dim, 2), EncoderSpec(str(encoder))
    return save_classifier(t / "probe.safetensors", head, ["a", "b"], spec, FeatureSettings(num_workers=0, **edit))


def _classify_encoder_changed(t: Path):
    """The probe was trained on a 192-wide encoder; its file now holds a 96-wide one."""
    from aimv2 import create_model
    from aimv2.weights import save_encoder

    enc = save_encoder(create_model("aimv2-tiny-patch8-32", depth=2, embed_dim=96, num_heads=3), t / "enc.safetensors")
    return ["classify", str(_probe_file(t, enc)), str(_images(t / "img")), "--no-progress"], "[N, 96]"


def _classify_blocks_gone(t: Path, encoder_file: Path):
    """The probe read block 3 of a deeper encoder; the file now holds a 2-block one."""
    return ["classify", str(_probe_file(t, encoder_file, blocks=[3])), str(_images(t / "img"))], "out of range"


def _classify_head_edited(t: Path, encoder_file: Path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    probe = _probe_file(t, encoder_file)
    with safe_open(probe, "pt") as f:
        meta = f.metadata()
    sd = load_file(probe)
    sd["head.linear.weight"] = sd["head.linear.weight"][:, :100].contiguous()
    save_file(sd, probe, metadata=meta)
    return ["classify", str(probe), str(_images(t / "img"))], "linear.weight: checkpoint [2, 100] vs model [2, 192]"


def _hf_folder(t: Path, encoder_file: Path, config: str | None = None, index: str | None = None) -> Path:
    """A transformers folder of the tiny encoder (`aimv2 convert --to hf`), its config.json or index replaced."""
    assert main(["convert", str(encoder_file), "--to", "hf", str(t / "hf")]) == 0
    if config is not None:
        (t / "hf" / "config.json").write_text(config)
    if index is not None:
        (t / "hf" / "model.safetensors").rename(t / "hf" / "model-00001-of-00001.safetensors")
        (t / "hf" / "model.safetensors.index.json").write_text(index)
    return t / "hf"


def _pretrain_bad_tokenizer(t: Path):
    (t / "tok.json").write_text('{"model": ')
    return [*PRETRAIN, f"out_dir={t / 'run'}", f"data.tokenizer={t / 'tok.json'}"], "tok.json"


def _tokenizer_train(t: Path, *opts: str) -> list[str]:
    (t / "caps.txt").write_text("a red square\na blue circle\n")
    return ["tokenizer", "train", str(t / "caps.txt"), *opts, "--out", str(t / "tok.json")]


CASES = {
    "yaml syntax error": _yaml_syntax,
    "config file missing": lambda t: (["pretrain", str(t / "nope.yaml")], "nope.yaml"),
    "override not yaml": lambda t: ([*PRETRAIN, "train.steps=[1"], "train.steps=[1"),
    "decoder typo": lambda t: ([*PRETRAIN, "model.decoder={depht: 1}"], "depht"),
    "encoder override typo": lambda t: ([*PRETRAIN, "model.encoder_overrides.depht=1"], "depht"),
    "betas out of range": lambda t: ([*PRETRAIN, "optim.betas=[1.5,0.9]"], "optim.betas[0]=1.5"),
    "eps not positive": lambda t: ([*PRETRAIN, "optim.eps=-1"], "optim.eps=-1.0 is out of range; give a finite"),
    "lr infinite": lambda t: ([*PRETRAIN, "optim.lr=inf"], "optim.lr=inf is out of range"),
    "alpha nan": lambda t: ([*PRETRAIN, "model.alpha=nan"], "model.alpha=nan"),
    "alpha negative": lambda t: ([*PRETRAIN, "model.alpha=-0.5"], "[0, inf)"),
    "seed negative": lambda t: ([*PRETRAIN, "seed=-1"], "[0, 4294967295]"),
    "seed too large": lambda t: ([*PRETRAIN, "seed=18446744073709551616"], "seed="),
    "prefetch factor zero": lambda t: ([*PRETRAIN, "data.prefetch_factor=0"], "data.prefetch_factor=0"),
    "max bad steps zero": lambda t: ([*PRETRAIN, "train.max_bad_steps=0"], "train.max_bad_steps=0"),
    "folder missing": lambda t: ([*PRETRAIN, "data.source=folder", f"data.folder={t / 'nope'}"], "data.folder"),
    "jsonl not utf-8": _jsonl_all_bad_utf8,
    "shard missing": lambda t: ([*PRETRAIN, "data.source=shards", f"data.shards={t / 'gone.tar'}"], "gone.tar"),
    "read-only out_dir": _read_only_out_dir,
    "init_from unreadable": _init_from_unreadable,
    "convert --overwrite onto a file": _convert_onto_file,
    "extract all unreadable": lambda t, encoder_file: (_extract(t, encoder_file, broken=True), "none of the 2 images"),
    "extract --blocks 99": lambda t, encoder_file: (_extract(t, encoder_file, "--blocks", "99"), "--blocks 99 out"),
    "extract onto existing file": _extract_exists,
    "extract --workers -1": lambda t, encoder_file: (_extract(t, encoder_file, "--workers", "-1"), "workers must be"),
    "export onto a weights file": _export_onto_weights_file,
    "export --opset 17": lambda t, encoder_file: (
        ["export", str(encoder_file), str(t / "e.onnx"), "--opset", "17"],
        "give one of 18 to 25",
    ),
    "extract unwritable out": _extract_unwritable,
    "classify after the encoder changed width": _classify_encoder_changed,
    "classify after the encoder lost blocks": _classify_blocks_gone,
    "classify with an edited head": _classify_head_edited,
    "hf config.json not JSON": lambda t, encoder_file: (
        ["extract", str(_hf_folder(t, encoder_file, config='{"hidden_size": 192,\n')), str(_images(t / "i")), "f.npy"],
        "config.json, line 2, column 1",
    ),
    "hf index without weight_map": lambda t, encoder_file: (
        [
            "convert",
            str(_hf_folder(t, encoder_file, index='{"metadata": {}}')),
            "--to",
            "apple",
            str(t / "a.safetensors"),
        ],
        "no weight_map in",
    ),
    "tokenizer.json not JSON": _pretrain_bad_tokenizer,
    "export --set img_size=0": lambda t, encoder_file: (
        ["export", str(encoder_file), str(t / "e.onnx"), "--set", "img_size=0"],
        "'img_size[0]': 0",
    ),
    "export --set num_heads=5": lambda t, encoder_file: (
        ["export", str(encoder_file), str(t / "e.onnx"), "--set", "num_heads=5"],
        "not divisible by num_heads 5",
    ),
    "export into a file's folder": lambda t, encoder_file: (
        (t / "afile").write_text("") or ["export", str(encoder_file), str(t / "afile" / "e.onnx"), "--no-check"],
        "a part of the path is a file",
    ),
    "extract --img-size 0": lambda t, encoder_file: (_extract(t, encoder_file, "--img-size", "0"), "--img-size 0"),
    "extract --device bogus": lambda t, encoder_file: (_extract(t, encoder_file, "--device", "bogus"), "'bogus'"),
    "classify --device cuda:7": lambda t, encoder_file: (
        ["classify", str(_probe_file(t, encoder_file)), str(_images(t / "img")), "--device", "cuda:7"],
        "--device cuda:7",
    ),
    "convert --to hf onto a .safetensors name": lambda t, encoder_file: (
        ["convert", str(encoder_file), "--to", "hf", str(t / "hf.safetensors")],
        "give a folder name",
    ),
    "zeroshot template braces": _templates_with_braces,
    "zeroshot flat folder": _zeroshot_flat_folder,
    "demo --steps 0": lambda t: (["demo", "--steps", "0", "--out-dir", str(t / "demo")], "--steps"),
    "tokenizer onto existing file": _tokenizer_exists,
    "tokenizer --vocab-size 40": lambda t: (_tokenizer_train(t, "--vocab-size", "40"), "--vocab-size must be >= 259"),
    "tokenizer --limit -1": lambda t: (_tokenizer_train(t, "--vocab-size", "300", "--limit", "-1"), "--limit -1"),
    "data inspect --limit 0": lambda t: (
        ["data", "inspect", str(ROOT.parent / "shared" / "data" / "cc12m-train-0000.tar"), "--limit", "0"],
        "--limit 0",
    ),
    "data inspect --sheet under a file": lambda t: (
        (t / "afile").write_text("") or ["data", "inspect", str(t / "gone.tar"), "--sheet", str(t / "afile" / "s.png")],
        "(" + str(t / "afile") + ")",
    ),
    "hub spec with an empty revision": lambda t: (
        ["export", "hf:apple/aimv2-large-patch14-224@", str(t / "e.onnx")],
        "@REVISION",
    ),
    "caption --length-penalty nan": lambda t: (
        ["caption", str(t / "run"), str(_images(t / "img")), "--length-penalty", "nan"],
        "--length-penalty must be a finite number",
    ),
    "probe --epochs 0": lambda t, encoder_file: (
        [
            *["probe", str(encoder_file), "--train", str(_images(t / "img" / "a").parent), "--val", str(t / "img")],
            *["--method", "linear", "--epochs", "0", "--no-cache", "--workers", "0", "--no-progress"],
        ],
        "--epochs must be >= 1",
    ),
    "probe --save onto an existing file": lambda t, encoder_file: (
        (t / "p.safetensors").write_text("")
        or [
            *["probe", str(encoder_file), "--train", str(_images(t / "img" / "a").parent), "--val", str(t / "img")],
            *["--method", "linear", "--save", str(t / "p.safetensors"), "--no-cache", "--workers", "0"],
        ],
        "--overwrite",
    ),
    "data inspect missing shard": lambda t: (["data", "inspect", str(t / "gone.tar")], "gone.tar"),
    "ablate bad value in a later point": lambda t: ([*ABLATE, "--grid", "alpha=0.2,abc"], "point alpha=abc"),
    "ablate grid without values": lambda t: ([*ABLATE, "--grid", "alpha="], "gives no values"),
    "ablate one key in two axes": lambda t: ([*ABLATE, "--grid", "alpha=0.2", "--grid", "alpha=0.4"], "two axes"),
    "ablate seeds not integers": lambda t: ([*ABLATE, "--seeds", "a,b"], "--seeds 'a,b'"),
    "ablate no seeds": lambda t: ([*ABLATE, "--seeds", ","], "--seeds is empty"),
    "ablate steps 0": lambda t: ([*ABLATE[:-4], "--steps", "0"], "train.steps=0"),
    "ablate unknown probe task": lambda t: ([*ABLATE, "--probe-tasks", "count,bogus"], "--probe-tasks bogus"),
    "ablate probe-val 0": lambda t: ([*ABLATE, "--probe-val", "0"], "--probe-val 0 must be at least 1"),
}


def _fixtures(case, request, tmp_path, monkeypatch):
    names = case.__code__.co_varnames[: case.__code__.co_argcount]
    given = {"t": tmp_path, "monkeypatch": monkeypatch}
    return [given[n] if n in given else request.getfixturevalue(n) for n in names]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_status_2(name, request, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AIMV2_DEBUG", raising=False)
    case = CASES[name]
    argv, fragment = case(*_fixtures(case, request, tmp_path, monkeypatch))
    capsys.readouterr()  # what the fixtures printed
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and LINE.fullmatch(lines[0]), err
    assert lines[0].startswith(f"aimv2 {' '.join(argv[:2]) if argv[0] in ('data', 'tokenizer') else argv[0]}: ")
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err
    if argv[0] == "ablate":
        assert not (tmp_path / "abl").exists()  # refused before any run started


def test_debug_flag_and_environment_show_the_traceback(tmp_path, monkeypatch, capsys):
    bad = ["pretrain", str(tmp_path / "nope.yaml")]
    for argv, env in (([*bad], "1"), (["--debug", *bad], "")):
        monkeypatch.setenv("AIMV2_DEBUG", env)
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "ConfigError" in err
        assert err.splitlines()[-1] == f"aimv2 pretrain: error: config file not found ({tmp_path / 'nope.yaml'}); " + (
            "give a YAML file, e.g. one of configs/"
        )
    monkeypatch.setenv("AIMV2_DEBUG", "0")
    assert main(bad) == 2 and "Traceback" not in capsys.readouterr().err


def test_top_level_help_documents_errors_and_debug(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--debug" in out and "AIMV2_DEBUG=1" in out and "exits with status 2" in out


def test_a_bug_keeps_its_traceback(monkeypatch):
    """An exception no input explains (here a TypeError) is not turned into a user error."""
    import aimv2.cli.pretrain as pretrain

    def run(args):
        raise TypeError("a bug")

    monkeypatch.setattr(pretrain, "run", run)
    with pytest.raises(TypeError, match="a bug"):
        main(["pretrain", "c.yaml"])


def test_fault_rate_in_a_dataloader_worker_is_one_line(tmp_path):
    """The worker's FaultRateError comes back re-raised by the DataLoader with the worker's traceback in its
    message; the line keeps the worker's own message only."""
    shard = _bad_shard(tmp_path / "bad.tar")
    argv = [*PRETRAIN, f"out_dir={tmp_path / 'run'}", "data.source=shards", f"data.shards={shard}"]
    argv += ["data.num_workers=1", "data.max_fault_rate=0.5"]
    r = subprocess.run([sys.executable, "-m", "aimv2", *argv], capture_output=True, text=True, env=subprocess_env())
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and LINE.fullmatch(errors[0]), r.stderr[-3000:]
    assert "bad_image" in errors[0] and "DataLoader worker" not in errors[0] and "Traceback" not in r.stderr
    assert r.stderr.splitlines()[-1] == errors[0]  # the line ends the output, after the skipped-sample warnings


def test_a_stalled_pipe_command_is_named_while_it_hangs(tmp_path, monkeypatch, caplog, capsys):
    """`pipe:` shards run a shell command; one that sends nothing for a while is named in a warning (the read
    goes on: a slow network is no fault), and its data is read as usual once it comes."""
    import aimv2.data.sources.tar as tar

    good = tmp_path / "good.tar"
    with tarfile.open(good, "w") as t:
        from PIL import Image

        png = io.BytesIO()
        Image.new("RGB", (8, 8), (200, 10, 10)).save(png, format="PNG")
        for name, data in (("0.png", png.getvalue()), ("0.txt", b"a red square")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(tar, "PIPE_STALL_S", 0.2)
    url = f"pipe:sleep 0.8; cat {good}"
    with caplog.at_level("WARNING", logger="aimv2.data.sources.tar"):
        assert main(["data", "inspect", url, "--min-samples", "1"]) == 0
    stalls = [r.getMessage() for r in caplog.records if "has sent no data" in r.getMessage()]
    assert stalls and url in stalls[0]
    assert '"samples": 1' in capsys.readouterr().out
