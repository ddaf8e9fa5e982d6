"""What the message page shows of a quarantined message, built without running or loading
anything from it. Blocking work (parsing, libmagic, hashing, sanitising): the worker pool.

* Text first: the first text/plain part, decoded, shown as text (escaped by the template).
* HTML only sanitised with nh3 (the Ammonia sanitiser): no script, style, event handler,
  form or frame survives; image sources and link targets are removed (nothing remote can
  load, nothing can be clicked through). The result is served on its own URL with a CSP that
  forbids every fetch and script, inside a sandboxed frame.
* NIRs and patients' MSSanté addresses are masked unless asked otherwise (audited).
"""

from __future__ import annotations

import email.header
import hashlib
from dataclasses import dataclass

import nh3

from gateway.attachments import true_type
from gateway.health_data import mask_identifiers
from gateway.message import decode_transfer, parse_message

MAX_TEXT = 200_000
_TAGS = set(nh3.ALLOWED_TAGS) - {"img", "a"} | {"span", "div", "font", "center"}


@dataclass(frozen=True, slots=True, kw_only=True)
class Attachment:
    name: str
    declared: str
    true_type: str
    size: int
    sha256: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Preview:
    headers: tuple[tuple[str, str], ...]
    text: str | None
    html: str | None  # sanitised fragment
    attachments: tuple[Attachment, ...]
    defects: tuple[str, ...]


def decode_header(value: str) -> str:
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except (ValueError, LookupError, UnicodeError):
        return value


def sanitise(html: str) -> str:
    return nh3.clean(html, tags=_TAGS, clean_content_tags={"script", "style", "title"},
                     attributes={"*": {"title", "align", "colspan", "rowspan"}},
                     url_schemes=set(), strip_comments=True, link_rel=None)


def build(raw: bytes, *, show_identifiers: bool = False) -> Preview:
    msg = parse_message(raw)
    keep = (lambda t: t) if show_identifiers else mask_identifiers
    text = html = None
    attachments: list[Attachment] = []
    for part in msg.parts:
        if part.is_multipart:
            continue
        is_attachment = bool(part.filename) or part.disposition == "attachment"
        if not is_attachment and part.content_type == "text/plain" and text is None:
            text = keep((part.text(raw) or "")[:MAX_TEXT])
        elif not is_attachment and part.content_type == "text/html" and html is None:
            html = keep(sanitise((part.text(raw) or "")[:MAX_TEXT * 5]))
        elif is_attachment or not part.content_type.startswith(("text/", "message/")):
            data = decode_transfer(part.payload(raw), part.transfer_encoding) or b""
            attachments.append(Attachment(
                name=decode_header(part.filename or "(sans nom)"), declared=part.content_type,
                true_type=true_type(data), size=len(data),
                sha256=hashlib.sha256(data).hexdigest()))
    headers = tuple((name, keep(decode_header(value))) for name, value in msg.headers)
    return Preview(headers=headers, text=text, html=html, attachments=tuple(attachments),
                   defects=tuple(msg.defects))


def document(fragment: str) -> str:
    """The sanitised fragment as the frame's whole page."""
    return ('<!doctype html><html><head><meta charset="utf-8"></head>'
            '<body style="font-family:sans-serif;margin:8px">' + fragment + "</body></html>")
