"""What a config object contributes to a cache key: the fields that determine its results."""
from __future__ import annotations

import dataclasses
import json
from typing import Any


def key_dict(cfg: Any) -> dict[str, Any]:
    """The fields of a config dataclass except those in its `NOT_IN_KEY` (outputs, resuming, progress bars, worker
    counts: what changes how a run goes, not what it computes), JSON-ready (tuples as lists, paths as strings)."""
    skip = getattr(cfg, "NOT_IN_KEY", frozenset())
    out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in skip}
    return json.loads(json.dumps(out, default=str))
