"""ARC (RFC 8617) chain validation with dkimpy, keys fetched first on our resolver."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import dkim
from dkim.util import InvalidTagValueList, parse_tag_value

from gateway.auth import AuthStatus
from gateway.auth.dkim import TEMP, SignatureCheck, fetch_keys
from gateway.checks.base import CheckContext, CheckResult, Facts, Hit
from gateway.message import Direction, Inbound, ParsedMessage


@dataclass(frozen=True, slots=True, kw_only=True)
class ArcFacts(Facts):
    method: ClassVar[str] = "arc"
    result: AuthStatus  # chain validation: pass, fail or none
    sealers: tuple[str, ...]  # d= of each ARC-Seal, newest first
    oldest_results: str  # the Authentication-Results the first sealer recorded (its AAR)

    def ar(self, inbound: Inbound) -> list[str]:
        return [f"arc={self.result.value}"] if self.result is not AuthStatus.NONE else []

    def vouched_by(self, trusted: frozenset[str]) -> str:
        """The trusted forwarder that vouches for the message ("" if none): the chain passes
        and its newest seal is that forwarder's. Not an older seal: a chain validates with
        only its newest message signature verifying, so anyone can copy a trusted list's old
        seal onto another message and seal it again."""
        if self.result is not AuthStatus.PASS or not self.sealers:
            return ""
        newest = self.sealers[0].lower().rstrip(".")
        return newest if newest in trusted else ""


_INSTANCE = re.compile(r"(?:^|;)\s*i\s*=\s*(\d+)", re.IGNORECASE)


class ArcCheck(SignatureCheck):
    name: ClassVar[str] = "arc"
    phase: ClassVar[int] = 1
    produces: ClassVar[type[Facts] | None] = ArcFacts
    directions: ClassVar[frozenset[Direction]] = frozenset({Direction.INBOUND})
    symbols: ClassVar[frozenset[str]] = frozenset({"ARC_PASS", "ARC_FAIL", "ARC_NONE",
                                                   "ARC_TEMPERROR"})

    async def run(self, msg: ParsedMessage, ctx: CheckContext) -> CheckResult:
        seals = [v for n, v in msg.headers if n.lower() == "arc-seal"]
        arc_headers = ("arc-seal", "arc-message-signature", "arc-authentication-results")
        if not any(n.lower() in arc_headers for n, _ in msg.headers):
            return CheckResult.of(self.name, Hit(symbol="ARC_NONE"), facts=ArcFacts(
                result=AuthStatus.NONE, sealers=(), oldest_results=""))
        names = set()
        for n, v in msg.headers:
            if n.lower() in ("arc-seal", "arc-message-signature"):
                try:
                    t = parse_tag_value(v.encode("utf-8", "surrogateescape"))
                except InvalidTagValueList:
                    continue
                if t.get(b"s") and t.get(b"d"):
                    names.add((t[b"s"] + b"._domainkey." + t[b"d"]).decode("ascii", "replace"))
        keys = await fetch_keys(self._resolver, names)
        sealers = _sealers(seals)
        aar = sorted(((_instance(v), v) for n, v in msg.headers
                      if n.lower() == "arc-authentication-results"), key=lambda x: x[0])
        oldest = aar[0][1] if aar else ""
        if any(v is TEMP for v in keys.values()):
            return CheckResult.of(self.name, Hit(symbol="ARC_TEMPERROR"), facts=ArcFacts(
                result=AuthStatus.TEMPERROR, sealers=sealers, oldest_results=oldest))
        cv, reason = await self._workers.run(verify_chain, ctx.inbound.raw, keys, self._minkey,
                                             limit_s=self._limit_s)
        result = {"pass": AuthStatus.PASS, "none": AuthStatus.NONE}.get(cv, AuthStatus.FAIL)
        symbol = {AuthStatus.PASS: "ARC_PASS", AuthStatus.NONE: "ARC_NONE"}.get(result, "ARC_FAIL")
        return CheckResult.of(self.name, Hit(symbol=symbol, detail=f"{cv} {reason}"[:200]),
                              facts=ArcFacts(result=result, sealers=sealers, oldest_results=oldest))



def _instance(value: str) -> int:
    m = _INSTANCE.search(value)
    return int(m.group(1)) if m else 0


def _sealers(seals: list[str]) -> tuple[str, ...]:
    out = []
    for v in sorted(seals, key=_instance, reverse=True):
        try:
            d = parse_tag_value(v.encode("utf-8", "surrogateescape")).get(b"d", b"")
        except InvalidTagValueList:
            continue
        out.append(d.decode("ascii", "replace").lower())
    return tuple(out)


def verify_chain(raw: bytes, keys: dict[str, object], minkey: int) -> tuple[str, str]:
    """CPU part, for the worker pool: dkimpy's chain validation with the prefetched keys."""
    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        value = keys.get(name.decode("ascii", "replace").rstrip("."))
        return value if isinstance(value, bytes) else None

    try:
        cv, _results, reason = dkim.arc_verify(raw, dnsfunc=lookup, minkey=minkey)
    except dkim.DKIMException as exc:
        return "fail", f"{type(exc).__name__}: {exc}"
    return cv.decode("ascii", "replace").lower(), str(reason)


CHECKS = (ArcCheck,)
