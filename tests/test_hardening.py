"""The gateway's promises under attack, at the SMTP seams: relaying through the mailbox server,
malformed commands, and holding the mailbox server's connections (issue: hardening)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiosmtplib
import pytest

from gateway.service import running
from tests.conftest import DOMAIN, make_config
from tests.support import postfix
from tests.support.sink import Sink, _free_port

MSG = (f"From: <resultats@labo.example>\r\nTo: <docteur@{DOMAIN}>\r\nSubject: Bilan\r\n"
       "Date: Sat, 28 Nov 2026 10:00:00 +0100\r\nMessage-ID: <h1@labo.example>\r\n\r\n"
       "Bilan sanguin.\r\n").encode()


class Raw:
    """An SMTP client that sends exactly the bytes it is given (aiosmtplib quotes and
    re-encodes addresses, which is what these tests must not do)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, source: str = "127.0.0.1") -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                       local_addr=(source, 0))
        raw = cls(reader, writer)
        assert (await raw.reply()).startswith(b"220")
        return raw

    async def reply(self) -> bytes:
        lines = []
        async with asyncio.timeout(10):
            while True:
                line = await self.reader.readline()
                if not line:
                    break
                lines.append(line)
                if line[3:4] != b"-":
                    break
        return b"".join(lines)

    async def cmd(self, line: bytes) -> bytes:
        self.writer.write(line + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def closed(self) -> bool:
        async with asyncio.timeout(10):
            return await self.reader.read() == b""

    def close(self) -> None:
        self.writer.close()


def established_to(port: int) -> int:
    """TCP connections open towards a local port, as the kernel counts them."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            remote, state = fields[2], fields[3]
            if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


async def wait_established(port: int, expected: int, timeout: float = 5.0) -> int:
    """The count once it equals `expected`, or whatever it is at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (n := established_to(port)) != expected and loop.time() < deadline:
        await asyncio.sleep(0.05)
    return n


# ---- relaying through the mailbox server ---------------------------------------------------

RELAY_FORMS = [
    (b"<user%other.example@" + DOMAIN.encode() + b">", b"550 5.7.1"),
    (b'<"user@other.example"@' + DOMAIN.encode() + b">", b"550 5.7.1"),
    (b"<other.example!user@" + DOMAIN.encode() + b">", b"550 5.7.1"),
    (b"<other.example!user%third.example@" + DOMAIN.encode() + b">", b"550 5.7.1"),
    (b'<"user%other.example"@' + DOMAIN.encode() + b">", b"550 5.7.1"),
    (b"<@" + DOMAIN.encode() + b":user@other.example>", b"553 5.1.3"),
    (b"<@other.example,@" + DOMAIN.encode() + b":docteur@" + DOMAIN.encode() + b">",
     b"553 5.1.3"),
    (b"<docteur@" + DOMAIN.encode() + b".>", b"501 5.1.3"),
    (b"<user@other.example.>", b"501 5.1.3"),
    (b"<user@xn--othr-bpa.example>", b"550 5.7.1"),
    ("<user@othér.example>".encode(), b"553 5.6.7"),  # no SMTPUTF8 in MAIL
    (b"<user@[127.0.0.1]>", b"550 5.7.1"),
    # RFC 2047 encoded words, which aiosmtpd's header parser would decode into %, @ and !
    (b"<=?us-ascii?q?user=25other.example?=@" + DOMAIN.encode() + b">", b"501 5.1.3"),
    (b"<=?us-ascii?q?user=40other.example?=@" + DOMAIN.encode() + b">", b"501 5.1.3"),
    (b"<=?us-ascii?q?other.example=21user?=@" + DOMAIN.encode() + b">", b"501 5.1.3"),
    (b"<=?utf-8?b?dXNlciVvdGhlci5leGFtcGxl?=@" + DOMAIN.encode() + b">", b"501 5.1.3"),
]


@pytest.fixture
async def foreign() -> AsyncIterator[Sink]:
    """Any domain but the practice's: what must never receive relayed mail."""
    s = Sink()
    await s.start()
    yield s
    await s.stop()


@pytest.mark.skipif(not postfix.available(),
                    reason="Debian package postfix not installed (make test installs it)")
@pytest.mark.promise("no-open-relay")
async def test_relay_forms_never_reach_a_foreign_domain_through_postfix(
        tmp_path: Path, sink: Sink, foreign: Sink):
    # Debian's Postfix as the practice's mailbox server, at its defaults (percent hack and
    # bang paths on) and trusting the gateway: given these recipients directly, it delivers
    # them to other.example (checked in the first half, so the test proves something).
    pf = postfix.Postfix(port=_free_port(), domain=DOMAIN, users=["docteur"],
                         relay_port=sink.port, foreign_port=foreign.port)
    await asyncio.to_thread(pf.start)
    try:
        direct = await Raw.open(pf.port)
        await direct.cmd(b"EHLO probe.example")
        assert (await direct.cmd(b"MAIL FROM:<a@labo.example>")).startswith(b"250")
        assert (await direct.cmd(b"RCPT TO:" + RELAY_FORMS[0][0])).startswith(b"250")
        assert (await direct.cmd(b"DATA")).startswith(b"354")
        assert (await direct.cmd(MSG + b".")).startswith(b"250")
        direct.close()
        leaked = await foreign.get(timeout=30)
        assert leaked.rcpts == ["user@other.example"], pf.log()

        cfg = make_config(tmp_path, next_hop={"address": f"127.0.0.1:{pf.port}"})
        async with running(cfg) as gw:
            client = await Raw.open(gw.port)
            await client.cmd(b"EHLO attacker.example")
            for rcpt, refusal in RELAY_FORMS:
                assert (await client.cmd(b"MAIL FROM:<a@labo.example>")).startswith(b"250")
                got = await client.cmd(b"RCPT TO:" + rcpt)
                assert got.startswith(refusal), (rcpt, got)
                assert (await client.cmd(b"RSET")).startswith(b"250")
            # The practice's own mail still arrives.
            await client.cmd(b"MAIL FROM:<a@labo.example>")
            got = await client.cmd(b"RCPT TO:<docteur@" + DOMAIN.encode() + b">")
            assert got.startswith(b"250"), got
            assert (await client.cmd(b"DATA")).startswith(b"354")
            assert (await client.cmd(MSG + b".")).startswith(b"250")
            client.close()
        local = await sink.get(timeout=30)
        assert local.rcpts == [f"docteur@{DOMAIN}"]
        # Postfix queued two messages in all: the probe and the practice's own. A relay form
        # passed on by the gateway would have been a third (qmgr logs each with nrcpt=).
        for _ in range(50):
            if pf.log().count("nrcpt=") >= 2:
                break
            await asyncio.sleep(0.1)
        assert pf.log().count("nrcpt=") == 2, pf.log()
        assert foreign.empty()
    finally:
        await asyncio.to_thread(pf.stop)


@pytest.mark.promise("no-open-relay")
async def test_percent_hack_accepted_only_when_allowed(tmp_path: Path, sink: Sink):
    rcpt = f"user%other.example@{DOMAIN}"
    for allowed, expected in ((False, b"550 5.7.1"), (True, b"250")):
        cfg = make_config(tmp_path / str(allowed), smtp={"allow_percent_hack": allowed},
                          next_hop={"address": sink.address, "starttls": "off"})
        async with running(cfg) as gw:
            client = await Raw.open(gw.port)
            await client.cmd(b"EHLO c.example")
            await client.cmd(b"MAIL FROM:<a@labo.example>")
            got = await client.cmd(f"RCPT TO:<{rcpt}>".encode())
            assert got.startswith(expected), got
            client.close()


# ---- malformed commands: permanent errors, nothing opened downstream ------------------------

MALFORMED_SENDERS = [
    b"MAIL FROM:<a\x00b@labo.example>",
    b"MAIL FROM:<caf\xe9@labo.example>",  # Latin-1, not UTF-8
    b"MAIL FROM:<\xff\xfe@labo.example>",
    b"MAIL FROM:<a\x01b@labo.example>",
    b"MAIL FROM:<a\x7fb@labo.example>",
    b"MAIL FROM:<a@labo.example> SIZE=1\x00",
    b"MAIL FROM:<a b@labo.example>",
    b"MAIL FROM:<a@labo..example>",
    b"MAIL FROM:<a@labo.example",
    b"MAIL FROM:<=?us-ascii?q?a=0D=0AX-Injected=3Ax?=@labo.example>",  # a line break, decoded
    b"MAIL FROM:<a@[x<y]>",
    "MAIL FROM:<\xa0a@labo.example> SMTPUTF8".encode(),  # a no-break space
    "MAIL FROM:<a\u2028b@labo.example> SMTPUTF8".encode(),
]


async def test_malformed_senders_get_5xx_and_leave_no_next_hop_connection(
        tmp_path: Path, sink: Sink, caplog: pytest.LogCaptureFixture):
    cfg = make_config(tmp_path, next_hop={"address": sink.address, "starttls": "off"})
    caplog.set_level(logging.INFO)
    async with running(cfg) as gw:
        idle = established_to(sink.port)
        for command in MALFORMED_SENDERS:
            async def session(command: bytes = command) -> tuple[bytes, bytes]:
                client = await Raw.open(gw.port)
                try:
                    await client.cmd(b"EHLO c.example")
                    mail = await client.cmd(command)
                    rcpt = await client.cmd(b"RCPT TO:<docteur@" + DOMAIN.encode() + b">")
                    return mail, rcpt
                finally:
                    client.close()
            answers = await asyncio.gather(*(session() for _ in range(50)))
            for mail, rcpt in answers:
                assert mail[:1] == b"5", (command, mail)
                assert rcpt.startswith(b"503"), (command, rcpt)  # no sender, no transaction
        assert await wait_established(sink.port, idle) == idle
        # The gateway still serves.
        _, reply = await aiosmtplib.send(MSG, sender="a@labo.example",
                                         recipients=[f"docteur@{DOMAIN}"], hostname="127.0.0.1",
                                         port=gw.port, start_tls=False)
        assert reply.startswith("2.0.0")
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert (await sink.get()).data.endswith(MSG)


async def test_malformed_recipients_and_helo_get_5xx(tmp_path: Path, sink: Sink,
                                                     caplog: pytest.LogCaptureFixture):
    cfg = make_config(tmp_path, next_hop={"address": sink.address, "starttls": "off"})
    async with running(cfg) as gw:
        client = await Raw.open(gw.port)
        assert (await client.cmd(b"EHLO bad\x00host")).startswith(b"501 5.5.2")
        assert (await client.cmd(b"HELO caf\xe9")).startswith(b"501 5.5.2")
        assert (await client.cmd(b"EHLO c.example")).startswith(b"250")
        assert (await client.cmd(b"MAIL FROM:<a@labo.example>")).startswith(b"250")
        for rcpt, code in ((b"<doc\x00teur@cabinet.test>", b"501 5.5.2"),
                           (b"<doc\xfft@cabinet.test>", b"501 5.5.2"),
                           (b"<>", b"501"), (b"<docteur>", b"501 5.1.3"),
                           (b"<postmaster@>", b"501 5.1.3"),
                           (b"<doc teur@cabinet.test>", b"501 5.1.3"),
                           (b"<" + b"a" * 65 + b"@cabinet.test>", b"501 5.1.3"),
                           ("<médecin@cabinet.test>".encode(), b"553 5.6.7"),
                           (b"<=?us-ascii?q?=0D=0A=0D=0Adocteur?=@cabinet.test>", b"501 5.1.3"),
                           ("<\xa0docteur@cabinet.test>".encode(), b"553 5.6.7")):
            got = await client.cmd(b"RCPT TO:" + rcpt)
            assert got.startswith(code), (rcpt, got)
        assert established_to(sink.port) == 0  # nothing was opened downstream
        client.close()
    assert not [r for r in caplog.records if r.exc_info]


# ---- the mailbox server's connections ------------------------------------------------------


async def open_transaction(port: int, source: str) -> tuple[Raw, bytes]:
    client = await Raw.open(port, source)
    await client.cmd(b"EHLO c.example")
    await client.cmd(b"MAIL FROM:<a@labo.example>")
    return client, await client.cmd(b"RCPT TO:<docteur@" + DOMAIN.encode() + b">")


async def test_next_hop_transactions_are_limited_per_client_and_in_all(tmp_path: Path,
                                                                       sink: Sink):
    cfg = make_config(tmp_path, next_hop={"address": sink.address, "starttls": "off",
                                          "max_transactions": 3,
                                          "max_transactions_per_client": 2})
    async with running(cfg) as gw:
        a1, r1 = await open_transaction(gw.port, "127.0.0.1")
        a2, r2 = await open_transaction(gw.port, "127.0.0.1")
        a3, r3 = await open_transaction(gw.port, "127.0.0.1")
        assert r1.startswith(b"250") and r2.startswith(b"250")
        assert r3.startswith(b"451 4.7.1"), r3  # this client holds its two
        b1, s1 = await open_transaction(gw.port, "127.0.0.2")
        assert s1.startswith(b"250")
        c1, t1 = await open_transaction(gw.port, "127.0.0.3")
        assert t1.startswith(b"451 4.3.2"), t1  # the next hop has three open: no more
        assert await wait_established(sink.port, 3) == 3
        # A slot comes back when a transaction ends, however it ends.
        a1.close()  # the client goes away
        assert (await a2.cmd(b"RSET")).startswith(b"250")  # the client drops it
        c2, t2 = await open_transaction(gw.port, "127.0.0.3")
        assert t2.startswith(b"250"), t2
        assert (await b1.cmd(b"DATA")).startswith(b"354")
        assert (await b1.cmd(MSG + b".")).startswith(b"250")  # delivered
        assert await wait_established(sink.port, 1) == 1  # c2's only
        for c in (a2, a3, b1, c1, c2):
            c.close()
        assert await wait_established(sink.port, 0) == 0
    assert (await sink.get()).data.endswith(MSG)


async def test_transaction_churn_is_cut(tmp_path: Path, sink: Sink):
    cfg = make_config(tmp_path, smtp={"max_abandoned_transactions": 3},
                      next_hop={"address": sink.address, "starttls": "off"})
    async with running(cfg) as gw:
        client = await Raw.open(gw.port)
        await client.cmd(b"EHLO c.example")
        for _ in range(3):
            await client.cmd(b"MAIL FROM:<a@labo.example>")
            assert (await client.cmd(b"RCPT TO:<docteur@cabinet.test>")).startswith(b"250")
            assert (await client.cmd(b"RSET")).startswith(b"250")
        await client.cmd(b"MAIL FROM:<a@labo.example>")
        assert (await client.cmd(b"RCPT TO:<docteur@cabinet.test>")).startswith(b"421 4.7.0")
        assert await client.closed()
        client.close()
        assert await wait_established(sink.port, 0) == 0
        # Delivering is not churn: a sender may send many messages on one connection.
        other = await Raw.open(gw.port)
        await other.cmd(b"EHLO c.example")
        for _ in range(5):
            await other.cmd(b"MAIL FROM:<a@labo.example>")
            assert (await other.cmd(b"RCPT TO:<docteur@cabinet.test>")).startswith(b"250")
            await other.cmd(b"DATA")
            assert (await other.cmd(MSG + b".")).startswith(b"250")
        other.close()
    for _ in range(5):
        assert (await sink.get()).data.endswith(MSG)


async def test_data_trickle_is_cut_at_the_deadline(tmp_path: Path, sink: Sink):
    cfg = make_config(tmp_path, smtp={"data_timeout_s": 0.5, "data_deadline_s": 1.5},
                      next_hop={"address": sink.address, "starttls": "off"})
    async with running(cfg) as gw:
        client, rcpt = await open_transaction(gw.port, "127.0.0.1")
        assert rcpt.startswith(b"250")
        assert (await client.cmd(b"DATA")).startswith(b"354")
        sent = 0
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(ConnectionError):
            async with asyncio.timeout(10):
                while True:  # one byte every 0.2 s: each read is in time, the whole is not
                    client.writer.write(MSG[sent:sent + 1] or b"x")
                    await client.writer.drain()
                    sent += 1
                    try:
                        line = await asyncio.wait_for(client.reader.readline(), 0.2)
                    except TimeoutError:
                        continue
                    assert line.startswith(b"421 4.4.2"), line
                    assert await client.closed()
                    raise ConnectionError("closed by the gateway")
        assert 1.4 < loop.time() - start < 5
        client.close()
        assert await wait_established(sink.port, 0) == 0
    assert sink.empty()


async def test_no_failure_path_leaves_a_next_hop_connection_open(tmp_path: Path, sink: Sink):
    cfg = make_config(tmp_path, next_hop={"address": sink.address, "starttls": "off"})
    rcpt = b"RCPT TO:<docteur@" + DOMAIN.encode() + b">"
    async with running(cfg) as gw:
        # The next hop refuses the recipient, then the whole message at DATA.
        sink.behaviour.refuse_rcpts[f"docteur@{DOMAIN}"] = "550 5.1.1 User unknown"
        client, answer = await open_transaction(gw.port, "127.0.0.1")
        assert answer.startswith(b"550 5.1.1")
        sink.behaviour.refuse_rcpts.clear()
        assert (await client.cmd(rcpt)).startswith(b"250")
        sink.behaviour.data_reply = "451 4.3.0 try later"
        assert (await client.cmd(b"DATA")).startswith(b"354")
        assert (await client.cmd(MSG + b".")).startswith(b"451")
        sink.behaviour.data_reply = None
        # QUIT with a transaction open.
        await client.cmd(b"MAIL FROM:<a@labo.example>")
        assert (await client.cmd(rcpt)).startswith(b"250")
        assert (await client.cmd(b"QUIT")).startswith(b"221")
        client.close()
        # The client vanishes after RCPT, and in the middle of DATA.
        client, _ = await open_transaction(gw.port, "127.0.0.1")
        client.writer.transport.abort()
        client, _ = await open_transaction(gw.port, "127.0.0.1")
        await client.cmd(b"DATA")
        client.writer.write(MSG[:30])
        await client.writer.drain()
        client.writer.transport.abort()
        # A new EHLO in the middle of a transaction ends it too.
        client, _ = await open_transaction(gw.port, "127.0.0.1")
        assert await wait_established(sink.port, 1) == 1
        assert (await client.cmd(b"EHLO again.example")).startswith(b"250")
        assert await wait_established(sink.port, 0) == 0
        client.close()
        assert await wait_established(sink.port, 0) == 0
    assert sink.empty()


async def test_a_transaction_cannot_be_held_open_with_noops(tmp_path: Path, sink: Sink):
    cfg = make_config(tmp_path, smtp={"transaction_timeout_s": 1},
                      next_hop={"address": sink.address, "starttls": "off"})
    async with running(cfg) as gw:
        client, rcpt = await open_transaction(gw.port, "127.0.0.1")
        assert rcpt.startswith(b"250")
        assert await wait_established(sink.port, 1) == 1
        replies = []
        async with asyncio.timeout(10):
            while True:
                line = await client.cmd(b"NOOP")
                replies.append(line)
                if not line.startswith(b"250"):
                    break
                await asyncio.sleep(0.2)
        assert replies[-1].startswith(b"421 4.4.2"), replies
        assert await client.closed()
        client.close()
        assert await wait_established(sink.port, 0) == 0
        # The DATA command stops that clock: a slow but steady DATA is not cut by it.
        client, _ = await open_transaction(gw.port, "127.0.0.1")
        assert (await client.cmd(b"DATA")).startswith(b"354")
        for chunk in (MSG[:40], MSG[40:80]):
            client.writer.write(chunk)
            await asyncio.sleep(0.7)
        assert (await client.cmd(MSG[80:] + b".")).startswith(b"250")
        client.close()
    assert (await sink.get()).data.endswith(MSG)


async def test_postmaster_without_a_domain_is_the_practices(gateway, sink: Sink):
    """RFC 5321 section 4.5.1: RCPT TO:<Postmaster> must be accepted."""
    client = await Raw.open(gateway.port)
    await client.cmd(b"EHLO c.example")
    await client.cmd(b"MAIL FROM:<a@labo.example>")
    assert (await client.cmd(b"RCPT TO:<Postmaster>")).startswith(b"250")
    assert (await client.cmd(b"DATA")).startswith(b"354")
    assert (await client.cmd(MSG + b".")).startswith(b"250")
    client.close()
    assert (await sink.get()).rcpts == [f"postmaster@{DOMAIN}"]
