"""``aimv2 convert --lit --to hf``: a LiT model as a folder ``transformers.Aimv2Model.from_pretrained`` loads with
our logits, and ``AutoImageProcessor`` with its normalization."""

import subprocess
import sys

import pytest
import torch
from conftest import subprocess_env

from aimv2.objectives.lit import LiT, LiTConfig
from aimv2.weights import save_lit

TINY_LIT = {
    "encoder": {"embed_dim": 64, "depth": 1, "num_heads": 2, "mlp_hidden_dim": 128, "patch_size": 8, "img_size": 32},
    "text": {"vocab_size": 50, "embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_hidden_dim": 64,
             "context_length": 8, "eos_id": 49},
    "projection_dim": 16,
}  # fmt: skip


def test_convert_lit_to_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = LiT(LiTConfig.from_dict(TINY_LIT)).eval()
    src = save_lit(model, tmp_path / "lit.safetensors", metadata={"mean_std": "clip"})
    out = tmp_path / "hf"
    cmd = [sys.executable, "-m", "aimv2", "convert", str(src), "--lit", "--to", "hf", str(out)]
    r = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    hf = transformers.Aimv2Model.from_pretrained(out, attn_implementation="eager").eval()
    pixels = torch.randn(3, 3, 32, 32)
    ids = torch.randint(0, 49, (3, 8))
    ids[:, -1] = 49  # eos: where the text tower pools
    with torch.no_grad():
        ours = model(pixels, ids).logits_per_image
        theirs = hf(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)).logits_per_image
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    processor = transformers.AutoImageProcessor.from_pretrained(out)
    assert processor.crop_size == {"height": 32, "width": 32}
    assert processor.image_mean == pytest.approx([0.48145466, 0.4578275, 0.40821073])  # the file's mean_std

    r = subprocess.run(cmd[:7] + ["timm", str(tmp_path / "x.safetensors")], env=subprocess_env(), capture_output=True,
                       text=True)  # fmt: skip
    assert r.returncode == 2 and "a LiT model converts to apple, hf, aimv2, not 'timm'" in r.stderr
