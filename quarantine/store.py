"""Durable encrypted quarantine: one sealed file per message, and an SQLite index.

A message is answered 250 only after `put` returned: its file was written to a temporary name,
fsynced, renamed and the folder fsynced, then the index row committed. The file holds all there
is to know about the message (envelope, verdict, raw bytes), so the index can be rebuilt from
the files (`open` re-indexes any file it does not know, e.g. after a crash between the two).

If the index row cannot be written (disk full, read-only filesystem), the file is removed again
before `put` raises QuarantineWriteError: the sender got 451 and retries, and no second copy may
appear at the next open. Old temporary files (an interrupted write) are removed at open.

States: `quarantined -> releasing -> released` (or back to `quarantined` when delivery fails),
and `quarantined` or `released -> deleted`. A refused message whose copy is kept for review
(`[quarantine] keep_rejected`) starts `refused` and follows the same paths. Every change is
a compare-and-set in SQL, so that several Store objects, in one process or several (serving
processes, the web page, the CLI), never release one item twice nor delete an item being
released (see `release`).

What is personal data (sender, recipients, subject, client address) is sealed in the index too;
the clear columns are the id, dates, direction, action, score, symbol names, state and size.
All blocking work (files, SQLite) runs in threads; the methods are coroutines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import sqlite3
import struct
import threading
import time
import unicodedata
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from quarantine.crypto import RecordError, Sealer, load_or_create_key
from quarantine.files import fsync_dir, write_private

log = logging.getLogger(__name__)

STATES = ("quarantined", "refused", "releasing", "released", "deleted")
# As the web page and the CLI show them.
STATES_FR = {"quarantined": "en quarantaine", "refused": "refusé (copie conservée)",
             "releasing": "libération en cours", "released": "libéré", "deleted": "supprimé"}
# States an item can be released from: held, or refused with its copy kept for review.
RELEASABLE = ("quarantined", "refused")
# What became of a tracked message (the pipeline's outcomes), as the page and the CLI say it,
# and the groups the page's filter offers.
OUTCOMES_FR = {"delivered": "remis", "quarantined": "mis en quarantaine", "rejected": "refusé",
               "downstream_rejected": "refusé par le serveur de messagerie",
               "tempfail_scan": "refusé pour l'instant (analyse impossible)",
               "tempfail_downstream": "refusé pour l'instant (serveur de messagerie injoignable)",
               "tempfail_quarantine": "refusé pour l'instant (quarantaine indisponible)"}
OUTCOME_GROUPS = {"remis": ("delivered",), "retenu": ("quarantined",),
                  "refuse": ("rejected", "downstream_rejected"),
                  "temporaire": ("tempfail_scan", "tempfail_downstream", "tempfail_quarantine")}
# A `releasing` item or a temporary file older than this was left by a process that died: no
# live release takes that long, `release` cancels a delivery past RELEASE_LIMIT_S.
STALE_AFTER_S = 15 * 60
RELEASE_LIMIT_S = STALE_AFTER_S / 3
_ID_RE = re.compile(r"^[0-9]{8}T[0-9]{6}-[0-9a-f]{12}$")
_META = b"meta"
_MSG = b"message"


class QuarantineError(Exception):
    """Base of the quarantine's errors (it knows nothing of the gateway's)."""


class NotFound(QuarantineError, LookupError):
    pass


class NotQuarantined(QuarantineError):
    """The item is not in a state that allows the change (e.g. released, or being released):
    `state` says which (STATES_FR has its French name)."""

    def __init__(self, item_id: str, state: str) -> None:
        super().__init__(f"quarantine item {item_id} is {state}, not quarantined")
        self.state = state

    @property
    def text_fr(self) -> str:
        """For the person who asked (web page, CLI)."""
        return f"ce message n'est plus en quarantaine (état : {STATES_FR[self.state]})"


class QuarantineWriteError(QuarantineError):
    """The sealed file and its index row could not be written (both are gone again)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SymbolRecord:
    name: str
    score: float
    detail: str
    description: str = ""  # French, as shown when the message was held
    args: tuple[tuple[str, str], ...] = ()  # the finding's values: file, YARA rule...


@dataclass(frozen=True, slots=True, kw_only=True)
class NewItem:
    """What the pipeline hands to `put`."""

    received_at: float
    direction: str
    action: str
    score: float
    symbols: tuple[SymbolRecord, ...]
    # personal data, sealed in the index too (_PERSONAL):
    queue_id: str
    mail_from: str
    rcpts: tuple[str, ...]
    subject: str
    from_header: str
    client_ip: str
    helo: str
    # Decided when held: its sender may release it with the link of her notice.
    sender_may_release: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Item(NewItem):
    """A stored item: what was put, plus its id, size and state."""

    id: str
    state: str
    size: int
    state_changed_at: float | None = None
    state_by: str | None = None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,
    received_at REAL NOT NULL,
    direction TEXT NOT NULL,
    action TEXT NOT NULL,
    score REAL NOT NULL,
    symbols TEXT NOT NULL,
    state TEXT NOT NULL,
    size INTEGER NOT NULL,
    meta BLOB NOT NULL,
    state_changed_at REAL,
    state_by TEXT
);
CREATE INDEX IF NOT EXISTS items_received ON items(received_at);
-- Who did what on the web page and the CLI. Append-only: the triggers refuse any change.
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    user TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    client TEXT NOT NULL,
    detail BLOB NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
-- Message tracking: one row per message the gateway answered (any outcome). The queue id,
-- quarantine id, dates, direction, outcome, action, score and symbol names are clear (the
-- search keys); envelope, From, subject, client, replies and findings are sealed, and the
-- words of the sender, recipients, From and subject are only keyed tokens (a blind index).
CREATE TABLE IF NOT EXISTS tracking (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    queue_id TEXT NOT NULL,
    received_at REAL NOT NULL,
    direction TEXT NOT NULL,
    outcome TEXT NOT NULL,
    action TEXT NOT NULL,
    score REAL,
    symbols TEXT NOT NULL,
    quarantine_id TEXT,
    size INTEGER NOT NULL,
    words TEXT NOT NULL,
    meta BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS tracking_queue_id ON tracking(queue_id);
CREATE INDEX IF NOT EXISTS tracking_quarantine_id ON tracking(quarantine_id);
CREATE INDEX IF NOT EXISTS tracking_received ON tracking(received_at);
-- Messages per day, direction, action and main reason (all mail, not only quarantined).
CREATE TABLE IF NOT EXISTS stats (
    day TEXT NOT NULL,
    direction TEXT NOT NULL,
    action TEXT NOT NULL,
    reason TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (day, direction, action, reason)
);
-- Quarantine digests. A recipient's request to release an item (made with a digest's link;
-- who asked is sealed), the digest links already used (each works once), the addresses that
-- asked for no digest (blind tokens), and named time marks (the last digest's end).
CREATE TABLE IF NOT EXISTS release_requests (
    item_id TEXT NOT NULL,
    at REAL NOT NULL,
    meta BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS release_requests_item ON release_requests(item_id);
CREATE TABLE IF NOT EXISTS used_links (mac TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS digest_optouts (token TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS marks (name TEXT PRIMARY KEY, value REAL NOT NULL);
-- Digests the mailbox server refused for now, tried again by the primary process until
-- `give_up_at` (sealed: the recipient and the mail).
CREATE TABLE IF NOT EXISTS pending_digests (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    give_up_at REAL NOT NULL,
    meta BLOB NOT NULL
);
"""

_AUDIT = b"audit"
_REQUEST = b"release-request"
_DIGEST = b"pending-digest"


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditEntry:
    seq: int
    at: float
    user: str
    action: str
    target: str
    client: str
    detail: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TrackRecord:
    """What happened to one message the gateway answered (`Store.track`, `Store.tracking`)."""

    queue_id: str  # given in the SMTP reply
    received_at: float
    direction: str
    outcome: str  # the pipeline's OutcomeKind value: delivered, quarantined, rejected...
    action: str  # the verdict's action ("" when the message could not be analysed)
    score: float | None
    symbols: tuple[SymbolRecord, ...]
    quarantine_id: str | None
    size: int
    # personal, sealed:
    reply: str  # what the client was told
    downstream: str  # the next hop's reply, when it gave one
    mail_from: str
    rcpts: tuple[str, ...]
    delivered_to: tuple[str, ...]  # when held for some recipients only
    subject: str
    from_header: str
    client_ip: str
    helo: str
    auth_user: str = ""
    seq: int = 0  # set when stored


_TRACK = b"track"
_TRACK_PERSONAL = ("reply", "downstream", "mail_from", "rcpts", "delivered_to", "subject",
                   "from_header", "client_ip", "helo", "auth_user")
QUEUE_ID_RE = re.compile(r"^[0-9BCDFGHJKLMNPQRSTVWXYZ]{12}$")
MAX_TRACK_FIELD = 1000  # characters kept of each personal field of a tracking record
MAX_TRACK_RCPTS = 1000
MAX_TRACK_WORDS = 300  # words indexed per record
MAX_TRACK_SCAN = 5000  # rows read again at most to check a search with punctuation
_TRACK_COLUMNS = ("seq, queue_id, received_at, direction, outcome, action, score, symbols, "
                  "quarantine_id, size, meta")


@dataclass(frozen=True, slots=True, kw_only=True)
class Filters:
    """Search of the quarantine: clear columns in SQL, personal fields after unsealing."""

    state: str | None = None
    direction: str | None = None
    since: float | None = None
    until: float | None = None
    min_score: float | None = None
    reason: str | None = None  # a symbol name
    sender: str = ""  # substring of the envelope sender or From
    rcpt: str = ""
    subject: str = ""
    requested: bool = False  # only items a recipient asked to release (digest link)


_PERSONAL = ("queue_id", "mail_from", "rcpts", "subject", "from_header", "client_ip", "helo",
             "sender_may_release")  # sealed in the index row (the last is not personal)


def _new_id(now: float) -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + "-" + secrets.token_hex(6)


def _create_private(path: Path) -> None:
    """Create an empty file with mode 0600 if absent (SQLite then keeps that mode)."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


class Store:
    def __init__(self, root: Path, sealer: Sealer, *, clock: Callable[[], float] = time.time):
        self.root = root
        self._sealer = sealer
        self._clock = clock
        self._msgs = root / "msgs"
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    # ---- life cycle -------------------------------------------------------------------

    @classmethod
    async def open(cls, root: Path, key_file: Path, *,
                   clock: Callable[[], float] = time.time) -> Store:
        return await asyncio.to_thread(cls.open_sync, root, key_file, clock=clock)

    @classmethod
    def open_sync(cls, root: Path, key_file: Path, *,
                  clock: Callable[[], float] = time.time) -> Store:
        """Blocking open, for start-up before any event loop or thread exists."""
        store = cls(root, Sealer(load_or_create_key(key_file)), clock=clock)
        store._open_sync()
        return store

    def _open_sync(self) -> None:
        self._msgs.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        os.chmod(self._msgs, 0o700)
        index = self.root / "index.sqlite3"
        _create_private(index)
        db = sqlite3.connect(index, check_same_thread=False, timeout=30, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        self._db = db
        self._reindex()
        self._remove_stale_tmp()
        self._recover_releasing()

    async def close(self) -> None:
        await asyncio.to_thread(self.close_sync)

    def close_sync(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("quarantine store is closed")
        return self._db

    def _reindex(self) -> None:
        known = dict(self._conn().execute("SELECT id, state FROM items").fetchall())
        for path in self._msgs.glob("*.qmsg"):
            if known.get(path.stem) == "deleted":  # a crash between the row and the file
                self._remove_file(path.stem)
                continue
            if path.stem in known:
                continue
            try:
                item, _ = self._read_file(path.stem)
            except (RecordError, OSError, ValueError) as exc:
                log.error("quarantine file %s not re-indexed: %s", path.name, exc)
                continue
            self._insert(item)
            log.warning("quarantine item %s re-indexed from its file", item.id)

    def _remove_stale_tmp(self) -> None:
        """Remove what an interrupted `write_private` left. Only old files: a young one may be
        another process's write in progress."""
        cutoff = self._clock() - STALE_AFTER_S
        removed = 0
        for path in self._msgs.glob("*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
        if removed:
            log.warning("%d stale temporary file(s) removed from %s", removed, self._msgs)

    def _recover_releasing(self) -> None:
        """Put back in quarantine (or among the refused) the items a process left `releasing`
        when it died mid-delivery (at open, and at each purge). Only past STALE_AFTER_S: a
        younger one may be in the hands of a live process. The next hop may have accepted the
        message before the process died: releasing it again then delivers it twice (at least
        once after a crash, never lost)."""
        with self._lock:
            ids = [r[0] for r in self._conn().execute(
                # Back where it came from: a refused message's kept copy (its verdict was a
                # refusal) stays refused, and releasing it asks for a confirmation again.
                "UPDATE items SET state = CASE WHEN action = 'reject' THEN 'refused' "
                "ELSE 'quarantined' END, state_changed_at = NULL, state_by = NULL "
                "WHERE state = 'releasing' AND state_changed_at < ? RETURNING id",
                (self._clock() - STALE_AFTER_S,)).fetchall()]
        for item_id in ids:
            log.warning("quarantine item %s was left releasing (process stopped mid-delivery?): "
                        "back in quarantine; it may have been delivered already", item_id)

    # ---- writing ----------------------------------------------------------------------

    async def put(self, new: NewItem, raw: bytes, *, state: str = "quarantined") -> str:
        """Seal and store durably; returns the item id once it is on disk. `state`:
        "refused" for the kept copy of a refused message."""
        return await asyncio.to_thread(self._put_sync, new, raw, state)

    def _put_sync(self, new: NewItem, raw: bytes, state: str = "quarantined") -> str:
        item_id = _new_id(new.received_at)
        item = Item(id=item_id, state=state, size=len(raw), **_fields(new))
        meta = _json_bytes(_to_json(item))
        plain = struct.pack(">I", len(meta)) + meta + raw
        blob = self._sealer.seal(plain, record_id=item_id, purpose=_MSG)
        try:
            write_private(self._msgs / f"{item_id}.qmsg", blob, sync_dir=True)
            self._insert(item)
        except (OSError, sqlite3.Error) as exc:
            # The file and its row are one unit: the sender gets 451 and retries, and a file
            # left without its row would be re-indexed at the next open as a second copy.
            try:
                self._remove_file(item_id)
            except OSError as cleanup:
                log.error("quarantine file %s.qmsg not removed (%s): the next open re-indexes "
                          "it, a second copy once the sender retries", item_id, cleanup)
            log.error("quarantine write failed: %s; %s bytes free in %s", exc,
                      self._free_bytes(), self.root)
            raise QuarantineWriteError(f"quarantine write failed: {exc}") from exc
        return item_id

    def _free_bytes(self) -> int | str:
        try:
            return shutil.disk_usage(self.root).free
        except OSError:
            return "unknown"

    def _remove_file(self, item_id: str) -> None:
        path = self._msgs / f"{item_id}.qmsg"
        try:
            path.unlink()
        except FileNotFoundError:
            return
        fsync_dir(path.parent)

    def _insert(self, item: Item) -> None:
        # Symbol details can name the sender's domain or a file name: sealed with the rest.
        personal = {k: getattr(item, k) for k in _PERSONAL}
        personal["details"] = [[s.detail, s.description, s.args] for s in item.symbols]
        sealed = self._sealer.seal(_json_bytes(personal), record_id=item.id, purpose=_META)
        symbols = json.dumps([{"name": s.name, "score": s.score} for s in item.symbols])
        with self._lock:
            self._conn().execute(
                "INSERT OR REPLACE INTO items VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (item.id, item.received_at, item.direction, item.action, item.score, symbols,
                 item.state, item.size, sealed, item.state_changed_at, item.state_by))

    # ---- reading ----------------------------------------------------------------------

    async def list_items(self, *, state: str | None = None, limit: int = 50,
                         offset: int = 0) -> list[Item]:
        return await asyncio.to_thread(self._list_sync, state, limit, offset)

    def _list_sync(self, state: str | None, limit: int, offset: int) -> list[Item]:
        sql = "SELECT * FROM items"
        args: list[Any] = []
        if state:
            sql += " WHERE state = ?"
            args.append(state)
        sql += " ORDER BY received_at DESC, id DESC LIMIT ? OFFSET ?"
        args += [limit, offset]
        with self._lock:
            rows = self._conn().execute(sql, args).fetchall()
        return [self._row_item(r) for r in rows]

    async def count(self, *, state: str | None = None) -> int:
        def _count() -> int:
            with self._lock:
                if state:
                    row = self._conn().execute(
                        "SELECT count(*) FROM items WHERE state = ?", (state,)).fetchone()
                else:
                    row = self._conn().execute("SELECT count(*) FROM items").fetchone()
            return int(row[0])
        return await asyncio.to_thread(_count)

    async def get(self, item_id: str) -> tuple[Item, bytes]:
        """The item and its raw message bytes (NotFound once deleted or purged)."""
        _check_id(item_id)

        def _get() -> tuple[Item, bytes]:
            item = self._item_sync(item_id)
            try:
                _, raw = self._read_file(item_id)
            except FileNotFoundError:
                raise NotFound(f"quarantine item {item_id} has no stored message "
                               f"(state {item.state})") from None
            return item, raw
        return await asyncio.to_thread(_get)

    async def item(self, item_id: str) -> Item:
        _check_id(item_id)
        return await asyncio.to_thread(self._item_sync, item_id)

    def _item_sync(self, item_id: str) -> Item:
        with self._lock:
            row = self._conn().execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            raise NotFound(f"no quarantine item {item_id}")
        return self._row_item(row)

    def _row_item(self, row: Sequence[Any]) -> Item:
        (item_id, received_at, direction, action, score, symbols, state, size, sealed,
         changed_at, changed_by) = row
        personal = json.loads(self._sealer.open(sealed, record_id=item_id, purpose=_META))
        personal["rcpts"] = tuple(personal["rcpts"])
        details = personal.pop("details")
        symbols_ = tuple(SymbolRecord(name=s["name"], score=s["score"], detail=d[0],
                                      description=d[1], args=_pairs(d[2:]))
                         for s, d in zip(json.loads(symbols), details, strict=True))
        return Item(id=item_id, received_at=received_at, direction=direction, action=action,
                    score=score, symbols=symbols_,
                    state=state, size=size, state_changed_at=changed_at, state_by=changed_by,
                    **personal)

    def _read_file(self, item_id: str) -> tuple[Item, bytes]:
        blob = (self._msgs / f"{item_id}.qmsg").read_bytes()
        plain = self._sealer.open(blob, record_id=item_id, purpose=_MSG)
        (n,) = struct.unpack(">I", plain[:4])
        data = json.loads(plain[4:4 + n])
        data["rcpts"] = tuple(data["rcpts"])
        data["symbols"] = tuple(SymbolRecord(**{**s, "args": _pairs([s.get("args", [])])})
                                for s in data["symbols"])
        return Item(**data), plain[4 + n:]

    async def search(self, filters: Filters, *, limit: int = 50,
                     offset: int = 0) -> tuple[list[Item], int]:
        """Items matching `filters`, newest first, and how many match in all."""
        return await asyncio.to_thread(self._search_sync, filters, limit, offset)

    def _search_sync(self, f: Filters, limit: int, offset: int) -> tuple[list[Item], int]:
        where: list[str] = []
        args: list[Any] = []
        for cond, value in (("state = ?", f.state), ("direction = ?", f.direction),
                            ("received_at >= ?", f.since), ("received_at < ?", f.until),
                            ("score >= ?", f.min_score)):
            if value is not None and value != "":
                where.append(cond)
                args.append(value)
        if f.requested:
            where.append("id IN (SELECT item_id FROM release_requests)")
        if f.reason:
            where.append("symbols LIKE ?")
            args.append('%"name": "' + f.reason.replace("%", "").replace("_", "\\_") + '"%')
            where[-1] += " ESCAPE '\\'"
        where_sql = " WHERE " + " AND ".join(where) if where else ""
        sql = f"SELECT * FROM items{where_sql} ORDER BY received_at DESC, id DESC"
        sender, rcpt, subject = f.sender.lower(), f.rcpt.lower(), f.subject.lower()
        if not (sender or rcpt or subject):
            # Clear columns only: SQL pages, and only the page's rows are unsealed.
            with self._lock:
                total = self._conn().execute(f"SELECT count(*) FROM items{where_sql}",
                                             args).fetchone()[0]
                rows = self._conn().execute(f"{sql} LIMIT ? OFFSET ?",
                                            [*args, limit, offset]).fetchall()
            return [self._row_item(r) for r in rows], int(total)
        with self._lock:
            rows = self._conn().execute(sql, args).fetchall()
        items = [self._row_item(r) for r in rows]
        items = [i for i in items
                 if (not sender or sender in i.mail_from.lower()
                     or sender in i.from_header.lower())
                 and (not rcpt or any(rcpt in r.lower() for r in i.rcpts))
                 and (not subject or subject in i.subject.lower())]
        return items[offset:offset + limit], len(items)

    async def symbol_names(self) -> list[str]:
        """The symbol names found on any item (the reasons one can filter on)."""
        def _names() -> list[str]:
            with self._lock:
                rows = self._conn().execute("SELECT DISTINCT symbols FROM items").fetchall()
            return sorted({s["name"] for (r,) in rows for s in json.loads(r)})
        return await asyncio.to_thread(_names)

    async def total_size(self) -> tuple[int, int]:
        """(items held, bytes) of the messages still in quarantine."""
        def _size() -> tuple[int, int]:
            with self._lock:
                row = self._conn().execute(
                    "SELECT count(*), coalesce(sum(size), 0) FROM items WHERE state = ?",
                    ("quarantined",)).fetchone()
            return int(row[0]), int(row[1])
        return await asyncio.to_thread(_size)

    # ---- audit log and statistics -----------------------------------------------------

    async def audit(self, *, user: str, action: str, target: str = "", client: str = "",
                    detail: str = "") -> None:
        """Append to the audit log (the detail may name a sender: sealed)."""
        sealed = self._sealer.seal(detail.encode(), record_id="audit", purpose=_AUDIT)

        def _add() -> None:
            with self._lock:
                self._conn().execute(
                    "INSERT INTO audit (at, user, action, target, client, detail) "
                    "VALUES (?,?,?,?,?,?)", (self._clock(), user, action, target, client, sealed))
        await asyncio.to_thread(_add)

    async def audited(self, target: str, actions: Sequence[str]) -> bool:
        """Whether the audit log holds one of `actions` about `target` (something done once)."""
        def _find() -> bool:
            marks = ",".join("?" * len(actions))
            with self._lock:
                return self._conn().execute(
                    f"SELECT 1 FROM audit WHERE target = ? AND action IN ({marks}) LIMIT 1",
                    [target, *actions]).fetchone() is not None
        return bool(actions) and await asyncio.to_thread(_find)

    async def audit_log(self, *, limit: int = 100, offset: int = 0,
                        action: str | None = None) -> tuple[list[AuditEntry], int]:
        def _read() -> tuple[list[AuditEntry], int]:
            cond, args = ("WHERE action = ?", [action]) if action else ("", [])
            with self._lock:
                total = self._conn().execute(f"SELECT count(*) FROM audit {cond}",
                                             args).fetchone()[0]
                rows = self._conn().execute(
                    f"SELECT seq, at, user, action, target, client, detail FROM audit {cond} "
                    "ORDER BY seq DESC LIMIT ? OFFSET ?", [*args, limit, offset]).fetchall()
            return [AuditEntry(seq=r[0], at=r[1], user=r[2], action=r[3], target=r[4],
                               client=r[5], detail=self._sealer.open(
                                   r[6], record_id="audit", purpose=_AUDIT).decode())
                    for r in rows], int(total)
        return await asyncio.to_thread(_read)

    async def add_stats(self, counts: dict[tuple[str, str, str, str], int]) -> None:
        """Add message counts keyed (day, direction, action, main reason)."""
        def _add() -> None:
            with self._lock:
                self._conn().executemany(
                    "INSERT INTO stats VALUES (?,?,?,?,?) ON CONFLICT (day, direction, action, "
                    "reason) DO UPDATE SET count = count + excluded.count",
                    [(*k, n) for k, n in counts.items()])
        await asyncio.to_thread(_add)

    async def stats(self, *, since_day: str) -> list[tuple[str, str, str, str, int]]:
        def _read() -> list[tuple[str, str, str, str, int]]:
            with self._lock:
                return [tuple(r) for r in self._conn().execute(
                    "SELECT day, direction, action, reason, count FROM stats WHERE day >= ? "
                    "ORDER BY day", (since_day,))]
        return await asyncio.to_thread(_read)

    # ---- message tracking -------------------------------------------------------------

    async def track(self, records: Sequence[TrackRecord]) -> None:
        """Append tracking records (a batch: one transaction). Each record's fields are cut
        to MAX_TRACK_FIELD characters and its words to MAX_TRACK_WORDS (a From header of a
        million words is not kept whole); a record that cannot be written is logged and
        skipped, never its batch."""
        def _add() -> None:
            rows = []
            for r in records:
                try:
                    rows.append(self._track_row(r))
                except Exception:  # noqa: BLE001 - one record's loss, not its batch's
                    log.exception("tracking record %s not written", r.queue_id)
            with self._lock:
                db = self._conn()
                db.execute("BEGIN")
                try:
                    db.executemany(
                        "INSERT INTO tracking (queue_id, received_at, direction, outcome, "
                        "action, score, symbols, quarantine_id, size, words, meta) "
                        "VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
        await asyncio.to_thread(_add)

    def _track_row(self, r: TrackRecord) -> tuple[Any, ...]:
        personal: dict[str, Any] = {
            k: (v[:MAX_TRACK_FIELD] if isinstance(v, str)
                else [a[:MAX_TRACK_FIELD] for a in v[:MAX_TRACK_RCPTS]])
            for k in _TRACK_PERSONAL for v in [getattr(r, k)]}
        personal["details"] = [[s.detail[:MAX_TRACK_FIELD], s.description[:MAX_TRACK_FIELD],
                                s.args] for s in r.symbols[:100]]
        sealed = self._sealer.seal(_json_bytes(personal), record_id=r.queue_id, purpose=_TRACK)
        text = " ".join((personal["mail_from"], personal["from_header"], personal["subject"],
                         *personal["rcpts"]))
        words = {self._sealer.token(w) for w in _words(text)[:MAX_TRACK_WORDS]}
        return (r.queue_id, r.received_at, r.direction, r.outcome, r.action, r.score,
                json.dumps([{"name": s.name, "score": s.score} for s in r.symbols[:100]]),
                r.quarantine_id, r.size, f" {' '.join(sorted(words))} ", sealed)

    async def tracking(self, query: str = "", *, since: float | None = None,
                       until: float | None = None, action: str | None = None,
                       direction: str | None = None, outcomes: Sequence[str] = (),
                       limit: int = 50, offset: int = 0) -> tuple[list[TrackRecord], int]:
        """Tracking records, newest first, and how many match. `query`: a queue id or a
        quarantine id (found by index), else words (whole words, or whole addresses) all
        found in the sender, a recipient, the From field or the subject, through the blind
        index; words with punctuation between letters ("labo-analyses") are checked on the
        unsealed rows, the MAX_TRACK_SCAN most recent the index leaves."""
        q = query.strip()
        where: list[str] = []
        args: list[Any] = []
        if QUEUE_ID_RE.match(q.upper()) and not q.isdigit():
            where.append("queue_id = ?")
            args.append(q.upper())
            q = ""
        elif _ID_RE.match(held := q[:8] + q[8:9].upper() + q[9:].lower()):
            where.append("quarantine_id = ?")
            args.append(held)
            q = ""
        for cond, value in (("received_at >= ?", since), ("received_at < ?", until),
                            ("action = ?", action), ("direction = ?", direction)):
            if value is not None and value != "":
                where.append(cond)
                args.append(value)
        if outcomes:
            where.append(f"outcome IN ({','.join('?' * len(outcomes))})")
            args.extend(outcomes)
        # Words: the rows holding each word's token (the index), then read to check.
        for token in sorted({self._sealer.token(w) for w in _words(q)}):
            where.append("words LIKE ?")
            args.append(f"% {token} %")
        where_sql = " WHERE " + " AND ".join(where) if where else ""
        sql = (f"SELECT {_TRACK_COLUMNS} FROM tracking{where_sql} "
               "ORDER BY received_at DESC, seq DESC")
        words = _fold(q).split()
        # Words of letters and digits only: the index alone answers (48-bit tokens), and
        # SQL pages. Others ("labo-analyses", "x@y.fr") are read again to check the letters
        # between the words.
        checked = [w for w in words if not re.fullmatch(r"[^\W_]+", w)]

        def _read() -> tuple[list[TrackRecord], int]:
            if not checked:
                with self._lock:
                    total = self._conn().execute(f"SELECT count(*) FROM tracking{where_sql}",
                                                 args).fetchone()[0]
                    rows = self._conn().execute(f"{sql} LIMIT ? OFFSET ?",
                                                [*args, limit, offset]).fetchall()
                return [self._row_track(r) for r in rows], int(total)
            with self._lock:  # the most recent MAX_TRACK_SCAN the index left
                rows = self._conn().execute(f"{sql} LIMIT ?", [*args, MAX_TRACK_SCAN]).fetchall()
            found = []
            for row in rows:
                rec = self._row_track(row)
                text = _fold(" ".join((rec.mail_from, rec.from_header, rec.subject,
                                       *rec.rcpts)))
                if all(w in text for w in checked):
                    found.append(rec)
            return found[offset:offset + limit], len(found)
        return await asyncio.to_thread(_read)

    def _row_track(self, row: Sequence[Any]) -> TrackRecord:
        (seq, queue_id, received_at, direction, outcome, action, score, symbols,
         quarantine_id, size, sealed) = row
        personal = json.loads(self._sealer.open(sealed, record_id=queue_id, purpose=_TRACK))
        for k in ("rcpts", "delivered_to"):
            personal[k] = tuple(personal[k])
        details = personal.pop("details")
        symbols_ = tuple(SymbolRecord(name=s["name"], score=s["score"], detail=d[0],
                                      description=d[1], args=_pairs(d[2:]))
                         for s, d in zip(json.loads(symbols), details, strict=True))
        return TrackRecord(seq=seq, queue_id=queue_id, received_at=received_at,
                           direction=direction, outcome=outcome, action=action, score=score,
                           symbols=symbols_, quarantine_id=quarantine_id, size=size, **personal)

    # ---- state changes ----------------------------------------------------------------

    async def release(self, item_id: str, *, by: str,
                      deliver: Callable[[Item, bytes], Awaitable[None]],
                      client: str = "") -> Item:
        """Re-inject the original message through `deliver`, then mark it released. The
        audit log gets `release` (the recipients) or `release_failed` (the error), by `by`
        from `client`: written here, whoever asks.

        The item goes `quarantined -> releasing` by a compare-and-set, so of two concurrent
        releases (web page and sender's link, web page and CLI) only one delivers; the other
        gets NotQuarantined. Delivered, it goes `releasing -> released`; if `deliver` fails,
        is cancelled or takes over RELEASE_LIMIT_S (TimeoutError) it goes back to `quarantined`
        and the error is raised. A process killed mid-delivery leaves it `releasing` until
        `_recover_releasing` puts it back."""
        _check_id(item_id)
        prior = (await self.item(item_id)).state
        await asyncio.to_thread(self._move, item_id,
                                (prior,) if prior in RELEASABLE else RELEASABLE, "releasing", by)
        try:
            item, raw = await self.get(item_id)
            async with asyncio.timeout(RELEASE_LIMIT_S):
                await deliver(item, raw)
        except BaseException as exc:
            try:
                await asyncio.to_thread(self._move, item_id, ("releasing",), prior, None)
            except Exception:  # noqa: BLE001 - the delivery error is the one to report
                log.exception("quarantine item %s left releasing after a failed delivery", item_id)
            if isinstance(exc, Exception):
                await self._audit_quietly(by, "release_failed", item_id, client,
                                          (str(exc) or type(exc).__name__)[:200])
            raise
        await asyncio.to_thread(self._move, item_id, ("releasing",), "released", by)
        await self._audit_quietly(by, "release", item_id, client, ", ".join(item.rcpts))
        return await self.item(item_id)

    async def _audit_quietly(self, by: str, action: str, item_id: str, client: str,
                             detail: str = "") -> None:
        """The audit record of a state change already made: its failure is logged, not
        raised (the change stands)."""
        try:
            await self.audit(user=by, action=action, target=item_id, client=client,
                             detail=detail)
        except Exception:  # noqa: BLE001
            log.exception("audit record of %s %s not written", action, item_id)

    async def delete(self, item_id: str, *, by: str, client: str = "") -> None:
        """Remove the message file for good; the index row stays, in state `deleted`, and the
        audit log gets `delete`. An item being released cannot be deleted (NotQuarantined);
        deleting twice is harmless."""
        _check_id(item_id)

        def _delete() -> bool:
            moved = True
            try:
                self._move(item_id, ("quarantined", "refused", "released"), "deleted", by)
            except NotQuarantined as exc:
                if exc.state != "deleted":
                    raise
                moved = False  # deleted before: the file goes if a crash left it
            self._remove_file(item_id)
            return moved
        if await asyncio.to_thread(_delete):
            await self._audit_quietly(by, "delete", item_id, client)

    def _move(self, item_id: str, from_states: tuple[str, ...], state: str,
              by: str | None) -> None:
        """Compare-and-set of the state: NotQuarantined (NotFound) unless the item is in one
        of `from_states`. `by` None clears who changed it (back to a plain quarantined item)."""
        marks = ",".join("?" * len(from_states))
        with self._lock:
            moved = self._conn().execute(
                "UPDATE items SET state = ?, state_changed_at = ?, state_by = ? "
                f"WHERE id = ? AND state IN ({marks})",
                (state, None if by is None else self._clock(), by, item_id, *from_states)
            ).rowcount
        if moved != 1:
            raise NotQuarantined(item_id, self._item_sync(item_id).state)

    async def purge(self, *, older_than_days: float) -> int:
        """Remove items (files and rows), and tracking records, received before the
        retention period."""
        cutoff = self._clock() - older_than_days * 86400

        def _purge() -> int:
            self._recover_releasing()
            with self._lock:
                ids = [r[0] for r in self._conn().execute(
                    "SELECT id FROM items WHERE received_at < ? AND state != 'releasing'",
                    (cutoff,))]
            for item_id in ids:
                self._remove_file(item_id)
                with self._lock:
                    self._conn().execute(
                        "DELETE FROM items WHERE id = ? AND state != 'releasing'", (item_id,))
            with self._lock:  # the tracking records of the same period go with them
                db = self._conn()
                db.execute("DELETE FROM tracking WHERE received_at < ?", (cutoff,))
                db.execute("DELETE FROM release_requests WHERE item_id NOT IN "
                           "(SELECT id FROM items)")
                db.execute("DELETE FROM used_links WHERE at < ?", (cutoff,))
            return len(ids)
        return await asyncio.to_thread(_purge)

    # ---- digests ------------------------------------------------------------------------

    async def last_row(self) -> int:
        """The position of the newest item stored (SQLite's rowid, which grows with each
        insert): a digest lists the items stored after the previous digest's position, so an
        item whose analysis was still running when a digest was made is in the next one."""
        def _read() -> int:
            with self._lock:
                return int(self._conn().execute(
                    "SELECT coalesce(max(rowid), 0) FROM items").fetchone()[0])
        return await asyncio.to_thread(_read)

    async def held_between(self, after_row: int, upto_row: int) -> list[Item]:
        """Inbound items still held (not refused copies) stored after position `after_row`
        and up to `upto_row` (see `last_row`), oldest first: what a digest lists."""
        def _read() -> list[Item]:
            with self._lock:
                rows = self._conn().execute(
                    "SELECT * FROM items WHERE state = 'quarantined' AND direction = 'inbound' "
                    "AND rowid > ? AND rowid <= ? ORDER BY rowid", (after_row, upto_row)
                ).fetchall()
            return [self._row_item(r) for r in rows]
        return await asyncio.to_thread(_read)

    async def add_pending_digest(self, rcpt: str, raw: bytes, give_up_at: float) -> None:
        def _add() -> None:
            with self._lock:
                seq = self._conn().execute(
                    "INSERT INTO pending_digests (give_up_at, meta) VALUES (?, x'')",
                    (give_up_at,)).lastrowid
                sealed = self._sealer.seal(_json_bytes({"rcpt": rcpt, "raw": raw.decode(
                    "latin-1")}), record_id=str(seq), purpose=_DIGEST)
                self._conn().execute("UPDATE pending_digests SET meta = ? WHERE seq = ?",
                                     (sealed, seq))
        await asyncio.to_thread(_add)

    async def pending_digests(self) -> list[tuple[int, str, bytes, float]]:
        """(seq, recipient, mail, give up at) of the digests waiting to be tried again."""
        def _read() -> list[tuple[int, str, bytes, float]]:
            with self._lock:
                rows = self._conn().execute(
                    "SELECT seq, give_up_at, meta FROM pending_digests WHERE meta != x'' "
                    "ORDER BY seq").fetchall()
            out = []
            for seq, give_up_at, meta in rows:
                data = json.loads(self._sealer.open(meta, record_id=str(seq), purpose=_DIGEST))
                out.append((int(seq), str(data["rcpt"]), data["raw"].encode("latin-1"),
                            float(give_up_at)))
            return out
        return await asyncio.to_thread(_read)

    async def drop_pending_digest(self, seq: int) -> None:
        def _drop() -> None:
            with self._lock:
                self._conn().execute("DELETE FROM pending_digests WHERE seq = ?", (seq,))
        await asyncio.to_thread(_drop)

    async def use_link(self, mac: str) -> bool:
        """Mark a digest link used: True the first time only (whichever process asks)."""
        def _use() -> bool:
            with self._lock:
                return self._conn().execute(
                    "INSERT OR IGNORE INTO used_links VALUES (?, ?)",
                    (mac, self._clock())).rowcount == 1
        return await asyncio.to_thread(_use)

    async def link_used(self, mac: str) -> bool:
        def _used() -> bool:
            with self._lock:
                return self._conn().execute(
                    "SELECT 1 FROM used_links WHERE mac = ?", (mac,)).fetchone() is not None
        return await asyncio.to_thread(_used)

    async def request_release(self, item_id: str, *, by: str, client: str = "") -> None:
        """A recipient asks the admin to release an item (audited)."""
        _check_id(item_id)
        at = self._clock()

        def _add() -> None:
            self._item_sync(item_id)  # NotFound
            sealed = self._sealer.seal(_json_bytes({"by": by}), record_id=item_id,
                                       purpose=_REQUEST)
            with self._lock:
                self._conn().execute("INSERT INTO release_requests VALUES (?, ?, ?)",
                                     (item_id, at, sealed))
        await asyncio.to_thread(_add)
        await self._audit_quietly(by, "release_request", item_id, client)

    async def release_requests(self, item_id: str) -> list[tuple[str, float]]:
        """Who asked to release the item, and when, oldest first."""
        def _read() -> list[tuple[str, float]]:
            with self._lock:
                rows = self._conn().execute(
                    "SELECT at, meta FROM release_requests WHERE item_id = ? ORDER BY at",
                    (item_id,)).fetchall()
            return [(str(json.loads(self._sealer.open(m, record_id=item_id,
                                                      purpose=_REQUEST))["by"]), at)
                    for at, m in rows]
        return await asyncio.to_thread(_read)

    async def pending_requests(self) -> int:
        """Held items a recipient asked to release."""
        def _count() -> int:
            with self._lock:
                return int(self._conn().execute(
                    "SELECT count(DISTINCT item_id) FROM release_requests JOIN items "
                    "ON items.id = item_id WHERE items.state = 'quarantined'").fetchone()[0])
        return await asyncio.to_thread(_count)

    def blind(self, address: str) -> str:
        """The blind-index token of an address (case and accents folded)."""
        return self._sealer.token(_fold(address.strip()))

    async def set_digest_optout(self, token: str, out: bool) -> None:
        def _set() -> None:
            with self._lock:
                if out:
                    self._conn().execute("INSERT OR REPLACE INTO digest_optouts VALUES (?, ?)",
                                         (token, self._clock()))
                else:
                    self._conn().execute("DELETE FROM digest_optouts WHERE token = ?", (token,))
        await asyncio.to_thread(_set)

    async def digest_optouts(self) -> set[str]:
        def _read() -> set[str]:
            with self._lock:
                return {r[0] for r in self._conn().execute("SELECT token FROM digest_optouts")}
        return await asyncio.to_thread(_read)

    async def set_mark(self, name: str, value: float) -> None:
        def _set() -> None:
            with self._lock:
                self._conn().execute("INSERT OR REPLACE INTO marks VALUES (?, ?)", (name, value))
        await asyncio.to_thread(_set)

    async def mark(self, name: str) -> float | None:
        def _read() -> float | None:
            with self._lock:
                row = self._conn().execute("SELECT value FROM marks WHERE name = ?",
                                           (name,)).fetchone()
            return None if row is None else float(row[0])
        return await asyncio.to_thread(_read)

    async def move_mark(self, name: str, old: float | None, new: float) -> bool:
        """Compare-and-set of a time mark: True if it was `old` (None: absent) and is now
        `new`; False if another process moved it first."""
        def _move() -> bool:
            with self._lock:
                db = self._conn()
                if old is None:
                    return db.execute("INSERT OR IGNORE INTO marks VALUES (?, ?)",
                                      (name, new)).rowcount == 1
                return db.execute("UPDATE marks SET value = ? WHERE name = ? AND value = ?",
                                  (new, name, old)).rowcount == 1
        return await asyncio.to_thread(_move)


def _check_id(item_id: str) -> None:
    if not _ID_RE.match(item_id):
        raise NotFound(f"not a quarantine item id: {item_id!r}")


def _fields(new: NewItem) -> dict[str, Any]:
    return {f.name: getattr(new, f.name) for f in fields(NewItem)}


def _to_json(item: Item) -> dict[str, Any]:
    data = asdict(item)
    data["rcpts"] = list(item.rcpts)
    return data


def _pairs(stored: Sequence[Any]) -> tuple[tuple[str, str], ...]:
    """A finding's values as read back from JSON ([[k, v], ...]; absent in older records)."""
    return tuple((str(k), str(v)) for k, v in stored[0]) if stored else ()


def _fold(text: str) -> str:
    """Lower case, no accents: how words are compared ("Résultats" is "resultats")."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


_ADDRESS = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")


def _words(text: str) -> list[str]:
    """The words a search can name, folded, in order, once each: each address whole, then
    runs of letters and digits (an address also gives its local part and each label of its
    domain)."""
    folded = _fold(text)
    return list(dict.fromkeys([*_ADDRESS.findall(folded),
                               *(w for w in re.split(r"[\W_]+", folded) if w)]))


def _json_bytes(value: Any) -> bytes:
    """JSON as ASCII: text that is not valid Unicode (raw 8-bit header bytes the parser kept
    as lone surrogates) is kept as JSON escapes and read back as it was, instead of failing
    the write (a message held or tracked must never fail on its sender's bytes)."""
    return json.dumps(value).encode("ascii")
