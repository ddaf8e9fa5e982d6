"""Impersonation of protected senders: the Assurance Maladie, hospitals, ARS, labs, MSSanté,
the practice itself (rules/senders/*.toml and the [practice] config).

Reads the authentication facts of phase 1 and DMARC (no lookup is redone). Signals:
mail from a protected domain that did not authenticate; a protected organisation (or the
practice, or a colleague) named in the display name or subject while writing from elsewhere;
look-alike domains in From, Reply-To, Return-Path and links; a Reply-To that leads elsewhere;
links whose text shows one domain and whose target is another, IP literals, shorteners; and,
only together with those, French lure vocabulary.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import ClassVar

from gateway.auth import AuthStatus
from gateway.auth.arc import ArcFacts
from gateway.auth.dkim import DkimFacts
from gateway.auth.dmarc import (
    DmarcFacts,
    aligned,
    dkim_aligned,
    hosted_under,
    org_domain,
    sender_verified,
    undecided,
)
from gateway.auth.spf import SpfFacts
from gateway.checks.base import CheckContext, CheckResult, Facts, Hit, Services, Unavailable
from gateway.checks.content import message_content
from gateway.checks.history import HistoryFacts
from gateway.config import read_toml
from gateway.errors import ConfigError
from gateway.links import Content
from gateway.message import Direction, ParsedMessage
from gateway.senders import Organisation, Registry, any_word, fold, load_registry


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".>") if "@" in address else ""


class ImpersonationCheck:
    name: ClassVar[str] = "impersonation"
    phase: ClassVar[int] = 2
    produces: ClassVar[type[Facts] | None] = None
    directions: ClassVar[frozenset[Direction]] = frozenset({Direction.INBOUND})
    symbols: ClassVar[frozenset[str]] = frozenset({
        "IMPERSONATION_UNAUTHENTICATED", "IMPERSONATION_TEMPERROR", "IMPERSONATION_DISPLAY_NAME",
        "IMPERSONATION_SUBJECT_NAME", "IMPERSONATION_PRACTICE_NAME", "LOOKALIKE_FROM",
        "LOOKALIKE_REPLY_TO", "LOOKALIKE_RETURN_PATH", "REPLYTO_ELSEWHERE", "LINK_LOOKALIKE",
        "LINK_TEXT_MISMATCH", "LINK_TEXT_MISMATCH_PROTECTED", "LINK_IP_LITERAL",
        "LINK_SHORTENER", "LINK_FREE_HOSTING", "LINK_SCRIPT_URL", "LINK_USERINFO", "LURE",
        "FROM_DYNAMIC_DNS",
        "PHISH_SPF_FAIL_LURE_LINK", "BRAND_DISPLAY_NAME", "BRAND_LOOKALIKE_FROM",
        "BRAND_LINK_LOOKALIKE", "BRAND_PHISH", "LINK_QR_CODE", "FRAUD_PAYMENT_DETAILS", "FRAUD_GIFT_CARD",
    })

    def __init__(self, services: Services) -> None:
        cfg = services.cfg
        practice = Organisation(
            id="practice", name="le cabinet", domains=tuple(sorted(cfg.domains)),
            names=tuple(cfg.practice.names) + tuple(cfg.practice.colleagues))
        self._registry = Registry([*load_registry(cfg.rules_dir / "senders"), practice])
        self._brands = Registry(load_registry(cfg.rules_dir / "brands"), loose_names=True,
                                min_label=5, tld_swap=False)
        lists = read_toml(cfg.rules_dir / "domain-lists.toml")
        lures = read_toml(cfg.rules_dir / "lures.toml")
        try:
            self._freemail = frozenset(lists["freemail"])
            self._shorteners = frozenset(lists["shorteners"])
            self._dynamic_dns = frozenset(str(d).lower() for d in lists["dynamic_dns"])
            self._free_hosting = self._dynamic_dns | frozenset(
                str(d).lower() for d in lists["free_hosting"])
            self._sold_like_tlds = frozenset(str(d).lower() for d in lists["sold_like_tlds"])
            self._lures = [re.compile(p) for p in lures["lures"]]
            self._payment_change = re.compile("|".join(f"(?:{p})" for p in
                                                       lures["payment_change"])
                                              ) if lures["payment_change"] else None
            self._urgent_request = [re.compile(p) for p in lures["urgent_request"]]
            self._org_words = any_word(lures["organisation_words"])
        except (KeyError, TypeError, re.error) as exc:
            raise ConfigError(f"{cfg.rules_dir}: domain-lists.toml or lures.toml: {exc}") from None
        self._trusted_sealers = frozenset(d.lower().rstrip(".")
                                          for d in cfg.auth.trusted_arc_sealers)

    def _free_hosted(self, host: str) -> bool:
        """On a free host of the list, or a tenant of any host of the Public Suffix List's
        private section (those whose owners give names to anyone: site builders, app
        hosting, dynamic DNS), but for the second-level domains sold like top-level ones."""
        if _under(host, self._free_hosting):
            return True
        shared = hosted_under(host)
        return shared is not None and shared not in self._sold_like_tlds

    async def run(self, msg: ParsedMessage, ctx: CheckContext) -> CheckResult:
        hits: list[Hit] = []
        from_domain = msg.from_domain
        claimed: Organisation | None = None
        trusted: Organisation | None = None  # authenticated sender: its own links are its own
        owner = self._registry.owner(from_domain) if from_domain else None
        if owner is not None:
            claimed = owner
            if owner.authenticate:
                state = self._authenticated(ctx, from_domain)
                if state is None:
                    hits.append(_hit("IMPERSONATION_TEMPERROR", owner, from_domain))
                elif not state:
                    hits.append(_hit("IMPERSONATION_UNAUTHENTICATED", owner, from_domain))
                else:
                    trusted = owner
        else:
            named = self._registry.named_in(msg.from_display) if msg.from_display else None
            if named is not None:
                claimed = named
                symbol = ("IMPERSONATION_PRACTICE_NAME" if named.id == "practice"
                          else "IMPERSONATION_DISPLAY_NAME")
                hits.append(_hit(symbol, named, from_domain))
            subject_org = self._registry.named_in(msg.subject) if msg.subject else None
            if subject_org is not None and subject_org.id != "practice" and named is None:
                claimed = claimed or subject_org
                hits.append(_hit("IMPERSONATION_SUBJECT_NAME", subject_org, from_domain))
            look = self._registry.lookalike(from_domain) if from_domain else None
            if look is not None:
                claimed = claimed or look.org
                hits.append(_hit("LOOKALIKE_FROM", look.org, from_domain, look.kind))

        for symbol, domain in (("LOOKALIKE_REPLY_TO", d) for d in _reply_to_domains(msg)):
            look = self._registry.lookalike(domain)
            if look is not None:
                hits.append(_hit(symbol, look.org, domain, look.kind))
            elif claimed is not None and self._registry.owner(domain) is not claimed and \
                    org_domain(domain) != (org_domain(from_domain) if from_domain else ""):
                kind = "freemail" if org_domain(domain) in self._freemail else "unrelated"
                hits.append(_hit("REPLYTO_ELSEWHERE", claimed, domain, kind))
        return_path = _domain(ctx.inbound.mail_from)
        if return_path and return_path != from_domain:
            look = self._registry.lookalike(return_path)
            if look is not None:
                hits.append(_hit("LOOKALIKE_RETURN_PATH", look.org, return_path, look.kind))

        content = message_content(ctx)
        if isinstance(content, Unavailable):
            # The text and links could not be read: the content check's own failure decides
            # (CONTENT_TIMEOUT: 451, CONTENT_ERROR: held), never this check's "no link".
            content = Content(text="", links=())
        # Mail its From domain signed (aligned DKIM): a survey on a form service or a page on
        # a hosting provider is that sender's own choice, not a sign of a fake.
        authenticated = dkim_aligned(ctx, from_domain)
        link_hits = self._links(content, trusted, authenticated, from_domain)
        hits += link_hits
        if from_domain and not authenticated and _under(from_domain, self._dynamic_dns):
            # Written from a dynamic DNS name (a home server, a hijacked one, a tunnel): no
            # organisation's mail domain.
            hits.append(Hit(symbol="FROM_DYNAMIC_DNS", detail=from_domain,
                            args=(("domain", from_domain),)))
        brand: _Invoked | None = None
        if claimed is None and owner is None:
            brand = self._brand_invoked(msg, ctx, from_domain, content, authenticated, hits)
        # Lure phrases are weak signals: they count only beside an impersonation signal, a
        # brand invoked from elsewhere, or a hard SPF failure (read only then: the phrases
        # cost a pass over the text).
        strong = any(h.symbol in _STRONG for h in hits)
        # Whoever it is, a sender whose domain neither sent nor signed the mail, and that
        # hides (a domain that cannot exist, a disguise sign, a link that hides where it
        # goes): its lure phrases count when it names itself an organisation ("Service
        # clients", "Alerte sécurité"), or when two of them press to follow a link to another
        # site (a phishing page's call). Without such a sign, an organisation's own wording
        # ("mot de passe", "cliquez ici") counts for nothing.
        unsigned = claimed is None and owner is None and brand is None and \
            not sender_verified(ctx, from_domain)
        disguised = any(h.symbol in _HIDING for r in ctx.earlier for h in r.hits) or any(
            h.symbol in _HIDING for h in hits)
        invalid = any(h.symbol == "FROM_DOMAIN_INVALID" for r in ctx.earlier for h in r.hits)
        posing = unsigned and (invalid or (disguised and bool(
            self._org_words.search(fold(msg.from_display[:200])))))
        # A sender made by a machine (random tokens, the recipient in the subject, letters
        # in disguise) has no site of its own to vouch for: a link there presses as well.
        made = any(h.symbol in _MACHINE_MADE for r in ctx.earlier for h in r.hits)
        spf = ctx.facts(SpfFacts)
        spf_fail = (isinstance(spf, SpfFacts) and spf.result is AuthStatus.FAIL
                    and spf.identity == "mailfrom")
        found = (self._lure_count(f"{msg.subject}\n{content.text}")
                 if strong or spf_fail or (unsigned and disguised) or brand is not None else 0)
        home = org_domain(from_domain) if from_domain else ""
        if found and (strong or posing or (unsigned and disguised and found >= 2 and any(
                link.host and (made or org_domain(link.host) != home)
                for link in content.links))):
            hits.append(Hit(symbol="LURE", factor=float(min(found, 3)),
                            detail=f"{found} lure phrases", args=(("count", str(found)),)))
        if brand is not None:
            hits += self._brand_phish(brand, found, content)
        if any(h.symbol == "IMPERSONATION_PRACTICE_NAME" for h in hits):
            # "Dr Dupont" from outside asks the secretary for gift cards or a discreet
            # transfer: the CEO fraud of small practices.
            folded = fold(f"{msg.subject}\n{content.text[:50_000]}")
            asks = sum(1 for p in self._urgent_request if p.search(folded))
            if asks >= 2:
                hits.append(Hit(symbol="FRAUD_GIFT_CARD", detail=f"{asks} request phrases",
                                args=(("count", str(asks)),)))
        history = ctx.facts(HistoryFacts)
        first_contact = isinstance(history, HistoryFacts) and history.first_contact
        if self._payment_change and (first_contact or any(
                h.symbol in _REPLIES_ELSEWHERE for r in ctx.earlier for h in r.hits)):
            change = self._payment_change.search(fold(f"{msg.subject}\n{content.text[:50_000]}"))
            if change:
                hits.append(Hit(symbol="FRAUD_PAYMENT_DETAILS", detail=change.group(0)[:80],
                                args=(("passage", change.group(0)[:80]),)))
        if found >= 2 and spf_fail and not authenticated and isinstance(spf, SpfFacts):
            hits += self._spf_fail_lure_link(ctx, spf.domain, from_domain, content)
        return CheckResult(check=self.name, hits=tuple(hits))

    def _brand_invoked(self, msg: ParsedMessage, ctx: CheckContext, from_domain: str,
                       content: Content, authenticated: bool,
                       hits: list[Hit]) -> _Invoked | None:
        """A brand of rules/brands/ that the message invokes while written from outside that
        brand's domains: in the display name, through a look-alike sender, Reply-To,
        Return-Path or link domain, in the subject, or in a link whose text shows the
        brand's site. Adds the signs found to `hits`. A sender whose own domain signed the
        mail (aligned DKIM: a supplier naming its carrier, a newsletter about Microsoft 365)
        invokes a brand only through a look-alike."""
        freemail = bool(from_domain) and org_domain(from_domain) in self._freemail
        home = self._brands.owner(from_domain) if from_domain else None
        named = self._brands.named_in(msg.from_display) if msg.from_display else None
        if named is not None and named is home:
            return None  # the brand's own domain: DMARC judges whether it is genuine
        invoked: _Invoked | None = None
        if named is not None and not authenticated:
            hits.append(_hit("BRAND_DISPLAY_NAME", named, from_domain))
            invoked = _Invoked(named, "display")
        look = (self._brands.lookalike(from_domain)
                if from_domain and not freemail and home is None else None)
        if look is not None:
            hits.append(_hit("BRAND_LOOKALIKE_FROM", look.org, from_domain, look.kind))
            invoked = invoked or _Invoked(look.org, "lookalike")
        for symbol, domain in [*(("LOOKALIKE_REPLY_TO", d) for d in _reply_to_domains(msg)),
                               ("LOOKALIKE_RETURN_PATH", _domain(ctx.inbound.mail_from))]:
            look = self._brands.lookalike(domain) if domain and domain != from_domain else None
            if look is not None and not any(h.symbol == symbol for h in hits):
                hits.append(_hit(symbol, look.org, domain, look.kind))
                invoked = invoked or _Invoked(look.org, "lookalike")
        seen: set[str] = set()
        for link in content.links:
            if len(seen) >= _BRAND_LINK_DOMAINS:
                break
            site = org_domain(link.host) if link.host else ""
            if not site or site in seen or self._registry.owner(link.host) is not None:
                continue
            seen.add(site)
            look = self._brands.lookalike(site)
            if look is not None:
                hits.append(_hit("BRAND_LINK_LOOKALIKE", look.org, link.host, look.kind))
                invoked = invoked or _Invoked(look.org, "lookalike")
                break
        if invoked is None and msg.subject and not authenticated:
            subject = self._brands.named_in(msg.subject)
            if subject is not None and subject is not home:
                invoked = _Invoked(subject, "subject")
        if invoked is None and not authenticated:
            for link in content.links[:_BRAND_LINKS]:
                shown = self._brands.owner(link.shown_host) if link.shown_host else None
                if shown is not None and shown is not home and \
                        self._brands.owner(link.host) is not shown:
                    invoked = _Invoked(shown, "link")
                    break
        return invoked

    def _brand_phish(self, brand: _Invoked, lures: int, content: Content) -> list[Hit]:
        """A brand invoked from outside its domains, and a call to act: a link away from the
        brand's domains (or to a page anyone can publish on them, sites.google.com), with
        lure phrases (two when the brand is only in the subject or a link's text)."""
        if lures < (2 if brand.how in ("subject", "link") else 1):
            return []
        away = next((link.host for link in content.links if link.host and (
            self._free_hosted(link.host) or (
                self._brands.owner(link.host) is not brand.org
                and self._registry.owner(link.host) is None))), None)
        if away is None:
            return []
        return [Hit(symbol="BRAND_PHISH", detail=f"{brand.org.id} ({brand.how}) -> {away}",
                    args=(("org", brand.org.name), ("domain", away)))]

    def _spf_fail_lure_link(self, ctx: CheckContext, spf_domain: str, from_domain: str,
                            content: Content) -> list[Hit]:
        """The sender's domain says this server is not its own (SPF hard fail), and the
        message presses (two lure phrases at least) to follow a link to another site: held.
        Not when a forwarder the practice trusts vouches for it (ARC), as forwarding breaks
        SPF."""
        arc = ctx.facts(ArcFacts)
        if isinstance(arc, ArcFacts) and arc.vouched_by(self._trusted_sealers):
            return []
        home = {org_domain(d) for d in (spf_domain, from_domain) if d}
        outside = next((link.host for link in content.links
                        if link.host and org_domain(link.host) not in home), None)
        if outside is None:
            return []
        return [Hit(symbol="PHISH_SPF_FAIL_LURE_LINK", detail=f"{spf_domain} -> {outside}",
                    args=(("domain", spf_domain), ("site", outside)))]

    def _authenticated(self, ctx: CheckContext, from_domain: str) -> bool | None:
        """Did mail from a protected domain authenticate? None: could not tell (DNS trouble)."""
        dmarc = ctx.facts(DmarcFacts)
        if isinstance(dmarc, DmarcFacts):
            if dmarc.result is AuthStatus.PASS or dmarc.arc_override:
                return True
            if dmarc.result is AuthStatus.TEMPERROR:
                return None
            if dmarc.result is AuthStatus.FAIL:
                return False
        # No DMARC verdict (no record, or DMARC runs beside this check): an aligned DKIM or
        # SPF pass still authenticates.
        dkim = ctx.facts(DkimFacts)
        spf = ctx.facts(SpfFacts)
        if dkim_aligned(ctx, from_domain):
            return True
        if (isinstance(spf, SpfFacts) and spf.result is AuthStatus.PASS
                and aligned(from_domain, spf.domain, "r")):
            return True
        return None if undecided(spf, "SPF") or undecided(dkim, "DKIM") else False

    def _links(self, content: Content, trusted: Organisation | None,
               authenticated: bool = False, from_domain: str = "") -> list[Hit]:
        hits: dict[str, Hit] = {}
        home = org_domain(from_domain) if from_domain else ""
        for link in content.links:
            host = link.host
            if link.qr and host and "LINK_QR_CODE" not in hits and org_domain(host) != home \
                    and trusted is None:
                # A QR code to the sender's own site (a conference's programme) is no sign.
                hits["LINK_QR_CODE"] = Hit(symbol="LINK_QR_CODE", detail=host,
                                           args=(("domain", host),))
            if link.is_script and "LINK_SCRIPT_URL" not in hits:
                scheme = link.href.lstrip().split(":", 1)[0].lower()
                hits["LINK_SCRIPT_URL"] = Hit(symbol="LINK_SCRIPT_URL", detail=scheme,
                                              args=(("scheme", scheme),))
            if not host:
                continue
            if link.userinfo and "LINK_USERINFO" not in hits:
                shown = link.userinfo[:80]
                hits["LINK_USERINFO"] = Hit(symbol="LINK_USERINFO",
                                            detail=f"shows {shown}, goes to {host}",
                                            args=(("domain", host), ("shown", shown)))
            if "LINK_FREE_HOSTING" not in hits and trusted is None and not authenticated \
                    and self._free_hosted(host):
                hits["LINK_FREE_HOSTING"] = Hit(symbol="LINK_FREE_HOSTING", detail=host,
                                                args=(("domain", host),))
            if "LINK_IP_LITERAL" not in hits and link.is_ip:
                hits["LINK_IP_LITERAL"] = Hit(symbol="LINK_IP_LITERAL", detail=host,
                                              args=(("domain", host),))
                continue
            if "LINK_SHORTENER" not in hits and (host in self._shorteners
                                                 or org_domain(host) in self._shorteners):
                hits["LINK_SHORTENER"] = Hit(symbol="LINK_SHORTENER", detail=host,
                                             args=(("domain", host),))
            if "LINK_LOOKALIKE" not in hits:
                look = self._registry.lookalike(host)
                if look is not None:
                    hits["LINK_LOOKALIKE"] = _hit("LINK_LOOKALIKE", look.org, host, look.kind)
            shown = link.shown_host
            if shown and org_domain(shown) != org_domain(host):
                owner = self._registry.owner(shown)
                if owner is not None and owner is trusted:
                    continue  # the organisation's own tracking links, in its authenticated mail
                if owner is not None and "LINK_TEXT_MISMATCH_PROTECTED" not in hits:
                    hits["LINK_TEXT_MISMATCH_PROTECTED"] = _hit(
                        "LINK_TEXT_MISMATCH_PROTECTED", owner, host, f"shows {shown}")
                elif owner is None and "LINK_TEXT_MISMATCH" not in hits:
                    hits["LINK_TEXT_MISMATCH"] = Hit(
                        symbol="LINK_TEXT_MISMATCH", detail=f"shows {shown}, goes to {host}",
                        args=(("domain", host), ("shown", shown)))
        return list(hits.values())

    def _lure_count(self, text: str) -> int:
        folded = fold(text[:50_000])
        return sum(1 for p in self._lures if p.search(folded))


@dataclass(frozen=True, slots=True)
class _Invoked:
    org: Organisation
    how: str  # display, lookalike, subject, link


# Signs of the disguise check (phase 1) that replies go to another mailbox than the sender's.
# Signs of a sender that hides (gateway/checks/disguise.py, and the links above).
_HIDING = frozenset({
    "FROM_DOMAIN_INVALID", "DISGUISED_LETTERS", "FROM_NAME_OTHER_ADDRESS",
    "FREEMAIL_ORGANISATION_NAME", "REPLYTO_FREEMAIL", "SUBJECT_HAS_RECIPIENT", "RANDOM_TOKEN",
    "FAKE_REPLY", "FROM_DYNAMIC_DNS", "LINK_FREE_HOSTING", "LINK_SHORTENER", "LINK_IP_LITERAL",
    "LINK_TEXT_MISMATCH", "LINK_USERINFO", "LINK_SCRIPT_URL", "LINK_QR_CODE",
})
_REPLIES_ELSEWHERE = frozenset({"FREEMAIL_HEALTH_REPLY_ELSEWHERE", "REPLYTO_FREEMAIL"})
_BRAND_LINKS = 100  # links whose text is looked at for a brand's site
_BRAND_LINK_DOMAINS = 20  # distinct sites of links looked at for a brand look-alike


_MACHINE_MADE = frozenset({"RANDOM_TOKEN", "DISGUISED_LETTERS", "SUBJECT_HAS_RECIPIENT",
                           "FROM_NAME_OTHER_ADDRESS"})


def _reply_to_domains(msg: ParsedMessage) -> list[str]:
    return list(dict.fromkeys(d for a in msg.reply_to() if (d := _domain(a))))


def _under(host: str, domains: frozenset[str]) -> bool:
    """`host` is one of `domains` or under one of them (dot boundary: notweb.app is not).
    An entry's "*" stands for one label (s3.*.amazonaws.com: every region). Only the last
    six labels are looked at: no entry is longer, and a host of 120 labels costs no more."""
    labels = host.split(".")[-6:]
    for i in range(len(labels) - 1):
        suffix = labels[i:]
        if ".".join(suffix) in domains:
            return True
        if any(len(p) == len(suffix) and all(a in ("*", b) for a, b in zip(p, suffix, strict=True))
               for p in _patterns(domains)):
            return True
    return False


@functools.cache
def _patterns(domains: frozenset[str]) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(d.split(".")) for d in domains if "*" in d)


_STRONG = frozenset({
    "IMPERSONATION_UNAUTHENTICATED", "IMPERSONATION_DISPLAY_NAME", "IMPERSONATION_SUBJECT_NAME",
    "IMPERSONATION_PRACTICE_NAME", "LOOKALIKE_FROM", "LOOKALIKE_REPLY_TO",
    "LOOKALIKE_RETURN_PATH", "REPLYTO_ELSEWHERE", "LINK_LOOKALIKE",
    "LINK_TEXT_MISMATCH_PROTECTED", "LINK_FREE_HOSTING", "LINK_SCRIPT_URL", "LINK_USERINFO",
    "BRAND_DISPLAY_NAME", "BRAND_LOOKALIKE_FROM", "BRAND_LINK_LOOKALIKE", "LINK_QR_CODE",
})


def _hit(symbol: str, org: Organisation, domain: str, kind: str = "") -> Hit:
    return Hit(symbol=symbol, detail=f"{org.id} {domain} {kind}".strip(),
               args=(("org", org.name), ("domain", domain)))


CHECKS = (ImpersonationCheck,)
