"""The trainer's gradient clipping (train/grad_clip.py) against torch's clip_grad_norm_ and a float64 norm."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from aimv2.train.grad_clip import clip_gradients, cpu_gradient_norm


def model_with_grads(scale: float, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 32), nn.LayerNorm(32))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * scale
    model[1].register_parameter("unused", nn.Parameter(torch.ones(3)))  # no grad: not counted, not touched
    return model


def grads_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.grad is not None]


def float64_norm(grads) -> float:
    return torch.stack([g.double().pow(2).sum() for g in grads]).sum().sqrt().item()


def test_norm_of_millions_of_gradients_is_float64_exact_to_1e5():
    torch.manual_seed(0)
    grads = [torch.randn(12_288_000) * 1e-3 + 1e-3, torch.randn(384, 1024), torch.randn(7)]  # all one sign: no luck
    want = float64_norm(grads)
    assert cpu_gradient_norm(grads).item() == pytest.approx(want, rel=1e-5)
    assert cpu_gradient_norm(grads).dtype == torch.float32
    assert torch.nn.utils.get_total_norm(grads).item() == pytest.approx(want, rel=1e-3)  # torch's own, looser


@pytest.mark.parametrize("scale", [1.0, 1e-3])  # norm far above max_norm (clipped) / below it (left alone)
def test_clip_matches_torch_clip_grad_norm(scale):
    ours, ref = model_with_grads(scale), model_with_grads(scale)
    before = [g.clone() for g in grads_of(ours)]
    norm = clip_gradients(ours, 1.0)
    ref_norm = torch.nn.utils.clip_grad_norm_([p for p in ref.parameters() if p.grad is not None], 1.0)
    assert norm.item() == pytest.approx(ref_norm.item(), rel=1e-6)
    assert (norm.item() > 1.0) == (scale == 1.0)
    grads = grads_of(ours)
    for g, r, b in zip(grads, grads_of(ref), before, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=0)
        if scale != 1.0:
            assert torch.equal(g, b)  # nothing to clip: not even multiplied by 1
    if scale == 1.0:
        assert float64_norm(grads) == pytest.approx(1.0, rel=1e-5)
    assert ours[1].unused.grad is None


def test_norm_at_max_norm_is_scaled_like_torch():
    ours = model_with_grads(1.0)
    for p in ours.parameters():
        if p.grad is not None:
            p.grad /= cpu_gradient_norm(grads_of(ours)).item()
    ref = copy.deepcopy(ours)
    for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
        q.grad = None if p.grad is None else p.grad.clone()
    clip_gradients(ours, 1.0)  # factor 1 / (1 + 1e-6) < 1, as in torch
    torch.nn.utils.clip_grad_norm_([p for p in ref.parameters() if p.grad is not None], 1.0)
    for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)


def test_max_norm_zero_only_measures():
    model = model_with_grads(1.0)
    before = [g.clone() for g in grads_of(model)]
    norm = clip_gradients(model, 0.0)
    assert norm.item() == pytest.approx(float64_norm(before), rel=1e-6)
    assert all(torch.equal(g, b) for g, b in zip(grads_of(model), before, strict=True))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_gives_a_non_finite_norm(bad):
    model = model_with_grads(1.0)
    model[0].weight.grad[3, 5] = bad
    norm = clip_gradients(model, 1.0)
    assert not torch.isfinite(norm)  # what the guard reads to skip the step


def test_no_gradients_at_all():
    model = nn.Linear(3, 3)
    assert clip_gradients(model, 1.0).item() == 0.0
