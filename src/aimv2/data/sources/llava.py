"""LLaVA's conversation files: a JSON list (or JSON lines) of records, images from a folder.

    {"image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."},
                       {"from": "human", "value": "What feature can be seen on the back of the bus?"}, ...]}

``image`` is relative to the image folder. ``from`` is human or gpt (LLaVA's files also use user / assistant, and
a leading system turn, which become the chat roles of the same names). The first human turn holds ``<image>``; a
record without it gets the placeholder put in front of its first human turn, as LLaVA's loader does. Images are
resized (squashed) to the model's input size: the synthetic scenes are square, and real photos are better
letterboxed beforehand by whoever prepares the folder, to the aspect ratio the tiling grid has.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..transforms import to_rgb

IMAGE_TOKEN = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def read_llava(path: str | os.PathLike) -> list[dict]:
    """The records of a LLaVA JSON list or a JSON-lines file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: give a LLaVA conversation file (a JSON list of records)")
    text = path.read_text()
    records = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x]
    for i, r in enumerate(records):
        if "conversations" not in r or not r["conversations"]:
            raise ValueError(f"{path}: record {i} has no 'conversations' list")
    return records


def to_messages(record: dict) -> list[dict]:
    """A record's conversation as chat messages ``{"role", "content"}``, with exactly one ``<image>``."""
    messages = []
    for turn in record["conversations"]:
        role = ROLES.get(turn["from"])
        if role is None:
            raise ValueError(f"unknown speaker {turn['from']!r}: LLaVA records use human and gpt")
        messages.append({"role": role, "content": turn["value"]})
    n = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if n > 1:
        raise ValueError(f"a record has {n} {IMAGE_TOKEN} placeholders; one image per conversation is supported")
    if n == 0:
        first = next(m for m in messages if m["role"] == "user")
        first["content"] = f"{IMAGE_TOKEN}\n{first['content']}"
    return messages


def image_tensor(img: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """An image of any mode as uint8 [3, H, W] at ``size`` (H, W)."""
    img = to_rgb(img)
    if img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1)))


class LlavaConversations(Dataset):
    """``ds[i]`` = (uint8 image [3, H, W] at ``size``, chat messages) of record ``i`` of a LLaVA file."""

    def __init__(self, json_path: str | os.PathLike, images: str | os.PathLike, size: tuple[int, int]):
        self.records, self.root, self.size = read_llava(json_path), Path(images), size
        missing = [r["image"] for r in self.records[:100] if not (self.root / r.get("image", "")).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} image(s) of the first 100 records not in {self.root}: {missing[0]}"
            )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        r = self.records[i]
        with Image.open(self.root / r["image"]) as img:
            return image_tensor(img, self.size), to_messages(r)
