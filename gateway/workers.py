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

A large bytes argument (the message) does not go through pebble's pipe, whose pickling and
64 KB chunks cost 1.3 ms of CPU per MB on both sides (bench/RESULTS.md): it is written once
to a private file in shared memory (/dev/shm, mode 0600 in a 0700 folder), which the worker
reads, and removed when the job ends. Without room there, it goes through the pipe.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import logging
import multiprocessing
import os
import resource
import shutil
import signal
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from pebble import ProcessExpired, ProcessPool

from gateway.errors import ScanTimeout, WorkerCrashed

T = TypeVar("T")
log = logging.getLogger(__name__)

# Modules whose functions run as killable jobs: imported once by the fork server.
JOB_MODULES = ["gateway.message", "gateway.attachments", "gateway.checks.outbound_health"]

_provided: dict[str, object] = {}  # in a worker process: what `provide` installed
SPOOL_MIN_BYTES = 64 * 1024  # smaller arguments go through the pipe
_SPOOL_PREFIX = "gateway-jobs-"


class Workers:
    def __init__(self, threads: int = 2, processes: int = 1, memory_mb: int = 0) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="gw-worker")
        self._processes = max(1, processes)
        self._memory_mb = memory_mb
        self._state: dict[str, object] = {}
        self._procs: ProcessPool | None = None
        self._lock = threading.Lock()  # `provide` runs from the reload thread
        self._spool: Spool | None = None  # created with the first killable job
        self._spooled = 0

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
        """Run fn(*args) in a worker process, killed past `limit_s` seconds of running, or
        given up after waiting for a worker as long again (ScanTimeout), or when the caller is
        cancelled. WorkerCrashed if its process died, or if the pool could not take it even
        once rebuilt (a pool pebble declared broken is never used again)."""
        if self._procs is None or self._spool is None:
            # The spool (which may clean folders of dead processes), the fork server and the
            # workers are made off the event loop.
            await asyncio.to_thread(self._prepare)
        files: list[Path] = []
        sent = tuple(self._spooled_arg(a, files) for a in args)
        try:
            # Cancelling the wait cancels the job, which kills its process if it had started.
            async with asyncio.timeout(2 * limit_s):
                for attempt in (1, 2):
                    pool, future = self._schedule(fn, sent, limit_s)
                    try:
                        return await asyncio.wrap_future(future)
                    except (RuntimeError, BrokenProcessPool) as exc:
                        # The pool broke, not the job (pebble's "All workers expired" when a
                        # worker died between jobs): once more on a new pool.
                        self._discard(pool)
                        if attempt == 2:
                            raise WorkerCrashed(f"{_name(fn)}: worker pool failed ({exc})"
                                                ) from None
                        log.warning("worker pool failed (%s): job sent to a new one", exc)
                raise AssertionError("unreachable")
        except (TimeoutError, concurrent.futures.TimeoutError):
            raise ScanTimeout(f"{_name(fn)} took more than {limit_s}s (stopped)") from None
        except ProcessExpired as exc:
            raise WorkerCrashed(f"{_name(fn)}: worker process died ({exc})") from None
        finally:
            for path in files:
                with contextlib.suppress(OSError):
                    path.unlink()

    def _schedule(self, fn: Callable[..., T], sent: tuple[object, ...],
                  limit_s: float) -> tuple[ProcessPool, concurrent.futures.Future[T]]:
        for _ in range(2):
            pool = self._process_pool()
            try:
                return pool, pool.schedule(_call, args=(fn, sent), timeout=limit_s)
            except (RuntimeError, BrokenProcessPool, OSError) as exc:
                # Broken for good (a worker lost outside a job, a failed fork), or closed by
                # a reload meanwhile: a new pool, once.
                log.warning("worker pool unusable (%s): building a new one", exc)
                self._discard(pool)
        raise WorkerCrashed(f"{_name(fn)}: no usable worker pool")

    def _discard(self, pool: ProcessPool) -> None:
        with self._lock:
            if self._procs is pool:
                self._procs = None
        _retire(pool, finish_running=False)

    def _spooled_arg(self, arg: object, files: list[Path]) -> object:
        """A large bytes argument as a file in the spool (the argument itself if there is
        no room: the pipe still works)."""
        if self._spool is None or not isinstance(arg, bytes) or len(arg) < SPOOL_MIN_BYTES:
            return arg
        self._spooled += 1
        path = self._spool.path / str(self._spooled)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(arg)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
        except OSError as exc:  # /dev/shm full (a container's is 64 MB): through the pipe
            log.debug("spool write failed: %s", exc)
            with contextlib.suppress(OSError):
                path.unlink()
            return arg
        files.append(path)
        return _Spooled(str(path))

    def provide(self, name: str, value: object) -> None:
        """Install `value` (picklable) under `name` in every worker process. Jobs already
        running finish with what they had; the next ones get the new value."""
        with self._lock:
            self._state[name] = value
            old, self._procs = self._procs, None
        if old is not None:
            _retire(old, finish_running=True)

    def _prepare(self) -> None:
        """The spool, and the pool with its workers started (pebble starts them lazily)."""
        with self._lock:
            if self._spool is None:
                self._spool = Spool.create()
        self._process_pool().active  # noqa: B018 - the property starts the pool

    def _process_pool(self) -> ProcessPool:
        with self._lock:
            if self._procs is None or not self._procs.active:
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
        if procs is not None:
            _retire(procs, finish_running=False)
        if self._spool is not None:
            self._spool.remove()
            self._spool = None


def _retire(pool: ProcessPool, *, finish_running: bool) -> None:
    """No new jobs for `pool`; its running ones finish (a reload) or are stopped, and it is
    joined (about 0.1 s) beside the caller, never on the event loop."""
    if finish_running:
        pool.close()  # type: ignore[no-untyped-call]
    else:
        pool.stop()  # type: ignore[no-untyped-call]
    # A stopped pool's join terminates its workers: the process waits for it at exit.
    threading.Thread(target=pool.join, name="gw-pool-retire", daemon=finish_running).start()


class _Spooled:
    """A bytes argument waiting in a spool file (read by the worker)."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, ...]:
        return (_Spooled, (self.path,))


def _call(fn: Callable[..., T], args: tuple[object, ...]) -> T:
    """In a worker process: fn with its spooled arguments read back."""
    return fn(*(Path(a.path).read_bytes() if isinstance(a, _Spooled) else a for a in args))


class Spool:
    """A private folder in shared memory (else the temporary folder) for large job arguments,
    marked in use by an exclusive lock on its `.lock` file for the life of its owner: the
    kernel drops the lock when the owner dies, whatever its PID namespace. Folders whose lock
    can be taken (and lockless ones older than a minute) were left by a dead process and are
    removed when a new spool is made; only the current user's folders are touched."""

    def __init__(self, path: Path, lock_fd: int) -> None:
        self.path = path
        self._lock_fd = lock_fd

    @staticmethod
    def create() -> Spool | None:
        base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else Path(tempfile.gettempdir())
        for old in base.glob(f"{_SPOOL_PREFIX}*"):
            if _abandoned(old):
                shutil.rmtree(old, ignore_errors=True)
        try:
            path = Path(tempfile.mkdtemp(prefix=_SPOOL_PREFIX, dir=base))
            fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                         0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            log.warning("no spool folder for worker jobs (%s): messages go through the pipe",
                        exc)
            return None
        return Spool(path, fd)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)


def _abandoned(folder: Path) -> bool:
    try:
        st = folder.lstat()
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        return False
    try:
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:  # being created right now, or left before its lock was made
        return time.time() - st.st_mtime > 60
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # its owner is alive
    finally:
        os.close(fd)
    return True


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
