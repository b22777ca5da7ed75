"""What MFU is computed from (aimv2/train/metrics.py): the FLOP count of a training step, against torch's own
FlopCounterMode, and the peak of the GPU by its CUDA name."""

import pytest
import torch
from conftest import training_flops

from aimv2.objectives import create_pretraining_model
from aimv2.train.metrics import flops_per_sample, peak_flops


def test_flops_per_sample_matches_torch_flop_counter():
    """Forward + backward of the AIMv2 model counted by torch, op by op. The two-matmul attention is counted as
    the matmuls it is, which is the formula's attention term (no causal discount)."""
    torch.manual_seed(0)
    model = create_pretraining_model("aimv2-tiny-patch8-64", vocab_size=500, decoder_max_text_len=16)
    B, N, T = 2, 64, 16
    images, text = torch.randn(B, 3, 64, 64), torch.randint(3, 500, (B, T))
    counted = training_flops(model, images, text) / B
    assert counted == pytest.approx(flops_per_sample(model, N, T), rel=0.01)


@pytest.mark.parametrize(
    ("name", "bf16", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", True, 989e12),
        ("NVIDIA H100 PCIe", True, 756e12),
        ("NVIDIA H100 NVL", True, 835e12),
        ("NVIDIA H200", True, 989e12),
        ("NVIDIA H100 PCIe", False, 51e12),
        ("NVIDIA A100-SXM4-80GB", True, 312e12),
        ("Some Future GPU", True, None),
    ],
)
def test_peak_by_cuda_name(monkeypatch, name, bf16, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda", 0), bf16=bf16) == peak


def test_no_peak_and_no_mfu_on_cpu():
    assert peak_flops(torch.device("cpu"), bf16=True) is None
