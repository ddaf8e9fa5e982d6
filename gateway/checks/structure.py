"""Structural checks: malformed MIME, missing or multiple From, header anomalies.

Facts only, from the ParsedMessage and the envelope; the table gives scores and French text.
"""

from __future__ import annotations

import re
from typing import ClassVar

from gateway.checks.base import CheckContext, CheckResult, Facts, Hit, Services
from gateway.message import ParsedMessage

# RFC 5322 section 3.6: fields that may appear at most once.
_SINGLE = ("Date", "From", "Sender", "Reply-To", "To", "Cc", "Subject", "Message-ID")


_GARBLED = re.compile(r'[\s<>"\\]')


class StructureCheck:
    name: ClassVar[str] = "structure"
    phase: ClassVar[int] = 1
    produces: ClassVar[type[Facts] | None] = None
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
                f"{from_count} From fields, {len(msg.from_addresses)} addresses"),
                args=(("fields", str(from_count)), ("addresses", str(len(msg.from_addresses))))))
        elif not msg.from_addresses or any(_GARBLED.search(a) for a in msg.from_addresses):
            # Or read as one address that still holds a quote, a bracket or a space: the
            # parser gave up half-way ("ceo@cabinet.fr\" <x@evil.test>"), and what a mail
            # reader shows is anyone's guess.
            hits.append(Hit(symbol="FROM_UNPARSABLE"))
        if msg.header_count("Date") == 0:
            hits.append(Hit(symbol="DATE_MISSING"))
        if msg.header_count("Message-ID") == 0:
            hits.append(Hit(symbol="MESSAGE_ID_MISSING"))
        dups = [n for n in _SINGLE if n != "From" and msg.header_count(n) > 1]
        if dups:
            hits.append(Hit(symbol="HEADER_DUPLICATE", detail=", ".join(dups),
                            args=(("fields", ", ".join(dups)),)))
        if msg.header_problems:
            hits.append(Hit(symbol="HEADER_ENCODING_BROKEN", detail=", ".join(msg.header_problems)))
        if msg.smuggling_dot:
            hits.append(Hit(symbol="SMTP_BARE_LF_DOT"))
        return CheckResult(check=self.name, hits=tuple(hits))


CHECKS = (StructureCheck,)
