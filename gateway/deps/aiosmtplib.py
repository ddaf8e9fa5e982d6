"""aiosmtplib's private names: DATA written through the client's protocol."""

from __future__ import annotations

from collections.abc import Iterable

import aiosmtplib
from aiosmtplib.protocol import SMTPProtocol
from aiosmtplib.response import SMTPResponse

# checked by tests/test_dependencies.py
PRIVATE = ["SMTP.protocol", "SMTPProtocol.write", "SMTPProtocol.read_response"]


async def write_data(client: aiosmtplib.SMTP, chunks: Iterable[bytes],
                     reply_timeout_s: float) -> SMTPResponse:
    """After `DATA` and its 354: the message as wire bytes (dot-stuffed, CRLF), then the
    end-of-data line; the server's reply. SMTP.data() would do the same with a regex pass and
    a dot-stuffing pass that cost as much CPU as our whole parse."""
    protocol: SMTPProtocol | None = client.protocol
    assert protocol is not None
    for chunk in chunks:
        protocol.write(chunk)
    protocol.write(b".\r\n")
    return await protocol.read_response(timeout=reply_timeout_s)
