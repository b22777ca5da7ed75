"""The ``aimv2`` command. Each subcommand lives in ``aimv2.commands.<name>`` and is imported lazily,
so ``aimv2 --help`` answers at once and a subcommand pays only for what it uses.

A subcommand module defines ``HELP`` (one line), ``DESCRIPTION`` (the text of its ``--help``),
``add_arguments(parser)`` and ``run(args) -> int | None``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Order is the order of `aimv2 --help`.
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("aimv2.commands.pretrain", "pretrain an encoder with the AIMv2 objective from a YAML config"),
    "probe": ("aimv2.commands.probe", "train a probe on frozen features and report top-1"),
    "extract": ("aimv2.commands.extract", "extract features of a folder of images"),
    "caption": ("aimv2.commands.caption", "caption images with a pretraining run's decoder (greedy or beam search)"),
    "convert": ("aimv2.commands.convert", "convert an encoder checkpoint to Apple's or transformers' layout"),
    "data": ("aimv2.commands.data", "inspect webdataset shards as training reads them; write built-in data as shards"),
    "tokenizer": ("aimv2.commands.tokenizer", "train a BPE caption tokenizer on shards, folders, CSV/JSONL or text"),
    "lit": ("aimv2.commands.lit", "train a LiT text tower and pooling head against a frozen encoder (zero-shot)"),
    "zeroshot": ("aimv2.commands.zeroshot", "zero-shot classification of an image folder with a LiT model"),
    "ablate": ("aimv2.commands.ablate", "grid of pretraining runs x seeds (objectives, alpha ...), probed, tabulated"),
    "demo": ("aimv2.commands.demo", "tiny end-to-end run: pretrain on built-in data, probe vs random init, loss curve"),
}

EPILOG = """examples:
  aimv2 pretrain configs/tiny-synthetic.yaml train.steps=200 out_dir=runs/tiny
  aimv2 probe runs/tiny --train probe/train --val probe/val --method attentive
  aimv2 extract aimv2-large-patch14-224 --checkpoint model.safetensors images/ feats.safetensors
  aimv2 convert model.safetensors --to hf hf-model/

run `aimv2 COMMAND --help` for the options of each command."""


def build_parser(only: str | None = None, subparsers: dict | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aimv2",
        description="AIMv2: multimodal autoregressive pre-training of vision encoders.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"aimv2 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_) in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name,
            help=help_,
            description=getattr(module, "DESCRIPTION", help_),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
        if subparsers is not None:
            subparsers[name] = p
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    subparsers: dict[str, argparse.ArgumentParser] = {}
    parser = build_parser(only=command if command in COMMANDS else "", subparsers=subparsers)
    try:  # options may come between positionals: `aimv2 ablate CONFIG a=1 --seeds 2 b=2` keeps both overrides
        if not argv or argv[0] not in subparsers:
            raise TypeError
        args = subparsers[argv[0]].parse_intermixed_args(argv[1:])
    except TypeError:  # no command yet, or one with sub-actions (`aimv2 data inspect`), which it cannot mix
        args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0 if not argv else 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
