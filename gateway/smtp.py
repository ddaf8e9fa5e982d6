"""The SMTP side: aiosmtpd server and handler. Envelope -> Inbound; Outcome -> reply.

`GatewaySMTP` replaces aiosmtpd's line-by-line DATA reader with one that reads large chunks.
Its end-of-data rule is aiosmtpd's (1.4.5+, against SMTP smuggling): data ends only at
CRLF "." CRLF; a dot line delimited by a bare CR or LF is data. Dot-unstuffing removes the first
dot of every line that starts with one (RFC 5321 section 4.5.2), as aiosmtpd does.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.header
import logging
import math
import re
import secrets
import socket
import ssl
from collections.abc import Sequence
from typing import Any

from aiosmtpd.proxy_protocol import ProxyData
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

from gateway import address, metrics, netaddr, replies
from gateway.accounts import AccountFile
from gateway.authstate import AuthState, Throttle
from gateway.config import Config
from gateway.deps.aiosmtpd import SMTPBase
from gateway.deps.streams import unread
from gateway.errors import DownstreamRejected, DownstreamUnavailable
from gateway.logs import queue_id_var
from gateway.message import Direction, Inbound
from gateway.netaddr import client_key, networks, parse_ip, within
from gateway.pipeline import Pipeline, reply_text
from gateway.relay import NextHop, RcptAnswer, Transaction

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
_END = b"\r\n.\r\n"
_B32 = "0123456789BCDFGHJKLMNPQRSTVWXYZ"


def new_queue_id() -> str:
    return "".join(secrets.choice(_B32) for _ in range(12))


class GatewaySession(Session):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.txn: Transaction | None = None
        self.abandoned = 0  # next-hop transactions dropped before DATA on this connection
        self.close_after_reply = False
        self.checked = ""  # the path of the command being answered, as gateway/address.py read it
        self.txn_timer: asyncio.TimerHandle | None = None
        self.trusted = False  # submission: a client network allowed to send without AUTH
        self.auth_user = ""  # submission: the login that authenticated

    def abort_txn(self) -> None:
        self.stop_txn_timer()
        txn, self.txn = self.txn, None
        if txn is not None:
            self.abandoned += 1
            txn.abort()

    def take_txn(self) -> Transaction | None:
        """The transaction, now owned by the caller (end of DATA), who must abort it."""
        self.stop_txn_timer()
        txn, self.txn = self.txn, None
        return txn

    def stop_txn_timer(self) -> None:
        timer, self.txn_timer = self.txn_timer, None
        if timer is not None:
            timer.cancel()


class Slots:
    """Transactions open with one next hop, in this serving process: in all and per client
    address. The configured limits are for the whole gateway, shared out between the serving
    processes, so that the next hop never sees more than the configured number."""

    def __init__(self, *, total: int, per_client: int, processes: int = 1) -> None:
        self.total = max(1, total // processes)
        self.per_client = max(1, per_client // processes)
        self.open = 0
        self._by_client: dict[str, int] = {}

    def take(self, client: str) -> replies.Reply | None:
        """None when a slot was taken for `client` (an address; IPv6 ones count by /64, what
        one host is given); else the reply to give."""
        if self.open >= self.total:
            return replies.BUSY_NEXT_HOP
        if self._by_client.get(client, 0) >= self.per_client:
            return replies.BUSY_CLIENT
        self.open += 1
        self._by_client[client] = self._by_client.get(client, 0) + 1
        return None

    def give(self, client: str) -> None:
        self.open -= 1
        left = self._by_client.pop(client, 1) - 1
        if left:
            self._by_client[client] = left


class _Leased:
    """A next-hop transaction holding a slot: the slot is given back when it is aborted (the
    one way every transaction ends: delivered, dropped, failed or the client gone)."""

    def __init__(self, txn: Transaction, slots: Slots, client: str) -> None:
        self._txn = txn
        self._slots: Slots | None = slots
        self._client = client
        self.tls = txn.tls

    async def add_recipient(self, rcpt: str) -> RcptAnswer:
        return await self._txn.add_recipient(rcpt)

    async def send(self, head: bytes, raw: bytes) -> str:
        return await self._txn.send(head, raw)

    def restrict(self, rcpts: list[str]) -> None:
        self._txn.restrict(rcpts)

    def abort(self) -> None:
        self._txn.abort()
        slots, self._slots = self._slots, None
        if slots is not None:
            slots.give(self._client)


class ConnectionCounter:
    """Sessions of one serving process; `idle` is set when none is open."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def opened(self) -> None:
        self.active += 1
        self.idle.clear()
        metrics.get().session(1)

    def closed(self) -> None:
        self.active -= 1
        metrics.get().session(-1)
        if self.active == 0:
            self.idle.set()


def _no_delay(transport: asyncio.BaseTransport) -> None:
    """Disable Nagle: aiosmtpd writes a multi-line reply line by line, and with Nagle on, each
    line after the first waits for the client's delayed ACK (40 ms). asyncio sets TCP_NODELAY
    itself only on sockets whose proto is IPPROTO_TCP, which a socket inherited from a
    pre-forking parent (or made with proto 0) is not."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# XCLIENT as Postfix defines it (XCLIENT_README): the attributes a front MTA may give.
XCLIENT_ATTRIBUTES = ("ADDR", "NAME", "PORT", "PROTO", "HELO", "LOGIN", "DESTADDR", "DESTPORT")
_UNAVAILABLE = ("[UNAVAILABLE]", "[TEMPUNAVAIL]")
_XTEXT = re.compile(rb"\+([0-9A-F]{2})")


def parse_xclient(arg: str | None) -> dict[str, str] | None:
    """`NAME=value ...` (values in xtext, RFC 3461) -> {NAME: value}; None when malformed:
    an unknown attribute, no value, a stray `+`, a control character or a value over 255."""
    attrs: dict[str, str] = {}
    for token in (arg or "").split():
        name, sep, raw = token.partition("=")
        name = name.upper()
        if not sep or not raw or name not in XCLIENT_ATTRIBUTES:
            return None
        try:  # xtext decodes to bytes: UTF-8 (a HELO in Unicode comes that way)
            encoded = raw.encode("ascii")
            value = _XTEXT.sub(lambda m: bytes([int(m[1], 16)]), encoded).decode("utf-8")
        except UnicodeError:
            return None
        if b"+" in _XTEXT.sub(b"", encoded) or len(value) > 255 or not value.isprintable():
            return None
        attrs[name] = value
    return attrs or None


class GatewaySMTP(SMTPBase):
    """`proxy_hosts`: the front proxies whose connections start with a PROXY protocol header
    (v1 or v2) naming the real client; `xclient_hosts`: the front MTAs that may name it with
    XCLIENT. Both are judged on the TCP connection's own address; anyone else's PROXY header
    or XCLIENT is refused and logged."""

    def __init__(self, handler: Handler, *, counter: ConnectionCounter, data_timeout: float,
                 data_deadline: float, allow_percent_hack: bool = False,
                 proxy_hosts: Sequence[netaddr.IPNetwork] = (),
                 xclient_hosts: Sequence[netaddr.IPNetwork] = (),
                 proxy_timeout: float = 10.0, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._counter = counter
        self._data_timeout = data_timeout
        self._data_deadline = data_deadline
        self._allow_percent_hack = allow_percent_hack
        self._counted = False
        self._proxy_hosts = proxy_hosts
        self._xclient_hosts = xclient_hosts
        self._proxy_wait = proxy_timeout
        self._tcp_peer = ""  # the connection's own address (a proxy's, behind one)
        self._may_xclient = False
        self._client: tuple[str, int] | None = None  # the real client, as PROXY or XCLIENT said
        self._fixed_helo = ""  # XCLIENT HELO=: the client's, over the front MTA's own EHLO
        self._ehlo_pending = False
        # The first line of a PROXY v2 header ("\r\n\r\n\0\r\nQUIT\n") read as commands.
        self.add_command("\x00", self._untrusted_proxy_v2)

    def new_session(self) -> GatewaySession:
        return GatewaySession(self.loop)

    def on_reset(self) -> None:
        # RSET, EHLO/HELO and STARTTLS end a transaction: drop its downstream side too.
        session = getattr(self, "session", None)
        if isinstance(session, GatewaySession):
            session.abort_txn()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.fresh_connection:
            if self._counter.active >= self._counter.limit:
                log.warning("connection limit %d reached; refusing a client", self._counter.limit)
                assert isinstance(transport, asyncio.WriteTransport)
                transport.write(f"{replies.TOO_BUSY}\r\n".encode())
                transport.close()
                return
            self._counter.opened()
            self._counted = True
            _no_delay(transport)
            peer = transport.get_extra_info("peername")
            self._tcp_peer = str(peer[0]) if isinstance(peer, tuple) else ""
            ip = parse_ip(self._tcp_peer)
            self._may_xclient = within(ip, self._xclient_hosts)
            self.expect_proxy_header(self._proxy_wait if within(ip, self._proxy_hosts) else None)
            super().connection_made(transport)
            return
        super().connection_made(transport)
        self._name_client()  # STARTTLS's new session: still the real client

    def _name_client(self) -> None:
        """The session's peer is the real client once a proxy or XCLIENT named it: every
        check, limit, log line and Received header reads it there."""
        if self._client is not None and self.session is not None:
            self.session.peer = self._client  # type: ignore[assignment]  # aiosmtpd: a tuple

    def connection_lost(self, error: Exception | None) -> None:
        if self.session is None:  # refused at connection_made
            return
        if self._counted:
            self._counted = False
            self._counter.closed()
        if isinstance(self.session, GatewaySession):
            self.session.abort_txn()
        super().connection_lost(error)

    async def push(self, status: str | bytes) -> None:
        if isinstance(status, str):
            if self._ehlo_pending and status.startswith("250 "):  # EHLO's last line
                self._ehlo_pending = False
                await super().push("250-XCLIENT " + " ".join(XCLIENT_ATTRIBUTES))
            await super().push(_printable(status))
        else:
            await super().push(status)

    def before_timeout_close(self) -> None:
        # aiosmtpd closes a connection past its timeout without a word: say why first.
        transport = self.transport
        if transport is not None and not transport.is_closing():
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(f"{replies.TIMEOUT}\r\n".encode())

    # ---- command syntax, checked before aiosmtpd's lenient parsing (gateway/address.py) ----

    async def smtp_HELO(self, hostname: str) -> None:
        if not await self._refuse_text(hostname):
            await super().smtp_HELO(hostname)
            self._keep_fixed_helo()

    async def smtp_EHLO(self, hostname: str) -> None:
        if not await self._refuse_text(hostname):
            self._ehlo_pending = self._may_xclient  # XCLIENT offered to those who may use it
            try:
                await super().smtp_EHLO(hostname)
            finally:
                self._ehlo_pending = False
            self._keep_fixed_helo()

    def _keep_fixed_helo(self) -> None:
        if self._fixed_helo and self.session is not None and self.session.host_name:
            self.session.host_name = self._fixed_helo

    # ---- the real client behind a front proxy or MTA ----

    def proxied(self, data: ProxyData) -> bool:
        """The header a trusted proxy sent (handle_PROXY): its client is ours from now on."""
        if data.src_addr is None or data.src_port is None:
            # v2 LOCAL or v1 UNKNOWN: the proxy's own connection (its health check).
            log.info("PROXY header without a client: the proxy's own connection",
                     extra={"fields": {"proxy": self._tcp_peer}})
            return True
        ip = parse_ip(str(data.src_addr))
        if ip is None or self.session is None:
            return False
        self._client = (str(ip), int(data.src_port))
        self._name_client()
        # The client the proxy names is who may use XCLIENT, or not: not the proxy itself
        # (a front host that is both proxy and MTA would lend its right to every client).
        self._may_xclient = within(ip, self._xclient_hosts)
        return True

    async def smtp_PROXY(self, arg: str | None) -> None:
        await self._refuse_proxy("v1")

    async def _untrusted_proxy_v2(self, arg: str | None) -> None:
        await self._refuse_proxy("v2")

    async def _refuse_proxy(self, version: str) -> None:
        """A PROXY header where none is expected: from a client not in the trusted list (or a
        second one): refused, logged, the connection closed."""
        log.warning("PROXY header refused: not from smtp.proxy_protocol_hosts",
                    extra={"fields": {"client": self._tcp_peer, "version": version}})
        await self.push(str(replies.PROXY_REFUSED))
        if self.transport is not None:
            self.transport.close()

    async def smtp_XCLIENT(self, arg: str | None) -> None:
        """Postfix's XCLIENT: a trusted front MTA names the client (ADDR, PORT, NAME, HELO);
        the answer is a new greeting and a new session (the client says EHLO again)."""
        if not self._may_xclient:
            log.warning("XCLIENT refused: not from smtp.xclient_hosts",
                        extra={"fields": {"client": self._tcp_peer}})
            await self.push(str(replies.XCLIENT_REFUSED))
            return
        session = self.session
        if session is None or self.envelope is None:
            return
        if self.envelope.mail_from is not None or (
                isinstance(session, GatewaySession) and session.txn is not None):
            await self.push(str(replies.XCLIENT_IN_TRANSACTION))
            return
        attrs = parse_xclient(arg)
        addr = attrs.get("ADDR", "") if attrs is not None else ""
        ip = parse_ip(addr[5:] if addr[:5].upper() == "IPV6:" else addr) if addr else None
        port = attrs.get("PORT", "0") if attrs is not None else "0"
        if (attrs is None or ("ADDR" in attrs and ip is None)
                or (port not in _UNAVAILABLE and not (port.isdigit() and int(port) < 65536))
                or attrs.get("PROTO", "SMTP").upper() not in ("SMTP", "ESMTP", *_UNAVAILABLE)):
            await self.push(str(replies.XCLIENT_SYNTAX))
            return
        if ip is not None:
            self._client = (str(ip), int(port) if port.isdigit() else 0)
            # The client named may itself be a trusted front MTA; anyone else may not.
            self._may_xclient = within(ip, self._xclient_hosts)
        helo = attrs.get("HELO", "")
        if helo and helo not in _UNAVAILABLE:
            self._fixed_helo = helo
        self.restart_session()
        self._name_client()
        if self.session is not None:
            self.session.host_name = self._fixed_helo or None
        log.info("XCLIENT", extra={"fields": {
            "front": self._tcp_peer, "client": self._client[0] if self._client else "",
            "name": attrs.get("NAME", "")[:255], "helo": self._fixed_helo[:255]}})
        await self.push(f"220 {self.hostname} {self.ident}")

    async def smtp_MAIL(self, arg: str | None) -> None:
        if not await self._refuse_path(arg, "FROM:", sender=True):
            await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        if not await self._refuse_path(arg, "TO:", sender=False):
            await super().smtp_RCPT(arg)
        session = self.session
        if isinstance(session, GatewaySession) and session.close_after_reply:
            assert self.transport is not None
            self.transport.close()

    async def _refuse_text(self, arg: str | None) -> bool:
        try:
            address.check_command(arg, keyword="")
        except address.PathRefused as exc:
            await self._refused(exc, arg)
            return True
        return False

    async def _refuse_path(self, arg: str | None, keyword: str, *, sender: bool) -> bool:
        """True when the command was answered here (refused, or out of sequence)."""
        if await self.check_helo_needed() or await self.check_auth_needed(keyword[:-1]):
            return True
        assert self.envelope is not None
        if not sender and not self.envelope.mail_from:
            return False  # aiosmtpd answers 503 (need MAIL)
        try:
            text = address.check_command(arg, keyword=keyword)
            if text is not None:
                path = address.parse(text, sender=sender,
                                     smtputf8=None if sender else self.envelope.smtp_utf8,
                                     allow_percent_hack=self._allow_percent_hack)
                if isinstance(self.session, GatewaySession):
                    self.session.checked = path.mailbox or "<>"
        except address.PathRefused as exc:
            await self._refused(exc, arg)
            return True
        return False

    async def _refused(self, exc: address.PathRefused, arg: str | None) -> None:
        log.info("command refused: %s", exc.why, extra={"fields": {
            "client": _peer(self.session) if self.session is not None else "",
            "argument": ascii(arg)[:300]}})
        await self.push(str(exc.reply))

    def transaction_expired(self) -> None:
        """The client held its next-hop transaction past smtp.transaction_timeout_s without
        starting DATA (NOOP keeps a session alive, not a transaction): 421 and close."""
        session = self.session
        if isinstance(session, GatewaySession) and session.txn is not None:
            log.warning("transaction held too long before DATA; closing", extra={"fields": {
                "client": _peer(session)}})
            self.close_for_timeout()

    async def smtp_DATA(self, arg: str) -> None:
        if isinstance(self.session, GatewaySession):
            self.session.stop_txn_timer()  # from here on, the DATA deadline applies
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        content = await self._read_data()
        if content is None:
            await self.push(str(replies.TOO_LARGE))
            self.end_transaction()
            return
        self.envelope.content = content
        self.envelope.original_content = content
        self.restart_timer()
        status = await self.call_data_hook()
        self.end_transaction()
        await self.push(status)

    async def _read_data(self) -> bytes | None:
        """Read up to CRLF.CRLF in large chunks; None when over the size limit."""
        reader = self.reader
        limit = self.data_size_limit or 0
        buf = bytearray(b"\r\n")  # the CRLF that ended the DATA command line
        scan_from = 0
        too_much = False
        # Each read waits at most data_timeout, and the whole DATA at most data_deadline (a
        # client trickling one byte a second is cut too); either way _timeout_cb answers 421.
        deadline = self.loop.time() + self._data_deadline
        while True:
            self.restart_timer(max(0.001, min(self._data_timeout,
                                              deadline - self.loop.time())))
            chunk = await reader.read(CHUNK)
            if not chunk:  # EOF mid-DATA: eof_received cancels this task anyway
                raise ConnectionResetError("connection closed during DATA")
            buf += chunk
            end = buf.find(_END, scan_from)
            if end >= 0:
                leftover = bytes(buf[end + len(_END):])
                del buf[end + 2:]
                if leftover:  # pipelined commands after the end of data go back to the reader
                    unread(reader, leftover)
                break
            if limit and len(buf) - 2 > limit:
                too_much = True
            if too_much:  # keep draining to the end marker, holding only a possible prefix
                del buf[:-4]
                scan_from = 0
            else:
                scan_from = len(buf) - 4
        if too_much:
            return None
        del buf[:2]
        data = bytes(buf)
        del buf
        if data.startswith(b".") or b"\r\n." in data:
            data = (b"\r\n" + data).replace(b"\r\n.", b"\r\n")[2:]
        if limit and len(data) > limit:
            return None
        return data


class Handler:
    """aiosmtpd hooks. Nothing of aiosmtpd goes deeper than this class."""

    def __init__(self, *, cfg: Config, pipeline: Pipeline, next_hop: NextHop,
                 direction: Direction = Direction.INBOUND, processes: int = 1,
                 accounts: AccountFile | None = None) -> None:
        self._cfg = cfg
        self.accounts = accounts  # submission: who may send as whom
        self._domains = cfg.domains
        self._pipeline = pipeline
        self._next_hop = next_hop
        self._direction = direction
        self.slots = Slots(total=cfg.next_hop.max_transactions,
                           per_client=cfg.next_hop.max_transactions_per_client,
                           processes=processes)

    async def handle_MAIL(self, server: GatewaySMTP, session: GatewaySession,
                          envelope: Envelope, address: str, mail_options: list[str]) -> str:
        session.abort_txn()
        if not _as_checked(session, address):
            return str(replies.BAD_SENDER_SYNTAX)
        if self._direction is Direction.OUTBOUND:
            # Submission: only the practice's users, and only as the practice's addresses.
            if not (session.authenticated or session.trusted):
                return str(replies.AUTH_REQUIRED)
            if address.rpartition("@")[2].lower() not in self._domains:
                return str(replies.SENDER_DENIED)
            if session.auth_user and self._foreign(session.auth_user, [address]):
                log.warning("submission sender refused", extra={"fields": {
                    "user": session.auth_user, "mail_from": address, "where": "envelope"}})
                return str(replies.SENDER_NOT_OWNED)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: GatewaySMTP, session: GatewaySession,
                          envelope: Envelope, address: str, rcpt_options: list[str]) -> str:
        # The path's syntax was checked by GatewaySMTP (gateway/address.py): no route, no
        # routing characters, no trailing dot; the domain is compared exactly.
        if not _as_checked(session, address):
            return str(replies.BAD_RCPT_SYNTAX)
        if address.lower() == "postmaster" and self._cfg.gateway.domains:
            address = f"postmaster@{self._cfg.gateway.domains[0].lower().rstrip('.')}"
        local, at, domain = address.rpartition("@")
        if not (local and at and domain):
            return str(replies.BAD_RCPT_SYNTAX)
        if domain.lower() not in self._domains and self._direction is Direction.INBOUND:
            return str(replies.RELAY_DENIED)
        if len(envelope.rcpt_tos) >= self._cfg.smtp.max_recipients:
            return str(replies.TOO_MANY_RCPTS)
        if address in envelope.rcpt_tos:
            return str(replies.RCPT_OK)
        try:
            if session.txn is None:
                if session.abandoned >= self._cfg.smtp.max_abandoned_transactions:
                    log.warning("too many abandoned transactions; closing", extra={"fields": {
                        "client": _peer(session), "abandoned": session.abandoned}})
                    session.close_after_reply = True
                    return str(replies.TOO_MANY_ABANDONED)
                begun = await self._begin(session, envelope)
                if isinstance(begun, replies.Reply):
                    return str(begun)
                session.txn = begun
                session.txn_timer = asyncio.get_running_loop().call_later(
                    self._cfg.smtp.transaction_timeout_s, server.transaction_expired)
            answer = await session.txn.add_recipient(address)
        except DownstreamUnavailable as exc:
            log.warning("next hop unavailable at RCPT: %s", exc)
            session.abandoned += session.txn is None  # a failed opening counts as churn too
            session.abort_txn()
            return str(replies.TEMPFAIL_DOWNSTREAM)
        except DownstreamRejected as exc:  # MAIL FROM refused by the next hop
            session.abandoned += session.txn is None
            session.abort_txn()
            return replies.downstream_reply(exc.code, exc.text)
        except BaseException:  # a bug or a cancelled session: the connection is closed
            session.abort_txn()
            raise
        if answer.accepted:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
            return str(replies.RCPT_OK)
        return replies.downstream_reply(answer.code, answer.text)

    async def _begin(self, session: GatewaySession,
                     envelope: Envelope) -> Transaction | replies.Reply:
        """A transaction with the next hop holding one of its slots, or the reply to give
        when the next hop has no slot left for this client."""
        client = client_key(_peer(session))
        busy = self.slots.take(client)
        if busy is not None:
            log.warning("next hop transactions limit", extra={"fields": {
                "client": client, "open": self.slots.open, "reply": busy.status}})
            return busy
        try:
            txn = await self._next_hop.begin(reverse_path(envelope),
                                             smtputf8=envelope.smtp_utf8)
        except BaseException:
            self.slots.give(client)
            raise
        return _Leased(txn, self.slots, client)

    async def handle_PROXY(self, server: GatewaySMTP, session: GatewaySession,
                           envelope: Envelope, data: ProxyData) -> bool:
        return server.proxied(data)

    async def handle_RSET(self, server: GatewaySMTP, session: GatewaySession,
                          envelope: Envelope) -> str:
        session.abort_txn()
        return "250 2.0.0 OK"

    async def handle_DATA(self, server: GatewaySMTP, session: GatewaySession,
                          envelope: Envelope) -> str:
        txn = session.take_txn()
        if txn is None:
            return str(replies.TEMPFAIL_DOWNSTREAM)
        queue_id = new_queue_id()
        token = queue_id_var.set(queue_id)
        try:  # from here on, however this ends, the transaction is aborted (its slot freed)
            raw = envelope.original_content
            assert isinstance(raw, bytes)
            inbound = Inbound(
                queue_id=queue_id, peer_ip=_peer(session), helo=session.host_name or "",
                mail_from=reverse_path(envelope), rcpts=tuple(envelope.rcpt_tos), raw=raw,
                tls=session.ssl is not None, direction=self._direction,
                auth_user=session.auth_user, next_hop_tls=txn.tls)
            if session.auth_user:
                refused = await self._foreign_senders(session.auth_user, raw)
                if refused:
                    log.warning("submission sender refused", extra={"fields": {
                        "user": session.auth_user, "from": refused[:5], "where": "header"}})
                    outcome = self._pipeline.refused(inbound, replies.SENDER_NOT_OWNED)
                    return reply_text(outcome, queue_id)
            outcome = await self._pipeline.process(inbound, txn)
            return reply_text(outcome, queue_id)
        finally:
            txn.abort()
            queue_id_var.reset(token)

    def _foreign(self, user: str, addresses: list[str]) -> list[str]:
        """Those of `addresses` the submission login may not use."""
        account = self.accounts.load().get(user) if self.accounts is not None else None
        if account is None:
            return addresses or ["(compte inconnu)"]
        return [a for a in addresses if not account.may_send_as(a)]

    async def _foreign_senders(self, user: str, raw: bytes) -> list[str]:
        """The author addresses of the message's header the login may not use (a large
        header block is read in a thread)."""
        end = raw.find(b"\r\n\r\n")
        head = raw[:end + 2] if end >= 0 else raw
        found = (await asyncio.to_thread(author_addresses, head) if len(head) > 64 * 1024
                 else author_addresses(head))
        return self._foreign(user, found)

    async def handle_exception(self, error: Exception) -> str:
        # A bug: logged with its traceback, the client only reads a 451.
        log.error("SMTP session error", exc_info=error)
        return str(replies.TEMPFAIL_INTERNAL)


_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_AUTHOR_FIELDS = (b"from", b"sender", b"resent-from", b"resent-sender")
_ADDRESS_LIKE = re.compile(r"[^\s<>()\[\],;:\"'`]*@[^\s<>()\[\],;:\"'`]*")


def author_addresses(head: bytes) -> list[str]:
    """Every address written in the author fields (From, Sender, Resent-*) of a header
    block, as strictly as the strictest reader: field names with spaces before the colon
    count (Postfix takes `From :`), encoded words are decoded, and anything shaped like an
    address counts, in the display name and comments too. A From field missing or repeated,
    or one without an address, gives a marker that no login may use."""
    fields: list[tuple[bytes, bytes]] = []
    for line in re.split(rb"\r?\n", head):
        if not line.strip():
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] = (fields[-1][0], fields[-1][1] + b" " + line.strip())
        elif m := _FIELD.match(line):
            fields.append((m.group(1).lower(), line[m.end():].strip()))
    out: list[str] = []
    froms = 0
    for name, value in fields:
        if name not in _AUTHOR_FIELDS:
            continue
        froms += name == b"from"
        text = value.decode("utf-8", "replace")
        decoded = ""
        with contextlib.suppress(ValueError, LookupError, UnicodeError):  # undecodable
            decoded = str(email.header.make_header(email.header.decode_header(text)))
        found = list(dict.fromkeys(_ADDRESS_LIKE.findall(text) + _ADDRESS_LIKE.findall(decoded)))
        out += found or [f"({name.decode()} sans adresse)"]
    if froms != 1:
        out.append(f"({froms} champ(s) From)")
    return out


def reverse_path(envelope: Envelope) -> str:
    """The envelope sender, "" for the null reverse-path (bounces, receipts): aiosmtpd keeps
    it as "<>", which no next hop takes as an address."""
    sender = envelope.mail_from or ""
    return "" if sender == "<>" else sender


def _printable(text: str) -> str:
    """A reply line as sent: aiosmtpd echoes the client's words in some replies (an unknown
    command, VRFY), and neither control characters nor undecodable bytes may go back."""
    return _UNPRINTABLE.sub("?", text)


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")


def _as_checked(session: GatewaySession, address: str) -> bool:
    """aiosmtpd's reading of the path is the one gateway/address.py checked: aiosmtpd decodes
    RFC 2047 encoded words in addresses (`=?us-ascii?q?user=40other?=` gives `user@other`),
    which would pass a routing character or a line break on to the next hop."""
    checked, session.checked = session.checked, ""
    if address == checked:
        return True
    log.warning("address changed by parsing; refused", extra={"fields": {
        "client": _peer(session), "checked": ascii(checked)[:200],
        "parsed": ascii(address)[:200]}})
    return False


def _peer(session: Session) -> str:
    peer = session.peer
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


class SubmissionSMTP(GatewaySMTP):
    """The submission port: STARTTLS, AUTH PLAIN/LOGIN against the users file (argon2), AUTH
    offered only over TLS except to `cleartext_auth_networks`; clients in `trusted_networks`
    may send without AUTH. Too many failed attempts end the connection."""

    def __init__(self, handler: Handler, *, accounts: AccountFile, throttle: Throttle,
                 trusted: Sequence[netaddr.IPNetwork], cleartext_auth: Sequence[netaddr.IPNetwork],
                 max_failures: int, implicit_tls: bool = False, **kwargs: Any) -> None:
        super().__init__(handler, auth_require_tls=True, auth_required=False,
                         auth_exclude_mechanism=[], **kwargs)
        self._accounts = accounts
        self._throttle = throttle  # across connections and serving processes
        self._trusted = trusted
        self._cleartext_auth = cleartext_auth
        self._max_failures = max_failures
        self._implicit_tls = implicit_tls  # the port speaks TLS from the first byte (RFC 8314)
        self._failures = 0
        self._credentials: LoginPassword | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        ip = parse_ip(peer[0] if isinstance(peer, tuple) else "")
        self.require_tls_for_auth(not within(ip, self._cleartext_auth))
        if self._implicit_tls and self.session is not None:
            # aiosmtpd records TLS only for STARTTLS: the session is encrypted all along.
            self.session.ssl = {"ssl_object": transport.get_extra_info("ssl_object")}
            self.require_tls_for_auth(False)
        if isinstance(self.session, GatewaySession):
            self.session.trusted = within(ip, self._trusted)

    # aiosmtpd's PLAIN and LOGIN decode the exchange and hand it over synchronously; the
    # argon2 check is slow, so it only keeps the credentials here, checked after, in a
    # thread (verify_async).
    def keep_credentials(self, mechanism: str, auth_data: Any) -> AuthResult:
        self._credentials = auth_data if isinstance(auth_data, LoginPassword) else None
        return AuthResult(success=False, handled=False)

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        self._credentials = None
        return await self._check(await super().auth_PLAIN(_, args))

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        self._credentials = None
        return await self._check(await super().auth_LOGIN(_, args))

    async def _check(self, decoded: AuthResult) -> AuthResult:
        creds, self._credentials = self._credentials, None
        if creds is None:  # malformed exchange, already answered
            return decoded
        login = creds.login.decode("utf-8", "replace")
        password = creds.password.decode("utf-8", "replace")
        client = self._peer_ip()
        attempt = await self._throttle.begin(login, client)
        if attempt.wait > 0:
            log.warning("submission login refused: throttled", extra={"fields": {
                "user": login[:80], "client": client, "seconds": round(attempt.wait)}})
            return AuthResult(success=False, handled=False,
                              message=f"{replies.AUTH_LOCKED} ({math.ceil(attempt.wait)} s)")
        account = await self._accounts.verify_async(login, password)
        if account is not None and isinstance(self.session, GatewaySession):
            await self._throttle.succeeded(attempt)
            self.session.auth_user = account.name
            log.info("submission login", extra={"fields": {"user": account.name,
                                                           "client": self._peer_ip()}})
            return AuthResult(success=True, auth_data=account.name,
                              message=str(replies.AUTH_OK))
        self._failures += 1
        await self._throttle.failed(attempt)
        log.warning("submission login failed", extra={"fields": {
            "user": login[:80], "client": self._peer_ip(), "failures": self._failures}})
        await asyncio.sleep(min(self._failures, 3) * 0.5)  # slows guessing down
        if self._failures >= self._max_failures:
            await self.push(str(replies.AUTH_TOO_MANY))
            assert self.transport is not None
            self.transport.close()
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False, message=str(replies.AUTH_FAILED))

    def _peer_ip(self) -> str:
        return _peer(self.session) if self.session is not None else ""


def tls_context(cfg: Config) -> ssl.SSLContext | None:
    if not cfg.smtp.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cfg.smtp.tls_cert, cfg.smtp.tls_key)
    return ctx


def _server_options(cfg: Config, counter: ConnectionCounter,
                    tls: ssl.SSLContext | None) -> dict[str, Any]:
    return {"counter": counter, "data_timeout": cfg.smtp.data_timeout_s,
            "data_deadline": cfg.smtp.data_deadline_s,
            "allow_percent_hack": cfg.smtp.allow_percent_hack,
            "hostname": cfg.gateway.hostname, "ident": "gateway",
            "data_size_limit": cfg.smtp.max_message_bytes, "enable_SMTPUTF8": True,
            "decode_data": False, "tls_context": tls,
            "timeout": cfg.smtp.idle_timeout_s}


def smtp_factory(cfg: Config, handler: Handler, counter: ConnectionCounter,
                 tls: ssl.SSLContext | None = None) -> Any:
    """`tls`: the certificate for STARTTLS (one context for every port: SIGHUP loads the
    renewed certificate into it)."""
    options = _server_options(cfg, counter, tls)
    options.update(proxy_hosts=networks(cfg.smtp.proxy_protocol_hosts),
                   xclient_hosts=networks(cfg.smtp.xclient_hosts),
                   proxy_timeout=cfg.smtp.proxy_protocol_timeout_s)

    def make() -> GatewaySMTP:
        return GatewaySMTP(handler, **options)
    return make


def submission_throttle(cfg: Config, state: AuthState) -> Throttle:
    return Throttle.of(state, "smtp", failures=cfg.submission.lockout_failures,
                       minutes=cfg.submission.lockout_minutes)


def submission_factory(cfg: Config, handler: Handler, counter: ConnectionCounter, *,
                       throttle: Throttle, implicit_tls: bool = False,
                       tls: ssl.SSLContext | None = None) -> Any:
    """The submission port's protocol; `implicit_tls` for the port whose server wraps every
    connection in TLS (465), where STARTTLS is not offered again."""
    options = _server_options(cfg, counter, tls)
    if implicit_tls:
        options["tls_context"] = None
    accounts = handler.accounts or AccountFile(cfg.submission_users_file)
    trusted = networks(cfg.submission.trusted_networks)
    cleartext_auth = networks(cfg.submission.cleartext_auth_networks)

    def make() -> SubmissionSMTP:
        return SubmissionSMTP(handler, accounts=accounts, throttle=throttle, trusted=trusted,
                              cleartext_auth=cleartext_auth,
                              max_failures=cfg.submission.max_auth_failures,
                              implicit_tls=implicit_tls, **options)
    return make
