"""The one grammar for naming image data on the command line (`--data`), shared by every verb.

* `builtin`, `builtin:KIND` or `builtin:KIND?classes=100&per_class=32&seed=0&size=32`: the built-in formula-driven
  images (`mimlab.data.synthetic`; KIND one of its KINDS, default its DEFAULT_KIND). Keys not given take the
  defaults of the verb that reads the data (`explicit` says which were given);
* a directory of images (an ImageNet-layout tree `ROOT/CLASS/*.jpg`, or a flat folder);
* a `.npy` file (float32 N x 3 x H x W, already normalised), where the verb accepts one (`mimlab probe`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from mimlab.errors import ConfigError

BUILTIN = "builtin"
BUILTIN_KEYS = ("classes", "per_class", "seed", "size")
BUILTIN_DEFAULTS: dict[str, Any] = {"classes": 100, "per_class": 32, "seed": 0}   # pretraining's defaults


@dataclass(frozen=True)
class DataSpec:
    kind: str                                   # "builtin" | "folder" | "npy"
    path: Path | None = None
    params: dict[str, Any] = field(default_factory=dict)    # builtin: kind, and the keys (with defaults)
    explicit: frozenset[str] = frozenset()      # builtin keys written in the spec


def is_builtin(text: str) -> bool:
    return text == BUILTIN or text.startswith(BUILTIN + ":") or text.startswith(BUILTIN + "?")


def parse_data_spec(text: str, *, defaults: dict[str, Any] | None = None, allow_npy: bool = False,
                    param: str = "data") -> DataSpec:
    """Parse a `--data` value; errors name `param` and the value. Built-in keys not given take `defaults`
    (pretraining's BUILTIN_DEFAULTS if None)."""
    from mimlab.data.synthetic import DEFAULT_KIND, KINDS

    if is_builtin(text):
        rest = text[len(BUILTIN):].lstrip(":")
        kind, _, query = rest.partition("?")
        kind = kind or DEFAULT_KIND
        if kind not in KINDS:
            raise ConfigError(param, f"{text}: unknown built-in kind '{kind}' (choose from {', '.join(KINDS)})")
        params: dict[str, Any] = dict(BUILTIN_DEFAULTS if defaults is None else defaults)
        given = set()
        for key, value in parse_qsl(query, keep_blank_values=True):
            if key not in BUILTIN_KEYS:
                raise ConfigError(param, f"{text}: unknown key '{key}' (known: {', '.join(BUILTIN_KEYS)})")
            try:
                params[key] = int(value)
            except ValueError:
                raise ConfigError(param, f"{text}: '{key}={value}' is not an integer") from None
            given.add(key)
        params["kind"] = kind
        return DataSpec("builtin", None, params, frozenset(given))
    path = Path(text)
    if allow_npy and path.suffix == ".npy":
        if not path.is_file():
            raise ConfigError(param, f"{text}: no such file")
        return DataSpec("npy", path)
    if not path.exists():
        raise ConfigError(param, f"{text}: no such directory (or use 'builtin')")
    if not path.is_dir():
        raise ConfigError(param, f"{text}: not a directory of images (or use 'builtin')")
    return DataSpec("folder", path)
