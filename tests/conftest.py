"""Helpers shared by the test files (``from conftest import ...``; pytest puts this folder on sys.path)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def caches_in_the_base_temp(tmp_path_factory):
    """The caches a run fills outside tmp_path (the arrow copies `datasets` makes of local files, our feature cache)
    point into pytest's base temp folder, which is removed after a passing run (pyproject.toml's
    tmp_path_retention_policy): a test run leaves nothing in the user's home or temp folder. Child processes
    inherit the environment."""
    root = tmp_path_factory.mktemp("caches")
    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_CACHE", "AIMV2_CACHE")}
    os.environ["HF_DATASETS_CACHE"] = str(root / "hf-datasets")
    os.environ["AIMV2_CACHE"] = str(root / "aimv2")
    if "datasets.config" in sys.modules:  # imported at collection: it read its cache folder then
        sys.modules["datasets.config"].HF_DATASETS_CACHE = Path(os.environ["HF_DATASETS_CACHE"])
    yield root
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# `python -m aimv2` under torchrun on 2 local processes (gloo on CPU): append the subcommand and its arguments
TORCHRUN_AIMV2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "aimv2"]

# a run that stays quiet and in one process: no progress bar, no TensorBoard, data read in the main process
QUIET = ["train.progress=false", "log.tensorboard=false", "data.num_workers=0"]

# the tiny model at 32 px (4 x 4 patches of 8) with a one-block decoder: a training step in well under a second
TINY_RUN = [
    "model.encoder=aimv2-tiny-patch8-64",
    "model.encoder_overrides={depth: 2, img_size: 32}",
    "model.decoder={embed_dim: 64, depth: 1, num_heads: 2, mlp_hidden_dim: 128}",
    "data.context_length=24",
    "train.batch_size=8",
    "train.log_every=1",
    "optim.warmup_steps=2",
    *QUIET,
]


# configs/native-tiny.yaml at 4 to 16 patches and 128 tokens a step, 6 steps with a checkpoint at 3
NATIVE_RUN = [
    "model.encoder_overrides={depth: 2}",
    "model.decoder={embed_dim: 64, depth: 1, num_heads: 2, mlp_hidden_dim: 128}",
    "data.context_length=24",
    "data.num_workers=0",
    "data.native.min_patches=4",
    "data.native.max_patches=16",
    "data.native.tokens_per_batch=128",
    "data.native.batch_multiple=4",
    "train.steps=6",
    "train.checkpoint_every=3",
    "train.log_every=1",
    "train.progress=false",
    "log.tensorboard=false",
    "optim.warmup_steps=2",
]


def native_pretraining_model(**overrides):
    """A two-block native (sin-cos) pretraining model with a small decoder, seeded, in eval mode."""
    import aimv2

    torch.manual_seed(0)
    return aimv2.create_pretraining_model(
        "aimv2-tiny-patch8-native",
        vocab_size=50,
        depth=2,
        decoder_depth=2,
        decoder_embed_dim=64,
        decoder_num_heads=2,
        decoder_mlp_hidden_dim=128,
        **overrides,
    ).eval()


def native_stream(sched, native_fn, rank: int, world: int, *, start_step: int = 0, steps: int = 6):
    """The native-resolution batch stream of ``sched`` for one of ``world`` ranks, global batch 8, patch 8, over
    ``native_fn(index, global_index, hw) -> (uint8 image, caption)``, every caption encoded as four ones."""
    from aimv2.train.data import StepBatches

    return StepBatches(
        None,
        length=None,
        native_fn=native_fn,
        global_batch=8,
        rank=rank,
        world_size=world,
        start_step=start_step,
        steps=steps,
        encode_text=lambda caps: torch.ones(len(caps), 4, dtype=torch.long),
        seed=0,
        patch_size=8,
        native=sched,
    )


def read_metrics(out_dir) -> list[dict]:
    """A run folder's metrics.jsonl: one record per logged step."""
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def subprocess_env() -> dict:
    """The environment for `python -m aimv2 ...` in a child process: this checkout's sources, one thread."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))


def kill9_after_checkpoint(cmd: list[str], out_dir, step: int, timeout: float = 200) -> None:
    """Start ``cmd`` (a training run writing ``out_dir``), SIGKILL it as soon as its checkpoint of ``step`` or later
    exists (mid-run: no chance to save or clean up), and wait for it to die."""
    ckpts = Path(out_dir) / "checkpoints"
    p = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None:
        done = sorted(ckpts.glob("step_*.pt")) if ckpts.exists() else []
        if done and int(done[-1].stem.split("_")[1]) >= step:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()


def training_flops(model, *inputs) -> float:
    """FLOPs of one forward + backward of ``model(*inputs).loss``, counted by torch's FlopCounterMode with the
    two-matmul attention (whose products the counter sees; SDPA's it does not count on the CPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    from aimv2.models.attention import set_attention_backend

    set_attention_backend("matmul")
    try:
        with FlopCounterMode(display=False) as counter:
            model(*inputs).loss.backward()
    finally:
        set_attention_backend("auto")
    return counter.get_total_flops()


def photos_and_encoder(root: Path, n: int, **overrides):
    """root/photos: the first ``n`` CC12M photos as JPEG files; root/enc.safetensors: a seeded tiny encoder (64 px,
    ``overrides`` e.g. depth=2). Returns (photos folder, encoder path); skips the test without the shard."""
    from test_preprocessing import SHARD, cc12m_images

    from aimv2 import create_model
    from aimv2.weights import save_encoder

    if not SHARD.is_file():
        pytest.skip("needs the CC12M shard")
    (root / "photos").mkdir()
    for i, img in enumerate(cc12m_images(n)):
        img.save(root / "photos" / f"{i}.jpg", quality=95)
    torch.manual_seed(0)
    return root / "photos", save_encoder(create_model("aimv2-tiny-patch8-64", **overrides), root / "enc.safetensors")


def tiny_lit_run(root: Path, depth: int):
    """A random tiny LiT model (64-wide encoder, 48-wide text tower, ``depth`` blocks each, 32 px) saved with its
    tokenizer as root/lit (what `aimv2 zeroshot` reads), and root/images: class folders blue, red, white of two
    odd-sized images each. Returns (model, tokenizer)."""
    from PIL import Image

    from aimv2.data.tokenizer import default_synthetic_tokenizer
    from aimv2.models.encoder import EncoderConfig
    from aimv2.models.text import TextConfig
    from aimv2.objectives.lit import LiT, LiTConfig
    from aimv2.weights import save_lit

    tok = default_synthetic_tokenizer(context_length=16)
    torch.manual_seed(0)
    enc = EncoderConfig(embed_dim=64, depth=depth, num_heads=4, mlp_hidden_dim=128, patch_size=8, img_size=32)
    text = TextConfig(vocab_size=tok.vocab_size, embed_dim=48, depth=depth, num_heads=3, mlp_hidden_dim=96,
                      context_length=16, eos_id=tok.eos_id)  # fmt: skip
    model = LiT(LiTConfig(encoder=enc, text=text, projection_dim=32)).eval()
    for c, rgb in {"blue": (40, 90, 225), "red": (220, 40, 40), "white": (245, 245, 245)}.items():
        (root / "images" / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 36 + i), tuple(v - 10 * i for v in rgb)).save(root / "images" / c / f"{i}.png")
    save_lit(model, root / "lit" / "lit.safetensors")
    tok.save(root / "lit" / "tokenizer.json")
    return model, tok


def perturb_from(images: torch.Tensor, first_patch: int, patch: int) -> torch.Tensor:
    """A copy of ``images`` [B, 3, H, W] with noise on every patch of raster index >= first_patch."""
    x = images.clone()
    gw = x.shape[-1] // patch
    n = (x.shape[-2] // patch) * gw
    for k in range(first_patch, n):
        r, c = divmod(k, gw)
        x[..., r * patch : (r + 1) * patch, c * patch : (c + 1) * patch] += 2 * torch.randn(x.shape[0], 3, patch, patch)
    return x
