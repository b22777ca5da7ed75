"""Every anticipated bad input to `aimv2 vlm` through the real command: exit status 2, exactly one line on stderr,
`aimv2 vlm ACTION: error: ...`, no traceback (tests/test_cli_errors.py's pattern, for the VLM commands).

Each row of CASES builds its bad input in a fresh folder and names a fragment the line must hold (the file, the
key, the valid range, both shapes), so a message that loses its "where" fails too."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import QUIET, ROOT

from aimv2.cli import main

LINE = re.compile(r"aimv2 vlm [a-z-]+: error: \S.*")
STAGE1 = str(ROOT / "configs" / "vlm-tiny-stage1.yaml")
QA = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is fastest, and spares a machine whose cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Path:
    """A tiny encoder, a tiny LM, an image, and a one-step stage-1 run on them."""
    from PIL import Image

    from aimv2.weights import create_model, save_encoder
    from aimv2.weights.lm import build_tiny_lm

    d = tmp_path_factory.mktemp("vlm-cli")
    torch.manual_seed(0)
    save_encoder(create_model("aimv2-tiny-patch8-64", depth=1, img_size=16), d / "encoder.safetensors")
    build_tiny_lm(d / "lm", width=32, depth=1, heads=2)
    (d / "images").mkdir()
    Image.new("RGB", (16, 16), (200, 0, 0)).save(d / "images" / "a.png")
    argv = ["vlm", "train", STAGE1, *_base(d), f"out_dir={d / 'run'}", "train.steps=1", "--quiet"]
    assert main(argv) == 0
    return d


def _base(d: Path) -> list[str]:
    return [f"vlm.encoder={d / 'encoder.safetensors'}", "vlm.encoder_overrides={depth: 1, img_size: 16}",
            f"vlm.lm={d / 'lm'}", "vlm.max_length=64", "train.batch_size=2", *QUIET]  # fmt: skip


def _train(t: Path, d: Path, *extra: str) -> list[str]:
    return ["vlm", "train", STAGE1, *_base(d), f"out_dir={t / 'out'}", "train.steps=1", *extra]


def _llava(t: Path, d: Path, records) -> list[str]:
    (t / "data.json").write_text(json.dumps(records))
    return _train(t, d, "vlm.data=llava", f"vlm.json={t / 'data.json'}", f"vlm.images={d / 'images'}")


def _record(conv, image="a.png"):
    return {"image": image, "conversations": conv}


def _lm_copy(t: Path, d: Path, **change) -> Path:
    """A copy of the tiny LM folder, rebuilt wider (or with a file removed / truncated)."""
    from aimv2.weights.lm import build_tiny_lm

    out = t / "lm2"
    if change.get("width"):
        build_tiny_lm(out, width=change["width"], depth=1, heads=2)
    else:
        shutil.copytree(d / "lm", out)
    for name in change.get("drop", ()):
        (out / name).unlink()
    if change.get("truncate"):
        w = out / "model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    return out


def _run_copy(t: Path, d: Path, lm: Path | None = None) -> Path:
    run = t / "run"
    shutil.copytree(d / "run", run)
    if lm is not None:
        cfg = (run / "config.yaml").read_text().replace(str(d / "lm"), str(lm))
        (run / "config.yaml").write_text(cfg)
    return run


def _ask(run: Path, d: Path, *extra: str) -> list[str]:
    return ["vlm", "ask", str(run), str(d / "images" / "a.png"), "What colour?", *extra]


CASES = {
    "turns 0": lambda t, d: (_train(t, d, "vlm.turns=0"), "vlm.turns must be an integer >= 1"),
    "projector_hidden -5": lambda t, d: (_train(t, d, "vlm.projector_hidden=-5"), "vlm.projector_hidden must be"),
    "projector_hidden 0": lambda t, d: (_train(t, d, "vlm.projector_hidden=0"), "got 0"),
    "pool 0": lambda t, d: (_train(t, d, "vlm.pool=0"), "vlm.pool must be an integer >= 1"),
    "tiles 0": lambda t, d: (_train(t, d, "vlm.tiles=[0, 1]"), "vlm.tiles must be two integers >= 1"),
    "max_length 4": lambda t, d: (_train(t, d, "vlm.max_length=4"), "vlm.max_length must be an integer >= 8"),
    "truncation unknown": lambda t, d: (_train(t, d, "vlm.truncation=cut"), "vlm.truncation must be one of"),
    "every answer cut": lambda t, d: (_train(t, d, "vlm.max_length=8"), "vlm.max_length=8 keeps no answer"),
    "options among overrides": lambda t, d: (
        ["vlm", "train", STAGE1, *_base(d), "--quiet", "vlm.stage=7"],
        "vlm.stage must be 1",
    ),  # fmt: skip
    "llava no gpt turn": lambda t, d: (_llava(t, d, [_record(QA[:1])] * 3), "no record has a gpt turn"),
    "llava turn without from": lambda t, d: (
        _llava(t, d, [_record([{"value": "hi"}, QA[1]])]),
        "no 'from' (",
    ),  # fmt: skip
    "llava empty conversation": lambda t, d: (_llava(t, d, [_record([])]), "'conversations' is an empty list"),
    "llava gpt only": lambda t, d: (_llava(t, d, [_record(QA[1:])]), "does not start with a human turn"),
    "llava unknown speaker": lambda t, d: (
        _llava(t, d, [_record([{"from": "bot", "value": "x"}, QA[1]])]),
        "unknown speaker 'bot'",
    ),  # fmt: skip
    "llava two images": lambda t, d: (
        _llava(t, d, [_record(QA), _record([{"from": "human", "value": "<image><image>"}, QA[1]])]),
        "record 1",
    ),  # fmt: skip
    "llava empty list": lambda t, d: (_llava(t, d, []), "holds no records"),
    "llava wrong image folder": lambda t, d: (
        _train(t, d, "vlm.data=llava", f"vlm.json={_write(t, [_record(QA)])}", f"vlm.images={t}"),
        "none of the 1 images",
    ),  # fmt: skip
    "tiny-lm heads 3": lambda t, d: (["vlm", "tiny-lm", str(t / "lm"), "--heads", "3"], "--heads 3"),
    "tiny-lm width 0": lambda t, d: (["vlm", "tiny-lm", str(t / "lm"), "--width", "0"], "--width must be >= 1"),
    "tiny-lm over an LM": lambda t, d: (["vlm", "tiny-lm", str(_lm_copy(t, d))], "pass --overwrite"),
    "tiny-lm on a file": lambda t, d: (["vlm", "tiny-lm", str(_write(t, []))], "is a file, not a folder"),
    "scene over a file": lambda t, d: (["vlm", "scene", "1", str(_write(t, []))], "pass --overwrite"),
    "ask top-p nan": lambda t, d: (_ask(d / "run", d, "--sample", "--top-p", "nan"), "--top-p must be in (0, 1]"),
    "ask question past the context": lambda t, d: (
        _ask(d / "run", d, "--max-new-tokens", "600"),
        "more than the LM's context of 512",
    ),  # fmt: skip
    "ask on a pretraining run": lambda t, d: (_ask(_pretraining_run(t), d), "is a pretraining run folder"),
    "ask after the LM changed": lambda t, d: (
        _ask(_run_copy(t, d, _lm_copy(t, d, width=64)), d),
        "file [32] vs model [64]",
    ),  # fmt: skip
    "stage 2 from a run on another LM width": lambda t, d: (
        _train(t, d, "vlm.stage=2", f"vlm.init_from={d / 'run'}", f"vlm.lm={_lm_copy(t, d, width=64)}"),
        "file [32] vs model [64]",
    ),  # fmt: skip
    "ask on a truncated vlm.safetensors": lambda t, d: (_ask(_truncated_vlm(t, d), d), "vlm.safetensors cannot be"),
    "ask on a truncated LM": lambda t, d: (
        _ask(_run_copy(t, d, _lm_copy(t, d, truncate=True)), d),
        "cannot be loaded",
    ),  # fmt: skip
    "LM without a tokenizer": lambda t, d: (
        _ask(_run_copy(t, d, _lm_copy(t, d, drop=["tokenizer.json", "tokenizer_config.json"])), d),
        "holds no tokenizer",
    ),  # fmt: skip
    "eval scenes 0": lambda t, d: (["vlm", "eval", str(d / "run"), "--scenes", "0"], "--scenes and --batch-size"),
    "eval out in a missing folder": lambda t, d: (
        ["vlm", "eval", str(d / "run"), "--out", str(t / "no" / "r.json")],
        "the folder of --out does not exist",
    ),
    "eval answers of numbers": lambda t, d: (
        [
            "vlm",
            "eval",
            str(d / "run"),
            "--data",
            str(_write(t, [{**_record(QA), "answers": [3]}])),
            "--images",
            str(d / "images"),
        ],
        "'answers' holds a int",
    ),  # fmt: skip
}


def _write(t: Path, records) -> Path:
    p = t / "records.json"
    p.write_text(json.dumps(records))
    return p


def _pretraining_run(t: Path) -> Path:
    run = t / "pre"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  encoder: aimv2-tiny-patch8-64\n")
    return run


def _truncated_vlm(t: Path, d: Path) -> Path:
    run = _run_copy(t, d)
    w = run / "vlm.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    return run


@pytest.mark.parametrize("name", list(CASES))
def test_bad_vlm_input_is_one_line_and_status_2(name, parts, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AIMV2_DEBUG", raising=False)
    argv, fragment = CASES[name](tmp_path, parts)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and LINE.fullmatch(lines[0]), err
    assert lines[0].startswith(f"aimv2 vlm {argv[1]}: ")
    assert fragment in lines[0], lines[0]


def test_eval_captions_scores_the_users_data(parts, tmp_path, capsys):
    """`vlm eval --captions --data FILE --images DIR`: CIDEr of the answers against the file's references (before,
    the built-in scenes were scored whatever --data said); VQAv2's {"answer": ...} references are read too."""
    recs = [{**_record([{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "a red square"}]),
             "answers": [{"answer": "a red square"}, {"answer": "red square"}]}] * 2  # fmt: skip
    data = _write(tmp_path, recs)
    out = tmp_path / "r.json"
    argv = ["vlm", "eval", str(parts / "run"), "--captions", "--data", str(data), "--images", str(parts / "images")]
    assert main([*argv, "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["n"] == 2 and result["skipped"] == 0 and "cider" in result
    assert result["examples"][0]["references"] == ["a red square", "red square"]
    assert json.loads(out.read_text()) == result


def test_eval_leaves_text_only_records_out_and_counts_them(parts, tmp_path, capsys):
    """LLaVA's mixes hold text-only conversations; `vlm eval --data` used to score them against a black image."""
    turns = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "a red square"}]
    text_only = {"id": "t", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]}
    data = _write(tmp_path, [_record(turns), text_only, _record(turns)])
    argv = ["vlm", "eval", str(parts / "run"), "--captions", "--data", str(data), "--images", str(parts / "images")]
    assert main(argv) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.splitlines()[-1])
    assert result["n"] == 2 and result["text_only"] == 1 and result["skipped"] == 0
    assert all(e["references"] == ["a red square"] for e in result["examples"])
    assert "left out 1 text-only record" in captured.err


@pytest.mark.parametrize(
    "argv, key, value",
    [
        (["vlm", "train", "c.yaml", "a=1", "--quiet", "b=2"], "overrides", ["a=1", "b=2"]),
        (["detect", "train", "c.yaml", "a=1", "--quiet", "b=2"], "overrides", ["a=1", "b=2"]),
        (["data", "inspect", "x.tar", "--limit", "3", "y.tar"], "sources", ["x.tar", "y.tar"]),
        (
            ["tokenizer", "train", "a.txt", "--vocab-size", "64", "b.txt", "--out", "t.json"],
            "sources",
            ["a.txt", "b.txt"],
        ),
        (["ablate", "c.yaml", "a=1", "--seeds", "2", "b=2"], "overrides", ["a=1", "b=2"]),
    ],
)
def test_options_go_anywhere_among_positionals_for_every_command(argv, key, value, monkeypatch):
    """`aimv2 vlm train CFG a=1 --quiet b=2` was "unrecognized arguments": commands with sub-actions parsed their
    options only after every positional."""
    import aimv2.cli as cli

    parsers: dict = {}
    cli.build_parser(only=argv[0], subparsers=parsers)
    args = cli.parse_intermixed(parsers[argv[0]], argv[1:])
    assert getattr(args, key) == value and getattr(args, "_run", None) is not None
