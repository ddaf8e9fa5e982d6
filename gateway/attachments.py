"""What is inside a message's parts: true types, names, archives, Office macros, PDF actions,
HTML smuggling, YARA matches. CPU work for the worker pool: `analyse` never raises for hostile
input, and every archive is opened within limits (depth, members, total size, ratio), so a
bomb is a finding, never memory exhaustion.

Libraries: python-magic (libmagic; one Magic per thread, an instance is not thread-safe),
zipfile (stdlib), oletools (VBA in OLE documents), yara-python.
"""

from __future__ import annotations

import io
import math
import re
import threading
import time
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import magic

with warnings.catch_warnings():  # oletools 0.60 calls a pyparsing API deprecated since 3.1
    warnings.simplefilter("ignore", DeprecationWarning)
    from oletools.olevba import VBA_Parser

from gateway import qr
from gateway.config import read_toml
from gateway.errors import ConfigError
from gateway.message import ParsedMessage, decode_transfer
from gateway.workers import Overrun, provided, time_limit
from gateway.yara_rules import YaraRules

RTLO = "\u202e"
# Findings whose detail is a web address: a QR code's, a PDF's link (the impersonation check
# judges where they go: gateway/checks/attachments.py passes them on as facts).
QR_LINK = "ATTACH_QR_LINK"
PDF_LINK = "ATTACH_PDF_LINK"
MAX_FILE_LINKS = 20  # addresses kept per file (after duplicates are dropped)
_PDF_URI = re.compile(rb"/URI\s*\(((?:https?://|www\.)[^)\s]{1,2000})\)", re.IGNORECASE)
YARA = "yara"  # the name the compiled rules are provided under in the worker processes
_local = threading.local()


def true_type(data: bytes) -> str:
    m = getattr(_local, "magic", None)
    if m is None:
        m = _local.magic = magic.Magic(mime=True)
    try:
        return str(m.from_buffer(data[:262144]))
    except magic.MagicException:
        return "application/octet-stream"


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    dangerous_extensions: frozenset[str]
    dangerous_types: frozenset[str]
    unscannable_archives: frozenset[str]
    max_depth: int = 3
    max_members: int = 1000
    max_total_bytes: int = 200 * 1024 * 1024
    max_ratio: int = 150
    macro_timeout_s: float = 15.0  # oletools, per document (see _ole)

    @staticmethod
    def load(path: Path, **limits: Any) -> Policy:
        data = read_toml(path, "politique des pièces jointes")
        try:
            return Policy(
                dangerous_extensions=frozenset(e.lower() for e in data["dangerous_extensions"]),
                dangerous_types=frozenset(data["dangerous_types"]),
                unscannable_archives=frozenset(data["unscannable_archives"]), **limits)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{path}: missing or invalid list: {exc}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class Finding:
    symbol: str
    name: str  # the file it is about ("facture.pdf", "archive.zip/payload.exe")
    detail: str = ""  # English, for the logs
    rule: str = ""  # the YARA rule that matched
    args: tuple[tuple[str, str], ...] = ()  # values for the symbol's French detail


@dataclass(slots=True)
class _Scan:
    policy: Policy
    yara: YaraRules | None
    findings: list[Finding] = field(default_factory=list)
    seen: set[tuple[str, str]] = field(default_factory=set)
    budget_bytes: int = 0
    deadline: float = math.inf  # time.monotonic() past which YARA scans no more
    qr: qr.Reader = field(default_factory=qr.Reader)  # the message's QR reading and budget

    def add(self, symbol: str, name: str, detail: str = "", rule: str = "",
            args: tuple[tuple[str, str], ...] = ()) -> None:
        if (symbol, name) not in self.seen:
            self.seen.add((symbol, name))
            self.findings.append(Finding(symbol=symbol, name=name, detail=detail[:200],
                                         rule=rule, args=args))

    def add_link(self, symbol: str, name: str, url: str) -> None:
        """A web address in a file (several per file, each once)."""
        if (symbol, url) not in self.seen:
            self.seen.add((symbol, url))
            self.findings.append(Finding(symbol=symbol, name=name, detail=url[:2048],
                                         args=(("url", url[:300]),)))


def analyse_job(raw: bytes, parsed: ParsedMessage, policy: Policy,
                budget_s: float = math.inf) -> list[Finding]:
    """`analyse` as a killable job: with the YARA rules installed in the worker process."""
    return analyse(raw, parsed, policy, provided(YARA), budget_s)


def analyse(raw: bytes, parsed: ParsedMessage, policy: Policy, yara: YaraRules | None,
            budget_s: float = math.inf) -> list[Finding]:
    """The findings; YARA's scans of all the parts share `budget_s` (each is bounded by its
    own timeout too), so that a thread scanning a message's bodies is bounded as a whole:
    past it, YARA_TIMEOUT and no more scans."""
    scan = _Scan(policy=policy, yara=yara, budget_bytes=policy.max_total_bytes,
                 deadline=time.monotonic() + budget_s)
    for part in parsed.parts:
        if part.is_multipart:
            continue
        data = decode_transfer(part.payload(raw), part.transfer_encoding)
        if data is None:
            continue
        name = part.filename or ""
        if part.is_body:
            if scan.yara is not None:
                _yara(scan, data, name or f"part {part.path}")
            continue
        _file(scan, name or f"part {part.path}", data, part.content_type, depth=0,
              in_archive=False)
    if scan.qr.unread:  # said, never silent: an image could hide a QR code (one sign)
        first = scan.qr.unread[0].split(": ", 1)[0]
        scan.add("ATTACH_IMAGE_UNREAD", first,
                 f"{len(scan.qr.unread)} not read: " + "; ".join(scan.qr.unread[:3]))
    return scan.findings


def _extension(name: str) -> str:
    base = name.rsplit("/", 1)[-1].strip().rstrip(".").lower()
    return base.rsplit(".", 1)[1] if "." in base else ""


def _file(scan: _Scan, name: str, data: bytes, declared: str, *, depth: int,
          in_archive: bool) -> None:
    policy = scan.policy
    kind = true_type(data)
    ext = _extension(name)
    base = name.rsplit("/", 1)[-1]
    if RTLO in base or "\u200e" in base or "\u200f" in base:
        scan.add("ATTACH_RTLO_NAME", name)
    parts = base.lower().split(".")
    if len(parts) >= 3 and parts[-1] in policy.dangerous_extensions and len(parts[-2]) <= 4 \
            and parts[-2].isalnum():
        scan.add("ATTACH_DOUBLE_EXTENSION", name, base)
    dangerous = kind in policy.dangerous_types or ext in policy.dangerous_extensions
    if dangerous:
        scan.add("ATTACH_EXEC_IN_ARCHIVE" if in_archive else "ATTACH_DANGEROUS_TYPE", name,
                 f"{kind} .{ext}", args=(("kind", kind),))
    if kind in policy.dangerous_types and ext and ext not in policy.dangerous_extensions:
        scan.add("ATTACH_TYPE_MISMATCH", name, f"named .{ext}, really {kind}",
                 args=(("ext", ext), ("kind", kind)))
    if scan.yara is not None:
        _yara(scan, data, name)
    if kind == "application/zip" or (data[:4] == b"PK\x03\x04" and kind != "application/zip"):
        _zip(scan, name, data, depth=depth)
    elif kind in policy.unscannable_archives:
        scan.add("ATTACH_ARCHIVE_UNSCANNED", name, kind)
    elif kind in ("application/x-ole-storage", "application/msword", "application/vnd.ms-excel",
                  "application/vnd.ms-powerpoint", "application/CDFV2",
                  "application/x-msi") or data[:8] == b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1":
        _ole(scan, name, data)
    elif kind == "application/pdf" or data[:5] == b"%PDF-":
        _pdf(scan, name, data)
    elif kind in ("text/html", "image/svg+xml") or ext in ("html", "htm", "svg", "shtml", "xhtml"):
        _html(scan, name, data)
    elif kind in qr.IMAGE_TYPES:
        _links(scan, QR_LINK, name, scan.qr.image(name, data))


def _links(scan: _Scan, symbol: str, name: str, links: list[str]) -> None:
    for url in list(dict.fromkeys(links))[:MAX_FILE_LINKS]:
        scan.add_link(symbol, name, url)


def _yara(scan: _Scan, data: bytes, name: str) -> None:
    assert scan.yara is not None
    left = scan.deadline - time.monotonic()
    if left <= 0:
        scan.add("YARA_TIMEOUT", "(message)", "the message's scanning time is spent")
        return
    for match in scan.yara.scan(data, limit_s=left):
        scan.add(match.symbol, name, match.rule, rule=match.rule)


# ---- archives ------------------------------------------------------------------------------


def _zip(scan: _Scan, name: str, data: bytes, *, depth: int) -> None:
    policy = scan.policy
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError):
        scan.add("ATTACH_ARCHIVE_CORRUPT", name)
        return
    names = {i.filename for i in infos}
    if "[Content_Types].xml" in names:
        _ooxml(scan, name, archive, names)
        if depth == 0:
            return  # an Office document, not an archive the user opens
    if depth >= policy.max_depth:
        scan.add("ATTACH_ARCHIVE_BOMB", name, f"nested deeper than {policy.max_depth}")
        return
    if depth >= 1:
        scan.add("ATTACH_NESTED_ARCHIVE", name, f"depth {depth + 1}",
                 args=(("depth", str(depth + 1)),))
    if len(infos) > policy.max_members:
        scan.add("ATTACH_ARCHIVE_BOMB", name, f"{len(infos)} members")
        return
    for info in infos:
        if info.is_dir():
            continue
        member = f"{name}/{info.filename}"
        if info.flag_bits & 0x1:
            scan.add("ATTACH_ENCRYPTED_ARCHIVE", name, info.filename)
            ext = _extension(info.filename)
            if ext in policy.dangerous_extensions:
                scan.add("ATTACH_EXEC_IN_ARCHIVE", member, f".{ext} (encrypted)")
            continue
        if info.file_size > scan.budget_bytes or (
                info.compress_size and info.file_size / max(info.compress_size, 1)
                > policy.max_ratio and info.file_size > 1_000_000):
            scan.add("ATTACH_ARCHIVE_BOMB", name,
                     f"{info.filename}: {info.file_size} bytes from {info.compress_size}")
            return
        try:
            with archive.open(info) as f:
                content = f.read(scan.budget_bytes + 1)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError,
                RuntimeError):
            scan.add("ATTACH_ARCHIVE_CORRUPT", member)
            continue
        scan.budget_bytes -= len(content)
        if scan.budget_bytes < 0:
            scan.add("ATTACH_ARCHIVE_BOMB", name, "total uncompressed size over the limit")
            return
        _file(scan, member, content, "", depth=depth + 1, in_archive=True)


def _ooxml(scan: _Scan, name: str, archive: zipfile.ZipFile, names: set[str]) -> None:
    if any(n.lower().endswith("vbaproject.bin") for n in names):
        scan.add("ATTACH_OFFICE_MACRO", name, "vbaProject.bin")
    for rel in (n for n in names if n.endswith(".rels") and "settings" in n):
        try:
            text = archive.read(rel)[:200_000].decode("utf-8", "replace")
        except (zipfile.BadZipFile, OSError, KeyError, RuntimeError):
            continue
        if re.search(r'attachedTemplate[^>]*TargetMode="External"|TargetMode="External"'
                     r'[^>]*attachedTemplate', text) and re.search(r'Target="(https?|\\\\)',
                                                                   text):
            scan.add("ATTACH_REMOTE_TEMPLATE", name)


# ---- OLE (legacy Office) -------------------------------------------------------------------


def _ole(scan: _Scan, name: str, data: bytes) -> None:
    """oletools is pure Python over a hostile file: bounded by policy.macro_timeout_s (in a
    worker process; the whole job is killed past the attachments limit anyway)."""
    macros = autoexec = ""
    try:
        with time_limit(scan.policy.macro_timeout_s):
            macros, autoexec = _vba(name, data)
    except Overrun:
        scan.add("ATTACH_ANALYSIS_TIMEOUT", name, "macro analysis")
        return
    if macros:
        scan.add("ATTACH_OFFICE_MACRO", name, macros)
    if autoexec:
        scan.add("ATTACH_MACRO_AUTOEXEC", name, autoexec)


def _vba(name: str, data: bytes) -> tuple[str, str]:
    """(macro description or "", auto-exec keyword or "")."""
    macros = autoexec = ""
    try:
        parser = VBA_Parser(name or "document", data=data)
    except MemoryError:  # the worker's memory limit: unanalysed, not "no macro"
        raise
    except Exception:  # noqa: BLE001 - oletools raises many kinds on hostile files
        return macros, autoexec
    try:
        if parser.detect_vba_macros():
            macros = "VBA"
            for kind, keyword, _ in parser.analyze_macros():
                if kind == "AutoExec":
                    autoexec = str(keyword)
                    break
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001
        macros = "VBA (unparsable)"
    finally:
        parser.close()
    return macros, autoexec


# ---- PDF -----------------------------------------------------------------------------------

_PDF_NAME = re.compile(rb"/([A-Za-z0-9#]+)")


_PDF_KEYS = (b"JavaScript", b"JS", b"Launch", b"EmbeddedFile", b"OpenAction", b"AA", b"URI",
             b"SubmitForm", b"Image")
_PDF_ESCAPED = re.compile(rb"/[A-Za-z0-9]*#[0-9A-Fa-f]{2}")
_PDF_OBJSTM = re.compile(rb"/Type\s*/ObjStm")
MAX_PDF_INFLATED = 20_000_000  # bytes of object streams inflated per PDF


def _pdf_keys(data: bytes) -> set[bytes]:
    """The action keys named in `data`: a few C-speed searches; names decoded one by one only
    when some are escaped (/J#61vaScript is /JavaScript)."""
    keys: set[bytes] = set()
    for key in _PDF_KEYS:
        pos = data.find(b"/" + key)
        while pos >= 0:
            end = pos + 1 + len(key)
            if not data[end:end + 1].isalnum():
                keys.add(key)
                break
            pos = data.find(b"/" + key, end)
    if _PDF_ESCAPED.search(data):
        for m in _PDF_NAME.finditer(data):
            token = m.group(1)
            if b"#" in token:
                keys.add(re.sub(rb"#([0-9A-Fa-f]{2})",
                                lambda x: bytes([int(x.group(1), 16)]), token))
    return keys


def _pdf_object_streams(data: bytes) -> bytes:
    """The objects a PDF 1.5+ keeps in compressed object streams (/Type /ObjStm), inflated
    within MAX_PDF_INFLATED: a catalog's /OpenAction or a /JS there is invisible to a scan of
    the file's bytes (found by review)."""
    out: list[bytes] = []
    total = 0
    for m in _PDF_OBJSTM.finditer(data):
        start = data.find(b"stream", m.end())
        if start < 0 or total >= MAX_PDF_INFLATED:
            break
        start = data.find(b"\n", start) + 1
        if start == 0:
            break
        end = data.find(b"endstream", start)
        try:
            chunk = zlib.decompressobj().decompress(
                data[start:end if end > 0 else len(data)], MAX_PDF_INFLATED - total)
        except zlib.error:  # another filter, or broken: its bytes were scanned as they are
            continue
        out.append(chunk)
        total += len(chunk)
    return b"\n".join(out)


def _pdf(scan: _Scan, name: str, data: bytes) -> None:
    """Action keys, with #xx escapes in names decoded (/J#61vaScript is /JavaScript). The
    common case is a few C-speed searches; names are decoded one by one only when a PDF holds
    escaped ones."""
    data = data[:50_000_000]
    inflated = _pdf_object_streams(data)
    keys = _pdf_keys(data) | _pdf_keys(inflated)
    if keys & {b"URI", b"Image"}:
        # Links and images through pypdf (hex strings, escapes, forms), and the plain links
        # of every page by a byte search.
        codes, uris = scan.qr.pdf(name, data)
        uris += [m.group(1).decode("latin-1") for text in (data, inflated)
                 for m in _PDF_URI.finditer(text)]
        _links(scan, PDF_LINK, name, uris)
        _links(scan, QR_LINK, name, codes)
    if keys & {b"JavaScript", b"JS"}:
        scan.add("ATTACH_PDF_JAVASCRIPT", name)
    if b"Launch" in keys:
        scan.add("ATTACH_PDF_LAUNCH", name)
    if b"EmbeddedFile" in keys:
        scan.add("ATTACH_PDF_EMBEDDED_FILE", name)
    if (b"OpenAction" in keys or b"AA" in keys) and keys & {b"JavaScript", b"JS", b"Launch",
                                                            b"URI", b"SubmitForm"}:
        scan.add("ATTACH_PDF_AUTO_ACTION", name)


# ---- HTML and SVG attachments --------------------------------------------------------------

_B64_RUN = re.compile(rb"[A-Za-z0-9+/=]{10000,}")


def _html(scan: _Scan, name: str, data: bytes) -> None:
    lower = data[:5_000_000].lower()
    if b"<script" in lower:
        scan.add("ATTACH_HTML_SCRIPT", name)
        decodes = sum(k in lower for k in (b"atob(", b"uint8array", b"new blob", b"fromcharcode"))
        saves = any(k in lower for k in (b"mssaveoropenblob", b".download", b"createobjecturl",
                                          b"download="))
        if decodes >= 1 and saves and _B64_RUN.search(data):
            scan.add("ATTACH_HTML_SMUGGLING", name)
    if b"<form" in lower and b"type=\"password\"" in lower.replace(b"'", b'"') \
            and re.search(rb"<form[^>]+action=[\"']?https?://", lower):
        scan.add("ATTACH_HTML_CREDENTIAL_FORM", name)
