"""Our AIMv2 training step against Apple's own (apple/ml-l3m), side by side in one process.

What it measures: seconds per full optimizer step (forward, loss, backward, gradient clipping at 1.0, AdamW) of

- ``ours``: ``create_pretraining_model`` + ``build_optimizer``, as our trainer runs it;
- ``l3m``: the model and loss that l3m's ``configs/aimv2/001_aimv2_hfdata.yaml`` instantiates (its hydra config,
  with the sizes below written into its ``constants``), with ``torch.optim.AdamW`` on its parameters;

at the sizes of the comparison: 224 px, patch 14, encoder 384 x 12 (6 heads), decoder 384 x 4, vocabulary 32000,
77 text tokens, batch 8 (53.6M parameters in both: the architectures match to the class token). Per precision
(fp32; bf16 as autocast over fp32 weights) the steps alternate between the two, in an order that swaps every
round, so load from other jobs hits both alike; the ratio is the median over rounds of l3m's step time over ours
(paired) and of the medians. With ``--compile`` both are compiled as their AIMv2 recipes run them: l3m's config
sets ``torch_compile: true``, for which its runner wraps the whole model in ``torch.compile``; ours is compiled
as our trainer does on one process with ``train.compile: true`` (``apply_compile(whole=True)``). Also reported:
each one's achieved FLOP/s as a fraction of the best large-matmul FLOP/s measured in this run for that dtype (the
same FLOP count, ``aimv2.train.metrics.flops_per_sample``, for both, since the architectures are the same).

l3m is read from a local checkout (``--l3m-src``, e.g. ``git clone https://github.com/apple/ml-l3m``); none of
its code is part of this repository. It needs ``hydra-core`` and ``omegaconf`` importable (install them into a
separate environment, or a ``pip install --target`` folder on ``PYTHONPATH``); its engine imports ``wandb`` at
import time, which is replaced by an empty module when absent (nothing of it is called).

    PYTHONPATH=DEPS python benchmarks/l3m_compare.py --l3m-src ~/ml-l3m --out benchmarks/results/l3m_compare_cpu.json
    PYTHONPATH=DEPS python benchmarks/l3m_compare.py --l3m-src ~/ml-l3m --compile \
        --out benchmarks/results/l3m_compare_cpu_compiled.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch
from machine import machine_info
from train_speed import matmul_peak

from aimv2.config import OptimConfig
from aimv2.objectives import create_pretraining_model
from aimv2.train.metrics import flops_per_sample
from aimv2.train.optim import build_optimizer
from aimv2.train.parallelize import apply_compile

SIZES = dict(img=224, patch=14, width=384, enc_depth=12, heads=6, dec_depth=4, hidden=1024, vocab=32000, text=77)


def build_l3m(src: Path):
    """l3m's AIMv2 model and loss at SIZES, from its own config file: (model, loss)."""
    sys.path.insert(0, str(src / "src"))
    sys.modules.setdefault("wandb", types.ModuleType("wandb"))  # imported by l3m.engine, never used here
    try:
        from hydra.utils import instantiate
        from omegaconf import OmegaConf
    except ImportError as e:
        raise SystemExit(
            f"l3m needs hydra-core and omegaconf ({e}): pip install them where PYTHONPATH finds them"
        ) from e
    import l3m.helpers.omegaconf_resolvers  # noqa: F401  (registers the resolvers its configs use)

    cfg = OmegaConf.load(src / "configs/aimv2/001_aimv2_hfdata.yaml")
    c, s = cfg.constants, SIZES
    c.img_size, c.patch_size, c.num_patches = s["img"], s["patch"], (s["img"] // s["patch"]) ** 2
    c.vision_embed_dim = c.text_embed_dim = s["width"]
    c.vision_num_heads = c.text_num_heads = s["heads"]
    c.vision_num_blocks, c.text_num_blocks = s["enc_depth"], s["dec_depth"]
    c.text_vocab_size, c.context_length = s["vocab"], s["text"]
    c.prefix_range = [1, c.num_patches - 1]
    return instantiate(cfg.model.meta_model), instantiate(cfg.loss)


def build_ours():
    s = SIZES
    return create_pretraining_model(
        f"aimv2-small-patch{s['patch']}-{s['img']}",  # 384 wide, 12 blocks, 6 heads, SwiGLU 1024
        vocab_size=s["vocab"],
        decoder_max_text_len=s["text"],
        decoder_embed_dim=s["width"],
        decoder_depth=s["dec_depth"],
        decoder_num_heads=s["heads"],
        decoder_mlp_hidden_dim=s["hidden"],
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--l3m-src", type=Path, required=True, help="a checkout of github.com/apple/ml-l3m")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=8, help="timed rounds per precision (one step of each model)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--compile", action="store_true", help="compile both, as their recipes do (see above)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if not (args.l3m_src / "src/l3m").is_dir():
        raise SystemExit(f"--l3m-src {args.l3m_src}: no src/l3m inside; pass a checkout of apple/ml-l3m")
    device = torch.device("cpu")
    torch.manual_seed(0)
    l3m_model, l3m_loss = build_l3m(args.l3m_src)
    ours = build_ours()
    if args.compile:  # the warm-up rounds compile (at least one is needed, for the timed steps to be compiled)
        l3m_model = torch.compile(l3m_model)
        apply_compile(ours, whole=True)
    cfg = OptimConfig()
    opt_kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    B, s = args.batch_size, SIZES
    n = (s["img"] // s["patch"]) ** 2
    g = torch.Generator().manual_seed(1)
    images = torch.randn(B, 3, s["img"], s["img"], generator=g)
    text = torch.randint(3, s["vocab"], (B, s["text"]), generator=g)
    prefix = torch.randint(1, n, (B,), generator=g)
    not_prefix = torch.arange(n)[None] >= prefix[:, None]  # l3m's encoder_prefix_mask: True past the prefix

    def l3m_loss_of():
        data = {"image": images, "text": text, "encoder_prefix_mask": not_prefix}
        return l3m_loss(l3m_model(data), model=l3m_model)[0]

    models = {
        "ours": (ours, build_optimizer(ours, cfg), lambda: ours(images, text, prefix_len=prefix).loss),
        "l3m": (l3m_model, torch.optim.AdamW(l3m_model.parameters(), **opt_kw), l3m_loss_of),
    }
    params = {k: sum(p_.numel() for p_ in m.parameters()) for k, (m, _, _) in models.items()}
    flops = flops_per_sample(ours, n, s["text"])
    print(f"params: ours {params['ours'] / 1e6:.2f}M, l3m {params['l3m'] / 1e6:.2f}M; {flops / 1e9:.1f} GFLOP/sample")

    def step(name: str, precision: str) -> float:
        model, opt, loss_fn = models[name]
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    results: dict = {}
    for prec in args.precisions.split(","):
        for _ in range(args.warmup):
            step("ours", prec), step("l3m", prec)
        times: dict[str, list[float]] = {"ours": [], "l3m": []}
        for r in range(args.steps):
            for name in ("ours", "l3m") if r % 2 == 0 else ("l3m", "ours"):
                times[name].append(step(name, prec))
            print(f"  {prec} round {r + 1}/{args.steps}: ours {times['ours'][-1]:.2f}s  l3m {times['l3m'][-1]:.2f}s")
        peak = matmul_peak(device, torch.bfloat16 if prec == "bf16" else torch.float32)
        res = {"matmul_peak_tflops": peak / 1e12, "times": times}
        for name in ("ours", "l3m"):
            med = statistics.median(times[name])
            res[f"{name} step_s"] = med
            res[f"{name} fraction of matmul peak"] = B * flops / med / peak
        res["ours/l3m speed, paired"] = statistics.median(
            b / a for a, b in zip(times["ours"], times["l3m"], strict=True)
        )
        res["ours/l3m speed, medians"] = res["l3m step_s"] / res["ours step_s"]
        results[prec] = res
        print(
            f"{prec}: ours {res['ours step_s']:.3f}s, l3m {res['l3m step_s']:.3f}s per step; ours/l3m "
            f"{res['ours/l3m speed, paired']:.2f}x paired; of the matmul peak: ours "
            f"{100 * res['ours fraction of matmul peak']:.0f}%, l3m {100 * res['l3m fraction of matmul peak']:.0f}%"
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
            l3m_optimizer="torch.optim.AdamW, our lr / betas / eps / weight decay on every parameter",
            results=results,
            ratios={f"ours/l3m {k} step, paired": v["ours/l3m speed, paired"] for k, v in results.items()},
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(info, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
