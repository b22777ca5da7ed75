"""Images/s per data worker: our training pipeline against a plain torchvision PIL pipeline, on the same files.

- ours: :class:`~aimv2.data.sources.shards.ShardSamples` (tar reading, sample grouping, caption choice, fault
  accounting) with :class:`~aimv2.data.transforms.TrainTransform`, which decodes JPEGs at reduced scale when the
  crop allows.
- plain: ``tarfile`` reads the same shards; ``Image.open().convert("RGB")``, torchvision v2
  ``RandomResizedCrop(size, scale=(0.4, 1), ratio=(3/4, 4/3), bicubic)``, flip, ``PILToTensor``.

Both produce uint8 [3, size, size] tensors, one thread (``torch.set_num_threads(1)``, as in a DataLoader worker),
with the same per-image seeds, hence the same crop boxes and flips. Repetitions alternate between the two in one
process so load from other jobs hits both alike; each repetition loops over the shards ``--loops`` times. The
script also reports how far our images are from the plain ones (mean absolute difference, in uint8 levels), so
the speed is not bought with quality, and each pipeline's peak memory: the most one pass over the shards needed
above what the process held before it (decode buffers, intermediate images), measured after the timing in a fresh
process running this script with ``--memory-only``, because the measurement needs a malloc setting that would slow
the timed passes (see ``peak_memory.py``).

    python benchmarks/data_speed.py [--shards ../shared/data/cc12m-train-0000.tar] [--out results.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tarfile
import time
from pathlib import Path

import torch
from machine import write_record
from peak_memory import PeakMemory, fmt_mib, measure_in_fresh_process, release_freed_memory
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from aimv2.data.sources.shards import ShardSamples
from aimv2.data.sources.tar import expand_urls
from aimv2.data.transforms import TrainTransform

REPO = Path(__file__).resolve().parents[1]


def plain_transform(size: int) -> v2.Compose:
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3), interpolation=InterpolationMode.BICUBIC),
            v2.RandomHorizontalFlip(),
            v2.PILToTensor(),
        ]
    )


def encoded(urls: list[str]):
    """The bytes of every image member of the shards, read with ``tarfile``."""
    for url in urls:
        with tarfile.open(url) as tar:
            for member in tar:
                if member.isfile() and member.name.rsplit(".", 1)[-1] in ("jpg", "jpeg", "png", "webp"):
                    yield tar.extractfile(member).read()


def plain_images(urls: list[str], size: int, loops: int):
    """uint8 [3, size, size] per image member of the shards, ``loops`` times over; seeded by image count."""
    t, i = plain_transform(size), 0
    for _ in range(loops):
        for data in encoded(urls):
            torch.default_generator.manual_seed(i)  # CPU generator only: torch.manual_seed costs ~1 ms more
            i += 1
            yield t(Image.open(io.BytesIO(data)).convert("RGB"))


def our_images(urls: list[str], size: int, loops: int):
    """The same through our reader and transform; the transform runs inside the reader, seeded like the plain one."""
    transform, counter = TrainTransform(size), [0]

    def seeded(img):
        torch.default_generator.manual_seed(counter[0])
        counter[0] += 1
        return transform(img)

    seeded.accepts_undecoded = True  # a function attribute: the reader hands over the undecoded image
    ds = ShardSamples(urls, transform=seeded)
    for _ in range(loops):
        for image, _caption, _key in ds:
            yield image


def timed(images) -> tuple[int, float]:
    start, n = time.perf_counter(), 0
    for _ in images:
        n += 1
    return n, time.perf_counter() - start


def peak_mib(pipeline, urls: list[str], size: int) -> float | None:
    """Peak memory in MiB of one pass of ``pipeline`` over the shards, after a warmup pass (None: not measurable)."""
    timed(pipeline(urls, size, 1))
    with PeakMemory("cpu") as mem:
        timed(pipeline(urls, size, 1))
    return mem.mib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", default=str(REPO.parent / "shared" / "data" / "cc12m-train-0000.tar"))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--loops", type=int, default=4, help="passes over the shards per repetition")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--memory-only", action="store_true", help="only measure each pipeline's peak memory")
    args = ap.parse_args()
    torch.set_num_threads(1)
    urls = expand_urls(args.shards)
    if args.memory_only:
        release_freed_memory()  # before the pipelines allocate, so that RSS follows the live buffers
        peak = {"ours": peak_mib(our_images, urls, args.size), "plain": peak_mib(plain_images, urls, args.size)}
        print("peak memory: " + ", ".join(f"{k} {fmt_mib(v)}" for k, v in peak.items()), flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"peak_memory_mib": peak}) + "\n")
        return

    # same seeds -> same crops: how far are our images from the plain pipeline's (uint8 levels, mean |diff|)?
    diffs = [
        (a.float() - b.float()).abs().mean().item()
        for a, b in zip(our_images(urls, args.size, 1), plain_images(urls, args.size, 1), strict=True)
    ]
    drafted = []  # the decode reduction our transform picks for each image's crop (1: full decode)
    t = TrainTransform(args.size)
    for i, data in enumerate(encoded(urls)):
        torch.default_generator.manual_seed(i)
        _, _, h, w = v2.RandomResizedCrop.get_params(Image.open(io.BytesIO(data)), list(t.scale), list(t.ratio))
        drafted.append(t.draft_scale((h, w)))
    timed(our_images(urls, args.size, 1)), timed(plain_images(urls, args.size, 1))  # warm up caches
    rates: dict[str, list[float]] = {"ours": [], "plain": []}
    for _ in range(args.reps):
        for name, fn in (("ours", our_images), ("plain", plain_images)):
            n, dt = timed(fn(urls, args.size, args.loops))
            rates[name].append(n / dt)
    paired = statistics.median(o / p for o, p in zip(rates["ours"], rates["plain"], strict=True))
    measured = measure_in_fresh_process(__file__, sys.argv[1:]) or {}
    peak = {k: measured.get(k) for k in ("ours", "plain")}
    ratio_median = statistics.median(rates["ours"]) / statistics.median(rates["plain"])
    ratios = {"ours/plain img/s (median)": ratio_median, "ours/plain img/s (paired)": paired}
    if peak["ours"] and peak["plain"] is not None:
        ratios["plain/ours peak memory"] = peak["plain"] / peak["ours"]
    result = {
        "shards": [os.path.basename(u) for u in urls],
        "images_per_rep": n,
        "size": args.size,
        "threads": torch.get_num_threads(),
        "reps": args.reps,
        "ours_img_s": rates["ours"],
        "plain_img_s": rates["plain"],
        "ours_median_img_s": statistics.median(rates["ours"]),
        "plain_median_img_s": statistics.median(rates["plain"]),
        "ratio_median": ratio_median,
        "ratio_paired": paired,
        "ratios": ratios,
        "peak_memory_mib": peak,
        "mean_abs_diff_uint8": statistics.mean(diffs),
        "draft_scales": {str(k): drafted.count(k) for k in sorted(set(drafted))},
        "max_mean_abs_diff_uint8": max(diffs),
        "machine": {
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "pillow": Image.__version__,
            "loadavg": os.getloadavg(),
        },
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    print(
        f"ours {result['ours_median_img_s']:.1f} img/s, plain {result['plain_median_img_s']:.1f} img/s per thread: "
        f"ratio {result['ratio_median']:.2f}x (paired {paired:.2f}x); mean |ours - plain| "
        f"{result['mean_abs_diff_uint8']:.2f}/255 (worst image {result['max_mean_abs_diff_uint8']:.2f}); "
        f"decode scales 1/k: {result['draft_scales']}; peak memory ours {fmt_mib(peak['ours'])}, "
        f"plain {fmt_mib(peak['plain'])}"
    )
    if args.out:
        write_record(Path(args.out), result)


if __name__ == "__main__":
    main()
