"""Captioned image folders (sidecar, CSV, JSONL) skip and count every kind of bad item; `aimv2 tokenizer train`
writes a tokenizer that loads and round-trips captions, from real shards and from a text file."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aimv2.cli import main
from aimv2.data.sources.captioned import CaptionedImages, collate_skip_none
from aimv2.data.tokenizer import Tokenizer

SHARD = Path(__file__).resolve().parents[1].parent / "shared/data/cc12m-train-0000.tar"
GOOD = {"a.jpg": "A red square", "sub/b.png": "a blue circle on grass", "c.jpg": "Two dogs"}


def _images(root: Path) -> None:
    """Three good images (GOOD), a corrupt one (bad.jpg), one without a caption (nocap.jpg), one with an empty
    caption (empty.jpg)."""
    for i, name in enumerate([*GOOD, "nocap.jpg", "empty.jpg"]):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8 + i, 6), (40 * i, 10, 200)).save(root / name)
    (root / "bad.jpg").write_bytes(b"<html>not an image</html>")


def _read_all(data: CaptionedImages) -> dict[str, str]:
    out = {}
    for i in range(len(data)):
        item = data.get_item(i)
        if item is not None:
            image, caption = item
            assert image.mode == "RGB"
            base = data.source if data.source.is_dir() else data.source.parent
            out[data.items[i][0].relative_to(base).as_posix()] = caption
    return out


def test_sidecar_folder_skips_and_counts(tmp_path):
    _images(tmp_path)
    for name, caption in {**GOOD, "bad.jpg": "broken", "empty.jpg": "  \n"}.items():
        (tmp_path / name).with_suffix(".txt").write_text(caption)
    data = CaptionedImages(tmp_path)
    assert data.caption_from == "sidecar"
    assert data.listing_faults.counts == {"no_caption": 1}  # nocap.jpg left out at listing
    assert len(data) == 5
    assert _read_all(data) == GOOD
    assert data.faults.counts == {"bad_image": 1, "empty_caption": 1}
    assert data.faults.samples == 3
    assert [data.get_caption(i) for i in range(len(data))].count(None) == 1  # empty.jpg; bad.jpg's caption is fine


def _rows(tmp_path: Path) -> list[dict]:
    _images(tmp_path / "imgs")
    rows = [{"path": f"imgs/{k}", "caption": v} for k, v in GOOD.items()]
    rows[0]["path"] = str(tmp_path / "imgs/a.jpg")  # absolute paths work too
    return rows + [
        {"path": "imgs/bad.jpg", "caption": "broken"},
        {"path": "imgs/gone.jpg", "caption": "a missing file"},
        {"path": "imgs/empty.jpg", "caption": " "},
        {"path": "imgs/nocap.jpg"},
    ]


def _expected(tmp_path: Path) -> dict[str, str]:
    return {f"imgs/{k}": v for k, v in GOOD.items()}


def test_csv_index_skips_and_counts(tmp_path):
    rows = _rows(tmp_path)
    with open(tmp_path / "index.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "caption"])
        w.writeheader()
        w.writerows(rows)
    data = CaptionedImages(tmp_path / "index.csv")
    assert data.caption_from == "csv"
    # the CSV row without a caption cell reads as an empty caption: both are left out at listing
    assert data.listing_faults.counts == {"empty_caption": 2}
    assert _read_all(data) == _expected(tmp_path)
    assert data.faults.counts == {"bad_image": 1, "no_image": 1}


def test_jsonl_index_with_custom_columns(tmp_path):
    rows = [{"file": r["path"], **({"text": r["caption"]} if "caption" in r else {})} for r in _rows(tmp_path)]
    lines = [json.dumps(r) for r in rows] + ["{not json", "", "[1, 2]"]
    (tmp_path / "index.jsonl").write_text("\n".join(lines) + "\n")
    data = CaptionedImages(tmp_path / "index.jsonl", path_column="file", caption_column="text")
    assert data.listing_faults.counts == {"empty_caption": 1, "no_caption": 1, "bad_caption": 2}
    assert _read_all(data) == _expected(tmp_path)
    assert data.faults.counts == {"bad_image": 1, "no_image": 1}
    data.transform = lambda im: torch.from_numpy(np.asarray(im.resize((4, 4))).copy())
    images, texts = collate_skip_none([data[i] for i in range(len(data))])  # bad items come back as None
    assert images.shape == (3, 4, 4, 3) and sorted(texts) == sorted(GOOD.values())
    assert collate_skip_none([None, None]) is None


def test_nothing_usable_is_a_clear_error(tmp_path):
    (tmp_path / "x").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "x/a.jpg")
    Image.new("RGB", (4, 4)).save(tmp_path / "x/b.jpg")
    with pytest.raises(ValueError, match=r"no usable image-caption pair in .*x.* no_caption"):
        CaptionedImages(tmp_path / "x")
    (tmp_path / "i.jsonl").write_text(json.dumps({"path": "x/a.jpg", "caption": ""}) + "\n")
    with pytest.raises(ValueError, match="empty_caption"):
        CaptionedImages(tmp_path / "i.jsonl")
    (tmp_path / "i.csv").write_text("file,text\nx/a.jpg,hello\n")
    with pytest.raises(ValueError, match="no_image"):  # wrong column names: every row lacks "path"
        CaptionedImages(tmp_path / "i.csv")


def _train(capsys, *argv) -> dict:
    assert main(["tokenizer", "train", *argv]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.skipif(not SHARD.is_file(), reason="real CC12M shard not present")
def test_tokenizer_train_on_real_shard(tmp_path, capsys):
    out = tmp_path / "tok" / "tokenizer.json"
    summary = _train(capsys, str(SHARD), "--vocab-size", "600", "--out", str(out), "--context-length", "32")
    assert summary["captions"] == 32 and summary["vocab_size"] <= 600
    assert 0 < summary["truncated"] < 1 and summary["mean_tokens"] > 5
    tok = Tokenizer.from_file(out)
    assert tok.context_length == 32 and tok.vocab_size == summary["vocab_size"]
    limited = _train(capsys, str(SHARD), "--vocab-size", "600", "--out", str(out), "--limit", "5", "--overwrite")
    assert limited["captions"] == 5


def test_tokenizer_train_on_text_and_folder_round_trips(tmp_path, capsys):
    captions = ["A Photo of a Cat on a Sofa", "a dog running on the beach", "Red car parked near a tree"] * 20
    (tmp_path / "captions.txt").write_text("\n".join(captions) + "\n\n")
    _images(tmp_path / "folder")
    for name, caption in GOOD.items():
        (tmp_path / "folder" / name).with_suffix(".txt").write_text(caption)
    out = tmp_path / "tokenizer.json"
    src = [str(tmp_path / "captions.txt"), str(tmp_path / "folder")]
    summary = _train(capsys, *src, "--vocab-size", "300", "--out", str(out))
    assert summary["captions"] == 60 + 3 and summary["truncated"] == 0
    tok = Tokenizer.from_file(out)
    for text in [*set(captions), *GOOD.values(), "an unseen Caption: 42 zebras!"]:
        assert tok.decode(tok.encode(text)[0]) == text.lower()
    cased = _train(capsys, *src, "--vocab-size", "300", "--out", str(out), "--no-lowercase", "--overwrite")
    assert cased["captions"] == 63
    assert Tokenizer.from_file(out).decode(Tokenizer.from_file(out).encode("A Cat")[0]) == "A Cat"


def test_tokenizer_train_errors(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n \n")
    opts = ["--vocab-size", "300", "--out", str(tmp_path / "x.json")]
    assert main(["tokenizer", "train", str(tmp_path / "empty.txt"), *opts]) == 2
    assert "no captions" in capsys.readouterr().err
    assert main(["tokenizer", "train", str(tmp_path / "nope.txt"), *opts]) == 2
    assert not (tmp_path / "x.json").exists()
