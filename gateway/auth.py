"""Facts checks hand to each other and to the pipeline (through CheckResult.facts): for the
authentication checks and the Authentication-Results header, what was checked, for which
domain, with which result; for the outbound guard, which recipients health data would reach
in clear."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class AuthResult(enum.Enum):
    """RFC 8601 result values shared by SPF, DKIM, DMARC and ARC."""

    PASS = "pass"
    FAIL = "fail"
    SOFTFAIL = "softfail"
    NEUTRAL = "neutral"
    NONE = "none"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"
    POLICY = "policy"


@dataclass(frozen=True, slots=True, kw_only=True)
class SpfFacts:
    result: AuthResult
    domain: str
    identity: str  # "mailfrom" or "helo"


@dataclass(frozen=True, slots=True, kw_only=True)
class DkimSignature:
    result: AuthResult
    domain: str  # d=
    selector: str  # s=
    b: str  # first characters of b=, to tell signatures apart in Authentication-Results
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class DkimFacts:
    signatures: tuple[DkimSignature, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ArcFacts:
    result: AuthResult  # chain validation: pass, fail or none
    sealers: tuple[str, ...]  # d= of each ARC-Seal, newest first
    oldest_results: str  # the Authentication-Results the first sealer recorded (its AAR)


@dataclass(frozen=True, slots=True, kw_only=True)
class DmarcFacts:
    result: AuthResult
    from_domain: str
    policy: str  # "none", "quarantine", "reject" (after sp= and pct=), or "" without record
    arc_override: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboundFacts:
    exposed: tuple[str, ...]  # recipients health data would reach in clear (empty: none)


Facts = SpfFacts | DkimFacts | ArcFacts | DmarcFacts | OutboundFacts


@dataclass(frozen=True, slots=True, kw_only=True)
class Unavailable:
    """Facts a check could not establish: it failed, ran out of time, or did not run. Never
    to be read as "nothing found": DMARC reads an unavailable SPF or DKIM as a temporary
    error, not as a missing pass."""

    kind: type
    why: str  # English, for the logs


def undecided(facts: SpfFacts | DkimFacts | Unavailable, name: str) -> str:
    """Why SPF's or DKIM's answer cannot count against the sender ("" when it can): a lookup
    failed, or the check itself could not run to its end."""
    if isinstance(facts, Unavailable):
        return f"{name} unavailable ({facts.why})"
    if isinstance(facts, SpfFacts):
        return f"{name} lookup failed" if facts.result is AuthResult.TEMPERROR else ""
    if any(s.result is AuthResult.TEMPERROR for s in facts.signatures):
        return f"{name} lookup failed"
    return ""
