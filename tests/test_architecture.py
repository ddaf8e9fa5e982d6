"""The shape of the code, as docs/architecture.md describes it: no import cycle between the
modules (counting imports under TYPE_CHECKING and inside functions), and the quarantine
imports nothing of the gateway."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imports() -> dict[str, set[str]]:
    mods: dict[str, Path] = {}
    for path in [*ROOT.glob("gateway/**/*.py"), *ROOT.glob("quarantine/**/*.py")]:
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        mods[name] = path
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):  # every import, at any depth
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            edges[name] |= {t for t in targets if t in mods and t != name}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert cycles(imports()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_quarantine_imports_nothing_of_the_gateway():
    edges = imports()
    assert {m: sorted(t for t in e if t.startswith("gateway"))
            for m, e in edges.items() if m.startswith("quarantine")
            and any(t.startswith("gateway") for t in e)} == {}


def test_the_web_page_sees_held_mail_through_the_quarantine_service_only():
    """Not the pipeline, the checks or the whole Runtime: what it may do with held mail is
    the service's (gateway/quarantine_service.py)."""
    edges = imports()
    reached = {m: sorted(t for t in e if t in {"gateway.runtime", "gateway.pipeline",
                                               "gateway.service", "gateway.relay"}
                         or t.startswith("gateway.checks"))
               for m, e in edges.items() if m.startswith("gateway.web")}
    assert {m: r for m, r in reached.items() if r} == {}
