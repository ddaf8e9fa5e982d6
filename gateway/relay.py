"""Delivery to the next hop: the practice's mailbox server over SMTP, or the embedded Maildir.

Recipient rule (before-queue, no silent drop): the next hop is asked about each recipient at
RCPT time, on a downstream transaction opened at the first RCPT of the client's transaction
(Postfix's before-queue proxy does the same). Its answer for that recipient is passed back to
the client, so a recipient the mailbox server refuses is refused to the sender, who gets the
bounce from its own server. At end of DATA, the message goes out on that same downstream
transaction; if the connection was lost meanwhile it is opened again, and any recipient now
refused makes the whole message fail temporarily (nothing was delivered, the sender retries).

Errors: next hop down, timing out, or answering 4xx -> DownstreamUnavailable (451 to the sender);
5xx -> DownstreamRejected (passed back).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiosmtplib

from gateway.config import Config, HostPort
from gateway.deps.aiosmtplib import write_data
from gateway.errors import DownstreamRejected, DownstreamUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class RcptAnswer:
    code: int
    text: str

    @property
    def accepted(self) -> bool:
        return 200 <= self.code < 300


class Transaction(Protocol):
    tls: bool  # the leg to the next hop is encrypted (or local)

    async def add_recipient(self, rcpt: str) -> RcptAnswer: ...

    async def send(self, head: bytes, raw: bytes) -> str:
        """Deliver `head + raw` (our header fields, then the message as received) to the
        accepted recipients; returns the next hop's reply text. Kept in two pieces so that a
        large message is not copied just to prepend a few header lines."""
        ...

    def restrict(self, rcpts: list[str]) -> None:
        """Keep only these of the accepted recipients for `send`."""
        ...

    def abort(self) -> None: ...


class NextHop(Protocol):
    name: str

    async def begin(self, mail_from: str, *, smtputf8: bool = False) -> Transaction: ...

    async def probe(self) -> None:
        """Raise DownstreamUnavailable (or DownstreamRejected) unless the next hop would
        take a message now: the readiness check (`/readyz`)."""
        ...


def _is_ascii(text: str) -> bool:
    return text.isascii()


_LINE_ENDS = re.compile(rb"\r\n|\n|\r(?!\n)")


def wire_lines(data: bytes) -> bytes:
    """Bytes ready for DATA: every line ended by CRLF (lone CR or LF too, so that no next hop
    can read a smuggled end of data), and dot-stuffed (RFC 5321 section 4.5.2). The common case,
    a message whose line ends are already all CRLF, costs a few C-speed passes, not a regex."""
    crlf = data.count(b"\r\n")
    if data.count(b"\n") != crlf or data.count(b"\r") != crlf:
        data = _LINE_ENDS.sub(b"\r\n", data)
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..")


# ---- SMTP next hop ----------------------------------------------------------------------


class SmtpNextHop:
    """An SMTP server we hand mail to: the practice's mailbox server (inbound) or its
    provider's relay (the smarthost, outbound)."""

    def __init__(self, address: HostPort, *, local_hostname: str, timeout_s: float,
                 starttls: str, tls_verify: bool, ca_file: str = "", username: str = "",
                 password: str = "") -> None:
        self._address = address
        self._local_hostname = local_hostname
        self.timeout_s = timeout_s
        self._start_tls: bool | None = {"opportunistic": None, "required": True,
                                        "off": False}[starttls]
        self._validate = tls_verify
        self._ca = ca_file or None
        self._username = username or None
        self._password = password or None
        self.name = f"smtp:{address}"

    async def begin(self, mail_from: str, *, smtputf8: bool = False) -> SmtpTransaction:
        txn = SmtpTransaction(self, mail_from, smtputf8)
        await txn.open()
        return txn

    async def probe(self) -> None:
        client = self._client()
        try:  # its greeting, EHLO and STARTTLS as for a message
            with _errors("connect", client):
                await client.connect()
            with _errors("quit", client):
                await client.quit()
        finally:  # also when the caller's deadline cancels it half-way
            client.close()

    async def connect(self) -> aiosmtplib.SMTP:
        client = self._client()
        with _errors("connect", client):
            await client.connect()
        return client

    def _client(self) -> aiosmtplib.SMTP:
        return aiosmtplib.SMTP(
            hostname=self._address.host, port=self._address.port,
            local_hostname=self._local_hostname, timeout=self.timeout_s,
            start_tls=self._start_tls, validate_certs=self._validate, cert_bundle=self._ca,
            username=self._username, password=self._password)


class SmtpTransaction:
    def __init__(self, hop: SmtpNextHop, mail_from: str, smtputf8: bool) -> None:
        self._hop = hop
        self._mail_from = mail_from
        self._smtputf8 = smtputf8 or not _is_ascii(mail_from)
        self._client: aiosmtplib.SMTP | None = None
        self._accepted: list[str] = []
        self.tls = False  # whether the connection to the next hop is encrypted

    async def open(self) -> None:
        client = await self._hop.connect()
        try:
            await self._start(client)
        except BaseException:  # whatever went wrong, the connection is not left open
            client.close()
            raise
        self._client = client

    async def _start(self, client: aiosmtplib.SMTP) -> None:
        self.tls = client.get_transport_info("sslcontext") is not None
        if client.last_ehlo_response is None:  # without STARTTLS, connect() sent no EHLO
            with _errors("EHLO", client):
                await client.ehlo()
        options: list[str] = []
        encoding = "ascii"
        if client.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        if self._smtputf8:
            if not client.supports_extension("smtputf8"):
                raise DownstreamRejected(553, "5.6.7 Next hop does not support SMTPUTF8")
            options.append("SMTPUTF8")
            encoding = "utf-8"
        with _errors("MAIL", client):
            await client.mail(self._mail_from, options=options, encoding=encoding)

    async def add_recipient(self, rcpt: str) -> RcptAnswer:
        client = self._client
        if client is None:
            raise DownstreamUnavailable("transaction closed")
        encoding = "utf-8" if self._smtputf8 else "ascii"
        try:
            resp = await client.rcpt(rcpt, encoding=encoding)
        except aiosmtplib.SMTPResponseException as exc:
            return RcptAnswer(code=exc.code, text=exc.message)
        except ValueError:  # an address the client library will not write (never relayed)
            return RcptAnswer(code=553, text="5.1.3 Address not accepted")
        except (aiosmtplib.SMTPException, OSError) as exc:
            self.abort()
            raise _unavailable("RCPT", exc) from None
        self._accepted.append(rcpt)
        return RcptAnswer(code=resp.code, text=resp.message)

    async def send(self, head: bytes, raw: bytes) -> str:
        if not self._accepted:
            raise DownstreamUnavailable("no recipient accepted")
        client = self._client
        if client is None or not client.is_connected:
            await self._reopen()
            client = self._client
        assert client is not None
        try:
            with _errors("DATA", client):
                resp = await client.execute_command(b"DATA")
                if resp.code != 354:
                    raise aiosmtplib.SMTPDataError(resp.code, resp.message)
                # wire_lines() gives the bytes SMTP.data() would (tests/test_relay.py); a
                # large message's passes over its bytes would hold the loop: a thread then.
                body = (wire_lines(raw) if len(raw) < 1_000_000
                        else await asyncio.to_thread(wire_lines, raw))
                resp = await write_data(client, (wire_lines(head), body), self._hop.timeout_s)
                if resp.code != 250:
                    raise aiosmtplib.SMTPDataError(resp.code, resp.message)
        finally:
            self.abort()
        return resp.message

    def restrict(self, rcpts: list[str]) -> None:
        # SMTP cannot take a recipient back: the next `send` opens a new connection and
        # replays MAIL and RCPT for the kept ones (as after a dropped connection).
        self.abort()
        self._accepted = [r for r in self._accepted if r in rcpts]

    async def _reopen(self) -> None:
        """The downstream connection dropped while we scanned: replay MAIL and RCPT."""
        log.info("next hop connection lost before DATA; reconnecting")
        self.abort()
        rcpts, self._accepted = self._accepted, []
        await self.open()
        for rcpt in rcpts:
            answer = await self.add_recipient(rcpt)
            if not answer.accepted:
                self.abort()
                raise DownstreamUnavailable(
                    f"recipient refused on reconnect: {answer.code}", code=answer.code)

    def abort(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()


@contextlib.contextmanager
def _errors(stage: str, client: aiosmtplib.SMTP) -> Iterator[None]:
    """Map the client's errors: 5xx -> DownstreamRejected, the rest -> DownstreamUnavailable;
    the connection is closed in either case."""
    try:
        yield
    except aiosmtplib.SMTPResponseException as exc:
        client.close()
        raise _from_response(stage, exc) from None
    except ValueError:  # an address the client library will not write: never relayed
        client.close()
        raise DownstreamRejected(553, f"5.1.3 Address not accepted at {stage}") from None
    except (aiosmtplib.SMTPException, OSError) as exc:
        client.close()
        raise _unavailable(stage, exc) from None


def _unavailable(stage: str, exc: BaseException) -> DownstreamUnavailable:
    return DownstreamUnavailable(f"next hop {stage}: {type(exc).__name__}: {exc}")


def _from_response(stage: str, exc: aiosmtplib.SMTPResponseException) -> Exception:
    if 500 <= exc.code < 600:
        return DownstreamRejected(exc.code, exc.message)
    return DownstreamUnavailable(f"next hop {stage}: {exc.code} {exc.message}", code=exc.code)


# ---- embedded Maildir next hop ------------------------------------------------------------


class MaildirNextHop:
    """Delivers to <root>/<recipient>/new, one Maildir per recipient; durable before 250."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.name = f"maildir:{root}"
        self._host = socket.gethostname().replace("/", "_").replace(":", "_")
        self._seq = itertools.count()

    async def begin(self, mail_from: str, *, smtputf8: bool = False) -> MaildirTransaction:
        return MaildirTransaction(self)

    async def probe(self) -> None:
        def writable() -> None:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not os.access(self.root, os.W_OK | os.X_OK):
                raise DownstreamUnavailable(f"Maildir {self.root} is not writable")
        try:
            await asyncio.to_thread(writable)
        except OSError as exc:
            raise DownstreamUnavailable(f"Maildir {self.root}: {exc.strerror or exc}") from None

    def deliver_sync(self, rcpts: list[str], head: bytes, raw: bytes) -> None:
        body = head.replace(b"\r\n", b"\n") + raw.replace(b"\r\n", b"\n")
        for rcpt in rcpts:
            box = self.root / _mailbox_name(rcpt)
            # Each level private (mkdir's mode applies to the last one only): patients' mail.
            for d in (self.root, box, box / "tmp", box / "new", box / "cur"):
                d.mkdir(exist_ok=True, mode=0o700)
            name = f"{time.time():.6f}.P{os.getpid()}Q{next(self._seq)}.{self._host}"
            tmp = box / "tmp" / name
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                head = f"Delivered-To: {rcpt}\n".encode("utf-8", "surrogateescape")
                view = memoryview(head + body)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, box / "new" / name)
            dfd = os.open(box / "new", os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)


def _mailbox_name(rcpt: str) -> str:
    name = rcpt.strip().lower().replace(os.sep, "_").replace("\0", "_")
    return name.lstrip(".") or "_"


class MaildirTransaction:
    tls = True  # a local disk, not a network leg

    def __init__(self, hop: MaildirNextHop) -> None:
        self._hop = hop
        self._rcpts: list[str] = []

    async def add_recipient(self, rcpt: str) -> RcptAnswer:
        self._rcpts.append(rcpt)
        return RcptAnswer(code=250, text="2.1.5 OK")

    async def send(self, head: bytes, raw: bytes) -> str:
        if not self._rcpts:
            raise DownstreamUnavailable("no recipient accepted")
        try:
            await asyncio.to_thread(self._hop.deliver_sync, self._rcpts, head, raw)
        except OSError as exc:
            raise DownstreamUnavailable(f"maildir write failed: {exc}") from None
        return "2.0.0 delivered to maildir"

    def restrict(self, rcpts: list[str]) -> None:
        self._rcpts = [r for r in self._rcpts if r in rcpts]

    def abort(self) -> None:
        self._rcpts = []


def create_next_hop(cfg: Config) -> NextHop:
    """Inbound mail's next hop: the practice's mailbox server, or the embedded Maildir."""
    address = cfg.next_hop_address
    if address is None:
        return MaildirNextHop(cfg.data_dir / "maildir")
    hop = cfg.next_hop
    return SmtpNextHop(address, local_hostname=cfg.gateway.hostname, timeout_s=hop.timeout_s,
                       starttls=hop.starttls, tls_verify=hop.tls_verify, ca_file=hop.tls_ca_file)


def create_smarthost(cfg: Config) -> NextHop:
    """Outbound mail's next hop: the provider's relay, or the embedded Maildir `outbox`."""
    address = cfg.smarthost
    if address is None:
        return MaildirNextHop(cfg.data_dir / "outbox")
    sub = cfg.submission
    password = ""
    if sub.smarthost_password_file:
        password = Path(sub.smarthost_password_file).read_text(encoding="utf-8").strip()
    return SmtpNextHop(address, local_hostname=cfg.gateway.hostname,
                       timeout_s=cfg.next_hop.timeout_s, starttls=sub.smarthost_starttls,
                       tls_verify=sub.smarthost_tls_verify, ca_file=sub.smarthost_ca_file,
                       username=sub.smarthost_username, password=password)


async def deliver(hop: NextHop, mail_from: str, rcpts: tuple[str, ...], head: bytes,
                  raw: bytes) -> None:
    """Whole-message delivery (quarantine release): every recipient must be accepted."""
    txn = await hop.begin(mail_from, smtputf8=not all(_is_ascii(r) for r in rcpts))
    try:
        for rcpt in rcpts:
            answer = await txn.add_recipient(rcpt)
            if not answer.accepted:
                if answer.code >= 500:
                    raise DownstreamRejected(answer.code, f"{rcpt}: {answer.text}")
                raise DownstreamUnavailable(f"{rcpt}: {answer.code} {answer.text}",
                                            code=answer.code)
        await txn.send(head, raw)
    finally:
        txn.abort()
