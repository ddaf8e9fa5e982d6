"""Accounts: submission users (SMTP AUTH) and the web page's users, each kind in its own file.

A file is JSON, created with mode 0600 and replaced atomically (temporary file, fsync, rename).
Passwords are hashed with argon2id (argon2-cffi, its defaults: RFC 9106's low-memory profile).
The file holds hashes and second-factor secrets: it never goes into logs, pages or the repo.
Hashing and verifying cost tens of milliseconds and 64 MiB: callers on the event loop use
`verify_async`, which runs one at a time per process in a thread, and remembers a success for
five minutes (as Dovecot's auth cache does: mail clients log in for every message they send),
keyed by a salted digest of the account's hash and the password, so that a password change
ends it and nothing reusable is kept.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from gateway.errors import ConfigError, Refused
from quarantine.files import write_private

_HASHER = PasswordHasher()
# Verified against when the name is unknown, so that unknown and known names cost the same.
_DUMMY = _HASHER.hash("unknown user")
MIN_PASSWORD = 10
RECENT_S = 300.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Account:
    name: str
    password_hash: str
    role: str = ""  # web page: "admin" or "lecteur"
    totp_secret: str = ""  # web page: base32 TOTP secret
    created_at: float = 0.0
    # submission: the sender addresses this login may use ("@domain": any of that domain);
    # empty: the login itself (Postfix's smtpd_sender_login_maps, reject_sender_login_mismatch)
    addresses: tuple[str, ...] = ()

    @property
    def stamp(self) -> str:
        """A digest of what the account logs in with: a web session made with another stamp
        (password, second factor or role changed since) has ended."""
        text = f"{self.password_hash}\0{self.totp_secret}\0{self.role}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def may_send_as(self, address: str) -> bool:
        addr = address.strip().lower()
        return any(addr == a or (a.startswith("@") and addr.endswith(a) and len(addr) > len(a))
                   for a in (self.addresses or (self.name,)))


def normalise(name: str) -> str:
    return name.strip().lower()


class AccountFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._cache: tuple[float, dict[str, Account]] | None = None
        self._lock = asyncio.Lock()
        self._salt = secrets.token_bytes(16)
        self._recent: dict[bytes, float] = {}  # digest -> monotonic expiry

    def load(self) -> dict[str, Account]:
        """The accounts, re-read when the file changed (users added while serving)."""
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return {}
        if self._cache is not None and self._cache[0] == mtime:
            return self._cache[1]
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            accounts = {normalise(a["name"]): Account(**{**a, "addresses": tuple(
                a.get("addresses", ()))}) for a in data.get("accounts", [])}
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"{self.path}: unreadable accounts file: {exc}") from None
        self._cache = (mtime, accounts)
        return accounts

    def _write(self, accounts: dict[str, Account]) -> None:
        body = json.dumps({"accounts": [asdict(a) for a in accounts.values()]}, indent=1)
        write_private(self.path, body.encode())
        self._cache = None

    def add(self, name: str, password: str, *, role: str = "", totp_secret: str = "",
            addresses: tuple[str, ...] = ()) -> Account:
        key = normalise(name)
        if not key or any(c.isspace() for c in key):
            raise Refused("nom d'utilisateur vide ou contenant des espaces")
        if len(password) < MIN_PASSWORD:
            raise Refused(f"mot de passe trop court ({MIN_PASSWORD} caractères au moins)")
        accounts = dict(self.load())
        if key in accounts:
            raise Refused(f"l'utilisateur {key} existe déjà")
        account = Account(name=key, password_hash=_HASHER.hash(password), role=role,
                          totp_secret=totp_secret, created_at=time.time(),
                          addresses=_addresses(addresses))
        accounts[key] = account
        self._write(accounts)
        return account

    def set_password(self, name: str, password: str) -> None:
        if len(password) < MIN_PASSWORD:
            raise Refused(f"mot de passe trop court ({MIN_PASSWORD} caractères au moins)")
        accounts = dict(self.load())
        key = normalise(name)
        if key not in accounts:
            raise KeyError(key)
        accounts[key] = replace(accounts[key], password_hash=_HASHER.hash(password))
        self._write(accounts)

    def set_totp(self, name: str, secret: str) -> None:
        """A new second-factor secret (a lost phone): the old codes stop working."""
        accounts = dict(self.load())
        key = normalise(name)
        if key not in accounts:
            raise KeyError(key)
        accounts[key] = replace(accounts[key], totp_secret=secret)
        self._write(accounts)

    def set_addresses(self, name: str, addresses: tuple[str, ...]) -> Account:
        """The sender addresses a submission login may use (empty: the login itself)."""
        accounts = dict(self.load())
        key = normalise(name)
        if key not in accounts:
            raise KeyError(key)
        accounts[key] = replace(accounts[key], addresses=_addresses(addresses))
        self._write(accounts)
        return accounts[key]

    def remove(self, name: str) -> None:
        accounts = dict(self.load())
        if accounts.pop(normalise(name), None) is None:
            raise KeyError(normalise(name))
        self._write(accounts)

    def verify(self, name: str, password: str) -> Account | None:
        """The account when the password is right (blocking: argon2)."""
        account = self.load().get(normalise(name))
        try:
            _HASHER.verify(account.password_hash if account else _DUMMY, password)
        except (VerificationError, InvalidHashError):
            return None
        return account

    async def verify_async(self, name: str, password: str) -> Account | None:
        known = self.load().get(normalise(name))
        digest = hashlib.sha256(self._salt + (known.password_hash if known else "").encode()
                                + b"\0" + password.encode("utf-8", "surrogatepass")).digest()
        now = time.monotonic()
        if known is not None and self._recent.get(digest, 0.0) > now:
            return known
        async with self._lock:
            account = await asyncio.to_thread(self.verify, name, password)
        if account is not None:
            if len(self._recent) > 1000:
                self._recent = {k: v for k, v in self._recent.items() if v > now}
            self._recent[digest] = now + RECENT_S
        return account


def _addresses(values: tuple[str, ...]) -> tuple[str, ...]:
    out = []
    for value in values:
        v = value.strip().lower()
        local, at, domain = v.rpartition("@")
        if not at or not domain or "." not in domain or any(c.isspace() for c in v):
            raise Refused(f"adresse invalide : {value!r} (adresse@domaine ou @domaine)")
        out.append(v)
    return tuple(dict.fromkeys(out))
