"""Session-level behaviour: STARTTLS, timeouts, SMTPUTF8, connection limit."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import aiosmtplib
import pytest

from gateway.service import running
from tests.conftest import DOMAIN, make_config
from tests.support.certs import self_signed
from tests.support.sink import Sink

MSG = (b"From: <a@labo.example>\r\nDate: Sat, 28 Nov 2026 10:00:00 +0100\r\n"
       b"Message-ID: <s1@labo.example>\r\nSubject: tls\r\n\r\nconfidentiel\r\n")


async def test_starttls_offered_and_used(tmp_path: Path, sink: Sink):
    cert, key = self_signed(tmp_path)
    cfg = make_config(tmp_path / "data", smtp={"tls_cert": str(cert), "tls_key": str(key)},
                      next_hop={"address": sink.address, "starttls": "off"})
    async with running(cfg) as gw:
        ctx = ssl.create_default_context(cafile=str(cert))
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.port, start_tls=False,
                               tls_context=ctx)
        await smtp.connect()
        try:
            await smtp.ehlo()
            assert smtp.supports_extension("starttls")
            await smtp.starttls(server_hostname="mx.cabinet.test")
            _, reply = await smtp.sendmail("a@labo.example", [f"docteur@{DOMAIN}"], MSG)
            assert reply.startswith("2.0.0")
        finally:
            smtp.close()
    got = await sink.get()
    assert b"with ESMTPS id" in got.data.split(b"\r\n\r\n")[0].replace(b"\r\n\t", b" ")


async def test_no_starttls_without_certificate(gateway):
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=gateway.port, start_tls=False)
    await smtp.connect()
    try:
        await smtp.ehlo()
        assert not smtp.supports_extension("starttls")
    finally:
        smtp.close()


async def test_stalled_data_is_cut_and_nothing_delivered(tmp_path: Path, sink: Sink):
    cfg = make_config(tmp_path, smtp={"data_timeout_s": 0.5, "idle_timeout_s": 2},
                      scoring={"message_budget_s": 1},
                      next_hop={"address": sink.address, "starttls": "off"})
    async with running(cfg) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"EHLO c.example\r\nMAIL FROM:<a@labo.example>\r\n"
                     b"RCPT TO:<docteur@" + DOMAIN.encode() + b">\r\nDATA\r\n" + MSG[:40])
        await writer.drain()
        lines = []
        async with asyncio.timeout(10):
            while line := await reader.readline():  # until the gateway closes
                lines.append(line)
        writer.close()
        assert any(line.startswith(b"354") for line in lines)
        assert not any(line.startswith(b"250 2.0.0") for line in lines)
        # The gateway is still serving after the stalled client.
        _, reply = await aiosmtplib.send(MSG, sender="a@labo.example",
                                         recipients=[f"docteur@{DOMAIN}"], hostname="127.0.0.1",
                                         port=gw.port, start_tls=False)
        assert reply.startswith("2.0.0")
    got = await sink.get()
    assert got.data.endswith(MSG)
    assert sink.empty()


async def test_idle_client_is_disconnected(tmp_path: Path, sink: Sink):
    cfg = make_config(tmp_path, smtp={"idle_timeout_s": 0.5}, scoring={"message_budget_s": 0.4},
                      next_hop={"address": sink.address, "starttls": "off"})
    async with running(cfg) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        async with asyncio.timeout(10):
            banner = await reader.readline()
            assert banner.startswith(b"220 mx.cabinet.test")
            # Told why, then closed by the gateway.
            assert (await reader.readline()).startswith(b"421 4.4.2 ")
            assert await reader.read() == b""
        writer.close()


async def test_utf8_addresses_are_relayed_with_smtputf8(gateway, sink: Sink):
    rcpt = f"médecin@{DOMAIN}"
    msg = "From: <éric@labo.example>\r\nSubject: é\r\n\r\nbonjour\r\n".encode()
    _, reply = await aiosmtplib.send(msg, sender="éric@labo.example", recipients=[rcpt],
                                     hostname="127.0.0.1", port=gateway.port, start_tls=False,
                                     mail_options=["SMTPUTF8"])
    assert reply.startswith("2.0.0")
    got = await sink.get()
    assert got.rcpts == [rcpt] and got.mail_from == "éric@labo.example"
    assert got.data.endswith(msg)


async def test_connection_limit_gives_421(tmp_path: Path, sink: Sink):
    cfg = make_config(tmp_path, smtp={"max_connections": 2},
                      next_hop={"address": sink.address, "starttls": "off"})
    async with running(cfg) as gw:
        held = [await asyncio.open_connection("127.0.0.1", gw.port) for _ in range(2)]
        for reader, _ in held:
            assert (await reader.readline()).startswith(b"220")
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"421 4.7.0")
        writer.close()
        for _, w in held:
            w.close()
        await asyncio.wait_for(gw.counter.idle.wait(), 10)  # the gateway saw them go
        _, reply = await aiosmtplib.send(MSG, sender="a@labo.example",
                                         recipients=[f"docteur@{DOMAIN}"], hostname="127.0.0.1",
                                         port=gw.port, start_tls=False)
        assert reply.startswith("2.0.0")


@pytest.mark.parametrize("starttls", ["required"])
async def test_next_hop_without_required_tls_gives_451(tmp_path: Path, sink: Sink, starttls: str):
    cfg = make_config(tmp_path, next_hop={"address": sink.address, "starttls": starttls})
    async with running(cfg) as gw:
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as exc:
            await aiosmtplib.send(MSG, sender="a@labo.example", recipients=[f"docteur@{DOMAIN}"],
                                  hostname="127.0.0.1", port=gw.port, start_tls=False)
        assert exc.value.recipients[0].code == 451
    assert sink.empty()
