"""Write the built-in dataset as webdataset shards in img2dataset's layout, so the shard reader runs on data that
every installation has: tests, smoke runs and ``aimv2 data inspect`` exercise the same path as CC12M or DataComp.

Each sample is ``KEY.jpg`` (or ``.png``), ``KEY.txt`` (the caption) and ``KEY.json`` (``caption``, ``key``,
``width``, ``height``, ``status``: the fields img2dataset writes that readers use), with 9-digit keys
``SHARD*shard_size + i`` and shards named ``00000.tar``, ``00001.tar``, ... as img2dataset names them.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import webdataset as wds

from .dataset import synthetic_sample


def write_synthetic_shards(
    out_dir: str | os.PathLike,
    n: int,
    *,
    shard_size: int = 1000,
    size: int = 64,
    seed: int = 0,
    image_format: str = "jpg",
    overwrite: bool = False,
) -> list[str]:
    """Write samples ``0 .. n-1`` of :func:`~aimv2.data.synthetic.dataset.synthetic_sample` (``seed``, ``size``) as
    shards of ``shard_size`` samples under ``out_dir``; returns the shard paths.

    ``image_format`` is ``jpg`` (quality 95, as img2dataset's default) or ``png`` (lossless). Refuses to write into
    a folder that already holds ``.tar`` files unless ``overwrite`` (which deletes them first).
    """
    if n < 1 or shard_size < 1:
        raise ValueError(f"need n >= 1 and shard_size >= 1, got n={n}, shard_size={shard_size}")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be jpg or png, got {image_format!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob("*.tar"))
    if existing:
        if not overwrite:
            raise FileExistsError(f"{out} already holds {len(existing)} .tar file(s); pass overwrite to replace them")
        for p in existing:
            p.unlink()
    paths: list[str] = []
    with wds.ShardWriter(str(out / "%05d.tar"), maxcount=shard_size, verbose=0) as sink:
        for i in range(n):
            image, caption = synthetic_sample(i, seed, size)
            buf = io.BytesIO()
            if image_format == "jpg":
                image.save(buf, format="JPEG", quality=95)
            else:
                image.save(buf, format="PNG", compress_level=1)
            key = f"{i:09d}"
            meta = {"caption": caption, "key": key, "width": size, "height": size, "status": "success"}
            sink.write({"__key__": key, image_format: buf.getvalue(), "txt": caption, "json": json.dumps(meta)})
            if sink.fname not in paths:
                paths.append(sink.fname)
    return paths
