"""Our AIMv2 training step against Apple's own (apple/ml-l3m), side by side: one process each, taking turns.

What it measures: seconds per full optimizer step (forward, loss, backward, gradient clipping at 1.0, AdamW) of

- ``ours``: ``create_pretraining_model`` + ``build_optimizer``, clipped by ``clip_gradients``, as our trainer runs
  it;
- ``l3m``: the model, loss and optimizer that l3m's ``configs/aimv2/001_aimv2_hfdata.yaml`` instantiates (its
  hydra config, with the sizes below written into its ``constants``; the optimizer is its ``AdamLH``, or with
  ``--l3m-optimizer torch-adamw`` ``torch.optim.AdamW`` on every parameter), clipped as its loss scaler does
  (``clip_grad_norm_(..., foreach=True)``);

at the sizes of the comparison: 224 px, patch 14, encoder 384 x 12 (6 heads), decoder 384 x 4, vocabulary 32000,
77 text tokens, batch 8 (53.6M parameters in both: the architectures match to the class token).

Each runs in its own process, with its own process set-up, and the two take turns: the parent asks one for a step
while the other waits, in an order that swaps every round, so load from other jobs and the machine's drift hit
both alike (this machine's speed drifts by up to 30% over minutes, so only steps paired in time compare). The ratio
is the median over rounds of l3m's step time over ours (paired) and of the medians. Per precision: fp32, and bf16
as autocast over fp32 weights.

- ``--compile``: both compiled as their AIMv2 recipes run them: l3m's config sets ``torch_compile: true``, for
  which its runner wraps the whole model in ``torch.compile``; ours as our trainer does with ``train.compile:
  true`` on one process (``apply_compile(whole=True)``).
- ``--host-memory``: our trainer keeps freed host memory on the CPU (``aimv2.train.host_memory``: glibc's mmap and
  trim thresholds raised, so a step does not fault in its large tensors afresh); l3m's runner does not. ``as-run``
  (the default) times each with its own set-up; ``both-kept`` and ``both-default`` give both the same, so that
  only the two codes differ. The minor page faults per step are reported for each.

Also reported: each one's achieved FLOP/s as a fraction of the best large-matmul FLOP/s measured in this run for
that dtype (the same FLOP count, ``aimv2.train.metrics.flops_per_sample``, for both: the architectures match).

l3m is read from a local checkout (``--l3m-src``, e.g. ``git clone https://github.com/apple/ml-l3m``); none of
its code is part of this repository. It needs ``hydra-core`` and ``omegaconf`` importable, and what l3m's modules
import at import time (``ftfy``, ``regex``, ``fvcore``; install them into a separate environment, or a ``pip
install --target`` folder on ``PYTHONPATH``); its engine imports ``wandb`` at import time, which is replaced by an
empty module when absent (nothing of it is called).

    PYTHONPATH=DEPS python benchmarks/l3m_compare.py --l3m-src ~/ml-l3m --out benchmarks/results/l3m_compare_cpu.json
    PYTHONPATH=DEPS python benchmarks/l3m_compare.py --l3m-src ~/ml-l3m --compile \
        --out benchmarks/results/l3m_compare_cpu_compiled.json
    PYTHONPATH=DEPS python benchmarks/l3m_compare.py --l3m-src ~/ml-l3m --compile --host-memory both-kept
"""

from __future__ import annotations

import argparse
import importlib.machinery
import statistics
import sys
import time
import types
from pathlib import Path

import torch
from machine import PRECISIONS_HELP, machine_info, resolve_precisions, write_record
from train_speed import matmul_peak
from turns import Turns, paired_speedup

from aimv2.config import OptimConfig
from aimv2.objectives import create_pretraining_model
from aimv2.train.grad_clip import clip_gradients
from aimv2.train.host_memory import keep_freed_host_memory
from aimv2.train.metrics import flops_per_sample
from aimv2.train.optim import build_optimizer
from aimv2.train.parallelize import apply_compile

SIZES = dict(img=224, patch=14, width=384, enc_depth=12, heads=6, dec_depth=4, hidden=1024, vocab=32000, text=77)


def build_l3m(src: Path, optimizer: str = "config", sizes: dict | None = None):
    """l3m's AIMv2 model, loss and optimizer at ``sizes`` (default SIZES), from its own config file: (model, loss,
    optimizer).

    optimizer: ``config`` builds what the config asks for, as l3m's runner does (``create_optimizer`` with its
    ``optim`` section merged over ``configs/defaults.yaml``: ``AdamLH``, its AdamW with fully decoupled weight
    decay, a loop over the parameters, with the config's weight-decay exclusions); ``torch-adamw`` is
    ``torch.optim.AdamW`` on every parameter with our lr / betas / eps / weight decay."""
    sys.path.insert(0, str(src / "src"))
    if "wandb" not in sys.modules:  # imported by l3m.engine, never used here: an empty module with a spec (so that
        stub = types.ModuleType("wandb")  # importlib.util.find_spec, which accelerate calls, accepts it)
        stub.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        sys.modules["wandb"] = stub
    try:
        from hydra.utils import instantiate
        from omegaconf import OmegaConf
    except ImportError as e:
        raise SystemExit(
            f"l3m needs hydra-core and omegaconf ({e}): pip install them where PYTHONPATH finds them"
        ) from e
    import l3m.helpers.omegaconf_resolvers  # noqa: F401  (registers the resolvers its configs use)

    cfg = OmegaConf.load(src / "configs/aimv2/001_aimv2_hfdata.yaml")
    c, s = cfg.constants, sizes or SIZES
    c.img_size, c.patch_size, c.num_patches = s["img"], s["patch"], (s["img"] // s["patch"]) ** 2
    c.vision_embed_dim = c.text_embed_dim = s["width"]
    c.vision_num_heads = c.text_num_heads = s["heads"]
    c.vision_num_blocks, c.text_num_blocks = s["enc_depth"], s["dec_depth"]
    c.text_vocab_size, c.context_length = s["vocab"], s["text"]
    c.prefix_range = [1, c.num_patches - 1]
    # The config never passes the image size to its pixel loss (RasterPixelLoss defaults to 224), so its own loss
    # patchifies only 224 px images right: set it to the size built (nothing changes at 224).
    cfg.loss.criteria[0].image_size = s["img"]
    model = instantiate(cfg.model.meta_model)
    if optimizer == "config":
        from l3m.optim.optimizer import create_optimizer

        opt, _ = create_optimizer(
            model, OmegaConf.merge(OmegaConf.load(src / "configs/defaults.yaml").optim, cfg.optim)
        )
    else:
        o = OptimConfig()
        opt = torch.optim.AdamW(
            model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
        )
    return model, instantiate(cfg.loss), opt


def build_ours(sizes: dict | None = None):
    s = sizes or SIZES
    return create_pretraining_model(
        f"aimv2-small-patch{s['patch']}-{s['img']}",  # 384 wide, 12 blocks, 6 heads, SwiGLU 1024
        vocab_size=s["vocab"],
        decoder_max_text_len=s["text"],
        decoder_embed_dim=s["width"],
        decoder_depth=s["dec_depth"],
        decoder_num_heads=s["heads"],
        decoder_mlp_hidden_dim=s["hidden"],
        embed_dim=s["width"],
        depth=s["enc_depth"],
        num_heads=s["heads"],
        mlp_hidden_dim=s["hidden"],
    )


def contestant(
    name: str, l3m_src: Path | None, l3m_optimizer: str | None, compile_: bool, keep_memory: bool, batch: int, conn
) -> None:
    """One contestant (``ours`` or ``l3m``) in its own process (benchmarks/turns.py): build it, then run one timed
    step per precision received.

    Its own process, so that it runs with its own process set-up: ``keep_memory`` is what our trainer does on the
    CPU (``keep_freed_host_memory``); l3m's runner leaves glibc's malloc as it is."""
    import resource

    memory = "glibc defaults"
    if keep_memory:
        memory = keep_freed_host_memory() or "kept (keep_freed_host_memory)"
    torch.manual_seed(0)
    if name == "l3m":
        model, l3m_loss, opt = build_l3m(l3m_src, l3m_optimizer)
    else:
        model = build_ours()
        model.predictions_keep_grad = False  # as our trainer sets it: only the loss terms are read
        opt = build_optimizer(model, OptimConfig())
    if compile_:  # the warm-up rounds compile (at least one is needed, for the timed steps to be compiled)
        if name == "l3m":
            model = torch.compile(model)
        else:
            apply_compile(model, whole=True)
    images, text, prefix = inputs(batch)
    n = (SIZES["img"] // SIZES["patch"]) ** 2
    not_prefix = torch.arange(n)[None] >= prefix[:, None]  # l3m's encoder_prefix_mask: True past the prefix

    def loss_of() -> torch.Tensor:
        if name == "l3m":
            data = {"image": images, "text": text, "encoder_prefix_mask": not_prefix}
            return l3m_loss(model(data), model=model)[0]
        return model(images, text, prefix_len=prefix).loss

    setup = {"params": sum(p_.numel() for p_ in model.parameters()), "host memory": memory}
    if name == "ours":  # the FLOP count of both (the architectures match)
        setup["flops per sample"] = flops_per_sample(model, n, SIZES["text"])
    conn.send(setup)
    while (msg := conn.recv()) is not None:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=msg == "bf16"):
            loss = loss_of()
        loss.backward()
        if name == "l3m":  # as l3m's loss scaler clips (l3m/optim/scaler.py)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, norm_type=2.0, foreach=True)
        else:  # as our trainer clips (train/grad_clip.py)
            clip_gradients(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        conn.send((seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults))


def inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one batch both step on: images [B, 3, 224, 224], full-length captions [B, 77], prefix lengths [B]."""
    s = SIZES
    n = (s["img"] // s["patch"]) ** 2
    g = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, s["img"], s["img"], generator=g)
    text = torch.randint(3, s["vocab"], (batch, s["text"]), generator=g)
    return images, text, torch.randint(1, n, (batch,), generator=g)


HOST_MEMORY = {  # --host-memory: which contestant keeps freed host memory (see contestant)
    "as-run": {"ours": True, "l3m": False},
    "both-kept": {"ours": True, "l3m": True},
    "both-default": {"ours": False, "l3m": False},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--l3m-src", type=Path, required=True, help="a checkout of github.com/apple/ml-l3m")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=8, help="timed rounds per precision (one step of each model)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each (compilation, the heap's growth)")
    p.add_argument("--precisions", help=PRECISIONS_HELP)
    p.add_argument("--compile", action="store_true", help="compile both, as their recipes do (see above)")
    p.add_argument(
        "--host-memory",
        choices=tuple(HOST_MEMORY),
        default="as-run",
        help="as-run: ours keeps freed host memory as our trainer does, l3m as its runner leaves it (default); "
        "both-kept / both-default: the same for both, so that only the two codes differ",
    )
    p.add_argument(
        "--l3m-optimizer",
        choices=("config", "torch-adamw"),
        default="config",
        help="config: the optimizer l3m's AIMv2 config builds (AdamLH, a loop over the parameters; default); "
        "torch-adamw: torch.optim.AdamW with our hyperparameters",
    )
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if not (args.l3m_src / "src/l3m").is_dir():
        raise SystemExit(f"--l3m-src {args.l3m_src}: no src/l3m inside; pass a checkout of apple/ml-l3m")
    keep = HOST_MEMORY[args.host_memory]
    precisions = resolve_precisions(args.precisions, "cpu")
    contestants = {
        name: (contestant, (name, args.l3m_src, args.l3m_optimizer, args.compile, keep[name], args.batch_size))
        for name in keep
    }
    B = args.batch_size
    results: dict = {}
    with Turns(contestants) as turns:
        setup = turns.setup
        flops = setup["ours"]["flops per sample"]
        params = {k: v["params"] for k, v in setup.items()}
        print(
            f"params: ours {params['ours'] / 1e6:.2f}M, l3m {params['l3m'] / 1e6:.2f}M; {flops / 1e9:.1f} GFLOP/sample"
        )
        print("host memory: " + ", ".join(f"{k} {v['host memory']}" for k, v in setup.items()))
        for prec in precisions:
            times, faults = turns.rounds(prec, args.steps, args.warmup)
            peak = matmul_peak(torch.device("cpu"), torch.bfloat16 if prec == "bf16" else torch.float32)
            res = {"matmul_peak_tflops": peak / 1e12, "times": times}
            for name in ("ours", "l3m"):
                med = statistics.median(times[name])
                res[f"{name} step_s"] = med
                res[f"{name} fraction of matmul peak"] = B * flops / med / peak
                res[f"{name} minor page faults per step"] = statistics.median(faults[name])
            res["ours/l3m speed, paired"] = paired_speedup(times["l3m"], times["ours"])
            res["ours/l3m speed, medians"] = res["l3m step_s"] / res["ours step_s"]
            results[prec] = res
            print(
                f"{prec}: ours {res['ours step_s']:.3f}s, l3m {res['l3m step_s']:.3f}s per step; ours/l3m "
                f"{res['ours/l3m speed, paired']:.2f}x paired; of the matmul peak: ours "
                f"{100 * res['ours fraction of matmul peak']:.0f}%, l3m "
                f"{100 * res['l3m fraction of matmul peak']:.0f}%; page faults per step: ours "
                f"{res['ours minor page faults per step']:.0f}, l3m {res['l3m minor page faults per step']:.0f}"
            )
    if args.out:
        shown_args = ["PATH" if a == str(args.l3m_src) else a for a in sys.argv[1:]]  # no local paths in results
        info = dict(
            machine_info(("torch",)),
            threads=torch.get_num_threads(),
            command="python benchmarks/l3m_compare.py " + " ".join(shown_args),
            sizes=dict(SIZES, batch=B),
            params=params,
            gflops_per_sample=flops / 1e9,
            compiled=args.compile,
            host_memory={k: v["host memory"] for k, v in setup.items()},
            l3m_optimizer={
                "config": "its config's (l3m.optim.adamw_lh.AdamLH through l3m.optim.optimizer.create_optimizer)",
                "torch-adamw": "torch.optim.AdamW, our lr / betas / eps / weight decay on every parameter",
            }[args.l3m_optimizer],
            results=results,
            ratios={f"ours/l3m {k} step, paired": v["ours/l3m speed, paired"] for k, v in results.items()},
        )
        write_record(args.out, info)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
