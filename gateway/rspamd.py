"""A client of rspamd's HTTP protocol: `/checkv2` on its normal worker (the message and its
envelope as request header fields), `/learnspam` and `/learnham` on its controller (with
its password). aiohttp is the HTTP client the gateway already uses for its web page; one
pooled session per serving process, created on the loop that uses it."""

from __future__ import annotations

import asyncio
import fnmatch
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict

log = logging.getLogger(__name__)


class RspamdUnavailable(Exception):
    """rspamd could not be reached, timed out, or answered with an error."""


@dataclass(frozen=True, slots=True)
class Answer:
    score: float  # rspamd's symbols added up, those we ignore left out
    symbols: tuple[tuple[str, float], ...]  # counted symbols, highest score first
    skipped: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Envelope:
    ip: str
    helo: str
    mail_from: str
    rcpts: Sequence[str]
    queue_id: str
    user: str = ""


def read_answer(body: object, ignore: Sequence[str]) -> Answer:
    """A /checkv2 reply: its symbols' scores added up, those matching `ignore` (globs: the
    checks the gateway makes itself) left out."""
    if not isinstance(body, dict):
        raise RspamdUnavailable("rspamd's answer is not a JSON object")
    if body.get("is_skipped"):
        return Answer(score=0.0, symbols=(), skipped=True)
    symbols = body.get("symbols")
    if not isinstance(symbols, dict):
        raise RspamdUnavailable("rspamd's answer has no symbols")
    counted = []
    for name, sym in symbols.items():
        if not isinstance(sym, dict) or any(fnmatch.fnmatchcase(name, g) for g in ignore):
            continue
        try:
            score = float(sym.get("score", 0.0))
        except (TypeError, ValueError, OverflowError):
            continue
        if score != score or abs(score) == float("inf"):  # NaN, infinite: not a score
            continue
        counted.append((str(name), score))
    counted.sort(key=lambda s: (-s[1], s[0]))
    return Answer(score=round(sum(s for _, s in counted), 3), symbols=tuple(counted))


class Rspamd:
    def __init__(self, url: str, *, controller_url: str = "", password: str = "",
                 connections: int = 8) -> None:
        self.url = url.rstrip("/")
        self.controller_url = controller_url.rstrip("/")
        self._password = password
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._connections),
                timeout=aiohttp.ClientTimeout(total=None), raise_for_status=False)
        return self._session

    async def check(self, raw: bytes, envelope: Envelope, ignore: Sequence[str]) -> Answer:
        headers: CIMultiDict[str] = CIMultiDict()
        headers["IP"] = envelope.ip
        if envelope.helo:
            headers["Helo"] = envelope.helo
        headers["From"] = envelope.mail_from or "<>"
        for rcpt in envelope.rcpts:
            headers.add("Rcpt", rcpt)
        headers["Queue-Id"] = envelope.queue_id
        if envelope.user:
            headers["User"] = envelope.user
        body = await self._post(f"{self.url}/checkv2", raw, headers)
        return read_answer(body, ignore)

    async def learn(self, raw: bytes, *, spam: bool) -> bool:
        """Teach rspamd's Bayes: True when learnt, or already learnt as such."""
        if not self.controller_url:
            raise RspamdUnavailable("no controller_url to learn with")
        headers: CIMultiDict[str] = CIMultiDict()
        if self._password:
            headers["Password"] = self._password
        body = await self._post(f"{self.controller_url}/{'learnspam' if spam else 'learnham'}",
                                raw, headers, learning=True)
        return isinstance(body, dict) and bool(body.get("success", True))

    async def _post(self, url: str, raw: bytes, headers: CIMultiDict[str], *,
                    learning: bool = False) -> object:
        try:  # never redirected: the controller's password goes to its own address only
            async with self._http().post(url, data=io.BytesIO(raw), headers=headers,
                                         allow_redirects=False) as resp:
                text = await resp.text(errors="replace")
                if learning and resp.status == 208:  # "already learned": learnt once
                    return {"success": True}
                if resp.status != 200:
                    raise RspamdUnavailable(f"rspamd {url} answered {resp.status}: {text[:200]}")
        except (aiohttp.ClientError, OSError, ValueError) as exc:  # ValueError: a header value
            raise RspamdUnavailable(f"rspamd {url}: {exc or type(exc).__name__}") from exc
        try:
            return json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise RspamdUnavailable(f"rspamd {url}: not JSON") from exc

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(5), self._http().get(f"{self.url}/ping") as resp:
                return resp.status == 200
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
