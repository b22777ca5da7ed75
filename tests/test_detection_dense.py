"""Dense features: token maps, windowed attention (against timm's partition and a masked global reference) and the
simple feature pyramid's shapes and strides for several input sizes."""

import math

import pytest
import torch
from timm.models.vision_transformer_sam import window_partition as timm_partition
from timm.models.vision_transformer_sam import window_unpartition as timm_unpartition

import aimv2
from aimv2.models.dense import (
    DenseEncoder,
    SegmentationHead,
    ViTDetBackbone,
    default_global_blocks,
    tokens_to_map,
    window_partition,
    window_unpartition,
)


def tiny(pos_embed="learned", depth=3):
    torch.manual_seed(0)
    return aimv2.create_model("aimv2-tiny-patch8-64", depth=depth, pos_embed=pos_embed).eval()


def test_maps_are_the_encoders_tokens_at_other_sizes():
    enc = tiny()
    dense = DenseEncoder(enc)
    x = torch.randn(2, 3, 48, 80)  # not the 64 x 64 the learned embedding was made for: resized
    with torch.no_grad():
        maps = dense(x, blocks=[0, -1])
        ref = enc.forward_features(x, blocks=[0, -1])
    assert [tuple(m.shape) for m in maps] == [(2, enc.embed_dim, 6, 10)] * 2
    for m, r in zip(maps, ref, strict=True):
        torch.testing.assert_close(m, tokens_to_map(r, (6, 10)), rtol=0, atol=0)
        torch.testing.assert_close(m[:, :, 1, 7], r[:, 1 * 10 + 7])  # row 1, column 7 is raster token 17


def test_window_partition_matches_timm_and_round_trips():
    x = torch.randn(2, 7, 10, 16)
    wins, mask = window_partition(x, (4, 4))
    ref, pad_hw = timm_partition(x, 4)
    torch.testing.assert_close(wins, ref.reshape(ref.shape[0], 16, 16), rtol=0, atol=0)
    assert pad_hw == (8, 12) and mask.shape == (2 * 6, 1, 1, 16)
    assert mask.sum() == 2 * 7 * 10  # the real tokens, each once
    back = window_unpartition(wins, (4, 4), (7, 10), 2)
    torch.testing.assert_close(back, x, rtol=0, atol=0)
    torch.testing.assert_close(back, timm_unpartition(ref, 4, (7, 10), pad_hw), rtol=0, atol=0)


def test_one_window_over_the_whole_grid_is_global_attention_exactly():
    enc = tiny()
    x = torch.randn(2, 3, 48, 64)  # 6 x 8 patches
    dense = DenseEncoder(enc, global_blocks=())
    with torch.no_grad():
        (glob,) = dense(x)
        dense.window_size = (6, 8)
        (win,) = dense(x)
        dense.window_size = 4  # 4 x 4 windows on a 6 x 8 grid: padded, really windowed
        (small,) = dense(x)
    assert torch.equal(win, glob)
    assert not torch.allclose(small, glob, atol=1e-3)


def test_windowed_blocks_equal_global_attention_masked_to_windows():
    """A naive reference: every block global, with a mask that lets a token see only the tokens of its window."""
    enc = tiny(pos_embed="sincos", depth=4)
    x = torch.randn(2, 3, 56, 40)  # 7 x 5 patches, windows of 3 x 2: padding on both sides
    dense = DenseEncoder(enc, window_size=(3, 2), global_blocks=(1,))
    rows, cols = torch.meshgrid(torch.arange(7), torch.arange(5), indexing="ij")
    win_id = (rows // 3 * 10 + cols // 2).flatten()  # [N]
    same = (win_id[:, None] == win_id[None, :])[None, None]  # [1, 1, N, N]
    with torch.no_grad():
        (out,) = dense(x)
        h = enc.embed(x)
        for i, blk in enumerate(enc.blocks):
            h = blk(h, None if i == 1 else same)
        ref = tokens_to_map(enc.norm(h), (7, 5))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_default_global_blocks_follow_vitdet():
    assert default_global_blocks(12) == (2, 5, 8, 11)
    assert default_global_blocks(24) == (5, 11, 17, 23)
    assert default_global_blocks(2) == (0, 1)


@pytest.mark.parametrize("hw", [(64, 64), (96, 128), (128, 48)])
@pytest.mark.parametrize("pos_embed", ["learned", "sincos"])
def test_pyramid_shapes_and_strides(hw, pos_embed):
    enc = tiny(pos_embed, depth=2)
    bb = ViTDetBackbone(enc, out_channels=32, window_size=4).eval()
    H, W = hw
    with torch.no_grad():
        feats = bb(torch.randn(1, 3, H, W))
    assert list(feats) == ["0", "1", "2", "3", "pool"]
    assert bb.strides == (2.0, 4.0, 8.0, 16.0, 32.0)  # patch 8: p/4 ... 4p
    for (name, f), s in zip(feats.items(), bb.strides, strict=True):
        assert f.shape[:2] == (1, 32), name
        assert f.shape[-2:] == (math.ceil(H / s), math.ceil(W / s)), (name, hw)  # "pool" is a 1x1/2 ceil pool


def test_pyramid_strides_for_patch_16():
    enc = aimv2.create_model("aimv2-tiny-patch8-64", depth=1, patch_size=16, img_size=64)
    bb = ViTDetBackbone(enc, out_channels=16).eval()
    assert bb.strides == (4.0, 8.0, 16.0, 32.0, 64.0)  # ViTDet's strides for a patch-16 ViT
    with torch.no_grad():
        feats = bb(torch.randn(1, 3, 128, 192))
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)]


def test_segmentation_head_gives_input_sized_logits_and_learns_through_the_encoder():
    enc = tiny(depth=1)
    bb = ViTDetBackbone(enc, out_channels=16)
    head = SegmentationHead(16, num_classes=5, hidden=16)
    logits = head(bb(torch.randn(2, 3, 32, 48)), (32, 48))
    assert logits.shape == (2, 5, 32, 48)
    logits.sum().backward()
    assert enc.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
