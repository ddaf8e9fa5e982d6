"""Quarantine digests ("Rapport de quarantaine"): once a day, each recipient of the practice
with newly held mail gets a French list of it, with a link per message.

- **When**: at `digest.hour` local time (`gateway.timezone`, Europe/Paris by default), run by
  the primary serving process (`Digests.tick`, every minute). A digest lists what was held
  since the previous one: the store keeps the end of the last window as a time mark, moved by
  a compare-and-set before anything is sent, so two processes (or the CLI's `gateway digest
  --envoyer` and the timer) never send one window twice. The first start only sets the mark.
- **What**: inbound items still held (not refused copies: their sender was told no), for the
  recipients in `digest.domains` (all the practice's domains by default) that did not opt
  out: date, sender, subject and the main reason, nothing of the content.
- **Links** (`web.public_url` needed; without it the digest says to ask the admin): each is
  `/rapport/<item>.<n>.<action>.<expiry>.<mac>`, the MAC an HMAC-SHA256 of the item, the
  recipient (the item's n-th), the action and the expiry under a key derived from the
  installation's secret. Nothing personal is in the link. Actions: `d`, ask the admin to
  release it; `l`, release it now, offered only where `QuarantineService.recipient_may_release`
  allows it (never for a file or a failed analysis) and checked again when used. Each link
  works once (the store's `used_links`), until it expires (`digest.link_days`). Opening a link
  only shows a page; the action needs its button (mail scanners open links).
- **Opt-out**: `/rapport/desabonnement/<token>.<mac>`, the token being the address's blind
  index token; also given as a one-click `List-Unsubscribe` (RFC 8058).
- **Sending**: through the inbound next hop (the practice's mailbox server), with a null
  reverse path and `Auto-Submitted: auto-generated`, like the outbound notices. A recipient
  whose digest could not be delivered for now is tried again at the following ticks for an
  hour (in this process's memory: a restart in that hour loses it, logged).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import re
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate, getaddresses, make_msgid
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.config import Config
from gateway.errors import DownstreamRejected, DownstreamUnavailable
from gateway.quarantine_service import QuarantineService
from gateway.relay import NextHop, deliver
from quarantine.store import Item

if TYPE_CHECKING:
    import jinja2

log = logging.getLogger(__name__)

MARK = "digest"
TICK_S = 60.0
RETRY_FOR_S = 3600.0
MAX_ENTRIES = 100  # listed in one digest; the rest are counted
ACTIONS = {"d": "request", "l": "release"}
TEMPLATES = Path(__file__).resolve().parent / "web" / "templates"
_LINK_RE = re.compile(r"^([0-9]{8}T[0-9]{6}-[0-9a-f]{12})\.([0-9]{1,3})\.([dl])\.([0-9]{1,12})"
                      r"\.([0-9a-f]{32})$")
_OPTOUT_RE = re.compile(r"^([0-9a-f]{12})\.([0-9a-f]{32})$")


def _key(secret: bytes, purpose: bytes) -> bytes:
    return hmac.new(secret, purpose, hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class Link:
    """A digest link's parts (nothing personal: the recipient is the item's n-th)."""

    item_id: str
    rcpt_no: int
    action: str  # "d" request, "l" release
    expires: int
    mac: str

    @property
    def token(self) -> str:
        return f"{self.item_id}.{self.rcpt_no}.{self.action}.{self.expires}.{self.mac}"

    @classmethod
    def parse(cls, token: str) -> Link | None:
        m = _LINK_RE.match(token)
        if m is None:
            return None
        return cls(m[1], int(m[2]), m[3], int(m[4]), m[5])


def link_mac(secret: bytes, item_id: str, rcpt: str, action: str, expires: int) -> str:
    return hmac.new(_key(secret, b"digest-links"),
                    f"{item_id}\0{rcpt.lower()}\0{action}\0{expires}".encode(),
                    hashlib.sha256).hexdigest()[:32]


def make_link(secret: bytes, item: Item, rcpt_no: int, action: str, expires: int) -> Link:
    return Link(item.id, rcpt_no, action, expires,
                link_mac(secret, item.id, item.rcpts[rcpt_no], action, expires))


def link_recipient(secret: bytes, link: Link, item: Item) -> str | None:
    """The recipient a link was made for, if it was made by us for this item (whatever its
    expiry: the caller says "expired" rather than "invalid")."""
    if link.item_id != item.id or link.rcpt_no >= len(item.rcpts):
        return None
    rcpt = item.rcpts[link.rcpt_no]
    expected = link_mac(secret, item.id, rcpt, link.action, link.expires)
    return rcpt if hmac.compare_digest(expected, link.mac) else None


def optout_token(secret: bytes, blind: str) -> str:
    mac = hmac.new(_key(secret, b"digest-optout"), blind.encode(), hashlib.sha256).hexdigest()
    return f"{blind}.{mac[:32]}"


def optout_blind(secret: bytes, token: str) -> str | None:
    """The address's blind token an opt-out link carries, if the link is ours."""
    m = _OPTOUT_RE.match(token)
    if m is None or not hmac.compare_digest(optout_token(secret, m[1]), token):
        return None
    return m[1]


def sender_parts(item: Item) -> tuple[str, str]:
    """Who the message says it is from: From's display name and address (the envelope
    sender's when From has none)."""
    pairs = getaddresses([item.from_header])
    name, addr = pairs[0] if pairs else ("", "")
    if addr and "@" in addr:
        return name, addr
    return "", item.mail_from or "(expéditeur vide)"


def sender_of(item: Item) -> str:
    name, addr = sender_parts(item)
    return f"{name} <{addr}>" if name else addr


@dataclass(frozen=True, slots=True)
class Entry:
    item: Item
    rcpt_no: int
    reason: str
    url: str  # "" without web.public_url
    direct: bool  # the link releases (else it asks the admin)


@dataclass(slots=True)
class Report:
    sent: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    items: int = 0


class Digests:
    def __init__(self, cfg: Config, quarantine: QuarantineService, hop: NextHop,
                 secret: bytes, *, clock: Callable[[], float] = time.time) -> None:
        self._cfg = cfg
        self._q = quarantine
        self._store = quarantine.store
        self._hop = hop
        self._secret = secret
        self._clock = clock
        self._zone = cfg.zone
        self._retry: dict[str, tuple[bytes, float]] = {}  # rcpt -> (digest, give up at)
        self._env: jinja2.Environment | None = None  # made at the first digest

    def _templates(self) -> jinja2.Environment:
        # Imported here: only the process that sends digests (the primary) loads jinja2.
        import jinja2
        if self._env is None:
            self._env = jinja2.Environment(
                loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                autoescape=jinja2.select_autoescape(["html"], default_for_string=False),
                keep_trailing_newline=True)
            self._env.filters["when"] = self._cfg.when
        return self._env

    def next_due(self, after: float) -> float:
        """The first digest time (hour:00 local) strictly after `after`."""
        local = dt.datetime.fromtimestamp(after, self._zone)
        due = local.replace(hour=self._cfg.digest.hour, minute=0, second=0, microsecond=0)
        if due.timestamp() <= after:
            due = (local + dt.timedelta(days=1)).replace(
                hour=self._cfg.digest.hour, minute=0, second=0, microsecond=0)
        return due.timestamp()

    def domains(self) -> frozenset[str]:
        chosen = self._cfg.digest.domains
        return frozenset(d.lower() for d in chosen) if chosen else self._cfg.domains

    # ---- scheduling ---------------------------------------------------------------------

    async def tick(self) -> Report | None:
        """Send the digests when due; retry those that could not be delivered."""
        if not self._cfg.digest.enabled:
            return None
        await self._retry_failed()
        now = self._clock()
        mark = await self._store.mark(MARK)
        if mark is None:  # first start: the first digest comes at the next digest time
            await self._store.move_mark(MARK, None, now)
            return None
        if now < self.next_due(mark):
            return None
        return await self._claim_and_send(mark, now)

    async def send_now(self) -> Report | None:
        """The digests of everything held since the last one (or the last day), now (the
        CLI). None if another process sent them at that moment."""
        now = self._clock()
        mark = await self._store.mark(MARK)
        return await self._claim_and_send(mark, now, since=now - 86400 if mark is None else mark)

    async def _claim_and_send(self, mark: float | None, now: float, *,
                              since: float | None = None) -> Report | None:
        if not await self._store.move_mark(MARK, mark, now):
            return None  # another process took this window
        start = mark if since is None else since
        assert start is not None
        report = await self.send(start, now)
        log.info("quarantine digests", extra={"fields": {
            "recipients": len(report.sent), "failed": len(report.failed),
            "items": report.items}})
        return report

    # ---- building and sending -----------------------------------------------------------

    async def plan(self, since: float, until: float) -> dict[str, list[Entry]]:
        """Who gets a digest for the window, with what."""
        domains = self.domains()
        optouts = await self._store.digest_optouts()
        public = self._cfg.web.public_url.rstrip("/")
        expires = int(until + self._cfg.digest.link_days * 86400)
        groups = self._cfg.digest.direct_release_groups
        out: dict[str, list[Entry]] = defaultdict(list)
        for item in await self._store.held_between(since, until):
            reasons = self._q.reasons(item, 1)
            direct = self._q.recipient_may_release(item, groups)
            for n, rcpt in enumerate(item.rcpts):
                address = rcpt.lower()
                if address in out and any(e.item.id == item.id for e in out[address]):
                    continue  # the same address twice in one envelope
                if address.rpartition("@")[2] not in domains \
                        or self._store.blind(address) in optouts:
                    continue
                link = make_link(self._secret, item, n, "l" if direct else "d", expires)
                out[address].append(Entry(
                    item=item, rcpt_no=n, reason=reasons[0] if reasons else "score élevé",
                    url=f"{public}/rapport/{link.token}" if public else "", direct=direct))
        return dict(out)

    def build(self, rcpt: str, entries: list[Entry], *, until: float) -> bytes:
        """The digest mail (text and HTML) for one recipient, as wire bytes."""
        public = self._cfg.web.public_url.rstrip("/")
        optout = (f"{public}/rapport/desabonnement/"
                  f"{optout_token(self._secret, self._store.blind(rcpt))}" if public else "")
        shown, more = entries[:MAX_ENTRIES], max(0, len(entries) - MAX_ENTRIES)
        n = len(entries)
        context = {"rcpt": rcpt, "entries": shown, "more": more, "optout": optout,
                   "days": self._cfg.digest.link_days, "links": bool(public),
                   "sender_of": sender_of, "sender_parts": sender_parts, "day": self._cfg.when(until)[:10],
                   "direct": any(e.direct for e in shown)}
        msg = EmailMessage(policy=SMTP)
        domain = rcpt.rpartition("@")[2]
        msg["From"] = Address("Passerelle de sécurité", "postmaster", domain)
        msg["To"] = rcpt
        msg["Subject"] = (f"Rapport de quarantaine : {n} message{'s' if n > 1 else ''} "
                          f"retenu{'s' if n > 1 else ''} pour vous")
        msg["Date"] = formatdate(until, localtime=True)
        msg["Message-ID"] = make_msgid(domain=self._cfg.gateway.hostname)
        msg["Auto-Submitted"] = "auto-generated"
        msg["X-Gateway-Digest"] = self._cfg.when(until)[:10]
        if optout:
            msg["List-Unsubscribe"] = f"<{optout}>"
            msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        msg.set_content(self._templates().get_template("digest_mail.txt").render(**context),
                        charset="utf-8", cte="quoted-printable")
        msg.add_alternative(self._templates().get_template("digest_mail.html").render(**context),
                            subtype="html", charset="utf-8", cte="quoted-printable")
        return msg.as_bytes()

    async def send(self, since: float, until: float) -> Report:
        report = Report()
        plan = await self.plan(since, until)
        report.items = len({e.item.id for entries in plan.values() for e in entries})
        for rcpt, entries in sorted(plan.items()):
            raw = self.build(rcpt, entries, until=until)
            if await self._deliver(rcpt, raw):
                report.sent.append(rcpt)
            else:
                report.failed.append(rcpt)
        return report

    async def _deliver(self, rcpt: str, raw: bytes) -> bool:
        try:
            await deliver(self._hop, "", (rcpt,), b"", raw)
        except DownstreamRejected as exc:  # refused for good: nothing to retry
            log.warning("quarantine digest refused", extra={"fields": {
                "rcpt": rcpt, "error": str(exc)}})
            self._retry.pop(rcpt, None)
            return False
        except (DownstreamUnavailable, OSError, TimeoutError) as exc:
            deadline = self._retry.get(rcpt, (b"", self._clock() + RETRY_FOR_S))[1]
            self._retry[rcpt] = (raw, deadline)
            log.warning("quarantine digest not delivered for now", extra={"fields": {
                "rcpt": rcpt, "error": str(exc) or type(exc).__name__}})
            return False
        self._retry.pop(rcpt, None)
        return True

    async def _retry_failed(self) -> None:
        now = self._clock()
        for rcpt, (raw, deadline) in list(self._retry.items()):
            if now > deadline:
                del self._retry[rcpt]
                log.error("quarantine digest given up", extra={"fields": {"rcpt": rcpt}})
            elif await self._deliver(rcpt, raw):
                log.info("quarantine digest delivered on retry", extra={"fields": {
                    "rcpt": rcpt}})
