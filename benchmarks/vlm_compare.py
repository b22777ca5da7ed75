"""The paper's VLM comparison at laptop scale: the same tiny LM and LLaVA recipe on three vision encoders.

Why: the paper's strongest claim is multimodal (AIMv2 + a 2-layer MLP + an LLM beats CLIP and SigLIP as the vision
encoder of a VLM). This checks what the harness shows at a scale that runs on a laptop CPU: encoders pretrained on
the built-in scenes with (a) the AIMv2 objective, (b) the CLIP baseline at equal compute (same encoder, data,
steps, batch and optimizer), and (c) a random init, each frozen inside the same VLM: stage 1 (projector on
captions), then stage 2 (projector + LM on question conversations). Scored on held-out scenes (never trained on)
with VQAv2's accuracy per question type, mean +- std over the seeds (the VLM's seed: init of the projector, data
order; the encoders are pretrained once). ``--tiles`` adds the AIMv2 encoder with a 2 x 2 grid of tiles (+ global
view) over images twice the encoder's resolution: each object covers four times the patches it does at 1 x 1, where
the smallest objects (radius 0.075 of the side: 2.4 px at 32 px) sit inside one 8-px patch.

    OMP_NUM_THREADS=1 python benchmarks/vlm_compare.py [--tiles] [--seeds 3] [--pre-steps N] [--s1 N] [--s2 N]
        [--batch N] [--jobs 2] [--out benchmarks/results/vlm_compare_cpu.json]

Independent runs (the two pretrainings, then every encoder x seed) go ``--jobs`` at a time, each its own process
with OMP_NUM_THREADS threads. Runs go to --work (default runs/vlm-compare); an existing finished run is reused
(each stage resumes), so the wall time recorded is that of a fresh --work only.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from aimv2.config import load_config
from aimv2.config.vlm import VLMConfig
from aimv2.eval.vqa import evaluate_vqa, synthetic_vqa_samples
from aimv2.train import train
from aimv2.train.vlm_task import train_vlm
from aimv2.weights.lm import build_tiny_lm, load_vlm_run

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["train.progress=false", "log.tensorboard=false", "data.num_workers=0"]  # one process per run


def pretrain(work: Path, objective: str, args) -> str:
    out = work / f"pre-{objective}"
    over = [
        f"model.objective={objective}",
        f"model.encoder_overrides={{depth: {args.depth}, img_size: {args.img_size}}}",
        "model.decoder={embed_dim: 128, depth: 2, num_heads: 2, mlp_hidden_dim: 256}",
        f"train.steps={args.pre_steps}",
        f"train.checkpoint_every={args.pre_steps}",
        f"train.batch_size={args.pre_batch}",
        f"out_dir={out}",
        *QUIET,
    ]
    train(load_config(ROOT / "configs/tiny-synthetic.yaml", over))
    return str(out)


def vlm(work: Path, name: str, encoder: str, lm: Path, seed: int, args, tiles=(1, 1)) -> dict:
    common = [
        f"vlm.encoder={encoder}",
        f"vlm.encoder_overrides={{depth: {args.depth}, img_size: {args.img_size}}}",
        f"vlm.lm={lm}",
        f"vlm.tiles=[{tiles[0]}, {tiles[1]}]",
        f"seed={seed}",
        f"train.batch_size={args.batch}",
        *QUIET,
    ]
    s1, s2 = work / f"{name}-s{seed}-stage1", work / f"{name}-s{seed}-stage2"
    t = time.perf_counter()
    cfg1 = [*common, f"out_dir={s1}", f"train.steps={args.s1}", f"train.checkpoint_every={args.s1}"]
    train_vlm(load_config(ROOT / "configs/vlm-tiny-stage1.yaml", cfg1, VLMConfig))
    cfg2 = [*common, f"out_dir={s2}", f"train.steps={args.s2}", f"train.checkpoint_every={args.s2}",
            f"vlm.init_from={s1}"]  # fmt: skip
    train_vlm(load_config(ROOT / "configs/vlm-tiny-stage2.yaml", cfg2, VLMConfig))
    model, tok, _ = load_vlm_run(s2)
    result = evaluate_vqa(model, tok, synthetic_vqa_samples(args.scenes, model.image_size, seed=0), batch_size=64)
    result["train_s"] = round(time.perf_counter() - t, 1)
    print(name, seed, {k: round(v, 3) for k, v in result.items() if k.startswith("accuracy")}, flush=True)
    return result


def summarize(runs: list[dict]) -> dict:
    keys = [k for k in runs[0] if k.startswith("accuracy")]
    out = {}
    for k in keys:
        vals = [r[k] for r in runs]
        out[k] = {"mean": round(statistics.mean(vals), 4), "std": round(statistics.stdev(vals), 4) if len(vals) > 1
                  else 0.0, "runs": [round(v, 4) for v in vals]}  # fmt: skip
    return out


def threads() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--pre-steps", type=int, default=250, help="pretraining steps of each encoder")
    p.add_argument("--pre-batch", type=int, default=32, help="pretraining batch")
    p.add_argument("--s1", type=int, default=30, help="stage-1 steps")
    p.add_argument("--s2", type=int, default=300, help="stage-2 steps")
    p.add_argument("--batch", type=int, default=16, help="VLM batch")
    p.add_argument("--depth", type=int, default=4, help="encoder blocks")
    p.add_argument("--img-size", type=int, default=32, help="encoder resolution")
    p.add_argument("--scenes", type=int, default=100, help="held-out scenes evaluated (one question per type)")
    p.add_argument("--tiles", action="store_true", help="also AIMv2 with 2 x 2 tiles at twice the resolution")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, one process each (default: 2)")
    p.add_argument("--work", default="runs/vlm-compare")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/vlm_compare_cpu.json"))
    args = p.parse_args()
    threads()
    from machine import machine_info

    start = time.perf_counter()
    work = Path(args.work).resolve()  # runs record their encoder and LM by this path: vlm ask works from anywhere
    work.mkdir(parents=True, exist_ok=True)
    lm = work / "tiny-lm"
    if not (lm / "config.json").exists():
        build_tiny_lm(lm, width=64, depth=2, heads=2)
    pool = ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=threads)
    random = "aimv2-tiny-patch8-64"  # the same architecture, untrained
    with pool:  # the random-init runs need no pretraining: they fill the pool while the encoders pretrain
        pre = {o: pool.submit(pretrain, work, o, args) for o in ("aimv2", "clip")}
        jobs = {"random": [pool.submit(vlm, work, "random", random, lm, s, args) for s in range(args.seeds)]}
        aimv2 = pre["aimv2"].result()
        jobs["aimv2"] = [pool.submit(vlm, work, "aimv2", aimv2, lm, s, args) for s in range(args.seeds)]
        if args.tiles:
            jobs["aimv2-2x2"] = [
                pool.submit(vlm, work, "aimv2-2x2", aimv2, lm, s, args, (2, 2)) for s in range(args.seeds)
            ]
        clip = pre["clip"].result()
        jobs["clip"] = [pool.submit(vlm, work, "clip", clip, lm, s, args) for s in range(args.seeds)]
        order = ["aimv2", "clip", "random"] + (["aimv2-2x2"] if args.tiles else [])
        runs = {name: [f.result() for f in jobs[name]] for name in order}
    results = {name: summarize(rs) for name, rs in runs.items()}
    record = {
        "machine": machine_info(),
        "args": vars(args) | {"out": os.path.relpath(args.out, ROOT)},
        "wall_s": round(time.perf_counter() - start, 1),
        "results": results,
        "train_s": {name: [r["train_s"] for r in rs] for name, rs in runs.items()},
        "examples": {name: rs[0]["examples"][:4] for name, rs in runs.items()},
    }
    Path(args.out).write_text(json.dumps(record, indent=1))
    kinds = sorted(k for k in next(iter(results.values())) if k != "accuracy")
    print("| encoder | accuracy | " + " | ".join(k.split("/")[1] for k in kinds) + " |")
    print("|---|---|" + "---|" * len(kinds))
    for name, r in results.items():
        cells = [f"{r[k]['mean']:.3f} +- {r[k]['std']:.3f}" for k in ["accuracy", *kinds]]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"wall time {record['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
