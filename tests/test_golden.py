"""No number changes unnoticed: every golden case (tests/golden/make_golden.py) is recomputed through the CLI and
compared with the stored values. They were written from the commit before the redesign, which reproduced them;
golden.json's "_written" says when and why they were regenerated since (a deliberate numerical fix, measured).

Probe cases use the torch statistics path (the definition) and must agree to 1e-10 relative; the training curves
and the transfer metric are deterministic on the CPU and must be bit-identical."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

GOLDEN_DIR = Path(__file__).parent / "golden"
sys.path.insert(0, str(GOLDEN_DIR))

from make_golden import all_cases, max_rel_diff  # noqa: E402

GOLDEN = json.loads((GOLDEN_DIR / "golden.json").read_text())
CASES = all_cases()


@pytest.mark.parametrize("name", sorted(k for k in GOLDEN if not k.startswith("_")))
def test_golden_case_is_reproduced(name, tmp_path):
    got = CASES[name](tmp_path)
    worst, where = max_rel_diff(got, GOLDEN[name])
    bound = 1e-10 if name.startswith("probe/") else 0.0
    assert worst <= bound, f"{name}: relative difference {worst:.3g} at {where}"
