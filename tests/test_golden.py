"""No number changes unnoticed: every golden case (tests/golden/make_golden.py) is recomputed through the CLI and
compared with the stored values. They were written from the commit before the redesign, which reproduced them;
golden.json's "_written" says when and why they were regenerated since (a deliberate numerical fix, measured).

On the machine that wrote them, probe cases (the torch statistics path, the definition) must agree to 1e-10
relative and the training curves and the transfer metric, deterministic on the CPU, bit-identically. Another CPU
rounds float32 matmuls differently, so there golden.json is compared at CROSS_MACHINE, and exactly with that
machine's own values when tests/golden/exact holds them (make_golden.py --write-exact)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

GOLDEN_DIR = Path(__file__).parent / "golden"
sys.path.insert(0, str(GOLDEN_DIR))

from make_golden import all_cases, machine_signature, max_rel_diff, signature_key  # noqa: E402

GOLDEN = json.loads((GOLDEN_DIR / "golden.json").read_text())
CASES = all_cases()
CROSS_MACHINE = 1e-5   # float32 rounding of another CPU's GEMM kernels (make_golden.py's docstring: seen <= 2.3e-6)


def exact_bound(name: str) -> float:
    return 1e-10 if name.startswith("probe/") else 0.0


def references(sig: dict) -> list[tuple[str, dict, float]]:
    """(what, values, bound) to compare with: golden.json (exactly on its own machine, else at CROSS_MACHINE) and
    this machine's own values when tests/golden/exact holds them (exactly)."""
    refs = [("golden.json", GOLDEN, None if GOLDEN.get("_machine") == sig else CROSS_MACHINE)]
    own = GOLDEN_DIR / "exact" / f"{signature_key(sig)}.json"
    if own.is_file():
        refs.append((f"exact/{own.name}", json.loads(own.read_text()), None))
    return refs


@pytest.mark.parametrize("name", sorted(k for k in GOLDEN if not k.startswith("_")))
def test_golden_case_is_reproduced(name, tmp_path):
    got = CASES[name](tmp_path)
    for what, values, bound in references(machine_signature()):
        bound = exact_bound(name) if bound is None else bound
        worst, where = max_rel_diff(got, values[name])
        assert worst <= bound, f"{name} vs {what}: relative difference {worst:.3g} at {where} (bound {bound:g})"


def test_the_machine_signature_names_what_float32_results_depend_on():
    sig = machine_signature()
    assert set(sig) == {"arch", "cpu", "isa", "torch", "threads"} and sig["torch"] and sig["arch"]
    assert signature_key(sig) == signature_key(dict(reversed(list(sig.items()))))   # order-independent
