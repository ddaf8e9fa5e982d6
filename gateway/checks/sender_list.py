"""The practice's allow and block lists (kept on the web page), for inbound mail.

Blocked: the From address or the envelope sender is on the block list (address or domain).
Allowed: the From address is on the allow list *and* the mail really comes from that domain —
a DKIM signature that verifies for it (or a parent domain), or SPF passing for an envelope
sender of the same domain. Without that proof the entry does nothing (anyone can write a From
line), and the symbol says so.
"""

from __future__ import annotations

from typing import ClassVar

from gateway.auth import AuthStatus
from gateway.auth.dkim import DkimFacts
from gateway.auth.spf import SpfFacts
from gateway.checks.base import CheckContext, CheckResult, Facts, Hit, Services
from gateway.message import Direction, ParsedMessage
from gateway.sender_lists import SenderLists


def sender_lists(services: Services) -> SenderLists:
    return SenderLists(services.cfg.data_dir / "sender-lists.json")


class SenderListCheck:
    name: ClassVar[str] = "sender_list"
    phase: ClassVar[int] = 2
    produces: ClassVar[type[Facts] | None] = None
    directions: ClassVar[frozenset[Direction]] = frozenset({Direction.INBOUND})
    symbols: ClassVar[frozenset[str]] = frozenset({
        "SENDER_LIST_BLOCKED", "SENDER_LIST_ALLOWED", "SENDER_LIST_ALLOWED_UNVERIFIED"})

    def __init__(self, services: Services) -> None:
        self._lists = sender_lists(services)

    async def run(self, msg: ParsedMessage, ctx: CheckContext) -> CheckResult:
        envelope = ctx.inbound.mail_from
        for address in (*msg.from_addresses[:1], envelope):
            entry = self._lists.match(address) if address else None
            if entry is not None and entry.kind == "block":
                return CheckResult.of(self.name, Hit(symbol="SENDER_LIST_BLOCKED",
                                                     detail=entry.value,
                                                     args=(("entry", entry.value),)))
        if not msg.from_addresses:
            return CheckResult.of(self.name)
        sender = msg.from_addresses[0].lower()
        entry = self._lists.match(sender)
        if entry is None or entry.kind != "allow":
            return CheckResult.of(self.name)
        if _authenticated(sender.rpartition("@")[2], envelope, ctx):
            return CheckResult.of(self.name, Hit(symbol="SENDER_LIST_ALLOWED", detail=entry.value,
                                                 args=(("entry", entry.value),)))
        return CheckResult.of(self.name, Hit(symbol="SENDER_LIST_ALLOWED_UNVERIFIED",
                                             detail=entry.value, args=(("entry", entry.value),)))


def _authenticated(domain: str, envelope: str, ctx: CheckContext) -> bool:
    dkim = ctx.facts(DkimFacts)
    if isinstance(dkim, DkimFacts) and any(
            s.result is AuthStatus.PASS and (domain == s.domain or domain.endswith("." + s.domain))
            for s in dkim.signatures):
        return True
    spf = ctx.facts(SpfFacts)
    return (isinstance(spf, SpfFacts) and spf.result is AuthStatus.PASS
            and spf.identity == "mailfrom"
            and envelope.rpartition("@")[2].lower() == domain)


CHECKS = (SenderListCheck,)
