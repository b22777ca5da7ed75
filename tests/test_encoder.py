"""The encoder: names and sizes, prefix-attention semantics by perturbation, resolution handling."""

import pytest
import torch

import aimv2
from aimv2.models import model_config, parse_model_name
from aimv2.models.encoder import resize_pos_embed, sincos_pos_embed_2d

OFFICIAL_PARAMS_M = {"large": 309.2, "huge": 680.9, "1B": 1235.0, "3B": 2720.7}


@pytest.mark.parametrize("size,expected", OFFICIAL_PARAMS_M.items())
def test_official_parameter_counts(size, expected):
    with torch.device("meta"):
        model = aimv2.create_model(f"aimv2-{size}-patch14-224")
    assert round(model.num_params() / 1e6, 1) == expected


def test_name_parsing_and_overrides():
    cfg = parse_model_name("aimv2-large-patch14-native")
    assert cfg.pos_embed == "sincos" and cfg.embed_dim == 1024 and cfg.patch_size == 14
    assert parse_model_name("aimv2-1b-patch14-448").embed_dim == 2048
    cfg = model_config("aimv2-tiny-patch8-64", depth=2, img_size=96)
    assert cfg.depth == 2 and cfg.grid_size == (12, 12)
    with pytest.raises(ValueError, match="unknown model name"):
        parse_model_name("aimv2-gigantic-patch14-224")
    with pytest.raises(ValueError, match="unknown encoder option"):
        model_config("aimv2-tiny-patch8-64", dept=2)
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        model_config("aimv2-tiny-patch8-64", img_size=70)


def _tiny(**kw):
    torch.manual_seed(0)
    kw.setdefault("depth", 3)
    return aimv2.create_model("aimv2-tiny-patch8-64", **kw).eval()


def _perturb_patches(x, patches, patch_size):
    """Add noise to the listed patch indices (raster order) of images x [B, 3, H, W]."""
    x = x.clone()
    gw = x.shape[-1] // patch_size
    for k in patches:
        r, c = divmod(k, gw)
        sl = (..., slice(r * patch_size, (r + 1) * patch_size), slice(c * patch_size, (c + 1) * patch_size))
        x[sl] += torch.randn_like(x[sl]) * 3
    return x


def test_prefix_features_ignore_non_prefix_patches():
    model = _tiny()
    x = torch.randn(2, 3, 64, 64)
    prefix = torch.tensor([5, 20])
    base = model(x, prefix_len=prefix)
    for b, m in enumerate(prefix.tolist()):
        xp = x.clone()
        xp[b : b + 1] = _perturb_patches(x[b : b + 1], range(m, 64), 8)
        out = model(xp, prefix_len=prefix)
        # the prefix of sample b is unchanged; its later patches are changed
        torch.testing.assert_close(out[b, :m], base[b, :m], rtol=0, atol=1e-5)
        assert (out[b, m:] - base[b, m:]).abs().amax(-1).min() > 1e-3
        # the other sample is untouched
        torch.testing.assert_close(out[1 - b], base[1 - b], rtol=0, atol=1e-5)


def test_causal_patches_ignore_later_patches():
    model = _tiny()
    x = torch.randn(1, 3, 64, 64)
    m = 7
    base = model(x, prefix_len=m)
    for j in (m, m + 5, 40, 62):
        out = model(_perturb_patches(x, range(j + 1, 64), 8), prefix_len=m)
        torch.testing.assert_close(out[:, : j + 1], base[:, : j + 1], rtol=0, atol=1e-5)
        assert (out[:, j + 1 :] - base[:, j + 1 :]).abs().amax() > 1e-3


def test_gradient_reach_matches_prefix_mask():
    """d out[j] / d patch k is nonzero exactly when k < prefix or k <= j."""
    model = _tiny(depth=2)
    x = torch.randn(1, 3, 32, 32, requires_grad=True)  # 4x4 grid
    m = 5
    tokens = model.embed(x)
    tokens.retain_grad()
    mask = model.attention_mask(m, 1, 16, x.device)
    h = tokens
    for blk in model.blocks:
        h = blk(h, mask)
    out = model.norm(h)
    for j in range(16):
        tokens.grad = None
        out[0, j].sum().backward(retain_graph=True)
        reach = tokens.grad[0].abs().sum(-1) > 0
        expected = torch.tensor([k < m or k <= j for k in range(16)])
        assert torch.equal(reach, expected), j


def test_bidirectional_without_prefix():
    model = _tiny()
    x = torch.randn(1, 3, 64, 64)
    base = model(x)
    out = model(_perturb_patches(x, [63], 8))
    assert (out - base).abs().amax(-1).min() > 1e-4  # every patch sees the last one
    # prefix_len = N is the same as full attention; prefix of 0 or 1 is plain causal
    torch.testing.assert_close(model(x, prefix_len=64), base, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(x, prefix_len=0), model(x, prefix_len=1), rtol=1e-5, atol=1e-5)


def test_any_resolution_learned_and_sincos():
    model = _tiny()
    for h, w in [(64, 64), (96, 48), (40, 128)]:
        assert model(torch.randn(2, 3, h, w)).shape == (2, (h // 8) * (w // 8), 192)
    with pytest.raises(ValueError, match="not divisible by the patch size 8"):
        model(torch.randn(1, 3, 60, 64))
    native = aimv2.create_model("aimv2-tiny-patch8-native", depth=2).eval()
    assert native.pos_embed is None
    assert native(torch.randn(1, 3, 24, 72)).shape == (1, 27, 192)


def test_resized_position_embedding_is_cached_in_eval_and_differentiable_in_training():
    model = _tiny()
    with torch.no_grad():
        a = model._pos_embed(12, 6, torch.device("cpu"))
        assert model._pos_embed(12, 6, torch.device("cpu")) is a
    model.train()
    pe = model._pos_embed(12, 6, torch.device("cpu"))
    pe.sum().backward()
    assert model.pos_embed.grad is not None and model.pos_embed.grad.abs().sum() > 0
    with torch.no_grad():  # a parameter update invalidates the cache
        model.pos_embed.add_(1.0)
        b = model._pos_embed(12, 6, torch.device("cpu"))
    assert not torch.equal(a, b)


def test_sincos_layout_columns_first():
    pe = sincos_pos_embed_2d(3, 5, 16)  # [15, 16]; quarter = 4
    r, c = 2, 3
    row = pe[r * 5 + c]
    omega = 10000 ** (-torch.arange(4, dtype=torch.float64) / 4)
    expected = torch.cat([(c * omega).sin(), (c * omega).cos(), (r * omega).sin(), (r * omega).cos()]).float()
    torch.testing.assert_close(row, expected)


def test_forward_features_blocks():
    model = _tiny(depth=4)
    x = torch.randn(2, 3, 64, 64)
    last = model(x)
    feats = model.forward_features(x, blocks=[1, -1])
    assert len(feats) == 2
    torch.testing.assert_close(feats[1], last)
    assert len(model.forward_features(x, blocks=3)) == 3
    raw = model.forward_features(x, blocks=[-1], norm=False)[0]
    torch.testing.assert_close(model.norm(raw), last)
    with pytest.raises(ValueError, match="out of range"):
        model.forward_features(x, blocks=[4])


def test_activation_checkpointing_same_gradients():
    """The one activation-checkpointing mechanism (applied from outside, as the trainer does) changes no
    gradient, and really wraps every block."""
    from aimv2.train.parallelize import apply_activation_checkpointing

    model = _tiny(depth=2).train()
    x = torch.randn(2, 3, 64, 64)
    model(x, prefix_len=3).square().mean().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    apply_activation_checkpointing(model)
    assert all(type(b).__name__ == "CheckpointWrapper" for b in model.blocks)
    model(x, prefix_len=3).square().mean().backward()
    for p, g in zip(model.parameters(), ref, strict=True):
        torch.testing.assert_close(p.grad, g)


def test_every_parameter_gets_a_gradient():
    model = _tiny(depth=2).train()
    model(torch.randn(2, 3, 64, 64), prefix_len=torch.tensor([3, 9])).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


def test_bf16_close_to_fp32_in_the_dtype_each_mode_gives():
    """bf16 matmuls (under autocast, or with the weights cast) stay within 2% (relative L2, about five bf16
    roundings of 2**-8; measured ~0.5-0.8%) of float32, and come out in the dtype each mode should give:
    float32 under autocast (the position embedding is added in the weights' float32, so the residual stream
    and the final RMSNorm stay float32), bfloat16 for a model and input cast with ``.to(bfloat16)``. A
    non-zero error shows the bf16 kernels really ran."""
    model = _tiny()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # norm scales away from ones, so a norm computed in the wrong dtype shows
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    x = torch.randn(2, 3, 64, 64)
    prefix = torch.tensor([3, 9])
    rel = lambda out, ref: ((out.float() - ref).norm() / ref.norm()).item()
    with torch.no_grad():
        for prefix_len in (None, prefix):
            ref = model(x, prefix_len=prefix_len)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x, prefix_len=prefix_len)
            assert out.dtype == torch.float32
            assert 1e-4 < rel(out, ref) < 0.02
        ref = model(x)
        out = model.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert 1e-4 < rel(out, ref) < 0.02


@pytest.mark.parametrize(
    "old,new",
    [((16, 16), (24, 24)), ((16, 16), (24, 32)), ((4, 6), (6, 4)), ((7, 5), (3, 9)), ((24, 24), (16, 16))],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resize_pos_embed_matches_timm(old, new, dtype):
    """Our resize (forward on other sizes, and loading with another img_size) equals timm's
    resample_abs_pos_embed, up, down and across non-square grids: the same bicubic antialiased interpolation
    in float32, so the results agree to float32 rounding (atol 1e-6 on values of size ~1; bf16 inputs come back
    as bf16 and must be identical)."""
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    pe = torch.randn(1, old[0] * old[1], 32).to(dtype)  # [1, h0*w0, D]
    ours = resize_pos_embed(pe, old, new)
    theirs = resample_abs_pos_embed(pe, list(new), list(old), num_prefix_tokens=0)
    assert ours.shape == (1, new[0] * new[1], 32) and ours.dtype == dtype
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6 if dtype == torch.float32 else 0)


def test_meta_construction_then_materialize():
    with torch.device("meta"):
        model = aimv2.create_model("aimv2-tiny-patch8-64", depth=2)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    out = model(torch.randn(1, 3, 64, 64))
    assert torch.isfinite(out).all()
