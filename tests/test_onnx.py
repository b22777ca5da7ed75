"""``aimv2 export --format onnx``: the graph run in onnxruntime gives PyTorch's features (fp32, max |diff| 1e-4),
at other batch sizes than the example it was traced with, and at other grids for a native encoder."""

import subprocess
import sys

import pytest
import torch
from conftest import subprocess_env

import aimv2
from aimv2.weights import save_encoder
from aimv2.weights.onnx_export import check_onnx, export_onnx, onnx_input_shape

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.mark.slow
def test_native_encoder_dynamic_batch_and_size_from_the_cli(tmp_path):
    torch.manual_seed(0)
    model = aimv2.create_model("aimv2-tiny-patch8-native", depth=1).eval()
    src = save_encoder(model, tmp_path / "enc.safetensors")
    out = tmp_path / "enc.onnx"
    cmd = [sys.executable, "-m", "aimv2", "export", str(src), str(out), "--no-check"]
    r = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "dynamic: batch, H and W" in r.stdout
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    dims = session.get_inputs()[0].shape
    assert all(isinstance(d, str) for d in (dims[0], dims[2], dims[3])), dims  # symbolic, not fixed
    shapes = [onnx_input_shape(model, b, g) for b, g in [(1, (1, 1)), (4, (5, 2)), (2, (3, 7))]]
    assert check_onnx(out, model, shapes) < 1e-4


@pytest.mark.slow
def test_learned_encoder_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    model = aimv2.create_model("aimv2-tiny-patch8-32", depth=1).eval()
    out = export_onnx(model, tmp_path / "enc.onnx")
    assert check_onnx(out, model, [onnx_input_shape(model, b) for b in (1, 5)]) < 1e-4
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [3, 32, 32]  # the learned grid is fixed
