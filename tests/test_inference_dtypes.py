"""Fast inference: ``--dtype`` on extract, probe, classify and zeroshot (autocast, or int8 through torchao),
features compared with fp32 and with torchao applied by hand; the errors where int8 cannot run."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import photos_and_encoder, subprocess_env, tiny_lit_run
from PIL import Image
from safetensors.torch import load_file

import aimv2
from aimv2.cli import main
from aimv2.eval.features import extract_features
from aimv2.eval.quantize import for_inference, is_int8, quantize_int8
from aimv2.weights import save_encoder


def _extract(tmp_path, src, images, *flags):
    """`aimv2 extract` in this process: (exit status, features or None)."""
    out = tmp_path / f"f{len(list(tmp_path.iterdir()))}.safetensors"
    cmd = ["extract", str(src), str(images), str(out), "--workers", "0", "--no-progress", "--device", "cpu", *flags]
    try:
        rc = main(cmd)
    except SystemExit as e:
        rc = e.code
    return rc, (load_file(out)["features"] if rc == 0 else None)


def test_extract_dtype_fp16_and_bf16_against_fp32(tmp_path, capsys):
    """fp16 and bf16 autocast features vs fp32 of the same encoder: cosine >= 0.99 per token (tiny random model);
    --bf16 is --dtype bf16; the two disagreeing is one line, exit 2."""
    torch.manual_seed(0)
    src = save_encoder(aimv2.create_model("aimv2-tiny-patch8-32", depth=2), tmp_path / "enc.safetensors")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(torch.randint(0, 255, (40, 40, 3), dtype=torch.uint8).numpy()).save(images / f"{i}.png")
    _, fp32 = _extract(tmp_path, src, images)
    for flags in (["--dtype", "fp16"], ["--dtype", "bf16"], ["--bf16"]):
        rc, feats = _extract(tmp_path, src, images, *flags)
        assert rc == 0
        assert feats.dtype == torch.float32 and not torch.equal(feats, fp32)  # it did run in lower precision
        assert F.cosine_similarity(feats, fp32, dim=-1).min() >= 0.99, flags
    capsys.readouterr()
    rc, _ = _extract(tmp_path, src, images, "--bf16", "--dtype", "fp16")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == "aimv2: error: --bf16 and --dtype fp16 disagree; pass one of them"


@pytest.mark.parametrize("mode", ["dynamic", "weight-only"])
def test_int8_quantization_keeps_the_features(mode):
    pytest.importorskip("torchao")
    torch.manual_seed(0)
    model = aimv2.create_model("aimv2-tiny-patch8-32", depth=2).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        q = quantize_int8(model, mode)
        got = q(x)
    assert type(q.blocks[0].mlp.fc1.weight) is not torch.nn.Parameter  # torchao's quantized tensor took its place
    assert not torch.equal(got, ref)
    assert F.cosine_similarity(got, ref, dim=-1).min() >= 0.99
    with pytest.raises(ValueError, match="unknown int8 mode 'int4'"):
        quantize_int8(model, "int4")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Six real CC12M photos as JPEG files, and a seeded full-depth tiny encoder (6 blocks, 64 px) saved once."""
    return photos_and_encoder(tmp_path_factory.mktemp("int8"), 6)


def test_extract_int8_is_torchao_int8_and_keeps_the_features(photos, tmp_path):
    """`extract --dtype int8` on real photos: the features of torchao's int8 dynamic recipe applied by hand to the
    same encoder (atol 1e-5), not fp32's, and within cosine 0.99 of fp32 per token."""
    torchao = pytest.importorskip("torchao.quantization")
    images, src = photos
    _, fp32 = _extract(tmp_path, src, images)
    rc, int8 = _extract(tmp_path, src, images, "--dtype", "int8")
    assert rc == 0
    ref = aimv2.weights.load_encoder(src).eval()
    torchao.quantize_(ref, torchao.Int8DynamicActivationInt8WeightConfig())
    prep = aimv2.preprocessing(ref)
    pixels = torch.stack([prep(Image.open(images / f"{i}.jpg")) for i in range(6)])  # files sort as 0..5
    with torch.no_grad():
        expected = ref(pixels)
    torch.testing.assert_close(int8, expected, rtol=0, atol=1e-5)
    assert (int8 - fp32).abs().max() > 1e-3  # int8 arithmetic, not fp32's
    cos = F.cosine_similarity(int8, fp32, dim=-1)  # [6, 64]
    assert cos.min() >= 0.99, cos.min()


def test_probe_int8_caches_and_its_saved_classifier_runs_int8(photos, tmp_path, capsys):
    """`probe --dtype int8 --save`: the second run serves the int8 features from the cache (the key covers the
    int8 weights), and `classify` on the saved head quantizes the encoder again: its probabilities are the head
    applied to `extract --dtype int8` features."""
    from test_extract_probe import write_class_folder

    write_class_folder(tmp_path / "train", 4, seed=0)
    write_class_folder(tmp_path / "val", 2, seed=1)
    _, src = photos
    clf = tmp_path / "probe.safetensors"
    argv = ["probe", str(src), "--train", str(tmp_path / "train"), "--val", str(tmp_path / "val"), "--method",
            "linear", "--epochs", "3", "--workers", "0", "--no-progress", "--cache-dir", str(tmp_path / "cache"),
            "--dtype", "int8"]  # fmt: skip
    assert main([*argv, "--save", str(clf)]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["dtype"] == "int8"
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("cached (") == 2 and json.loads(out.strip().splitlines()[-1])["top1"] == first["top1"]

    assert main(["classify", str(clf), str(tmp_path / "val"), "--json", "--top-k", "4", "--device", "cpu",
                 "--no-progress"]) == 0  # fmt: skip
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    rc, feats = _extract(tmp_path, src, tmp_path / "val", "--dtype", "int8", "--pool", "mean")
    assert rc == 0
    head = aimv2.eval.classifier.load_classifier(clf)
    probs = head.head(feats).softmax(-1)  # [n, C], the files in the same sorted order
    for row, p in zip(rows, probs, strict=True):
        got = {t["label"]: t["prob"] for t in row["top"]}
        want = dict(zip(head.classes, p.tolist(), strict=True))
        assert got == pytest.approx(want, abs=1e-5)


def test_zeroshot_int8_quantizes_both_towers(tmp_path, capsys):
    """`zeroshot --dtype int8` on a saved LiT model runs int8 linear layers in both towers; through the library the
    image and class embeddings stay within cosine 0.99 of fp32's."""
    pytest.importorskip("torchao")
    from aimv2.eval.zeroshot import zeroshot_classify

    model, tok = tiny_lit_run(tmp_path, depth=2)
    cmd = ["zeroshot", str(tmp_path / "lit"), "--images", str(tmp_path / "images"), "--device", "cpu"]
    assert main([*cmd, "--dtype", "int8"]) == 0
    assert "top1" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    ref = zeroshot_classify(model, tok, tmp_path / "images", templates=["a {} circle"], device="cpu")
    q = for_inference(model, "int8")
    assert is_int8(q.encoder) and is_int8(q.text)
    got = zeroshot_classify(q, tok, tmp_path / "images", templates=["a {} circle"], device="cpu", dtype="int8")
    for key in ("image_embeds", "class_embeds"):
        assert not torch.equal(got[key], ref[key])
        assert F.cosine_similarity(got[key], ref[key], dim=-1).min() >= 0.99, key


def test_int8_needs_a_quantized_encoder_and_torchao(photos, tmp_path, capsys):
    """The errors: an unknown --dtype (argparse names the choices); extract_features(dtype="int8") on a float
    encoder; and without torchao one line naming the `int8` extra, said before any weights are read."""
    images, src = photos
    rc, _ = _extract(tmp_path, src, images, "--dtype", "int4")
    assert rc == 2
    assert "argument --dtype: invalid choice: 'int4' (choose from 'fp32', 'bf16', 'fp16', 'int8')" in (
        capsys.readouterr().err
    )
    with pytest.raises(ValueError, match="dtype int8 needs an int8 encoder; quantize it first"):
        extract_features(aimv2.create_model("aimv2-tiny-patch8-32", depth=1), [], dtype="int8")
    no_torchao = "import sys; sys.modules['torchao'] = None; from aimv2.cli import main; sys.exit(main(sys.argv[1:]))"
    missing = tmp_path / "not-there.safetensors"
    r = subprocess.run([sys.executable, "-c", no_torchao, "extract", str(missing), str(images),
                        str(tmp_path / "o.safetensors"), "--dtype", "int8"],
                       capture_output=True, text=True, env=subprocess_env())  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (
        "aimv2 extract: error: int8 inference needs torchao, which is not installed; "
        "pip install 'aimv2[int8]', or choose --dtype fp32, bf16 or fp16"
    )
