"""asyncio's private names: StreamReader has no unread()."""

from __future__ import annotations

import asyncio


def unread(reader: asyncio.StreamReader, data: bytes) -> None:
    """Put bytes back in front of what the reader will return next (pipelined commands read
    past the end of DATA); aiosmtpd itself edits the buffer likewise."""
    reader._buffer[:0] = data  # type: ignore[attr-defined]
