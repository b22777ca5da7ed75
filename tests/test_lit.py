"""LiT: parity with transformers' Aimv2Model on Apple's layout, checkpoint round trips, the contrastive loss against
a naive reference, causality and EOS pooling, 2-process all-gather vs one process, zero-shot scoring, CLI help."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, subprocess_env
from safetensors.torch import load_file, save_file

from aimv2.models.encoder import EncoderConfig
from aimv2.models.text import TextConfig
from aimv2.objectives.lit import LiT, LiTConfig, contrastive_loss
from aimv2.weights import export_hf_lit, load_lit, read_lit, save_lit

ROOT = Path(__file__).resolve().parents[1]

ENC = EncoderConfig(embed_dim=64, depth=2, num_heads=4, mlp_hidden_dim=128, patch_size=8, img_size=32)
TXT = TextConfig(vocab_size=100, embed_dim=48, depth=2, num_heads=3, mlp_hidden_dim=96, context_length=16, eos_id=99)
CFG = LiTConfig(encoder=ENC, text=TXT, projection_dim=32)


def apple_lit_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under Apple's LiT key names and shapes (written out here, not derived from our maps)."""
    g = torch.Generator().manual_seed(seed)
    De, Dt, P, p = ENC.embed_dim, TXT.embed_dim, 32, ENC.patch_size
    N = (ENC.image_hw[0] // p) ** 2
    shapes = {
        "image_encoder.preprocessor.patchifier.proj.weight": (De, 3, p, p),
        "image_encoder.preprocessor.patchifier.proj.bias": (De,),
        "image_encoder.preprocessor.patchifier.norm.weight": (De,),
        "image_encoder.preprocessor.pos_embed": (1, N, De),
        "image_encoder.trunk.post_trunk_norm.weight": (De,),
        "image_encoder.head.cls_token": (1, 1, De),
        "image_encoder.head.k.weight": (De, De),
        "image_encoder.head.v.weight": (De, De),
        "image_encoder.head.linear.weight": (De, De),
        "image_encoder.head.linear.bias": (De,),
        "text_encoder.preprocessor.text_embedding.weight": (TXT.vocab_size, Dt),
        "text_encoder.preprocessor.positional_embedding": (TXT.context_length, Dt),
        "text_encoder.trunk.post_trunk_norm.weight": (Dt,),
        "image_projector.weight": (P, De),
        "text_projector.weight": (P, Dt),
    }
    for tower, D, H, depth in (
        ("image_encoder", De, ENC.mlp_hidden_dim, 2),
        ("text_encoder", Dt, TXT.mlp_hidden_dim, 2),
    ):
        for i in range(depth):
            b = f"{tower}.trunk.blocks.{i}."
            shapes |= {
                b + "norm_1.weight": (D,),
                b + "norm_2.weight": (D,),
                b + "attn.qkv.weight": (3 * D, D),
                b + "attn.proj.weight": (D, D),
                b + "mlp.fc1.weight": (H, D),
                b + "mlp.fc3.weight": (H, D),
                b + "mlp.fc2.weight": (D, H),
            }
    sd = {}
    for k, s in shapes.items():
        t = torch.randn(s, generator=g)
        sd[k] = 1 + 0.1 * t if k.endswith("norm.weight") or "norm_" in k else t * (s[-1] ** -0.5 if len(s) > 1 else 0.1)
    sd["log_logit_scale"] = torch.tensor(5.0)  # above ln(100): exercises the clamp on both sides
    return sd


def apple_to_transformers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apple LiT names -> transformers Aimv2Model names, as an independent table for the test."""
    rules = [
        ("image_encoder.preprocessor.patchifier.proj.", "vision_model.embeddings.patch_embed."),
        ("image_encoder.preprocessor.patchifier.norm.", "vision_model.embeddings.rms_norm."),
        ("image_encoder.preprocessor.pos_embed", "vision_model.embeddings.position_embedding.weight"),
        ("image_encoder.trunk.post_trunk_norm.", "vision_model.rms_norm."),
        ("image_encoder.trunk.blocks.", "vision_model.encoder.layers."),
        ("image_encoder.head.k.", "vision_model.head.k_proj."),
        ("image_encoder.head.v.", "vision_model.head.v_proj."),
        ("image_encoder.head.linear.", "vision_model.head.output_proj."),
        ("image_encoder.head.cls_token", "vision_model.head.cls_token"),
        ("text_encoder.preprocessor.text_embedding.", "text_model.embeddings.token_embedding."),
        ("text_encoder.preprocessor.positional_embedding", "text_model.embeddings.position_embedding.weight"),
        ("text_encoder.trunk.post_trunk_norm.", "text_model.rms_norm."),
        ("text_encoder.trunk.blocks.", "text_model.encoder.layers."),
        ("image_projector.", "visual_projection."),
        ("text_projector.", "text_projection."),
        ("log_logit_scale", "logit_scale"),
    ]
    inner = [
        ("norm_1.", "rms_norm1."),
        ("norm_2.", "rms_norm2."),
        ("attn.proj.", "attention.out_proj."),
        ("mlp.fc1.", "ffn.gate_proj."),
        ("mlp.fc3.", "ffn.up_proj."),
        ("mlp.fc2.", "ffn.down_proj."),
    ]
    out = {}
    for k, v in sd.items():
        for a, b in rules:
            if k.startswith(a):
                k = b + k[len(a) :]
                break
        for a, b in inner:
            k = k.replace(a, b)
        if k.endswith("position_embedding.weight") and v.ndim == 3:
            v = v[0]
        if "attn.qkv." in k:
            for name, part in zip("qkv", v.chunk(3, dim=0), strict=True):
                out[k.replace("attn.qkv.", f"attention.{name}_proj.")] = part
        else:
            out[k] = v
    return out


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    ids = torch.randint(1, 99, (4, 16), generator=g)
    for row, n in enumerate((3, 7, 15, 10)):  # EOS at different places, padding (0) after it, a second EOS in one
        ids[row, n] = 99
        ids[row, n + 1 :] = 0
    ids[1, 12] = 99
    return pixels, ids


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_parity_with_transformers_on_apple_layout(tmp_path):
    transformers = pytest.importorskip("transformers")
    sd = apple_lit_state_dict()
    path = tmp_path / "apple-lit.safetensors"
    save_file(sd, path)
    ours = load_lit(path, config=CFG).eval()  # strict
    theirs_cfg = transformers.Aimv2Config(
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            use_head=True,
        ),
        text_config=dict(
            vocab_size=100,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=3,
            max_position_embeddings=16,
            eos_token_id=99,
        ),
        projection_dim=32,
    )
    # eager attention: with SDPA and an all-ones mask transformers skips the causal mask of its text model
    theirs = transformers.Aimv2Model._from_config(theirs_cfg, attn_implementation="eager").eval()
    missing, unexpected = theirs.load_state_dict(apple_to_transformers(sd), strict=True)
    assert not missing and not unexpected
    pixels, ids = _inputs()
    with torch.no_grad():
        out = ours(pixels[:3], ids[:3])
        ref = theirs(input_ids=ids[:3], pixel_values=pixels[:3], attention_mask=torch.ones_like(ids[:3]))
    assert _rel(out.image_embeds, ref.image_embeds) < 1e-4
    assert _rel(out.text_embeds, ref.text_embeds) < 1e-4
    assert _rel(out.logits_per_image, ref.logits_per_image) < 1e-4
    assert _rel(out.logits_per_text, ref.logits_per_text) < 1e-4
    assert out.logit_scale.item() == pytest.approx(100.0)  # clamped at ln(100)


def test_apple_and_transformers_layouts_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    sd = apple_lit_state_dict()
    save_file(sd, tmp_path / "apple.safetensors")
    assert read_lit(tmp_path / "apple.safetensors", CFG).layout == "apple"
    model = load_lit(tmp_path / "apple.safetensors", CFG)
    # ours -> apple file: identical tensors under identical names
    save_lit(model, tmp_path / "back.safetensors", layout="apple")
    back = load_file(tmp_path / "back.safetensors")
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    # ours -> transformers folder -> transformers loads it strictly, same outputs; and we read it back
    export_hf_lit(model, tmp_path / "hf")
    hf = transformers.Aimv2Model.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    pixels, ids = _inputs()
    with torch.no_grad():
        a = model.eval()(pixels[:2], ids[:2])
        b = hf(input_ids=ids[:2], pixel_values=pixels[:2], attention_mask=torch.ones_like(ids[:2]))
    assert _rel(a.logits_per_image, b.logits_per_image) < 1e-4
    # a transformers save_pretrained folder (its own writer) loads into ours with the same weights
    hf.save_pretrained(tmp_path / "hf2")
    again = load_lit(tmp_path / "hf2")
    assert again.cfg.text == model.cfg.text and again.cfg.projection_dim == 32
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    # ours: the config rides in the metadata
    save_lit(model, tmp_path / "ours.safetensors")
    ours = read_lit(tmp_path / "ours.safetensors")
    assert ours.layout == "aimv2" and ours.config == model.cfg


def test_strict_loading_names_the_problem(tmp_path):
    from aimv2.weights import CheckpointError

    sd = apple_lit_state_dict()
    del sd["image_encoder.head.linear.bias"]
    sd["text_encoder.extra"] = torch.zeros(1)
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(
        CheckpointError, match="(?s)missing keys.*head.linear.bias.*unexpected keys.*text_encoder.extra"
    ):
        load_lit(tmp_path / "bad.safetensors", CFG)


def test_contrastive_loss_matches_naive_loops():
    g = torch.Generator().manual_seed(0)
    B, P = 6, 8
    img = torch.nn.functional.normalize(torch.randn(B, P, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(B, P, generator=g), dim=-1)
    s = torch.tensor(7.0)
    naive_i, naive_t = 0.0, 0.0
    for i in range(B):
        sims_i = [float(s * (img[i] * txt[j]).sum()) for j in range(B)]
        sims_t = [float(s * (txt[i] * img[j]).sum()) for j in range(B)]
        lse_i = torch.logsumexp(torch.tensor(sims_i, dtype=torch.float64), 0).item()
        lse_t = torch.logsumexp(torch.tensor(sims_t, dtype=torch.float64), 0).item()
        naive_i += (lse_i - sims_i[i]) / B
        naive_t += (lse_t - sims_t[i]) / B
    naive = (naive_i + naive_t) / 2
    assert contrastive_loss(img, txt, s).item() == pytest.approx(naive, rel=1e-5)
    # sharded: each shard's rows against the whole batch, averaged, is the same loss
    shards = [contrastive_loss(img[a : a + 2], txt[a : a + 2], s, img, txt, offset=a) for a in (0, 2, 4)]
    assert (sum(shards) / 3).item() == pytest.approx(naive, rel=1e-5)


def test_text_tower_is_causal_and_pools_the_first_eos():
    torch.manual_seed(0)
    model = LiT(CFG).eval()
    _, ids = _inputs()
    with torch.no_grad():
        h = model.text.forward_tokens(ids)  # [B, T, D]
        t = 6
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 5) % 98 + 1
        h2 = model.text.forward_tokens(changed)
        assert torch.equal(h[:, :t], h2[:, :t])  # earlier positions do not see token t
        assert not torch.allclose(h[:, t:], h2[:, t:])
        # pooled at the first EOS (row 1 has EOS at 7 and 12); padding after it does not matter
        assert model.text.eos_index(ids).tolist() == [3, 7, 15, 10]
        pooled = model.text(ids)
        assert torch.equal(pooled, h[torch.arange(4), torch.tensor([3, 7, 15, 10])])
        padded = ids.clone()
        padded[0, 5:] = 42
        assert torch.allclose(model.text(padded)[0], pooled[0], atol=1e-6)
        # no EOS (cut at the context length): the last position
        assert model.text.eos_index(torch.ones(1, 16, dtype=torch.long)).tolist() == [15]


def test_frozen_encoder_gets_no_gradient_and_everything_else_does():
    torch.manual_seed(0)
    model = LiT(CFG).freeze_encoder()
    pixels, ids = _inputs()
    out = model(pixels[:3], ids[:3])
    contrastive_loss(out.image_embeds, out.text_embeds, out.logit_scale).backward()
    for name, p in model.named_parameters():
        if name.startswith("encoder."):
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_zeroshot_scores_are_cosine_argmax(tmp_path):
    """zero-shot against a reference built from the model's two towers by hand: solid-colour images (so the
    preprocessed pixels are known exactly), class prompts averaged then renormalized, cosine, top-1 and top-5 over
    six classes (so top-5 is not trivially 100%)."""
    from PIL import Image

    from aimv2.data.tokenizer import default_synthetic_tokenizer
    from aimv2.eval.zeroshot import zeroshot_classify

    tok = default_synthetic_tokenizer(context_length=16)
    torch.manual_seed(0)
    cfg = LiTConfig(
        encoder=ENC, text=TextConfig(**{**TXT.__dict__, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id})
    )
    model = LiT(cfg).eval()
    colours = {
        "blue": (40, 90, 225),
        "green": (45, 165, 65),
        "orange": (240, 150, 30),
        "pink": (235, 120, 180),
        "red": (220, 40, 40),
        "white": (245, 245, 245),
    }
    for c, rgb in colours.items():
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.new("RGB", (32, 32), rgb).save(tmp_path / c / f"{i}.png")
    templates = ["a {} circle", "a large {} square"]
    res = zeroshot_classify(model, tok, tmp_path, templates=templates, batch_size=4)
    classes = sorted(colours)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)  # ImageNet statistics, the default
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    with torch.no_grad():
        text = []
        for c in classes:
            t = model.encode_text(tok.encode([x.format(c) for x in templates]))  # [templates, P], unit norm
            text.append(torch.nn.functional.normalize(t.mean(0), dim=-1))
        text = torch.stack(text)  # [C, P]
        pixels = torch.stack(
            [((torch.tensor(colours[c]).float() / 255).view(3, 1, 1) - mean) / std for c in classes for _ in range(2)]
        ).expand(-1, 3, 32, 32)
        img = model.encode_image(pixels)  # [N, P]
    labels = torch.arange(len(classes)).repeat_interleave(2)
    scores = img @ text.t()
    torch.testing.assert_close(res["scores"], scores, rtol=1e-4, atol=1e-4)
    assert res["labels"].tolist() == labels.tolist()
    top1 = 100 * (scores.argmax(1) == labels).float().mean().item()
    top5 = 100 * sum(int(labels[n]) in scores[n].topk(5).indices.tolist() for n in range(len(labels))) / len(labels)
    assert res["top1"] == pytest.approx(top1) and res["top5"] == pytest.approx(top5)
    assert res["chance"] == pytest.approx(100 / 6)


def test_cli_help():
    for cmd in ("lit", "zeroshot"):
        r = subprocess.run(
            [sys.executable, "-m", "aimv2", cmd, "--help"],
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        assert cmd in r.stdout


def _lit_cmd(out: Path, encoder: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "aimv2",
        "lit",
        str(ROOT / "configs" / "lit-tiny.yaml"),
        f"out_dir={out}",
        f"lit.encoder={encoder}",
        "train.progress=false",
        "log.tensorboard=false",
        "data.num_workers=0",
        *overrides,
    ]


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> Path:
    """A random tiny encoder file (LiT trains against whatever encoder it is given)."""
    from aimv2 import create_model
    from aimv2.weights import save_encoder

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("enc") / "encoder.safetensors"
    save_encoder(create_model("aimv2-tiny-patch8-32", depth=2), path)
    return path


def test_lit_run_writes_outputs_resumes_and_zeroshot_runs(tmp_path, tiny_encoder):
    from aimv2.data.synthetic.probes import write_probe_splits

    out = tmp_path / "lit"
    steps = ["train.steps=4", "train.batch_size=8", "train.log_every=2", "train.checkpoint_every=2"]
    r = subprocess.run(
        _lit_cmd(out, tiny_encoder, *steps), env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ("config.yaml", "metrics.jsonl", "tokenizer.json", "lit.safetensors"):
        assert (out / f).is_file(), f
    rows = read_metrics(out)
    assert [x["step"] for x in rows] == [2, 4] and all("loss" in x and "lr" in x for x in rows)
    model = load_lit(out)
    enc = load_file(tiny_encoder)
    lit = load_file(out / "lit.safetensors")
    assert torch.equal(lit["encoder.blocks.0.attn.qkv.weight"], enc["trunk.blocks.0.attn.qkv.weight"])  # frozen
    # raising the steps resumes from the checkpoint
    steps[0] = "train.steps=6"
    r = subprocess.run(
        _lit_cmd(out, tiny_encoder, *steps), env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6]
    assert model.cfg.encoder.img_size == 32
    write_probe_splits(tmp_path / "probe", task="colour", n_train=0, n_val=18, size=32)
    r = subprocess.run(
        [sys.executable, "-m", "aimv2", "zeroshot", str(out), "--images", str(tmp_path / "probe" / "val")],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert 0.0 <= last["top1"] <= 100.0 and last["n"] == 18 and len(last["per_class"]) == 9


@pytest.mark.slow
def test_two_process_all_gather_matches_one_process(tmp_path, tiny_encoder):
    """2 gloo processes, each with half the batch and a gradient-carrying all-gather of the embeddings, give the
    loss and weights of one process on the whole batch."""
    steps = ["train.steps=3", "train.batch_size=8", "train.log_every=1", "train.checkpoint_every=3"]
    single, multi = tmp_path / "single", tmp_path / "multi"
    r = subprocess.run(
        _lit_cmd(single, tiny_encoder, *steps), env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533"]
    cmd = torchrun + ["-m", "aimv2"] + _lit_cmd(multi, tiny_encoder, *steps)[3:]
    r = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = read_metrics(single), read_metrics(multi)
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
    wa, wb = load_file(single / "lit.safetensors"), load_file(multi / "lit.safetensors")
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6), k


def test_lit_config_checks():
    from aimv2.config import ConfigError, LitConfig, load_config

    cfg = load_config(ROOT / "configs" / "lit-tiny.yaml", ["lit.encoder=runs/x", "lit.text.depth=2"], cls=LitConfig)
    assert cfg.lit.text == {"depth": 2} and cfg.data.source == "synthetic"
    with pytest.raises(ConfigError, match="lit.encoder is required"):
        load_config(ROOT / "configs" / "lit-tiny.yaml", [], cls=LitConfig)
    with pytest.raises(ConfigError, match="grad_accum=1"):
        load_config(ROOT / "configs" / "lit-tiny.yaml", ["lit.encoder=x", "train.grad_accum=2"], cls=LitConfig)
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(ROOT / "configs" / "lit-tiny.yaml", ["lit.encoder=x", "model.alpha=1"], cls=LitConfig)
