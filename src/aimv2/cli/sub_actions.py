"""The ``run`` of a command with sub-actions (``aimv2 data inspect``, ``aimv2 tokenizer train``)."""

from __future__ import annotations

import logging


def run_action(args) -> int:
    """Log to stderr, call the chosen action, or print the command's help when none was given. Actions store
    themselves as ``_action``, the parser as ``_parser``."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    action = getattr(args, "_action", None)
    if action is None:
        args._parser.print_help()
        return 2
    return action(args)
