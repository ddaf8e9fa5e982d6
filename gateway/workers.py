"""Where blocking and CPU-bound work runs, each job with a deadline.

The event loop never parses, runs libmagic, YARA or PDF readers itself: it awaits a job.

- `Workers.run`: a thread, for bounded work (hashing for DKIM, the banner, the preview). A
  thread cannot be stopped: past its limit the caller gets ScanTimeout, but the thread runs on.
- `Workers.run_killable`: a worker process, for the work hostile input can make run away (the
  MIME of huge messages, archive walks, PDF text). Past its limit the process is killed and
  its slot given to a new one; a process that dies (a crashing parser, its memory limit) gives
  WorkerCrashed. State the jobs need (the compiled YARA rules) is installed in every worker
  process with `provide`, and read there with `provided`.

The pool is the event loop's own: each worker process is connected to the serving process by
a socket pair, read and written by the loop (no dispatching threads), and a job is one frame
each way. Large bytes arguments (the message) are sent beside the pickle, not inside it, so
they are copied once into the socket and once out of it. Measured against pebble's pool, which
this replaces (bench/RESULTS.md, `python bench/jobs.py`): a round trip of 20 KB, 500 KB and 2 MB
costs 0.15, 0.30 and 0.85 ms of CPU instead of 0.35, 0.65 and 1.40 (pebble: three threads per
pool, a pipe in 64 KB chunks, or a file in /dev/shm). Neither pebble, loky nor billiard
offers a pool that an asyncio loop drives itself with a per-job kill.

Worker processes are started by multiprocessing's fork server with the job modules
preloaded (a killed worker is replaced in milliseconds); a serving process starts its own as
soon as it serves (`warm`), never the parent that forks the serving processes.
A worker exits as soon as its serving process closes the socket or dies, even in the middle of
a job (a thread of its own waits for the peer's hang-up), so a crashed serving process leaves
no runaway job behind.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import logging
import multiprocessing
import os
import pickle
import resource
import select
import signal
import socket
import struct
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.process import BaseProcess
from typing import Any, TypeVar, cast

from gateway import metrics
from gateway.errors import ScanTimeout, WorkerCrashed

T = TypeVar("T")
log = logging.getLogger(__name__)

# Modules whose functions run as killable jobs: imported once by the fork server.
JOB_MODULES = ["gateway.workers", "gateway.message", "gateway.attachments",
               "gateway.checks.outbound_health", "gateway.links"]

_provided: dict[str, object] = {}  # in a worker process: what `provide` installed
OUT_OF_BAND_BYTES = 16 * 1024  # bytes arguments from this size are sent beside the pickle
START_LIMIT_S = 60.0  # a worker process not started by then (the fork server's imports) failed
_COUNT = struct.Struct("!I")
_ACK = b"\x06"
_SIZE = struct.Struct("!Q")
_SOCKET_BUFFER = 4 << 20
_PR_SET_PDEATHSIG = 1


class Workers:
    def __init__(self, threads: int = 2, processes: int = 1, memory_mb: int = 0) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="gw-worker")
        self._processes = max(1, processes)
        self._memory_mb = memory_mb
        self._lock = threading.Lock()  # `provide` runs from the reload thread
        self._state: dict[str, object] = {}
        self._state_frame = pickle.dumps({}, protocol=pickle.HIGHEST_PROTOCOL)
        self._generation = 0
        self._procs: _ProcessPool | None = None  # the running loop's

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
        given up after waiting for a free worker as long again (ScanTimeout), or when the
        caller is cancelled. WorkerCrashed if its process died during the job, or could not
        be started. fn, its arguments and its result (or exception) must be picklable."""
        with metrics.get().job() as started:  # waiting for a worker, then running
            return await self._run_killable(fn, args, limit_s, started)

    async def _run_killable(self, fn: Callable[..., T], args: tuple[object, ...],
                            limit_s: float, started: Callable[[], None]) -> T:
        procs = self._process_pool()
        try:
            async with asyncio.timeout(limit_s):
                slot = await procs.idle.get()
        except TimeoutError:
            raise ScanTimeout(f"{_name(fn)}: no free worker within {limit_s}s") from None
        worker: _Worker | None = None
        ok, value = True, cast(Any, None)
        try:
            for attempt in (1, 2):
                try:
                    async with asyncio.timeout(limit_s):
                        worker = await self._ready(procs, slot)
                    started()
                except TimeoutError:
                    raise ScanTimeout(f"{_name(fn)}: no worker ready within {limit_s}s"
                                      ) from None
                try:
                    async with asyncio.timeout(limit_s):
                        ok, value = await worker.call(fn, args)
                    break
                except _NotSent as exc:
                    # The worker was dead before it had the job (killed while idle, since
                    # the last look): the job never ran, so a new worker takes it, once.
                    worker.kill()
                    worker = slot = None
                    if attempt == 2:
                        raise WorkerCrashed(f"{_name(fn)}: no live worker ({exc})") from None
                    log.warning("worker process lost while idle: job sent to a new one")
                except TimeoutError:
                    worker.kill()
                    raise ScanTimeout(f"{_name(fn)} took more than {limit_s}s (stopped)"
                                      ) from None
                except (asyncio.IncompleteReadError, ConnectionError, pickle.UnpicklingError):
                    how = worker.exit_description()
                    worker.kill()
                    raise WorkerCrashed(f"{_name(fn)}: worker process died ({how})") from None
        except BaseException:
            if worker is not None:
                worker.kill()  # cancelled mid-job: nothing else can stop it
            raise
        finally:
            if worker is not None and not ok and isinstance(value, MemoryError):
                worker.kill()  # past its memory limit: a fresh process for the next job
            procs.give_back(worker)
        if not ok:
            raise value  # the job's own exception
        return value  # type: ignore[no-any-return]

    async def warm(self) -> None:
        """Start the worker processes now (a serving process that has just started), not with
        the first job: the fork server's imports take about 0.3 s, more on a loaded host, and
        the messages waiting for it would pay them. A failure is left to the first job."""
        procs = self._process_pool()
        for _ in range(procs.size):
            try:
                slot = procs.idle.get_nowait()
            except asyncio.QueueEmpty:  # jobs took the slots meanwhile: they start workers
                return
            worker = None
            try:
                worker = await self._ready(procs, slot)
            except WorkerCrashed as exc:
                log.warning("worker processes not started in advance: %s", exc)
                return
            finally:
                procs.give_back(worker)

    async def _ready(self, procs: _ProcessPool, worker: _Worker | None) -> _Worker:
        """A live worker with the current state: the slot's own, or a new one."""
        if worker is not None and not worker.usable:  # died while idle (an OOM kill)
            worker.kill()
            worker = None
        if worker is None:
            worker = await procs.start(self._memory_mb)
        with self._lock:
            generation, frame = self._generation, self._state_frame
        if worker.generation != generation:
            try:
                async with asyncio.timeout(START_LIMIT_S):
                    await worker.install(frame)
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
                worker.kill()
                raise WorkerCrashed(f"worker process could not take its state ({exc!r})"
                                    ) from None
            except BaseException:  # cancelled meanwhile: no half-installed worker is kept
                worker.kill()
                raise
            worker.generation = generation
        return worker

    def provide(self, name: str, value: object) -> None:
        """Install `value` (picklable) under `name` in every worker process. Jobs already
        running finish with what they had; the next ones get the new value. Pickled here,
        once (from the reload thread on SIGHUP, never on the event loop while serving)."""
        with self._lock:
            state = {**self._state, name: value}
            frame = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
            self._state, self._state_frame = state, frame
            self._generation += 1

    def _process_pool(self) -> _ProcessPool:
        loop = asyncio.get_running_loop()
        if self._procs is None or self._procs.loop is not loop:
            if self._procs is not None:  # a pool of another (finished) loop
                self._procs.close()
            self._procs = _ProcessPool(loop, self._processes)
        return self._procs

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._procs is not None:
            self._procs.close()
            self._procs = None


class _ProcessPool:
    """`size` slots, each an idle worker, or None (to be started on use)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int) -> None:
        self.loop = loop
        self.size = size
        self.idle: asyncio.Queue[_Worker | None] = asyncio.Queue()
        for _ in range(size):
            self.idle.put_nowait(None)
        self.workers: set[_Worker] = set()
        self._starter = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="gw-worker-start")

    async def start(self, memory_mb: int) -> _Worker:
        """A new worker process (started off the loop: the first start waits for the fork
        server's imports). WorkerCrashed if it cannot be started."""
        ours, theirs = socket.socketpair()
        for s in (ours, theirs):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(JOB_MODULES)
        proc = ctx.Process(target=_serve, args=(theirs, memory_mb), name="gateway-job",
                           daemon=True)  # at exit, multiprocessing stops it, not waits
        # One thread of its own: a start stuck on the fork server never holds the loop's
        # default executor (asyncio.to_thread), which the rest of the gateway uses.
        started = self._starter.submit(proc.start)
        try:
            async with asyncio.timeout(START_LIMIT_S):
                await asyncio.shield(asyncio.wrap_future(started))
        except BaseException as exc:
            def _after(f: concurrent.futures.Future[None]) -> None:
                # Only once start() is over (it may still send theirs's fd number, which a
                # socket opened meanwhile could have taken), in the starter's thread: the
                # loop may be closed by then (a gateway stopping while it warmed up).
                ours.close()
                theirs.close()
                if not f.cancelled() and f.exception() is None:
                    _reap(proc)  # it started after all: stopped

            started.add_done_callback(_after)
            if isinstance(exc, (TimeoutError, OSError)):
                raise WorkerCrashed(f"no worker process could be started ({exc!r})") from None
            raise
        theirs.close()
        reader, writer = await asyncio.open_connection(sock=ours)
        worker = _Worker(proc, reader, writer, self, ours)
        self.workers.add(worker)
        return worker

    def give_back(self, worker: _Worker | None) -> None:
        """A slot back: its worker if still usable, else None (a dead or killed one is
        stopped and forgotten, its slot starts a new one on use)."""
        if worker is not None and not worker.usable:
            worker.kill()
            worker = None
        self.idle.put_nowait(worker)

    def close(self) -> None:
        for worker in list(self.workers):
            worker.kill()
        self._starter.shutdown(wait=False)


class _Worker:
    def __init__(self, proc: BaseProcess, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, pool: _ProcessPool, sock: socket.socket) -> None:
        self.proc = proc
        self.sock = sock
        self.reader = reader
        self.writer = writer
        self.pool = pool
        self.generation = -1  # of the state it holds
        self.killed = False

    @property
    def usable(self) -> bool:
        """Not killed, and alive as far as can be seen now: an idle worker never writes, so
        anything readable on its socket (its end closed, as a dying process's is) or a
        status from the fork server means it is gone."""
        if self.killed or self.reader.at_eof() or not self.proc.is_alive():
            return False
        sock = self.writer.get_extra_info("socket")
        if sock is None:
            return False
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN | select.POLLRDHUP | select.POLLHUP)
        return not poller.poll(0)

    async def call(self, fn: Callable[..., object], args: tuple[object, ...]
                   ) -> tuple[bool, Any]:
        blobs: list[bytes] = []
        sent: list[object] = []
        for arg in args:
            if isinstance(arg, bytes) and len(arg) >= OUT_OF_BAND_BYTES:
                sent.append(_OutOfBand(len(blobs)))
                blobs.append(arg)
            else:
                sent.append(arg)
        frame = pickle.dumps(("job", fn, tuple(sent)), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            await self._send([frame, *blobs])
            # The worker acknowledges a whole job before it runs it: a worker that died
            # before (killed while idle, since `usable` looked) never started this one.
            await self.reader.readexactly(len(_ACK))
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            raise _NotSent(repr(exc)) from None
        (size,) = _SIZE.unpack(await self.reader.readexactly(_SIZE.size))
        reply = await self.reader.readexactly(size)
        try:
            ok, value, *traced = pickle.loads(reply)
        except Exception as exc:  # noqa: BLE001 - a value that pickles but cannot be rebuilt
            return False, RuntimeError(f"unreadable reply from the worker: {exc!r}")
        if traced:
            _trace(traced[0])
        return ok, value

    async def install(self, state_frame: bytes) -> None:
        await self._send([pickle.dumps(("state",), protocol=pickle.HIGHEST_PROTOCOL),
                          state_frame])
        (size,) = _SIZE.unpack(await self.reader.readexactly(_SIZE.size))
        await self.reader.readexactly(size)

    async def _send(self, frames: list[bytes]) -> None:
        self.writer.writelines([_COUNT.pack(len(frames)),
                                *(_SIZE.pack(len(f)) for f in frames), *frames])
        await self.writer.drain()

    def kill(self) -> None:
        """Stop the process now (SIGKILL) and forget it; reaped beside the loop."""
        if self.killed:
            return
        self.killed = True
        self.pool.workers.discard(self)
        with contextlib.suppress(RuntimeError):  # its loop is closed already
            self.writer.close()  # unregisters the socket from the loop at once
        self.sock.close()  # now, not in a later loop iteration that may never come
        _reap(self.proc)

    def exit_description(self) -> str:
        code = self.proc.exitcode  # not waited for: known if the fork server reported it
        if code is None:
            return "no reply"
        return f"signal {-code}" if code < 0 else f"exit code {code}"


def _reap(proc: BaseProcess) -> None:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        proc.kill()
    threading.Thread(target=_join, args=(proc,), name="gw-worker-reap", daemon=True).start()


def _join(proc: BaseProcess) -> None:
    with contextlib.suppress(OSError, ValueError, AssertionError):
        proc.join(10)


class _NotSent(Exception):
    """A job could not be sent: its worker was gone, and the job never started."""


class _OutOfBand:
    """Stands, in a job's pickled arguments, for the bytes frame number `index` after it."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __reduce__(self) -> tuple[object, ...]:
        return (_OutOfBand, (self.index,))


def _serve(sock: socket.socket, memory_mb: int) -> None:
    """A worker process's life: frames in, one result frame out for each, until the serving
    process hangs up."""
    # pebble-style pools stop a worker with SIGTERM, whose Python handler cannot run inside
    # C code (YARA, libmagic): here the default actions apply, and ^C is the parent's.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_the_fork_server(sock.fileno())
    threading.Thread(target=_exit_on_hang_up, args=(sock.fileno(),), daemon=True,
                     name="gw-hang-up").start()
    if memory_mb > 0:  # a bomb becomes MemoryError (or a dead worker), not a host in swap
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    sock.setblocking(True)
    while True:
        frames = _receive(sock)
        if frames is None:
            return
        message = pickle.loads(frames[0])
        if message[0] == "state":
            _provided.clear()
            _provided.update(pickle.loads(frames[1]))
            reply = pickle.dumps(True)
        else:
            _, fn, args = message
            args = tuple(frames[1 + a.index] if isinstance(a, _OutOfBand) else a for a in args)
            del frames
            sock.sendall(_ACK)
            try:
                value = fn(*args)
                reply = pickle.dumps((True, value, *_traced()),
                                     protocol=pickle.HIGHEST_PROTOCOL)
            except (Exception, Overrun) as exc:
                reply = _exception_reply(exc)
            del args
        sock.sendall(_SIZE.pack(len(reply)) + reply)


def _mutmut_stats() -> set[str] | None:
    """While mutation testing (mutmut) traces which tests run which functions, the set it
    records them in; None otherwise (and always in production, where mutmut is not loaded)."""
    state = sys.modules.get("mutmut.state")
    if state is None or os.environ.get("MUTANT_UNDER_TEST") != "stats":
        return None
    return cast(set[str], state.state()._stats)  # noqa: SLF001


def _traced() -> tuple[list[str], ...]:
    """In a worker: the functions the job ran, for the serving process's tracer (mutmut traces
    a process, not its children: worker-only code would look untested). Empty otherwise."""
    stats = _mutmut_stats()
    if not stats:
        return ()
    names = list(stats)
    stats.clear()
    return (names,)


def _trace(names: list[str]) -> None:
    stats = _mutmut_stats()
    if stats is not None:
        stats.update(names)


def _exception_reply(exc: BaseException) -> bytes:
    """The job's exception as a reply the serving process can rebuild: some exceptions
    pickle but cannot be unpickled (an __init__ with other arguments), some do not pickle."""
    traced = _traced()
    try:
        reply = pickle.dumps((False, exc, *traced), protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(reply)
        return reply
    except Exception:  # noqa: BLE001
        return pickle.dumps((False, RuntimeError(f"{type(exc).__name__}: {exc}"), *traced))


def _die_with_the_fork_server(keep_fd: int) -> None:
    """In a worker process: killed by the kernel (SIGKILL, whatever holds the GIL) when its
    parent, the fork server, exits. The fork server exits once its serving process is gone
    and nothing else holds that process's "alive" pipe: every inherited descriptor but the
    job socket and the standard streams is closed, that pipe's copy included."""
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the fork server died before the request
        os._exit(0)
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    os.closerange(3, keep_fd)
    os.closerange(keep_fd + 1, limit if limit != resource.RLIM_INFINITY else 65536)


def _receive(sock: socket.socket) -> list[bytes] | None:
    head = sock.recv(_COUNT.size, socket.MSG_WAITALL)
    if len(head) < _COUNT.size:
        return None
    (count,) = _COUNT.unpack(head)
    sizes = sock.recv(_SIZE.size * count, socket.MSG_WAITALL)
    if len(sizes) < _SIZE.size * count:
        return None
    frames = []
    for i in range(count):
        (size,) = _SIZE.unpack_from(sizes, i * _SIZE.size)
        frame = sock.recv(size, socket.MSG_WAITALL) if size else b""
        if len(frame) < size:
            return None
        frames.append(frame)
    return frames


def _exit_on_hang_up(fd: int) -> None:
    """In a worker process: exit at once when the serving process closes its end or dies,
    whatever the main thread is doing."""
    poller = select.poll()
    poller.register(fd, select.POLLRDHUP)
    while True:
        for _, event in poller.poll():
            if event & (select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL):
                os._exit(0)


def provided(name: str) -> Any:
    """In a worker process: the value installed by Workers.provide (KeyError if none)."""
    return _provided[name]


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
