"""Where blocking and CPU-bound work runs, each job with a deadline.

The event loop never parses, runs libmagic, YARA or PDF readers itself: it awaits a job.

- `Workers.run`: a thread, for bounded work (hashing for DKIM, the banner, the preview). A
  thread cannot be stopped: past its limit the caller gets ScanTimeout, but the thread runs on.
- `Workers.run_killable`: a worker process (pebble's ProcessPool), for the work hostile input
  can make run away (the MIME of huge messages, archive walks, PDF text). Past its limit the
  process is killed and replaced, so its slot is free again; a process that dies (a crashing
  parser, its memory limit) gives WorkerCrashed. State the jobs need (the compiled YARA rules)
  is installed in every worker process with `provide`, and read there with `provided`.

Library: pebble (maintained; per-job timeout that kills the worker, which
concurrent.futures.ProcessPoolExecutor cannot do). Worker processes are started by a fork
server with the job modules preloaded, so a killed worker is replaced in milliseconds; none is
started before the first job (a serving process forks after start-up, never with a pool).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import resource
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from pebble import ProcessExpired, ProcessPool

from gateway.errors import ScanTimeout, WorkerCrashed

T = TypeVar("T")
log = logging.getLogger(__name__)

# Modules whose functions run as killable jobs: imported once by the fork server.
JOB_MODULES = ["gateway.message", "gateway.attachments", "gateway.checks.outbound_health"]

_provided: dict[str, object] = {}  # in a worker process: what `provide` installed


class Workers:
    def __init__(self, threads: int = 2, processes: int = 1, memory_mb: int = 0) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="gw-worker")
        self._processes = max(1, processes)
        self._memory_mb = memory_mb
        self._state: dict[str, object] = {}
        self._procs: ProcessPool | None = None
        self._lock = threading.Lock()  # `provide` runs from the reload thread

    async def run(self, fn: Callable[..., T], *args: object, limit_s: float) -> T:
        """Run fn(*args) in a thread; ScanTimeout past `limit_s` seconds."""
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._pool, fn, *args)
        try:
            async with asyncio.timeout(limit_s):
                return await fut
        except TimeoutError:
            raise ScanTimeout(f"{_name(fn)} took more than {limit_s}s") from None

    async def run_killable(self, fn: Callable[..., T], *args: object, limit_s: float) -> T:
        """Run fn(*args) in a worker process, killed past `limit_s` seconds of running
        (ScanTimeout) or when the caller is cancelled; WorkerCrashed if it died."""
        future = self._process_pool().schedule(fn, args=args, timeout=limit_s)
        try:
            # Counted from now, queue wait included (as for a thread). Cancelling the wait
            # cancels the job, which kills its process if it had started.
            async with asyncio.timeout(limit_s):
                return await asyncio.wrap_future(future)
        except (TimeoutError, concurrent.futures.TimeoutError):
            raise ScanTimeout(f"{_name(fn)} took more than {limit_s}s (stopped)") from None
        except ProcessExpired as exc:
            raise WorkerCrashed(f"{_name(fn)}: worker process died ({exc})") from None

    def provide(self, name: str, value: object) -> None:
        """Install `value` (picklable) under `name` in every worker process. Jobs already
        running finish with what they had; the next ones get the new value."""
        with self._lock:
            self._state[name] = value
            old, self._procs = self._procs, None
        if old is not None:
            old.close()  # type: ignore[no-untyped-call]  # running jobs finish, then exit
            threading.Thread(target=old.join, daemon=True).start()

    def _process_pool(self) -> ProcessPool:
        with self._lock:
            if self._procs is None:
                ctx = multiprocessing.get_context("forkserver")
                ctx.set_forkserver_preload(JOB_MODULES)
                self._procs = ProcessPool(
                    max_workers=self._processes, context=ctx, initializer=_start_worker,
                    initargs=(dict(self._state), self._memory_mb))
            return self._procs

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            procs, self._procs = self._procs, None
        if procs is not None:  # stopped and joined (about 0.1 s) beside the caller
            procs.stop()  # type: ignore[no-untyped-call]
            threading.Thread(target=procs.join, name="gw-pool-stop").start()


def provided(name: str) -> Any:
    """In a worker process: the value installed by Workers.provide (KeyError if none)."""
    return _provided[name]


def _start_worker(state: dict[str, object], memory_mb: int) -> None:
    # pebble stops a worker past its limit with SIGTERM, whose Python handler cannot run
    # while YARA or libmagic (C code) holds the thread: it then waits 3 s before SIGKILL,
    # with the pool's dispatching held meanwhile. The default action ends it at once.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _provided.clear()
    _provided.update(state)
    if memory_mb > 0:  # a bomb becomes MemoryError (or a dead worker), not a host in swap
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


class Overrun(BaseException):
    """A stage of a job ran past its own limit (raised by `time_limit`). A BaseException:
    a library's `except Exception` around the stage must not swallow it."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Bound one stage of a killable job (e.g. the macro analysis of one document) so the
    rest of the job still reports: raises Overrun in the worker process's main thread. In a
    thread (a job run directly), no stage limit: the job's own limit applies."""
    if threading.current_thread() is not threading.main_thread() or seconds <= 0:
        yield
        return

    def _alarm(signum: int, frame: object) -> None:
        raise Overrun(f"stage took more than {seconds}s")

    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _name(fn: Callable[..., object]) -> str:
    return str(getattr(fn, "__name__", fn))
