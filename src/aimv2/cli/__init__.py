"""The ``aimv2`` command. Each subcommand is one small module, ``aimv2.cli.<name>``, that parses its arguments,
calls the library and prints; it is imported only when its command runs, so ``aimv2 --help`` answers at once and a
command pays only for what it uses.

A command module defines ``DESCRIPTION`` (the body of its ``--help``), ``add_arguments(parser)`` and
``run(args) -> int | None``. Its one-line help lives in ``COMMANDS`` below and nowhere else: it is the line of
``aimv2 --help`` and the first line of ``aimv2 COMMAND --help``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Order is the order of `aimv2 --help`.
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("aimv2.cli.pretrain", "pretrain an encoder with the AIMv2 objective from a YAML config"),
    "probe": ("aimv2.cli.probe", "train a probe on frozen features and report top-1"),
    "classify": ("aimv2.cli.classify", "top-k labels of images with a probe saved by aimv2 probe --save"),
    "extract": ("aimv2.cli.extract", "extract features of a folder of images"),
    "caption": ("aimv2.cli.caption", "caption images with a pretraining run's decoder (greedy or beam search)"),
    "convert": ("aimv2.cli.convert", "convert an encoder checkpoint to Apple's, transformers', timm's or our layout"),
    "export": ("aimv2.cli.export", "export an encoder to ONNX (dynamic batch; dynamic size for native models)"),
    "data": ("aimv2.cli.data", "inspect webdataset shards as training reads them; write built-in data as shards"),
    "tokenizer": ("aimv2.cli.tokenizer", "train a BPE caption tokenizer on shards, folders, CSV/JSONL or text"),
    "lit": ("aimv2.cli.lit", "train a LiT text tower and pooling head against a frozen encoder (zero-shot)"),
    "zeroshot": ("aimv2.cli.zeroshot", "zero-shot classification of an image folder with a LiT model"),
    "vlm": ("aimv2.cli.vlm", "the encoder inside a VLM: train LLaVA's stages with a causal LM, ask, evaluate VQA"),
    "ablate": ("aimv2.cli.ablate", "grid of pretraining runs x seeds (objectives, alpha ...), probed, tabulated"),
    "detect": ("aimv2.cli.detect", "train, evaluate (COCO AP) and run a detector on the encoder's feature pyramid"),
    "ground": ("aimv2.cli.ground", "train, evaluate (accuracy at IoU 0.5) and run phrase grounding on the encoder"),
    "visualize": ("aimv2.cli.visualize", "what an encoder sees: PCA of its patch features, attention maps per head"),
    "demo": ("aimv2.cli.demo", "tiny end-to-end run: pretrain on built-in data, probe vs random init, loss curve"),
}

EPILOG = """examples:
  aimv2 pretrain configs/tiny-synthetic.yaml train.steps=200 out_dir=runs/tiny
  aimv2 probe runs/tiny --train probe/train --val probe/val --method attentive
  aimv2 extract aimv2-large-patch14-224 --checkpoint model.safetensors images/ feats.safetensors
  aimv2 convert model.safetensors --to hf hf-model/

run `aimv2 COMMAND --help` for the options of each command.

errors: a command that cannot go on (a bad config value, a missing or unreadable file, a full disk ...) prints
one line, `aimv2 COMMAND: error: <what> (<where>); <what to do>`, and exits with status 2. For the traceback
behind it, run `aimv2 --debug COMMAND ...` or set AIMV2_DEBUG=1."""


def build_parser(only: str | None = None, subparsers: dict | None = None) -> argparse.ArgumentParser:
    """The ``aimv2`` parser. Every command is listed, but only ``only`` (None: all) gets its module imported and
    its options added; the parsers that got them are stored in ``subparsers`` by name."""
    parser = argparse.ArgumentParser(
        prog="aimv2",
        description="AIMv2: multimodal autoregressive pre-training of vision encoders.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"aimv2 {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="on an error, print the traceback too (also: AIMV2_DEBUG=1)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_) in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name,
            help=help_,
            description=f"{help_}\n\n{module.DESCRIPTION}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
        if subparsers is not None:
            subparsers[name] = p
    return parser


def parse_intermixed(command: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``command``'s arguments with options anywhere among the positionals; for a command with sub-actions
    (`aimv2 vlm train CFG a=1 --quiet b=2`) the named action's parser reads the rest the same way."""
    sub = next((a for a in command._actions if isinstance(a, argparse._SubParsersAction)), None)
    if sub is None:
        return command.parse_intermixed_args(argv)
    if not argv or argv[0] not in sub.choices:
        raise TypeError  # no action (or an unknown one): let argparse say so
    ns, _ = command.parse_known_args([])  # the command's defaults (its parser, its run)
    setattr(ns, sub.dest, argv[0])
    return sub.choices[argv[0]].parse_intermixed_args(argv[1:], namespace=ns)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = False
    while argv[:1] == ["--debug"]:  # the top-level flag, before COMMAND
        debug = True
        argv = argv[1:]
    command = next((a for a in argv if not a.startswith("-")), None)
    subparsers: dict[str, argparse.ArgumentParser] = {}
    parser = build_parser(only=command if command in COMMANDS else "", subparsers=subparsers)
    try:  # options may come between positionals: `aimv2 ablate CONFIG a=1 --seeds 2 b=2` keeps both overrides
        if not argv or argv[0] not in subparsers:
            raise TypeError
        args = parse_intermixed(subparsers[argv[0]], argv[1:])
    except TypeError:  # no command yet, or no sub-action named (`aimv2 data`): argparse's own help and errors
        args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0 if not argv else 2
    try:
        if isinstance(getattr(args, "device", None), str):
            from .device import check_device

            check_device(args.device)
        return int(args._run(args) or 0)
    except (Exception, KeyboardInterrupt) as e:
        from .errors import debug_requested, report  # only now: `aimv2 --help` imports no command module

        name = argv[0] + (f" {args.action}" if getattr(args, "_parser", None) and getattr(args, "action", None) else "")
        status = report(e, name, debug_requested(debug or getattr(args, "debug", False)))
        if status is None:  # not an anticipated error but a bug: its traceback is the report
            raise
        return status
