"""Zero-shot classification with a LiT model: an image folder (one sub-folder per class), class names, prompts.

Each class is embedded by its prompt ensemble, CLIP's recipe: every template filled with the class name, each
prompt embedded and L2-normalized, the mean over templates normalized again. An image's class is the one whose
embedding has the highest cosine with the image's embedding (both are unit vectors, so the dot product). The text
side is batched over all prompts; the image side streams the folder through ``extract_features`` (same loader,
unreadable-file handling and bf16 option as the probes).
"""

from __future__ import annotations

import os
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.sources.folders import ImageFiles
from ..data.tokenizer import Tokenizer, UnknownSpecialToken
from ..data.transforms import eval_transform
from ..errors import DataError
from ..objectives.lit import LiT, LiTTower
from ..weights import read_lit
from .features import DTYPES, default_device, extract_features
from .probe import topk_accuracy

# CLIP-style defaults; real data wants the dataset's own templates (--templates).
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a {}.",
)


def read_templates(path: str | os.PathLike) -> list[str]:
    """One template per line with ``{}`` where the class name goes; blank lines and ``#`` comments skipped."""
    templates = []
    for number, line in enumerate(open(path, encoding="utf-8"), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if _fields(line) != [""]:  # str.format would fail on it, or put the name in more than one place
            raise DataError(
                f"template {line!r} needs exactly one {{}} for the class name ({path}, line {number}); write "
                "other braces doubled, {{ and }}"
            )
        templates.append(line)
    if not templates:
        raise DataError(f"no templates ({path}); write one per line, e.g. 'a photo of a {{}}.'")
    return templates


def _fields(template: str) -> list[str] | None:
    """The replacement fields of a str.format template ('' for each {}), or None if it does not parse."""
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError:  # a single { or }
        return None


@dataclass
class LitClassifier:
    """A LiT model ready for zero-shot: its text tokenizer and the pixel normalization it was trained with."""

    model: LiT
    tokenizer: Tokenizer
    mean_std: str


def load_lit_classifier(
    source: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None, mean_std: str | None = None
) -> LitClassifier:
    """The LiT model at ``source`` (a LiT run folder, our lit.safetensors, Apple's LiT file or a transformers
    Aimv2Model folder), its tokenizer (``tokenizer``, else the run folder's tokenizer.json) and normalization
    (``mean_std``, else what the run trained with; clip for Apple's and transformers' files)."""
    ckpt = read_lit(source)
    model = ckpt.build()
    tok = lit_tokenizer(model, ckpt.source, tokenizer)  # the local folder, also of a Hub download
    mean_std = mean_std or ckpt.metadata.get("mean_std") or ("imagenet" if ckpt.layout == "aimv2" else "clip")
    return LitClassifier(model, tok, mean_std)


def lit_tokenizer(model: LiT, source: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer of the LiT model read from ``source``: ``tokenizer``, else the tokenizer.json next to it.
    ValueError when there is none, or when it ends captions with another eos id than the one the model pools at."""
    source = Path(source)
    path = Path(tokenizer) if tokenizer else None
    if path is None:
        folder = source if source.is_dir() else source.parent
        if (folder / "tokenizer.json").is_file():
            path = folder / "tokenizer.json"
    if path is None:
        raise ValueError(f"no tokenizer.json next to {source}; pass --tokenizer FILE")
    length = model.cfg.text.context_length
    try:
        tok = Tokenizer.from_file(path, context_length=length)
    except UnknownSpecialToken as e:
        if e.what != "pad":
            raise
        # a file that names no pad token (CLIP's): pad with the eos token, since the text tower pools at the first
        # eos and, being causal, never reads what follows it
        from tokenizers import Tokenizer as HFTokenizer

        eos = HFTokenizer.from_file(str(path)).id_to_token(model.cfg.text.eos_id)
        if eos is None:
            raise
        tok = Tokenizer.from_file(path, context_length=length, pad_token=eos)
    if tok.eos_id != model.cfg.text.eos_id:
        raise ValueError(
            f"{path} ends captions with id {tok.eos_id} but the model pools at eos id {model.cfg.text.eos_id}"
        )
    return tok


@torch.no_grad()
def class_embeddings(
    model: LiT,
    tokenizer,
    classes: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    device: torch.device | str | None = None,
    batch_size: int = 512,
    dtype: str = "fp32",
) -> torch.Tensor:
    """Unit-norm prompt-ensemble embedding of each class: float32 [C, P]."""
    device = next(model.parameters()).device if device is None else torch.device(device)
    prompts = [t.format(c) for c in classes for t in templates]  # [C*K], class-major
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = tokenizer.encode(prompts[i : i + batch_size]).to(device)  # [b, T]
        with torch.autocast(device.type, dtype=DTYPES[dtype], enabled=DTYPES[dtype] is not None):
            out.append(model.encode_text(ids).float())  # [b, P], unit norm
    emb = torch.cat(out).view(len(classes), len(templates), -1)  # [C, K, P]
    return F.normalize(emb.mean(dim=1), dim=-1)  # [C, P]


def zeroshot_classify(
    model: LiT,
    tokenizer,
    images: str | os.PathLike,
    *,
    classnames: Sequence[str] | None = None,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    batch_size: int = 128,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    dtype: str = "fp32",
    mean_std: str | tuple = "imagenet",
    progress: bool | None = None,
) -> dict:
    """Classify ``images`` (one sub-folder per class) by cosine with the class prompt embeddings.

    Returns top1 / top5 (percent), per-class top-1 (percent, by folder name), chance (percent), n, classes, names,
    and the tensors behind them: image_embeds [N, P], class_embeds [C, P], scores [N, C], labels [N].
    """
    device = default_device() if device is None else torch.device(device)
    model = model.to(device).eval()
    ds = ImageFiles.from_class_folders(images, transform=eval_transform(model.cfg.encoder.image_hw))
    folders = list(ds.classes)
    names = list(classnames) if classnames is not None else folders
    if len(names) != len(folders):
        raise ValueError(f"{len(names)} class names for {len(folders)} class folders")
    text = class_embeddings(model, tokenizer, names, templates, device, dtype=dtype).cpu()  # [C, P]
    feats = extract_features(
        LiTTower(model, "image"),  # extract_features calls its model on pixels: LiT image embeddings [B, P]
        ds,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        dtype=dtype,
        mean_std=mean_std,
        progress=progress,
        desc="zero-shot",
    )
    img = F.normalize(feats["features"], dim=-1)  # [N, P] (bf16 embeddings renormalized in fp32)
    labels = feats["labels"]  # [N]
    scores = img @ text.t()  # [N, C] cosine similarities
    acc = topk_accuracy(scores, labels, ks=(1, 5))
    pred = scores.argmax(dim=1)
    per_class = {}
    for c, name in enumerate(folders):
        sel = labels == c
        per_class[name] = 100.0 * (pred[sel] == c).float().mean().item() if sel.any() else float("nan")
    return {
        "top1": acc["top1"],
        "top5": acc.get("top5", 100.0),  # fewer than 5 classes: every label is in the top 5
        "chance": 100.0 / len(folders),
        "n": int(labels.numel()),
        "classes": folders,
        "names": names,
        "per_class": per_class,
        "image_embeds": img,
        "class_embeds": text,
        "scores": scores,
        "labels": labels,
    }
