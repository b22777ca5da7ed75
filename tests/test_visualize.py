"""`aimv2 visualize`: the attention maps are the weights the block really uses, the PCA colours are the principal
components, and the command writes its pictures for any encoder and a non-square size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import aimv2
from aimv2.cli import main
from aimv2.eval.visualize import features_and_attention, pca_rgb, query_maps


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return aimv2.create_model("aimv2-tiny-patch8-64", depth=3).eval()


def test_attention_is_what_the_block_computes(encoder):
    """On a non-square 48x80 image: each head's weights equal a naive per-head recomputation from the qkv weight
    rows, rows sum to 1, and the weights times v through proj give the block's own attention output (computed by
    the model's attention backend), so they are the weights the block used."""
    pixels = torch.randn(2, 3, 48, 80)
    block = 1
    feats, weights = features_and_attention(encoder, pixels, block=block)
    N, D = 6 * 10, encoder.cfg.embed_dim
    heads = encoder.blocks[block].attn.num_heads
    assert feats.shape == (2, N, D) and weights.shape == (2, heads, N, N)
    torch.testing.assert_close(feats, encoder(pixels))
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, heads, N))

    with torch.no_grad():  # the block's input by hand: embed, the blocks before, its first norm
        x = encoder.embed(pixels)
        for blk in encoder.blocks[:block]:
            x = blk(x)
        h = encoder.blocks[block].norm1(x)
        attn = encoder.blocks[block].attn
        w = attn.qkv.weight  # [3D, D]: q, k, v stacked, each head's columns contiguous
        hd = D // heads
        outs = []
        for b in range(2):
            per_head = []
            for i in range(heads):
                q = h[b] @ w[i * hd : (i + 1) * hd].T
                k = h[b] @ w[D + i * hd : D + (i + 1) * hd].T
                v = h[b] @ w[2 * D + i * hd : 2 * D + (i + 1) * hd].T
                s = np.exp((q @ k.T / hd**0.5).double().numpy())
                a = s / s.sum(axis=1, keepdims=True)
                np.testing.assert_allclose(weights[b, i].double().numpy(), a, atol=1e-5)
                per_head.append(weights[b, i] @ v)
            outs.append(attn.proj(torch.cat(per_head, dim=-1)))
        torch.testing.assert_close(torch.stack(outs), attn(h), atol=1e-5, rtol=1e-4)

    maps = query_maps(weights, (6, 10), 7)
    torch.testing.assert_close(maps[1, 2].reshape(-1), weights[1, 2, 7])
    torch.testing.assert_close(query_maps(weights, (6, 10), "mean")[0, 0].reshape(-1), weights[0, 0].mean(0))
    with pytest.raises(ValueError, match="--query 60 is out of range"):
        query_maps(weights, (6, 10), 60)
    with pytest.raises(ValueError, match="--block 3 is out of range"):
        features_and_attention(encoder, pixels, block=3)


def test_pca_colours_are_the_principal_components():
    """Fitted over all images together: the first colour channel orders patches as the top eigenvector of the
    features' covariance (numpy's eigh), shapes follow each image's grid, values lie in [0, 1]."""
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(3, 16, generator=gen)
    a = torch.randn(12, 3, generator=gen) * torch.tensor([5.0, 2.0, 1.0]) @ basis  # a grid of 3 x 4
    b = torch.randn(10, 3, generator=gen) * torch.tensor([5.0, 2.0, 1.0]) @ basis  # a grid of 2 x 5
    rgb = pca_rgb([a, b], [(3, 4), (2, 5)], quantile=0.0)
    assert rgb[0].shape == (3, 4, 3) and rgb[1].shape == (2, 5, 3)
    assert all(float(x.min()) >= 0 and float(x.max()) <= 1 for x in rgb)
    x = torch.cat([a, b]).double().numpy()
    x = x - x.mean(0)
    top = np.linalg.eigh(x.T @ x)[1][:, -1]
    proj = x @ top
    red = torch.cat([rgb[0][..., 0].reshape(-1), rgb[1][..., 0].reshape(-1)]).double().numpy()
    expected = (proj - proj.min()) / (proj.max() - proj.min())
    if np.corrcoef(red, expected)[0, 1] < 0:  # a component's sign is a convention
        expected = 1 - expected
    np.testing.assert_allclose(red, expected, atol=1e-4)


def test_visualize_command_writes_pictures(tmp_path, capsys):
    """Two images of different shapes at a non-square --size, a chosen block and query: four PNGs of the size
    drawn; a second run refuses to overwrite; a size off the patch is one error line."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 70, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 255, (90, 50, 3), dtype=np.uint8)).save(tmp_path / "b.jpg")
    out = tmp_path / "vis"
    args = ["visualize", "aimv2-tiny-patch8-64", "--set", "depth=2", str(tmp_path / "a.png"), str(tmp_path / "b.jpg"),
            "--out", str(out), "--size", "32x48", "--block", "0", "--query", "5", "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    assert "4x6 patches" in capsys.readouterr().out
    for name in ("a-pca.png", "a-attention.png", "b-pca.png", "b-attention.png"):
        with Image.open(out / name) as img:
            assert img.size[0] > 100 and img.size[1] > 50
    assert main(args) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main([*args[:-8], "--out", str(out), "--size", "30", "--overwrite"]) == 2
    assert "not a multiple of the patch size 8" in capsys.readouterr().err
