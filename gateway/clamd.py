"""A client of ClamAV's daemon (clamd): streams bytes with INSTREAM over its Unix or TCP
socket, on a small pool of IDSESSION connections (one command at a time on each).

The protocol (clamd(8)): `zIDSESSION\\0` opens a session; in it, `zINSTREAM\\0` is followed
by chunks, each a 4-byte big-endian length then the bytes, and a zero length; the reply is
`<id>: stream: OK\\0`, `<id>: stream: <signature> FOUND\\0` or `<id>: <text> ERROR\\0`.
clamd closes a session left idle past its `IdleTimeout`: a session taken from the pool that
turns out closed is replaced once, and the stream sent again (scanning has no side effect).

No library fits: aioclamd (the maintained async one) speaks TCP only, opens a connection per
command and hands each 1 KiB chunk to a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import struct
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_STREAM_MAX = 25 * 1024 * 1024  # clamd's own default StreamMaxLength
CHUNK = 1024 * 1024
_REPLY_MAX = 64 * 1024
_SIZE = re.compile(r"(\d+)([kKmMgG]?)")
_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}


class ClamdUnavailable(Exception):
    """clamd could not be reached, closed the connection, or answered with an error."""


class StreamTooLarge(ClamdUnavailable):
    """clamd refused the stream: over its StreamMaxLength."""


@dataclass(frozen=True, slots=True)
class Found:
    """A signature that matched (None: the stream is clean)."""

    signature: str


def conf_value(conf: Path, option: str) -> str | None:
    """The value of `option` in a clamd.conf, as clamd reads it (the last line naming it);
    None when the file cannot be read or does not set it."""
    try:
        text = conf.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    found = re.findall(rf"^\s*{option}\s+(\S+)\s*$", text, re.MULTILINE)
    return found[-1] if found else None


def stream_max_from(conf: Path) -> int | None:
    """StreamMaxLength of a clamd.conf, in bytes (None: unreadable or not set)."""
    match = _SIZE.fullmatch(conf_value(conf, "StreamMaxLength") or "")
    return int(match.group(1)) * _UNITS[match.group(2).lower()] if match else None


def max_scan_time_ms(conf: Path) -> int | None:
    """MaxScanTime of a clamd.conf, in milliseconds (0: no limit; None: unreadable or not
    set, clamd's default then being 120000)."""
    value = conf_value(conf, "MaxScanTime")
    return int(value) if value is not None and value.isdigit() else None


def parse_reply(text: str) -> Found | None:
    """A reply to INSTREAM (its session id already removed). Raises ClamdUnavailable on an
    error reply. ExtendedDetectionInfo adds `(hash:size)` after the name: dropped."""
    if text.endswith(" ERROR"):
        if "size limit exceeded" in text:
            raise StreamTooLarge(text)
        raise ClamdUnavailable(f"clamd answered {text!r}")
    body = text.removeprefix("stream:").strip()
    if body == "OK":
        return None
    if body.endswith(" FOUND"):
        name = body[:-len(" FOUND")].strip()
        name = re.sub(r"\([0-9a-fA-F]+:\d+\)$", "", name).strip()
        return Found(name or "inconnu")
    raise ClamdUnavailable(f"clamd answered {text!r}")


class _StreamCut(ConnectionError):
    """The connection broke while the stream was being written."""


class _Session:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def instream(self, data: bytes) -> Found | None:
        w = self.writer
        w.write(b"zINSTREAM\0")
        # Already reading while writing: clamd stops reading a stream over its
        # StreamMaxLength, says so and closes; once the connection breaks, a reply not yet
        # taken from the socket is lost, and with it the reason.
        reply = asyncio.ensure_future(self._reply())
        await asyncio.sleep(0)
        try:
            try:
                view = memoryview(data)
                for start in range(0, len(view), CHUNK):
                    piece = view[start:start + CHUNK]
                    w.write(struct.pack("!L", len(piece)))
                    w.write(piece)
                    await w.drain()
                w.write(struct.pack("!L", 0))
                await w.drain()
            except OSError as exc:
                text = None
                with contextlib.suppress(OSError, TimeoutError, ClamdUnavailable):
                    async with asyncio.timeout(1.0):
                        text = await reply
                if text is None:
                    raise _StreamCut(str(exc)) from exc
                return parse_reply(text)
            return parse_reply(await reply)
        finally:
            if not reply.done():
                reply.cancel()
            elif not reply.cancelled():
                reply.exception()  # retrieved, whatever it was

    async def _reply(self) -> str:
        try:
            raw = await self.reader.readuntil(b"\0")
        except asyncio.LimitOverrunError as exc:
            raise ClamdUnavailable("clamd's reply is too long") from exc
        except asyncio.IncompleteReadError as exc:
            raise ConnectionResetError("clamd closed the session") from exc
        text = raw[:-1].decode("utf-8", "replace")
        number, sep, rest = text.partition(": ")  # "<id>: stream: OK" in a session
        return rest if sep and number.isdigit() else text

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if not self.writer.is_closing():
                self.writer.write(b"zEND\0")
            self.writer.close()


class Clamd:
    """One per serving process: at most `connections` streams at once, on sessions kept open
    between messages."""

    def __init__(self, address: str, *, connections: int, connect_timeout_s: float = 5.0) -> None:
        self.address = address
        self._slots = asyncio.Semaphore(max(1, connections))
        self._idle: list[_Session] = []
        self._connect_timeout_s = connect_timeout_s

    async def _connect(self, limit: int = _REPLY_MAX) -> tuple[asyncio.StreamReader,
                                                               asyncio.StreamWriter]:
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                if self.address.startswith("/"):
                    return await asyncio.open_unix_connection(self.address, limit=limit)
                host, _, port = self.address.rpartition(":")
                return await asyncio.open_connection(host.strip("[]"), int(port), limit=limit)
        except (OSError, TimeoutError, ValueError) as exc:
            raise ClamdUnavailable(f"cannot reach clamd at {self.address}: {exc}") from exc

    async def scan(self, data: bytes) -> Found | None:
        """Stream `data` to clamd: the signature found, or None. Raises ClamdUnavailable
        (StreamTooLarge: over clamd's limit). Cancelling it drops the session it used."""
        async with self._slots:
            session = self._idle.pop() if self._idle else None
            retry = session is not None
            while True:
                if session is None:
                    reader, writer = await self._connect()
                    writer.write(b"zIDSESSION\0")
                    session = _Session(reader, writer)
                try:
                    found = await session.instream(data)
                except OSError as exc:  # reset, broken pipe: clamd closed the session
                    session.close()
                    session = None
                    if retry:  # one clamd closed while it was idle: once more, fresh
                        retry = False
                        continue
                    if isinstance(exc, _StreamCut) and await self.ping():
                        # Alive, yet it stopped reading: a stream over its StreamMaxLength,
                        # its reply lost with the connection when our write failed first.
                        # Taken wrongly, this only holds mail: the message is then sent file
                        # by file, and a file still refused is held (ANTIVIRUS_TOO_BIG).
                        raise StreamTooLarge(f"clamd at {self.address} cut a stream of "
                                             f"{len(data)} bytes") from exc
                    raise ClamdUnavailable(f"clamd at {self.address}: {exc}") from exc
                except BaseException:  # an error reply, a cancelled scan: state unknown
                    session.close()
                    raise
                self._idle.append(session)
                return found

    async def ping(self) -> bool:
        """clamd answers PONG (the readiness probe)."""
        try:
            reader, writer = await self._connect()
        except ClamdUnavailable:
            return False
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                writer.write(b"zPING\0")
                await writer.drain()
                return (await reader.readuntil(b"\0")) == b"PONG\0"
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return False
        finally:
            writer.close()

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
