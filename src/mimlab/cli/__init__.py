"""The `mimlab` command: the top layer. It parses arguments into each verb's config object and hands over.

Each verb is a module here exposing `add_arguments(parser)` and `run(args) -> int` (and optionally `FLAGS`, the
Python parameter names whose flag is not the obvious `--name-with-dashes`); those modules import torch lazily inside
`run` so that `mimlab --help` stays fast. Library errors name Python parameters (`ConfigError("batch_size", ...)`);
`main` names the verb's flag instead (`--batch-size ...`).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from mimlab import __version__
from mimlab.errors import ConfigError, MimlabError, Preempted

# verb -> (module, one-line help). Order is the pipeline order.
VERBS: dict[str, tuple[str, str]] = {
    "data": ("mimlab.cli.data", "write the built-in formula-driven datasets to disk"),
    "pretrain": ("mimlab.cli.pretrain", "SimMIM, MAE or supervised pretraining of a timm ViT/Swin"),
    "probe": ("mimlab.cli.probe", "exact streaming attention and CKA metrics, tables, figures, report"),
    "transfer": ("mimlab.cli.transfer", "fine-tune and evaluate on classification, keypoints, depth, tracking"),
    "reproduce": ("mimlab.cli.reproduce", "the whole study in one command, with a verdict per claim"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mimlab", description="What did pretraining do to my ViT?")
    parser.add_argument("--version", action="version", version=f"mimlab {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (module_name, help_text) in VERBS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(verb, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _flags=_flag_names(p, getattr(module, "FLAGS", {})))
    return parser


def _flag_names(parser: argparse.ArgumentParser, explicit: dict[str, str]) -> dict[str, str]:
    """Python parameter name -> the flag that sets it: each option's destination, then the verb's own aliases."""
    names: dict[str, str] = {}
    for action in parser._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if longs and action.dest not in names:
            names[action.dest] = longs[0]
        if isinstance(action, argparse._SubParsersAction):      # `mimlab data KIND --size ...`
            for sub in action.choices.values():
                names = {**_flag_names(sub, {}), **names}
    names.update(explicit)
    return names


def flag_message(e: ConfigError, flags: dict[str, str]) -> str:
    """A ConfigError as the command line says it: `--batch-size must be ...` rather than `batch_size must be ...`."""
    name = flags.get(e.param)
    return f"{name} {e.detail}" if name else str(e)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except ConfigError as e:
        print(f"mimlab {args.verb}: error: {flag_message(e, args._flags)}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"mimlab {args.verb}: {e}", file=sys.stderr)
        return Preempted.EXIT_CODE
    except MimlabError as e:
        print(f"mimlab {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mimlab {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
