"""Our AIMv2 loss and gradients against Apple's own (apple/ml-l3m), on the same weights: the golden check.

For each size (``small``: 112 px, and ``224``: the paper's 224 px, patch 14, vocabulary 32000, 77 tokens):

1. build l3m's model and loss from its own config (``configs/aimv2/001_aimv2_hfdata.yaml``, sizes written into
   its ``constants``; ``l3m_compare.build_l3m``) and ours (``create_pretraining_model``), each freshly
   initialised under the same seed, and compare the initialisation statistics of every pair of tensors (std,
   mean, largest magnitude; q, k and v each on its own);
2. copy l3m's weights into ours, one to one: every tensor of either model is mapped exactly once (the map is
   :data:`KEY_MAP`; q, k, v are stacked into our fused qkv; l3m's text positions hold one row more than it
   reads, the position after the last token, which gets no gradient there and has no counterpart here);
3. on several batches (random images, captions right-padded with l3m's pad id, per-sample prefix lengths given
   to both: l3m's ``encoder_prefix_mask`` is our ``prefix_len``), compare the pixel loss, the text loss, the
   total (0.4 pixel + 1.0 text, the config's ``criteria_weights``) and every parameter's gradient.

The weights and activations are float64 (``--dtype float64``, the default), but both compute some parts in float32
(our RMSNorm statistic and loss sums, l3m's cross-entropy on logits cast to float32), so the two agree to float32
rounding (about 1e-7 relative), far below any difference of method (a wrong mask or target moves the loss by 1e-2).

l3m's config never passes the image size to its pixel loss (``RasterPixelLoss(image_size=224)`` by default), so
its own loss only patchifies 224 px images correctly; the l3m builder sets ``loss.criteria.0.image_size`` to the
size built (at 224 px that changes nothing).

l3m is read from a local checkout (``--l3m-src``); it needs ``hydra-core``, ``omegaconf``, ``ftfy``, ``regex`` and
``fvcore`` importable (see ``l3m_compare.py``), none of which this project depends on.

    PYTHONPATH=DEPS python benchmarks/l3m_golden.py --l3m-src ~/ml-l3m --out benchmarks/results/l3m_golden.json
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from l3m_compare import build_l3m, build_ours
from machine import machine_info, write_record

SIZES = {
    "small": dict(img=112, patch=14, width=64, enc_depth=2, heads=2, dec_depth=2, hidden=256, vocab=512, text=16),
    "224": dict(img=224, patch=14, width=192, enc_depth=3, heads=3, dec_depth=2, hidden=512, vocab=32000, text=77),
}
PAD = 1  # l3m's AIMv2 config: pad_token 1, the text loss's ignore_index
ENC, DEC = "models.image_encoder.", "models.text_decoder."


def key_map(enc_depth: int, dec_depth: int) -> list[tuple[str, tuple[str, ...]]]:
    """(our name, l3m's names): one l3m name is copied as is (text positions: its first rows); three (q, k, v) are
    stacked into our fused qkv."""
    rows = [
        ("encoder.patch_embed.proj.weight", (ENC + "preprocessor.blocks.0.patchifier.proj.weight",)),
        ("encoder.patch_embed.proj.bias", (ENC + "preprocessor.blocks.0.patchifier.proj.bias",)),
        ("encoder.patch_embed.norm.weight", (ENC + "preprocessor.blocks.0.patchifier.norm.weight",)),
        ("encoder.pos_embed", (ENC + "preprocessor.blocks.0.pos_embed",)),
        ("encoder.norm.weight", (ENC + "trunk.post_trunk_norm.weight",)),
        ("decoder.image_proj.weight", (DEC + "preprocessor.vision_preprocessor.module.weight",)),
        ("decoder.image_proj.bias", (DEC + "preprocessor.vision_preprocessor.module.bias",)),
        ("decoder.bos", (DEC + "preprocessor.text_preprocessor.cls_token",)),
        ("decoder.tok_embed.weight", (DEC + "preprocessor.text_preprocessor.text_embedding.weight",)),
        ("decoder.text_pos", (DEC + "preprocessor.text_preprocessor.positional_embedding",)),
        ("decoder.norm.weight", (DEC + "trunk.post_trunk_norm.weight",)),
        ("decoder.text_head.weight", (DEC + "head.blocks.0.linear.weight",)),
        ("decoder.pixel_head.weight", (DEC + "head.blocks.1.linear.weight",)),
    ]
    for ours, theirs, depth in (("encoder", ENC, enc_depth), ("decoder", DEC, dec_depth)):
        for i in range(depth):
            o, t = f"{ours}.blocks.{i}.", f"{theirs}trunk.blocks.{i}."
            rows.append((o + "attn.qkv.weight", tuple(t + f"attn.{x}_proj.weight" for x in "qkv")))
            rows.append((o + "norm1.weight", (t + "norm_1.weight",)))
            rows.append((o + "norm2.weight", (t + "norm_2.weight",)))
            for name in ("attn.proj", "mlp.fc1", "mlp.fc2", "mlp.fc3"):
                rows.append((o + name + ".weight", (t + name + ".weight",)))
    return rows


def as_ours(theirs: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """l3m's tensor(s) in our shape: q, k, v stacked; text positions [T + 1, D] -> our [1, T, D]."""
    if len(theirs) == 3:
        return torch.cat(theirs, dim=0)
    t = theirs[0]
    if t.shape != like.shape:  # text positions: l3m keeps one row per position it computes, BOS + all T tokens
        t = t[: like.shape[1]].unsqueeze(0)
    return t


def stats(t: torch.Tensor) -> dict:
    t = t.detach().double()
    return {"std": t.std().item(), "mean": t.mean().item(), "absmax": t.abs().max().item(), "n": t.numel()}


def init_statistics(ours: torch.nn.Module, l3m: torch.nn.Module, rows) -> dict:
    """Per tensor pair, each model's own fresh init: std, mean, largest magnitude, and whether the stds agree within
    five standard errors of a sample std (q, k, v compared one by one)."""
    o_params, t_params = dict(ours.named_parameters()), dict(l3m.named_parameters())
    out = {}
    for ours_name, theirs in rows:
        o = o_params[ours_name].detach()
        parts = o.chunk(3) if len(theirs) == 3 else [o]
        for part, t_name in zip(parts, theirs, strict=True):
            t = as_ours([t_params[t_name].detach()], part)
            so, st = stats(part), stats(t)
            key = ours_name + (f"[{t_name.rsplit('.', 2)[-2][0]}]" if len(theirs) == 3 else "")
            same_const = so["std"] == 0 and st["std"] == 0 and so["mean"] == st["mean"]
            tol = 5 / math.sqrt(2 * so["n"]) + 0.02
            ratio = so["std"] / st["std"] if st["std"] else float("nan")
            out[key] = {
                "l3m": t_name,
                "ours": so,
                "l3m_stats": st,
                "std ratio ours/l3m": ratio,
                "agrees": bool(same_const or abs(ratio - 1) <= tol),
            }
    return out


def batches(s: dict, n: int, batch: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    N = (s["img"] // s["patch"]) ** 2
    for _ in range(n):
        images = torch.randn(batch, 3, s["img"], s["img"], generator=g)
        text = torch.randint(3, s["vocab"], (batch, s["text"]), generator=g)
        lengths = torch.randint(2, s["text"] + 1, (batch,), generator=g)  # right padding with PAD after each caption
        text[torch.arange(s["text"])[None] >= lengths[:, None]] = PAD
        yield images, text, torch.randint(1, N, (batch,), generator=g)


def compare(size: str, s: dict, src: Path, n_batches: int, batch: int, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    l3m, l3m_loss, _ = build_l3m(src, "torch-adamw", s)
    torch.manual_seed(0)
    ours = build_ours(s)
    ours.pad_id = PAD
    rows = key_map(s["enc_depth"], s["dec_depth"])
    mapped_ours = [o for o, _ in rows]
    mapped_theirs = [t for _, ts in rows for t in ts]
    assert sorted(mapped_ours) == sorted(n for n, _ in ours.named_parameters()), "our tensors not mapped once"
    assert sorted(mapped_theirs) == sorted(n for n, _ in l3m.named_parameters()), "l3m tensors not mapped once"
    init = init_statistics(ours, l3m, rows)

    l3m.to(dtype)
    ours.to(dtype)
    t_params = dict(l3m.named_parameters())
    with torch.no_grad():
        for o_name, p in ours.named_parameters():
            p.copy_(as_ours([t_params[t] for t in dict(rows)[o_name]], p))

    per_batch = []
    worst_grad = {}
    N = (s["img"] // s["patch"]) ** 2
    for images, text, prefix in batches(s, n_batches, batch):
        images = images.to(dtype)
        for m in (ours, l3m):
            m.zero_grad(set_to_none=True)
        out = ours(images, text, prefix_len=prefix)
        out.loss.backward()
        data = l3m({"image": images, "text": text, "encoder_prefix_mask": torch.arange(N)[None] >= prefix[:, None]})
        pixel, caption = l3m_loss.criteria[0](data)[0], l3m_loss.criteria[1](data)[0]
        w = list(l3m_loss.criteria_weights)
        total = w[0] * pixel + w[1] * caption
        total.backward()
        row = {
            "pixel ours": out.image_loss.item(),
            "pixel l3m": pixel.item(),
            "text ours": out.text_loss.item(),
            "text l3m": caption.item(),
            "total ours": out.loss.item(),
            "total l3m": total.item(),
        }
        for k in ("pixel", "text", "total"):
            row[f"{k} |diff|"] = abs(row[f"{k} ours"] - row[f"{k} l3m"])
        o_params = dict(ours.named_parameters())
        for o_name, theirs in rows:
            g_o = o_params[o_name].grad
            g_t = as_ours([t_params[t].grad for t in theirs], g_o)
            diff = (g_o - g_t).abs().max().item()
            scale = g_t.abs().max().item()
            prev = worst_grad.get(o_name, (0.0, 0.0))
            worst_grad[o_name] = (max(prev[0], diff), max(prev[1], scale))
        unused = t_params[DEC + "preprocessor.text_preprocessor.positional_embedding"].grad[s["text"] :]
        row["l3m's extra text position: gradient max"] = unused.abs().max().item()
        per_batch.append(row)

    grads = {k: {"max |diff|": d, "max |grad|": g, "relative": d / g if g else 0.0} for k, (d, g) in worst_grad.items()}
    return {
        "sizes": dict(s, batch=batch, pad_id=PAD, batches=n_batches),
        "dtype": str(dtype).removeprefix("torch."),
        "tensors mapped": len(rows),
        "losses": per_batch,
        "max loss |diff|": {k: max(r[f"{k} |diff|"] for r in per_batch) for k in ("pixel", "text", "total")},
        "max gradient |diff|": max(v["max |diff|"] for v in grads.values()),
        "max gradient relative diff": max(v["relative"] for v in grads.values()),
        "gradients": grads,
        "init": init,
        "init tensors that differ": sorted(k for k, v in init.items() if not v["agrees"]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--l3m-src", type=Path, required=True, help="a checkout of github.com/apple/ml-l3m")
    p.add_argument("--sizes", default="small,224", help="comma-separated, of: " + ", ".join(SIZES))
    p.add_argument("--batches", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if not (args.l3m_src / "src/l3m").is_dir():
        raise SystemExit(f"--l3m-src {args.l3m_src}: no src/l3m inside; pass a checkout of apple/ml-l3m")
    dtype = getattr(torch, args.dtype)
    results = {}
    for size in args.sizes.split(","):
        r = compare(size, SIZES[size], args.l3m_src, args.batches, args.batch_size, dtype)
        results[size] = r
        print(
            f"{size} ({r['sizes']['img']} px, {r['tensors mapped']} tensors mapped one to one, {r['dtype']}): "
            f"loss |diff| pixel {r['max loss |diff|']['pixel']:.1e}, text {r['max loss |diff|']['text']:.1e}, "
            f"total {r['max loss |diff|']['total']:.1e}; gradients max |diff| {r['max gradient |diff|']:.1e} "
            f"(relative {r['max gradient relative diff']:.1e}); init std differs on "
            f"{len(r['init tensors that differ'])} of {len(r['init'])}: {', '.join(r['init tensors that differ'])}"
        )
    if args.out:
        shown_args = ["PATH" if a == str(args.l3m_src) else a for a in sys.argv[1:]]  # no local paths in results
        info = dict(
            machine_info(("torch",)),
            command="python benchmarks/l3m_golden.py " + " ".join(shown_args),
            l3m_config="configs/aimv2/001_aimv2_hfdata.yaml (sizes in its constants; loss.criteria.0.image_size set)",
            results=results,
        )
        write_record(args.out, info)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
