"""Has the practice exchanged mail with this sender before (gateway/correspondents.py)? A
first contact is a weight, never a verdict: FIRST_CONTACT is mild, and the impersonation check
reads these facts for the frauds that need it (new bank details from someone the practice
never wrote with)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from gateway.auth.dmarc import org_domain
from gateway.checks.base import CheckContext, CheckResult, Facts, Hit, Services
from gateway.config import read_toml
from gateway.correspondents import Correspondents
from gateway.errors import ConfigError
from gateway.message import Direction, ParsedMessage


@dataclass(frozen=True, slots=True, kw_only=True)
class HistoryFacts(Facts):
    first_contact: bool  # neither the address nor (but for free mail) its domain is known


class HistoryCheck:
    name: ClassVar[str] = "history"
    phase: ClassVar[int] = 1
    produces: ClassVar[type[Facts] | None] = HistoryFacts
    directions: ClassVar[frozenset[Direction]] = frozenset({Direction.INBOUND})
    symbols: ClassVar[frozenset[str]] = frozenset({"FIRST_CONTACT"})

    def __init__(self, services: Services) -> None:
        cfg = services.cfg
        self._book = services.correspondents or Correspondents(cfg.correspondents_file,
                                                               create=False)
        try:
            self._freemail = frozenset(read_toml(cfg.rules_dir / "domain-lists.toml")["freemail"])
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"{cfg.rules_dir}/domain-lists.toml: {exc}") from None

    async def run(self, msg: ParsedMessage, ctx: CheckContext) -> CheckResult:
        if not msg.from_addresses:
            return CheckResult(check=self.name, facts=HistoryFacts(first_contact=False))
        address = msg.from_addresses[0]
        seen = await self._book.seen(address)
        freemail = org_domain(address.rpartition("@")[2].lower()) in self._freemail
        first = not seen.learning and not seen.address and (freemail or not seen.domain)
        hits = (Hit(symbol="FIRST_CONTACT"),) if first else ()
        return CheckResult(check=self.name, hits=hits, facts=HistoryFacts(first_contact=first))


CHECKS = (HistoryCheck,)
