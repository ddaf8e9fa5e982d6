"""docs/promises.md and the tests' `promise` markers say the same thing: every promise listed
has at least one test, every marker names a listed promise, and each promise's list of tests
is exactly the tests that carry its marker. Read from the source (ast), so that running a
part of the suite checks the whole."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "promises.md"


def listed() -> dict[str, set[str]]:
    """Promise id -> the tests docs/promises.md lists for it."""
    out: dict[str, set[str]] = {}
    current = None
    for line in DOC.read_text().splitlines():
        if m := re.fullmatch(r"## `([a-z0-9-]+)`", line):
            current = m.group(1)
            assert current not in out, f"{current} listed twice"
            out[current] = set()
        elif m := re.fullmatch(r"- `(tests/[\w/]+\.py::\w+)`", line):
            assert current is not None, line
            out[current].add(m.group(1))
    return out


def marked() -> dict[str, set[str]]:
    """Promise id -> the tests that carry @pytest.mark.promise(id)."""
    out: dict[str, set[str]] = {}
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for deco in node.decorator_list:
                if (isinstance(deco, ast.Call) and ast.unparse(deco.func) == "pytest.mark.promise"
                        and deco.args and isinstance(deco.args[0], ast.Constant)):
                    test = f"{path.relative_to(ROOT)}::{node.name}"
                    out.setdefault(str(deco.args[0].value), set()).add(test)
    return out


def test_every_promise_is_pinned_by_a_test_and_every_marker_is_listed():
    doc, marks = listed(), marked()
    assert len(doc) >= 15
    assert sorted(p for p, tests in doc.items() if not tests) == [], "promises without tests"
    assert sorted(set(marks) - set(doc)) == [], "markers naming promises not in the list"
    assert sorted(set(doc) - set(marks)) == [], "promises whose tests carry no marker"
    for promise, tests in doc.items():
        assert tests == marks[promise], promise

