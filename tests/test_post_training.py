"""Post-training: checkpoints evaluated and continued at higher resolutions, model.init_from from a run folder /
Apple / transformers layouts, the frozen-encoder warm-up (with resume in the middle of it), per-module lr
multipliers, the high-res presets and --resolution in the feature commands."""

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RUN, TORCHRUN_AIMV2, subprocess_env

import aimv2
from aimv2.cli import main
from aimv2.config import ConfigError, load_config
from aimv2.models.encoder import resize_pos_embed, sincos_pos_embed_2d
from aimv2.objectives import build_model
from aimv2.train import train
from aimv2.train.init_from import InitFromError, init_from
from aimv2.train.optim import build_optimizer, param_groups, set_lr
from aimv2.train.parallelize import apply_activation_checkpointing
from aimv2.weights import RunError, convert_checkpoint, read_checkpoint, read_run
from aimv2.weights.layout import detect_layout, to_ours
from aimv2.weights.run_folder import list_checkpoints, load_latest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny-synthetic.yaml"
AT48 = ["model.encoder_overrides={depth: 2, img_size: 48}"]  # continue the 32 px (4x4) source at 48 px (6x6)
VOCAB = None


def _cfg(out, *extra, path=TINY):
    return load_config(path, [*TINY_RUN, f"out_dir={out}", *extra])


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 2-step run at 32 px (encoder + decoder), its Apple-layout encoder file and a transformers folder."""
    root = tmp_path_factory.mktemp("source")
    train(_cfg(root / "run", "train.steps=2", "train.checkpoint_every=2", "seed=1"))
    hf = convert_checkpoint(root / "run/encoder.safetensors", "hf", root / "hf")
    return root / "run", root / "run/encoder.safetensors", hf


def _model(cfg):
    global VOCAB
    if VOCAB is None:
        from aimv2.data.tokenizer import default_synthetic_tokenizer

        VOCAB = default_synthetic_tokenizer(context_length=24)
    torch.manual_seed(cfg.seed)
    return build_model(cfg, VOCAB.vocab_size, VOCAB.pad_id)


def _source_state(run):
    return load_latest(run)["model"]


def _check_encoder(model, src_sd, resized):
    enc = {k.removeprefix("encoder."): v for k, v in src_sd.items() if k.startswith("encoder.")}
    if resized:
        enc["pos_embed"] = resize_pos_embed(enc["pos_embed"], (4, 4), (6, 6))
    got = model.encoder.state_dict()
    assert set(got) == set(enc)
    for k, v in enc.items():
        assert torch.equal(got[k], v), k


# ------------------------------------------------------------------------------------ features at higher res
def test_checkpoint_at_224_gives_consistent_features_at_336_and_448(tmp_path):
    """A 224 checkpoint with a smooth (trained-like) position embedding, run at 336 and 448 after resizing: its
    features pooled back to the 16x16 grid correlate with the 224 ones, far more than a random-weight encoder's
    or the same weights with scrambled positions."""
    torch.manual_seed(0)
    kw = dict(depth=2)
    enc = aimv2.create_model("aimv2-tiny-patch14-224", **kw).eval()
    with torch.no_grad():
        enc.pos_embed.copy_(sincos_pos_embed_2d(16, 16, enc.cfg.embed_dim)[None])  # smooth, like a trained one
    path = tmp_path / "enc224.safetensors"
    aimv2.weights.save_encoder(enc, path, layout="apple")
    base = torch.rand(2, 3, 12, 12)  # smooth images: bicubic upsampled noise, the same scene at every size
    img = {r: F.interpolate(base, size=(r, r), mode="bicubic", align_corners=False) for r in (224, 336, 448)}

    def corr(a, b):
        a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
        return float(a @ b / (a.norm() * b.norm()))

    def pooled(e, r):  # [B, (r/14)^2, D] -> [B, D, 16, 16]
        f = e(img[r])
        g = r // 14
        return F.adaptive_avg_pool2d(f.transpose(1, 2).reshape(2, -1, g, g), 16)

    with torch.no_grad():
        ref = pooled(enc, 224)
        for r in (336, 448):
            hi = aimv2.create_model("aimv2-tiny-patch14-224", checkpoint=path, img_size=r, **kw).eval()
            assert hi.pos_embed.shape[1] == (r // 14) ** 2  # 24x24, 32x32
            c = corr(pooled(hi, r), ref)
            torch.manual_seed(1)
            control = aimv2.create_model(f"aimv2-tiny-patch14-{r}", **kw).eval()
            c_random = corr(pooled(control, r), ref)
            hi.pos_embed.copy_(hi.pos_embed[:, torch.randperm(hi.pos_embed.shape[1])])
            c_scrambled = corr(pooled(hi, r), ref)
            # scrambled positions keep the patch content: little lost correlation, but several times what resizing loses
            assert c > 0.8 and c > c_random + 0.5 and (1 - c) < (1 - c_scrambled) / 2, (r, c, c_random, c_scrambled)


# ------------------------------------------------------------------------------------ init_from
def test_init_from_run_folder_takes_encoder_and_decoder(source, tmp_path):
    run, _, _ = source
    src = _source_state(run)
    for extra, resized in (([], False), (AT48, True)):
        cfg = _cfg(tmp_path / "new", f"model.init_from={run}", *extra)
        model = _model(cfg)
        record = init_from(model, cfg)
        _check_encoder(model, src, resized)
        for k, v in model.decoder.state_dict().items():
            assert torch.equal(v, src[f"decoder.{k}"]), k
        assert record["kind"] == "run" and record["decoder"] and record["step"] == 2
        assert record["pos_embed"] == ("4x4 -> 6x6 (resized)" if resized else "4x4")
    cfg = _cfg(tmp_path / "new", f"model.init_from={run}", "model.init_decoder=false")
    model, fresh = _model(cfg), _model(cfg)
    assert not init_from(model, cfg)["decoder"]
    for k, v in model.decoder.state_dict().items():
        assert torch.equal(v, fresh.decoder.state_dict()[k]), k  # the same fresh init as a run from scratch


def test_run_folder_reader_and_a_run_without_its_encoder_file(source, tmp_path):
    """read_run gives the run's config, tokenizer and latest step checkpoint split into encoder and decoder; a
    run that has not written encoder.safetensors yet (still training) loads its encoder from that checkpoint,
    with the same weights as the file written at the end."""
    run_dir, encoder_file, _ = source
    run = read_run(run_dir)
    state = run.latest()
    assert run.config.model.encoder == "aimv2-tiny-patch8-64" and run.tokenizer_file.name == "tokenizer.json"
    assert state.step == 2 and state.path == run.checkpoints()[-1] == list_checkpoints(run_dir)[-1]
    full = _source_state(run_dir)
    assert state.part("decoder.").keys() == {k.removeprefix("decoder.") for k in full if k.startswith("decoder.")}
    enc = run.encoder(state)
    assert enc.layout == "aimv2" and enc.name == "aimv2-tiny-patch8-64" and enc.config.img_size == 32

    unfinished = tmp_path / "unfinished"
    shutil.copytree(run_dir, unfinished)
    (unfinished / "encoder.safetensors").unlink()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = aimv2.create_model(None, checkpoint=encoder_file).eval()(x)
        assert torch.equal(aimv2.create_model(None, checkpoint=unfinished).eval()(x), ref)
    with pytest.raises(RunError, match="no config.yaml"):
        read_run(tmp_path)


@pytest.mark.parametrize("which", ["apple", "hf_folder", "hf_file"])
def test_init_from_encoder_files_match_the_source(source, tmp_path, which):
    run, apple, hf = source
    path = {"apple": apple, "hf_folder": hf, "hf_file": hf / "model.safetensors"}[which]
    assert read_checkpoint(path).layout == ("apple" if which == "apple" else "hf")
    src = _source_state(run)
    for extra, resized in (([], False), (AT48, True)):
        cfg = _cfg(tmp_path / "new", f"model.init_from={path}", *extra)
        model, fresh = _model(cfg), _model(cfg)
        record = init_from(model, cfg)
        _check_encoder(model, src, resized)
        assert not record["decoder"] and record["kind"] == "encoder"
        for k, v in model.decoder.state_dict().items():
            assert torch.equal(v, fresh.decoder.state_dict()[k]), k


def test_init_from_errors_are_clear(source, tmp_path):
    run, apple, _ = source
    cfg = _cfg(tmp_path / "new", f"model.init_from={tmp_path / 'nope.safetensors'}")
    with pytest.raises(InitFromError, match="nope.safetensors: no such file or folder"):
        init_from(_model(cfg), cfg)
    # another width: the message says what the checkpoint is and what this run asks for
    cfg = _cfg(tmp_path / "new", f"model.init_from={apple}", "model.encoder=aimv2-small-patch8-32")
    with pytest.raises(InitFromError, match=r"192 wide.*you asked for aimv2-small-patch8-32 \(384 wide"):
        init_from(_model(cfg), cfg)
    cfg = _cfg(tmp_path / "new", f"model.init_from={apple}", "model.encoder_overrides={depth: 3, img_size: 32}")
    with pytest.raises(InitFromError, match="2 blocks.*3 blocks"):
        init_from(_model(cfg), cfg)
    # a decoder that does not fit names the tensors and the way out
    cfg = _cfg(tmp_path / "new", f"model.init_from={run}", "model.decoder={embed_dim: 32, depth: 1, num_heads: 2}")
    with pytest.raises(
        InitFromError, match="(?s)decoder of that run does not match.*shape mismatches.*init_decoder=false"
    ):
        init_from(_model(cfg), cfg)
    with pytest.raises(ConfigError, match="freeze_encoder_steps.*model.init_from"):
        _cfg(tmp_path / "new", "train.freeze_encoder_steps=2", "train.steps=4")
    (tmp_path / "junk.pt").write_bytes(b"x")
    cfg = _cfg(tmp_path / "new", f"model.init_from={tmp_path / 'junk.pt'}")
    with pytest.raises(InitFromError, match="pickles"):
        init_from(_model(cfg), cfg)


# ------------------------------------------------------------------------------------ warm-up and resume
def _encoder_at(out, step):
    sd = torch.load(Path(out) / f"checkpoints/step_{step:08d}.pt", weights_only=True)
    return {k: v for k, v in sd["model"].items() if k.startswith("encoder.")}, sd


def test_frozen_warmup_then_unfrozen_records_origin_and_resume_does_not_reinit(source, tmp_path):
    run, apple, _ = source
    moved = tmp_path / "src.safetensors"
    shutil.copy(apple, moved)
    common = [
        f"model.init_from={moved}",
        *AT48,
        "train.freeze_encoder_steps=2",
        "train.checkpoint_every=1",
        "train.keep_last=10",
        "optim.lr_mult={encoder: 0.5}",
    ]
    train(_cfg(tmp_path / "a", "train.steps=4", *common))
    cfg0 = _cfg(tmp_path / "x", f"model.init_from={moved}", *AT48)
    m0 = _model(cfg0)
    init_from(m0, cfg0)
    start = {f"encoder.{k}": v for k, v in m0.encoder.state_dict().items()}
    dec0 = {k: v for k, v in m0.state_dict().items() if k.startswith("decoder.")}
    for step in (1, 2):  # bit-identical through the warm-up while the decoder trains
        enc, state = _encoder_at(tmp_path / "a", step)
        assert all(torch.equal(enc[k], v) for k, v in start.items()), step
        assert not all(torch.equal(state["model"][k], v) for k, v in dec0.items())
        assert state["init_from"]["path"] == str(moved) and state["init_from"]["pos_embed"] == "4x4 -> 6x6 (resized)"
    enc3, _ = _encoder_at(tmp_path / "a", 3)
    assert not torch.equal(enc3["encoder.blocks.0.attn.qkv.weight"], start["encoder.blocks.0.attn.qkv.weight"])

    # the same run stopped after step 1 (mid warm-up) and resumed with the source gone: no re-init, same weights
    train(_cfg(tmp_path / "b", "train.steps=1", *common))
    moved.unlink()
    train(_cfg(tmp_path / "b", "train.steps=4", *common))
    a, b = _encoder_at(tmp_path / "a", 4)[1], _encoder_at(tmp_path / "b", 4)[1]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert b["init_from"] == a["init_from"]
    # a run with no init_from records none; a fresh out_dir whose source is gone is a clear error
    with pytest.raises(InitFromError, match="no such file"):
        train(_cfg(tmp_path / "c", "train.steps=4", *common))


# ------------------------------------------------------------------------------------ lr multipliers
def test_lr_mult_scales_group_lrs_and_keeps_decay_rules():
    model = aimv2.create_pretraining_model("aimv2-tiny-patch8-64", vocab_size=20, depth=2, decoder_depth=1)
    mult = {"encoder": 0.1, "encoder.blocks.1": 0.5, "decoder.text_pos": 2.0}
    plain = {id(p): g["weight_decay"] for g in param_groups(model, 0.1) for p in g["params"]}
    apply_activation_checkpointing(model)  # wrapper names in parameter names do not change the matching
    from aimv2.config import OptimConfig

    opt = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.1, lr_mult=mult))
    set_lr(opt, 4e-4)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    assert len(lr_of) == len(plain)
    for name, p in model.named_parameters():
        name = name.replace("_checkpoint_wrapped_module.", "")
        want = 2.0 if name == "decoder.text_pos" else 0.5 if name.startswith("encoder.blocks.1.") else 1.0
        want = 0.1 if want == 1.0 and name.startswith("encoder.") else want
        assert lr_of[id(p)][0] == pytest.approx(4e-4 * want), name
        assert lr_of[id(p)][1] == plain[id(p)], name  # which parameters decay, and their wd, unchanged
    with pytest.raises(ValueError, match=r"no parameter name starts with \['encodr'\]"):
        param_groups(model, 0.1, {"encodr": 0.1})
    with pytest.raises(ConfigError, match="lr_mult values"):
        load_config(TINY, ["optim.lr_mult={encoder: -1}"])


# ------------------------------------------------------------------------------------ presets and commands
@pytest.mark.parametrize(("preset", "grid"), [("highres-336", (24, 24)), ("highres-448", (32, 32))])
def test_highres_presets(preset, grid):
    path = ROOT / f"configs/paper/{preset}.yaml"
    with pytest.raises(ConfigError, match="model.init_from, data.shards, data.tokenizer"):
        load_config(path)
    cfg = load_config(path, ["model.init_from=x.safetensors", "data.shards=a.tar", "data.tokenizer=t.model"])
    from aimv2.models.registry import model_config

    assert model_config(cfg.model.encoder, **cfg.model.encoder_overrides).grid_size == grid
    assert cfg.optim.weight_decay == 0 and cfg.data.caption == "txt" and cfg.model.encoder.startswith("aimv2-large")


def test_continue_tiny_preset_goes_up_in_resolution():
    cfg = load_config(ROOT / "configs/continue-tiny.yaml")
    src = load_config(TINY)
    from aimv2.models.registry import model_config

    new = model_config(cfg.model.encoder, **cfg.model.encoder_overrides)
    old = model_config(src.model.encoder, **src.model.encoder_overrides)
    assert cfg.model.init_from == f"{src.out_dir}/encoder.safetensors"
    assert new.grid_size[0] > old.grid_size[0] and (new.embed_dim, new.depth) == (old.embed_dim, old.depth)
    assert cfg.train.freeze_encoder_steps > 0 and cfg.optim.lr_mult and cfg.optim.weight_decay == 0


def test_extract_at_a_higher_resolution_resizes_positions(tmp_path):
    """--resolution 48 on a 32 px checkpoint: features on a 6x6 grid, equal to a checkpoint loaded at 48."""
    from PIL import Image

    torch.manual_seed(0)
    enc = aimv2.create_model("aimv2-tiny-patch8-32", depth=1)
    aimv2.weights.save_encoder(enc, tmp_path / "e.safetensors")
    (tmp_path / "img").mkdir()
    Image.new("RGB", (48, 48), (200, 30, 40)).save(tmp_path / "img/a.png")
    out = tmp_path / "f.safetensors"
    args = [str(tmp_path / "e.safetensors"), str(tmp_path / "img"), str(out), "--workers", "0", "--no-progress"]
    assert main(["extract", *args, "--resolution", "48"]) == 0
    from safetensors.torch import load_file

    feats = load_file(out)["features"]
    assert feats.shape == (1, 36, 192)
    at48 = aimv2.create_model("aimv2-tiny-patch8-32", checkpoint=tmp_path / "e.safetensors", img_size=48, depth=1)
    from aimv2.data.transforms import eval_transform, normalize

    x = normalize(eval_transform(48)(Image.open(tmp_path / "img/a.png").convert("RGB"))[None], "imagenet", "cpu")
    with torch.no_grad():
        torch.testing.assert_close(feats, at48(x), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_frozen_warmup_under_fsdp_matches_single_process(source, tmp_path):
    """2-process FSDP2 (gloo): the encoder stays bit-identical through the warm-up and the run trains like one
    process (the encoder's gradients are reduce-scattered like all others, then dropped)."""
    import subprocess

    from safetensors.torch import load_file

    _, apple, _ = source
    common = [
        *TINY_RUN,
        f"model.init_from={apple}",
        *AT48,
        "train.steps=3",
        "train.freeze_encoder_steps=2",
        "train.checkpoint_every=1",
        "train.keep_last=5",
        "optim.lr_mult={encoder: 0.5}",
    ]
    env = subprocess_env()
    cmd = [*TORCHRUN_AIMV2, "pretrain", str(TINY), *common, f"out_dir={tmp_path / 'fsdp'}", "train.parallel=fsdp"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    train(_cfg(tmp_path / "single", *common[len(TINY_RUN) :]))
    for step in (1, 2):
        a, _ = _encoder_at(tmp_path / "fsdp", step)
        b, _ = _encoder_at(tmp_path / "single", step)
        assert all(torch.equal(a[k], v) for k, v in b.items()), step
    (a, _), (b, single) = _encoder_at(tmp_path / "fsdp", 3), _encoder_at(tmp_path / "single", 3)
    # The encoder's first AdamW step moves an entry by about lr * g / (|g| + eps), eps 1e-8: where its gradient is
    # rounding noise (|g| < 1e-7 against a median near 1e-4; about 0.1% of the entries), the two summation orders give
    # steps up to lr apart. exp_avg after that one step is 0.1 g.
    state = single["optimizer"]["state"]
    noise = {k: state[k]["exp_avg"].abs() < 1e-8 for k in b}
    assert 0 < sum(int(m.sum()) for m in noise.values()) < 0.01 * sum(m.numel() for m in noise.values())
    for k, v in b.items():
        torch.testing.assert_close(a[k][~noise[k]], v[~noise[k]], rtol=1e-4, atol=1e-5, msg=k)
    exported = load_file(tmp_path / "fsdp/encoder.safetensors")  # gathered from the shards: the step-3 weights
    exported = to_ours(exported, detect_layout(exported))
    assert exported.keys() == {k.removeprefix("encoder.") for k in a}
    assert all(torch.equal(exported[k.removeprefix("encoder.")], v) for k, v in a.items())
