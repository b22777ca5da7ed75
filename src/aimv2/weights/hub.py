"""Fetching published weights from the Hugging Face Hub into its cache, by release name or ``hf:REPO[@REV]``.

``huggingface_hub`` does the work: ``snapshot_download`` into its cache (``HF_HUB_CACHE``, shared with
transformers and timm, so a checkpoint already downloaded by either is not fetched again), honouring
``HF_HUB_OFFLINE`` and ``revision`` pinning. What comes back is a local folder (config.json + safetensors) that
the loaders read like any transformers folder; nothing is unpickled, and only :data:`CHECKPOINT_FILES` are
fetched. Every failure becomes one :class:`CheckpointError` line that says what to do.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CheckpointError
from .released import CHECKPOINT_FILES, RELEASES, Release

HF_PREFIX = "hf:"


def release(name: str, kind: str | None = None) -> Release:
    """The published checkpoint ``name``; an unknown one is an error listing the names there are."""
    r = RELEASES.get(name)
    if r is None or (kind is not None and r.kind != kind):
        names = ", ".join(n for n, x in RELEASES.items() if kind is None or x.kind == kind)
        raise CheckpointError(f"no published {kind or 'AIMv2'} checkpoint named {name!r}; there are: {names}")
    return r


def is_hub_spec(spec: str | os.PathLike) -> bool:
    """``hf:owner/name`` or ``hf:owner/name@revision``."""
    return str(spec).startswith(HF_PREFIX)


def parse_hub_spec(spec: str) -> tuple[str, str | None]:
    """``hf:apple/aimv2-large-patch14-224@abc123`` -> (``apple/aimv2-large-patch14-224``, ``abc123``)."""
    repo, at, revision = str(spec).removeprefix(HF_PREFIX).partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")) or (at and not revision.strip()):
        raise CheckpointError(f"{spec!r}: expected hf:OWNER/NAME or hf:OWNER/NAME@REVISION")
    return repo, revision or None


def download(repo: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local folder of ``repo`` at ``revision`` (None: main) in the Hub cache, downloaded if it is not there.

    With ``HF_HUB_OFFLINE=1`` only the cache is read. Each failure is one line: offline and not cached, no such
    repository or revision, gated, or the Hub out of reach.
    """
    from huggingface_hub import constants, errors, snapshot_download

    at = f"{repo}@{revision}" if revision else repo
    fetch_command = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
    try:
        folder = snapshot_download(repo, revision=revision, cache_dir=cache_dir, allow_patterns=list(CHECKPOINT_FILES))
    except errors.LocalEntryNotFoundError as e:
        if constants.is_offline_mode():
            raise CheckpointError(
                f"{at} is not in the Hugging Face cache ({cache_dir or constants.HF_HUB_CACHE}) and "
                f"HF_HUB_OFFLINE is set: download it once online ({fetch_command}), or unset HF_HUB_OFFLINE"
            ) from e
        raise CheckpointError(f"{at}: the Hub cannot be reached and it is not cached: check the network ({e})") from e
    except errors.GatedRepoError as e:
        raise CheckpointError(f"{at} is gated: accept its terms on huggingface.co and log in (hf auth login)") from e
    except errors.RepositoryNotFoundError as e:
        raise CheckpointError(
            f"no Hugging Face repository {repo!r} (or it is private: log in with hf auth login)"
        ) from e
    except errors.RevisionNotFoundError as e:
        raise CheckpointError(f"{repo} has no revision {revision!r}") from e
    except errors.HfHubHTTPError as e:
        raise CheckpointError(f"{at}: the Hub answered {e}") from e
    return Path(folder)


def fetch_release(name: str, kind: str | None = None, revision: str | None = None) -> tuple[Release, Path]:
    """The published checkpoint ``name`` and its local folder (``revision`` over the table's pin)."""
    r = release(name, kind)
    return r, download(r.repo, revision or r.revision)


def fetch_spec(spec: str) -> Path:
    """The local folder of an ``hf:REPO[@REV]`` spec."""
    return download(*parse_hub_spec(spec))
