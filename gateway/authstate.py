"""What logins leave behind, shared by every serving process and kept across restarts: failed
login counters (web page and submission port), web sessions and the TOTP steps already used.

An SQLite database, `<data_dir>/auth-state.sqlite3` (mode 0600, WAL, one connection per
process; every call runs in a thread). Each serving process counts into the same rows, so a
guesser gains nothing from landing on another process, nor from a restart.

Throttling slows a guesser without locking the real user out:

* per account and client address (the pair): `free_tries` failures within the window, then
  each further try waits twice as long as the one before (4 s, 8 s, 16 s... up to a minute);
  a successful login resets only its own pair;
* per client address: `address_limit` failures within the window (any accounts) lock that
  address for `lock_s`. Nothing locks an account as such: an attacker elsewhere cannot lock
  the practice's admin out, and the address of the practice itself is counted apart from his.

Web sessions are stored by the SHA-256 of their id (the database never holds a cookie that
works) with a stamp of the account's credentials at login: any change of password, second
factor or role, from the page, the CLI or an edited file, ends them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from gateway.netaddr import client_key

T = TypeVar("T")
FIRST_DELAY_S = 4.0  # the first wait past the free tries: longer than a slow machine's stall
MAX_DELAY_S = 60.0
SEEN_EVERY_S = 30.0  # a session's last use is written at most this often

_SCHEMA = """
CREATE TABLE IF NOT EXISTS login_failures (key TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS login_failures_key ON login_failures(key, at);
CREATE INDEX IF NOT EXISTS login_failures_at ON login_failures(at);
CREATE TABLE IF NOT EXISTS login_locks (key TEXT PRIMARY KEY, until REAL NOT NULL);
CREATE TABLE IF NOT EXISTS web_sessions (
    id TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    role TEXT NOT NULL,
    csrf TEXT NOT NULL,
    stamp TEXT NOT NULL,
    created REAL NOT NULL,
    seen REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS web_sessions_user ON web_sessions(user);
CREATE TABLE IF NOT EXISTS totp_steps (
    user TEXT NOT NULL,
    secret TEXT NOT NULL,
    step INTEGER NOT NULL,
    PRIMARY KEY (user, secret)
);
"""


@dataclass(slots=True, kw_only=True)
class Session:
    sid: str  # the cookie's value: only the holder knows it
    user: str
    role: str
    csrf: str
    stamp: str
    created: float
    seen: float

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class AuthState:
    def __init__(self, db: sqlite3.Connection, *, clock: Callable[[], float]) -> None:
        self._db: sqlite3.Connection | None = db
        self._lock = threading.Lock()
        self.clock = clock

    @classmethod
    def open(cls, path: Path | None, *, clock: Callable[[], float] = time.time) -> AuthState:
        """Blocking: at start-up, or in a thread. None: in memory (`gateway scan`)."""
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with contextlib.suppress(FileExistsError):  # 0600 before SQLite writes anything
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        db = sqlite3.connect(path or ":memory:", check_same_thread=False, timeout=30,
                             isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        return cls(db, clock=clock)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            if self._db is None:
                raise RuntimeError("auth state is closed")
            self._db.execute("BEGIN IMMEDIATE")  # one writer at a time, across processes
            try:
                result = fn(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return result

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.to_thread(self._run, fn)

    async def off_loop(self, fn: Callable[..., T], *args: object, **kw: object) -> T:
        """One of the blocking methods below, in a thread."""
        return await asyncio.to_thread(fn, *args, **kw)

    # ---- web sessions -------------------------------------------------------------------

    def new_session(self, user: str, role: str, stamp: str, *, max_s: float) -> Session:
        now = self.clock()
        s = Session(sid=secrets.token_urlsafe(32), user=user, role=role,
                    csrf=secrets.token_urlsafe(32), stamp=stamp, created=now, seen=now)

        def _add(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM web_sessions WHERE created < ?", (now - max_s,))
            db.execute("INSERT INTO web_sessions VALUES (?,?,?,?,?,?,?)",
                       (_digest(s.sid), user, role, s.csrf, stamp, now, now))
        self._run(_add)
        return s

    def session(self, sid: str, *, idle_s: float, max_s: float) -> Session | None:
        """The live session of this cookie value (its last use noted), or None."""
        now = self.clock()
        key = _digest(sid)

        def _get(db: sqlite3.Connection) -> Session | None:
            row = db.execute("SELECT user, role, csrf, stamp, created, seen FROM web_sessions "
                             "WHERE id = ?", (key,)).fetchone()
            if row is None:
                return None
            user, role, csrf, stamp, created, seen = row
            if now - seen > idle_s or now - created > max_s:
                db.execute("DELETE FROM web_sessions WHERE id = ?", (key,))
                return None
            if now - seen > SEEN_EVERY_S:
                db.execute("UPDATE web_sessions SET seen = ? WHERE id = ?", (now, key))
                seen = now
            return Session(sid=sid, user=user, role=role, csrf=csrf, stamp=stamp,
                           created=created, seen=seen)
        return self._run(_get)

    def drop_session(self, sid: str) -> None:
        self._run(lambda db: db.execute("DELETE FROM web_sessions WHERE id = ?",
                                        (_digest(sid),)))

    def drop_user(self, user: str) -> int:
        """End every session of an account; how many there were."""
        return int(self._run(lambda db: db.execute(
            "DELETE FROM web_sessions WHERE user = ?", (user,)).rowcount))

    # ---- TOTP -----------------------------------------------------------------------------

    def use_totp_step(self, user: str, secret: str, step: int) -> bool:
        """Record that a code of this step was used; False if it (or a later one) was."""
        def _use(db: sqlite3.Connection) -> bool:
            cur = db.execute(
                "INSERT INTO totp_steps VALUES (?,?,?) ON CONFLICT (user, secret) DO UPDATE "
                "SET step = excluded.step WHERE excluded.step > totp_steps.step",
                (user, _digest(secret), step))
            return cur.rowcount == 1
        return self._run(_use)


@dataclass(frozen=True, slots=True, kw_only=True)
class Attempt:
    """A login attempt under way: counted as a failure from its start, so that attempts made
    in parallel see each other (a guesser cannot fire many before the first is judged)."""

    wait: float  # > 0: refused for that many seconds, and nothing was counted
    pair: str = ""
    addr: str = ""
    rows: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Throttle:
    """Failed logins of one service (`scope`: "web" or "smtp") in the shared state."""

    state: AuthState
    scope: str
    free_tries: int  # per account and address, before the growing delays
    address_limit: int  # per address, any accounts, then the address is locked
    window_s: float
    lock_s: float

    @classmethod
    def of(cls, state: AuthState, scope: str, *, failures: int, minutes: int) -> Throttle:
        """`failures` free tries per account and address, four times that per address, all
        within `minutes`, which is also how long a locked address stays locked."""
        return cls(state=state, scope=scope, free_tries=failures, address_limit=4 * failures,
                   window_s=minutes * 60, lock_s=minutes * 60)

    def _keys(self, user: str, ip: str) -> tuple[str, str]:
        user = user.strip().lower()[:100]
        client = client_key(ip)  # an IPv6 client is its /64: a new address is no fresh start
        return f"{self.scope}|pair|{user}|{client}", f"{self.scope}|ip|{client}"

    async def begin(self, user: str, ip: str) -> Attempt:
        """Start an attempt for this account from this address, or say how long to wait."""
        pair, addr = self._keys(user, ip)
        now = self.state.clock()

        def _begin(db: sqlite3.Connection) -> Attempt:
            db.execute("DELETE FROM login_failures WHERE at <= ?", (now - self.window_s,))
            db.execute("DELETE FROM login_locks WHERE until <= ?", (now,))
            lock = db.execute("SELECT until FROM login_locks WHERE key = ?",
                              (addr,)).fetchone()
            if lock:
                return Attempt(wait=lock[0] - now)
            (n_addr,) = db.execute("SELECT count(*) FROM login_failures WHERE key = ?",
                                   (addr,)).fetchone()
            if n_addr >= self.address_limit:  # failures and attempts still in flight
                return Attempt(wait=self._lock(db, addr, now))
            n, last = db.execute("SELECT count(*), max(at) FROM login_failures WHERE key = ?",
                                 (pair,)).fetchone()
            if n >= self.free_tries and last is not None:
                delay = last + min(MAX_DELAY_S,
                                   FIRST_DELAY_S * 2.0 ** (n - self.free_tries)) - now
                if delay > 0:
                    return Attempt(wait=delay)
            rows = tuple(int(db.execute("INSERT INTO login_failures VALUES (?, ?)",
                                        (key, now)).lastrowid or 0) for key in (pair, addr))
            return Attempt(wait=0.0, pair=pair, addr=addr, rows=rows)
        return await self.state.call(_begin)

    def _lock(self, db: sqlite3.Connection, addr: str, now: float) -> float:
        db.execute("INSERT OR REPLACE INTO login_locks VALUES (?, ?)", (addr, now + self.lock_s))
        db.execute("DELETE FROM login_failures WHERE key = ?", (addr,))
        return self.lock_s

    async def failed(self, attempt: Attempt) -> bool:
        """The attempt failed (it is already counted); True when it locked the address."""
        now = self.state.clock()

        def _failed(db: sqlite3.Connection) -> bool:
            (n,) = db.execute("SELECT count(*) FROM login_failures WHERE key = ?",
                              (attempt.addr,)).fetchone()
            if n < self.address_limit:
                return False
            self._lock(db, attempt.addr, now)
            return True
        return await self.state.call(_failed)

    async def succeeded(self, attempt: Attempt) -> None:
        """Forget this pair's failures and this attempt; the address keeps its count."""
        def _succeeded(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM login_failures WHERE key = ?", (attempt.pair,))
            db.executemany("DELETE FROM login_failures WHERE rowid = ?",
                           [(r,) for r in attempt.rows])
        await self.state.call(_succeeded)
