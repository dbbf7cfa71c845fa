"""Argument pieces shared by the verbs."""
from __future__ import annotations

import argparse
import sys


def deprecated_alias(parser: argparse.ArgumentParser | argparse._ArgumentGroup, old: str, new: str, dest: str,
                     **kwargs) -> None:
    """`old` still works, sets `dest` like `new` does, and prints a one-line note; --help shows only `new`."""

    class Alias(argparse.Action):
        def __call__(self, p, namespace, values, option_string=None):
            print(f"note: {old} is deprecated; use {new}", file=sys.stderr)
            setattr(namespace, self.dest, values)

    parser.add_argument(old, dest=dest, action=Alias, help=argparse.SUPPRESS, **kwargs)
