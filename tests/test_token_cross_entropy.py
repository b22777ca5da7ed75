"""The caption loss's own autograd Function against torch's cross-entropy: values and gradients, eager and
compiled, with ignored rows, in float32, bfloat16 and (gradcheck) float64."""

import pytest
import torch
import torch.nn.functional as F

from aimv2.objectives.token_cross_entropy import token_cross_entropy_sum

PAD = 1


def _case(dtype, rows=37, vocab=301, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g) * 4).to(dtype).requires_grad_()
    target = torch.randint(0, vocab, (rows,), generator=g)
    target[::5] = PAD  # ignored rows
    return logits, target


def _reference(logits, target):
    return F.cross_entropy(logits.float(), target, ignore_index=PAD, reduction="sum")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-6)])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_value_and_gradient_match_torch_cross_entropy(dtype, tol, compiled):
    logits, target = _case(dtype)
    ours = torch.compile(token_cross_entropy_sum) if compiled else token_cross_entropy_sum
    got = ours(logits, target, PAD)
    (grad_got,) = torch.autograd.grad(got * 1.7, logits)  # an upstream gradient other than 1
    want = _reference(logits, target)
    (grad_want,) = torch.autograd.grad(want * 1.7, logits)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=tol, atol=1e-4)
    assert grad_got.dtype == dtype
    torch.testing.assert_close(
        grad_got.float(), grad_want.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-6
    )
    assert grad_got[::5].abs().max() == 0  # ignored rows get no gradient


def test_gradcheck_in_float64():
    logits, target = _case(torch.float64, rows=6, vocab=11)
    assert torch.autograd.gradcheck(lambda x: token_cross_entropy_sum(x, target, PAD), (logits,))


def test_leading_dims_are_flattened_and_pad_ids_outside_the_vocabulary_are_ignored():
    logits, target = _case(torch.float32, rows=12)
    target[target == PAD] = -100  # e.g. torch's default ignore_index, never a valid row index
    got = token_cross_entropy_sum(logits.view(3, 4, -1), target.view(3, 4), -100)
    want = F.cross_entropy(logits, target, reduction="sum")  # ignore_index=-100 is torch's default
    torch.testing.assert_close(got, want)


def test_all_rows_ignored_is_zero_with_zero_gradient():
    logits, target = _case(torch.float32, rows=4)
    target[:] = PAD
    loss = token_cross_entropy_sum(logits, target, PAD)
    loss.backward()
    assert loss.item() == 0 and logits.grad.abs().max() == 0


def test_large_logits_stay_finite():
    logits, target = _case(torch.float32)
    big = (logits.detach() * 1e4).requires_grad_()
    loss = token_cross_entropy_sum(big, target, PAD)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(big.grad).all()
    torch.testing.assert_close(loss, _reference(big, target), rtol=1e-6, atol=0)
