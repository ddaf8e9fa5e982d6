"""Downstream SMTP sink for tests: a real aiosmtpd server on loopback feeding a queue.

It can be told to answer 4xx/5xx at RCPT or DATA, to refuse given recipients, or to be down.
`open_connections` counts the connections open to it (a leaked next-hop connection shows).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP


@dataclass
class Received:
    mail_from: str
    rcpts: list[str]
    data: bytes
    tls: bool = False


@dataclass
class SinkBehaviour:
    data_reply: str | None = None  # e.g. "451 4.3.0 try later"; None = 250
    refuse_rcpts: dict[str, str] = field(default_factory=dict)  # address -> reply


class _LenientSMTP(SMTP):
    # Accept lines longer than RFC 5322's 998 characters, as Postfix and Exchange do.
    line_length_limit = 1 << 20

    def __init__(self, handler: _Handler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._open = handler.sink._open

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._open.add(self)  # a set: STARTTLS calls this again for the same connection
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._open.discard(self)
        super().connection_lost(error)


class _Handler:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = self.sink.behaviour.refuse_rcpts.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.sink.behaviour.data_reply:
            return self.sink.behaviour.data_reply
        await self.sink.queue.put(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                           envelope.original_content, session.ssl is not None))
        return "250 2.0.0 queued as SINK"


class Sink:
    """`tls=(cert, key)`: STARTTLS offered and required before MAIL (a provider's relay)."""

    def __init__(self, tls: tuple[Path, Path] | None = None, host: str = "127.0.0.1") -> None:
        self._tls = tls
        self.host = host  # loopback; docker/test.sh's peer container: its own address
        self.queue: asyncio.Queue[Received] = asyncio.Queue()
        self.behaviour = SinkBehaviour()
        self.port = _free_port()
        self._server: asyncio.Server | None = None
        self._open: set[SMTP] = set()

    @property
    def open_connections(self) -> int:
        return len(self._open)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        handler = _Handler(self)
        ctx = None
        if self._tls is not None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(*self._tls)
        self._server = await loop.create_server(
            lambda: _LenientSMTP(handler, hostname="sink.test", decode_data=False,
                                 enable_SMTPUTF8=True, data_size_limit=None, tls_context=ctx,
                                 require_starttls=ctx is not None),
            self.host, self.port, reuse_address=True)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def get(self, timeout: float = 10) -> Received:
        return await asyncio.wait_for(self.queue.get(), timeout)

    def empty(self) -> bool:
        return self.queue.empty()

    async def settled(self, timeout: float = 10) -> None:
        """Wait until no client is connected (every session with the sink has ended): then
        whatever was going to be delivered has been, and `empty()` means nothing was. A
        positive signal, where a fixed sleep would only hope."""
        async with asyncio.timeout(timeout):
            while self._open:
                await asyncio.sleep(0.01)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
