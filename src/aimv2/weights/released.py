"""Apple's published AIMv2 checkpoints, as data: the name a user types -> the Hugging Face repository that holds it.

Every row is one repository under ``apple/`` on the Hub. ``model`` is the encoder the weights fit in our registry
(``models/registry.py``), so ``create_model(name, pretrained=True)`` can check the download against it; the
distilled checkpoints share the architecture of their plain twins.

``revision`` pins the commit a name resolves to, so that the same name gives the same weights for everyone. The
pins (:data:`PINNED`) are the repositories' commits of November 2024, Apple's own upload: ``model.safetensors`` in
Apple's key layout (``preprocessor.*``, ``trunk.*``) with its ``config.json`` and ``preprocessor_config.json``,
which the loaders read as they read any Apple file. The repositories have since gained commits (licence files
and, for several, the weights saved again in transformers' layout); a pin keeps the files as first published.
Every row is pinned: the last four pins (huge-336, 3B-336, large-224-distilled and the LiT model) came later
than the others. 3B-336's is the commit named in apple/ml-aim issue #37 as the one holding Apple's layout; LiT's
is the commit on the repository's ``refs/pr/3``, merged into main. (Apple's inference code, apple/ml-aim's
``aim/v2/utils.py`` since August 2025, pins other commits of the same repositories, for the weights file only.)
A caller pins any row with ``create_model(name, pretrained=True, revision=COMMIT)`` or
``hf:apple/NAME@COMMIT``; ``hf:REPO`` without ``@`` is the repository's ``main``, not the table's pin.

``mean_std`` is the normalization of the repository's ``preprocessor_config.json`` (CLIP's, for every release),
and what :func:`aimv2.weights.preprocessing` uses for these weights.
"""

from __future__ import annotations

from typing import NamedTuple


class Release(NamedTuple):
    """One published checkpoint."""

    name: str  # what a user types: aimv2-large-patch14-224, aimv2-large-patch14-224-lit, ...
    repo: str  # the Hub repository
    model: str  # the registry name of the encoder the weights fit
    kind: str = "encoder"  # encoder | lit
    revision: str | None = None  # the pinned commit (40 hex digits); None: the main branch
    mean_std: str = "clip"  # the normalization of the repository's preprocessor_config.json


# name -> the full commit hash its repository is pinned to (Apple's November 2024 upload): every release
PINNED: dict[str, str] = {
    "aimv2-large-patch14-224": "b31a84b903ef9d2393dffc59c76ae82ecc4ff4f9",
    "aimv2-large-patch14-336": "5919ff9dcc15ecd48b8557aed04339ee19c422ad",
    "aimv2-large-patch14-448": "f7deaa668dc3709358725c0b02032c3d573892f2",
    "aimv2-huge-patch14-224": "580ab4ba21146b5e7f9e12a7aff53e36b580a58a",
    "aimv2-huge-patch14-448": "6299ef9222c228455b4c6a1b330dccd291aff1f6",
    "aimv2-1B-patch14-224": "91dfa32e24501567d1bd6be8f186d4c380ff3072",
    "aimv2-1B-patch14-336": "ee7e6393c186278f9052e95ad308d86e3b358bf7",
    "aimv2-1B-patch14-448": "95d52da01af28b509e13c551e08f0cbefdddc2d4",
    "aimv2-3B-patch14-224": "35502623abfa801144a673774a225febf2aedc59",
    "aimv2-3B-patch14-448": "e89f6519d77c23399299719d8f7e113e184ca0ed",
    "aimv2-large-patch14-native": "df5cf3a3f388283b723e4e3f71eff8f69c154f1a",
    "aimv2-large-patch14-336-distilled": "7a8d3fc16023fdbab6b991c20e19152115fef878",
    "aimv2-huge-patch14-336": "c627d45c27600a0fa67d2f7f2d5aefd40fe1baec",
    "aimv2-3B-patch14-336": "c92f718c6ebf8eb2fe6ccc3ca4a32d59d94e1602",
    "aimv2-large-patch14-224-distilled": "a364abd6d7340b794ce9030b42e3d449d7e47230",
    "aimv2-large-patch14-224-lit": "fb574928240d6acf48aaee63ef759a26a2c1ce4a",
}


def _release(name: str, model: str, kind: str = "encoder") -> Release:
    return Release(name, f"apple/{name}", model, kind, PINNED.get(name))


def _encoders() -> list[Release]:
    rows = [
        _release(f"aimv2-{size}-patch14-{res}", f"aimv2-{size}-patch14-{res}")
        for size in ("large", "huge", "1B", "3B")
        for res in (224, 336, 448)
    ]
    rows.append(_release("aimv2-large-patch14-native", "aimv2-large-patch14-native"))
    for res in (224, 336):
        rows.append(_release(f"aimv2-large-patch14-{res}-distilled", f"aimv2-large-patch14-{res}"))
    return rows


RELEASES: dict[str, Release] = {
    r.name: r for r in (*_encoders(), _release("aimv2-large-patch14-224-lit", "aimv2-large-patch14-224", "lit"))
}

# The files a checkpoint folder needs (the loaders and zero-shot read them); nothing else in a repository
# (README, images, remote code, and Apple's mlx_model.safetensors, a second copy of the weights for MLX) is fetched.
CHECKPOINT_FILES = (
    "config.json",
    "preprocessor_config.json",
    "model.safetensors",
    "model-*.safetensors",  # a sharded checkpoint's shards
    "model.safetensors.index.json",
    "tokenizer.json",  # the LiT text tower's
)
