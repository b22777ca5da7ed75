"""AttentionMask against a loop over (sample, query, key), and attend() against softmax attention written out."""

import pytest
import torch

from aimv2.models.attention import AttentionMask, attend


def naive_allowed(n, causal, prefix_len, key_valid, batch):
    out = torch.zeros(batch, 1, n, n, dtype=torch.bool)
    for b in range(batch):
        for i in range(n):
            for j in range(n):
                seen = (not causal) or j <= i or (prefix_len is not None and j < int(prefix_len[b]))
                if key_valid is not None and not key_valid[b, j]:
                    seen = False
                out[b, 0, i, j] = seen
    return out


@pytest.mark.parametrize(
    "causal,prefix,padding", [(True, True, True), (True, True, False), (True, False, True), (False, False, True)]
)
def test_mask_matches_the_rule_written_as_a_loop(causal, prefix, padding):
    g = torch.Generator().manual_seed(0)
    B, N = 3, 7
    prefix_len = torch.randint(0, N + 1, (B,), generator=g) if prefix else None
    key_valid = None
    if padding:
        lengths = torch.tensor([7, 4, 1])
        key_valid = torch.arange(N)[None, :] < lengths[:, None]
    m = AttentionMask(N, causal=causal, prefix_len=prefix_len, key_valid=key_valid)
    want = naive_allowed(N, causal, prefix_len, key_valid, B)
    assert torch.equal(m.dense.expand(B, 1, N, N), want)


def test_trivial_patterns_stay_on_the_flag_path():
    assert AttentionMask(5).dense is None
    assert AttentionMask(5, causal=True).dense is None and AttentionMask(5, causal=True).is_plain_causal
    with pytest.raises(ValueError, match="causal=True"):
        AttentionMask(5, prefix_len=torch.tensor([2]))


def test_attend_equals_softmax_attention_with_minus_inf():
    g = torch.Generator().manual_seed(1)
    B, H, N, hd = 2, 2, 6, 4
    q, k, v = (torch.randn(B, H, N, hd, generator=g, dtype=torch.float64) for _ in range(3))
    key_valid = torch.arange(N)[None, :] < torch.tensor([6, 3])[:, None]
    m = AttentionMask(N, causal=True, prefix_len=torch.tensor([3, 2]), key_valid=key_valid)
    allowed = naive_allowed(N, True, torch.tensor([3, 2]), key_valid, B)
    scores = (q @ k.transpose(-1, -2)) / hd**0.5
    want = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    torch.testing.assert_close(attend(q, k, v, m, is_causal=False), want)
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    want_causal = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
    torch.testing.assert_close(attend(q, k, v, AttentionMask(N, causal=True), is_causal=False), want_causal)
