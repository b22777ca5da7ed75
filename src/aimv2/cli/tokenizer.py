"""``aimv2 tokenizer train``: a byte-level BPE trained on the captions of the pretraining data.

The built-in tokenizer only knows the synthetic captions' words; real captions need a vocabulary of their own, and
the right vocabulary size is a trade-off best judged on the data: more tokens per caption means more captions cut
at the context length (they lose their end-of-sequence target). So the command prints both after training.

Captions are read without decoding any image: from shards only the caption members are parsed, from folders only
the sidecar ``.txt`` files.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from pathlib import Path

from .sub_actions import run_action

DESCRIPTION = """Train the caption tokenizer (byte-level BPE) on your captions.

actions:
  train SOURCES...   read captions, train a BPE of --vocab-size tokens, write --out (tokenizer.json)

examples:
  aimv2 tokenizer train cc12m/{00000..00099}.tar --vocab-size 32000 --out tokenizer.json
  aimv2 tokenizer train captions.txt --vocab-size 4000 --out tok.json

run `aimv2 tokenizer train --help` for its options and more examples."""

TRAIN_DESCRIPTION = """Read captions from SOURCES, train a byte-level BPE and write it as tokenizer.json.

Each SOURCE is one of:
  webdataset shards    a .tar, a folder of .tar files, a brace pattern or a pipe: command; the caption
                       is --caption (txt, or json:FIELD); images are never decoded
  a caption folder     images with a sidecar caption each: x.jpg + x.txt (recursive)
  a CSV / JSONL index  with columns/keys "path" and "caption"
  a text file          one caption per line (empty lines skipped)

The tokenizer keeps ids 0, 1, 2 for <pad>, <eos>, <unk>, lowercases (unless --no-lowercase) and
stores the context length, so training and `Tokenizer.from_file` agree. After training it prints the
vocabulary size, the mean tokens per caption and the fraction of captions that do not fit the
context length with their end-of-sequence token (truncated). The last line of stdout is JSON:
{"vocab_size", "captions", "mean_tokens", "truncated", "out"}. An existing --out is kept unless --overwrite
is given: a run trained with it would otherwise resume with other token ids.

examples:
  aimv2 tokenizer train cc12m/{00000..00099}.tar --vocab-size 32000 --out tokenizer.json --limit 1000000
  aimv2 tokenizer train datacomp/ --caption json:caption --vocab-size 16000 --out tok.json
  aimv2 tokenizer train my-images/ captions.csv extra.jsonl --vocab-size 8000 --out tok.json
  aimv2 tokenizer train captions.txt --vocab-size 4000 --context-length 64 --out tok.json"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    p = sub.add_parser("train", help="train a BPE tokenizer on captions", description=TRAIN_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("sources", nargs="+", metavar="SOURCES", help="shards, caption folders, CSV/JSONL, text files")
    p.add_argument("--vocab-size", type=int, required=True, metavar="N", help="vocabulary size (upper bound)")
    p.add_argument("--out", required=True, metavar="JSON", help="where to write tokenizer.json")
    p.add_argument(
        "--overwrite", action="store_true", help="replace --out if it exists (a run trained with it is not resumable)"
    )
    p.add_argument("--caption", default="txt", help="caption field of shards: txt | json:FIELD (default: txt)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="use at most N captions (default: all)")
    p.add_argument("--context-length", type=int, default=77, metavar="T", help="tokens per caption (default: 77)")
    p.add_argument("--no-lowercase", dest="lowercase", action="store_false", help="keep upper case letters")
    p.add_argument("--min-frequency", type=int, default=2, help="least count of a merged pair (default: 2)")
    p.set_defaults(_action=run_train)
    parser.set_defaults(_parser=parser)


run = run_action  # dispatch to the sub-action


# --- reading captions ------------------------------------------------------------------------------------------------


def _is_shards(source: str) -> bool:
    if source.startswith("pipe:") or "://" in source or "{" in source or source.endswith(".tar"):
        return True
    p = Path(source)
    return p.is_dir() and any(p.glob("*.tar"))


def folder_captions(source: str, faults) -> Iterator[str]:
    """Captions of a sidecar folder or a CSV/JSONL index (see :class:`aimv2.data.sources.captioned.CaptionedImages`)."""
    from ..data.sources.captioned import CaptionedImages

    data = CaptionedImages(source)
    faults.merge(data.listing_faults)
    for i in range(len(data)):
        text = data.get_caption(i, faults)
        if text is not None:
            faults.ok()
            yield text


def text_captions(source: str, faults) -> Iterator[str]:
    """One caption per non-empty line of a UTF-8 text file."""
    with open(source, encoding="utf-8") as f:
        for line in f:
            text = line.strip()
            if text:
                faults.ok()
                yield text


def read_captions(sources: list[str], caption: str, limit: int | None, faults) -> list[str]:
    """Captions from every source in order, at most ``limit`` of them."""
    from ..data.sources.shards import shard_captions

    out: list[str] = []
    for source in sources:
        if _is_shards(source):
            it = shard_captions(source, caption, faults)  # caption members only: no image is decoded
        elif Path(source).is_dir() or Path(source).suffix.lower() in (".csv", ".jsonl", ".json"):
            it = folder_captions(source, faults)
        else:
            it = text_captions(source, faults)
        for text in it:
            if limit is not None and len(out) >= limit:
                return out
            out.append(text)
    return out


# --- training --------------------------------------------------------------------------------------------------------


def run_train(args) -> int:
    from ..data.faults import FaultCounter
    from ..data.tokenizer import SPECIAL_TOKENS, train_bpe
    from ..errors import DataError, UserError

    smallest = 256 + len(SPECIAL_TOKENS)  # byte-level BPE starts from all 256 bytes, then the special tokens
    if args.vocab_size < smallest or args.context_length < 1:
        raise UserError(
            f"--vocab-size must be >= {smallest} (the 256 bytes and {len(SPECIAL_TOKENS)} special tokens) and "
            f"--context-length >= 1, got {args.vocab_size} and {args.context_length}"
        )
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit} is out of range; give a positive number of captions, or leave it out")
    out = Path(args.out)
    if out.exists() and not args.overwrite:  # a run may be training with it: its token ids must not change
        raise UserError(f"--out exists ({out}); pass --overwrite to replace it, or choose another --out")
    faults = FaultCounter(max_rate=1.0)  # report skipped captions, never stop on them: an empty result fails below
    captions = read_captions(args.sources, args.caption, args.limit, faults)
    if not captions:
        raise DataError(f"no captions ({' '.join(args.sources)}: {faults.describe()}); check the sources and --caption")
    tok = train_bpe(
        captions,
        args.vocab_size,
        context_length=args.context_length,
        lowercase=args.lowercase,
        min_frequency=args.min_frequency,
    )
    lengths = [len(e.ids) for e in tok.hf_tokenizer.encode_batch_fast(captions, add_special_tokens=False)]
    mean_tokens = sum(lengths) / len(lengths)
    truncated = sum(n >= args.context_length for n in lengths) / len(lengths)  # no room left for <eos>
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tok.save(tmp)
    os.replace(tmp, out)  # atomic: a run reading --out never sees half a file
    print(f"captions              {len(captions)}" + (f" (skipped {faults.skipped}: {faults.describe()})"
                                                      if faults.skipped else ""))  # fmt: skip
    print(f"vocab size            {tok.vocab_size} (asked {args.vocab_size})")
    print(f"mean tokens/caption   {mean_tokens:.2f}")
    print(f"truncated at {args.context_length:<9}{100 * truncated:.2f}%")
    print(f"wrote                 {out}")
    summary = {
        "vocab_size": tok.vocab_size,
        "captions": len(captions),
        "mean_tokens": round(mean_tokens, 3),
        "truncated": round(truncated, 5),
        "skipped": faults.skipped,
        "out": str(out),
    }
    print(json.dumps(summary))
    return 0
