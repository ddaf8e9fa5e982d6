"""The Check protocol and the values checks return.

A check reports facts as named symbols (`Hit`s). Scores, forced actions and the French text
live in rules/symbols.toml, never in a check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Protocol, TypeVar

from gateway.auth.dns import Resolver
from gateway.config import Config
from gateway.message import Inbound, ParsedMessage
from gateway.workers import Workers


class Facts:
    """What a check establishes for the checks after it and for our header fields (each
    authentication standard's facts: gateway/auth/). `method` names its Authentication-Results
    method (RFC 8601), if it has one, and `ar` gives its fragment of that field."""

    __slots__ = ()
    method: ClassVar[str] = ""

    def ar(self, inbound: Inbound) -> list[str]:
        return []


F = TypeVar("F", bound=Facts)


@dataclass(frozen=True, slots=True, kw_only=True)
class Unavailable:
    """Facts a check could not establish: it failed, ran out of time, or did not run. Never
    to be read as "nothing found": DMARC reads an unavailable SPF or DKIM as a temporary
    error, not as a missing pass."""

    kind: type[Facts]
    why: str  # English, for the logs


@dataclass(frozen=True, slots=True, kw_only=True)
class Hit:
    symbol: str
    factor: float = 1.0
    detail: str = ""  # English, for logs and the admin
    # Values for the placeholders of the symbol's French description, e.g. {org}, {domain}.
    args: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckResult:
    check: str
    hits: tuple[Hit, ...] = ()
    duration_s: float = 0.0
    facts: Facts | Unavailable | None = None  # what later checks and the result headers read

    @staticmethod
    def of(check: str, *hits: Hit, facts: Facts | Unavailable | None = None) -> CheckResult:
        return CheckResult(check=check, hits=hits, facts=facts)


class KnownSender(Protocol):
    @property
    def address(self) -> bool: ...
    @property
    def domain(self) -> bool: ...
    @property
    def learning(self) -> bool: ...


class SenderHistory(Protocol):
    """Whom the practice exchanged mail with (gateway/correspondents.py)."""

    async def seen(self, address: str) -> KnownSender: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Services:
    """What checks are built with: passed explicitly, no module-level singletons."""

    cfg: Config
    workers: Workers
    resolver: Resolver
    correspondents: SenderHistory | None = None  # the serving process's (None: `scan`)


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckContext:
    """What a check may read besides the message: config and earlier phases' results."""

    cfg: Config
    inbound: Inbound
    earlier: tuple[CheckResult, ...] = field(default=())

    def facts(self, kind: type[F]) -> F | Unavailable:
        """The facts of that kind an earlier phase established; Unavailable when its check
        failed, ran out of time or did not run (never None: absence is not a result)."""
        for r in self.earlier:
            if isinstance(r.facts, kind):
                return r.facts
            if isinstance(r.facts, Unavailable) and r.facts.kind is kind:
                return r.facts
        return Unavailable(kind=kind, why="not run")


class Check(Protocol):
    name: ClassVar[str]  # lower case; symbols start with its upper-case form
    # The kind of facts run() establishes (None: only hits); when the check fails, later
    # checks read Unavailable(kind) instead.
    produces: ClassVar[type[Facts] | None]
    phase: ClassVar[int]  # 1: independent; 2: reads phase-1 results from ctx.earlier

    @property
    def symbols(self) -> frozenset[str]:
        """Every symbol run() may emit (a class attribute, or set per instance)."""
        ...

    def __init__(self, services: Services) -> None: ...

    async def run(self, msg: ParsedMessage, ctx: CheckContext) -> CheckResult: ...

    # A check may set `directions` (a frozenset of message.Direction) to run only for mail
    # coming in or going out; without it, it runs for both.
    # A phase-2 check may also define `async def prefetch(self, msg, ctx) -> None`: it runs
    # beside phase 1 to warm the resolver cache with what run() will look up.


def runner_symbols(check_name: str) -> frozenset[str]:
    """Symbols the runner emits on a check's behalf: it crashed, or ran out of time."""
    prefix = check_name.upper()
    return frozenset({f"{prefix}_ERROR", f"{prefix}_TIMEOUT"})
