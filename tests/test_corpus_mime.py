"""Every message of the MIME edge-case material gets a verdict through SMTP: no crash, no hang."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiosmtplib

from gateway.cli import to_crlf
from tests.conftest import DOMAIN
from tests.support.sink import Sink


def edge_case_messages(corpus: Path) -> list[Path]:
    files = sorted((corpus / "flanker-fixtures" / "messages").rglob("*.eml"))
    files += sorted((corpus / "flanker-fixtures" / "messages" / "dkim").glob("email.*"))
    files += sorted((corpus / "python-email-testdata").glob("msg_*.txt"))
    files += sorted((corpus / "mail-parser-spamscope").glob("mail_*"))
    return files


async def test_every_mime_edge_case_gets_a_verdict(corpus: Path, gateway, sink: Sink):
    files = edge_case_messages(corpus)
    assert len(files) > 100
    sem = asyncio.Semaphore(8)
    failures: list[str] = []
    relayed: list[str] = []

    async def one(path: Path) -> None:
        async with sem:
            try:
                async with asyncio.timeout(60):
                    _, reply = await aiosmtplib.send(
                        to_crlf(path.read_bytes()), sender="test@corpus.example",
                        recipients=[f"docteur@{DOMAIN}"], hostname="127.0.0.1",
                        port=gateway.port, start_tls=False)
            except Exception as exc:  # noqa: BLE001 - collected and reported below
                failures.append(f"{path.relative_to(corpus)}: {type(exc).__name__}: {exc}")
                return
            if not reply.startswith("2.0.0"):  # delivered or quarantined: a verdict, kept
                failures.append(f"{path.relative_to(corpus)}: {reply}")
            elif "transmis" in reply:
                relayed.append(path.name)

    await asyncio.gather(*(one(p) for p in files))
    assert not failures, "\n".join(failures)
    delivered = [sink.queue.get_nowait() for _ in range(sink.queue.qsize())]
    assert len(delivered) == len(relayed) > len(files) * 0.9
    for got in delivered:
        assert got.data.startswith(b"Received: from ")
        assert b"\r\nX-Gateway-Action: " in got.data


async def test_part_bomb_is_flagged_not_fatal(corpus: Path, gateway, sink: Sink):
    bomb = corpus / "flanker-fixtures" / "messages" / "enclosed-endless.eml"
    _, reply = await aiosmtplib.send(
        to_crlf(bomb.read_bytes()), sender="test@corpus.example",
        recipients=[f"docteur@{DOMAIN}"], hostname="127.0.0.1", port=gateway.port,
        start_tls=False)
    assert reply.startswith("2.0.0")
    got = await sink.get()
    assert b"MIME_TOO_COMPLEX" in got.data.split(b"\r\n\r\n", 1)[0]
