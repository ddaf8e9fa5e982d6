"""dkimpy's private names: its verifier's internal steps and canonicalisation functions,
used to compute the body hash faster than dkimpy does (same bytes: tests/test_auth.py)."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable

import dkim
from dkim.canonicalization import (
    compress_whitespace,
    correct_empty_body,
    strip_trailing_lines,
    strip_trailing_whitespace,
)

from gateway.message import header_section_end

# (object, name, what the gateway does with it): checked by tests/test_dependencies.py
PRIVATE_METHODS = {
    "verify_headerprep": "body-hash mismatch told apart from a bad signature",
    "verify_sig": "body-hash mismatch told apart from a bad signature",
}
PRIVATE_ATTRIBUTES = ["body"]  # set as is when the body's line ends are CRLF already


class BodyHashMismatch(Exception):
    pass


def verify_one(verifier: dkim.DKIM, idx: int, lookup: Callable[..., bytes | None]) -> bool:
    """dkimpy's verify(), with the body hash computed here (fast_body below) and the rest --
    key, header hash, signature -- left to dkimpy's own verify_sig()."""
    sig, include_headers, sigheaders = verifier.verify_headerprep(idx)
    try:
        computed = body_hash(verifier.body, sig)
    except (KeyError, ValueError):
        return bool(verifier.verify(idx=idx, dnsfunc=lookup))  # unusual c=/a=/l=: dkimpy's way
    if computed != base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"])):
        raise BodyHashMismatch()
    without_bh = {k: v for k, v in sig.items() if k != b"bh"}
    return bool(verifier.verify_sig(without_bh, include_headers, sigheaders[idx], lookup))


def body_hash(body: bytes, sig: dict[bytes, bytes]) -> bytes:
    algorithms = sig.get(b"c", b"simple/simple").split(b"/")
    if len(algorithms) > 2 or (algorithms + [b"simple"])[1] not in (b"simple", b"relaxed"):
        raise ValueError("c=")
    relaxed = (algorithms + [b"simple"])[1] == b"relaxed"
    canon = relaxed_body(body) if relaxed else strip_trailing_lines(body)
    if b"l" in sig:
        canon = canon[:int(sig[b"l"])]
    digest: bytes = dkim.HASH_ALGORITHMS[sig[b"a"]](canon).digest()
    return digest


def relaxed_body(body: bytes) -> bytes:
    """RFC 6376 3.4.4, the same bytes as dkimpy's Relaxed.canonicalize_body, whose two regex
    passes over the whole body dominate DKIM's cost: here they run only on the stretches of
    lines that hold a space or a tab (base64 attachments hold none)."""
    if b" " in body or b"\t" in body:
        out = []
        pos, n = 0, len(body)
        while pos < n:
            cut = body.find(b"\r\n", min(pos + 65536, n))
            end = n if cut < 0 else cut + 2
            chunk = body[pos:end]
            if b" " in chunk or b"\t" in chunk:
                chunk = compress_whitespace(strip_trailing_whitespace(chunk))
            out.append(chunk)
            pos = end
        body = b"".join(out)
    canonical: bytes = correct_empty_body(strip_trailing_lines(body))
    return canonical


def verifier_for(raw: bytes, minkey: int) -> dkim.DKIM:
    """dkimpy's verifier. dkimpy splits the whole message into lines to find the body and
    rejoin it with CRLF; when the body's line ends are all CRLF already (SMTP data), only the
    header block is given to it and the body is set as is: the same bytes, a fraction of the
    cost on large attachments."""
    end = header_section_end(raw)
    if end > 0 and raw[end - 4:end] == b"\r\n\r\n" \
            and raw.count(b"\n", end) == raw.count(b"\r\n", end):
        verifier = dkim.DKIM(raw[:end], minkey=minkey)
        verifier.body = raw[end:]
        return verifier
    return dkim.DKIM(raw, minkey=minkey)
