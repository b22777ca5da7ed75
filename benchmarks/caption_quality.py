"""Caption quality of a pretraining run on held-out built-in scenes, per encoder prefix and decoding setting.

Why: the encoder is trained with random prefix attention but evaluated bidirectionally (the paper's choice for
probes). For captioning, the decoder has only ever read prefix-attention features, so it is not obvious which
prefix gives the better captions; this measures it, and the greedy / beam / length-penalty trade-off, and the
speed of the key/value cache against a full decoder forward per token.

Held-out scenes: ``synthetic_sample(i, seed=--seed)`` for i < --n; training streams use the run's seed (0 for the
built-in configs), a different generator, so no scene was seen in training. Metrics, averaged over images:

- ``text_ce``: teacher-forced cross-entropy of the true caption (no decoding involved; lower is better),
- ``object_f1``: F1 between the (colour, shape) objects named in the generated and in the true caption,
- ``shape_f1`` / ``colour_f1``: the same for the shapes alone and the object colours alone,
- ``exact``: share of captions identical to the true one (captions come in several phrasings, so this is low
  even for a perfect model), ``tokens``: mean caption length, ``s``: decoding time.

    python benchmarks/caption_quality.py RUN [--n 128] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import re
import time

import torch
import torch.nn.functional as F

from aimv2.data.synthetic.captions import PLURALS
from aimv2.data.synthetic.dataset import synthetic_sample
from aimv2.data.synthetic.vocabulary import COLOURS, SHAPES
from aimv2.data.transforms import eval_transform
from aimv2.eval.captioning import Captioner, greedy_decode

SHAPE_WORDS = {s: s for s in SHAPES} | {p: s for s, p in PLURALS.items()}


def objects(text: str) -> set[tuple[str | None, str]]:
    """(colour, shape) of every shape word, with the colour among the two words before it ("a small red star")."""
    w = re.findall(r"[a-z]+", text.lower())
    out = set()
    for i, word in enumerate(w):
        if word in SHAPE_WORDS:
            colour = next((w[j] for j in range(i - 1, max(-1, i - 3), -1) if w[j] in COLOURS), None)
            out.add((colour, SHAPE_WORDS[word]))
    return out


def f1(pred: set, true: set) -> float:
    return 1.0 if not pred and not true else 2 * len(pred & true) / (len(pred) + len(true))


def scores(captions: list[str], truth: list[str]) -> dict:
    n = len(truth)
    pairs = [(objects(c), objects(t)) for c, t in zip(captions, truth, strict=True)]
    return {
        "object_f1": round(sum(f1(p, t) for p, t in pairs) / n, 3),
        "shape_f1": round(sum(f1({s for _, s in p}, {s for _, s in t}) for p, t in pairs) / n, 3),
        "colour_f1": round(sum(f1({c for c, _ in p}, {c for c, _ in t}) for p, t in pairs) / n, 3),
        "exact": round(sum(c == t for c, t in zip(captions, truth, strict=True)) / n, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--n", type=int, default=128, help="held-out images")
    ap.add_argument("--seed", type=int, default=999, help="seed of the held-out scenes (not the run's)")
    ap.add_argument("--prefixes", default="full,random,1,32", help="encoder prefixes to compare (greedy)")
    ap.add_argument("--out", help="write the results to this JSON file")
    args = ap.parse_args()
    torch.manual_seed(0)

    base = Captioner.from_run(args.run)
    tok, model = base.tokenizer, base.model
    size = model.encoder.cfg.image_hw
    samples = [synthetic_sample(i, args.seed, size[0]) for i in range(args.n)]
    transform = eval_transform(size)
    images = torch.stack([transform(im) for im, _ in samples])  # uint8 [n, 3, H, W]
    truth = [c for _, c in samples]
    text = tok.encode(truth)  # [n, T]
    results: dict = {"run": args.run, "n": args.n, "seed": args.seed, "settings": {}}

    def record(key: str, captioner: Captioner, feats: torch.Tensor, ce: float, beam: int, lp: float) -> None:
        captioner.encode = lambda _: feats  # decode from the features the loss was measured on
        t0 = time.perf_counter()
        caps = captioner.caption(images, beam=beam, length_penalty=lp)
        dt = time.perf_counter() - t0
        row = {"text_ce": round(ce, 4), **scores([c.text for c in caps], truth)}
        row |= {"tokens": round(sum(len(c.tokens) for c in caps) / args.n, 1), "s": round(dt, 2)}
        results["settings"][key] = row
        print(f"{key:36s} {row}", flush=True)

    feats_of = {}
    for prefix in args.prefixes.split(","):
        c = Captioner(model, tok, mean_std=base.mean_std, prefix=prefix, seed=0)
        with torch.no_grad():
            feats = c.encode(images)  # [n, N, D_enc]
            _, logits = model.decoder(feats, text)  # [n, T, V]
            ce = F.cross_entropy(logits.flatten(0, 1), text.flatten(), ignore_index=tok.pad_id).item()
        feats_of[prefix] = (c, feats, ce)
        record(f"prefix={prefix} greedy", c, feats, ce, 1, 0.0)
    c, feats, ce = feats_of.get("full") or next(iter(feats_of.values()))
    for beam, lp in ((3, 0.0), (3, 1.0), (5, 0.0), (5, 1.0)):
        record(f"prefix=full beam={beam} lp={lp}", c, feats, ce, beam, lp)

    # key/value cache against a full decoder forward per token (greedy, same features)
    dec = model.decoder
    times = {}
    for use_cache in (True, False):
        t0 = time.perf_counter()
        out = greedy_decode(dec, feats, eos_id=tok.eos_id, pad_id=tok.pad_id, use_cache=use_cache)
        times["cached" if use_cache else "full_recompute"] = round(time.perf_counter() - t0, 3)
        times[f"tokens_{'cached' if use_cache else 'full'}"] = out.tokens
    same = times.pop("tokens_cached") == times.pop("tokens_full")
    results["greedy_seconds"] = times | {"same_captions": same, "threads": torch.get_num_threads()}
    print("greedy decoding time:", results["greedy_seconds"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
