"""DMARC (RFC 7489): record parsing, policy discovery with the Public Suffix List, alignment,
and the check, from the SPF, DKIM and ARC facts of phase 1 (no lookup is redone).

The organisational domain comes from the `publicsuffixlist` package (its own copy of the
list, no network at run time); private-section suffixes (github.io, ...) count as suffixes.
RFC 9091's np= applies to From domains that do not exist.

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
import re
from dataclasses import dataclass
from typing import ClassVar

from publicsuffixlist import PublicSuffixList

from gateway.auth import AuthStatus, ar_value
from gateway.auth.arc import ArcFacts
from gateway.auth.dkim import DkimFacts
from gateway.auth.dns import Resolver, a_label
from gateway.auth.spf import SpfFacts
from gateway.checks.base import CheckContext, CheckResult, Facts, Hit, Services, Unavailable
from gateway.errors import DnsPermanentError, DnsTemporaryError
from gateway.message import Direction, Inbound, ParsedMessage


@dataclass(frozen=True, slots=True, kw_only=True)
class DmarcFacts(Facts):
    method: ClassVar[str] = "dmarc"
    result: AuthStatus
    from_domain: str
    policy: str  # "none", "quarantine", "reject" (after sp= and pct=), or "" without record
    arc_override: bool = False

    def ar(self, inbound: Inbound) -> list[str]:
        if not self.from_domain:
            return []
        extra = f" policy.dmarc={self.policy}" if self.policy else ""
        override = " (trusted ARC sealer)" if self.arc_override else ""
        return [f"dmarc={self.result.value}{override} "
                f"header.from={ar_value(self.from_domain)}{extra}"]


def undecided(facts: SpfFacts | DkimFacts | Unavailable, name: str) -> str:
    """Why SPF's or DKIM's answer cannot count against the sender ("" when it can): a lookup
    failed, or the check itself could not run to its end."""
    if isinstance(facts, Unavailable):
        return f"{name} unavailable ({facts.why})"
    if isinstance(facts, SpfFacts):
        return f"{name} lookup failed" if facts.result is AuthStatus.TEMPERROR else ""
    if any(s.result is AuthStatus.TEMPERROR for s in facts.signatures):
        return f"{name} lookup failed"
    return ""


_PSL = PublicSuffixList(only_icann=False)
_ICANN = PublicSuffixList(only_icann=True)
_POLICIES = ("none", "quarantine", "reject")


class DmarcSyntaxError(ValueError):
    pass


class DmarcNoPolicy(DmarcSyntaxError):
    """No usable p= and no rua=: RFC 7489 6.6.3 says to apply no DMARC processing."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DmarcRecord:
    p: str
    sp: str | None
    np: str | None
    adkim: str  # "r" or "s"
    aspf: str
    pct: int


def parse_record(text: str) -> DmarcRecord:
    """RFC 7489 6.3/6.4. v=DMARC1 first; p required and valid (unless rua= is given, then
    p=none); a bare term or an unknown p/sp value is a syntax error (permerror)."""
    terms = [t.strip() for t in text.split(";")]
    if not terms or terms[0].replace(" ", "") != "v=DMARC1":
        raise DmarcSyntaxError("v=DMARC1 must come first")
    tags: dict[str, str] = {}
    for term in terms[1:]:
        if not term:
            continue
        if "=" not in term:
            raise DmarcSyntaxError(f"missing tag or value: {term!r}")
        k, _, v = term.partition("=")
        tags.setdefault(k.strip().lower(), v.strip())
    p = tags.get("p", "").lower()
    if p not in _POLICIES:
        if "rua" in tags:
            p = "none"
        else:
            raise DmarcNoPolicy(f"p= missing or invalid: {tags.get('p')!r}")
    sp = tags.get("sp", "").lower() or None
    np = tags.get("np", "").lower() or None
    if sp is not None and sp not in _POLICIES:
        raise DmarcSyntaxError(f"sp= invalid: {sp!r}")
    if np is not None and np not in _POLICIES:
        np = None
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    pct_text = tags.get("pct", "100")
    pct = int(pct_text) if re.fullmatch(r"\d{1,3}", pct_text) else 100
    return DmarcRecord(p=p, sp=sp, np=np, adkim=adkim if adkim in ("r", "s") else "r",
                       aspf=aspf if aspf in ("r", "s") else "r", pct=min(pct, 100))


def org_domain(domain: str) -> str:
    domain = domain.lower().rstrip(".")
    return _PSL.privatesuffix(domain) or domain


def hosted_under(host: str) -> str | None:
    """The suffix of the Public Suffix List's private section `host` is a tenant of (a host
    anyone can get a name under: github.io, blogspot.com, dynamic DNS...), or None."""
    host = host.lower().rstrip(".")
    shared = _PSL.publicsuffix(host)
    if shared is None or shared == host or shared == _ICANN.publicsuffix(host):
        return None
    return str(shared)


def dkim_aligned(ctx: CheckContext, from_domain: str) -> bool:
    """A DKIM signature of the From domain (or its organisation) verified: the sender is who
    its From says, whatever its DMARC policy."""
    dkim = ctx.facts(DkimFacts)
    return bool(from_domain) and isinstance(dkim, DkimFacts) and any(
        s.result is AuthStatus.PASS and aligned(from_domain, s.domain, "r")
        for s in dkim.signatures)


def sender_verified(ctx: CheckContext, from_domain: str) -> bool:
    """The From domain's own servers sent the mail, or its key signed it: DKIM aligned with
    it, or SPF passed for a domain aligned with it (relaxed), whether or not the domain
    publishes a DMARC policy."""
    if dkim_aligned(ctx, from_domain):
        return True
    spf = ctx.facts(SpfFacts)
    return bool(from_domain) and isinstance(spf, SpfFacts) and spf.result is AuthStatus.PASS \
        and aligned(from_domain, spf.domain, "r")


def aligned(from_domain: str, auth_domain: str, mode: str) -> bool:
    a, b = from_domain.lower().rstrip("."), auth_domain.lower().rstrip(".")
    if mode == "s":
        return a == b
    return org_domain(a) == org_domain(b)


@dataclass(frozen=True, slots=True, kw_only=True)
class Discovery:
    record: DmarcRecord | None
    domain: str  # where the record was found
    at_org: bool  # found at the organisational domain, not the From domain
    error: str = ""  # a syntax error in the record found


async def discover(resolver: Resolver, from_domain: str) -> Discovery:
    """The DMARC record for a From domain, falling back to its organisational domain.
    DnsTemporaryError propagates: the caller turns it into DMARC temperror."""
    domain = from_domain.lower().rstrip(".")
    candidates = [domain]
    org = org_domain(domain)
    if org != domain:
        candidates.append(org)
    for i, name in enumerate(candidates):
        try:
            txts = await resolver.txt(f"_dmarc.{name}")
        except DnsPermanentError:
            txts = []
        records = [t.decode("utf-8", "replace") for t in txts
                   if t.replace(b" ", b"").upper().startswith(b"V=DMARC1")]
        if len(records) == 1:
            try:
                return Discovery(record=parse_record(records[0]), domain=name, at_org=i > 0)
            except DmarcNoPolicy:
                return Discovery(record=None, domain=name, at_org=i > 0)
            except DmarcSyntaxError as exc:
                return Discovery(record=None, domain=name, at_org=i > 0, error=str(exc))
    return Discovery(record=None, domain=domain, at_org=False)


async def domain_exists(resolver: Resolver, domain: str) -> bool:
    """RFC 9091 non-existence: no A, AAAA or MX record for the name."""
    for lookup in (resolver.a, resolver.aaaa, resolver.mx):
        try:
            if await lookup(domain):
                return True
        except DnsPermanentError:
            return False
    return False


class DmarcCheck:
    name: ClassVar[str] = "dmarc"
    phase: ClassVar[int] = 2
    produces: ClassVar[type[Facts] | None] = DmarcFacts
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
            return self._result(AuthStatus.PERMERROR, "", "", "DMARC_PERMERROR",
                                "no From domain")
        if len(domains) > MAX_FROM_DOMAINS:  # each would cost lookups: held, not evaluated
            return self._result(AuthStatus.PERMERROR, domains[0], "",
                                "DMARC_TOO_MANY_FROM_DOMAINS", f"{len(domains)} From domains")
        # Several From domains (RFC 7489 6.6.1): each is evaluated; the first that does not
        # pass decides.
        results = [await self._evaluate(d, ctx) for d in domains]
        for r in results:
            if isinstance(r.facts, DmarcFacts) and r.facts.result in (AuthStatus.FAIL,
                                                                      AuthStatus.TEMPERROR):
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
            return self._result(AuthStatus.TEMPERROR, from_domain, "", "DMARC_TEMPERROR_RETRY",
                                str(exc))
        if found.error:
            return self._result(AuthStatus.PERMERROR, from_domain, "", "DMARC_PERMERROR",
                                found.error)
        record = found.record
        if record is None:
            return self._result(AuthStatus.NONE, from_domain, "", "DMARC_NONE", "no record")

        spf = ctx.facts(SpfFacts)
        dkim = ctx.facts(DkimFacts)
        # With a null MAIL FROM (a bounce), SPF checked the HELO identity, and that is the
        # domain DMARC aligns (RFC 7489 4.1, RFC 7208 2.3): a bounce from the sender's own
        # servers passes.
        spf_ok = (isinstance(spf, SpfFacts) and spf.identity in ("mailfrom", "helo")
                  and spf.result is AuthStatus.PASS
                  and aligned(from_domain, spf.domain, record.aspf))
        dkim_ok = isinstance(dkim, DkimFacts) and any(
            s.result is AuthStatus.PASS and aligned(from_domain, s.domain, record.adkim)
            for s in dkim.signatures)
        if spf_ok or dkim_ok:
            return self._result(AuthStatus.PASS, from_domain, record.p, "DMARC_PASS",
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
            return self._result(AuthStatus.TEMPERROR, from_domain, policy, symbol,
                                "; ".join(temp))

        arc = ctx.facts(ArcFacts)
        if isinstance(arc, ArcFacts) and (sealer := arc.vouched_by(self._trusted)):
            return CheckResult.of(self.name, Hit(symbol="DMARC_ARC_OVERRIDE",
                                                 detail=f"sealed by {sealer}",
                                                 args=(("domain", from_domain),
                                                       ("sealer", sealer))),
                                  facts=DmarcFacts(result=AuthStatus.FAIL, from_domain=from_domain,
                                                   policy=policy, arc_override=True))
        if policy == "reject":
            symbol = ("DMARC_POLICY_REJECT" if self._cfg.auth.dmarc_reject_action == "reject"
                      else "DMARC_POLICY_QUARANTINE")
        elif policy == "quarantine":
            symbol = "DMARC_POLICY_QUARANTINE"
        else:
            symbol = "DMARC_FAIL"
        return self._result(AuthStatus.FAIL, from_domain, policy, symbol,
                            f"p={record.p} applied={policy}")

    async def _exists(self, domain: str) -> bool:
        try:
            return await domain_exists(self._resolver, domain)
        except DnsTemporaryError:
            return True  # in doubt, the subdomain exists: sp= rather than np=

    def _result(self, result: AuthStatus, domain: str, policy: str, symbol: str,
                detail: str) -> CheckResult:
        args = tuple((k, v[:100]) for k, v in (("domain", domain), ("policy", policy)) if v)
        return CheckResult.of(self.name, Hit(symbol=symbol, detail=f"{domain} {detail}"[:200],
                                             args=args),
                              facts=DmarcFacts(result=result, from_domain=domain, policy=policy))


CHECKS = (DmarcCheck,)


# RFC 7489 6.6.1 lets a receiver refuse several From domains; a few are evaluated (the first
# that does not pass decides), more are held: 50,000 of them were 50,000 lookups.
MAX_FROM_DOMAINS = 5


def _from_domains(msg: ParsedMessage) -> list[str]:
    """The From domains as DNS knows them: an internationalised address's domain in A-labels
    (RFC 8616 section 4), the raw UTF-8 of the header read as the reader sees it."""
    return list(dict.fromkeys((a_label(d) or d).lower()
                              for a in msg.from_addresses
                              for d in [a.rpartition("@")[2].lower().rstrip(".")]))
