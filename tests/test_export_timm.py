"""``convert --to timm``: a plain, strict ``timm.create_model(...).load_state_dict`` of the file, same features."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import subprocess_env
from safetensors import safe_open
from safetensors.torch import load_file

import aimv2
from aimv2.weights import CheckpointError, save_encoder
from aimv2.weights.layout import from_ours
from aimv2.weights.timm_args import timm_model_args

timm = pytest.importorskip("timm")


def test_convert_to_timm_loads_strictly_with_the_same_features(tmp_path):
    """Our tiny encoder (a size timm does not register) through the command line, into timm, strictly;
    forward_features equal to ours (fp32, 1e-5)."""
    torch.manual_seed(0)
    model = aimv2.create_model("aimv2-tiny-patch8-32", depth=2).eval()
    src = save_encoder(model, tmp_path / "enc.safetensors")  # Apple's layout, as a run writes it
    out = tmp_path / "timm.safetensors"
    cmd = [sys.executable, "-m", "aimv2", "convert", str(src), "--to", "timm", str(out)]
    r = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "timm.create_model('aimv2_large_patch14_224'" in r.stdout
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    theirs = timm.create_model(meta["timm_model"], **json.loads(meta["timm_kwargs"])).eval()
    theirs.load_state_dict(load_file(out))  # strict: every key and shape
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(theirs.forward_features(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["aimv2-large-patch14-224", "aimv2-1B-patch14-448", "aimv2-3B-patch14-336"])
def test_official_sizes_name_timm_registered_models(name):
    """Apple's sizes map to timm's own registered architecture with no overrides: keys and shapes match exactly
    (both models on the meta device)."""
    with torch.device("meta"):
        ours = aimv2.create_model(name)
        arch, kwargs = timm_model_args(ours.cfg)
        assert (arch, kwargs) == (name.replace("-", "_").lower(), {"num_classes": 0})
        theirs = timm.create_model(arch, **kwargs)
    want = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in from_ours(ours.state_dict(), "timm").items()}
    assert got == want


def test_native_encoders_have_no_timm_form():
    with torch.device("meta"), pytest.raises(CheckpointError, match="no timm form"):
        timm_model_args(aimv2.create_model("aimv2-large-patch14-native").cfg)
