"""Quarantine key and the AEAD record format.

Record: version (1 byte) | key_id (8 bytes) | nonce (12 bytes) | AES-256-GCM ciphertext+tag.
The associated data is `purpose | record_id | key_id`, so a file cannot pose as another record,
nor index metadata as a message.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION = 1
_HEADER = 1 + 8 + 12


class KeyFileError(Exception):
    """The key file is missing, unreadable, of the wrong mode or size."""


class RecordError(Exception):
    """A record failed authentication or has an unknown format or key."""


class Sealer:
    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise KeyFileError("quarantine key must be 32 bytes")
        self._aead = AESGCM(key)
        self.key_id = hashlib.sha256(b"gateway-quarantine-key-id" + key).digest()[:8]
        self._index_key = hmac.new(key, b"gateway-search-index", hashlib.sha256).digest()

    def token(self, word: str) -> str:
        """A keyed token of a word (a blind index): the index can find the records with a
        word without holding the word; only the key's holder can compute a word's token."""
        return hmac.new(self._index_key, word.encode("utf-8", "surrogatepass"),
                        hashlib.sha256).hexdigest()[:12]

    def seal(self, plaintext: bytes, *, record_id: str, purpose: bytes) -> bytes:
        nonce = secrets.token_bytes(12)
        head = bytes([VERSION]) + self.key_id + nonce
        return head + self._aead.encrypt(nonce, plaintext, self._aad(record_id, purpose))

    def open(self, blob: bytes, *, record_id: str, purpose: bytes) -> bytes:
        if len(blob) < _HEADER + 16 or blob[0] != VERSION:
            raise RecordError(f"record {record_id}: unknown format")
        if blob[1:9] != self.key_id:
            raise RecordError(f"record {record_id}: sealed with another key ({blob[1:9].hex()})")
        nonce = blob[9:_HEADER]
        try:
            return self._aead.decrypt(nonce, blob[_HEADER:], self._aad(record_id, purpose))
        except InvalidTag:
            raise RecordError(f"record {record_id}: authentication failed (altered?)") from None

    def _aad(self, record_id: str, purpose: bytes) -> bytes:
        return purpose + b"|" + record_id.encode() + b"|" + self.key_id


def load_or_create_key(path: Path) -> bytes:
    """Read the 32-byte key; create it (mode 0600, never overwritten) when absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        try:
            os.write(fd, secrets.token_bytes(32).hex().encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
    mode = path.stat().st_mode & 0o777
    if mode != 0o600:
        raise KeyFileError(f"key file {path} has mode {mode:04o}; expected 0600 (chmod 600 {path})")
    text = path.read_text(encoding="ascii", errors="replace").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise KeyFileError(f"key file {path} does not hold a 64-hex-digit key")
    return key
