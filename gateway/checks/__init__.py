"""Checks: one module per check, here or in gateway/auth/ (one per authentication standard),
each exposing `CHECKS`, a tuple of check classes.

Adding a check means adding one module and its symbols to rules/symbols.toml; discovery and
the start-up consistency guard do the rest.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import gateway.auth
from gateway.checks.base import Check, Services


def discover() -> list[type[Check]]:
    """Every check class, in the order of their module names (which is the order of their
    results, and of the Authentication-Results fragments)."""
    modules = sorted((info.name, f"{package.__name__}.{info.name}")
                     for package in (sys.modules[__name__], gateway.auth)
                     for info in pkgutil.iter_modules(package.__path__)
                     if info.name != "base")
    found: list[type[Check]] = []
    for _, qualified in modules:
        found.extend(getattr(importlib.import_module(qualified), "CHECKS", ()))
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

