"""The one reader of webdataset tar shards: shard lists, members grouped into samples, and shard faults counted.

A webdataset shard is a plain tar whose members are named ``KEY.EXT``; consecutive members with the same ``KEY``
form one sample, ``{"__key__": KEY, "__url__": URL, EXT: bytes, ...}``. Everything that reads shards reads them
here: the training stream (:class:`~aimv2.data.sources.shards.ShardSamples`), tokenizer fitting
(:func:`~aimv2.data.sources.shards.shard_captions`) and labelled probe shards (``aimv2.eval.datasets``).

- URLs (local paths, ``pipe:`` commands, brace patterns) are opened and expanded by the ``webdataset`` library, and
  members are grouped into samples by its ``group_by_keys``; the tar stream itself is walked here with ``tarfile``,
  so that what goes wrong in it is known exactly.
- A shard that cannot be opened or is not a tar counts once as ``unreadable_shard``; one cut off part-way (an
  interrupted download or copy) counts once as ``truncated_shard``, keeps the samples before the cut and drops the
  one being read at the cut, which may lack members. Members that cannot be grouped (a duplicate name) count as
  ``bad_member``. Faults go to a :class:`FaultSink`, usually a :class:`~aimv2.data.faults.FaultCounter`.
- A ``pipe:`` URL runs its command through a shell (webdataset's design: a config's shard list is code). A command
  that hangs (a stalled download, a prompt for a password) would hang the run without a word, so while it sends
  nothing a warning names it every :data:`PIPE_STALL_S` seconds; the read itself is not cut off, since a slow
  network is not a fault.
- A reader that needs only some members' bytes (an index of a shard, for random access later) passes ``read``:
  members it declines are not loaded and stand as a :class:`MemberSpan`, where their bytes lie in the file.
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls as _wds_expand_urls
from webdataset.tariterators import base_plus_ext, group_by_keys

log = logging.getLogger(__name__)

PIPE_STALL_S = 60.0  # a pipe: command silent this long is named in a warning (again every as long)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # the image member of a sample: the first of these it has
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's names for shard metadata (``__index__`` ...): not members


class FaultSink(Protocol):
    """Where the reader reports what it skipped: a :class:`~aimv2.data.faults.FaultCounter` has this method."""

    def fault(self, kind: str, where: str, what: str = "") -> None: ...


def expand_urls(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard URLs from a spec: a path, a folder (its ``*.tar``, sorted), a brace pattern, a ``pipe:`` command,
    a ``::``-separated list of those, or a list of those.

    ``data-{000000..000009}.tar`` -> ten paths; ``pipe:curl -s https://host/data-{000..009}.tar`` -> ten commands
    (webdataset expands braces and ``$WDS_*`` variables). Raises ``ValueError`` if the spec expands to nothing.
    """
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    urls: list[str] = []
    for item in items:
        for url in _wds_expand_urls(os.fspath(item)):
            if not url.startswith("pipe:") and "://" not in url and Path(url).is_dir():
                urls += sorted(str(p) for p in Path(url).glob("*.tar"))
            else:
                urls.append(url)
    if not urls:
        raise ValueError(f"no shards in {spec!r} (a folder must contain *.tar files)")
    return urls


@dataclass(frozen=True)
class MemberSpan:
    """A member left unread: its ``size`` bytes start at ``offset`` of the local, uncompressed tar ``url``."""

    url: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.url, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


def member_names(sample: dict) -> str:
    """The member extensions of a sample, for messages: ``"jpg, txt, json"`` (or ``"nothing"``)."""
    return ", ".join(k for k in sample if not k.startswith("__")) or "nothing"


def _key(name: str) -> str | None:
    return base_plus_ext(name)[0]


class _WatchedPipe:
    """A ``pipe:`` stream whose reads are timed by a watchdog thread: a warning names the command while it stalls."""

    def __init__(self, stream, url: str, stall_s: float):
        self.stream, self.url, self.stall_s = stream, url, stall_s
        self.last = time.monotonic()
        self.closed = threading.Event()
        threading.Thread(target=self._watch, daemon=True, name="aimv2-pipe-watch").start()

    def _watch(self) -> None:
        while not self.closed.wait(self.stall_s / 4):
            silent = time.monotonic() - self.last
            if silent >= self.stall_s:
                log.warning("%s has sent no data for %.0f s; check the command in a shell (network, password "
                            "prompt?)", self.url, silent)  # fmt: skip
                self.last = time.monotonic()  # the next warning after another stall_s

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.last = time.monotonic()
        return data

    def close(self) -> None:
        self.closed.set()
        self.stream.close()


def _members(url: str, faults: FaultSink, read: Callable[[str, int], bool] | None) -> Iterator[dict]:
    """The members of one shard as ``{"fname", "data", "__url__"}``, in tar order (see the module docstring)."""
    try:
        stream = gopen(url)
        if url.startswith("pipe:"):
            stream = _WatchedPipe(stream, url, PIPE_STALL_S)
    except Exception as e:
        faults.fault("unreadable_shard", url, f"{type(e).__name__}: {e}")
        return
    pending: list[dict] = []  # members of the current key, released once the next key starts
    last = ""  # the name of the last member whose header was read, even if its data was not
    seen = 0  # members read whole
    errors: list[BaseException] = []
    try:
        # a stream: no seeking back, so pipes work; spans need offsets in the file itself, hence no decompression
        with tarfile.open(fileobj=stream, mode="r|*" if read is None else "r|") as tar:
            for info in tar:
                if not info.isreg() or _META.match(info.name):
                    continue
                last = info.name
                ext = (base_plus_ext(info.name)[1] or "").lower()
                if read is None or read(ext, info.size):
                    data = tar.extractfile(info).read()
                else:
                    data = MemberSpan(url, info.offset_data, info.size)
                tar.members = []  # a stream is read once: keep no index of the members passed
                seen += 1
                if pending and _key(info.name) != _key(pending[0]["fname"]):
                    yield from pending
                    pending = []
                pending.append({"fname": info.name, "data": data, "__url__": url})
    except Exception as e:  # a bad header, data cut off, an empty or non-tar file
        errors.append(e)
    finally:
        try:
            stream.close()
        except Exception as e:  # a pipe: command that exited with an error status
            errors.append(e)
    if errors:  # members read, then an error: the shard is cut off; none read: not a (readable) tar at all
        e = errors[0]
        faults.fault("truncated_shard" if seen else "unreadable_shard", url, f"{type(e).__name__}: {e}")
        # the sample being read when the shard ended may lack members: keep it only if a later key had begun
        if pending and _key(last) != _key(pending[0]["fname"]):
            yield from pending
    else:
        yield from pending


def shard_samples(
    urls: Iterable[str], faults: FaultSink, *, read: Callable[[str, int], bool] | None = None
) -> Iterator[dict]:
    """The samples of the shards ``urls``, in order: ``{"__key__", "__url__", EXT: bytes | MemberSpan, ...}``.

    ``read(ext, size)`` says which members to load (the rest become :class:`MemberSpan`\\ s; shards must then be
    local uncompressed tars, a compressed one counts as unreadable); by default every member is loaded. A sample
    never spans two shards. ``urls`` is consumed lazily, so it may be endless.
    """
    current = [""]  # the shard being read, for the bad_member message

    def members() -> Iterator[dict]:
        for url in urls:
            current[0] = url
            yield from _members(url, faults, read)
            yield {}  # group_by_keys's end of shard: the last sample is complete

    def bad_member(exn: BaseException) -> bool:  # webdataset's handler protocol: True = skip it and go on
        faults.fault("bad_member", current[0], str(exn.args[0] if exn.args else exn))
        return True

    return group_by_keys(members(), handler=bad_member)
