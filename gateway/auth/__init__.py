"""Sender authentication, one module per standard (after mailauth): each holds its algorithm,
its check, the facts it hands to later checks and its own Authentication-Results fragment.

    dns.py    the one async DNS layer (dnspython), shared by all of them
    spf.py    RFC 7208 check_host(), the SPF check, SpfFacts
    dkim.py   RFC 6376/8463 with dkimpy, keys on our resolver, DkimFacts
    arc.py    RFC 8617 chain validation, ArcFacts
    dmarc.py  RFC 7489 records, discovery, alignment, the DMARC check, DmarcFacts

This module holds what they share: the RFC 8601 result values and property quoting.
"""

from __future__ import annotations

import enum


class AuthStatus(enum.Enum):
    """RFC 8601 result values shared by SPF, DKIM, DMARC and ARC."""

    PASS = "pass"
    FAIL = "fail"
    SOFTFAIL = "softfail"
    NEUTRAL = "neutral"
    NONE = "none"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"
    POLICY = "policy"


def ar_value(value: str) -> str:
    """An Authentication-Results property value, quoted when not a plain token (RFC 8601 2.2)."""
    if value and all(c.isalnum() or c in "-._@+/=" for c in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
