"""The monitoring listener (`[metrics] listen`, 127.0.0.1:9464 by default): `/metrics` in
Prometheus's text format, `/healthz` (the serving process answers) and `/readyz` (the next
hop, the store and the engines mail waits for answer too). Served by the primary serving
process; it reads the values of every serving process (gateway/metrics.py)."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

from aiohttp import web

from gateway import metrics
from gateway.runtime import Runtime

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 10.0
READY_CACHE_S = 5.0
TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"


class Monitoring:
    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        self._probing: asyncio.Task[list[str]] | None = None
        self._answer: tuple[float, list[str]] | None = None  # (when, problems)

    async def metrics(self, request: web.Request) -> web.Response:
        families = []
        if self._rt.store is not None:
            from prometheus_client.core import GaugeMetricFamily
            items, size = await self._rt.store.total_size()
            families = [
                GaugeMetricFamily("gateway_quarantine_items", "Messages held in quarantine",
                                  value=items),
                GaugeMetricFamily("gateway_quarantine_bytes", "Size of the messages held",
                                  value=size)]
        body = await asyncio.to_thread(metrics.get().exposition, families)
        return web.Response(body=body, headers={"Content-Type": TEXT_FORMAT})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        """200 when a message could be taken now: the next hop answers (a real SMTP greeting,
        EHLO, STARTTLS as configured) and so does the store; 503 naming what does not. One
        probe at a time, its answer kept READY_CACHE_S: a flood of requests opens no more
        connections to the mailbox server than one."""
        now = time.monotonic()
        if self._answer is None or now - self._answer[0] > READY_CACHE_S:
            if self._probing is None:
                self._probing = asyncio.create_task(self._probe())
            try:
                problems = await asyncio.shield(self._probing)
            finally:
                if self._probing is not None and self._probing.done():
                    self._probing = None
            self._answer = (time.monotonic(), problems)
        problems = self._answer[1]
        if problems:
            return web.Response(status=503, text="\n".join(problems) + "\n")
        return web.Response(text="ready\n")

    async def _probe(self) -> list[str]:
        problems = []
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                await self._rt.next_hop.probe()
        except Exception as exc:  # noqa: BLE001 - any failure is "not ready", said
            problems.append(f"next hop {self._rt.next_hop.name}: "
                            f"{str(exc) or type(exc).__name__}")
        if self._rt.store is not None:
            try:
                async with asyncio.timeout(READY_TIMEOUT_S):
                    await self._rt.store.count()
            except Exception as exc:  # noqa: BLE001
                problems.append(f"store: {str(exc) or type(exc).__name__}")
        for check in self._rt.pipeline.checks:  # an engine mail would wait for (clamd)
            probe = getattr(check, "probe", None)
            if probe is None:
                continue
            try:
                async with asyncio.timeout(READY_TIMEOUT_S):
                    problem = await probe()
            except Exception as exc:  # noqa: BLE001
                problem = str(exc) or type(exc).__name__
            if problem:
                problems.append(f"{check.name}: {problem}")
        if problems:
            log.warning("not ready", extra={"fields": {"problems": problems}})
        return problems


async def start_monitoring(runtime: Runtime, sock: socket.socket | None,
                           listen: tuple[str, int] | None = None) -> web.AppRunner:
    mon = Monitoring(runtime)
    app = web.Application()
    app.router.add_get("/metrics", mon.metrics)
    app.router.add_get("/healthz", mon.healthz)
    app.router.add_get("/readyz", mon.readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site: web.BaseSite
    if sock is not None:
        site = web.SockSite(runner, sock)
    else:
        assert listen is not None
        site = web.TCPSite(runner, listen[0], listen[1], reuse_address=True)
    await site.start()
    log.info("monitoring listening", extra={"fields": {"listen": str(site.name)}})
    return runner


def listening_port(runner: web.AppRunner) -> int:
    """The port an aiohttp runner listens on (this one, or the web page's)."""
    for site in runner.sites:
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            return int(server.sockets[0].getsockname()[1])
    raise RuntimeError("not listening")
