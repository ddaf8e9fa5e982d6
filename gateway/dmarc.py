"""DMARC (RFC 7489): record parsing, policy discovery with the Public Suffix List, alignment.

The organisational domain comes from the `publicsuffixlist` package (its own copy of the
list, no network at run time); private-section suffixes (github.io, ...) count as suffixes.
RFC 9091's np= applies to From domains that do not exist.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from publicsuffixlist import PublicSuffixList

from gateway.dns import Resolver
from gateway.errors import DnsPermanentError

_PSL = PublicSuffixList(only_icann=False)
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
