"""High-resolution tiling: the documented number and order of tokens, each tile's tokens those of encoding that tile
alone, the global view that of the downsized image, and token pooling an average of k x k patch features."""

import torch
import torch.nn.functional as F

from aimv2.objectives.tiling import num_views, split_views
from aimv2.objectives.vlm import VisionLanguageModel
from aimv2.weights import create_model


class _LM(torch.nn.Module):
    """Just an embedding table: image_features never calls the LM."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 8)

    def get_input_embeddings(self):
        return self.emb


def _model(tiles, pool=1):
    torch.manual_seed(0)
    enc = create_model("aimv2-tiny-patch8-64", depth=1, img_size=16)  # 2 x 2 patches of 8 per view
    return VisionLanguageModel(enc, _LM(), 9, tiles=tiles, pool=pool).eval()


def test_views_are_the_global_view_then_the_tiles_row_by_row():
    n, m = 2, 3
    images = torch.zeros(1, 3, n * 4, m * 4)
    for r in range(n):
        for c in range(m):
            images[..., r * 4 : (r + 1) * 4, c * 4 : (c + 1) * 4] = r * m + c
    views = split_views(images, (n, m), (4, 4))
    assert views.shape == (1, 1 + n * m, 3, 4, 4) and num_views((n, m)) == 7
    for k in range(n * m):
        assert (views[0, 1 + k] == k).all()
    ref = F.interpolate(images, size=(4, 4), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(views[0, 0], ref[0])
    assert split_views(images[..., :4, :4], (1, 1), (4, 4)).shape == (1, 1, 3, 4, 4)  # 1 x 1: no global view


def test_tiled_tokens_are_each_view_encoded_alone_in_the_documented_order():
    model = _model((2, 3))
    images = torch.randn(2, 3, 32, 48)
    assert model.image_size == (32, 48)
    with torch.no_grad():
        feats = model.image_features(images)  # [B, K, D]
        per_view = 4  # 2 x 2 patches
        assert feats.shape == (2, 7 * per_view, model.encoder.embed_dim) and model.tokens_per_image == 28
        small = F.interpolate(images, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
        expected = [model.encoder(small)]
        for r in range(2):
            for c in range(3):
                expected.append(model.encoder(images[..., r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16]))
    torch.testing.assert_close(feats, torch.cat(expected, dim=1), rtol=1e-5, atol=1e-5)


def test_token_pooling_averages_each_views_patch_grid():
    model = _model((2, 2), pool=2)
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        pooled = model.image_features(images)  # one token per view: 2 x 2 patches pooled 2 x 2
        full = _model((2, 2)).image_features(images)
    assert pooled.shape == (1, 5, model.encoder.embed_dim) and model.tokens_per_image == 5
    torch.testing.assert_close(pooled, full.reshape(1, 5, 4, -1).mean(2), rtol=1e-5, atol=1e-5)
