"""A fresh model's initialisation against Apple's (ml-l3m's) rules, tensor by tensor.

Each tensor's distribution is checked against its rule written out here (std within a tolerance set by the sample
size, bounds, which values are exactly zero or one), and against a reference draw where one exists: PyTorch's own
Linear and Conv2d defaults, Xavier on a separate [D, D] linear, timm's ``variance_scaling_``. A parameter without a
rule here fails the test, so a new tensor cannot slip in with an unchecked init.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from aimv2 import create_pretraining_model

VOCAB = 4096
torch_std = lambda t: t.double().std().item()  # noqa: E731


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_pretraining_model("aimv2-tiny-patch8-64", vocab_size=VOCAB, depth=2)


def close(actual: float, expected: float, rel: float) -> bool:
    return abs(actual - expected) <= rel * expected


def check_uniform(t: torch.Tensor, bound: float, rel: float) -> None:
    assert t.abs().max() <= bound * (1 + 1e-6), f"beyond +-{bound}"
    assert t.abs().max() > 0.9 * bound, "narrower than the bound: not uniform on it"
    assert close(torch_std(t), bound / math.sqrt(3), rel), (torch_std(t), bound / math.sqrt(3))
    assert abs(t.double().mean().item()) < 4 * bound / math.sqrt(3 * t.numel())


def check_normal(t: torch.Tensor, std: float, rel: float, truncated_at: float | None = None) -> None:
    assert close(torch_std(t), std, rel), (torch_std(t), std)
    top = t.abs().max().item()
    if truncated_at is None:
        if t.numel() > 5000:  # 5000 normal draws all within 3.5 std: chance 0.1%
            assert top > 3.5 * std, f"max |x| {top} for std {std}: looks truncated"
    else:
        assert truncated_at * 0.97 < top <= truncated_at * (1 + 1e-6), (top, truncated_at)


def rel_tol(n: int) -> float:
    """Five standard errors of a sample std (sqrt(1/(2n)) for a normal; a little more covers the uniform)."""
    return 5 * math.sqrt(1 / n)


def test_every_tensor_follows_its_rule(model):
    enc, dec = model.encoder, model.decoder
    D, p, C = enc.cfg.embed_dim, enc.cfg.patch_size, enc.cfg.in_chans
    Dd, L = dec.cfg.embed_dim, dec.cfg.depth
    checked = set()
    for name, t in model.named_parameters():
        t = t.detach()
        n = t.numel()
        if name.endswith("norm.weight") or name.endswith("norm1.weight") or name.endswith("norm2.weight"):
            assert torch.equal(t, torch.ones_like(t)), name
        elif name == "encoder.patch_embed.proj.weight":
            check_uniform(t, math.sqrt(6 / (D + C * p * p)), rel_tol(n))  # Xavier of the [D, C*p*p] map
        elif name == "encoder.patch_embed.proj.bias":
            check_uniform(t, 1 / math.sqrt(C * p * p), 3 * rel_tol(n))  # PyTorch's Conv2d default, not zeros
        elif name == "encoder.pos_embed":
            check_normal(t, 0.02, rel_tol(n))  # untruncated: values past +-0.04 exist
        elif name.endswith("attn.qkv.weight"):
            width = t.shape[1]
            for part in t.chunk(3, dim=0):  # q, k, v: each Xavier on [D, D], not the fused [3D, D]
                check_uniform(part, math.sqrt(3 / width), rel_tol(part.numel()))
        elif name.endswith(("attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight", "mlp.fc3.weight")):
            fan_out, fan_in = t.shape
            check_uniform(t, math.sqrt(6 / (fan_in + fan_out)), rel_tol(n))
        elif name in ("decoder.image_proj.weight", "decoder.image_proj.bias"):
            check_uniform(t, 1 / math.sqrt(D), (3 if t.ndim == 1 else 1) * rel_tol(n))  # PyTorch's Linear default
        elif name in ("decoder.bos", "decoder.tok_embed.weight"):
            check_normal(t, 0.02, rel_tol(n))
        elif name == "decoder.text_pos":
            check_normal(t, 0.01, rel_tol(n))
        elif name in ("decoder.pixel_head.weight", "decoder.text_head.weight"):
            std = math.sqrt(1 / (1 + L) / Dd)  # the std after truncation, as timm corrects it
            check_normal(t, std, rel_tol(n), truncated_at=2 * std / 0.87962566103423978)
        else:
            pytest.fail(f"no init rule checked for {name}")
        checked.add(name)
    assert any(k.startswith("decoder.blocks") for k in checked) and "decoder.text_head.weight" in checked


def test_q_k_v_are_each_as_wide_as_xavier_on_a_separate_linear(model):
    qkv = model.encoder.blocks[0].attn.qkv.weight.detach()
    D = qkv.shape[1]
    torch.manual_seed(1)
    ref = nn.Linear(D, D, bias=False)
    nn.init.xavier_uniform_(ref.weight)  # l3m's q_proj, k_proj, v_proj
    for part in qkv.chunk(3):
        assert close(torch_std(part), torch_std(ref.weight.detach()), 0.05)
    fused = torch.empty(3 * D, D)
    nn.init.xavier_uniform_(fused)  # the old init: 0.71x narrower
    assert torch_std(fused) < 0.75 * torch_std(qkv[:D])


def test_heads_match_timms_variance_scaling():
    timm_init = pytest.importorskip("timm.layers.weight_init")
    torch.manual_seed(2)
    m = create_pretraining_model("aimv2-tiny-patch8-64", vocab_size=VOCAB, depth=1)
    head = m.decoder.text_head.weight.detach()
    ref = torch.empty_like(head)
    timm_init.variance_scaling_(
        ref, scale=1 / (1 + m.decoder.cfg.depth), mode="fan_in", distribution="truncated_normal"
    )
    assert close(torch_std(head), torch_std(ref), 0.02)
    assert close(head.abs().max().item(), ref.abs().max().item(), 0.02)  # the same truncation bounds


def test_projection_and_conv_bias_match_pytorch_defaults(model):
    torch.manual_seed(3)
    enc = model.encoder
    conv = nn.Conv2d(enc.cfg.in_chans, enc.cfg.embed_dim, enc.cfg.patch_size, enc.cfg.patch_size)
    lin = nn.Linear(enc.cfg.embed_dim, model.decoder.cfg.embed_dim)
    for ours, ref in (
        (enc.patch_embed.proj.bias, conv.bias),
        (model.decoder.image_proj.weight, lin.weight),
        (model.decoder.image_proj.bias, lin.bias),
    ):
        bound_ours, bound_ref = ours.detach().abs().max().item(), ref.detach().abs().max().item()
        assert ours.detach().abs().min() < bound_ref and close(bound_ours, bound_ref, 0.05)
        assert (ours != 0).all()


def test_meta_device_build_then_init_gives_the_same_rules():
    with torch.device("meta"):
        m = create_pretraining_model("aimv2-tiny-patch8-64", vocab_size=VOCAB, depth=1)
    m = m.to_empty(device="cpu")
    torch.manual_seed(4)
    m.encoder.init_weights()
    m.decoder.init_weights()
    D = m.encoder.cfg.embed_dim
    check_uniform(m.encoder.blocks[0].attn.qkv.weight.detach()[:D], math.sqrt(3 / D), 0.05)
    check_normal(m.decoder.text_pos.detach(), 0.01, 0.05)
    assert (m.encoder.patch_embed.proj.bias != 0).all()


@pytest.mark.parametrize("layout", ["apple", "hf", "aimv2"])
def test_a_loaded_encoder_keeps_the_checkpoints_weights(tmp_path, layout):
    """The init applies to new models only: loading a checkpoint (here one written by a model of another seed)
    gives back its tensors exactly, whatever the fresh init drew first."""
    from aimv2 import create_model
    from aimv2.weights.export import save_encoder

    torch.manual_seed(5)
    src = create_model("aimv2-tiny-patch8-64", depth=1)
    path = save_encoder(src, tmp_path / "enc.safetensors", layout=layout)
    torch.manual_seed(6)
    loaded = create_model("aimv2-tiny-patch8-64", checkpoint=str(path), depth=1)
    want = src.state_dict()
    assert all(torch.equal(t, want[k]) for k, t in loaded.state_dict().items())
