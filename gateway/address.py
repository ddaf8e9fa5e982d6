"""RFC 5321 paths of MAIL FROM and RCPT TO, checked before anything is opened downstream.

aiosmtpd parses addresses with the e-mail header grammar (RFC 5322), which is more lenient
than SMTP's: it takes control characters, undecodable bytes and source routes, and it keeps
local parts that the mailbox server behind us may read as a route to another domain:

* `user%other.example@our.domain` (the "percent hack": Postfix's `allow_percent_hack`),
* `other.example!user@our.domain` (UUCP bang paths: `swap_bangpath`),
* `"user@other.example"@our.domain` (a quoted local part holding an `@`),
* `<@relay.example:user@our.domain>` (a source route).

A mailbox server that trusts the gateway would deliver those to the other domain: an open
relay through the pair. So a path is checked here first, on the command's own text:
RFC 5321 section 4.1.2 (with RFC 6531's UTF-8 when the client said SMTPUTF8), local part at
most 64 octets, domain at most 255, no control character, valid UTF-8 only. Recipients whose
local part holds a routing character are refused unless `smtp.allow_percent_hack` allows `%`
and `!` (a quoted `@` and source routes are always refused).

A hand-written grammar rather than a library: what is needed is SMTP's path syntax on the raw
command (the angle brackets, A-d-l, parameters after the path), which address validators such
as email-validator do not parse; the grammar is a few regular expressions.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import dataclass

from gateway import replies
from gateway.replies import Reply

# RFC 5321 section 4.1.2; with SMTPUTF8, RFC 6531 section 3.3 adds UTF8-non-ascii to atext,
# qtextSMTP and sub-domains (U-labels).
_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_U8 = r"\u0080-\U0010ffff"
_LDH = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_ULDH = rf"[A-Za-z0-9{_U8}](?:[A-Za-z0-9{_U8}-]*[A-Za-z0-9{_U8}])?"


def _grammar(utf8: bool) -> tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str]]:
    atext = _ATEXT + (_U8 if utf8 else "")
    label = _ULDH if utf8 else _LDH
    qtext = r"\x20\x21\x23-\x5b\x5d-\x7e" + (_U8 if utf8 else "")
    dot_string = re.compile(rf"[{atext}]+(?:\.[{atext}]+)*")
    quoted = re.compile(rf'"(?:[{qtext}]|\\[\x20-\x7e])*"')
    domain = re.compile(rf"{label}(?:\.{label})*")
    return dot_string, quoted, domain


_ASCII = _grammar(False)
_UTF8 = _grammar(True)
_ROUTE = re.compile(r"@[^,:]+(?:,@[^,:]+)*:")
# Senders' local parts that RFC 5321 does not allow but real mailers send (`first.@`,
# `a..b@`), taken as Postfix does by default (strict_rfc821_envelopes = no): a sender is not
# routed anywhere, only its syntax must be sound.
_LENIENT_LOCAL = re.compile(r'[^\s<>()\[\]\\,;:"@]+')
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


class PathRefused(Exception):
    def __init__(self, reply: Reply, why: str) -> None:
        super().__init__(why)
        self.reply = reply
        self.why = why  # for the log, in English


@dataclass(frozen=True, slots=True)
class Path:
    """The mailbox is what the gateway passes on, exactly as checked here: aiosmtpd parses
    the command again with the header grammar, which decodes RFC 2047 encoded words (`=40`
    becomes `@`, `=0D=0A` a line break), so its result must equal this one (gateway/smtp.py)."""

    mailbox: str  # "" for the null reverse-path <>
    local: str  # the local part as written (quotes kept)
    domain: str
    params: str  # ESMTP parameters after the path


def check_command(arg: str | None, *, keyword: str) -> str | None:
    """The text after `FROM:`/`TO:`, or None when the keyword is absent (aiosmtpd then
    answers its own syntax error). Control characters and undecodable bytes anywhere in
    the command are refused here, before any parsing."""
    if arg is None:
        return None
    if _CONTROL.search(arg):
        raise PathRefused(replies.CONTROL_CHARACTERS, "control character in command")
    if _SURROGATE.search(arg):
        raise PathRefused(replies.INVALID_UTF8, "invalid UTF-8 in command")
    if arg[:len(keyword)].upper() != keyword:
        return None
    return arg[len(keyword):].lstrip(" ")


def parse(text: str, *, sender: bool, smtputf8: bool | None,
          allow_percent_hack: bool = False) -> Path:
    """One path, `<mailbox>` or `<>` (senders only), then parameters. Raises PathRefused.
    `smtputf8` None: as the command's own parameters say (MAIL FROM)."""
    bad = replies.BAD_SENDER_SYNTAX if sender else replies.BAD_RCPT_SYNTAX
    if text.startswith("<"):
        end = _closing_bracket(text)
        if end < 0:
            raise PathRefused(bad, "unterminated path")
        inner, params = text[1:end], text[end + 1:]
    else:  # a bare mailbox, as lenient servers take it; no parameters can be told apart then
        inner, _, params = text.partition(" ")
    if params and not params.startswith(" "):
        raise PathRefused(bad, "text after the path")
    params = params.strip(" ")
    if smtputf8 is None:
        smtputf8 = "SMTPUTF8" in params.upper().split()
    if not inner:
        if sender and text.startswith("<"):
            return Path(mailbox="", local="", domain="", params=params)
        raise PathRefused(bad, "empty path")
    if not sender and inner.lower() == "postmaster":
        # RFC 5321 section 4.5.1: "RCPT TO:<Postmaster>" without a domain must be accepted
        # (gateway/smtp.py gives it the practice's first domain).
        return Path(mailbox=inner, local=inner, domain="", params=params)
    if route := _ROUTE.match(inner):
        if not sender:  # a route asks us to relay: refused (RFC 5321 section 3.6.1 allows it)
            raise PathRefused(replies.SOURCE_ROUTE, "source route in recipient")
        inner = inner[route.end():]  # senders: the route is ignored (section 4.1.1.2)
    local, domain = _split(inner, bad)
    utf8 = not (local + domain).isascii()
    if utf8 and not smtputf8:
        raise PathRefused(replies.NON_ASCII_ADDRESS, "non-ASCII address without SMTPUTF8")
    dot_string, quoted, domain_re = _UTF8 if utf8 else _ASCII
    if not (dot_string.fullmatch(local) or quoted.fullmatch(local)
            or (sender and _LENIENT_LOCAL.fullmatch(local))):
        raise PathRefused(bad, "local part syntax")
    if not (domain_re.fullmatch(domain) or _address_literal(domain)):
        raise PathRefused(bad, "domain syntax")
    if utf8 and any(unicodedata.category(c)[0] in "ZC" for c in local + domain if c > "\x7f"):
        raise PathRefused(bad, "Unicode space, control or format character")
    if len(local.encode()) > 64 or len(domain.encode()) > 255:
        raise PathRefused(bad, "address too long")
    if not sender:
        unquoted = _unquote(local)
        if "@" in unquoted or ('"' in local and ("%" in unquoted or "!" in unquoted)):
            raise PathRefused(replies.ROUTED_ADDRESS, "routing characters in a quoted local part")
        if not allow_percent_hack and ("%" in local or "!" in local):
            raise PathRefused(replies.ROUTED_ADDRESS, "percent hack or bang path")
    return Path(mailbox=f"{local}@{domain}", local=local, domain=domain, params=params)


def _address_literal(domain: str) -> bool:
    """`[192.0.2.1]` or `[IPv6:2001:db8::1]` (RFC 5321 section 4.1.3)."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return False
    inner = domain[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        return False
    return True


def _closing_bracket(text: str) -> int:
    """Index of the `>` that ends the path (a `>` inside a quoted local part does not)."""
    quoted = escaped = False
    for i, c in enumerate(text[1:], 1):
        if escaped:
            escaped = False
        elif c == "\\" and quoted:
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            return i
    return -1


def _split(mailbox: str, bad: Reply) -> tuple[str, str]:
    """Local part and domain, split at the last `@` (a quoted local part may hold others)."""
    local, at, domain = mailbox.rpartition("@")
    if not at or not local or not domain:
        raise PathRefused(bad, "no local part or domain")
    return local, domain


def _unquote(local: str) -> str:
    if len(local) >= 2 and local[0] == local[-1] == '"':
        return re.sub(r"\\(.)", r"\1", local[1:-1])
    return local
