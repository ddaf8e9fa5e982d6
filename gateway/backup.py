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
import errno
import hashlib
import hmac
import json
import os
import re
import shutil
import sqlite3
import stat
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
    held: int = 0  # items not deleted: each must read back after a restore


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


def _copy_private(src: Path, dst: Path) -> str:
    """Copy `src`, a regular file opened without following a link, to a new file `dst`
    (0600, synced), hashing the bytes as they are written: their SHA-256."""
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "pas un fichier ordinaire", str(src))
        dst.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        h = hashlib.sha256()
        try:
            while chunk := os.read(fd, 1 << 20):
                h.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view):]
            os.fsync(out)
        finally:
            os.close(out)
        return h.hexdigest()
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
    old_umask = os.umask(0o077)  # every folder made, at every level: 0700
    try:
        return _backup(cfg, target, key_target)
    finally:
        os.umask(old_umask)


def _backup(cfg: Config, target: Path, key_target: Path | None) -> Summary:
    data = cfg.data_dir
    index = data / DATABASES[0]
    if not index.is_file():
        raise BackupError(f"aucune quarantaine dans {data} (index {index} absent)")
    key = load_or_create_key(cfg.key_file) if cfg.key_file.is_file() else None
    if key is None:
        raise BackupError(f"clé de quarantaine introuvable : {cfg.key_file}")
    if key_target is not None and os.path.lexists(key_target):
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
        held = int(db.execute("SELECT count(*) FROM items WHERE state != 'deleted'"
                              ).fetchone()[0])
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
    manifest: dict[str, object] = {
        "format": FORMAT, "created": time.time(), "items": items, "held": held,
        "key_fingerprint": key_fingerprint(key),
        "files": {str(p.relative_to(target)): _sha256(p) for p in written},
    }
    manifest["mac"] = _manifest_mac(key, manifest)
    write_private(target / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode(),
                  sync_dir=True)
    for folder in {p.parent for p in written}:
        fsync_dir(folder)
    if key_target is not None:
        key_target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _copy_private(cfg.key_file, key_target)
    return Summary(items=items, files=len(written), key_written=key_target, held=held)


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
    """Check the backup, then put it into the data folder, which must be empty or absent;
    the key from `key_source` (or the one in place already). The manifest must carry the
    key's fingerprint and a MAC under it (a backup altered and re-hashed by someone without
    the key is refused), name only what a backup holds, and every file must be a regular
    file (no link) with its hash, checked while it is copied. On any failure nothing stays
    in the data folder."""
    old_umask = os.umask(0o077)
    try:
        return _restore(cfg, source, key_source)
    finally:
        os.umask(old_umask)


def _restore(cfg: Config, source: Path, key_source: Path | None) -> Summary:
    manifest = _read_manifest(source)
    key_file = cfg.key_file
    if key_source is not None:
        if os.path.lexists(key_file):
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
    if not hmac.compare_digest(str(manifest.get("mac", "")), _manifest_mac(key, manifest)):
        raise BackupError(f"{MANIFEST} altéré : la sauvegarde a été modifiée après coup")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(n, str) and isinstance(d, str) for n, d in files.items()):
        raise BackupError(f"{MANIFEST} : liste des fichiers absente")
    for name in files:
        if not _EXPECTED.fullmatch(name) or ".." in Path(name).parts:
            raise BackupError(f"{MANIFEST} : nom refusé : {name!r}")
    data = cfg.data_dir
    _empty_dir(data, "dossier des données")
    try:
        for name, digest in files.items():
            if _copy_checked(source / name, data / name) != digest:
                raise BackupError(f"fichier altéré ou abîmé dans la sauvegarde : {name}")
        if key_source is not None:
            _copy_private(key_source, key_file)
    except BaseException:
        for child in data.iterdir():  # it was empty: nothing of a refused backup stays
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        raise
    for folder in {(data / name).parent for name in files}:
        fsync_dir(folder)
    return Summary(items=int(str(manifest.get("items", 0))), files=len(files),
                   key_written=key_file if key_source is not None else None,
                   held=int(str(manifest.get("held", 0))))


# What a backup may name: anything else in a manifest is refused (planted files).
_EXPECTED = re.compile(r"(quarantine/index\.sqlite3|correspondents\.sqlite3|auth-state\.sqlite3"
                       r"|web-users\.json|submission-users\.json"
                       r"|quarantine/msgs/[A-Za-z0-9_-]{1,100}\.qmsg"
                       r"|(maildir|outbox)/[^/\x00]{1,255}(/[^/\x00]{1,255}){0,6})")


def _copy_checked(src: Path, dst: Path) -> str:
    """_copy_private for a file of a backup: a link or an unreadable file is said."""
    try:
        return _copy_private(src, dst)
    except OSError as exc:  # ELOOP: a link; EINVAL: not a regular file
        raise BackupError(f"fichier illisible dans la sauvegarde : {src.name} "
                          f"({exc.strerror or exc})") from None


def _manifest_mac(key: bytes, manifest: dict[str, object]) -> str:
    body = json.dumps({k: v for k, v in manifest.items() if k != "mac"}, sort_keys=True,
                      separators=(",", ":")).encode()
    mac_key = hmac.new(key, b"gateway backup manifest", hashlib.sha256).digest()
    return hmac.new(mac_key, body, hashlib.sha256).hexdigest()


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
