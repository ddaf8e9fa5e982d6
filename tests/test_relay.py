"""The gateway as MX relay: a real SMTP client -> the gateway -> a real SMTP sink, on loopback."""

from __future__ import annotations

import asyncio
import re
from email import message_from_bytes
from pathlib import Path

import aiosmtplib
import pytest

from gateway.service import running
from tests.conftest import DOMAIN, make_config
from tests.support.sink import Sink

MSG = (
    "From: Laboratoire <resultats@labo.example>\r\n"
    f"To: <docteur@{DOMAIN}>\r\n"
    "Subject: Resultats\r\n"
    "Date: Sat, 28 Nov 2026 10:00:00 +0100\r\n"
    "Message-ID: <abc@labo.example>\r\n"
    "\r\n"
    "Bonjour,\r\n.ligne qui commence par un point\r\n..deux points\r\nFin.\r\n"
).encode()


async def client(port: int) -> aiosmtplib.SMTP:
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=30,
                           local_hostname="client.example")
    await smtp.connect()
    return smtp


async def send(port: int, data: bytes, rcpts: list[str], sender: str = "resultats@labo.example"):
    smtp = await client(port)
    try:
        return await smtp.sendmail(sender, rcpts, data)
    finally:
        smtp.close()


async def test_delivered_bytes_and_result_headers(gateway, sink: Sink):
    rcpts, reply = await send(gateway.port, MSG, [f"docteur@{DOMAIN}"])
    assert reply.startswith("2.0.0 Message accepte et transmis id=")
    got = await sink.get()
    assert got.mail_from == "resultats@labo.example"
    assert got.rcpts == [f"docteur@{DOMAIN}"]
    head, _, body = got.data.partition(b"\r\n\r\n")
    # The original message is intact after our prepended headers (dot lines unstuffed).
    assert got.data.endswith(MSG)
    assert body == MSG.partition(b"\r\n\r\n")[2]
    lines = head.split(b"\r\n")
    assert lines[0].startswith(b"Received: from client.example ([127.0.0.1]) by mx.cabinet.test")
    parsed = message_from_bytes(got.data)
    assert parsed["X-Gateway-Action"] == "accept"
    # No DNS records for labo.example on the test DNS server: only SPF_NONE scores.
    assert parsed["X-Gateway-Symbols"].startswith("SPF_NONE(0.5)")
    assert float(parsed["X-Gateway-Score"]) == 0.5
    assert " ".join(parsed["Authentication-Results"].split()) == (
        "mx.cabinet.test; spf=none smtp.mailfrom=resultats@labo.example; "
        "dmarc=none header.from=labo.example")
    qid = reply.rsplit("=", 1)[1]
    assert qid in parsed["Received"]


async def test_forged_result_headers_are_removed(gateway, sink: Sink):
    forged = (b"X-Gateway-Action: accept\r\nX-Gateway-Score: -100\r\n"
              b"Authentication-Results: MX.cabinet.test; dmarc=pass\r\n\theader.from=ameli.fr\r\n"
              b"Authentication-Results: mx.google.example; dkim=pass\r\n"
              b"X-GATEWAY-Symbols: NONE,\r\n\tcontinued\r\n") + MSG
    await send(gateway.port, forged, [f"docteur@{DOMAIN}"])
    got = await sink.get()
    parsed = message_from_bytes(got.data)
    assert parsed.get_all("X-Gateway-Score") == ["0.5"]
    results = parsed.get_all("Authentication-Results")
    assert len(results) == 2 and "ameli.fr" not in got.data.decode()
    assert results[1] == "mx.google.example; dkim=pass"  # another server's: kept
    assert len(parsed.get_all("X-Gateway-Symbols")) == 1  # ours only
    assert b"continued" not in got.data
    assert got.data.endswith(MSG)


@pytest.mark.promise("no-open-relay")
async def test_open_relay_refused_at_rcpt(gateway, sink: Sink):
    smtp = await client(gateway.port)
    try:
        await smtp.mail("spammer@evil.example")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as exc:
            await smtp.rcpt("victim@gmail.example")
        assert exc.value.code == 550
        assert exc.value.message.startswith("5.7.1 Relais refuse")
        # Sub-domains and look-alikes of ours are other domains too.
        for rcpt in (f"x@sub.{DOMAIN}", f"x@{DOMAIN}.evil.example", "x@cabinet"):
            with pytest.raises(aiosmtplib.SMTPRecipientRefused):
                await smtp.rcpt(rcpt)
        resp = await smtp.rcpt(f"DocTeur@{DOMAIN.upper()}")
        assert resp.code == 250
    finally:
        smtp.close()
    assert sink.empty()


async def test_oversize_refused(tmp_path: Path, sink: Sink):
    cfg = make_config(tmp_path, smtp={"max_message_bytes": 20_000},
                      next_hop={"address": sink.address, "starttls": "off"})
    async with running(cfg) as gw:
        smtp = await client(gw.port)
        try:
            await smtp.ehlo()
            assert smtp.esmtp_extensions["size"] == "20000"
            # Declared too large at MAIL FROM.
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as exc:
                await smtp.mail("a@labo.example", options=["SIZE=50000"])
            assert exc.value.code == 552
            # Not declared, but too large in fact: refused at end of DATA, session still usable.
            big = MSG + b"x" * 76 + b"\r\n"
            big = big + (b"y" * 76 + b"\r\n") * 400
            await smtp.mail("a@labo.example")
            await smtp.rcpt(f"docteur@{DOMAIN}")
            with pytest.raises(aiosmtplib.SMTPDataError) as derr:
                await smtp.data(big)
            assert derr.value.code == 552
            _, reply = await smtp.sendmail("a@labo.example", [f"docteur@{DOMAIN}"], MSG)
            assert reply.startswith("2.0.0")
        finally:
            smtp.close()
    got = await sink.get()
    assert got.data.endswith(MSG)
    assert sink.empty()


@pytest.mark.promise("durable-before-250")
async def test_next_hop_down_gives_451_then_delivered_on_retry(tmp_path: Path):
    sink = Sink()  # not started: its port refuses connections
    cfg = make_config(tmp_path, next_hop={"address": sink.address, "starttls": "off",
                                          "timeout_s": 2})
    async with running(cfg) as gw:
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as exc:
            await send(gw.port, MSG, [f"docteur@{DOMAIN}"])
        refusal = exc.value.recipients[0]
        assert refusal.code == 451
        assert refusal.message.startswith("4.4.1 ")
        await sink.start()
        try:
            _, reply = await send(gw.port, MSG, [f"docteur@{DOMAIN}"])
            assert reply.startswith("2.0.0")
            got = await sink.get()
            assert got.data.endswith(MSG)
        finally:
            await sink.stop()


@pytest.mark.promise("durable-before-250")
async def test_next_hop_4xx_at_data_gives_451(gateway, sink: Sink):
    sink.behaviour.data_reply = "452 4.3.1 Insufficient system storage"
    with pytest.raises(aiosmtplib.SMTPDataError) as exc:
        await send(gateway.port, MSG, [f"docteur@{DOMAIN}"])
    assert exc.value.code == 451
    assert exc.value.message.startswith("4.4.1 ")


@pytest.mark.promise("durable-before-250")
async def test_next_hop_5xx_at_data_is_passed_back(gateway, sink: Sink):
    sink.behaviour.data_reply = "554 5.6.0 Message content rejected"
    with pytest.raises(aiosmtplib.SMTPDataError) as exc:
        await send(gateway.port, MSG, [f"docteur@{DOMAIN}"])
    assert exc.value.code == 554
    # The next hop's own words, with our queue id (its tracking record) after them.
    assert re.fullmatch(r"5\.6\.0 Message content rejected id=[0-9A-Z]{12}", exc.value.message)


async def test_recipient_refused_by_next_hop_is_refused_at_rcpt(gateway, sink: Sink):
    sink.behaviour.refuse_rcpts = {
        f"parti@{DOMAIN}": "550 5.1.1 User unknown",
        f"plein@{DOMAIN}": "452 4.2.2 Mailbox full",
    }
    smtp = await client(gateway.port)
    try:
        await smtp.mail("resultats@labo.example")
        assert (await smtp.rcpt(f"docteur@{DOMAIN}")).code == 250
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as gone:
            await smtp.rcpt(f"parti@{DOMAIN}")
        assert (gone.value.code, gone.value.message) == (550, "5.1.1 User unknown")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as full:
            await smtp.rcpt(f"plein@{DOMAIN}")
        assert full.value.code == 452
        assert (await smtp.rcpt(f"secretariat@{DOMAIN}")).code == 250
        resp = await smtp.data(MSG)
        assert resp.code == 250
    finally:
        smtp.close()
    got = await sink.get()
    assert got.rcpts == [f"docteur@{DOMAIN}", f"secretariat@{DOMAIN}"]


async def test_recipient_limit(tmp_path: Path, sink: Sink):
    cfg = make_config(tmp_path, smtp={"max_recipients": 2},
                      next_hop={"address": sink.address, "starttls": "off"})
    async with running(cfg) as gw:
        smtp = await client(gw.port)
        try:
            await smtp.mail("a@labo.example")
            await smtp.rcpt(f"a@{DOMAIN}")
            await smtp.rcpt(f"b@{DOMAIN}")
            with pytest.raises(aiosmtplib.SMTPRecipientRefused) as exc:
                await smtp.rcpt(f"c@{DOMAIN}")
            assert exc.value.code == 452
        finally:
            smtp.close()


async def raw_session(port: int):
    """A bare socket client, for bytes a real client library would not send."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def reply() -> bytes:
        while True:
            line = await asyncio.wait_for(reader.readline(), 10)
            if line[3:4] != b"-":
                return line

    assert (await reply()).startswith(b"220")
    writer.write(b"EHLO client.example\r\n")
    await writer.drain()
    assert (await reply()).startswith(b"250")
    return reader, writer, reply


@pytest.mark.promise("no-smuggling")
async def test_smuggled_bare_lf_dot_does_not_end_data(gateway, sink: Sink):
    """CVE-2023-51764 shape: a dot line ended by a bare LF is data, flagged, and made harmless."""
    reader, writer, reply = await raw_session(gateway.port)
    rcpt = f"docteur@{DOMAIN}".encode()
    writer.write(b"MAIL FROM:<a@labo.example>\r\nRCPT TO:<" + rcpt + b">\r\nDATA\r\n")
    await writer.drain()
    assert [(await reply())[:3] for _ in range(3)] == [b"250", b"250", b"354"]
    smuggled = (b"\r\n.\nMAIL FROM:<ceo@" + DOMAIN.encode() + b">\r\nRCPT TO:<" + rcpt +
                b">\r\nDATA\r\nfake\r\n")
    writer.write(MSG + smuggled + b"\n.\r\n" + b"end\r\n.\r\n")
    await writer.drain()
    assert (await reply()).startswith(b"250 2.0.0")
    writer.write(b"QUIT\r\n")
    await writer.drain()
    assert (await reply()).startswith(b"221")
    writer.close()
    got = await sink.get()
    assert b"MAIL FROM:<ceo@" in got.data and got.data.endswith(b"end\r\n")
    assert b"SMTP_BARE_LF_DOT" in got.data
    # Relayed with CRLF line ends and the dot stuffed: the next hop cannot be fooled either.
    assert b"\n.\n" not in got.data and b"\r\n.\n" not in got.data
    await sink.settled()
    assert sink.empty()


async def test_pipelined_commands_after_end_of_data(gateway, sink: Sink):
    """Two transactions written in one packet: the bytes after '.' are commands, not lost."""
    reader, writer, reply = await raw_session(gateway.port)
    rcpt = f"docteur@{DOMAIN}".encode()
    one = b"MAIL FROM:<a@labo.example>\r\nRCPT TO:<" + rcpt + b">\r\nDATA\r\n"
    writer.write(one)
    await writer.drain()
    for _ in range(3):
        await reply()
    body = MSG.replace(b"\r\n.", b"\r\n..")
    writer.write(body + b".\r\nMAIL FROM:<b@labo.example>\r\nRCPT TO:<" + rcpt +
                 b">\r\nDATA\r\n")
    await writer.drain()
    codes = [(await reply())[:3] for _ in range(4)]
    assert codes == [b"250", b"250", b"250", b"354"]
    writer.write(b".\r\nQUIT\r\n")  # an empty message
    await writer.drain()
    assert (await reply()).startswith(b"250")
    assert (await reply()).startswith(b"221")
    writer.close()
    first, second = await sink.get(), await sink.get()
    assert first.mail_from == "a@labo.example" and first.data.endswith(MSG)
    assert second.mail_from == "b@labo.example"
    # The empty message arrives too, scored (no From, no Date) and so tagged.
    assert second.data.startswith(b"Received: ") and b"FROM_MISSING" in second.data
    assert b"X-Gateway-Action: tag" in second.data


async def test_fifty_concurrent_sessions_all_delivered(tmp_path: Path, sink: Sink):
    # Fifty senders at once; they all come from 127.0.0.1 here, so the per-client limit of
    # next-hop transactions (tests/test_hardening.py) is raised to let them stand for many.
    cfg = make_config(tmp_path, next_hop={"address": sink.address, "starttls": "off",
                                          "max_transactions_per_client": 50})

    async def one(port: int, i: int) -> str:
        data = MSG.replace(b"Subject: Resultats", f"Subject: n{i}".encode())
        _, reply = await send(port, data, [f"docteur{i}@{DOMAIN}"])
        return reply

    async with running(cfg) as gw:
        replies = await asyncio.gather(*(one(gw.port, i) for i in range(50)))
    assert all(r.startswith("2.0.0") for r in replies)
    got = [await sink.get() for _ in range(50)]
    assert sorted(g.rcpts[0] for g in got) == sorted(f"docteur{i}@{DOMAIN}" for i in range(50))
    for g in got:
        n = g.rcpts[0].split("@")[0].removeprefix("docteur")
        assert f"Subject: n{n}\r\n".encode() in g.data



@pytest.mark.parametrize("raw", [
    b"plain\r\nlines\r\n",
    b".leading dot\r\n..two\r\n.\r\nend",
    b"bare\nlf\n.\nsmuggled\r\n.\nmixed\r.\rcr",
    b"",
    b"no final newline",
    b"\r\n\r\n.\r\n",
])
def test_wire_lines_matches_aiosmtplib(raw: bytes):
    """Our fast DATA encoding gives the bytes aiosmtplib's SMTP.data() would send."""
    from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

    from gateway.relay import wire_lines
    expected = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(raw)) if raw else b""
    assert wire_lines(raw) == expected


async def test_a_quoted_sender_cannot_add_results_to_our_authentication_results(
        gateway, sink: Sink):
    """RFC 8601 quotes a property value with backslash escapes: a sender address with a
    backslash and a quote (legal in a quoted local part) must stay one value, not end it and
    add `dmarc=pass header.from=bank.fr` under our own authserv-id."""
    import authres

    sender = '"x\\";dmarc=pass header.from=bank.fr;a=\\""@evil.example'
    await send(gateway.port, MSG, [f"docteur@{DOMAIN}"], sender=sender)
    ours = message_from_bytes((await sink.get()).data).get_all("Authentication-Results")[0]
    parsed = authres.AuthenticationResultsHeader.parse(f"Authentication-Results: {ours}")
    assert [(r.method, r.result) for r in parsed.results] == [("spf", "none"), ("dmarc", "none")]
    assert "bank.fr" not in str(parsed.results[1])


@pytest.mark.promise("durable-before-250")
async def test_embedded_maildir_delivery_one_box_per_recipient(tmp_path: Path):
    """The embedded default (no next hop configured): each recipient's copy is written in
    its own Maildir, synced, private, before the 250; a recipient's name cannot climb out of
    the Maildir root; a disk that refuses the write gives 451 and nothing is lost."""
    import os
    import stat

    cfg = make_config(tmp_path / "data")
    assert cfg.next_hop_address is None
    root = tmp_path / "data" / "maildir"
    async with running(cfg) as gw:
        rcpts = [f"docteur@{DOMAIN}", f"Secretariat@{DOMAIN}"]
        _, reply = await send(gw.port, MSG, rcpts)
        assert reply.startswith("2.0.0")
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
        for rcpt in rcpts:
            box = root / rcpt.lower()
            assert stat.S_IMODE(os.stat(box).st_mode) == 0o700
            assert not list((box / "tmp").iterdir())  # renamed into new/ once synced
            [delivered] = list((box / "new").iterdir())
            assert stat.S_IMODE(os.stat(delivered).st_mode) == 0o600
            data = delivered.read_bytes()
            assert data.startswith(f"Delivered-To: {rcpt}\nReceived: ".encode())
            assert data.endswith(MSG.replace(b"\r\n", b"\n"))
        # Two messages to one box get two files (names never collide).
        await send(gw.port, MSG, [f"docteur@{DOMAIN}"])
        assert len(list((root / f"docteur@{DOMAIN}" / "new").iterdir())) == 2
        # A disk that refuses the write (the box's place taken by a file): 451, the sender
        # keeps the message and retries.
        (root / f"compta@{DOMAIN}").write_bytes(b"")
        with pytest.raises(aiosmtplib.SMTPDataError) as exc:
            await send(gw.port, MSG, [f"compta@{DOMAIN}"])
        assert exc.value.code == 451
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [f"docteur@{DOMAIN}", f"secretariat@{DOMAIN}", f"compta@{DOMAIN}"])


def test_maildir_names_stay_inside_the_root():
    from gateway.relay import _mailbox_name

    assert _mailbox_name(" Docteur@Cabinet.Test ") == "docteur@cabinet.test"
    assert _mailbox_name("../../etc/passwd@x") == "_.._etc_passwd@x"
    assert _mailbox_name("..") == "_"
    assert _mailbox_name("a\0b@x") == "a_b@x"
