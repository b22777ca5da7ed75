"""Fast inference: ``--dtype`` on extract (autocast; features compared with fp32) and int8 through torchao."""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import aimv2
from aimv2.cli import main
from aimv2.eval.quantize import quantize_int8
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
