"""rspamd (`[engines.rspamd]`, off by default): the message and its envelope posted to
rspamd's `/checkv2`; its score, without its own checks of what the gateway checks itself
(`ignore`: SPF, DKIM, DMARC, ARC), becomes RSPAMD_SCORE, weighted and capped, with rspamd's
top symbols in the detail. rspamd down or out of time follows `on_failure` (451 by default).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import ClassVar

from gateway.checks.base import CheckContext, CheckResult, Facts, Hit, Services
from gateway.config import RspamdSection
from gateway.message import ParsedMessage
from gateway.rspamd import Envelope, Rspamd, RspamdUnavailable

log = logging.getLogger(__name__)
TOP = 6  # rspamd symbols named in the detail


def engine(section: RspamdSection) -> Rspamd:
    """The client of a [engines.rspamd] section (the check's, and the learning's)."""
    password = ""
    if section.password_file:
        password = Path(section.password_file).read_text(encoding="utf-8").strip()
    return Rspamd(section.url, controller_url=section.controller_url, password=password,
                  connections=section.connections)


class RspamdCheck:
    name: ClassVar[str] = "rspamd"
    phase: ClassVar[int] = 1
    produces: ClassVar[type[Facts] | None] = None
    symbols: ClassVar[frozenset[str]] = frozenset({
        "RSPAMD_SCORE", "RSPAMD_UNAVAILABLE", "RSPAMD_UNCHECKED"})

    def __init__(self, services: Services) -> None:
        self._cfg = services.cfg.engines.rspamd
        self._rspamd = engine(self._cfg) if self._cfg.enabled else None

    async def run(self, msg: ParsedMessage, ctx: CheckContext) -> CheckResult:
        if self._rspamd is None:
            return CheckResult(check=self.name)
        i = ctx.inbound
        try:
            async with asyncio.timeout(self._cfg.timeout_s):
                answer = await self._rspamd.check(i.raw, Envelope(
                    ip=i.peer_ip, helo=i.helo, mail_from=i.mail_from, rcpts=i.rcpts,
                    queue_id=i.queue_id, user=i.auth_user), self._cfg.ignore)
        except (RspamdUnavailable, TimeoutError) as exc:
            why = str(exc) or f"no answer within {self._cfg.timeout_s:g} s"
            log.warning("rspamd: %s (%s)", why, i.queue_id)
            symbol = "RSPAMD_UNAVAILABLE" if self._cfg.on_failure == "retry" else "RSPAMD_UNCHECKED"
            return CheckResult.of(self.name, Hit(symbol=symbol, detail=why[:200]))
        if answer.skipped:
            return CheckResult(check=self.name)
        factor = min(self._cfg.max_score, max(0.0, self._cfg.weight * answer.score))
        top = ", ".join(f"{n}({s:g})" for n, s in answer.symbols[:TOP] if s > 0) or "aucun"
        return CheckResult.of(self.name, Hit(
            symbol="RSPAMD_SCORE", factor=round(factor, 2),
            detail=f"rspamd {answer.score:g}: {top}",
            args=(("score", f"{answer.score:g}"), ("top", top))))

    async def probe(self) -> str | None:
        """rspamd not answering, when its failure answers 451 (the readiness probe)."""
        if self._rspamd is None or self._cfg.on_failure != "retry":
            return None
        return None if await self._rspamd.ping() else f"rspamd at {self._rspamd.url} does not answer"

    async def close(self) -> None:
        if self._rspamd is not None:
            await self._rspamd.close()


CHECKS = (RspamdCheck,)
