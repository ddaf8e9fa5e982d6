"""Start-up and serving: assemble the runtime, open the SMTP port, run the serving processes.

Several serving processes share one listening socket (pre-fork): each runs its own event loop,
pipeline and worker threads, so both cores do SMTP I/O, parsing and checks. The parent binds
the port, prepares the data folder, the quarantine key and index, then forks; it restarts a
child that dies and forwards SIGTERM/SIGINT for a graceful stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import fcntl
import gc
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway import correspondents, digest, logs, metrics
from gateway.accounts import AccountFile
from gateway.auth.dns import Resolver
from gateway.authstate import AuthState
from gateway.banner import load_templates, marker
from gateway.checks import create_checks
from gateway.checks.base import Check, Services
from gateway.checks.rspamd import engine as rspamd_engine
from gateway.config import Config, HostPort, nameservers
from gateway.correspondents import Correspondents
from gateway.digest import Digests
from gateway.errors import ConfigError
from gateway.message import Direction
from gateway.notice import Notifier, release_token
from gateway.pipeline import Pipeline, close_checks, emitted_symbols, install
from gateway.quarantine_service import QuarantineService
from gateway.relay import create_next_hop, create_smarthost
from gateway.runtime import Runtime
from gateway.smtp import (
    ConnectionCounter,
    Handler,
    smtp_factory,
    submission_factory,
    submission_throttle,
    tls_context,
)
from gateway.symbols import (
    SymbolTable,
    check_consistency,
    check_failure_contract,
    extended,
    load_table,
)
from gateway.workers import Workers
from quarantine.crypto import load_or_create_key
from quarantine.files import write_private
from quarantine.store import Store

if TYPE_CHECKING:
    from aiohttp.web import AppRunner

log = logging.getLogger(__name__)

STOP_GRACE_S = 30.0


def symbol_table_path(cfg: Config) -> Path:
    return cfg.rules_dir / "symbols.toml"


def quarantine_root(cfg: Config) -> Path:
    return cfg.data_dir / "quarantine"


def create_resolver(cfg: Config) -> Resolver:
    return Resolver(nameservers(cfg), timeout_s=cfg.dns.timeout_s)


def load_rules(cfg: Config, workers: Workers, *, book: Correspondents | None = None
               ) -> tuple[SymbolTable, list[Check]]:
    """The symbol table and the checks, refusing any symbol missing on either side."""
    table = load_table(symbol_table_path(cfg))
    checks = create_checks(Services(cfg=cfg, workers=workers, resolver=create_resolver(cfg),
                                    correspondents=book))
    for check in checks:  # symbols a rule file declares itself (third-party YARA sets)
        declared = getattr(check, "rule_symbols", None)
        if declared is not None:
            table = extended(table, declared(), path=symbol_table_path(cfg))
    check_consistency(table, emitted_symbols(checks), path=symbol_table_path(cfg))
    check_failure_contract(table, [c.name for c in checks], path=symbol_table_path(cfg))
    return table, checks


PID_FILE = "gateway.pid"  # in the data folder: the process `gateway reload` signals
RELOAD_DIR = "reload"  # <pid>.json: each serving process's last reload, for `gateway reload`


def _reload_status(cfg: Config, error: str | None) -> None:
    """What this process made of the reload, for `gateway reload` (which then says it did
    not answer, if this cannot be written: the reload itself stands)."""
    status = {"pid": os.getpid(), "at": time.time(), "error": error}
    try:
        write_private(cfg.data_dir / RELOAD_DIR / f"{os.getpid()}.json",
                      json.dumps(status).encode())
    except OSError as exc:
        log.error("reload status not written: %s", exc)


def _tls_pair(cfg: Config, folder: Path) -> tuple[str, str] | None:
    """The certificate and key, read once into private files of `folder` and checked to
    load together: the pair to give the context in use."""
    if not cfg.smtp.tls_cert:
        return None
    cert, key = folder / "cert.pem", folder / "key.pem"
    write_private(cert, Path(cfg.smtp.tls_cert).read_bytes())
    write_private(key, Path(cfg.smtp.tls_key).read_bytes())
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    return str(cert), str(key)


def check_rules(cfg: Config) -> None:
    """Load the rules as a serving process would, with workers of their own (whose
    processes start only with a first job: none here); ConfigError (or the rule file's own
    error) when something is wrong."""
    workers = Workers()
    try:
        load_rules(cfg, workers)
    finally:
        workers.close()


def prepare(cfg: Config) -> None:
    """Blocking start-up checks, before any port opens: rules, data folder, key, index."""
    os.umask(0o077)
    check_rules(cfg)
    load_templates(cfg.banner_templates)
    cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    Store.open_sync(quarantine_root(cfg), cfg.key_file).close_sync()
    AuthState.open(cfg.auth_state_file).close()


async def build_runtime(cfg: Config, *, with_store: bool = True) -> Runtime:
    workers = Workers(processes=cfg.job_process_count, memory_mb=cfg.gateway.job_memory_mb)
    # The serving process's book of correspondents: the history check asks it, the
    # pipeline teaches it (`scan` has none: the check then reads the database, if any).
    book = Correspondents(cfg.correspondents_file, create=True) if with_store else None
    table, checks = load_rules(cfg, workers, book=book)
    store = None
    if with_store:
        cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        store = await Store.open(quarantine_root(cfg), cfg.key_file)
        auth = await asyncio.to_thread(AuthState.open, cfg.auth_state_file)
    else:  # `scan`: nothing is written, nobody logs in
        auth = await asyncio.to_thread(AuthState.open, None)
    # The banner marker comes from the installation's secret; `scan` without a data folder
    # has none and uses a fixed one.
    secret = (await asyncio.to_thread(load_or_create_key, cfg.key_file)
              if with_store or cfg.key_file.exists() else b"scan")
    next_hop = create_next_hop(cfg)
    public = cfg.web.public_url.rstrip("/")
    notifier = Notifier(  # notices go to the sender's mailbox: the inbound side
        cfg, next_hop, (lambda item_id, sender: f"{public}/liberation/{item_id}/"
                        f"{release_token(secret, item_id, sender)}") if public else None)
    pipeline = Pipeline(cfg=cfg, checks=checks, table=table, workers=workers, store=store,
                        templates=load_templates(cfg.banner_templates), mark=marker(secret),
                        notifier=notifier, correspondents=book)
    smarthost = create_smarthost(cfg)
    quarantine = None if store is None else QuarantineService(
        store=store, table=table, next_hop=next_hop, smarthost=smarthost,
        authserv_id=cfg.authserv_id, render_released=pipeline.released,
        flush_stats=pipeline.flush_stats, retention_days=cfg.quarantine.retention_days,
        learner=rspamd_engine(cfg.engines.rspamd)
        if cfg.engines.rspamd.enabled and cfg.engines.rspamd.learn else None)
    digests = None if quarantine is None else Digests(cfg, quarantine, next_hop, secret)
    return Runtime(cfg=cfg, table=table, workers=workers, pipeline=pipeline,
                   next_hop=next_hop, smarthost=smarthost, notifier=notifier,
                   store=store, quarantine=quarantine, auth=auth, secret=secret,
                   digests=digests)


@dataclass(slots=True, kw_only=True)
class Running:
    runtime: Runtime
    server: asyncio.Server
    submission: asyncio.Server | None
    submission_tls: asyncio.Server | None
    web: AppRunner | None
    monitoring: AppRunner | None
    counter: ConnectionCounter
    tls: ssl.SSLContext | None
    tasks: list[asyncio.Task[None]]

    @property
    def port(self) -> int:
        return int(self.server.sockets[0].getsockname()[1])

    @property
    def submission_port(self) -> int:
        assert self.submission is not None
        return int(self.submission.sockets[0].getsockname()[1])

    @property
    def submission_tls_port(self) -> int:
        assert self.submission_tls is not None
        return int(self.submission_tls.sockets[0].getsockname()[1])

    @property
    def metrics_port(self) -> int:
        from gateway.monitoring import listening_port
        assert self.monitoring is not None
        return listening_port(self.monitoring)

    @property
    def web_port(self) -> int:
        from gateway.web.app import web_port
        assert self.web is not None
        return web_port(self.web)

    async def reload(self) -> str | None:
        """SIGHUP: take again what is read at start and can change without a restart: the
        rule files under rules/ (symbol table, sender registry, lures, lists, attachment
        policy), the YARA folders, the banner templates, the TLS certificate. Everything is
        loaded and checked first (as `check-config` does); on any error, nothing in use
        changes, and the error is logged and returned (and written for `gateway reload`).
        (The sender allow and block lists need no signal: each process reads them again when
        their file changes.)"""
        rt, cfg = self.runtime, self.runtime.cfg
        error: str | None = None
        try:
            with tempfile.TemporaryDirectory(prefix="gateway-tls-") as tmp:
                try:
                    # Built with the live workers but installed in them only once accepted.
                    table, checks = await asyncio.to_thread(
                        load_rules, cfg, rt.workers, book=rt.pipeline.correspondents)
                    broken = [line for new in checks
                              for line in getattr(new, "broken_since", lambda _: [])(
                                  rt.pipeline.check(new.name))]
                    if broken:
                        raise ConfigError("rule files that compiled before no longer do: "
                                          + "; ".join(broken))
                    templates = await asyncio.to_thread(load_templates, cfg.banner_templates)
                    pair = await asyncio.to_thread(_tls_pair, cfg, Path(tmp))
                except Exception as exc:  # noqa: BLE001 - whatever is wrong, the gateway goes on
                    error = str(exc) or type(exc).__name__
                    log.error("reload refused; the rules in use stay", extra={"fields": {
                        "error": error[:2000]}})
                    return error
                await asyncio.to_thread(install, checks)
                replaced = rt.pipeline.checks
                rt.pipeline.use(table, checks, templates)
                # Their connections (an engine's) closed once no message can still use them.
                self.tasks[:] = [t for t in self.tasks if not t.done()]
                self.tasks.append(asyncio.create_task(close_checks(
                    replaced, after_s=cfg.scoring.message_budget_s + 5)))
                rt.table = table
                if rt.quarantine is not None:
                    rt.quarantine.table = table
                if self.tls is not None and pair is not None:
                    # The very bytes checked above: a certificate renewed between the check
                    # and here (certbot writes the certificate, then the key) cannot pair
                    # the new certificate with the old key in the context in use.
                    self.tls.load_cert_chain(*pair)
            log.info("reloaded", extra={"fields": {"symbols": len(table.symbols),
                                                   "checks": len(checks)}})
            return None
        finally:
            await asyncio.to_thread(_reload_status, cfg, error)

    async def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        for server in (self.server, self.submission, self.submission_tls):
            if server is not None:
                server.close()
        for task in self.tasks:
            task.cancel()
        for runner in (self.web, self.monitoring):
            if runner is not None:
                await runner.cleanup()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.counter.idle.wait(), grace_s)
        await self.runtime.close()


@dataclass(frozen=True, slots=True)
class Sockets:
    """Listening sockets bound by the parent before forking (or None: bind in-process)."""
    smtp: socket.socket | None = None
    submission: socket.socket | None = None
    submission_tls: socket.socket | None = None
    web: socket.socket | None = None
    metrics: socket.socket | None = None


async def _listen(factory: Any, address: HostPort | None, sock: socket.socket | None,
                  tls: ssl.SSLContext | None = None) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    if sock is not None:
        return await loop.create_server(factory, sock=sock, backlog=1024, ssl=tls)
    assert address is not None
    return await loop.create_server(factory, address.host, address.port, backlog=1024,
                                    reuse_address=True, ssl=tls)


async def start(cfg: Config, *, sockets: Sockets = Sockets(), primary: bool = True) -> Running:
    """Serve SMTP (and submission when configured) in the running loop (in-process; the
    tests use this with port 0). The primary serving process also serves the web page and
    runs the retention purge and the quarantine digests."""
    runtime = await build_runtime(cfg)
    counter = ConnectionCounter(cfg.smtp.max_connections)
    handler = Handler(cfg=cfg, pipeline=runtime.pipeline, next_hop=runtime.next_hop,
                      processes=cfg.worker_count)
    tls = tls_context(cfg)  # one, shared by the ports: a reload renews the certificate there
    server = await _listen(smtp_factory(cfg, handler, counter, tls), cfg.listen, sockets.smtp)
    log.info("SMTP listening", extra={"fields": {
        "listen": [str(s.getsockname()) for s in server.sockets],
        "next_hop": runtime.next_hop.name, "domains": sorted(cfg.domains), "pid": os.getpid()}})
    submission = submission_tls = None
    outbound = Handler(cfg=cfg, pipeline=runtime.pipeline, next_hop=runtime.smarthost,
                       direction=Direction.OUTBOUND, processes=cfg.worker_count,
                       accounts=AccountFile(cfg.submission_users_file))
    throttle = submission_throttle(cfg, runtime.auth)  # one count for both ports
    if cfg.submission_listen is not None:
        submission = await _listen(
            submission_factory(cfg, outbound, counter, throttle=throttle, tls=tls),
            cfg.submission_listen, sockets.submission)
    if cfg.submission_listen_tls is not None:
        submission_tls = await _listen(
            submission_factory(cfg, outbound, counter, throttle=throttle, implicit_tls=True,
                               tls=tls),
            cfg.submission_listen_tls, sockets.submission_tls, tls)
    for srv in (submission, submission_tls):
        if srv is not None:
            log.info("submission listening", extra={"fields": {
                "listen": [str(s.getsockname()) for s in srv.sockets],
                "implicit_tls": srv is submission_tls, "smarthost": runtime.smarthost.name}})
    runner = monitoring = None
    tasks = [asyncio.create_task(_every(STATS_FLUSH_S, runtime.pipeline.flush_stats)),
             asyncio.create_task(_every(TRACK_FLUSH_S, runtime.pipeline.flush_tracking)),
             asyncio.create_task(_every(correspondents.FLUSH_S,
                                        runtime.pipeline.flush_correspondents)),
             asyncio.create_task(runtime.workers.warm())]
    if primary:
        if cfg.web_listen is not None:
            # Imported here, in the one process that serves the page: the other serving
            # processes never load aiohttp, jinja2 and the sanitiser.
            from gateway.web.app import start_web
            assert runtime.quarantine is not None
            runner = await start_web(cfg, runtime.quarantine, runtime.auth, runtime.workers,
                                     runtime.secret, sock=sockets.web)
        if cfg.metrics_listen is not None:
            from gateway.monitoring import start_monitoring
            listen = cfg.metrics_listen
            monitoring = await start_monitoring(runtime, sockets.metrics,
                                                (listen.host, listen.port))
        tasks.append(asyncio.create_task(_every(PURGE_EVERY_S, lambda: purge_expired(runtime))))
        if runtime.digests is not None:
            tasks.append(asyncio.create_task(_every(digest.TICK_S, runtime.digests.tick)))
    return Running(runtime=runtime, server=server, submission=submission,
                   submission_tls=submission_tls, web=runner, monitoring=monitoring,
                   counter=counter, tls=tls, tasks=tasks)


STATS_FLUSH_S = 30.0
TRACK_FLUSH_S = 2.0  # a tracking record is searchable within seconds of the reply
PURGE_EVERY_S = 3600.0


async def _every(period_s: float, job: Callable[[], Awaitable[object]]) -> None:
    while True:
        try:
            await job()
        except Exception:  # noqa: BLE001 - a periodic job must go on
            log.exception("periodic job failed")
        await asyncio.sleep(period_s)


async def purge_expired(runtime: Runtime) -> int:
    """Remove quarantine items older than the retention period (audited by the service)."""
    if runtime.quarantine is None:
        return 0
    n = await runtime.quarantine.purge()
    if n:
        log.info("retention purge", extra={"fields": {
            "removed": n, "days": runtime.quarantine.retention_days}})
    return n


@contextlib.asynccontextmanager
async def running(cfg: Config) -> AsyncIterator[Running]:
    gw = await start(cfg)
    try:
        yield gw
    finally:
        await gw.stop(grace_s=5)


# ---- the serving processes -----------------------------------------------------------------


def _bind(listen: HostPort, key: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    try:
        sock = socket.create_server((listen.host, listen.port), family=family, backlog=1024,
                                    reuse_port=False)
    except OSError as exc:  # port taken, address not on this machine, privileged port
        raise ConfigError(f"{key}: cannot listen on {listen}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def bind(cfg: Config) -> Sockets:
    """Every listening socket, before any serving process starts; a port that cannot be
    opened is a ConfigError naming its key (and nothing is left open)."""
    wanted = [("smtp", "smtp.listen", cfg.listen),
              ("submission", "submission.listen", cfg.submission_listen),
              ("submission_tls", "submission.listen_tls", cfg.submission_listen_tls),
              ("web", "web.listen", cfg.web_listen),
              ("metrics", "metrics.listen", cfg.metrics_listen)]
    opened: dict[str, socket.socket] = {}
    try:
        for name, key, address in wanted:
            if address is not None:
                opened[name] = _bind(address, key)
    except ConfigError:
        for sock in opened.values():
            sock.close()
        raise
    return Sockets(**opened)


def notify(state: str) -> None:
    """systemd's service protocol (sd_notify(3)): `READY=1`, `STOPPING=1`... as one datagram
    to $NOTIFY_SOCKET (Type=notify, docker/gateway.service); nothing when it is not set."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path.startswith(("/", "@")):
        return
    address = "\0" + path[1:] if path.startswith("@") else path  # abstract namespace
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(address)
        s.sendall(state.encode())


async def _serve_forever(cfg: Config, sockets: Sockets, primary: bool = True,
                         main: bool = False) -> None:
    """One serving process until SIGTERM/SIGINT; `main`: it is the gateway's only process,
    which tells systemd when it is ready and when it stops."""
    gw = await start(cfg, sockets=sockets, primary=primary)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if main:
        notify("READY=1")
    reloads: set[asyncio.Task[str | None]] = set()

    def on_hup() -> None:  # reload the rules without dropping connections
        task = loop.create_task(gw.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    await stop.wait()
    if main:
        notify("STOPPING=1")
    log.info("stopping: no new connections, waiting for sessions in progress")
    await gw.stop()


def _child(cfg: Config, sockets: Sockets, primary: bool) -> None:
    # Not the parent's handlers: a SIGTERM before this process's event loop takes it over
    # must end it (the parent's would only signal the other children and let this one run
    # on); a SIGHUP then has no rules to reload yet.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        asyncio.run(_serve_forever(cfg, sockets, primary))
    except Exception:  # noqa: BLE001
        log.exception("serving process failed")
        os._exit(1)
    os._exit(0)


def _limit_malloc_arenas(n: int = 2) -> None:
    """glibc gives each new thread its own malloc arena (up to 8 per core); with the worker
    threads, the executor threads of asyncio.to_thread and the event loop's, memory freed in
    one arena is not reused by the others. Two arenas per process keep the peak down
    (bench/RESULTS.md); MALLOC_ARENA_MAX in the environment, if set, wins."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-8, n)  # M_ARENA_MAX


def serve(cfg: Config) -> int:
    """Run the gateway until SIGTERM/SIGINT. Returns the exit status."""
    # A SIGHUP before the serving processes can reload (`gateway reload`, a container's
    # kill -s HUP) is dropped, not the default: the end of the process.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _limit_malloc_arenas()
    logs.setup(cfg.logging.level)
    prepare(cfg)
    with running_alone(cfg):
        sockets = bind(cfg)
        # Before any serving process starts, and before prometheus_client is imported.
        folder = metrics_folder()
        metrics.share_between_processes(folder)
        shutil.rmtree(cfg.data_dir / RELOAD_DIR, ignore_errors=True)
        try:
            return _serve(cfg, sockets, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def running_alone(cfg: Config) -> Iterator[None]:
    """The pid file, locked (flock) for the gateway's life: a second `gateway serve` on the
    same data folder is refused before it changes anything, and `gateway reload` knows the
    number in it is the live gateway's (the lock is held) and not a stale one."""
    path = cfg.data_dir / PID_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"une passerelle tourne déjà avec ce dossier de données "
                              f"({cfg.data_dir}) : une seule à la fois") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # the lock goes with it; the file stays, unlocked: not a live gateway


def gateway_pid(cfg: Config) -> int | None:
    """The live gateway's pid, or None (no pid file, or its lock not held: stale)."""
    try:
        fd = os.open(cfg.data_dir / PID_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: a gateway is running
            return int(os.read(fd, 64).decode().strip() or "0") or None
        return None
    except ValueError:
        return None
    finally:
        os.close(fd)


def metrics_folder() -> Path:
    """A new private folder for the serving processes' metrics, in memory (/dev/shm) rather
    than on the data folder's disk: prometheus_client maps these files, and a write to a
    mapped page of a full disk kills the process (SIGBUS) where a write() fails cleanly. A
    random name (mkdtemp, 0700): nobody can prepare it in advance."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="gateway-metrics-", dir=base))


def _serve(cfg: Config, sockets: Sockets, metrics_at: Path) -> int:
    n = cfg.worker_count
    log.info("gateway starting", extra={"fields": {
        "listen": str(cfg.listen), "submission": cfg.submission.listen or None,
        "web": cfg.web.listen or None, "workers": n, "metrics_folder": str(metrics_at)}})
    if n == 1:
        asyncio.run(_serve_forever(cfg, sockets, main=True))
        return 0
    children: dict[int, int] = {}  # pid -> slot
    stopping = False

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:
            _child(cfg, sockets, slot == 0)
        children[pid] = slot

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        if not stopping:
            notify("STOPPING=1")
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def on_hup(_signum: int, _frame: object) -> None:
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hup)
    # Everything imported and built so far (rules, libraries) is shared with the children
    # copy-on-write; the cyclic GC would write to every one of those objects in each child and
    # so copy their pages. Frozen, the GC leaves them alone (measured in bench/RESULTS.md).
    gc.freeze()
    for slot in range(n):
        spawn(slot)
    # The ports were bound before the fork: connections wait in their queues until a serving
    # process takes them, so the gateway is ready for systemd from here.
    notify("READY=1")
    last_restart = 0.0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        metrics.process_gone(pid)
        if pid not in children or stopping:
            children.pop(pid, None)
            continue
        slot = children.pop(pid)
        log.error("serving process %d exited (status %d); restarting it", pid, status)
        if time.monotonic() - last_restart < 1.0:
            time.sleep(1.0)
        last_restart = time.monotonic()
        spawn(slot)
    for sock in (sockets.smtp, sockets.submission, sockets.submission_tls, sockets.web,
                 sockets.metrics):
        if sock is not None:
            sock.close()
    return 0
