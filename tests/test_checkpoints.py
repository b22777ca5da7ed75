"""Checkpoints: our layouts against the peers (timm, transformers), strict loading, resizing, `aimv2 convert`.

The peer checks use full-size random weights written in Apple's layout: timm reads them through its own
checkpoint filter, transformers through a key map written here (not our exporter), and both must give our
features. Smaller checks use a 2-block tiny encoder.
"""

import json
import logging
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import aimv2
from aimv2.cli import main as cli
from aimv2.weights import (
    CheckpointError,
    convert_state_dict,
    detect_layout,
    export_hf,
    load_encoder,
    save_encoder,
)

LARGE = "aimv2-large-patch14-224"
NATIVE = "aimv2-large-patch14-native"
TINY = "aimv2-tiny-patch14-224"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _randomize_vectors_(model: torch.nn.Module, seed: int) -> None:
    """Norm scales and the patch bias away from ones/zeros, so a swapped or dropped norm changes outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))


def _tiny(seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("depth", 2)
    model = aimv2.create_model(TINY, **kw).eval()
    _randomize_vectors_(model, seed)
    return model


# ----------------------------------------------------------------------------- transformers, independently
def _apple_to_hf(sd: dict) -> dict:
    """Apple key names -> transformers Aimv2VisionModel, written from modeling_aimv2.py (not our tables)."""
    out = {}
    for k, v in sd.items():
        if k == "preprocessor.pos_embed":
            out["embeddings.position_embedding.weight"] = v[0]  # [1, N, D] -> nn.Embedding [N, D]
            continue
        k = k.replace("preprocessor.patchifier.proj.", "embeddings.patch_embed.")
        k = k.replace("preprocessor.patchifier.norm.", "embeddings.rms_norm.")
        k = k.replace("trunk.post_trunk_norm.", "rms_norm.").replace("trunk.blocks.", "encoder.layers.")
        k = k.replace(".norm_1.", ".rms_norm1.").replace(".norm_2.", ".rms_norm2.")
        k = k.replace(".mlp.fc1.", ".ffn.gate_proj.").replace(".mlp.fc3.", ".ffn.up_proj.")
        k = k.replace(".mlp.fc2.", ".ffn.down_proj.").replace(".attn.proj.", ".attention.out_proj.")
        if k.endswith(".attn.qkv.weight"):
            for name, part in zip("qkv", v.chunk(3, dim=0), strict=True):
                out[k.replace(".attn.qkv.", f".attention.{name}_proj.")] = part.clone()
            continue
        out[k] = v
    return out


def _hf_folder_from_apple(apple_file, out_dir, **config):
    """A transformers folder written by transformers' own config class and our test key map."""
    from transformers import Aimv2VisionConfig

    out_dir.mkdir()
    Aimv2VisionConfig(use_head=False, **config).save_pretrained(out_dir)
    save_file(_apple_to_hf(load_file(apple_file)), out_dir / "model.safetensors", metadata={"format": "pt"})
    return out_dir


def _hf_model(folder):
    from transformers import Aimv2VisionModel

    return Aimv2VisionModel.from_pretrained(folder, attn_implementation="sdpa").eval()


# ----------------------------------------------------------------------------- full-size peers
@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """A random aimv2-large-patch14-224 in Apple's layout, and our features of one image loaded from it."""
    d = tmp_path_factory.mktemp("large")
    torch.manual_seed(0)
    model = aimv2.create_model(LARGE)
    _randomize_vectors_(model, 0)
    apple = save_encoder(model, d / "apple.safetensors", layout="apple")
    del model
    ours = aimv2.create_model(LARGE, checkpoint=apple).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = ours(x)  # [1, 256, 1024]
    del ours
    yield {"dir": d, "apple": apple, "x": x, "feats": feats}
    shutil.rmtree(d)  # 1.2 GB: gone even when a test fails (pytest then keeps the run's folders)


def test_timm_loads_our_apple_file(large):
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    with torch.device("meta"):
        model = timm.create_model("aimv2_large_patch14_224", pretrained=False, num_classes=0)
    sd = checkpoint_filter_fn(load_file(large["apple"]), model)
    model.load_state_dict(sd, strict=True, assign=True)
    with torch.no_grad():
        theirs = model.eval().forward_features(large["x"])  # [1, 256, 1024]
    assert theirs.shape == large["feats"].shape
    assert _rel(large["feats"], theirs) < 1e-4


def test_we_load_timms_own_state_dict(large, tmp_path):
    """timm's aimv2 models keep their own names for the SwiGLU projections (fc1_g, fc1_x): a file of timm's
    ``state_dict()`` is detected as timm's layout, loads strictly and gives timm's features; our key map for it
    is the inverse of the renaming timm applies to Apple's files."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    with torch.device("meta"):
        model = timm.create_model("aimv2_large_patch14_224", pretrained=False, num_classes=0)
    sd = checkpoint_filter_fn(load_file(large["apple"]), model)  # timm's own names, from timm's own filter
    assert detect_layout(sd) == "timm"
    assert convert_state_dict(sd, "timm", "apple").keys() == load_file(large["apple"]).keys()
    save_file(sd, tmp_path / "timm.safetensors")
    ours = aimv2.create_model(LARGE, checkpoint=tmp_path / "timm.safetensors").eval()
    with torch.no_grad():
        assert torch.equal(ours(large["x"]), large["feats"])  # the same tensors, renamed: bit-identical


def test_transformers_matches_and_convert_round_trips(large, tmp_path):
    d = large["dir"]
    hf_ref = _hf_folder_from_apple(large["apple"], tmp_path / "hf-ref", image_size=224, patch_size=14)
    model = _hf_model(hf_ref)
    with torch.no_grad():
        theirs = model(pixel_values=large["x"]).last_hidden_state  # [1, 256, 1024]
    assert _rel(large["feats"], theirs) < 1e-4
    del model

    # our converter writes the same tensors and an equivalent config; back to Apple's layout is bit-exact
    assert cli(["convert", str(large["apple"]), "--to", "hf", str(d / "hf")]) == 0
    ref, ours = load_file(hf_ref / "model.safetensors"), load_file(d / "hf" / "model.safetensors")
    assert ref.keys() == ours.keys() and all(torch.equal(ref[k], ours[k]) for k in ref)
    from transformers import Aimv2VisionConfig

    ref_cfg, our_cfg = (Aimv2VisionConfig.from_pretrained(p).to_dict() for p in (hf_ref, d / "hf"))
    skip = {"transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype"}
    assert {k: v for k, v in our_cfg.items() if k not in skip} == {k: v for k, v in ref_cfg.items() if k not in skip}
    del ref, ours

    assert cli(["convert", str(d / "hf"), "--to", "apple", str(d / "back.safetensors")]) == 0
    orig, back = load_file(large["apple"]), load_file(d / "back.safetensors")
    assert orig.keys() == back.keys() and all(torch.equal(orig[k], back[k]) for k in orig)


def test_native_matches_transformers_on_a_non_square_image(large, tmp_path):
    """Sin-cos model, 10x16 patches: ours from an Apple file vs transformers from our export_hf folder
    (whose tensors equal the test key map's)."""
    with torch.device("meta"):
        native = aimv2.create_model(NATIVE)
    sd = load_file(large["apple"])
    sd.pop("preprocessor.pos_embed")
    native.load_state_dict(convert_state_dict(sd, "apple", "aimv2"), assign=True)
    apple = save_encoder(native, tmp_path / "native.safetensors", layout="apple")
    out = export_hf(native, tmp_path / "hf")
    del native, sd

    assert json.loads((out / "config.json").read_text())["is_native"] is True
    ref = _apple_to_hf(load_file(apple))
    exported = load_file(out / "model.safetensors")
    assert ref.keys() == exported.keys() and all(torch.equal(ref[k], exported[k]) for k in ref)
    del ref, exported

    x = torch.randn(1, 3, 14 * 10, 14 * 16, generator=torch.Generator().manual_seed(2))
    ours = aimv2.create_model(NATIVE, checkpoint=apple).eval()
    with torch.no_grad():
        a = ours(x)  # [1, 160, 1024]
    del ours
    model = _hf_model(out)
    assert model.config.is_native and not model.config.use_head
    with torch.no_grad():
        b = model(pixel_values=x).last_hidden_state  # [1, 160, 1024]
    assert _rel(a, b) < 1e-4


# ----------------------------------------------------------------------------- small: export, layouts, errors
def test_export_hf_from_pretrained_identical(tmp_path):
    from transformers import Aimv2VisionModel

    model = _tiny()
    export_hf(model, tmp_path / "hf")
    hf = Aimv2VisionModel.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert _rel(model(x), hf(pixel_values=x).last_hidden_state) < 1e-5
    back = load_encoder(tmp_path / "hf")  # name and config from the metadata
    assert back.name == TINY and back.cfg == model.cfg
    with torch.no_grad():
        assert torch.equal(back(x), model(x))

    # a folder transformers wrote (no metadata of ours: the config comes from config.json), then sharded
    apple = save_encoder(model, tmp_path / "apple.safetensors")
    ref = _hf_folder_from_apple(
        apple, tmp_path / "ref", hidden_size=192, intermediate_size=512, num_hidden_layers=2, num_attention_heads=3
    )
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((ref / "config.json").read_text())
    sd = load_file(ref / "model.safetensors")
    shards = {f"model-0000{i + 1}-of-00002.safetensors": dict(list(sd.items())[i::2]) for i in (0, 1)}
    for file, part in shards.items():
        save_file(part, sharded / file, metadata={"format": "pt"})
    weight_map = {k: file for file, part in shards.items() for k in part}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for folder in (ref, sharded):
        loaded = load_encoder(folder)
        assert loaded.cfg == model.cfg
        with torch.no_grad():
            assert torch.equal(loaded.eval()(x), model(x))


@pytest.mark.parametrize("layout", ["apple", "hf", "aimv2"])
def test_layout_detected_and_loaded(tmp_path, layout):
    model = _tiny()
    path = save_encoder(model, tmp_path / "m.safetensors", layout=layout)
    assert detect_layout(load_file(path)) == layout
    meta = load_encoder(path)
    assert meta.cfg == model.cfg
    assert all(not p.is_meta and p.requires_grad for p in meta.parameters())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(meta.eval()(x), model(x))


def test_run_folder_and_two_tower_checkpoints(tmp_path, caplog):
    model = _tiny()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = model(x)
    run = tmp_path / "run"
    save_encoder(model, run / "encoder.safetensors")
    (run / "config.yaml").write_text("model: aimv2-tiny-patch14-224\n")
    with torch.no_grad():
        assert torch.equal(load_encoder(run).eval()(x), ref)

    apple = convert_state_dict(model.state_dict(), "aimv2", "apple")
    lit = {f"image_encoder.{k}": v for k, v in apple.items()}
    lit.update(
        {
            "image_encoder.head.k.weight": torch.zeros(192, 192),
            "image_encoder.head.cls_token": torch.zeros(1, 1, 192),
            "text_encoder.trunk.blocks.0.attn.qkv.weight": torch.zeros(6, 2),
            "image_projector.weight": torch.zeros(4, 192),
            "log_logit_scale": torch.zeros(()),
        }
    )
    hf = convert_state_dict(model.state_dict(), "aimv2", "hf")
    clip = {f"vision_model.{k}": v for k, v in hf.items()}
    clip.update({"vision_model.head.k_proj.weight": torch.zeros(192, 192), "text_model.rms_norm.weight": torch.ones(8)})
    clip["logit_scale"] = torch.zeros(())
    for name, sd, layout, prefix in [("lit", lit, "apple", "image_encoder"), ("clip", clip, "hf", "vision_model")]:
        assert detect_layout(sd) == layout
        save_file(sd, tmp_path / f"{name}.safetensors")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="aimv2.weights"):
            loaded = aimv2.create_model(TINY, checkpoint=tmp_path / f"{name}.safetensors", depth=2)
        assert prefix in caplog.text and "ignoring" in caplog.text
        with torch.no_grad():
            assert torch.equal(loaded.eval()(x), ref)

    # only a two-tower file has extras that are dropped: the same extra in a plain file is an error
    apple["text_encoder.trunk.blocks.0.attn.qkv.weight"] = torch.zeros(6, 2)
    save_file(apple, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): text_encoder"):
        aimv2.create_model(TINY, checkpoint=tmp_path / "extra.safetensors", depth=2)


def test_bare_apple_file_is_named_from_its_shapes(tmp_path):
    torch.manual_seed(0)
    model = aimv2.create_model(TINY)
    save_file(convert_state_dict(model.state_dict(), "aimv2", "apple"), tmp_path / "bare.safetensors")
    loaded = load_encoder(tmp_path / "bare.safetensors")
    assert loaded.name == TINY and loaded.cfg == model.cfg


def test_strict_load_errors_name_the_problem(tmp_path):
    model = _tiny()
    sd = convert_state_dict(model.state_dict(), "aimv2", "apple")

    def load(bad: dict, name=TINY, **kw):
        path = tmp_path / "bad.safetensors"
        save_file(bad, path)
        return aimv2.create_model(name, checkpoint=path, depth=2, **kw)

    missing = {k: v for k, v in sd.items() if k != "trunk.blocks.1.mlp.fc2.weight"}
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): blocks\.1\.mlp\.fc2\.weight"):
        load(missing)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): trunk\.blocks\.0\.attn\.qkv\.bias"):
        load({**sd, "trunk.blocks.0.attn.qkv.bias": torch.zeros(576)})
    short = {**sd, "trunk.blocks.0.mlp.fc3.weight": torch.zeros(500, 192)}
    with pytest.raises(CheckpointError, match=r"shape mismatches \(1\): blocks\.0\.mlp\.fc3\.weight: checkpoint"):
        load(short)
    with pytest.raises(CheckpointError, match="asked for aimv2-tiny-patch14-336 .*pass img_size"):
        load(sd, name="aimv2-tiny-patch14-336")

    # a huge checkpoint (one block, to stay small) asked for as large
    torch.manual_seed(0)
    huge = save_encoder(aimv2.create_model("aimv2-huge-patch14-224", depth=1), tmp_path / "huge.safetensors")
    with pytest.raises(CheckpointError, match=r"looks like aimv2-huge-patch14-224 .*1536 wide.*asked for aimv2-large"):
        aimv2.create_model(LARGE, checkpoint=huge)


def test_refuses_pickles_and_missing_files(tmp_path):
    pt = tmp_path / "model.pt"
    pt.write_bytes(b"not even a pickle")
    with pytest.raises(CheckpointError, match="never unpickle"):
        aimv2.create_model(TINY, checkpoint=pt)
    folder = tmp_path / "hf-old"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="never unpickle"):
        load_encoder(folder)
    with pytest.raises(FileNotFoundError):
        load_encoder(tmp_path / "nothing.safetensors")
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        load_encoder(tmp_path / "no-such-run")


def test_model_name_spec_is_random_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="aimv2.weights"):
        model = load_encoder(TINY, depth=1)
    assert model.cfg.depth == 1 and "untrained" in caplog.text


def test_pos_embed_resized_on_load(tmp_path):
    model = _tiny()
    with torch.no_grad():  # channel 0 ramps down the rows, channel 1 across the columns (raster order)
        ramp = torch.arange(16.0)
        model.pos_embed[0, :, 0] = ramp[:, None].expand(16, 16).flatten()
        model.pos_embed[0, :, 1] = ramp[None, :].expand(16, 16).flatten()
    path = save_encoder(model, tmp_path / "m.safetensors")

    # non-square target: a transposed or mis-ordered resize cannot pass. Bicubic keeps a ramp linear inside.
    wide = aimv2.create_model(TINY, checkpoint=path, depth=2, img_size=(336, 448))
    pe = wide.pos_embed.detach().reshape(24, 32, 192)
    rows = (torch.arange(24.0) + 0.5) * 16 / 24 - 0.5  # source row of each new row (half-pixel centres)
    cols = (torch.arange(32.0) + 0.5) * 16 / 32 - 0.5
    assert torch.allclose(pe[3:-3, :, 0], rows[3:-3, None].expand(-1, 32), atol=1e-4)
    assert torch.allclose(pe[:, 3:-3, 1], cols[None, 3:-3].expand(24, -1), atol=1e-4)

    big = aimv2.create_model(TINY, checkpoint=path, depth=2, img_size=336).eval()
    assert big.pos_embed.shape == (1, 24 * 24, 192)
    x224 = F.interpolate(torch.rand(2, 3, 8, 8), size=224, mode="bicubic", align_corners=False)  # smooth images
    x336 = F.interpolate(x224, size=336, mode="bicubic", align_corners=False)
    with torch.no_grad():
        f336 = big(x336)  # [2, 576, 192]
        assert torch.isfinite(f336).all()
        assert torch.allclose(f336, model(x336), atol=1e-5)  # same as resizing on the fly in the forward pass
        f224 = model(x224)  # [2, 256, 192]
    pooled = F.adaptive_avg_pool2d(f336.transpose(1, 2).reshape(2, 192, 24, 24), 16)  # [2, 192, 16, 16]
    pooled = pooled.flatten(2).transpose(1, 2)  # [2, 256, 192], the 224 grid's positions
    mu = f224.mean(dim=(0, 1))  # [192]: take out what all tokens share
    same = F.cosine_similarity(pooled - mu, f224 - mu, dim=-1).mean()
    other = F.cosine_similarity(pooled - mu, f224.flip(0) - mu, dim=-1).mean()  # the other image's features
    assert same > 0.9 and same > other + 0.1


def test_convert_cli_errors_are_one_line(tmp_path, capsys):
    model = _tiny()
    src = save_encoder(model, tmp_path / "m.safetensors")
    assert cli(["convert", str(tmp_path / "missing.safetensors"), "--to", "hf", str(tmp_path / "o")]) == 2
    assert cli(["convert", str(src), "--to", "caffe", str(tmp_path / "o")]) == 2
    (tmp_path / "m.pth").write_bytes(b"x")
    assert cli(["convert", str(tmp_path / "m.pth"), "--to", "apple", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("aimv2 convert: error: ") for line in err)
    assert "no such file" in err[0] and "unknown layout 'caffe'" in err[1] and "never unpickle" in err[2]

    # a stated name is checked against the checkpoint (this one has 2 blocks, the name 12)
    assert cli(["convert", str(src), "--to", "hf", str(tmp_path / "hf"), "--name", TINY]) == 2
    assert "looks like aimv2-tiny-patch14-224 with depth=2" in capsys.readouterr().err

    # ours -> hf -> ours through the command is bit-exact, and the output is not overwritten by accident
    assert cli(["convert", str(src), "--to", "hf", str(tmp_path / "hf")]) == 0
    assert cli(["convert", str(tmp_path / "hf"), "--to", "aimv2", str(tmp_path / "back.safetensors")]) == 0
    assert cli(["convert", str(tmp_path / "hf"), "--to", "aimv2", str(tmp_path / "back.safetensors")]) == 2
    orig, back = load_file(src), load_file(tmp_path / "back.safetensors")
    assert detect_layout(back) == "aimv2" and detect_layout(orig) == "apple"
    orig = convert_state_dict(orig, "apple", "aimv2")
    assert orig.keys() == back.keys() and all(torch.equal(orig[k], back[k]) for k in orig)
