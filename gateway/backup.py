"""`gateway backup` and `gateway restore`: a consistent copy of the data folder, and its
return into an empty one, checked.

What a backup holds (a folder, mode 0700, files 0600): the SQLite databases copied with
SQLite's online backup (the quarantine index, the correspondents, the login state:
consistent while the gateway runs), the sealed quarantine files, the account files, the
embedded Maildir and outbox if any, and MANIFEST.json (each file's SHA-256, the number of
items, and the key's fingerprint, an HMAC that does not reveal it).

Never the quarantine key: it goes to a file of its own (`--cle`), and should live on another
medium than the data. Whoever has both reads every held message; whoever loses the key has
a backup that nobody can read. A sealed file the backup copied but the index no longer
knows (held during the copy) is re-indexed at the first open; an item whose file vanished
during the copy (deleted, purged) is marked deleted in the copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from gateway.config import Config
from quarantine.crypto import load_or_create_key
from quarantine.files import fsync_dir, write_private

FORMAT = 1
MANIFEST = "MANIFEST.json"
KEY_FILE_NAME = "quarantine.key"
# (name under data_dir, what it is): SQLite databases, copied with the online backup API.
DATABASES = ("quarantine/index.sqlite3", "correspondents.sqlite3", "auth-state.sqlite3")
# Plain files and folders, copied as they are (the accounts files are replaced atomically).
FILES = ("web-users.json", "submission-users.json")
FOLDERS = ("maildir", "outbox")
SEALED = "quarantine/msgs"


class BackupError(Exception):
    """Said to the admin (French), with nothing written or put back."""


@dataclass(frozen=True, slots=True)
class Summary:
    items: int  # quarantine items in the index (any state)
    files: int  # files written or put back
    key_written: Path | None


def key_fingerprint(key: bytes) -> str:
    return hmac.new(key, b"gateway backup key fingerprint", hashlib.sha256).hexdigest()[:32]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _empty_dir(path: Path, what: str) -> None:
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise BackupError(f"{what} {path} n'est pas un dossier")
    if path.exists() and any(path.iterdir()):
        raise BackupError(f"{what} {path} n'est pas vide : choisissez un dossier vide ou absent")
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)


def _copy_private(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with src.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _sqlite_copy(src: Path, dst: Path) -> None:
    """SQLite's online backup: a consistent copy while other processes write."""
    dst.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.close(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    source = sqlite3.connect(f"file:{src}?mode=ro", uri=True, timeout=30)
    target = sqlite3.connect(dst)
    try:
        source.backup(target)
        target.execute("PRAGMA journal_mode=DELETE")  # one file, no -wal beside it
    finally:
        target.close()
        source.close()
    with open(dst, "rb") as f:
        os.fsync(f.fileno())


def backup(cfg: Config, target: Path, key_target: Path | None) -> Summary:
    data = cfg.data_dir
    index = data / DATABASES[0]
    if not index.is_file():
        raise BackupError(f"aucune quarantaine dans {data} (index {index} absent)")
    key = load_or_create_key(cfg.key_file) if cfg.key_file.is_file() else None
    if key is None:
        raise BackupError(f"clé de quarantaine introuvable : {cfg.key_file}")
    if key_target is not None and key_target.exists():
        raise BackupError(f"{key_target} existe déjà : la clé n'est jamais écrite par-dessus")
    _empty_dir(target, "dossier de sauvegarde")
    written: list[Path] = []
    # The databases first: a sealed file written after this copy is re-indexed at restore.
    for name in DATABASES:
        if (data / name).is_file():
            _sqlite_copy(data / name, target / name)
            written.append(target / name)
    copied: set[str] = set()
    sealed = data / SEALED
    for path in sorted(sealed.glob("*.qmsg")) if sealed.is_dir() else []:
        with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
            _copy_private(path, target / SEALED / path.name)
            copied.add(path.stem)
            written.append(target / SEALED / path.name)
    db = sqlite3.connect(target / DATABASES[0])
    try:
        with db:
            rows = db.execute("SELECT id FROM items WHERE state != 'deleted'").fetchall()
            gone = [r[0] for r in rows if r[0] not in copied]
            db.executemany("UPDATE items SET state = 'deleted' WHERE id = ?",
                           [(i,) for i in gone])
        items = int(db.execute("SELECT count(*) FROM items").fetchone()[0])
    finally:
        db.close()
    for name in FILES:
        if (data / name).is_file():
            _copy_private(data / name, target / name)
            written.append(target / name)
    for name in FOLDERS:
        for path in sorted((data / name).rglob("*")) if (data / name).is_dir() else []:
            if path.is_file() and not path.is_symlink():
                dst = target / path.relative_to(data)
                with contextlib.suppress(FileNotFoundError):
                    _copy_private(path, dst)
                    written.append(dst)
    manifest = {
        "format": FORMAT, "created": time.time(), "items": items,
        "key_fingerprint": key_fingerprint(key),
        "files": {str(p.relative_to(target)): _sha256(p) for p in written},
    }
    write_private(target / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode(),
                  sync_dir=True)
    for folder in {p.parent for p in written}:
        fsync_dir(folder)
    if key_target is not None:
        key_target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _copy_private(cfg.key_file, key_target)
    return Summary(items=items, files=len(written), key_written=key_target)


def same_medium(a: Path, b: Path) -> bool:
    """Whether two paths (or their nearest existing parents) are on one file system."""
    def device(p: Path) -> int:
        while not p.exists():
            p = p.parent
        return p.stat().st_dev
    return device(a.absolute()) == device(b.absolute())


def _read_manifest(source: Path) -> dict[str, object]:
    try:
        manifest = json.loads((source / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BackupError(f"{source} n'est pas une sauvegarde de la passerelle "
                          f"({MANIFEST} absent)") from None
    except (OSError, ValueError) as exc:
        raise BackupError(f"{MANIFEST} illisible : {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError(f"{MANIFEST} : format de sauvegarde inconnu")
    return manifest


def restore(cfg: Config, source: Path, key_source: Path | None) -> Summary:
    """Check the backup (every file's hash, the key's fingerprint), then put it into the
    data folder, which must be empty or absent; the key from `key_source` (or the one in
    place already). Nothing is put back when a check fails."""
    manifest = _read_manifest(source)
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BackupError(f"{MANIFEST} : liste des fichiers absente")
    for name, digest in files.items():
        path = source / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise BackupError(f"{MANIFEST} : chemin refusé : {name!r}")
        if not path.is_file():
            raise BackupError(f"fichier manquant dans la sauvegarde : {name}")
        if _sha256(path) != digest:
            raise BackupError(f"fichier altéré ou abîmé dans la sauvegarde : {name}")
    key_file = cfg.key_file
    if key_source is not None:
        if key_file.exists():
            raise BackupError(f"une clé existe déjà en {key_file} : elle n'est jamais remplacée")
        key = _read_key(key_source)
    elif key_file.is_file():
        key = load_or_create_key(key_file)
    else:
        raise BackupError(f"clé de quarantaine introuvable : donnez-la avec --cle (elle n'est "
                          f"pas dans la sauvegarde), ou placez-la en {key_file}")
    if key_fingerprint(key) != manifest.get("key_fingerprint"):
        raise BackupError("cette clé n'est pas celle de la sauvegarde : les messages "
                          "retenus seraient illisibles")
    data = cfg.data_dir
    _empty_dir(data, "dossier des données")
    if key_source is not None:
        key_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _copy_private(key_source, key_file)
    for name in files:
        _copy_private(source / name, data / name)
    for folder in {(data / name).parent for name in files}:
        fsync_dir(folder)
    return Summary(items=int(str(manifest.get("items", 0))), files=len(files),
                   key_written=key_file if key_source is not None else None)


def _read_key(path: Path) -> bytes:
    try:
        key = bytes.fromhex(path.read_text(encoding="ascii", errors="replace").strip())
    except (OSError, ValueError) as exc:
        raise BackupError(f"clé illisible : {path} ({exc})") from None
    if len(key) != 32:
        raise BackupError(f"{path} ne contient pas une clé de quarantaine (64 chiffres hexadécimaux)")
    return key


async def readable_items(cfg: Config) -> tuple[int, list[str]]:
    """Open the restored quarantine as the gateway would and read every item not deleted:
    (how many could be read, the ids of those that could not)."""
    from quarantine.crypto import RecordError
    from quarantine.store import Store

    store = await Store.open(cfg.data_dir / "quarantine", cfg.key_file)
    ok, bad = 0, []
    try:
        for state in ("quarantined", "refused", "releasing", "released"):
            offset = 0
            while True:
                items = await store.list_items(state=state, limit=500, offset=offset)
                for item in items:
                    try:
                        await store.get(item.id)
                        ok += 1
                    except (RecordError, OSError, ValueError):
                        bad.append(item.id)
                if len(items) < 500:
                    break
                offset += 500
    finally:
        await store.close()
    return ok, bad
