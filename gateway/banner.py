"""French warning banner and subject tag, MIME-aware, for suspect (or released) mail.

Only the readable body changes: the text/plain and text/html parts a mail client shows first
(both sides of a multipart/alternative, the root of a multipart/related, the first part of a
multipart/mixed), never attachments nor the parts of a forwarded message. A changed part is
decoded, given the banner at its top (HTML: right after <body>), re-encoded in its own charset
when the banner fits in it (else UTF-8) and in its own transfer encoding when that stays valid
(else quoted-printable). Every other byte of the message stays as it was.

Signed or encrypted mail (S/MIME, PGP, Apicrypt: see rules/banner.toml) keeps its body: it gets
the subject tag and an X-Gateway-Warning header only.

Idempotent: the banner carries a marker derived from the installation's secret, so a message that
already holds our banner (a release, a re-scan, a reply quoting it) gets no second one, while a
sender cannot forge a marker to keep our banner out. The subject tag is not doubled either.
"""

from __future__ import annotations

import base64
import email.header
import email.message
import email.quoprimime
import hashlib
import hmac
import html
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from gateway import headers
from gateway.config import read_toml
from gateway.errors import ConfigError
from gateway.message import (
    ParsedMessage,
    Part,
    decode_transfer,
    decode_words,
    header_section_end,
    text_codec,
)

_BODY_TAG = re.compile(r"<body\b[^>]*>", re.IGNORECASE)
_READABLE = ("text/plain", "text/html")


@dataclass(frozen=True, slots=True, kw_only=True)
class Colors:
    background: str
    border: str
    title: str
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Style:
    """One kind of banner: wording and colours (rules/banner.toml)."""

    subject_tag: str
    title: str
    intro: str
    advice: str
    footer: str
    colors: Colors


@dataclass(frozen=True, slots=True, kw_only=True)
class Templates:
    suspect: Style
    external: Style
    max_reasons: int
    released_note: str
    protected_types: frozenset[str]
    body_markers: tuple[str, ...]
    header_markers: frozenset[str]


@dataclass(frozen=True, slots=True, kw_only=True)
class Warning:
    """What to tell the reader."""

    style: Style
    reasons: tuple[str, ...]  # French sentences, most important first
    note: str = ""  # e.g. released from quarantine


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    raw: bytes  # the message with subject tag and banners
    body_changed: bool
    fields: tuple[tuple[str, str], ...]  # header fields to add beside our result headers


def marker(secret: bytes) -> str:
    """The installation's banner marker: recognisable by us, not forgeable by a sender."""
    return hmac.new(secret, b"gateway banner marker v1", hashlib.sha256).hexdigest()[:12]


def load_templates(path: Path) -> Templates:
    try:
        data = read_toml(path, "modèles de bandeau")
        s, e, p = data["suspect"], data["external"], data["protected"]

        def style(d: dict[str, object], intro: str = "", advice: str = "", footer: str = "") -> Style:
            c = d["colors"]
            assert isinstance(c, dict)
            return Style(subject_tag=str(d["subject_tag"]), title=str(d["title"]),
                         intro=str(d.get("intro", intro)), advice=str(d.get("advice", advice)),
                         footer=str(d.get("footer", footer)),
                         colors=Colors(**{k: str(c[k]) for k in ("background", "border",
                                                                  "title", "text")}))
        suspect = style(s)
        return Templates(
            suspect=suspect,
            external=style(e, advice=str(e.get("text", "")), footer=suspect.footer),
            max_reasons=int(s.get("max_reasons", 4)),
            released_note=str(s.get("released_note", "")),
            protected_types=frozenset(str(t).lower() for t in p["content_types"]),
            body_markers=tuple(str(m) for m in p.get("body_markers", ())),
            header_markers=frozenset(str(h).lower() for h in p.get("header_markers", ())),
        )
    except (KeyError, TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(f"{path}: invalid banner templates ({type(exc).__name__}: {exc})") from None


# ---- applying ------------------------------------------------------------------------------


def apply(raw: bytes, parsed: ParsedMessage, warning: Warning, tpl: Templates,
          mark: str) -> Result:
    """Subject tag, and the banner in every readable part (unless the body must not change,
    or the structure was not read whole: what looked like a body may be the rest of a
    header block, which a banner would corrupt)."""
    protected = parsed.parts_truncated or _is_protected(raw, parsed, tpl)
    edits: list[tuple[int, int, bytes]] = []
    if not protected:
        for part in readable_parts(parsed):
            edit = _rewrite_part(raw, part, warning, mark)
            if edit is not None:
                edits.append(edit)
    out = raw
    for start, end, replacement in sorted(edits, reverse=True):
        out = out[:start] + replacement + out[end:]
    out = tag_subject(out, warning.style.subject_tag)
    extra: tuple[tuple[str, str], ...] = ()
    if protected:
        text = warning.style.title + (" : " + " ; ".join(warning.reasons) if warning.reasons else "")
        extra = (("X-Gateway-Warning",
                  email.header.Header(text, "utf-8", header_name="X-Gateway-Warning").encode()),)
    return Result(raw=out, body_changed=bool(edits), fields=extra)


def readable_parts(parsed: ParsedMessage) -> list[Part]:
    """The parts a mail client shows as the body."""
    by_path = {p.path: p for p in parsed.parts}
    out: list[Part] = []

    def visit(path: str) -> None:
        part = by_path.get(path)
        if part is None or part.disposition == "attachment":
            return
        ctype = part.content_type
        if ctype in _READABLE and not part.is_multipart:
            out.append(part)
        elif ctype == "multipart/alternative" and part.is_multipart:
            i = 1
            while f"{path}.{i}" in by_path:
                visit(f"{path}.{i}")
                i += 1
        elif ctype.startswith("multipart/") and part.is_multipart:
            visit(f"{path}.1")  # mixed, related (its root), report: the first part

    visit("1")
    return out


def _is_protected(raw: bytes, parsed: ParsedMessage, tpl: Templates) -> bool:
    if any(p.content_type in tpl.protected_types for p in parsed.parts):
        return True
    if any(name.lower() in tpl.header_markers for name, _ in parsed.headers):
        return True
    if tpl.body_markers:
        for part in readable_parts(parsed):
            text = decode_transfer(part.payload(raw), part.transfer_encoding)
            head = (text or b"")[:4096].lstrip()
            if any(head.startswith(m.encode()) for m in tpl.body_markers):
                return True
    return False


def tag_subject(raw: bytes, tag: str) -> bytes:
    """Put `tag` in front of the first Subject (adding one if there is none), once."""
    end = header_section_end(raw)
    head_end = end if end >= 0 else len(raw)
    block = raw[:head_end]
    parts = headers.fields(block)
    for i, field in enumerate(parts):
        if headers.field_name(field) != b"subject":
            continue
        value = field.split(b":", 1)[1]
        try:
            current = decode_words(value.decode("ascii", "surrogateescape").strip())
        except (ValueError, LookupError):
            current = value.decode("ascii", "replace").strip()
        if current.startswith(tag):
            return raw
        colon = field.index(b":") + 1
        stripped = field[colon:].lstrip(b" \t")
        parts[i] = field[:colon] + b" " + _ascii_or_encoded(tag) + b" " + stripped
        return b"".join(parts) + raw[head_end:]
    # None: add one at the end of the header block (the top could demote a unix-from line).
    return headers.set_field(block, "Subject", tag) + raw[head_end:]


def _ascii_or_encoded(text: str) -> bytes:
    if text.isascii():
        return text.encode()
    return email.header.Header(text, "utf-8").encode().encode()


# ---- one part ------------------------------------------------------------------------------


def _rewrite_part(raw: bytes, part: Part, warning: Warning,
                  mark: str) -> tuple[int, int, bytes] | None:
    if len(part.spans) != 1:
        return None
    start, end = part.spans[0]
    decoded = decode_transfer(raw[start:end], part.transfer_encoding)
    charset = part.charset or "us-ascii"
    codec = text_codec(charset)
    if decoded is None or codec is None:
        return None
    text = decoded.decode(codec, "surrogateescape")
    if mark in text:
        return None  # already carries our banner
    eol = "\r\n" if "\r\n" in text or not text else "\n"
    # Text that did not decode cleanly in its charset cannot be moved to another one: then
    # the banner itself is written in what that charset can hold.
    clean = not any("\udc80" <= ch <= "\udcff" for ch in text)
    if part.content_type == "text/html":
        banner_html = html_banner(warning, mark, eol)
        m = _BODY_TAG.search(text)
        if m:
            new_text = text[:m.end()] + eol + banner_html + eol + text[m.end():]
        else:
            new_text = banner_html + eol + text
    else:
        banner_text = text_banner(warning, mark, eol)
        if not clean and not _fits(banner_text, codec):
            banner_text = _transliterate(banner_text, codec)
        new_text = banner_text + eol + text
    out_charset = charset
    try:
        body = new_text.encode(codec, "surrogateescape")
    except UnicodeEncodeError:
        body = new_text.encode("utf-8", "surrogateescape")
        out_charset = "utf-8"
    cte = (part.transfer_encoding or "7bit").lower()
    out_cte = _choose_cte(cte, body)
    payload = _encode(body, out_cte)
    block = raw[part.start:part.body_start]
    if out_charset != charset:
        block = headers.set_field(block, "Content-Type",
                                  _with_charset(block, part.content_type, out_charset))
    if out_cte != cte:
        block = headers.set_field(block, "Content-Transfer-Encoding", out_cte)
    return part.start, end, block + payload


def _fits(text: str, codec: str) -> bool:
    try:
        text.encode(codec)
    except UnicodeEncodeError:
        return False
    return True


def _transliterate(text: str, codec: str) -> str:
    """Accents dropped and other characters replaced, so that `codec` can hold the text."""
    out = []
    for ch in text:
        if not _fits(ch, codec):
            ch = "".join(c for c in unicodedata.normalize("NFKD", ch)
                         if not unicodedata.combining(c))
            ch = ch if ch and _fits(ch, codec) else "!" if ch == "\u26a0" else "?"
        out.append(ch)
    return "".join(out)


def _choose_cte(cte: str, body: bytes) -> str:
    if cte in ("base64", "quoted-printable"):
        return cte
    long_lines = any(len(line) > 998 for line in body.splitlines())
    if long_lines:
        return "quoted-printable"
    if cte in ("8bit", "binary") or body.isascii():
        return cte
    return "quoted-printable"  # 7bit declared, 8-bit now


def _encode(body: bytes, cte: str) -> bytes:
    """Transfer-encode, with CRLF line breaks as in the rest of the message."""
    if cte == "base64":
        return base64.encodebytes(body).replace(b"\n", b"\r\n")
    if cte == "quoted-printable":
        return email.quoprimime.body_encode(body.decode("latin-1"), eol="\r\n").encode("latin-1")
    return body


def _with_charset(block: bytes, ctype: str, charset: str) -> str:
    """The part's Content-Type value with `charset` set, its other parameters kept."""
    msg = email.message.Message()
    for field in headers.fields(block):
        if headers.field_name(field) == b"content-type":
            value = field.split(b":", 1)[1].decode("ascii", "replace")
            msg["Content-Type"] = " ".join(value.split())
            break
    else:
        msg["Content-Type"] = ctype
    msg.set_param("charset", charset)
    return str(msg["Content-Type"])


# ---- the banners ---------------------------------------------------------------------------


def text_banner(w: Warning, mark: str, eol: str) -> str:
    s = w.style
    lines = [f"⚠ {s.title.upper()}"]
    if w.note:
        lines.append(w.note)
    if w.reasons:
        lines.append(s.intro)
        lines += [f"  - {r}" for r in w.reasons]
    if s.advice:
        lines.append(s.advice)
    lines.append(f"({s.footer} - réf. {mark})")
    lines.append("-" * 72)
    return eol.join(lines) + eol


def html_banner(w: Warning, mark: str, eol: str) -> str:
    """A table with inline styles only (Outlook ignores most CSS); pure ASCII (character
    references), so it fits any ASCII-compatible charset without re-labelling the part."""
    s, c = w.style, w.style.colors

    def esc(text: str) -> str:
        return html.escape(text).encode("ascii", "xmlcharrefreplace").decode()

    font = "font-family:Arial,Helvetica,sans-serif;"
    rows = [
        f'<table role="presentation" width="100%" cellpadding="0" cellspacing="0" border="0" '
        f'data-gateway-banner="{mark}" style="width:100%;border-collapse:collapse;'
        f'margin:0 0 16px 0;">',
        f'<tr><td style="background-color:{c.background};border:1px solid {c.border};'
        f'border-left:6px solid {c.border};padding:12px 16px;{font}font-size:14px;'
        f'line-height:1.45;color:{c.text};text-align:left;">',
        f'<p style="margin:0 0 6px 0;{font}font-size:16px;font-weight:bold;color:{c.title};">'
        f"&#9888; {esc(s.title)}</p>",
    ]
    if w.note:
        rows.append(f'<p style="margin:0 0 6px 0;{font}">{esc(w.note)}</p>')
    if w.reasons:
        rows.append(f'<p style="margin:0 0 4px 0;{font}">{esc(s.intro)}</p>')
        rows.append('<ul style="margin:0 0 8px 0;padding:0 0 0 20px;">')
        rows += [f'<li style="margin:0 0 2px 0;{font}">{esc(r)}</li>' for r in w.reasons]
        rows.append("</ul>")
    if s.advice:
        rows.append(f'<p style="margin:0;{font}font-weight:bold;">{esc(s.advice)}</p>')
    rows.append(f'<p style="margin:8px 0 0 0;{font}font-size:11px;color:#6b7280;">'
                f"{esc(s.footer)} &middot; r&eacute;f. {mark}</p>")
    rows.append("</td></tr></table>")
    return eol.join(rows)
