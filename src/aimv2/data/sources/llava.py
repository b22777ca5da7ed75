"""LLaVA's conversation files: a JSON list (or JSON lines) of records, images from a folder.

    {"image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."},
                       {"from": "human", "value": "What feature can be seen on the back of the bus?"}, ...]}

``image`` is relative to the image folder; a record without ``image`` is a text-only sample (LLaVA's mixes hold
some), trained without image tokens. ``from`` is human or gpt (LLaVA's files also use user / assistant, and a
leading system turn, which become the chat roles of the same names). The first human turn holds ``<image>``; a
record with an image but without the tag gets the placeholder put in front of its first human turn, as LLaVA's
loader does; more than one tag is refused (one image per conversation).

Structure is checked when the file is read (aimv2.data.records: file, record and key named; the run stops before
its first step). Content is not: an image that is missing or does not decode is skipped and counted
(``no_image``, ``bad_image``; aimv2.data.faults), the file named in the warning, and the reader stops only past
``max_fault_rate``. Images are resized (squashed) to the model's input size: the synthetic scenes are square, and
real photos are better letterboxed beforehand by whoever prepares the folder, to the aspect ratio the tiling grid
has.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ...errors import DataError
from ..faults import FaultCounter
from ..records import RecordAt, RecordError, field, read_json_records
from ..transforms import to_rgb

IMAGE_TOKEN = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
WHAT = "a LLaVA conversation file (a JSON list of records with 'conversations')"
FIX = 'give each record "conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]'


def read_llava(path: str | os.PathLike) -> list[dict]:
    """The records of a LLaVA JSON list or a JSON-lines file, each checked (:func:`check_record`)."""
    records = read_json_records(path, WHAT)
    for i, r in enumerate(records):
        check_record(r, RecordAt(path, "", i))
    return records


def check_record(record, where: RecordAt) -> None:
    """A LLaVA record's structure: a non-empty ``conversations`` list of ``{"from", "value"}`` turns from known
    speakers, the first (system turns aside) a human one; ``image`` a string when present; at most one
    ``<image>``. A :class:`RecordError` names file, record and key."""
    turns = field(record, "conversations", list, where=where, fix=FIX)
    if not turns:
        raise RecordError(f"'conversations' is an empty list ({where}); {FIX}")
    field(record, "image", str, where=where, fix="give the image path relative to the image folder", optional=True)
    for t, turn in enumerate(turns):
        at = RecordAt(where.file, where.section, where.index)
        speaker = field(turn, "from", str, where=at, fix=f"turn {t}: {FIX}")
        field(turn, "value", str, where=at, fix=f"turn {t}: {FIX}")
        if speaker not in ROLES:
            raise RecordError(
                f"unknown speaker {speaker!r} in turn {t} ({where}); LLaVA records use human and gpt (or user, "
                "assistant, system)"
            )
    first = next((ROLES[t["from"]] for t in turns if ROLES[t["from"]] != "system"), None)
    if first != "user":
        raise RecordError(f"the conversation does not start with a human turn ({where}); {FIX}")
    n = sum(t["value"].count(IMAGE_TOKEN) for t in turns)
    if n > 1:
        raise RecordError(
            f"{n} {IMAGE_TOKEN} placeholders in one conversation ({where}); one image per conversation is supported: "
            "split the record"
        )


def to_messages(record: dict) -> list[dict]:
    """A record's conversation as chat messages ``{"role", "content"}``: with exactly one ``<image>`` when the
    record has an image (or no ``image`` key but a tag), none for a text-only record."""
    messages = [{"role": ROLES[t["from"]], "content": t["value"]} for t in record["conversations"]]
    n = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if n > 1:
        raise RecordError(f"a record has {n} {IMAGE_TOKEN} placeholders; one image per conversation is supported")
    if n == 0 and "image" in record:
        first = next(m for m in messages if m["role"] == "user")
        first["content"] = f"{IMAGE_TOKEN}\n{first['content']}"
    return messages


def has_answer(record: dict) -> bool:
    """Whether a record has a gpt turn after its first human turn (something to learn)."""
    roles = [ROLES[t["from"]] for t in record["conversations"]]
    return "user" in roles and "assistant" in roles[roles.index("user") :]


def image_tensor(img: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """An image of any mode as uint8 [3, H, W] at ``size`` (H, W)."""
    img = to_rgb(img)
    if img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1)))


class LlavaConversations(Dataset):
    """``ds[i]`` = (uint8 image [3, H, W] at ``size``, chat messages) of record ``i`` of a LLaVA file; a text-only
    record gives a black image (no ``<image>`` in its messages: the model adds no image tokens).
    :meth:`get_item` gives ``None`` for a record whose image is missing or unreadable, counted in :attr:`faults`."""

    def __init__(
        self, json_path: str | os.PathLike, images: str | os.PathLike, size: tuple[int, int], max_fault_rate=0.5
    ):
        self.records, self.root, self.size = read_llava(json_path), Path(images), size
        self.json_path = Path(json_path)
        self.faults = FaultCounter(max_rate=max_fault_rate)
        with_image = [r["image"] for r in self.records[:100] if "image" in r]
        if not self.root.is_dir():
            raise DataError(f"image folder not found ({self.root}); give the folder the records' image paths are "
                            "relative to")  # fmt: skip
        if with_image and not any((self.root / p).is_file() for p in with_image):
            raise DataError(
                f"none of the {len(with_image)} images of the first records is in the image folder ({self.root}; "
                f"first: {with_image[0]}); give the folder the records' image paths are relative to"
            )

    def __len__(self) -> int:
        return len(self.records)

    def describe(self, i: int) -> str:
        return f"record {i} of {self.json_path}"

    def get_item(self, i: int):
        """(image, messages) of record ``i``, or ``None`` after counting why its image cannot be read."""
        r = self.records[i]
        if "image" not in r:
            self.faults.ok()
            return torch.zeros(3, *self.size, dtype=torch.uint8), to_messages(r)
        path = self.root / r["image"]
        where = f"{path} ({self.describe(i)})"
        try:
            with Image.open(path) as img:
                img.load()  # decode now, inside the try: truncated files fail here
                image = image_tensor(img, self.size)
        except FileNotFoundError:
            self.faults.fault("no_image", where, "file not found")
            return None
        except Exception as e:  # any decoder error means "this file is unreadable"
            self.faults.fault("bad_image", where, f"{type(e).__name__}: {e}")
            return None
        self.faults.ok()
        return image, to_messages(r)

    def __getitem__(self, i: int):
        item = self.get_item(i)
        if item is None:
            raise FileNotFoundError(2, "LLaVA image missing or unreadable", str(self.root / self.records[i]["image"]))
        return item
