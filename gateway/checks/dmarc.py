"""DMARC (RFC 7489), from the SPF, DKIM and ARC facts of phase 1 (no lookup is redone).

A failing p=reject gives DMARC_POLICY_REJECT (or DMARC_POLICY_QUARANTINE when the practice
prefers, auth.dmarc_reject_action); p=quarantine gives DMARC_POLICY_QUARANTINE; p=none gives
DMARC_FAIL. pct= below 100 applies the policy to that share of failing mail, the next weaker
policy to the rest (6.6.4). When a trusted ARC sealer vouches for the message (chain pass,
sealer in auth.trusted_arc_sealers), a DMARC failure is not held against it (DMARC_ARC_OVERRIDE).
Temporary DNS trouble is never a pass nor a fail: DMARC_TEMPERROR, and a retry (451) when the
domain publishes p=reject or the DMARC record itself could not be read.
"""

from __future__ import annotations

import asyncio
import random
from typing import ClassVar

from gateway.auth import ArcFacts, AuthResult, DkimFacts, DmarcFacts, SpfFacts, undecided
from gateway.checks.base import CheckContext, CheckResult, Hit, Services
from gateway.dmarc import aligned, discover, domain_exists, org_domain
from gateway.errors import DnsTemporaryError
from gateway.message import Direction, ParsedMessage


class DmarcCheck:
    name: ClassVar[str] = "dmarc"
    phase: ClassVar[int] = 2
    produces: ClassVar[type | None] = DmarcFacts
    directions: ClassVar[frozenset[Direction]] = frozenset({Direction.INBOUND})
    symbols: ClassVar[frozenset[str]] = frozenset({
        "DMARC_PASS", "DMARC_FAIL", "DMARC_NONE", "DMARC_POLICY_QUARANTINE",
        "DMARC_POLICY_REJECT", "DMARC_TEMPERROR", "DMARC_TEMPERROR_RETRY", "DMARC_PERMERROR",
        "DMARC_TOO_MANY_FROM_DOMAINS",
        "DMARC_ARC_OVERRIDE",
    })

    def __init__(self, services: Services) -> None:
        self._resolver = services.resolver
        self._cfg = services.cfg
        self._trusted = frozenset(d.lower().rstrip(".") for d in services.cfg.auth.trusted_arc_sealers)
        self._random = random.Random()

    async def run(self, msg: ParsedMessage, ctx: CheckContext) -> CheckResult:
        domains = _from_domains(msg)
        if not domains or not all(domains):
            return self._result(AuthResult.PERMERROR, "", "", "DMARC_PERMERROR",
                                "no From domain")
        if len(domains) > MAX_FROM_DOMAINS:  # each would cost lookups: held, not evaluated
            return self._result(AuthResult.PERMERROR, domains[0], "",
                                "DMARC_TOO_MANY_FROM_DOMAINS", f"{len(domains)} From domains")
        # Several From domains (RFC 7489 6.6.1): each is evaluated; the first that does not
        # pass decides.
        results = [await self._evaluate(d, ctx) for d in domains]
        for r in results:
            if isinstance(r.facts, DmarcFacts) and r.facts.result in (AuthResult.FAIL,
                                                                      AuthResult.TEMPERROR):
                return r
        return results[0]

    async def prefetch(self, msg: ParsedMessage, ctx: CheckContext) -> None:
        """Look the DMARC records up while SPF and DKIM run (the answers wait in the cache)."""
        domains = _from_domains(msg)
        if len(domains) <= MAX_FROM_DOMAINS:
            await asyncio.gather(*(discover(self._resolver, d) for d in domains if d),
                                 return_exceptions=True)

    async def _evaluate(self, from_domain: str, ctx: CheckContext) -> CheckResult:
        try:
            found = await discover(self._resolver, from_domain)
        except DnsTemporaryError as exc:
            return self._result(AuthResult.TEMPERROR, from_domain, "", "DMARC_TEMPERROR_RETRY",
                                str(exc))
        if found.error:
            return self._result(AuthResult.PERMERROR, from_domain, "", "DMARC_PERMERROR",
                                found.error)
        record = found.record
        if record is None:
            return self._result(AuthResult.NONE, from_domain, "", "DMARC_NONE", "no record")

        spf = ctx.facts(SpfFacts)
        dkim = ctx.facts(DkimFacts)
        spf_ok = (isinstance(spf, SpfFacts) and spf.identity == "mailfrom"
                  and spf.result is AuthResult.PASS
                  and aligned(from_domain, spf.domain, record.aspf))
        dkim_ok = isinstance(dkim, DkimFacts) and any(
            s.result is AuthResult.PASS and aligned(from_domain, s.domain, record.adkim)
            for s in dkim.signatures)
        if spf_ok or dkim_ok:
            return self._result(AuthResult.PASS, from_domain, record.p, "DMARC_PASS",
                                "spf aligned" if spf_ok else "dkim aligned")

        policy = record.p
        if found.at_org or from_domain != org_domain(from_domain):
            if found.at_org and record.np and not await self._exists(from_domain):
                policy = record.np
            elif found.at_org and record.sp:
                policy = record.sp
        if record.pct < 100 and self._random.randrange(100) >= record.pct:
            policy = {"reject": "quarantine", "quarantine": "none"}.get(policy, policy)

        # A check that could not say (a lookup failed, or the check itself failed or ran out
        # of time) is not a failure of the sender: temporary, retried under p=reject.
        temp = [why for why in (
            undecided(spf, "SPF"), undecided(dkim, "DKIM")) if why]
        if temp:
            symbol = "DMARC_TEMPERROR_RETRY" if policy == "reject" else "DMARC_TEMPERROR"
            return self._result(AuthResult.TEMPERROR, from_domain, policy, symbol,
                                "; ".join(temp))

        arc = ctx.facts(ArcFacts)
        if (isinstance(arc, ArcFacts) and arc.result is AuthResult.PASS and arc.sealers
                and any(s.lower().rstrip(".") in self._trusted for s in arc.sealers)):
            return CheckResult.of(self.name, Hit(symbol="DMARC_ARC_OVERRIDE",
                                                 detail=f"sealed by {arc.sealers[0]}"),
                                  facts=DmarcFacts(result=AuthResult.FAIL, from_domain=from_domain,
                                                   policy=policy, arc_override=True))
        if policy == "reject":
            symbol = ("DMARC_POLICY_REJECT" if self._cfg.auth.dmarc_reject_action == "reject"
                      else "DMARC_POLICY_QUARANTINE")
        elif policy == "quarantine":
            symbol = "DMARC_POLICY_QUARANTINE"
        else:
            symbol = "DMARC_FAIL"
        return self._result(AuthResult.FAIL, from_domain, policy, symbol,
                            f"p={record.p} applied={policy}")

    async def _exists(self, domain: str) -> bool:
        try:
            return await domain_exists(self._resolver, domain)
        except DnsTemporaryError:
            return True  # in doubt, the subdomain exists: sp= rather than np=

    def _result(self, result: AuthResult, domain: str, policy: str, symbol: str,
                detail: str) -> CheckResult:
        return CheckResult.of(self.name, Hit(symbol=symbol, detail=f"{domain} {detail}"[:200]),
                              facts=DmarcFacts(result=result, from_domain=domain, policy=policy))


CHECKS = (DmarcCheck,)


# RFC 7489 6.6.1 lets a receiver refuse several From domains; a few are evaluated (the first
# that does not pass decides), more are held: 50,000 of them were 50,000 lookups.
MAX_FROM_DOMAINS = 5


def _from_domains(msg: ParsedMessage) -> list[str]:
    return list(dict.fromkeys(a.rpartition("@")[2].lower().rstrip(".")
                              for a in msg.from_addresses))
