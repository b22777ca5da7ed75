"""``aimv2 data``: look at pretraining data the way training reads it (``inspect``), and write the built-in data as
shards (``synth``).

``inspect`` exists because the costly data mistakes are silent ones: a caption field that is absent (every sample
skipped), a shard list pointing at the wrong bucket, images that are mostly thumbnails. It reads the sources with
the same reader and caption choice as training and reports what came through and what was skipped, by kind.
"""

from __future__ import annotations

import argparse
import json
import math

from .sub_actions import run_action

DESCRIPTION = """Inspect image-caption shards, or write the built-in dataset as shards.

actions:
  inspect SOURCES...   read shards as pretraining would: counts, skipped samples by kind, caption
                       lengths, image sizes, example captions, and optionally a contact sheet of
                       the augmented images the model would see. The last line of stdout is JSON.
  synth OUT --n N      write the built-in synthetic dataset as webdataset shards in img2dataset's
                       layout (KEY.jpg, KEY.txt, KEY.json), to try the shard path with no download.

SOURCES are shard paths, folders of .tar files, brace patterns or pipe: commands, as webdataset
takes them: data/{00000..00099}.tar, "pipe:curl -s https://host/data-{000..009}.tar".

examples:
  aimv2 data synth synth-shards/ --n 2000 --shard-size 500
  aimv2 data inspect synth-shards/
  aimv2 data inspect cc12m/{00000..00009}.tar --limit 1000 --sheet cc12m-sheet.png
  aimv2 data inspect datacomp/00000.tar --caption json:caption
  aimv2 data inspect dfn/00000.tar --caption txt=0.5,json:synthetic_caption=0.5

run `aimv2 data inspect --help` or `aimv2 data synth --help` for their options."""

INSPECT_DESCRIPTION = """Read shards as pretraining would and report what came through.

Prints the number of samples read and skipped (by kind: bad_image, no_caption, empty_caption,
truncated_shard, unreadable_shard, ...), caption length and image size statistics, and a few
captions. The last line of stdout is one JSON object with samples, skipped, skipped_by_kind,
captions and images statistics. Exits 1 if too many samples are skipped or none came through.

--caption chooses the caption as training does: a member (txt), a JSON field (json:caption), or
several fields with probabilities (txt=0.5,json:synthetic_caption=0.5), drawn per sample.

examples:
  aimv2 data inspect shards/
  aimv2 data inspect cc12m/{00000..00009}.tar --limit 1000 --sheet sheet.png --img-size 224
  aimv2 data inspect shards/00000.tar --caption json:caption --examples 10"""

SYNTH_DESCRIPTION = """Write the built-in synthetic dataset as webdataset shards, img2dataset's layout.

Sample i is KEY.jpg (or .png), KEY.txt and KEY.json (caption, key, width, height) with
KEY = i as 9 digits, in shards OUT/00000.tar, OUT/00001.tar, ... of --shard-size samples.
The same --seed and --size give the same images and captions as the built-in training data.

examples:
  aimv2 data synth synth-shards/ --n 2000 --shard-size 500
  aimv2 data synth synth-png/ --n 100 --format png --size 128"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("inspect", help="report on shards as training reads them", description=INSPECT_DESCRIPTION,
                       formatter_class=fmt)  # fmt: skip
    p.add_argument("sources", nargs="+", metavar="SOURCES", help="shards, folders, brace patterns, pipe: commands")
    p.add_argument("--caption", default="txt", help="caption field(s): txt | json:FIELD | F=P,F=P (default: txt)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="stop after N good samples (default: all)")
    p.add_argument("--examples", type=int, default=5, metavar="K", help="example captions to print (default: 5)")
    p.add_argument("--sheet", metavar="PNG", help="write a contact sheet of augmented images to this PNG")
    p.add_argument("--sheet-count", type=int, default=16, metavar="K", help="images on the sheet (default: 16)")
    p.add_argument("--img-size", type=int, default=224, help="image size on the sheet (default: 224)")
    p.add_argument("--seed", type=int, default=0, help="seed of caption choice and augmentation (default: 0)")
    p.add_argument("--max-fault-rate", type=float, default=0.5, help="fail above this skip rate (default: 0.5)")
    p.add_argument("--min-samples", type=int, default=100, help="samples before the rate is enforced (default: 100)")
    p.set_defaults(_action=run_inspect)

    s = sub.add_parser("synth", help="write the built-in dataset as webdataset shards", description=SYNTH_DESCRIPTION,
                       formatter_class=fmt)  # fmt: skip
    s.add_argument("out", metavar="OUT", help="output folder for the .tar shards")
    s.add_argument("--n", type=int, required=True, help="number of samples")
    s.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: 1000)")
    s.add_argument("--size", type=int, default=64, help="image side in pixels (default: 64)")
    s.add_argument("--seed", type=int, default=0, help="dataset seed (default: 0)")
    s.add_argument("--format", dest="image_format", choices=("jpg", "png"), default="jpg", help="image encoding")
    s.add_argument("--overwrite", action="store_true", help="replace .tar files already in OUT")
    s.set_defaults(_action=run_synth)
    parser.set_defaults(_parser=parser)


run = run_action  # dispatch to the sub-action


def _stats(values: list[float]) -> dict:
    """min / mean / median / p95 / max of a list (empty dict if empty)."""
    if not values:
        return {}
    v = sorted(values)

    def q(f: float) -> float:
        return v[min(len(v) - 1, int(math.floor(f * (len(v) - 1) + 0.5)))]

    return {"min": v[0], "mean": round(sum(v) / len(v), 2), "median": q(0.5), "p95": q(0.95), "max": v[-1]}


def _line(name: str, stats: dict) -> str:
    return f"{name:<22}" + "  ".join(f"{k} {v:g}" for k, v in stats.items())


def run_inspect(args) -> int:
    from ..data.faults import FaultRateError
    from ..data.sources.shards import ShardSamples

    for flag, v in (("--limit", args.limit), ("--examples", args.examples), ("--sheet-count", args.sheet_count)):
        if v is not None and v < (0 if flag == "--examples" else 1):
            raise ValueError(
                f"{flag} {v} is out of range; give a positive number" + (" or 0" if flag == "--examples" else "")
            )
    if args.sheet:
        from ..weights.atomic import check_writable

        check_writable(args.sheet, "--sheet")  # before the shards are read, not after
    reader = ShardSamples(
        args.sources,
        caption=args.caption,
        seed=args.seed,
        max_fault_rate=args.max_fault_rate,
        min_samples=args.min_samples,
    )
    chars, words, widths, heights, examples, sheet_images = [], [], [], [], [], []
    error = None
    try:
        for image, caption, key in reader:
            chars.append(len(caption))
            words.append(len(caption.split()))
            widths.append(image.width)
            heights.append(image.height)
            if len(examples) < args.examples:
                examples.append((key, caption))
            if args.sheet and len(sheet_images) < args.sheet_count:
                sheet_images.append(image)
            if args.limit is not None and len(chars) >= args.limit:
                break
    except FaultRateError as e:
        error = e  # raised again after the report of what was read
    faults = reader.faults
    summary = {
        "shards": len(reader.urls),
        **faults.as_dict(),
        "caption_chars": _stats(chars),
        "caption_words": _stats(words),
        "image_width": _stats(widths),
        "image_height": _stats(heights),
    }
    print(f"shards                {len(reader.urls)} (first: {reader.urls[0]})")
    print(f"samples               {faults.samples}")
    print(f"skipped               {faults.skipped}" + (f" ({100 * faults.rate:.1f}%)" if faults.skipped else ""))
    for kind, n in faults.most_common():
        print(f"  {kind:<20}{n}  first: {faults.first.get(kind, '?')}")
    for name in ("caption_chars", "caption_words", "image_width", "image_height"):
        if summary[name]:
            print(_line(name.replace("_", " "), summary[name]))
    for key, caption in examples:
        print(f"  {key}: {caption[:200]!r}")
    if args.sheet and sheet_images:
        _write_sheet(sheet_images, args.sheet, args.img_size, args.seed)
        summary["sheet"] = args.sheet
        print(f"contact sheet         {args.sheet} ({len(sheet_images)} images, {args.img_size} px, augmented)")
    if error:
        summary["error"] = str(error)
    print(json.dumps(summary))
    if error:
        raise error
    return 0


def _write_sheet(images: list, path: str, img_size: int, seed: int) -> None:
    """The images after the pretraining augmentation (what the model sees), in a grid, as one PNG."""
    import torch
    from PIL import Image
    from torchvision.utils import make_grid

    from ..data.transforms import train_transform

    transform = train_transform(img_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tiles = torch.stack([transform(im) for im in images])  # uint8 [K, 3, S, S]
    grid = make_grid(tiles, nrow=math.ceil(math.sqrt(len(images))), padding=2, pad_value=255)  # uint8 [3, H, W]
    Image.fromarray(grid.permute(1, 2, 0).contiguous().numpy()).save(path)


def run_synth(args) -> int:
    from ..data.synthetic.shards import write_synthetic_shards

    paths = write_synthetic_shards(
        args.out,
        args.n,
        shard_size=args.shard_size,
        size=args.size,
        seed=args.seed,
        image_format=args.image_format,
        overwrite=args.overwrite,
    )
    print(f"wrote {args.n} samples in {len(paths)} shard(s): {paths[0]} .. {paths[-1]}")
    print(json.dumps({"samples": args.n, "shards": paths}))
    return 0
