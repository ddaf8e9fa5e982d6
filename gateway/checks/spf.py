"""SPF (RFC 7208) for the MAIL FROM identity, or HELO when MAIL FROM is empty."""

from __future__ import annotations

from typing import ClassVar

from gateway.auth import AuthResult, SpfFacts
from gateway.checks.base import CheckContext, CheckResult, Hit, Services
from gateway.message import Direction, ParsedMessage
from gateway.spf import check_host

_SYMBOL: dict[AuthResult, str] = {r: f"SPF_{r.name}" for r in AuthResult
                                  if r is not AuthResult.POLICY}


class SpfCheck:
    name: ClassVar[str] = "spf"
    phase: ClassVar[int] = 1
    produces: ClassVar[type | None] = SpfFacts
    directions: ClassVar[frozenset[Direction]] = frozenset({Direction.INBOUND})
    symbols: ClassVar[frozenset[str]] = frozenset(_SYMBOL.values())

    def __init__(self, services: Services) -> None:
        self._resolver = services.resolver
        self._receiver = services.cfg.gateway.hostname

    async def run(self, msg: ParsedMessage, ctx: CheckContext) -> CheckResult:
        inbound = ctx.inbound
        mail_from = inbound.mail_from
        if "@" in mail_from:
            domain, identity = mail_from.rpartition("@")[2], "mailfrom"
        else:
            domain, identity = inbound.helo.strip("[]"), "helo"
            mail_from = f"postmaster@{domain}"
        outcome = await check_host(self._resolver, inbound.peer_ip, domain, mail_from,
                                   inbound.helo, receiver=self._receiver, identity=identity)
        result = outcome.result
        detail = f"{identity}={domain} {outcome.mechanism or outcome.reason}".strip()
        return CheckResult.of(self.name, Hit(symbol=_SYMBOL[result], detail=detail[:200]),
                              facts=SpfFacts(result=result, domain=domain, identity=identity))


CHECKS = (SpfCheck,)
