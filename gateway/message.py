"""Inbound (envelope facts) and ParsedMessage (parsed once, read-only).

`parse_message` is CPU work: the pipeline runs it in the worker pool, never on the event loop.
It never raises on hostile input: what the parser could not make sense of is recorded in
`ParsedMessage.defects` / `header_problems`, and the structural check turns those into symbols.
"""

from __future__ import annotations

import binascii
import codecs
import contextlib
import email.errors
import email.header
import email.utils
import enum
import inspect
import re
import time
from dataclasses import dataclass, field

from gateway.mime import Node, parse_tree

# Limits that keep a hostile message from costing unbounded work.
MAX_PARTS = 1000
MAX_DEPTH = 20


class Direction(enum.Enum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"


@dataclass(frozen=True, slots=True, kw_only=True)
class Inbound:
    """One message as received: envelope facts and the raw bytes (CRLF line ends)."""

    queue_id: str
    peer_ip: str
    helo: str
    mail_from: str
    rcpts: tuple[str, ...]
    raw: bytes
    received_at: float = field(default_factory=time.time)
    tls: bool = False  # the client's session was encrypted
    direction: Direction = Direction.INBOUND
    auth_user: str = ""  # submission: the SMTP AUTH login
    next_hop_tls: bool = True  # the leg to the next hop (smarthost) is encrypted


@dataclass(frozen=True, slots=True, kw_only=True)
class Part:
    """One leaf or container of the MIME tree (payload stays in the raw message)."""

    path: str  # "1.2.1", as IMAP numbers parts
    content_type: str
    filename: str | None
    disposition: str | None
    charset: str | None
    transfer_encoding: str | None
    depth: int
    is_multipart: bool
    start: int  # where the part's header block starts in the raw message
    body_start: int  # where its payload starts (after the blank line)
    spans: tuple[tuple[int, int], ...]  # byte ranges of the payload in the raw message
    size: int  # payload bytes, still transfer-encoded
    smime_type: str | None = None  # application/pkcs7-mime: enveloped-data, signed-data...

    @property
    def is_body(self) -> bool:
        """A text the mail client shows as the message itself (not a file)."""
        return (self.content_type in ("text/plain", "text/html") and not self.filename
                and self.disposition != "attachment")

    def payload(self, raw: bytes) -> bytes:
        """The payload as sent (transfer-encoded), from the message it was parsed from."""
        return b"".join(raw[a:b] for a, b in self.spans)

    def text(self, raw: bytes) -> str | None:
        """The decoded text of a text part (None when its encoding or charset is unknown)."""
        data = decode_transfer(self.payload(raw), self.transfer_encoding)
        codec = text_codec(self.charset or "us-ascii")
        if data is None or codec is None:
            return None
        return data.decode(codec, "replace")


@dataclass(frozen=True, slots=True, kw_only=True)
class ParsedMessage:
    """Read-only facts about one message. Checks never re-parse the raw bytes."""

    headers: tuple[tuple[str, str], ...]  # (name, raw unfolded value), in order
    from_addresses: tuple[str, ...]  # addr-specs found in From
    from_display: str  # decoded display name of the first From
    subject: str  # decoded
    parts: tuple[Part, ...]
    defects: tuple[str, ...]  # parser defect class names, with the part path
    header_problems: tuple[str, ...]  # headers whose encoded words or syntax could not be read
    parts_truncated: bool  # MAX_PARTS or MAX_DEPTH reached: the rest was not walked
    smuggling_dot: bool  # a "." line delimited by a bare LF (see has_smuggling_dot)

    def header_count(self, name: str) -> int:
        lname = name.lower()
        return sum(1 for n, _ in self.headers if n.lower() == lname)

    @property
    def from_domain(self) -> str:
        """The domain of the first From address, lower case ("" without one)."""
        if not self.from_addresses or "@" not in self.from_addresses[0]:
            return ""
        return self.from_addresses[0].rpartition("@")[2].lower().rstrip(".>")

    @property
    def has_files(self) -> bool:
        """Leaf parts other than the bodies: attachments, inline files, unknown types."""
        return any(not p.is_multipart and not p.is_body for p in self.parts)

    def header(self, name: str) -> str | None:
        lname = name.lower()
        for n, v in self.headers:
            if n.lower() == lname:
                return v
        return None

    def reply_to(self) -> list[str]:
        """The addresses of the (first) Reply-To field, lower case, in order, once each."""
        value = self.header("Reply-To")
        if not value:
            return []
        with contextlib.suppress(ValueError, LookupError):
            value = decode_words(value)
        try:
            pairs = header_addresses(value[:MAX_REPLY_TO])
        except Exception:  # noqa: BLE001 - the stdlib address parser has raised on odd input
            return []
        return list(dict.fromkeys(a.lower() for _, a in pairs if "@" in a))


_LENIENT = ({"strict": False} if "strict" in inspect.signature(email.utils.getaddresses).parameters
            else {})


def header_addresses(value: str) -> list[tuple[str, str]]:
    """(display name, address) pairs of an address field, the same on every Python 3.11.
    Newer releases (and Debian 12's 3.11.2, patched) give nothing at all for a field whose
    addresses they find ambiguous, where the older parser gives what it read: the checks
    want what it read (two addresses, a domain literal, a stray comma) and judge it
    themselves (FROM_MULTIPLE, FROM_DOMAIN_INVALID...). May raise on odd input."""
    return email.utils.getaddresses([value], **_LENIENT)


# The stdlib joins encoded words in quadratic time (a 4 MB Subject of 200,000 words took 38 s):
# only this much of a field is decoded; no legitimate field comes near it.
MAX_DECODED_CHARS = 16384
MAX_REPLY_TO = 2000  # characters of Reply-To read for addresses (the parser is slow on junk)


def readable(text: str) -> str:
    """Header text as the reader's program shows it: raw UTF-8 (RFC 6532) that the parser
    left as escaped bytes is read as UTF-8."""
    if text.isascii() or not any("\udc80" <= c <= "\udcff" for c in text):
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")


def decode_words(value: str) -> str:
    """Decode RFC 2047 encoded words (of the first MAX_DECODED_CHARS characters); raises
    ValueError/LookupError on broken ones."""
    if len(value) > MAX_DECODED_CHARS:
        value = value[:MAX_DECODED_CHARS].rsplit(" ", 1)[0]
    if not value.isascii():
        # Raw UTF-8 (RFC 6532), maybe beside encoded words: the stdlib decoder would escape
        # the raw bytes, so only the encoded words go through it.
        return _ENCODED_WORD.sub(lambda m: decode_words(m.group(0)), readable(value))
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except email.errors.HeaderParseError as exc:  # bad base64 in a word: also a ValueError
        raise ValueError(f"undecodable encoded word: {exc}") from None


def has_smuggling_dot(raw: bytes) -> bool:
    """True when a '.' line is delimited by at least one bare LF (not CRLF on both sides):
    the shape of SMTP smuggling (CVE-2023-51764 and kin). It did not end DATA here, but other
    servers may split on it."""
    start = 0
    while True:
        i = raw.find(b"\n.", start)
        if i < 0:
            return False
        start = i + 1
        before_crlf = i > 0 and raw[i - 1:i] == b"\r"
        after = raw[i + 2:i + 4]
        if (after[:1] == b"\n" or after == b"\r\n") and not (before_crlf and after == b"\r\n"):
            return True


def decode_transfer(payload: bytes, cte: str | None) -> bytes | None:
    """A part's bytes without transfer encoding; None for an encoding we do not handle."""
    cte = (cte or "7bit").lower()
    if cte in ("7bit", "8bit", "binary"):
        return payload
    if cte == "base64":
        try:
            return binascii.a2b_base64(payload)
        except binascii.Error:
            pass
        try:  # its padding left out: mail readers decode it all the same, so do we
            return binascii.a2b_base64(payload + b"===")
        except binascii.Error:
            return None
    if cte == "quoted-printable":
        return binascii.a2b_qp(payload)
    return None


# Every ASCII byte, then the escape sequence ISO-2022 codecs shift state with.
_ASCII = bytes(range(128)) + b"\x1b$Bab\x1b(B"


def text_codec(charset: str) -> str | None:
    """Python codec for a MIME charset, if every ASCII byte means itself in it (so it can be
    read and edited safely): not UTF-7, HZ or ISO-2022, whose "+", "~" and escape sequences
    shift into other characters, nor UTF-16/32. None for an unknown or malformed charset."""
    try:
        name = codecs.lookup(charset).name
        ok = _ASCII.decode(name, "replace") == _ASCII.decode("ascii")
    except (LookupError, ValueError, UnicodeError):  # ValueError: a NUL in the name
        return None
    return name if ok else None


def header_section_end(raw: bytes) -> int:
    """Offset of the body (after the blank line), or -1 when there is no blank line."""
    if raw.startswith(b"\r\n"):
        return 2
    idx = raw.find(b"\r\n\r\n")
    if idx >= 0:
        return idx + 4
    idx = raw.find(b"\n\n")
    return idx + 2 if idx >= 0 else -1


def parse_message(raw: bytes) -> ParsedMessage:
    """Parse once, robustly. Never raises for malformed input."""
    root, truncated = parse_tree(raw, max_parts=MAX_PARTS, max_depth=MAX_DEPTH)
    msg = root.headers
    problems: list[str] = []
    headers = tuple((str(k), _unfold(v)) for k, v in msg.raw_items())

    addrs: list[str] = []
    display = ""
    from_values = [v for k, v in headers if k.lower() == "from"]
    for value in from_values:
        try:
            pairs = header_addresses(value)
        except Exception:  # noqa: BLE001 - the stdlib address parser has raised on odd input
            problems.append("From")
            continue
        for name, addr in pairs:
            if addr and "@" in addr:
                addrs.append(addr)
                if not display and name:
                    display = _safe_decode(name, "From", problems)
    # The raw value: the stdlib's own accessor turns raw UTF-8 (RFC 6532) into U+FFFD.
    subject_raw = next((v for k, v in headers if k.lower() == "subject"), "")
    subject = _safe_decode(subject_raw, "Subject", problems) if subject_raw else ""
    for field_name in ("To", "Cc", "Reply-To"):
        field_value = msg.get(field_name)
        if field_value is not None:
            _safe_decode(str(field_value), field_name, problems)

    parts: list[Part] = []
    defects: list[str] = []
    _collect(root, "1", parts, defects)
    return ParsedMessage(
        headers=headers,
        from_addresses=tuple(addrs),
        from_display=display,
        subject=subject,
        parts=tuple(parts),
        defects=tuple(defects),
        header_problems=tuple(dict.fromkeys(problems)),
        parts_truncated=truncated,
        smuggling_dot=has_smuggling_dot(raw),
    )


def _unfold(value: object) -> str:
    text = str(value) if not isinstance(value, email.header.Header) else value.encode()
    return " ".join(text.replace("\r", "").split("\n")).strip()


def _safe_decode(value: str, name: str, problems: list[str]) -> str:
    try:
        return decode_words(value)
    except Exception:  # noqa: BLE001 - unknown charsets, broken base64 in encoded words
        problems.append(name)
        return readable(value)


def _collect(node: Node, path: str, out: list[Part], defects: list[str]) -> None:
    """Flatten the tree depth-first, numbering parts as IMAP does ("1", "1.2", ...)."""
    headers = node.headers
    defects.extend(f"{path}:{d}" for d in node.defects)
    try:
        filename = headers.get_filename()
    except Exception:  # noqa: BLE001 - RFC 2231 parameters the stdlib cannot decode
        filename = None
        defects.append(f"{path}:BadFilename")
    try:
        charset = headers.get_content_charset()
    except Exception:  # noqa: BLE001
        charset = None
    cte = headers.get("Content-Transfer-Encoding")
    smime = headers.get_param("smime-type") if "pkcs7" in headers.get_content_type() else None
    out.append(Part(
        path=path,
        content_type=headers.get_content_type(),
        filename=filename,
        disposition=headers.get_content_disposition(),
        charset=charset,
        transfer_encoding=str(cte).strip().lower() if cte is not None else None,
        depth=node.depth,
        is_multipart=node.is_multipart,
        start=node.start,
        body_start=node.body_start,
        spans=node.spans,
        size=node.size,
        smime_type=str(smime).lower() if isinstance(smime, str) else None,
    ))
    for i, child in enumerate(node.children, 1):
        _collect(child, f"{path}.{i}", out, defects)
