"""DKIM (RFC 6376, RFC 8463): every signature, with dkimpy, keys fetched on our resolver.

Keys are looked up first, concurrently, on the gateway's resolver; dkimpy then verifies in the
worker pool with a lookup function that only reads those answers. A key lookup that failed for
a temporary reason gives DKIM_TEMPERROR for that signature, never a forged-signature result.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import ClassVar

import dkim
from dkim.util import InvalidTagValueList, parse_tag_value

from gateway.auth import AuthStatus, ar_value
from gateway.auth.dns import Resolver
from gateway.checks.base import CheckContext, CheckResult, Facts, Hit, Services
from gateway.deps.dkimpy import BodyHashMismatch, verifier_for, verify_one
from gateway.errors import DnsPermanentError, DnsTemporaryError
from gateway.message import Direction, Inbound, ParsedMessage


@dataclass(frozen=True, slots=True, kw_only=True)
class DkimSignature:
    result: AuthStatus
    domain: str  # d=
    selector: str  # s=
    b: str  # first characters of b=, to tell signatures apart in Authentication-Results
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class DkimFacts(Facts):
    method: ClassVar[str] = "dkim"
    signatures: tuple[DkimSignature, ...]

    def ar(self, inbound: Inbound) -> list[str]:
        return [f"dkim={s.result.value} header.d={ar_value(s.domain)} "
                f"header.s={ar_value(s.selector)} header.b={ar_value(s.b)}"
                for s in self.signatures if s.domain]


TEMP = object()  # marker: the key lookup failed temporarily


class SignatureCheck:
    """What the DKIM and ARC checks share: keys fetched on our resolver, verification in the
    worker pool within the parse time limit, the minimal RSA key size."""

    name: ClassVar[str]

    def __init__(self, services: Services) -> None:
        self._resolver = services.resolver
        self._workers = services.workers
        self._minkey = services.cfg.auth.dkim_min_key_bits
        self._limit_s = services.cfg.timeouts.for_check(self.name)


class DkimCheck(SignatureCheck):
    name: ClassVar[str] = "dkim"
    phase: ClassVar[int] = 1
    produces: ClassVar[type[Facts] | None] = DkimFacts
    directions: ClassVar[frozenset[Direction]] = frozenset({Direction.INBOUND})
    symbols: ClassVar[frozenset[str]] = frozenset({
        "DKIM_PASS", "DKIM_FAIL", "DKIM_NONE", "DKIM_TEMPERROR", "DKIM_PERMERROR",
        "DKIM_KEY_TOO_SMALL", "DKIM_EXPIRED", "DKIM_LENGTH_LIMIT", "DKIM_FROM_NOT_SIGNED",
    })

    async def run(self, msg: ParsedMessage, ctx: CheckContext) -> CheckResult:
        values = [v for n, v in msg.headers if n.lower() == "dkim-signature"]
        if not values:
            return CheckResult.of(self.name, Hit(symbol="DKIM_NONE"),
                                  facts=DkimFacts(signatures=()))
        tags = [_tags(v) for v in values]
        keys = await fetch_keys(self._resolver,
                                {_key_name(t) for t in tags if t is not None and _key_name(t)})
        sigs = await self._workers.run(verify_all, ctx.inbound.raw, tags, keys, self._minkey,
                                       time.time(), limit_s=self._limit_s)
        hits = []
        for sig, t in zip(sigs, tags, strict=True):
            detail = f"d={sig.domain} s={sig.selector} {sig.reason}".strip()[:200]
            args = tuple((k, v[:100]) for k, v in (("domain", sig.domain),
                                                  ("selector", sig.selector)) if v)
            hits.append(Hit(symbol=f"DKIM_{sig.result.name}", detail=detail, args=args))
            if t is not None and sig.result is AuthStatus.PASS:
                if b"l" in t:
                    hits.append(Hit(symbol="DKIM_LENGTH_LIMIT", detail=f"d={sig.domain}",
                                    args=args))
                if b"from" not in [h.strip().lower() for h in t.get(b"h", b"").split(b":")]:
                    hits.append(Hit(symbol="DKIM_FROM_NOT_SIGNED", detail=f"d={sig.domain}",
                                    args=args))
            if sig.reason.startswith("key too small"):
                hits.append(Hit(symbol="DKIM_KEY_TOO_SMALL", detail=detail, args=args))
            if sig.reason.startswith("expired"):
                hits.append(Hit(symbol="DKIM_EXPIRED", detail=detail, args=args))
        return CheckResult(check=self.name, hits=tuple(hits),
                           facts=DkimFacts(signatures=tuple(sigs)))



async def fetch_keys(resolver: Resolver, names: set[str]) -> dict[str, object]:
    """Key records by name, looked up concurrently: bytes, None (no key) or TEMP."""
    async def one(name: str) -> object:
        try:
            return await resolver.dkim_txt(name)
        except DnsTemporaryError:
            return TEMP
        except DnsPermanentError:
            return None
    return dict(zip(names, await asyncio.gather(*(one(n) for n in names)), strict=True))


def _tags(value: str) -> dict[bytes, bytes] | None:
    try:
        tags: dict[bytes, bytes] = parse_tag_value(value.encode("utf-8", "surrogateescape"))
        return tags
    except InvalidTagValueList:
        return None


def _key_name(tags: dict[bytes, bytes]) -> str:
    s, d = tags.get(b"s", b""), tags.get(b"d", b"")
    if not s or not d:
        return ""
    return (s + b"._domainkey." + d).decode("ascii", "replace")


def verify_all(raw: bytes, tags: list[dict[bytes, bytes] | None], keys: dict[str, object],
               minkey: int, now: float) -> list[DkimSignature]:
    """CPU part, for the worker pool: verify each signature with the prefetched keys."""
    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        value = keys.get(name.decode("ascii", "replace").rstrip("."))
        return value if isinstance(value, bytes) else None

    verifier = verifier_for(raw, minkey)
    out = []
    for idx, t in enumerate(tags):
        if t is None:
            out.append(DkimSignature(result=AuthStatus.PERMERROR, domain="", selector="", b="",
                                     reason="unparsable signature"))
            continue
        domain = t.get(b"d", b"").decode("ascii", "replace")
        selector = t.get(b"s", b"").decode("ascii", "replace")
        b = b"".join(t.get(b"b", b"").split())[:8].decode("ascii", "replace")
        base = {"domain": domain, "selector": selector, "b": b}
        if keys.get(_key_name(t)) is TEMP:
            out.append(DkimSignature(result=AuthStatus.TEMPERROR, reason="key lookup failed",
                                     **base))
            continue
        x = t.get(b"x")
        if x is not None and x.strip().isdigit() and int(x) < now:
            out.append(DkimSignature(result=AuthStatus.FAIL, reason="expired (x=)", **base))
            continue
        record = keys.get(_key_name(t))
        if isinstance(record, bytes):
            try:  # dkimpy's verify() turns a bad key record into a bare False: check it first
                dkim.evaluate_pk(_key_name(t).encode() + b".", record)
            except dkim.KeyFormatError as exc:
                out.append(DkimSignature(result=AuthStatus.PERMERROR,
                                         reason=f"key record: {str(exc)[:80]}", **base))
                continue
        try:
            ok = verify_one(verifier, idx, lookup)
        except BodyHashMismatch:
            out.append(DkimSignature(result=AuthStatus.FAIL, reason="body hash mismatch",
                                     **base))
            continue
        except dkim.KeyFormatError as exc:
            text = str(exc)
            reason = "key too small" if "too small" in text else f"key: {text[:80]}"
            result = AuthStatus.FAIL if "too small" in text else AuthStatus.PERMERROR
            out.append(DkimSignature(result=result, reason=reason, **base))
            continue
        except dkim.DKIMException as exc:
            out.append(DkimSignature(result=AuthStatus.PERMERROR,
                                     reason=f"{type(exc).__name__}: {str(exc)[:80]}", **base))
            continue
        if ok:
            out.append(DkimSignature(result=AuthStatus.PASS, **base))
        elif lookup((_key_name(t)).encode()) is None:
            out.append(DkimSignature(result=AuthStatus.PERMERROR, reason="no key", **base))
        else:
            out.append(DkimSignature(result=AuthStatus.FAIL, reason="signature mismatch",
                                     **base))
    return out


CHECKS = (DkimCheck,)
