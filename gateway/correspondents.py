"""Who the practice has exchanged mail with: the external addresses it wrote to, and those
whose authenticated mail it accepted. "First contact" is a weight for the fraud checks (a
change of bank details from someone the practice never wrote with), never a verdict alone.

Privacy: no address is stored. Each address, and each sender's organisational domain, is kept
as an HMAC-SHA256 under a random key of the database itself (created with it), with its first
and last dates and counts each way; a row not seen for RETENTION_DAYS is removed.

An SQLite database, `<data_dir>/correspondents.sqlite3` (mode 0600, WAL), shared by the
serving processes. Each process keeps the digests in memory (a set, refreshed from the
database every REFRESH_S seconds, in a thread) so that a message's question costs no I/O, and
writes what it learns in batches (every FLUSH_S seconds or FLUSH_BATCH addresses, and at
close): a crash loses a few seconds of history, never mail. A reader that finds no database
(`gateway scan`, a new installation) knows nobody and creates nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from gateway.auth.dmarc import org_domain

log = logging.getLogger(__name__)
LEARNING = 50  # correspondents to know before "never seen" means anything
RETENTION_DAYS = 400
REFRESH_S = 30.0
FLUSH_S = 10.0
FLUSH_BATCH = 100

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS seen (
    key BLOB PRIMARY KEY,
    kind TEXT NOT NULL,          -- 'a' an address, 'd' an organisational domain
    first REAL NOT NULL,
    last REAL NOT NULL,
    sent INTEGER NOT NULL DEFAULT 0,
    received INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS seen_last ON seen(last);
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class Seen:
    address: bool  # this very address
    domain: bool  # someone at its organisational domain
    learning: bool  # too few correspondents known yet for "never seen" to mean anything


class Correspondents:
    def __init__(self, path: Path, *, create: bool, clock: Callable[[], float] = time.time
                 ) -> None:
        self._path = path
        self._create = create
        self._clock = clock
        self._lock = threading.Lock()  # the connection and the key, across threads
        self._db: sqlite3.Connection | None = None
        self._key: bytes | None = None
        self._known: set[bytes] = set()  # digests of addresses and domains
        self._addresses = 0  # addresses among them (for LEARNING)
        self._refreshed = -1e18  # when the set was last read from the database
        self._rowid = 0  # rows after this one are read at the next refresh (new keys only)
        self._broken = False  # the database could not be read: said once
        self._pending: list[tuple[str, bool, float]] = []  # (address, sent, when) to write
        self._flushed = clock()
        self._writing: asyncio.Task[None] | None = None

    # ---- questions ------------------------------------------------------------------

    async def seen(self, address: str) -> Seen:
        if self._clock() - self._refreshed > REFRESH_S:
            await asyncio.to_thread(self.refresh_sync)
        return self._answer(address)

    def seen_sync(self, address: str) -> Seen:
        if self._clock() - self._refreshed > REFRESH_S:
            self.refresh_sync()
        return self._answer(address)

    def _answer(self, address: str) -> Seen:
        address = address.strip().lower()
        key = self._key
        if key is None or "@" not in address:
            return Seen(address=False, domain=False, learning=True)
        domain = org_domain(address.rpartition("@")[2].rstrip("."))
        return Seen(address=_digest(key, "a", address) in self._known,
                    domain=_digest(key, "d", domain) in self._known,
                    learning=self._addresses < LEARNING)

    def refresh_sync(self) -> None:
        """Read the keys the database learnt since the last refresh (every process writes):
        new rows only, by their row number, so no clock is compared across processes."""
        with self._lock:
            self._refreshed = self._clock()  # a broken database is retried every REFRESH_S
            try:
                db = self._connect()
                if db is None or self._hmac_key(db, create=False) is None:
                    return
                rows = db.execute("SELECT rowid, key, kind FROM seen WHERE rowid > ? "
                                  "ORDER BY rowid", (self._rowid,)).fetchall()
            except sqlite3.Error as exc:
                if not self._broken:
                    self._broken = True
                    log.error("correspondents database %s unreadable: %s (first contacts "
                              "are not told until it is fixed)", self._path, exc)
                return
            self._broken = False
            for rowid, key, kind in rows:
                self._rowid = max(self._rowid, rowid)
                digest = bytes(key)
                if digest not in self._known:
                    self._known.add(digest)
                    self._addresses += kind == "a"

    # ---- learning -------------------------------------------------------------------

    def note(self, addresses: Iterable[str], *, sent: bool) -> None:
        """Note these addresses (written to when `sent`, else heard from): known to this
        process at once (once the database has its key), written with the next batch."""
        now = self._clock()
        for address in addresses:
            address = address.strip().lower()
            if "@" in address:
                self._pending.append((address, sent, now))
                if self._key is not None:
                    self._learn(self._key, address)

    def _learn(self, key: bytes, address: str) -> None:
        digest = _digest(key, "a", address)
        if digest not in self._known:
            self._known.add(digest)
            self._addresses += 1
        domain = org_domain(address.rpartition("@")[2].rstrip("."))
        self._known.add(_digest(key, "d", domain))

    def due(self) -> bool:
        """A batch to write: enough addresses waiting, or waiting long enough."""
        return bool(self._pending) and (len(self._pending) >= FLUSH_BATCH
                                        or self._clock() - self._flushed > FLUSH_S)

    async def flush(self) -> None:
        """Write the waiting addresses, in a thread (one batch at a time)."""
        if self._writing is not None and not self._writing.done():
            await asyncio.shield(self._writing)
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        self._flushed = self._clock()
        self._writing = asyncio.ensure_future(asyncio.to_thread(self.write_sync, batch))
        await asyncio.shield(self._writing)

    def record_sync(self, addresses: Iterable[str], *, sent: bool) -> None:
        """note() and write at once (tests, the CLI)."""
        now = self._clock()
        self.write_sync([(a.strip().lower(), sent, now) for a in addresses if "@" in a])

    def write_sync(self, batch: list[tuple[str, bool, float]]) -> None:
        if not batch:
            return
        with self._lock:
            db = self._connect()
            if db is None:
                return
            db.execute("BEGIN IMMEDIATE")  # one writer at a time, across processes
            try:
                key = self._hmac_key(db, create=True)
                assert key is not None
                learnt: list[str] = []
                for address, sent, when in batch:
                    column = "sent" if sent else "received"
                    domain = org_domain(address.rpartition("@")[2].rstrip("."))
                    for kind, value in (("a", address), ("d", domain)):
                        db.execute(
                            f"INSERT INTO seen (key, kind, first, last, {column}) "  # noqa: S608
                            f"VALUES (?, ?, ?, ?, 1) ON CONFLICT(key) DO UPDATE SET "
                            f"last = max(last, excluded.last), {column} = {column} + 1",
                            (_digest(key, kind, value), kind, when, when))
                    learnt.append(address)
                db.execute("DELETE FROM seen WHERE last < ?",
                           (self._clock() - RETENTION_DAYS * 86400,))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            self._key = key
            for address in learnt:
                self._learn(key, address)

    # ---- the database ---------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection | None:
        if self._db is not None:
            return self._db
        if not self._create:  # a reader: never creates nor changes anything
            if not self._path.exists():
                return None
            self._db = sqlite3.connect(f"file:{self._path}?mode=ro", uri=True,
                                       check_same_thread=False, timeout=30,
                                       isolation_level=None)
            return self._db
        self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileExistsError):  # 0600 before SQLite writes anything
            os.close(os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        db = sqlite3.connect(self._path, check_same_thread=False, timeout=30,
                             isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        self._db = db
        return db

    def _hmac_key(self, db: sqlite3.Connection, *, create: bool) -> bytes | None:
        """The database's key; created (inside the caller's transaction) when asked. Kept
        by this object only once it is committed (`_keep_key`): a rolled-back key is
        nobody's."""
        if self._key is not None:
            return self._key
        row = db.execute("SELECT value FROM meta WHERE name = 'key'").fetchone()
        if row is None and create:
            db.execute("INSERT OR IGNORE INTO meta VALUES ('key', ?)",
                       (secrets.token_bytes(32),))
            row = db.execute("SELECT value FROM meta WHERE name = 'key'").fetchone()
            return bytes(row[0])
        if row is not None:
            self._key = bytes(row[0])
        return self._key

    def close(self) -> None:
        """Blocking (in a thread, or at the end): what is not flushed is not written."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


def _digest(key: bytes, kind: str, value: str) -> bytes:
    # Addresses may carry the raw bytes of a header the parser could not decode (escaped).
    data = f"{kind}:{value}".encode("utf-8", "surrogateescape")
    return hmac.new(key, data, hashlib.sha256).digest()[:16]
