"""The Check protocol and the values checks return.

A check reports facts as named symbols (`Hit`s). Scores, forced actions and the French text
live in rules/symbols.toml, never in a check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from gateway.config import Config
from gateway.message import Inbound, ParsedMessage
from gateway.workers import Workers


@dataclass(frozen=True, slots=True, kw_only=True)
class Hit:
    symbol: str
    factor: float = 1.0
    detail: str = ""  # English, for logs and the admin; never personal data


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckResult:
    check: str
    hits: tuple[Hit, ...] = ()
    duration_s: float = 0.0

    @staticmethod
    def of(check: str, *hits: Hit) -> CheckResult:
        return CheckResult(check=check, hits=hits)


@dataclass(frozen=True, slots=True, kw_only=True)
class Services:
    """What checks are built with: passed explicitly, no module-level singletons."""

    cfg: Config
    workers: Workers


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckContext:
    """What a check may read besides the message: config and earlier phases' results."""

    cfg: Config
    inbound: Inbound
    earlier: tuple[CheckResult, ...] = field(default=())


class Check(Protocol):
    name: ClassVar[str]  # lower case; symbols start with its upper-case form
    phase: ClassVar[int]  # 1: independent; 2: reads phase-1 results from ctx.earlier
    symbols: ClassVar[frozenset[str]]  # every symbol run() may emit

    def __init__(self, services: Services) -> None: ...

    async def run(self, msg: ParsedMessage, ctx: CheckContext) -> CheckResult: ...


def runner_symbols(check_name: str) -> frozenset[str]:
    """Symbols the runner emits on a check's behalf: it crashed, or ran out of time."""
    prefix = check_name.upper()
    return frozenset({f"{prefix}_ERROR", f"{prefix}_TIMEOUT"})
