"""Config files written before ``optim.weight_decay`` changed meaning, and how they are read today.

Version 1 (a file without ``config_version``): ``optim.weight_decay`` was Apple's fully decoupled decay,
p <- p * (1 - wd * lr_t / lr_peak), so 1e-4 was the paper's value and the 0.05 of most AdamW recipes shrank every
weight by 5% a step. Version 2: ``optim.weight_decay`` is torch AdamW's (p <- p * (1 - lr_t * wd), as in timm and
the paper's wording) and the decoupled decay is ``optim.decoupled_weight_decay``. Every saved ``config.yaml`` and
every shipped config carries ``config_version: 2``.

An unmarked file that sets ``optim.weight_decay`` is read by where it lies:

- a run folder's ``config.yaml`` (next to its checkpoints or metrics, or in the folder its ``out_dir`` names) is
  *migrated*: the value moves to ``optim.decoupled_weight_decay``, the meaning it was trained with, and a line says
  so once. The run resumes, converts and evaluates as before; its next save writes version 2.
- any other file (one a user wrote) is *refused* with the two lines that could be meant. Guessing is what the
  change is against: the same ``0.05`` is a sane AdamW value and a ruinous decoupled one, and an old file's
  ``1e-4`` is the paper's decoupled decay but a thousandth of it in AdamW's convention.

An unmarked file that does not set ``optim.weight_decay`` needs no marker: it gets the default, 0.1 in AdamW's
convention, which is the previous default (1e-4 decoupled) at the default lr 1e-3; at another ``optim.lr`` a line
says that the default decay now differs from the old one (1e-4 / lr then).
"""

from __future__ import annotations

import logging
from pathlib import Path

from .checks import MAX_DECAY_PER_STEP, ConfigError
from .schema import CONFIG_VERSION, DEFAULT_WEIGHT_DECAY, OptimConfig

log = logging.getLogger(__name__)

VERSION_KEY = "config_version"
_logged: set[str] = set()  # files whose migration was already reported in this process


def _say_once(path: Path, message: str) -> None:
    key = f"{path.resolve()}:{message}"
    if key not in _logged:
        _logged.add(key)
        log.warning(message)


def is_run_config(path: Path, data: dict) -> bool:
    """Whether ``path`` is a run folder's own config.yaml (written by training, not by a user)."""
    if path.name != "config.yaml":
        return False
    folder = path.parent
    out_dir = data.get("out_dir")
    named = isinstance(out_dir, str) and Path(out_dir).resolve() == folder.resolve()
    return named or (folder / "checkpoints").is_dir() or (folder / "metrics.jsonl").is_file()


def upgrade(data: dict, path: Path | None) -> bool:
    """Bring the mapping read from ``path`` to the current version, in place (the marker is removed).

    Returns True when it was a version-1 run config whose weight decay was migrated: its value was checked by the
    run that wrote it, so the sanity bound on the decay (checks.py) does not refuse it now."""
    version = data.pop(VERSION_KEY, 1)
    if version not in range(1, CONFIG_VERSION + 1) or isinstance(version, bool):
        raise ConfigError(
            f"{path}: {VERSION_KEY}={version!r} is not a config version this aimv2 reads (1 to {CONFIG_VERSION}); "
            f"a newer version wrote it, or set {VERSION_KEY}: {CONFIG_VERSION}"
        )
    optim = data.get("optim")
    if version == CONFIG_VERSION or path is None or not isinstance(optim, dict):
        return False
    if "weight_decay" not in optim or "decoupled_weight_decay" in optim:
        lr = optim.get("lr")
        if "decoupled_weight_decay" not in optim and lr is not None and float(lr) != OptimConfig.lr:
            _say_once(
                path,
                f"{path}: the default weight decay is now optim.weight_decay={DEFAULT_WEIGHT_DECAY} (AdamW's "
                f"convention); before {VERSION_KEY} {CONFIG_VERSION} it was optim.decoupled_weight_decay=0.0001, "
                f"which at optim.lr={lr} is weight_decay={1e-4 / float(lr):.3g}; add {VERSION_KEY}: {CONFIG_VERSION} "
                "to the file to silence this",
            )
        return False
    wd = optim["weight_decay"]
    if is_run_config(path, data):
        optim["decoupled_weight_decay"], optim["weight_decay"] = wd, None
        _say_once(
            path,
            f"{path}: written before {VERSION_KEY} {CONFIG_VERSION}: its optim.weight_decay={wd} is read as "
            f"optim.decoupled_weight_decay={wd} (what it meant then); the next save writes the new form",
        )
        return True
    lr = float(optim.get("lr", OptimConfig.lr))
    if float(wd) > MAX_DECAY_PER_STEP["decoupled_weight_decay"]:  # too large to have meant the old convention
        raise ConfigError(
            f"{path} sets optim.weight_decay={wd} without a '{VERSION_KEY}: {CONFIG_VERSION}' line; before version "
            f"{CONFIG_VERSION} that was fully decoupled decay, {100 * float(wd):.3g}% of every weight a step, surely "
            f"not meant: add '{VERSION_KEY}: {CONFIG_VERSION}' at the top for torch AdamW's weight_decay {wd}"
        )
    raise ConfigError(
        f"{path} sets optim.weight_decay but has no '{VERSION_KEY}: {CONFIG_VERSION}' line, so it may mean the old "
        f"fully decoupled decay: write 'decoupled_weight_decay: {wd}' under optim to keep that meaning (= "
        f"weight_decay: {float(wd) / lr:.3g} at lr {lr:g}), or add '{VERSION_KEY}: {CONFIG_VERSION}' at the top to "
        f"mean torch AdamW's weight_decay: {wd}"
    )


def canonical_decay(data: dict) -> dict:
    """``data`` with its optim section's decay in one form (AdamW's ``weight_decay``, 12 digits), to compare two
    configs by what they do: decoupled 1e-4 at lr 1e-3 and weight_decay 0.1 are the same run."""
    optim = data.get("optim")
    if not isinstance(optim, dict):
        return data
    wd, decoupled = optim.get("weight_decay"), optim.get("decoupled_weight_decay")
    if decoupled is not None:
        wd = float(decoupled) / float(optim.get("lr", OptimConfig.lr))
    wd = None if wd is None else float(f"{float(wd):.12g}")
    return {**data, "optim": {**optim, "weight_decay": wd, "decoupled_weight_decay": None}}
