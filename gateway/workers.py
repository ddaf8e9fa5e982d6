"""Worker pool for blocking or CPU-bound work, each job with a deadline.

The event loop never runs parsing, libmagic or YARA itself: it awaits `Workers.run`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import TypeVar

from gateway.errors import ScanTimeout

T = TypeVar("T")


class Workers:
    def __init__(self, threads: int = 2) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="gw-worker")

    async def run(self, fn: Callable[..., T], *args: object, limit_s: float) -> T:
        """Run fn(*args) in the pool; ScanTimeout past `limit_s` seconds."""
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._pool, fn, *args)
        try:
            async with asyncio.timeout(limit_s):
                return await fut
        except TimeoutError:
            raise ScanTimeout(f"{getattr(fn, '__name__', fn)} took more than {limit_s}s") from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
