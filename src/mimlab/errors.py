"""User-facing errors: the CLI prints the message on one line and exits 2 (75 for `Preempted`)."""
from __future__ import annotations

import re
from typing import Any


class MimlabError(Exception):
    """A problem with the user's input (path, key, argument): the message names it and says what is wrong."""


class ConfigError(MimlabError):
    """A bad value of one parameter, named as in Python (`batch_size`); the CLI names the flag (`--batch-size`).

    `str(e)` is `"<param> <detail>"`; `e.param` and `e.detail` let a front end put its own name for the
    parameter in front of the detail."""

    def __init__(self, param: str, detail: str | None = None):
        if detail is None:      # re-created from its message alone (a DataLoader worker re-raises so)
            param, detail = "", param
        self.param, self.detail = param, detail
        super().__init__(f"{param} {detail}" if param else detail)

    def __reduce__(self):       # pickled (torch.distributed broadcast) with its parameter name, not the message only
        return type(self), (self.param, self.detail)


class Preempted(MimlabError):
    """Training stopped on a pre-emption signal (SIGTERM, SIGUSR1) after writing its checkpoint; the same command
    resumes it. The CLI exits with `EXIT_CODE` (75, EX_TEMPFAIL: "try again later")."""

    EXIT_CODE = 75


def clean_worker_message(e: BaseException) -> str:
    """The message of a MimlabError re-raised by a DataLoader from a worker process, without the worker's
    traceback that torch prepends (`Caught MimlabError in DataLoader worker process 0. Original Traceback ...`)."""
    text = str(e).strip()
    if "Traceback" not in text:
        return text
    last = text.splitlines()[-1]   # "mimlab.errors.MimlabError: <message>" (or a subclass)
    m = re.match(r"^[A-Za-z_][\w.]*: (.*)$", last)
    return m.group(1) if m else last


def plain(value: Any) -> Any:
    """`value` as a message should show it: numpy (and torch) scalars and arrays as Python numbers and lists, so a
    message says 2.0, not np.float64(2.0); containers element-wise, a set as a sorted list."""
    if hasattr(value, "tolist") and callable(value.tolist):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    if isinstance(value, (set, frozenset)):
        return sorted((plain(v) for v in value), key=repr)
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    return value
