"""The practice's allow and block lists of senders, kept by the web page, read by the pipeline.

One JSON file (`<data_dir>/sender-lists.json`, mode 0600, replaced atomically), re-read by each
serving process when its modification time changes. An entry is an address
(`contact@labo.fr`) or a whole domain (`@labo.fr`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from gateway.errors import Refused
from quarantine.files import write_private

KINDS = ("allow", "block")


@dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    kind: str  # "allow" or "block"
    value: str  # "address@domain" or "@domain", lower case
    added_by: str
    added_at: float
    note: str = ""


def normalise(value: str) -> str:
    """An address or `@domain`, lower case; Refused when it is neither."""
    v = value.strip().lower().strip("<>").rstrip(".")
    local, at, domain = v.rpartition("@")
    if not at:
        local, domain = "", v
    if not domain or "." not in domain or any(c.isspace() for c in v) or "@" in local:
        raise Refused(f"adresse ou domaine invalide : {value!r}")
    return f"{local}@{domain}"


class SenderLists:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._cache: tuple[float, list[Entry]] = (-1.0, [])

    def entries(self) -> list[Entry]:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return []
        if self._cache[0] != mtime:
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                entries = [Entry(**e) for e in data.get("entries", [])]
            except (ValueError, TypeError, OSError):
                return self._cache[1]  # a half-written or broken file: keep the last good list
            self._cache = (mtime, entries)
        return self._cache[1]

    def match(self, address: str) -> Entry | None:
        """The entry for this sender: an address entry before a domain one; block before allow."""
        addr = address.strip().lower()
        domain = addr.rpartition("@")[2]
        found = [e for e in self.entries() if e.value in (addr, f"@{domain}")]
        found.sort(key=lambda e: (e.value.startswith("@"), e.kind != "block"))
        return found[0] if found else None

    def add(self, kind: str, value: str, *, by: str, note: str = "") -> Entry:
        if kind not in KINDS:
            raise ValueError(kind)
        entry = Entry(kind=kind, value=normalise(value), added_by=by, added_at=time.time(),
                      note=note)
        kept = [e for e in self.entries() if e.value != entry.value]
        self._write([*kept, entry])
        return entry

    def remove(self, value: str) -> bool:
        v = normalise(value)
        entries = self.entries()
        kept = [e for e in entries if e.value != v]
        if len(kept) == len(entries):
            return False
        self._write(kept)
        return True

    def _write(self, entries: list[Entry]) -> None:
        data = json.dumps({"entries": [asdict(e) for e in entries]}, indent=1).encode()
        write_private(self.path, data)
        self._cache = (-1.0, [])
