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

import asyncio
import datetime as dt
import hashlib
import hmac
import logging
import re
import time
import unicodedata
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP, SMTPUTF8
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.config import Config
from gateway.errors import DownstreamRejected, DownstreamUnavailable
from gateway.message import decode_words, header_addresses, readable
from gateway.quarantine_service import QuarantineService
from gateway.relay import NextHop, deliver
from quarantine.store import Item

if TYPE_CHECKING:
    import jinja2

log = logging.getLogger(__name__)

MARK = "digest"  # when the last digest was sent (the schedule)
ROW_MARK = "digest-row"  # the position of the last item it listed (Store.last_row)
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


def shown(text: str, limit: int = 200) -> str:
    """Text of a held message as a digest and its link page show it: encoded words decoded,
    raw UTF-8 read, every control or format character (line breaks, tabs, bidi overrides)
    made a space, so that a subject cannot add lines to the digest nor reorder its text;
    cut to `limit` characters."""
    try:
        text = decode_words(text)
    except (ValueError, LookupError):
        text = readable(text)
    text = "".join(" " if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp") else c
                   for c in text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def sender_parts(item: Item) -> tuple[str, str]:
    """Who the message says it is from: From's display name and address (the envelope
    sender's when From has none), as `shown`."""
    pairs = header_addresses(readable(item.from_header))
    name, addr = pairs[0] if pairs else ("", "")
    if addr and "@" in addr:
        return shown(name, 80), shown(addr, 120)
    return "", shown(item.mail_from, 120) or "(expéditeur vide)"


def sender_of(item: Item) -> str:
    name, addr = sender_parts(item)
    return f"{name} <{addr}>" if name else addr


@dataclass(frozen=True, slots=True)
class Entry:
    item: Item
    rcpt_no: int
    sender: tuple[str, str]  # display name, address (`sender_parts`)
    subject: str  # `shown`
    reason: str  # the main French reason, `shown`
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
        await self.retry_pending()
        now = self._clock()
        last = await self._store.mark(MARK)
        if last is None:  # first start: the first digest comes at the next digest time
            await self._store.move_mark(ROW_MARK, None, await self._store.last_row())
            await self._store.set_mark(MARK, now)
            return None
        if now < self.next_due(last):
            return None
        return await self._claim_and_send(now)

    async def send_now(self) -> Report | None:
        """The digests of everything held since the last one, now (the CLI). None if another
        process sent them at that moment."""
        return await self._claim_and_send(self._clock())

    async def _claim_and_send(self, now: float) -> Report | None:
        """Move the position mark to the newest item by a compare-and-set, then send what
        was stored in between: of two processes, one sends each item once."""
        after = await self._store.mark(ROW_MARK)
        upto = await self._store.last_row()
        if not await self._store.move_mark(ROW_MARK, after, upto):
            return None  # another process took this window
        await self._store.set_mark(MARK, now)
        report = await self.send(int(after or 0), upto, now)
        log.info("quarantine digests", extra={"fields": {
            "recipients": len(report.sent), "failed": len(report.failed),
            "items": report.items}})
        return report

    # ---- building and sending -----------------------------------------------------------

    async def plan(self, after_row: int, upto_row: int, now: float) -> dict[str, list[Entry]]:
        """Who gets a digest for the items stored between the two positions, with what (the
        items unsealed and sorted out in threads: thousands of them, off the event loop)."""
        items = await self._store.held_between(after_row, upto_row)
        optouts = await self._store.digest_optouts()
        return await asyncio.to_thread(self._plan, items, optouts, now)

    def _plan(self, items: list[Item], optouts: set[str],
              now: float) -> dict[str, list[Entry]]:
        domains = self.domains()
        public = self._cfg.web.public_url.rstrip("/")
        expires = int(now + self._cfg.digest.link_days * 86400)
        groups = self._cfg.digest.direct_release_groups
        out: dict[str, list[Entry]] = defaultdict(list)
        listed: set[tuple[str, str]] = set()
        for item in items:
            reasons = self._q.reasons(item, 1)
            direct = self._q.recipient_may_release(item, groups)
            sender, subject = sender_parts(item), shown(item.subject) or "(sans objet)"
            reason = shown(reasons[0], 300) if reasons else "score élevé"
            for n, rcpt in enumerate(item.rcpts):
                address = rcpt.lower()
                if (address, item.id) in listed:
                    continue  # the same address twice in one envelope
                if address.rpartition("@")[2] not in domains \
                        or self._store.blind(address) in optouts:
                    continue
                listed.add((address, item.id))
                link = make_link(self._secret, item, n, "l" if direct else "d", expires)
                out[address].append(Entry(
                    item=item, rcpt_no=n, sender=sender, subject=subject, reason=reason,
                    url=f"{public}/rapport/{link.token}" if public else "", direct=direct))
        return dict(out)

    def build(self, rcpt: str, entries: list[Entry], *, now: float) -> bytes:
        """The digest mail (text and HTML) for one recipient, as wire bytes."""
        public = self._cfg.web.public_url.rstrip("/")
        optout = (f"{public}/rapport/desabonnement/"
                  f"{optout_token(self._secret, self._store.blind(rcpt))}" if public else "")
        listed, more = entries[:MAX_ENTRIES], max(0, len(entries) - MAX_ENTRIES)
        n = len(entries)
        context = {"rcpt": rcpt, "entries": listed, "more": more, "optout": optout,
                   "days": self._cfg.digest.link_days, "links": bool(public),
                   "day": self._cfg.when(now)[:10], "direct": any(e.direct for e in listed)}
        # An address with non-ASCII letters needs SMTPUTF8 headers (RFC 6532).
        msg = EmailMessage(policy=SMTP if rcpt.isascii() else SMTPUTF8)
        domain = rcpt.rpartition("@")[2]
        msg["From"] = Address("Passerelle de sécurité", "postmaster", domain)
        msg["To"] = rcpt
        msg["Subject"] = (f"Rapport de quarantaine : {n} message{'s' if n > 1 else ''} "
                          f"retenu{'s' if n > 1 else ''} pour vous")
        msg["Date"] = formatdate(now, localtime=True)
        msg["Message-ID"] = make_msgid(domain=self._cfg.gateway.hostname)
        msg["Auto-Submitted"] = "auto-generated"
        msg["X-Gateway-Digest"] = self._cfg.when(now)[:10]
        if optout:
            msg["List-Unsubscribe"] = f"<{optout}>"
            msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        msg.set_content(self._templates().get_template("digest_mail.txt").render(**context),
                        charset="utf-8", cte="quoted-printable")
        msg.add_alternative(self._templates().get_template("digest_mail.html").render(**context),
                            subtype="html", charset="utf-8", cte="quoted-printable")
        return msg.as_bytes()

    async def send(self, after_row: int, upto_row: int, now: float) -> Report:
        report = Report()
        plan = await self.plan(after_row, upto_row, now)
        report.items = len({e.item.id for entries in plan.values() for e in entries})
        for rcpt, entries in sorted(plan.items()):
            try:  # one recipient's digest never stops the others'; rendered off the loop
                raw = await asyncio.to_thread(self.build, rcpt, entries, now=now)
            except Exception:  # noqa: BLE001
                log.exception("quarantine digest not built", extra={"fields": {"rcpt": rcpt}})
                report.failed.append(rcpt)
                continue
            if await self._deliver(rcpt, raw):
                report.sent.append(rcpt)
            else:
                report.failed.append(rcpt)
                await self._store.add_pending_digest(rcpt, raw, now + RETRY_FOR_S)
        return report

    async def _deliver(self, rcpt: str, raw: bytes) -> bool | None:
        """True: delivered; None: refused for good; False: to be tried again."""
        try:
            await deliver(self._hop, "", (rcpt,), b"", raw)
        except DownstreamRejected as exc:  # refused for good: nothing to retry
            log.warning("quarantine digest refused", extra={"fields": {
                "rcpt": rcpt, "error": str(exc)}})
            return None
        except (DownstreamUnavailable, OSError, TimeoutError) as exc:
            log.warning("quarantine digest not delivered for now", extra={"fields": {
                "rcpt": rcpt, "error": str(exc) or type(exc).__name__}})
            return False
        return True

    async def retry_pending(self) -> None:
        """The digests the mailbox server refused for now (this process's, or the CLI's),
        kept in the store for RETRY_FOR_S."""
        now = self._clock()
        for seq, rcpt, raw, give_up_at in await self._store.pending_digests():
            if now > give_up_at:
                log.error("quarantine digest given up", extra={"fields": {"rcpt": rcpt}})
                await self._store.drop_pending_digest(seq)
                continue
            delivered = await self._deliver(rcpt, raw)
            if delivered is not False:
                await self._store.drop_pending_digest(seq)
            if delivered:
                log.info("quarantine digest delivered on retry", extra={"fields": {
                    "rcpt": rcpt}})
