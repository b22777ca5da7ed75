"""One class-names format for every source and both commands: one name per line, line c naming class c. Integer
labels index it, text labels and class folders are matched by name, and folders named by none of its lines get its
lines as display names in sorted folder order (`aimv2 probe --classnames`, `aimv2 zeroshot --classnames`)."""

import json

import pytest
import torch
from PIL import Image

from aimv2.cli import main
from aimv2.data.classnames import class_labels, folder_labels, read_classnames
from aimv2.eval.datasets import open_labeled_source

FOLDERS = ["blue", "green", "red"]  # sorted, as find_classes lists them


def test_read_classnames_one_per_line(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("tench\n goldfish \ngreat white shark\n\n\n", encoding="utf-8")
    assert read_classnames(path) == ["tench", "goldfish", "great white shark"]
    path.write_text("a\nb\na\n")
    with pytest.raises(ValueError, match=r"repeats \['a'\]"):
        read_classnames(path)
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="is empty"):
        read_classnames(path)


def test_folder_labels_by_name_by_position_or_an_error():
    # every folder named: the file's order sets the labels, and it may name classes this folder lacks
    assert folder_labels(FOLDERS, ["red", "cyan", "blue", "green"]) == [2, 3, 0]
    # none named, one line per folder: display names in sorted folder order
    assert folder_labels(FOLDERS, ["tench", "goldfish", "shark"]) == [0, 1, 2]
    # a folder's own name on its own line is still a display name
    assert folder_labels(FOLDERS, ["navy", "green", "crimson"]) == [0, 1, 2]
    # a folder name on another folder's line, or too few lines: ambiguous, so refused naming what is missing
    with pytest.raises(ValueError, match=r"\['blue', 'red'\] are not in the class names file.*3 names for 3"):
        folder_labels(FOLDERS, ["green", "x", "y"])
    with pytest.raises(ValueError, match=r"val/: class sub-folders \['red'\] are not in"):
        folder_labels(FOLDERS, ["blue", "green"], "val/")


def test_class_labels_of_integer_and_text_values():
    ints = class_labels(["2", 0, "1"], None, "s")
    assert (ints.labels, ints.classes, ints.named) == ([2, 0, 1], ["0", "1", "2"], False)
    named = class_labels(["2", 0, "1"], ["a", "b", "c", "d"], "s")
    assert (named.labels, named.classes, named.named) == ([2, 0, 1], ["a", "b", "c", "d"], True)
    text = class_labels(["dog", "cat", "dog"], None, "s")
    assert (text.labels, text.classes, text.named) == ([1, 0, 1], ["cat", "dog"], True)
    assert class_labels(["dog", "cat"], ["dog", "cat"], "s").labels == [0, 1]
    with pytest.raises(ValueError, match=r"s: label 3 but the class names file has only 2 names"):
        class_labels([3], ["a", "b"], "s")
    with pytest.raises(ValueError, match=r"s: labels \['cow'\] are not in the class names file"):
        class_labels(["cow"], ["dog", "cat"], "s")


def _folders(root, colours: dict[str, tuple[int, int, int]], per_class: int = 2):
    for name, rgb in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (16, 16), rgb).save(root / name / f"{i}.png")
    return root


def test_probe_folders_take_display_names_from_the_same_file(tmp_path):
    root = _folders(tmp_path / "val", {"n02": (0, 0, 255), "n01": (255, 0, 0)})
    ds = open_labeled_source(str(root), classnames=["goldfish", "tench"])
    assert ds.classes == ["goldfish", "tench"] and ds.labels == [0, 0, 1, 1]  # n01 -> goldfish, n02 -> tench
    with pytest.raises(ValueError, match=r"\['n01', 'n02'\] are not in the class names file"):
        open_labeled_source(str(root), classnames=["goldfish", "tench", "shark"])


@pytest.fixture(scope="module")
def lit_run(tmp_path_factory):
    """A tiny random LiT saved as our lit.safetensors with its tokenizer.json next to it."""
    from aimv2.data.tokenizer import default_synthetic_tokenizer
    from aimv2.models.encoder import EncoderConfig
    from aimv2.models.text import TextConfig
    from aimv2.objectives.lit import LiT, LiTConfig
    from aimv2.weights import save_lit

    tok = default_synthetic_tokenizer(context_length=16)
    enc = EncoderConfig(embed_dim=32, depth=1, num_heads=2, mlp_hidden_dim=64, patch_size=8, img_size=16)
    text = TextConfig(vocab_size=tok.vocab_size, embed_dim=32, depth=1, num_heads=2, mlp_hidden_dim=64,
                      context_length=16, eos_id=tok.eos_id)  # fmt: skip
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("lit")
    save_lit(LiT(LiTConfig(encoder=enc, text=text, projection_dim=16)), run / "lit.safetensors")
    tok.save(run / "tokenizer.json")
    return run


def test_zeroshot_classnames_name_the_folders(lit_run, tmp_path, capsys):
    images = _folders(tmp_path / "images", {"c0": (220, 40, 40), "c1": (40, 90, 225), "c2": (45, 165, 65)})
    common = ["zeroshot", str(lit_run), "--images", str(images), "--device", "cpu", "--classnames"]
    (tmp_path / "names.txt").write_text("red\nblue\ngreen\n")
    assert main([*common, str(tmp_path / "names.txt")]) == 0
    out = capsys.readouterr().out
    for line in ("c0 (red)", "c1 (blue)", "c2 (green)"):
        assert line in out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["n"] == 6 and sorted(result["per_class"]) == ["c0", "c1", "c2"]
    (tmp_path / "by-name.txt").write_text("c2\nc0\nc1\n")  # the folder names themselves: nothing renamed
    assert main([*common, str(tmp_path / "by-name.txt")]) == 0
    assert "(c" not in capsys.readouterr().out
    (tmp_path / "short.txt").write_text("red\nblue\n")
    assert main([*common, str(tmp_path / "short.txt")]) == 2
    assert "are not in the class names file" in capsys.readouterr().err
