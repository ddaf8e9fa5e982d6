"""ClamAV (`[engines.clamav]`, off by default): the message streamed to clamd, which reads
MIME, archives and documents itself. A message larger than clamd takes in one stream is sent
file by file, each decoded as our parser reads it.

A signature is a known malware (ANTIVIRUS_MALWARE: refused, or held by config); ClamAV's
heuristic detections (`Heuristics.*`, `PUA.*`) are signs with their own scores. clamd down or
out of time follows `on_failure`: 451 by default (ANTIVIRUS_UNAVAILABLE), or judged on the
other checks (ANTIVIRUS_UNCHECKED).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import ClassVar

from gateway.checks.base import CheckContext, CheckResult, Facts, Hit, Services
from gateway.clamd import (
    DEFAULT_STREAM_MAX,
    Clamd,
    ClamdUnavailable,
    Found,
    StreamTooLarge,
    max_scan_time_ms,
    stream_max_from,
)
from gateway.message import ParsedMessage, Part, decode_transfer

log = logging.getLogger(__name__)


def _decoded(raw: bytes, parts: list[Part]) -> list[tuple[str, bytes | None]]:
    """Each leaf part's bytes without transfer encoding (None: not decodable), by name."""
    return [(p.filename or f"partie {p.path}", decode_transfer(p.payload(raw), p.transfer_encoding))
            for p in parts]


class AntivirusCheck:
    name: ClassVar[str] = "antivirus"
    phase: ClassVar[int] = 1
    produces: ClassVar[type[Facts] | None] = None
    symbols: ClassVar[frozenset[str]] = frozenset({
        "ANTIVIRUS_MALWARE", "ANTIVIRUS_MALWARE_HELD", "ANTIVIRUS_PHISHING",
        "ANTIVIRUS_ENCRYPTED", "ANTIVIRUS_HEURISTIC", "ANTIVIRUS_UNAVAILABLE",
        "ANTIVIRUS_UNCHECKED", "ANTIVIRUS_TOO_BIG", "ANTIVIRUS_INCOMPLETE",
    })

    def __init__(self, services: Services) -> None:
        av = services.cfg.engines.clamav
        self._cfg = av
        self._workers = services.workers
        self._clamd = Clamd(av.address, connections=av.connections) if av.enabled else None
        conf = Path(av.clamd_conf)
        self._max = av.stream_max_bytes or stream_max_from(conf) or DEFAULT_STREAM_MAX
        scan_ms = max_scan_time_ms(conf) if av.enabled else None
        if scan_ms is not None and (scan_ms == 0 or scan_ms / 1000 > av.timeout_s):
            # clamd goes on scanning what we gave up on, a thread of its held each time:
            # a few slow files could then keep all mail waiting.
            log.warning("clamd's MaxScanTime (%s ms) is longer than engines.clamav.timeout_s "
                        "(%s s): set MaxScanTime to at most %d in %s", scan_ms or "no limit",
                        av.timeout_s, int(av.timeout_s * 1000), conf)

    async def run(self, msg: ParsedMessage, ctx: CheckContext) -> CheckResult:
        if self._clamd is None:
            return CheckResult(check=self.name)
        raw = ctx.inbound.raw
        hits: list[Hit] = []
        try:
            async with asyncio.timeout(self._cfg.timeout_s):
                found: list[tuple[str, Found]] = []
                files = None
                if len(raw) <= self._max:
                    try:
                        if (f := await self._clamd.scan(raw)) is not None:
                            found.append(("message", f))
                    except StreamTooLarge:  # clamd's limit is lower than we read it
                        files = await self._files(msg, raw, hits)
                else:
                    files = await self._files(msg, raw, hits)
                for name, data in files or ():
                    try:
                        if (f := await self._clamd.scan(data)) is not None:
                            found.append((name, f))
                    except StreamTooLarge:
                        hits.append(self._too_big(name, len(data)))
        except (ClamdUnavailable, TimeoutError) as exc:
            why = str(exc) or f"no answer within {self._cfg.timeout_s:g} s"
            log.warning("antivirus: %s (%s)", why, ctx.inbound.queue_id)
            symbol = ("ANTIVIRUS_UNAVAILABLE" if self._cfg.on_failure == "retry"
                      else "ANTIVIRUS_UNCHECKED")
            return CheckResult.of(self.name, Hit(symbol=symbol, detail=why[:200]))
        for where, f in found:
            hits.append(Hit(symbol=self._symbol(f.signature), detail=f"{where}: {f.signature}",
                            args=(("signature", f.signature), ("part", where))))
        return CheckResult.of(self.name, *hits)

    def _symbol(self, signature: str) -> str:
        if signature.startswith("Heuristics.Phishing."):
            return "ANTIVIRUS_PHISHING"
        if signature.startswith("Heuristics.Encrypted."):
            return "ANTIVIRUS_ENCRYPTED"
        if signature.startswith(("Heuristics.", "PUA.")):
            return "ANTIVIRUS_HEURISTIC"
        return "ANTIVIRUS_MALWARE" if self._cfg.on_malware == "reject" else "ANTIVIRUS_MALWARE_HELD"

    async def _files(self, msg: ParsedMessage, raw: bytes,
                     hits: list[Hit]) -> list[tuple[str, bytes]]:
        """The leaf parts of a message too large for one stream, decoded (in a thread).
        What cannot be sent so is held, never passed: a file still too large
        (ANTIVIRUS_TOO_BIG), and parts our parser could not walk or decode where clamd, or
        a mail reader, might (ANTIVIRUS_INCOMPLETE)."""
        files = await self._workers.run(_decoded, raw, [p for p in msg.parts if not p.is_multipart],
                                        limit_s=self._cfg.timeout_s)
        if msg.parts_truncated:
            hits.append(Hit(symbol="ANTIVIRUS_INCOMPLETE", detail="parts past the parser's limits"))
        fitting = []
        for name, data in files:
            if data is None:
                hits.append(Hit(symbol="ANTIVIRUS_INCOMPLETE", detail=f"{name}: not decodable",
                                args=(("part", name),)))
            elif len(data) <= self._max:
                fitting.append((name, data))
            else:
                hits.append(self._too_big(name, len(data)))
        return fitting

    @staticmethod
    def _too_big(name: str, size: int) -> Hit:
        return Hit(symbol="ANTIVIRUS_TOO_BIG", detail=f"{name}: {size} bytes",
                   args=(("part", name),))

    async def probe(self) -> str | None:
        """What keeps mail waiting (the readiness probe): clamd not answering, when its
        failure answers 451."""
        if self._clamd is None or self._cfg.on_failure != "retry":
            return None
        return None if await self._clamd.ping() else f"clamd at {self._clamd.address} does not answer"

    def close(self) -> None:
        if self._clamd is not None:
            self._clamd.close()


CHECKS = (AntivirusCheck,)
