"""Apple's published AIMv2 checkpoints, as data: the name a user types -> the Hugging Face repository that holds it.

Every row is one repository under ``apple/`` on the Hub. ``model`` is the encoder the weights fit in our registry
(``models/registry.py``), so ``create_model(name, pretrained=True)`` can check the download against it; the
distilled checkpoints share the architecture of their plain twins. ``revision`` pins a commit when set; None
follows the repository's ``main`` branch (a user pins one with ``revision=`` or ``hf:REPO@REV``).

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
    revision: str | None = None  # a pinned commit; None: the main branch
    mean_std: str = "clip"  # the normalization of the repository's preprocessor_config.json


def _encoders() -> list[Release]:
    rows = [
        Release(f"aimv2-{size}-patch14-{res}", f"apple/aimv2-{size}-patch14-{res}", f"aimv2-{size}-patch14-{res}")
        for size in ("large", "huge", "1B", "3B")
        for res in (224, 336, 448)
    ]
    rows.append(Release("aimv2-large-patch14-native", "apple/aimv2-large-patch14-native", "aimv2-large-patch14-native"))
    for res in (224, 336):
        name = f"aimv2-large-patch14-{res}-distilled"
        rows.append(Release(name, f"apple/{name}", f"aimv2-large-patch14-{res}"))
    return rows


RELEASES: dict[str, Release] = {
    r.name: r
    for r in (
        *_encoders(),
        Release("aimv2-large-patch14-224-lit", "apple/aimv2-large-patch14-224-lit", "aimv2-large-patch14-224", "lit"),
    )
}

# The files a checkpoint folder needs (the loaders and zero-shot read them); nothing else in a repository
# (README, images, remote code) is fetched.
CHECKPOINT_FILES = (
    "config.json",
    "preprocessor_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",  # the LiT text tower's
)
