"""Published weights by name through the Hugging Face cache, offline: a hub-style cache built in tmp
(``models--apple--NAME/snapshots/REV/`` + ``refs/main``, the layout huggingface_hub writes) holding a tiny
random checkpoint, read with ``HF_HUB_OFFLINE=1`` by ``create_model(..., pretrained=True)``, by ``load_lit`` and by
the command line; transformers reads the same cache as the peer reference."""

import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import subprocess_env
from huggingface_hub import constants as hub_constants
from PIL import Image

import aimv2
from aimv2.objectives.lit import LiT, LiTConfig
from aimv2.weights import CheckpointError, Release, export_hf, export_hf_lit, load_lit, released

NAME = "aimv2-tiny-patch8-32"  # 12 blocks of 192 at a 4x4 grid: the smallest named model a release can be
REPO = "apple/aimv2-tiny-test"
REV = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root, repo, write) -> None:
    """A cache of ``repo`` at commit REV on main, its files written by ``write(snapshot_folder)``."""
    store = root / ("models--" + repo.replace("/", "--"))
    write(store / "snapshots" / REV)
    (store / "refs").mkdir(parents=True)
    (store / "refs" / "main").write_text(REV)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An offline Hub cache in tmp with a tiny encoder release, and the original model for reference."""
    torch.manual_seed(0)
    model = aimv2.create_model(NAME).eval()
    hub_cache(tmp_path / "hub", REPO, lambda d: export_hf(model, d))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setitem(released.RELEASES, "aimv2-tiny-test", Release("aimv2-tiny-test", REPO, NAME))
    return tmp_path / "hub", model


def test_create_model_pretrained_reads_the_cache(offline_cache):
    _, model = offline_cache
    loaded = aimv2.create_model("aimv2-tiny-test", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)  # same bits through the cache
    assert loaded.name == NAME


def test_transformers_reads_the_same_cache(offline_cache):
    """The peer library resolves the same repository in the same cache to the same features (fp32, 1e-4)."""
    transformers = pytest.importorskip("transformers")
    cache, model = offline_cache
    hf = transformers.Aimv2VisionModel.from_pretrained(REPO, cache_dir=cache, local_files_only=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).last_hidden_state, model(x), rtol=1e-4, atol=1e-4)


def test_revision_pinning_and_unknown_revision(offline_cache):
    loaded = aimv2.create_model("aimv2-tiny-test", pretrained=True, revision=REV)
    assert loaded.name == NAME
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        aimv2.create_model("aimv2-tiny-test", pretrained=True, revision="f" * 40)


def test_offline_and_not_cached_is_one_clear_error(offline_cache):
    pin = released.RELEASES["aimv2-large-patch14-224"].revision
    with pytest.raises(CheckpointError, match=rf"apple/aimv2-large-patch14-224@{pin} is not in the Hugging Face "
                       rf"cache.*HF_HUB_OFFLINE is set: download it once online \(hf download "
                       rf"apple/aimv2-large-patch14-224 --revision {pin}\)"):  # fmt: skip
        aimv2.create_model("aimv2-large-patch14-224", pretrained=True)
    with pytest.raises(CheckpointError, match="no published AIMv2 checkpoint named 'aimv2-giant'"):
        aimv2.create_model("aimv2-giant", pretrained=True)


def test_release_table_matches_the_registry():
    """Every published name builds as the encoder its row says (config only, on the meta device) and is pinned to a
    full commit hash (the Hub resolves only those offline, from the cache's snapshot folder; no name follows main)."""
    with torch.device("meta"):
        for r in released.RELEASES.values():
            assert r.repo == "apple/" + r.name
            assert aimv2.create_model(r.model).name == r.model
            assert r.revision is not None and re.fullmatch("[0-9a-f]{40}", r.revision), r  # no name follows main
    assert set(released.PINNED) == set(released.RELEASES) and len(released.PINNED) == 16


def test_a_pinned_release_reads_its_commit_in_apples_layout(tmp_path, monkeypatch):
    """A release with a pin resolves to that commit, not to what main points at: a cache whose main is a
    transformers export of other weights, and whose pinned snapshot holds Apple's own files (``trunk.*`` keys
    without our metadata, Apple's config.json with model_type aimv2), serves the pinned weights, bit for bit."""
    from safetensors.torch import save_file

    from aimv2.weights import convert_state_dict

    torch.manual_seed(0)
    pinned, newer = aimv2.create_model(NAME).eval(), aimv2.create_model(NAME).eval()
    pin = "89abcdef" * 5
    store = tmp_path / "hub" / ("models--" + REPO.replace("/", "--"))
    export_hf(newer, store / "snapshots" / REV)
    (store / "refs").mkdir(parents=True)
    (store / "refs" / "main").write_text(REV)
    folder = store / "snapshots" / pin
    folder.mkdir(parents=True)
    save_file(convert_state_dict(pinned.state_dict(), "aimv2", "apple"), folder / "model.safetensors")
    cfg = pinned.cfg
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["AIMv2Model"], "model_type": "aimv2", "hidden_size": cfg.embed_dim,
        "image_size": cfg.img_size, "intermediate_size": cfg.mlp_hidden_dim, "num_attention_heads": cfg.num_heads,
        "num_channels": 3, "num_hidden_layers": cfg.depth, "patch_size": cfg.patch_size, "qkv_bias": False,
        "rms_norm_eps": 1e-5, "use_bias": False, "projection_dropout": 0.0, "attention_dropout": 0.0,
    }))  # fmt: skip
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setitem(released.RELEASES, "aimv2-tiny-test", Release("aimv2-tiny-test", REPO, NAME, revision=pin))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(aimv2.create_model("aimv2-tiny-test", pretrained=True)(x), pinned(x), rtol=0, atol=0)
        main = aimv2.create_model("aimv2-tiny-test", pretrained=True, revision="main")(x)
        torch.testing.assert_close(main, newer(x), rtol=0, atol=0)  # revision= still overrides the pin


def test_lit_by_hub_spec(tmp_path, monkeypatch):
    cfg = LiTConfig.from_dict(
        {
            "encoder": {"embed_dim": 64, "depth": 1, "num_heads": 2, "mlp_hidden_dim": 128, "patch_size": 8,
                        "img_size": 32},
            "text": {"vocab_size": 50, "embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_hidden_dim": 64,
                     "context_length": 8, "eos_id": 49},
            "projection_dim": 16,
        }
    )  # fmt: skip
    torch.manual_seed(0)
    model = LiT(cfg).eval()
    hub_cache(tmp_path, "apple/lit-test", lambda d: export_hf_lit(model, d))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    loaded = load_lit(f"hf:apple/lit-test@{REV}")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)


def test_cli_extract_from_the_hub_offline(offline_cache, tmp_path):
    """`aimv2 extract hf:REPO` in a child process with HF_HUB_CACHE / HF_HUB_OFFLINE=1 from the environment:
    the features of the original model; a repository not in the cache is one line on stderr, exit 2."""
    cache, model = offline_cache
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.fromarray(torch.randint(0, 255, (40, 48, 3), dtype=torch.uint8).numpy()).save(images / f"{i}.png")
    env = dict(subprocess_env(), HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    out = tmp_path / "f.safetensors"
    cmd = [sys.executable, "-m", "aimv2", "extract", f"hf:{REPO}", str(images), str(out), "--workers", "0"]
    r = subprocess.run(cmd + ["--no-progress", "--device", "cpu"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    from safetensors import safe_open

    from aimv2.data.transforms import MEAN_STD, eval_transform

    with safe_open(out, "pt") as f:
        got, paths = f.get_tensor("features"), json.loads(f.metadata()["paths"])
    t = eval_transform(32)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in MEAN_STD["imagenet"])
    x = torch.stack([(t(Image.open(images / p)).float() / 255 - mean) / std for p in paths])
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-4)

    cmd[4] = "hf:apple/not-cached"
    r = subprocess.run(cmd + ["--no-progress", "--overwrite"], env=env, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "HF_HUB_OFFLINE is set" in r.stderr, r.stderr


def test_only_the_checkpoint_files_are_fetched():
    """The download's allow-list, applied by huggingface_hub's own filter to the file list of Apple's repositories
    (as at the pinned commits) and of a sharded transformers folder: config, preprocessor config and weights; not
    the MLX copy of the weights, the Flax one, the remote code or the README."""
    from huggingface_hub.utils import filter_repo_objects

    apple = [".gitattributes", "README.md", "aimv2_overview_light.png", "config.json", "configuration_aimv2.py",
             "flax_model.msgpack", "mlx_model.safetensors", "model.safetensors", "modeling_aimv2.py",
             "modeling_flax_aimv2.py", "preprocessor_config.json"]  # fmt: skip
    fetched = sorted(filter_repo_objects(apple, allow_patterns=list(released.CHECKPOINT_FILES)))
    assert fetched == ["config.json", "model.safetensors", "preprocessor_config.json"]
    sharded = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
               "model.safetensors.index.json", "tokenizer.json", "optimizer.safetensors"]  # fmt: skip
    assert sorted(filter_repo_objects(sharded, allow_patterns=list(released.CHECKPOINT_FILES))) == sharded[:5]
