"""What a serving process runs on, built once by gateway/service.py and handed to the SMTP
side, the web page, the release and the CLI."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from gateway.authstate import AuthState
from gateway.config import Config
from gateway.digest import Digests
from gateway.notice import Notifier
from gateway.pipeline import Pipeline
from gateway.quarantine_service import QuarantineService
from gateway.relay import NextHop
from gateway.symbols import SymbolTable
from gateway.workers import Workers
from quarantine.store import Store


@dataclass(slots=True, kw_only=True)
class Runtime:
    cfg: Config
    table: SymbolTable
    workers: Workers
    pipeline: Pipeline
    next_hop: NextHop
    smarthost: NextHop
    notifier: Notifier
    store: Store | None
    quarantine: QuarantineService | None  # what the web page and the CLI use (None: `scan`)
    auth: AuthState  # login counters, web sessions (shared by the serving processes)
    secret: bytes  # the installation's secret (banner marker, sender release links)
    digests: Digests | None = None  # quarantine digests (None: `scan`)

    async def close(self) -> None:
        await self.notifier.close()
        await self.pipeline.close()
        if self.quarantine is not None:
            await self.quarantine.close()
        if self.store is not None:
            await self.store.close()
        await asyncio.to_thread(self.auth.close)
        self.workers.close()
