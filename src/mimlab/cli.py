"""The `mimlab` command: a thin layer that parses arguments and hands over to each verb's module.

Each verb lives in its own `*/cli.py` module exposing `add_arguments(parser)` and `run(args) -> int`;
those modules import torch lazily inside `run` so that `mimlab --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from mimlab import __version__
from mimlab.errors import MimlabError

# verb -> (module, one-line help). Order is the pipeline order.
VERBS: dict[str, tuple[str, str]] = {
    "data": ("mimlab.data.cli", "write the built-in formula-driven datasets to disk"),
    "pretrain": ("mimlab.pretrain.cli", "SimMIM, MAE or supervised pretraining of a timm ViT/Swin"),
    "probe": ("mimlab.probe.cli", "exact streaming attention and CKA metrics, tables, figures, report"),
    "transfer": ("mimlab.transfer.cli", "fine-tune and evaluate on classification, keypoints, depth, tracking"),
    "reproduce": ("mimlab.reproduce.cli", "the whole study in one command, with a verdict per claim"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mimlab", description="What did pretraining do to my ViT?")
    parser.add_argument("--version", action="version", version=f"mimlab {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (module_name, help_text) in VERBS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:  # a verb not built yet in this checkout
            if e.name == module_name:
                continue
            raise
        p = sub.add_parser(verb, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except MimlabError as e:
        print(f"mimlab {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mimlab {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
