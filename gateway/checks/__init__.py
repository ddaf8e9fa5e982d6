"""Checks: one module per check, each exposing `CHECKS`, a tuple of check classes.

Adding a check means adding one module here and its symbols to rules/symbols.toml; discovery
and the start-up consistency guard do the rest.
"""

from __future__ import annotations

import importlib
import pkgutil

from gateway.checks.base import Check, Services


def discover() -> list[type[Check]]:
    found: list[type[Check]] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        found.extend(getattr(module, "CHECKS", ()))
    return found


def create_checks(services: Services) -> list[Check]:
    checks: list[Check] = []
    names: set[str] = set()
    for cls in discover():
        if cls.name in names:
            raise RuntimeError(f"two checks are named {cls.name!r}")
        names.add(cls.name)
        checks.append(cls(services))
    return checks

