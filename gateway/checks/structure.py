"""Structural checks: malformed MIME, missing or multiple From, header anomalies.

Facts only, from the ParsedMessage and the envelope; the table gives scores and French text.
"""

from __future__ import annotations

from typing import ClassVar

from gateway.checks.base import CheckContext, CheckResult, Hit, Services
from gateway.message import ParsedMessage

# RFC 5322 section 3.6: fields that may appear at most once.
_SINGLE = ("Date", "From", "Sender", "Reply-To", "To", "Cc", "Subject", "Message-ID")


class StructureCheck:
    name: ClassVar[str] = "structure"
    phase: ClassVar[int] = 1
    symbols: ClassVar[frozenset[str]] = frozenset({
        "MIME_MALFORMED", "MIME_TOO_COMPLEX",
        "FROM_MISSING", "FROM_MULTIPLE", "FROM_UNPARSABLE",
        "DATE_MISSING", "MESSAGE_ID_MISSING", "HEADER_DUPLICATE", "HEADER_ENCODING_BROKEN",
        "SMTP_BARE_LF_DOT",
    })

    def __init__(self, services: Services) -> None:
        self._cfg = services.cfg

    async def run(self, msg: ParsedMessage, ctx: CheckContext) -> CheckResult:
        hits: list[Hit] = []
        if msg.defects:
            kinds = sorted({d.split(":", 1)[1] for d in msg.defects})
            hits.append(Hit(symbol="MIME_MALFORMED", detail=", ".join(kinds)[:300]))
        if msg.parts_truncated:
            hits.append(Hit(symbol="MIME_TOO_COMPLEX",
                            detail=f"more than the part or depth limit ({len(msg.parts)} parts)"))

        from_count = msg.header_count("From")
        if from_count == 0:
            hits.append(Hit(symbol="FROM_MISSING"))
        elif from_count > 1 or len(msg.from_addresses) > 1:
            hits.append(Hit(symbol="FROM_MULTIPLE", detail=(
                f"{from_count} From fields, {len(msg.from_addresses)} addresses")))
        elif not msg.from_addresses:
            hits.append(Hit(symbol="FROM_UNPARSABLE"))
        if msg.header_count("Date") == 0:
            hits.append(Hit(symbol="DATE_MISSING"))
        if msg.header_count("Message-ID") == 0:
            hits.append(Hit(symbol="MESSAGE_ID_MISSING"))
        dups = [n for n in _SINGLE if n != "From" and msg.header_count(n) > 1]
        if dups:
            hits.append(Hit(symbol="HEADER_DUPLICATE", detail=", ".join(dups)))
        if msg.header_problems:
            hits.append(Hit(symbol="HEADER_ENCODING_BROKEN", detail=", ".join(msg.header_problems)))
        # A line holding a lone dot with a bare LF on one side: the shape of SMTP smuggling
        # (CVE-2023-51764 and kin). It did not end DATA here, but other servers may split on it.
        if _has_smuggling_dot(ctx.inbound.raw):
            hits.append(Hit(symbol="SMTP_BARE_LF_DOT"))
        return CheckResult(check=self.name, hits=tuple(hits))


def _has_smuggling_dot(raw: bytes) -> bool:
    """True when a '.' line is delimited by at least one bare LF (not CRLF on both sides)."""
    start = 0
    while True:
        i = raw.find(b"\n.", start)
        if i < 0:
            return False
        start = i + 1
        before_crlf = i > 0 and raw[i - 1:i] == b"\r"
        after = raw[i + 2:i + 4]
        if after[:1] == b"\n" or after == b"\r\n":
            after_crlf = after == b"\r\n"
            if not (before_crlf and after_crlf):
                return True


CHECKS = (StructureCheck,)
