"""The import structure of src/mimlab, read with `ast`: no import circle between modules, and every import between
packages points down the layers documented in docs/architecture.md (lazy imports inside functions count too)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
ORACLE = "mimlab.probe.reference"        # the float64 test oracle: tests and benchmarks import it, nothing else


def documented_layers() -> dict[str, int]:
    """package -> layer, from the `layer N: a, b` lines of docs/architecture.md."""
    layers = {}
    for m in re.finditer(r"^layer (\d+): (.+)$", DOC.read_text(), re.M):
        for name in m.group(2).split(","):
            layers[name.strip()] = int(m.group(1))
    assert layers, f"{DOC} has no 'layer N: packages' lines"
    return layers


def modules() -> dict[str, Path]:
    out = {}
    for f in sorted((SRC / "mimlab").rglob("*.py")):
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the mimlab modules it imports (a `from P import M` of a submodule M counts as an import of P.M)."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, f in mods.items():
        pkg = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
                targets = subs if len(subs) == len(node.names) else [base, *subs]
            else:
                continue
            for t in targets:
                while t and t not in mods:          # `import mimlab.probe.api as x` -> the module itself
                    t = t.rpartition(".")[0]
                if t and t != name and t.startswith("mimlab"):
                    edges[name].add(t)
    return edges


def package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "mimlab"


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_package_has_a_documented_layer():
    layers = documented_layers()
    packages = {package(m) for m in modules()}
    assert packages <= set(layers), f"packages without a layer in {DOC.name}: {sorted(packages - set(layers))}"


def test_no_import_circle_between_modules():
    assert cycles(imports(modules())) == []


def against_layers(edges: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    bad = []
    for src, targets in edges.items():
        a = package(src)
        for t in targets:
            b = package(t)
            if a != b and not layers[b] < layers[a]:
                bad.append(f"{src} -> {t} ({a}: layer {layers[a]}, {b}: layer {layers[b]})")
    return sorted(bad)


def test_imports_point_down_the_layers():
    bad = against_layers(imports(modules()), documented_layers())
    assert not bad, "imports against the documented direction:\n" + "\n".join(bad)


def test_the_float64_oracle_is_not_imported_by_production_code():
    users = sorted(m for m, targets in imports(modules()).items() if ORACLE in targets)
    assert users == [], f"{ORACLE} is the tests' oracle, imported by {users}"


def test_the_checker_sees_circles_and_upward_imports():
    """The rules are live: made-up graphs with a circle, an upward import and a sibling import are caught (the
    three kinds this layout had before the redesign: models.hf <-> probe.families, data -> transfer, pretrain ->
    probe)."""
    assert cycles({"mimlab.data.a": {"mimlab.data.b"}, "mimlab.data.b": {"mimlab.data.a"}}) == [
        ["mimlab.data.a", "mimlab.data.b"]]
    layers = documented_layers()
    assert against_layers({"mimlab.data.cli": {"mimlab.data.downstream"}}, layers) == []
    assert len(against_layers({"mimlab.data.cli": {"mimlab.transfer.api"}}, layers)) == 1
    assert len(against_layers({"mimlab.pretrain.api": {"mimlab.probe.api"}}, layers)) == 1
    assert len(against_layers({"mimlab.models.hf": {"mimlab.probe.families"}}, layers)) == 1
