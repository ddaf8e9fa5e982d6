"""Who the practice has exchanged mail with: the external addresses it wrote to, and those
whose authenticated mail it accepted. "First contact" is a weight for the fraud checks (a
change of bank details from someone the practice never wrote with), never a verdict alone.

Privacy: no address is stored. Each address, and each sender's organisational domain, is kept
as an HMAC-SHA256 under a random key of the database itself (created with it), with its first
and last dates and counts each way; a row not seen for RETENTION_DAYS is removed.

An SQLite database, `<data_dir>/correspondents.sqlite3` (mode 0600, WAL, one connection per
object; every call runs in a thread), shared by the serving processes. A reader that finds no
database (`gateway scan`, a new installation) knows nobody and creates nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from gateway.auth.dmarc import org_domain

LEARNING = 50  # correspondents to know before "never seen" means anything
RETENTION_DAYS = 400
_COUNT_EVERY_S = 60.0
# Within one process, an answer is reused this long, and an address noted once this often:
# most mail comes from and goes to the same correspondents.
_SEEN_FOR_S = 60.0
_NOTE_EVERY_S = 3600.0
_MEMO_ENTRIES = 10_000

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
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._key: bytes | None = None
        self._count = (0, -1e18)  # (addresses known, when counted)
        self._answers: dict[str, tuple[float, Seen]] = {}  # address -> (until, answer)
        self._noted: dict[tuple[str, bool], float] = {}  # (address, sent) -> when noted

    def _connect(self) -> sqlite3.Connection | None:
        if self._db is not None:
            return self._db
        if not self._create and not self._path.exists():
            return None
        if self._create:
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
        if self._key is None:
            row = db.execute("SELECT value FROM meta WHERE name = 'key'").fetchone()
            if row is None and create:
                db.execute("INSERT OR IGNORE INTO meta VALUES ('key', ?)",
                           (secrets.token_bytes(32),))
                row = db.execute("SELECT value FROM meta WHERE name = 'key'").fetchone()
            self._key = bytes(row[0]) if row is not None else None
        return self._key

    def seen_sync(self, address: str) -> Seen:
        address = address.strip().lower()
        with self._lock:
            now = self._clock()
            memo = self._answers.get(address)
            if memo is not None and memo[0] > now:
                return memo[1]
            seen = self._seen_locked(address)
            if len(self._answers) >= _MEMO_ENTRIES:
                self._answers.clear()
            self._answers[address] = (now + _SEEN_FOR_S, seen)
            return seen

    def _seen_locked(self, address: str) -> Seen:
        db = self._connect()
        key = self._hmac_key(db, create=False) if db is not None else None
        if db is None or key is None or "@" not in address:
            return Seen(address=False, domain=False, learning=True)
        now = self._clock()
        count, when = self._count
        if now - when > _COUNT_EVERY_S:
            count = int(db.execute("SELECT COUNT(*) FROM seen WHERE kind = 'a'")
                        .fetchone()[0])
            self._count = (count, now)
        domain = org_domain(address.rpartition("@")[2].rstrip("."))
        rows = {bytes(r[0]) for r in db.execute(
            "SELECT key FROM seen WHERE key IN (?, ?)",
            (_digest(key, "a", address), _digest(key, "d", domain)))}
        return Seen(address=_digest(key, "a", address) in rows,
                    domain=_digest(key, "d", domain) in rows, learning=count < LEARNING)

    def record_sync(self, addresses: Iterable[str], *, sent: bool) -> None:
        """Note these addresses (and their organisational domains) as written to (`sent`) or
        heard from."""
        with self._lock:
            now = self._clock()
            wanted = {a.strip().lower() for a in addresses if "@" in a}
            wanted = {a for a in wanted if now - self._noted.get((a, sent), -1e18) > _NOTE_EVERY_S}
            if not wanted:
                return
            db = self._connect()
            if db is None:
                return
            db.execute("BEGIN IMMEDIATE")  # one writer at a time, across processes
            try:
                key = self._hmac_key(db, create=True)
                assert key is not None
                column = "sent" if sent else "received"
                for address in wanted:
                    domain = org_domain(address.rpartition("@")[2].rstrip("."))
                    for kind, value in (("a", address), ("d", domain)):
                        db.execute(
                            f"INSERT INTO seen (key, kind, first, last, {column}) "  # noqa: S608
                            f"VALUES (?, ?, ?, ?, 1) ON CONFLICT(key) DO UPDATE SET "
                            f"last = excluded.last, {column} = {column} + 1",
                            (_digest(key, kind, value), kind, now, now))
                db.execute("DELETE FROM seen WHERE last < ?",
                           (now - RETENTION_DAYS * 86400,))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            if len(self._noted) >= _MEMO_ENTRIES:
                self._noted.clear()
            for address in wanted:
                self._noted[(address, sent)] = now
                self._answers.pop(address, None)

    async def seen(self, address: str) -> Seen:
        return await asyncio.to_thread(self.seen_sync, address)

    async def record(self, addresses: Iterable[str], *, sent: bool) -> None:
        await asyncio.to_thread(self.record_sync, list(addresses), sent=sent)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


def _digest(key: bytes, kind: str, value: str) -> bytes:
    return hmac.new(key, f"{kind}:{value}".encode(), hashlib.sha256).digest()[:16]
