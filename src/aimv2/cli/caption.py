"""``aimv2 caption``: captions of images from a pretraining run's decoder (greedy or beam search)."""

from __future__ import annotations

import json
import math
import sys

from .encoder_args import add_workers_argument

DESCRIPTION = """Caption images with the multimodal decoder of an AIMv2 pretraining run: a direct look at what the
encoder learned to see. The decoder was trained to predict each image's caption from the encoder's features; here
it generates one, token by token.

RUN is a folder written by `aimv2 pretrain` (config.yaml, tokenizer.json, checkpoints/); its latest checkpoint is
used. Only run folders hold the decoder: encoder.safetensors and released checkpoints are encoder-only.
IMAGES are image files and/or folders (searched recursively, sorted by path). Each image gets the run's
evaluation preprocessing (short side resized to the encoder's size, center crop, the run's mean/std).

Output: one line per image, `path<TAB>caption`, in input order (with --json, one JSON object per line with
path, caption, score = log-probability of the caption, tokens, finished = false if cut at --max-len). Images
that cannot be read are named in a warning on stderr and skipped; the exit status is 1 only if none could be.

Decoding:
  --beam 1      greedy: the most likely token at each step (default)
  --beam N      beam search over N hypotheses, ranked by log-probability / length^--length-penalty
                (0 = plain log-probability, which favours short captions; 1 = mean per token)
  --prefix      the encoder's attention at inference. full (default): bidirectional, as the paper evaluates
                the encoder; random: a prefix length drawn per image as in training; M: patches < M
                bidirectional, the rest causal. On the tiny built-in run full, random and causal
                captions were equally good (within noise), so the deterministic full is the default.

examples:
  aimv2 caption runs/tiny-synthetic photos/
  aimv2 caption runs/tiny-synthetic a.png b.png --beam 5 --length-penalty 1 --json
  aimv2 caption runs/tiny-synthetic photos/ --prefix random --max-len 20
"""


def add_arguments(parser) -> None:
    parser.add_argument("run", metavar="RUN", help="pretraining run folder (written by `aimv2 pretrain`)")
    parser.add_argument("images", metavar="IMAGES", nargs="+", help="image files and/or folders of images")
    d = parser.add_argument_group("decoding")
    d.add_argument("--beam", type=int, default=1, metavar="N", help="beam width; 1 = greedy (default: 1)")
    d.add_argument(
        "--max-len",
        type=int,
        metavar="L",
        help="at most L tokens per caption, <eos> included (default and maximum: the run's context length)",
    )
    d.add_argument(
        "--length-penalty",
        type=float,
        default=0.0,
        metavar="A",
        help="beam search ranks by log-probability / length^A (default: 0)",
    )
    d.add_argument(
        "--prefix",
        default="full",
        metavar="full|random|M",
        help="encoder prefix at inference: full (bidirectional, default), random (as in training) or a patch count",
    )
    d.add_argument("--seed", type=int, default=0, help="seed of the --prefix random draws (default: 0)")
    o = parser.add_argument_group("output and running")
    o.add_argument("--json", action="store_true", help="one JSON object per line instead of path<TAB>caption")
    o.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    o.add_argument("--batch-size", type=int, default=32, help="images decoded together (default: 32)")
    add_workers_argument(o, 2)
    o.add_argument("--no-progress", action="store_true", help="no progress bar (it is off anyway when not a tty)")


def run(args) -> int:
    from tqdm import tqdm

    from ..errors import UserError
    from ..eval.caption_images import caption_images, image_paths
    from ..eval.captioning import Captioner, parse_prefix
    from .encoder_args import resolve_device

    if args.beam < 1:
        raise UserError(f"--beam must be at least 1, got {args.beam}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not math.isfinite(args.length_penalty):
        raise UserError(f"--length-penalty must be a finite number, got {args.length_penalty}")
    prefix = parse_prefix(args.prefix)
    paths = image_paths(args.images)
    device = resolve_device(args.device)
    captioner = Captioner.from_run(args.run, device=device, prefix=prefix, seed=args.seed)
    max_len_cap = captioner.decoder.cfg.max_text_len
    if args.max_len is not None and not 1 <= args.max_len <= max_len_cap:
        raise UserError(f"--max-len must be in [1, {max_len_cap}] (the run's context length), got {args.max_len}")

    done, skipped = 0, 0
    for item in caption_images(
        captioner,
        paths,
        beam=args.beam,
        max_len=args.max_len,
        length_penalty=args.length_penalty,
        batch_size=args.batch_size,
        num_workers=args.workers,
        progress=False if args.no_progress else None,
    ):
        if item.caption is None:
            skipped += 1
            tqdm.write(f"warning: skipped unreadable image {item.error}", file=sys.stderr)
            continue
        cap = item.caption
        if args.json:
            record = {"path": str(item.path), "caption": cap.text, "score": round(cap.score, 4),
                      "tokens": len(cap.tokens), "finished": cap.finished}  # fmt: skip
            line = json.dumps(record)
        else:
            line = f"{item.path}\t{cap.text}"
        tqdm.write(line, file=sys.stdout)
        done += 1
    print(f"captioned {done} image(s)" + (f", {skipped} unreadable skipped" if skipped else ""), file=sys.stderr)
    return 0 if done else 1
