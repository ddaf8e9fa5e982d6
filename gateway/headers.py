"""Edits of raw header blocks that leave every other byte of the message identical.

The message is never re-serialised by the `email` package: that would change bytes that DKIM
signed. Whole header fields are removed, replaced or added; nothing else moves.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.message import header_section_end

# Headers we set: copies arriving from outside are forged and removed.
OWN_PREFIX = b"x-gateway-"


def fields(block: bytes) -> list[bytes]:
    """Split a header block into fields (each with its continuation lines and line ends);
    a trailing blank line, if any, is the last element."""
    out: list[list[bytes]] = []  # lines of each field, joined once (linear in the block)
    for line in block.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and out and (len(out[-1]) > 1 or out[-1][0].strip()):
            out[-1].append(line)
        else:
            out.append([line])
    return [b"".join(lines) for lines in out]


def field_name(field: bytes) -> bytes:
    return field.split(b":", 1)[0].strip().lower() if b":" in field else b""


def remove_fields(block: bytes, drop: Callable[[bytes], bool]) -> bytes:
    """The block without the fields whose lower-case name `drop` accepts."""
    return b"".join(f for f in fields(block) if not drop(field_name(f)))


def set_field(block: bytes, name: str, value: str) -> bytes:
    """Replace every `name` field by one with `value`, placed before the blank line (which
    is added when the block had none, so that the body cannot be read as headers)."""
    lname = name.lower().encode()
    kept = [f for f in fields(block) if field_name(f) != lname]
    blank = kept.pop() if kept and not kept[-1].strip() else b"\r\n"
    if kept and not kept[-1].endswith((b"\n", b"\r")):
        kept[-1] += b"\r\n"
    return b"".join(kept) + fold(name, value) + blank


def strip_own_headers(raw: bytes, authserv_id: str) -> bytes:
    """Remove the header fields only we may write, forged when they arrive from outside:
    X-Gateway-*, and Authentication-Results claiming our authserv-id (RFC 8601 5)."""
    end = header_section_end(raw)
    head = raw if end < 0 else raw[:end]
    lower = head.lower()
    ours = authserv_id.lower().encode()
    if OWN_PREFIX not in lower and not (b"authentication-results" in lower and ours in lower):
        return raw
    forged = [f for f in fields(head) if field_name(f) == b"authentication-results"
              and f.split(b":", 1)[1].split(b";", 1)[0].strip().lower() == ours]
    kept = [f for f in fields(head) if not field_name(f).startswith(OWN_PREFIX)
            and f not in forged]
    return b"".join(kept) + (b"" if end < 0 else raw[end:])


def fold(name: str, value: str, *, width: int = 78) -> bytes:
    """One header field, folded at spaces to stay under `width` where possible, CRLF ended."""
    lines: list[str] = []
    current = f"{name}:"
    # No value may end the field early: control characters (CR and LF above all) become spaces.
    value = "".join(" " if c < " " or c == "\x7f" else c for c in value)
    for word in value.split(" "):
        if not word:
            continue
        if len(current) + 1 + len(word) > width and current != f"{name}:":
            lines.append(current)
            current = "\t" + word
        else:
            current = f"{current} {word}"
    lines.append(current)
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")


def encode_fields(pairs: list[tuple[str, str]]) -> bytes:
    return b"".join(fold(n, v) for n, v in pairs)
