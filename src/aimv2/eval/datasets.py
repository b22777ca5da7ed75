"""Labelled image sources for probes: image folders, webdataset shards with a class field, local HF ``datasets``.

Every source is a map-style Dataset with the sample contract of :class:`~aimv2.data.sources.folders.ImageFiles`:
``dataset[i] -> (uint8 [3, H, W] | ReadError, label, i)``, plus ``classes`` (names, label ``c`` is
``classes[c]``), a ``transform`` attribute and ``fingerprint()`` (what the feature cache keys the data by). All of
them decode through :func:`~aimv2.data.sources.folders.read_image`, so a corrupt image is a ``ReadError`` (counted
and named by the feature extractor), never a crash. Samples that cannot be used at all (no image member, no or bad
label) are left out when the source is indexed, and named in a warning.

:func:`open_labeled_source` picks the kind from the path:

- a folder with class sub-folders -> :class:`~aimv2.data.sources.folders.ImageFiles` (``train/cat/1.jpg``, ...);
- a ``.tar`` file, a brace pattern (``shards/{000..009}.tar``) or a folder of ``.tar`` files ->
  :class:`ShardClassSamples`; the label is the ``cls`` member (webdataset's convention: integer text) or any
  ``--label-key`` (a member extension, or ``json:NAME`` for a key of the sample's ``.json``);
- a ``save_to_disk`` folder, ``.parquet`` / ``.arrow`` files (or a folder or glob of them) ->
  :class:`HFClassSamples`; class names come from a ``ClassLabel`` feature when the label column has one.

Class names: ``classnames`` (a class names file, :mod:`aimv2.data.classnames`) wins; else integer labels are named
``"0" .. "max"``, text labels sorted-unique, as folders do."""

from __future__ import annotations

import copy
import glob
import hashlib
import io
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.classnames import class_labels, folder_labels
from ..data.sources.folders import IMAGE_EXTENSIONS, ImageFiles, ReadError, read_image
from ..data.sources.hf import image_source
from ..data.sources.tar import IMAGE_KEYS, MemberSpan, expand_urls, member_names, shard_samples
from ..data.transforms import to_rgb
from ..errors import MissingPackageError

KINDS = ("folder", "shards", "hf")
HF_FILE_EXTENSIONS = (".parquet", ".arrow")
EXPECTED = (
    "expected an image folder with one sub-folder per class (DIR/cat/1.jpg), webdataset shards (a .tar file, a "
    "brace pattern such as shards/{000..009}.tar, or a folder of .tar files), or a local Hugging Face dataset (a "
    "save_to_disk folder, or .parquet / .arrow files)"
)
LABEL_MEMBER_MAX_BYTES = 1 << 20  # a shard member larger than this is never a label (it is not read to look)


class SkippedSamplesWarning(UserWarning):
    """Some samples of a source have no image or no usable label; they were left out."""


def _warn_skipped(skipped: Sequence[ReadError], total: int, what: str, show: int = 10) -> None:
    if not skipped:
        return
    lines = [f"{len(skipped)} of {total} samples of {what} have no usable image or label and were left out:"]
    lines += [f"  {e}" for e in skipped[:show]]
    if len(skipped) > show:
        lines.append(f"  ... and {len(skipped) - show} more")
    warnings.warn("\n".join(lines), SkippedSamplesWarning, stacklevel=3)


# --- webdataset shards ---------------------------------------------------------------------------------------------


def _label_value(sample: dict, label_key: str):
    """The raw label of a sample (text or int) from its members, or raise LookupError / ValueError saying why not."""
    ext, field = ("json", label_key[5:]) if label_key.startswith("json:") else (label_key, None)
    raw = sample.get(ext)
    if raw is None:
        raise LookupError(f"no .{ext} member")
    if not isinstance(raw, bytes):
        raise LookupError(f"its .{ext} member is over {LABEL_MEMBER_MAX_BYTES} bytes")
    if field is None:
        return raw.decode("utf-8").strip()
    meta = json.loads(raw)
    if not isinstance(meta, dict) or meta.get(field) is None:
        raise LookupError(f"no {field!r} in .json")
    return meta[field]


def _is_label_member(ext: str, size: int) -> bool:
    """The members an index of a shard reads: small ones that may hold the label, never the images."""
    return ext not in IMAGE_KEYS and size <= LABEL_MEMBER_MAX_BYTES


class _ShardFaults(list):
    """The tar reader's shard faults (cut off, unreadable, bad member) as ReadErrors, to warn with the skipped
    samples (a :class:`~aimv2.data.sources.tar.FaultSink`)."""

    def fault(self, kind: str, where: str, what: str = "") -> None:
        self.append(ReadError(where, f"{kind}: {what}" if what else kind))


class ShardClassSamples(Dataset):
    """Labelled images from local webdataset shards, read at random positions (map-style).

    The shards are indexed once by the tar reader (:func:`~aimv2.data.sources.tar.shard_samples`), which loads only
    the small members that may hold the label: each sample is the :class:`~aimv2.data.sources.tar.MemberSpan` of
    its image member. A sample's image is the first of ``jpg, jpeg, png, webp`` it has, its label the ``label_key``
    member (``cls`` by default) or ``json:NAME``. Samples without an image or a label are left out and named in a
    :class:`SkippedSamplesWarning`; so is a shard that is cut off (the samples before the cut are kept).
    """

    def __init__(
        self,
        urls: str | os.PathLike | Sequence[str | os.PathLike],
        transform: Callable | None = None,
        *,
        label_key: str = "cls",
        classnames: Sequence[str] | None = None,
    ):
        self.urls = expand_urls(urls)
        remote = [u for u in self.urls if u.startswith("pipe:") or "://" in u]
        if remote:
            raise ValueError(f"probe shards must be local .tar files (read at random positions), got {remote[0]!r}")
        if not label_key or label_key == "json:":
            raise ValueError("label key must be a member extension (cls) or json:NAME")
        self.label_key, self.transform = label_key, transform
        entries: list[tuple[MemberSpan, str]] = []  # (image member, where)
        raw_labels: list = []
        skipped = _ShardFaults()
        for sample in shard_samples(self.urls, skipped, read=_is_label_member):
            where = f"{sample['__url__']}:{sample['__key__']}"
            image_key = next((k for k in IMAGE_KEYS if k in sample), None)
            if image_key is None:
                skipped.append(ReadError(where, f"no image member (has {member_names(sample)})"))
                continue
            try:
                value = _label_value(sample, label_key)
            except (LookupError, ValueError) as e:
                skipped.append(ReadError(where, f"no label: {e}"))
                continue
            raw_labels.append(value)
            entries.append((sample[image_key], f"{where}.{image_key}"))
        _warn_skipped(skipped, len(entries) + len(skipped), f"shards {urls}")
        if not entries:
            why = f" ({skipped[0]})" if skipped else ""
            raise ValueError(f"no labelled image in shards {urls!r}{why}; check --label-key (now {label_key!r})")
        self.entries = entries
        self.skipped = list(skipped)
        named = class_labels(raw_labels, classnames, f"shards {urls}")
        self.labels, self.classes, self.classes_named = named.labels, named.classes, named.named

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int):
        image, where = self.entries[index]
        return read_image(io.BytesIO(image.read()), self.transform, where), self.labels[index], index

    def fingerprint(self) -> list:
        shards = _file_stats(self.urls)
        # the labels (not the class names, which only label the report) and which samples were kept
        return [shards, self.label_key, len(self.entries), _digest(self.labels)]


def _file_stats(paths: Sequence[str]) -> list[tuple[str, int, int]]:
    """(resolved path, size, mtime_ns) per file: changes when a file is replaced or edited."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((str(Path(p).resolve()), st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((str(p), -1, -1))
    return out


def _digest(values: Sequence[int]) -> str:
    return hashlib.blake2b(np.asarray(values, dtype=np.int64).tobytes(), digest_size=16).hexdigest()


# --- Hugging Face datasets -----------------------------------------------------------------------------------------


def _load_hf(path: str):
    """A ``datasets.Dataset`` from a save_to_disk folder, or from .parquet / .arrow files (a file, folder or glob)."""
    try:
        import datasets
    except ImportError as e:
        raise MissingPackageError("Hugging Face dataset sources need the datasets package: pip install datasets") from e
    p = Path(path)
    if p.is_dir() and (p / "dataset_dict.json").is_file():
        splits = sorted(d.name for d in p.iterdir() if (d / "state.json").is_file())
        example = f", e.g. {p / splits[0]}" if splits else ""
        raise ValueError(
            f"{path!r} is a DatasetDict ({', '.join(splits) or 'no splits'}): pass one split's folder{example}"
        )
    if p.is_dir() and (p / "state.json").is_file():
        return datasets.load_from_disk(str(p))
    files = _hf_source_files(path)
    kinds = {Path(f).suffix for f in files}
    if not files or len(kinds) != 1 or not kinds <= set(HF_FILE_EXTENSIONS):
        raise ValueError(f"{path!r}: expected .parquet or .arrow files of one kind, found {files[:3] or 'none'}")
    if kinds == {".arrow"}:
        return datasets.concatenate_datasets([datasets.Dataset.from_file(f) for f in files])
    return datasets.Dataset.from_parquet(files)


def _hf_source_files(path: str) -> list[str]:
    """The .parquet / .arrow files a path names (none for a save_to_disk folder: its tables are the data)."""
    p = Path(path)
    if p.is_dir():
        return sorted(str(f) for f in p.iterdir() if f.suffix in HF_FILE_EXTENSIONS)
    return sorted(glob.glob(path))


class HFClassSamples(Dataset):
    """Labelled images from a local Hugging Face dataset (``image_column``, ``label_column``).

    Images are read undecoded (``datasets.Image(decode=False)``) and decoded by :func:`read_image`, so a corrupt
    one is a ``ReadError``. Rows with no image or no label are left out and named in a warning. Class names: the
    label column's ``ClassLabel`` names when it has them, else ``classnames``, else derived from the values.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        transform: Callable | None = None,
        *,
        image_column: str = "image",
        label_column: str = "label",
        classnames: Sequence[str] | None = None,
    ):
        import datasets

        self.path, self.transform = str(path), transform
        ds = _load_hf(self.path)
        self.source_files = [] if (Path(self.path) / "state.json").is_file() else _hf_source_files(self.path)
        missing = [c for c in (image_column, label_column) if c not in ds.column_names]
        if missing:
            raise ValueError(
                f"{self.path!r} has no column(s) {missing}; it has {ds.column_names} (use --image-column / "
                "--label-column)"
            )
        if isinstance(ds.features[image_column], datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        self.ds, self.image_column, self.label_column = ds, image_column, label_column
        feature = ds.features[label_column]
        values = list(ds[label_column])
        self.rows, raw, skipped = [], [], []
        for i, v in enumerate(values):
            if v is None or (isinstance(v, int) and v < 0 and isinstance(feature, datasets.ClassLabel)):
                skipped.append(ReadError(f"{self.path} row {i}", f"no label in {label_column!r}"))
            else:
                self.rows.append(i)
                raw.append(v)
        _warn_skipped(skipped, len(values), repr(self.path))
        if not self.rows:
            raise ValueError(f"{self.path!r} has no labelled rows (column {label_column!r})")
        self.skipped = skipped
        if isinstance(feature, datasets.ClassLabel):
            self.labels, self.classes = [int(v) for v in raw], list(feature.names)
            self.classes_named = True
        else:
            named = class_labels(raw, classnames, repr(self.path))
            self.labels, self.classes, self.classes_named = named.labels, named.classes, named.named

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        row = self.rows[index]
        where = f"{self.path} row {row}"
        try:
            source = image_source(self.ds[row][self.image_column])
        except Exception as e:
            return ReadError(where, f"{type(e).__name__}: {e}"), self.labels[index], index
        if not hasattr(source, "mode"):  # bytes or a path: the common decode path
            return read_image(source, self.transform, where), self.labels[index], index
        try:  # an already decoded PIL image
            image = to_rgb(source)
            return (self.transform(image) if self.transform else image), self.labels[index], index
        except Exception as e:
            return ReadError(where, f"{type(e).__name__}: {e}"), self.labels[index], index

    def fingerprint(self) -> list:
        # the files given (parquet: the source, not the library's arrow cache of it), else the tables read
        files = _file_stats(self.source_files or [f["filename"] for f in self.ds.cache_files])
        data = files or self.ds._fingerprint  # in-memory tables: the library's own content fingerprint
        return [data, self.image_column, self.label_column, _digest(self.rows), _digest(self.labels)]


# --- detection -----------------------------------------------------------------------------------------------------


def source_kind(spec: str) -> str:
    """``"folder"``, ``"shards"`` or ``"hf"`` for a --train/--val value; ValueError naming what was expected."""
    s = str(spec)
    if ("{" in s and "}" in s) or "::" in s or s.endswith(".tar"):
        return "shards"
    if s.endswith(HF_FILE_EXTENSIONS):
        return "hf"
    p = Path(s)
    if "*" in s:
        matches = glob.glob(s)
        if matches and all(m.endswith(".tar") for m in matches):
            return "shards"
        if matches and all(m.endswith(HF_FILE_EXTENSIONS) for m in matches):
            return "hf"
        raise ValueError(f"{s!r} matches {len(matches)} file(s), not .tar or .parquet/.arrow files; {EXPECTED}")
    if not p.exists():
        raise FileNotFoundError(f"{s!r} does not exist; {EXPECTED}")
    if p.is_file():
        raise ValueError(f"{s!r} is a {p.suffix or 'extensionless'} file; {EXPECTED}")
    if (p / "state.json").is_file() or (p / "dataset_dict.json").is_file():
        return "hf"
    names = [e.name for e in os.scandir(p) if not e.name.startswith(".")]
    if any(n.endswith(".tar") for n in names):
        return "shards"
    if any(n.endswith(HF_FILE_EXTENSIONS) for n in names):
        return "hf"
    if any((p / n).is_dir() for n in names):
        return "folder"
    loose = [n for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    found = f"{len(loose)} images" if loose else "nothing" if not names else "no images"
    raise ValueError(f"{s!r} has no class sub-folders, shards or dataset files (it holds {found}); {EXPECTED}")


def open_labeled_source(
    spec: str | os.PathLike,
    transform: Callable | None = None,
    *,
    label_key: str = "cls",
    classnames: Sequence[str] | None = None,
    image_column: str = "image",
    label_column: str = "label",
) -> Dataset:
    """The labelled source at ``spec`` (kind detected by :func:`source_kind`), samples transformed by ``transform``."""
    kind = source_kind(str(spec))
    if kind == "folder":
        ds = ImageFiles.from_class_folders(spec, transform)
        ds.classes_named = True
        if classnames is not None:  # folders are named by the file: their labels follow its order
            relabel = folder_labels(ds.classes, classnames, repr(str(spec)))
            ds.labels = [relabel[label] for label in ds.labels]
            ds.classes = list(classnames)  # names the file has and the folder lacks just have no image here
        return ds
    if kind == "shards":
        return ShardClassSamples(spec, transform, label_key=label_key, classnames=classnames)
    return HFClassSamples(spec, transform, image_column=image_column, label_column=label_column, classnames=classnames)


def align_classes(train: Dataset, val: Dataset) -> list[str]:
    """The class list train and val share; ValueError naming the differences if they do not.

    Integer labels without names (``"0" .. "max"``) only need the same count: a val set that lacks the highest
    classes is extended to train's list (and the reverse)."""
    if not getattr(train, "classes_named", True) and not getattr(val, "classes_named", True):
        longer = max(train.classes, val.classes, key=len)
        train.classes, val.classes = list(longer), list(longer)
        return list(longer)
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        if not only_train and not only_val:
            raise ValueError("train and val name the same classes in a different order (use --classnames)")
        raise ValueError(
            "train and val have different classes: "
            f"only in train: {only_train[:10] or 'none'}; only in val: {only_val[:10] or 'none'}"
        )
    return list(train.classes)


# --- augmented views -----------------------------------------------------------------------------------------------


class AugmentedViews(Dataset):
    """``views`` randomly augmented copies of every sample of ``dataset``, through ``transform`` instead of its own.

    Sample ``i`` is view ``i // n`` of image ``i % n`` (``n = len(dataset)``); its random draws (crop, flip) come
    from torch's RNG seeded by ``(seed, view, image)``, so the views are the same on every run and worker layout.
    Returns ``(image, label, i)``; ``i % n`` is the source index.
    """

    def __init__(self, dataset: Dataset, transform: Callable, views: int, seed: int = 0):
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        self.base = copy.copy(dataset)
        self.base.transform = transform
        self.transform, self.views, self.seed = transform, views, seed
        self.classes = getattr(dataset, "classes", None)

    def __len__(self) -> int:
        return self.views * len(self.base)

    def __getitem__(self, index: int):
        view, i = divmod(index, len(self.base))
        state = np.random.SeedSequence([self.seed, 7, view, i]).generate_state(1)[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(state))
            image, label, _ = self.base[i]
        return image, label, index
