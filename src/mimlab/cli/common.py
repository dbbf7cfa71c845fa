"""Argument pieces shared by the verbs."""
from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator


def deprecated_alias(parser: argparse.ArgumentParser | argparse._ArgumentGroup, old: str, new: str, dest: str,
                     **kwargs) -> None:
    """`old` still works, sets `dest` like `new` does, and prints a one-line note; --help shows only `new`."""

    class Alias(argparse.Action):
        def __call__(self, p, namespace, values, option_string=None):
            print(f"note: {old} is deprecated; use {new}", file=sys.stderr)
            setattr(namespace, self.dest, values)

    parser.add_argument(old, dest=dest, action=Alias, help=argparse.SUPPRESS, **kwargs)


def add_threads_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; 1 is often fastest on a busy machine; recorded "
                             "as torch_threads in the outputs' provenance)")


@contextlib.contextmanager
def threads_for(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `threads` for the verb's work, and put back after (main() also runs
    in-process, from Python and the tests)."""
    if threads is None:
        yield
        return
    if threads < 1:
        from mimlab.errors import ConfigError

        raise ConfigError("threads", f"must be >= 1, got {threads}")
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
