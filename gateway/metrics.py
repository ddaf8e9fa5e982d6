"""Prometheus metrics (prometheus_client), summed across the serving processes.

`gateway serve` gives prometheus_client a new folder in memory (/dev/shm, removed at exit)
before anything imports it: each serving process then writes its values to files
there (prometheus_client's multiprocess mode) and `/metrics`, on its own listener
(`[metrics] listen`), reads them all. A process that imported prometheus_client without that
folder (the tests' in-process gateways, `scan`) keeps its values in memory.

Every recording goes through `get()`, one set of metrics per process, created on first use.
What is recorded: messages by direction, outcome and action; symbols; check durations; DNS
lookups by result; the next hop's answers and their latency; SMTP sessions open; worker jobs
waiting and running. The quarantine's size is read from the store when scraped.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)

FOLDER_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own name for it

# Seconds: a check takes from a millisecond to its timeout (20 s by default).
CHECK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20)
NEXT_HOP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def share_between_processes(folder: Path) -> None:
    """In `gateway serve`'s first process, before any serving process starts and before
    prometheus_client is imported: the (new, empty) folder the processes write their values
    to (gateway.service.metrics_folder)."""
    os.environ[FOLDER_ENV] = str(folder)


def shared() -> bool:
    return bool(os.environ.get(FOLDER_ENV))


def process_gone(pid: int) -> None:
    """A serving process ended: its gauges (sessions, jobs) leave the sums; its counters
    stay (a restarted process does not lose what its predecessor counted)."""
    if shared():
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def _quiet(method: Callable[..., None]) -> Callable[..., None]:
    """The recording method, whose failure is logged (once per process) and goes no further."""
    def run(*args: Any) -> None:
        global _failed
        try:
            method(*args)
        except Exception:  # noqa: BLE001 - metrics never decide a message's fate
            if not _failed:
                _failed = True
                log.exception("metrics not recorded (said once)")
    return run


_failed = False


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        # Their own registry: a second gateway in the same process (the tests) gets its own.
        self.registry = CollectorRegistry()
        r = self.registry
        self.messages = Counter(
            "gateway_messages", "Messages answered, by direction, outcome and action",
            ["direction", "outcome", "action"], registry=r)
        self.symbols = Counter("gateway_symbols", "Symbols found in messages", ["symbol"],
                               registry=r)
        self.check_seconds = Histogram("gateway_check_seconds", "Duration of each check",
                                       ["check"], buckets=CHECK_BUCKETS, registry=r)
        self.dns = Counter("gateway_dns_lookups", "DNS lookups, by result (answer, nxdomain, "
                           "timeout, servfail, error)", ["result"], registry=r)
        self.next_hop = Counter("gateway_next_hop_replies",
                                "Answers of the next hop to a message (code, or unreachable)",
                                ["reply"], registry=r)
        self.next_hop_seconds = Histogram("gateway_next_hop_seconds",
                                          "Time the next hop took to take a message",
                                          buckets=NEXT_HOP_BUCKETS, registry=r)
        self.sessions = Gauge("gateway_smtp_sessions", "SMTP connections open",
                              multiprocess_mode="livesum", registry=r)
        self.jobs = Gauge("gateway_worker_jobs", "Jobs of the worker processes, waiting for "
                          "one or running", ["state"], multiprocess_mode="livesum", registry=r)
        self._children: dict[tuple[int, str], Any] = {}
        for state in ("waiting", "running"):  # shown at 0 before any job
            self.jobs.labels(state)

    # ---- recording ------------------------------------------------------------------------
    # Never raises: a metric that cannot be written (its file, its folder) must not change
    # what happens to a message (`_quiet`).

    @_quiet
    def message(self, direction: str, outcome: str, action: str, symbols: list[str],
                durations: dict[str, float]) -> None:
        self.messages.labels(direction, outcome, action).inc()
        for name in symbols:
            self._child(self.symbols, name).inc()
        for check, seconds in durations.items():
            self._child(self.check_seconds, check).observe(seconds)

    def _child(self, metric: Any, label: str) -> Any:
        """metric.labels(label), kept: labels() checks and builds its key at every call,
        which is most of the cost on the hot path (bench/RESULTS.md)."""
        key = (id(metric), label)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(label)
        return child

    @_quiet
    def next_hop_answered(self, reply: str, seconds: float) -> None:
        self._child(self.next_hop, reply).inc()
        self.next_hop_seconds.observe(seconds)

    @_quiet
    def dns_lookup(self, result: str) -> None:
        self._child(self.dns, result).inc()

    @_quiet
    def session(self, change: int) -> None:
        self.sessions.inc(change)

    @contextlib.contextmanager
    def job(self) -> Iterator[Callable[[], None]]:
        """Around a worker job: waiting until the returned function is called, then running."""
        waiting, running = self._child(self.jobs, "waiting"), self._child(self.jobs, "running")
        moved = _quiet(lambda self, gauge, by: gauge.inc(by))
        moved(self, waiting, 1)
        state = {"running": False}

        def started() -> None:
            if not state["running"]:
                state["running"] = True
                moved(self, waiting, -1)
                moved(self, running, 1)
        try:
            yield started
        finally:
            moved(self, running if state["running"] else waiting, -1)

    # ---- exposition -----------------------------------------------------------------------

    def exposition(self, families: Sequence[Any] = ()) -> bytes:
        """The text format of every process's values (or this one's), then `families`
        (metric families read at this moment: the quarantine's size)."""
        from prometheus_client import CollectorRegistry, generate_latest, multiprocess
        registry: CollectorRegistry = self.registry
        if shared():
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        text = generate_latest(registry)
        if families:
            scrape = CollectorRegistry()
            scrape.register(_Families(families))
            text += generate_latest(scrape)
        return text


class _Families:
    def __init__(self, families: Sequence[Any]) -> None:
        self._families = families

    def collect(self) -> Sequence[Any]:
        return self._families


_current: Metrics | None = None


def get() -> Metrics:
    global _current
    if _current is None:
        _current = Metrics()
    return _current
