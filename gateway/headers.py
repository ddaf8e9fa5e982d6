"""Edits of the raw header section that keep the body byte-identical.

The message is never re-serialised by the `email` package: that would change bytes that DKIM
signed. Only whole header fields are removed, and new ones are prepended.
"""

from __future__ import annotations

from gateway.message import header_section_end

# Headers we set: copies arriving from outside are forged and removed.
OWN_PREFIX = b"x-gateway-"


def strip_own_headers(raw: bytes) -> bytes:
    """Remove every header field named X-Gateway-* (with its continuation lines)."""
    end = header_section_end(raw)
    head = raw if end < 0 else raw[:end]
    if OWN_PREFIX not in head.lower():
        return raw
    out: list[bytes] = []
    dropping = False
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                out.append(line)
            continue
        dropping = line.lower().startswith(OWN_PREFIX)
        if not dropping:
            out.append(line)
    return b"".join(out) + (b"" if end < 0 else raw[end:])


def fold(name: str, value: str, *, width: int = 78) -> bytes:
    """One header field, folded at spaces to stay under `width` where possible, CRLF ended."""
    words = value.split(" ")
    lines: list[str] = []
    current = f"{name}:"
    for word in words:
        if not word:
            continue
        if len(current) + 1 + len(word) > width and current.strip() and current != f"{name}:":
            lines.append(current)
            current = "\t" + word
        else:
            current = f"{current} {word}"
    lines.append(current)
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")


def encode_fields(fields: list[tuple[str, str]]) -> bytes:
    return b"".join(fold(n, v) for n, v in fields)
