"""Debian's Postfix as the next hop: the practice's mailbox server, refusing unknown users."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiosmtplib
import pytest

from gateway.service import running
from tests.conftest import DOMAIN, make_config
from tests.support import postfix
from tests.support.sink import Sink, _free_port

pytestmark = pytest.mark.skipif(not postfix.available(),
                                reason="Debian package postfix not installed (make test installs it)")

MSG = (f"From: <resultats@labo.example>\r\nTo: <docteur@{DOMAIN}>\r\nSubject: Bilan\r\n"
       "Date: Sat, 28 Nov 2026 10:00:00 +0100\r\nMessage-ID: <pf1@labo.example>\r\n\r\n"
       "Bilan sanguin en piece jointe.\r\n").encode()


@pytest.fixture
async def mailbox_server(sink: Sink) -> AsyncIterator[postfix.Postfix]:
    pf = postfix.Postfix(port=_free_port(), domain=DOMAIN, users=["docteur", "secretariat"],
                         relay_port=sink.port)
    await asyncio.to_thread(pf.start)
    yield pf
    await asyncio.to_thread(pf.stop)


async def test_postfix_next_hop_delivers_and_refuses_unknown_users(
        tmp_path: Path, sink: Sink, mailbox_server: postfix.Postfix):
    cfg = make_config(tmp_path, next_hop={"address": f"127.0.0.1:{mailbox_server.port}"})
    async with running(cfg) as gw:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.port, start_tls=False)
        await smtp.connect()
        try:
            await smtp.mail("resultats@labo.example")
            assert (await smtp.rcpt(f"docteur@{DOMAIN}")).code == 250
            with pytest.raises(aiosmtplib.SMTPRecipientRefused) as exc:
                await smtp.rcpt(f"inconnu@{DOMAIN}")
            assert exc.value.code == 550
            assert exc.value.message.startswith("5.1.1 ")
            assert "User unknown" in exc.value.message
            assert (await smtp.rcpt(f"secretariat@{DOMAIN}")).code == 250
            resp = await smtp.data(MSG)
            assert resp.code == 250, mailbox_server.log()
        finally:
            smtp.close()
    try:
        got = await sink.get(timeout=30)
    except TimeoutError:
        pytest.fail(f"Postfix did not relay to the sink:\n{mailbox_server.log()}")
    assert sorted(got.rcpts) == [f"docteur@{DOMAIN}", f"secretariat@{DOMAIN}"]
    assert got.data.endswith(MSG)
    # Postfix's trace on top of ours, then our result headers.
    head = got.data.split(b"\r\n\r\n", 1)[0].decode()
    assert head.index("by mailbox.cabinet.test") < head.index("by mx.cabinet.test")
    assert "X-Gateway-Action: accept" in head
