"""SPF (RFC 7208): check_host(), async on the gateway's resolver, and the check of the MAIL FROM
identity (HELO when MAIL FROM is empty).

Every mechanism and modifier, macros (section 7), include/redirect, the limit of 10 DNS-querying
terms and of 2 void lookups (4.6.4), exists/ptr, IPv6. Checked against the RFC 7208 test suite
(tests/test_spf.py). Written here rather than taken from pyspf, whose lookups are synchronous
and go around the gateway's resolver and cache.
"""

from __future__ import annotations

import ipaddress
import re
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import ClassVar

from gateway.auth import AuthStatus, ar_value
from gateway.auth.dns import Resolver
from gateway.checks.base import CheckContext, CheckResult, Facts, Hit, Services
from gateway.errors import DnsPermanentError, DnsTemporaryError
from gateway.message import Direction, Inbound, ParsedMessage


@dataclass(frozen=True, slots=True, kw_only=True)
class SpfFacts(Facts):
    method: ClassVar[str] = "spf"
    result: AuthStatus
    domain: str
    identity: str  # "mailfrom" or "helo"

    def ar(self, inbound: Inbound) -> list[str]:
        if self.identity == "mailfrom":
            return [f"spf={self.result.value} smtp.mailfrom="
                    f"{ar_value(inbound.mail_from or self.domain)}"]
        return [f"spf={self.result.value} smtp.helo={ar_value(self.domain)}"]


MAX_LOOKUPS = 10
MAX_VOID = 2
MAX_MX_PTR = 10

IP = ipaddress.IPv4Address | ipaddress.IPv6Address


_QUALIFIERS = {"+": AuthStatus.PASS, "-": AuthStatus.FAIL, "~": AuthStatus.SOFTFAIL,
               "?": AuthStatus.NEUTRAL}


@dataclass(frozen=True, slots=True, kw_only=True)
class SpfOutcome:
    result: AuthStatus
    domain: str  # the domain checked (MAIL FROM's, or HELO's)
    identity: str  # "mailfrom" or "helo"
    mechanism: str = ""  # the term that decided, for logs
    explanation: str = ""  # from exp=, on fail
    reason: str = ""  # why permerror/temperror, for logs


class _Perm(Exception):
    pass


class _Temp(Exception):
    pass


@dataclass(slots=True)
class _State:
    resolver: Resolver
    ip: IP
    sender: str
    helo: str
    receiver: str
    lookups: int = 0
    void: int = 0
    validated: dict[str, bool] = field(default_factory=dict)

    def count_lookup(self) -> None:
        self.lookups += 1
        if self.lookups > MAX_LOOKUPS:
            raise _Perm(f"more than {MAX_LOOKUPS} DNS-querying terms")

    def count_void(self, records: list[object]) -> None:
        if not records:
            self.void += 1
            if self.void > MAX_VOID:
                raise _Perm(f"more than {MAX_VOID} void lookups")


async def check_host(resolver: Resolver, ip: str, domain: str, sender: str, helo: str, *,
                     receiver: str = "unknown", identity: str = "mailfrom") -> SpfOutcome:
    """RFC 7208 section 4: the SPF result for `ip` sending as `sender` (MAIL FROM, or
    postmaster@HELO) on behalf of `domain`."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    local, _, sender_domain = sender.rpartition("@")
    if not sender_domain:
        sender_domain = domain
    sender = f"{local or 'postmaster'}@{sender_domain}"
    state = _State(resolver=resolver, ip=addr, sender=sender, helo=helo, receiver=receiver)
    domain = domain.rstrip(".")
    if not _valid_domain(domain):
        return SpfOutcome(result=AuthStatus.NONE, domain=domain, identity=identity,
                          reason="not a valid domain name")
    try:
        result, term, explanation = await _check(state, domain, depth=0)
    except _Perm as exc:
        return SpfOutcome(result=AuthStatus.PERMERROR, domain=domain, identity=identity,
                          reason=str(exc))
    except _Temp as exc:
        return SpfOutcome(result=AuthStatus.TEMPERROR, domain=domain, identity=identity,
                          reason=str(exc))
    return SpfOutcome(result=result, domain=domain, identity=identity, mechanism=term,
                      explanation=explanation)


def _valid_domain(domain: str) -> bool:
    labels = domain.split(".")
    return (len(labels) >= 2 and all(0 < len(label) <= 63 for label in labels)
            and len(domain) <= 253)


async def _txt(state: _State, name: str) -> list[bytes]:
    try:
        return await state.resolver.txt(name)
    except DnsTemporaryError as exc:
        raise _Temp(str(exc)) from None
    except DnsPermanentError:
        return []


async def _record(state: _State, domain: str) -> str | None:
    """The domain's one SPF record (4.4, 4.5); None when it has none."""
    records = [r for r in await _txt(state, domain)
               if re.match(rb"v=spf1( |$)", r, re.IGNORECASE)]
    if len(records) > 1:
        raise _Perm(f"{domain} has {len(records)} SPF records")
    if not records:
        return None
    if re.search(rb"[^\x20-\x7e]", records[0]):
        raise _Perm(f"{domain}: SPF record holds characters other than printable ASCII")
    return records[0].decode("ascii")


_MECHANISMS = ("all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists")
_MODIFIER = re.compile(r"^([a-zA-Z][a-zA-Z0-9_.\-]*)=(.*)$", re.DOTALL)
_MECH = re.compile(r"^([+\-~?]?)([a-zA-Z0-9]+)(?::(.*?))?((?:/\d+)?(?://\d+)?)$", re.DOTALL)
_CIDR = re.compile(r"^(?:/(0|[1-9]\d{0,2}))?(?://(0|[1-9]\d{0,2}))?$")


@dataclass(frozen=True, slots=True)
class _Term:
    qualifier: AuthStatus
    name: str
    arg: str | None
    cidr4: int
    cidr6: int
    text: str


def _parse(record: str) -> tuple[list[_Term], str | None, str | None]:
    """Mechanisms, redirect and exp of a record; any syntax error is permerror (4.6)."""
    terms: list[_Term] = []
    redirect = exp = None
    for text in record.split(" ")[1:]:
        if not text:
            continue
        mod = _MODIFIER.match(text)
        if mod:
            name, value = mod.group(1).lower(), mod.group(2)
            _check_macro_string(value)
            if name in ("redirect", "exp"):
                if (redirect if name == "redirect" else exp) is not None:
                    raise _Perm(f"two {name} modifiers")
                _check_domain_spec(value)
                if name == "redirect":
                    redirect = value
                else:
                    exp = value
            continue  # unknown modifiers are ignored (6)
        terms.append(_mechanism(text))
    return terms, redirect, exp


def _mechanism(text: str) -> _Term:
    m = _MECH.match(text)
    if not m or m.group(2).lower() not in _MECHANISMS:
        raise _Perm(f"unknown term {text!r}")
    qual, name, arg, cidr = m.group(1), m.group(2).lower(), m.group(3), m.group(4)
    c = _CIDR.match(cidr)
    if not c:
        raise _Perm(f"bad CIDR in {text!r}")
    single, double = c.group(1), c.group(2)
    cidr4 = int(single) if single else 32
    cidr6 = int(double) if double else 128
    if name in ("all", "include", "exists", "ptr") and cidr:
        raise _Perm(f"{name} takes no CIDR length")
    if name == "all" and arg is not None:
        raise _Perm("all takes no argument")
    if name in ("include", "exists") and not arg:
        raise _Perm(f"{name} needs a domain")
    if name in ("ip4", "ip6"):
        if not arg or double is not None:
            raise _Perm(f"bad {name} term {text!r}")
        try:
            addr = ipaddress.ip_address(arg)
        except ValueError:
            raise _Perm(f"bad address in {text!r}") from None
        if (name == "ip4") != (addr.version == 4):
            raise _Perm(f"bad address in {text!r}")
        if name == "ip6":
            cidr4, cidr6 = 32, int(single) if single else 128
    elif arg is not None:
        _check_macro_string(arg)
        _check_domain_spec(arg)
    if cidr4 > 32 or cidr6 > 128:
        raise _Perm(f"CIDR length out of range in {text!r}")
    return _Term(qualifier=_QUALIFIERS.get(qual, AuthStatus.PASS), name=name, arg=arg,
                 cidr4=cidr4, cidr6=cidr6, text=text)


_MACRO = re.compile(r"%(?:\{([a-zA-Z])(\d*)(r?)([.\-+,/_=]*)\}|(%)|(_)|(-))")


def _check_macro_string(value: str) -> None:
    rest = _MACRO.sub("", value)
    if "%" in rest:
        raise _Perm(f"bad macro in {value!r}")
    for m in _MACRO.finditer(value):
        if m.group(1) and m.group(1).lower() not in "slodiphvcrt":
            raise _Perm(f"unknown macro letter in {value!r}")


def _check_domain_spec(value: str) -> None:
    """domain-spec must end in a macro or a valid top label (RFC 7208 7.1); the c, r and t
    macros belong to explanation text only."""
    if not value:
        raise _Perm("empty domain-spec")
    for m in _MACRO.finditer(value):
        if m.group(1) and m.group(1).lower() in "crt":
            raise _Perm(f"macro {m.group(1)} outside an explanation: {value!r}")
    if value.endswith("}"):
        return
    top = value.rstrip(".").rsplit(".", 1)
    label = top[-1]
    if len(top) < 2 or not re.fullmatch(r"[a-zA-Z0-9]*[a-zA-Z][a-zA-Z0-9]*|"
                                        r"[a-zA-Z0-9]+-[a-zA-Z0-9\-]*[a-zA-Z0-9]", label):
        raise _Perm(f"invalid domain-spec {value!r}")


async def _check(state: _State, domain: str, depth: int) -> tuple[AuthStatus, str, str]:
    if depth > 20:
        raise _Perm("include/redirect loop")
    record = await _record(state, domain)
    if record is None:
        return AuthStatus.NONE, "", ""
    terms, redirect, exp = _parse(record)
    for term in terms:
        if await _matches(state, term, domain, depth):
            explanation = ""
            if term.qualifier is AuthStatus.FAIL and exp:
                explanation = await _explain(state, exp, domain)
            return term.qualifier, term.text, explanation
    if redirect is not None:
        state.count_lookup()
        target = (await _expand(state, redirect, domain)).rstrip(".")
        if not _valid_domain(target):
            raise _Perm(f"redirect to invalid domain {target!r}")
        result, decided_by, explanation = await _check(state, target, depth + 1)
        if result is AuthStatus.NONE:
            raise _Perm(f"redirect target {target} has no SPF record")
        return result, decided_by, explanation
    return AuthStatus.NEUTRAL, "(default)", ""


async def _matches(state: _State, term: _Term, domain: str, depth: int) -> bool:
    name = term.name
    if name == "all":
        return True
    if name in ("ip4", "ip6"):
        assert term.arg is not None
        net = ipaddress.ip_network(f"{term.arg}/{term.cidr4 if name == 'ip4' else term.cidr6}",
                                   strict=False)
        return net.version == state.ip.version and state.ip in net
    state.count_lookup()
    target = (await _expand(state, term.arg, domain)).rstrip(".") if term.arg else domain
    if name == "include":
        if not _valid_domain(target):
            raise _Perm(f"include of invalid domain {target!r}")
        result, _, _ = await _check(state, target, depth + 1)
        if result is AuthStatus.PASS:
            return True
        if result in (AuthStatus.FAIL, AuthStatus.SOFTFAIL, AuthStatus.NEUTRAL):
            return False
        if result is AuthStatus.TEMPERROR:
            raise _Temp(f"include:{target}")
        raise _Perm(f"include:{target} gave {result.value}")
    if not _valid_domain(target):
        return False
    if name == "exists":
        records = await _lookup(state, "A", target)
        state.count_void(records)
        return bool(records)
    if name == "a":
        records = await _addresses(state, target)
        state.count_void(records)
        return _in_any(state, records, term)
    if name == "mx":
        mxs = await _lookup(state, "MX", target)
        state.count_void(mxs)
        if len(mxs) > MAX_MX_PTR:
            raise _Perm(f"{target} has more than {MAX_MX_PTR} MX records")
        for mx in mxs:
            if _in_any(state, await _addresses(state, str(mx.exchange)), term):  # type: ignore[attr-defined]
                return True
        return False
    if name == "ptr":
        return any(n == target.lower() or n.endswith("." + target.lower())
                   for n in await _validated_names(state, target))
    raise AssertionError(name)


def _in_any(state: _State, addresses: list[object], term: _Term) -> bool:
    prefix = term.cidr4 if state.ip.version == 4 else term.cidr6
    for a in addresses:
        net = ipaddress.ip_network(f"{a}/{prefix}", strict=False)
        if state.ip in net:
            return True
    return False


async def _lookup(state: _State, rtype: str, name: str) -> list[object]:
    try:
        if rtype == "A":
            return list(await state.resolver.a(name))
        if rtype == "AAAA":
            return list(await state.resolver.aaaa(name))
        if rtype == "MX":
            return list(await state.resolver.mx(name))
        if rtype == "PTR":
            return list(await state.resolver.ptr(name))
    except DnsTemporaryError as exc:
        raise _Temp(str(exc)) from None
    except DnsPermanentError:
        return []
    raise AssertionError(rtype)


async def _addresses(state: _State, name: str) -> list[object]:
    return await _lookup(state, "A" if state.ip.version == 4 else "AAAA", name)


async def _validated_names(state: _State, target: str | None) -> list[str]:
    """PTR names of the client whose forward lookup gives the client back (5.5)."""
    try:
        names = await _lookup(state, "PTR", str(state.ip))
    except _Temp:
        names = []  # a PTR lookup failure is no match, not an error (5.5)
    state.count_void(names)
    out = []
    for name in [str(n).lower() for n in names][:MAX_MX_PTR]:
        try:
            addrs = await _addresses(state, name)
        except _Temp:
            continue
        if any(ipaddress.ip_address(str(a)) == state.ip for a in addrs):
            out.append(name)
    if target is not None:
        # Prefer names within the target domain first, as 5.5 suggests; order does not change
        # the match result.
        out.sort(key=lambda n: not (n == target or n.endswith("." + target)))
    return out


async def _explain(state: _State, exp: str, domain: str) -> str:
    try:
        target = (await _expand(state, exp, domain)).rstrip(".")
        if not _valid_domain(target):
            return ""
        records = await state.resolver.txt(target)
    except (_Perm, _Temp, DnsTemporaryError, DnsPermanentError):
        return ""
    if len(records) != 1:
        return ""
    try:
        text = records[0].decode("ascii")
        _check_macro_string(text)
        return await _expand(state, text, domain, explanation=True)
    except (UnicodeDecodeError, _Perm, _Temp):
        return ""


async def _expand(state: _State, spec: str, domain: str, *, explanation: bool = False) -> str:
    """Macro expansion (section 7)."""
    out: list[str] = []
    pos = 0
    for m in _MACRO.finditer(spec):
        out.append(spec[pos:m.start()])
        pos = m.end()
        if m.group(5):
            out.append("%")
            continue
        if m.group(6):
            out.append(" ")
            continue
        if m.group(7):
            out.append("%20")
            continue
        letter, digits, reverse, delims = m.group(1), m.group(2), m.group(3), m.group(4)
        value = await _macro_value(state, letter.lower(), domain, explanation)
        parts = re.split("[" + re.escape(delims or ".") + "]", value)
        if reverse:
            parts.reverse()
        if digits:
            n = int(digits)
            if n == 0:
                raise _Perm("macro with 0 labels")
            parts = parts[-n:]
        value = ".".join(parts)
        if letter.isupper():
            value = urllib.parse.quote(value, safe="-._~")
        out.append(value)
    out.append(spec[pos:])
    result = "".join(out)
    if not explanation:
        while len(result) > 253 and "." in result:  # keep the right-most labels (7.3)
            result = result.split(".", 1)[1]
    return result


async def _macro_value(state: _State, letter: str, domain: str, explanation: bool) -> str:
    ip = state.ip
    if letter == "s":
        return state.sender
    if letter == "l":
        return state.sender.rpartition("@")[0]
    if letter == "o":
        return state.sender.rpartition("@")[2]
    if letter == "d":
        return domain
    if letter == "i":
        if ip.version == 4:
            return str(ip)
        return ".".join(ip.exploded.replace(":", ""))
    if letter == "v":
        return "in-addr" if ip.version == 4 else "ip6"
    if letter == "h":
        return state.helo
    if letter == "p":
        names = await _validated_names(state, domain)
        return names[0] if names else "unknown"
    if not explanation:
        raise _Perm(f"macro {letter} only allowed in explanations")
    if letter == "c":
        return str(ip)
    if letter == "r":
        return state.receiver
    if letter == "t":
        return str(int(time.time()))
    raise _Perm(f"unknown macro {letter}")


_SYMBOL: dict[AuthStatus, str] = {r: f"SPF_{r.name}" for r in AuthStatus
                                  if r is not AuthStatus.POLICY}


class SpfCheck:
    name: ClassVar[str] = "spf"
    phase: ClassVar[int] = 1
    produces: ClassVar[type[Facts] | None] = SpfFacts
    directions: ClassVar[frozenset[Direction]] = frozenset({Direction.INBOUND})
    symbols: ClassVar[frozenset[str]] = frozenset(_SYMBOL.values())

    def __init__(self, services: Services) -> None:
        self._resolver = services.resolver
        self._receiver = services.cfg.gateway.hostname

    async def run(self, msg: ParsedMessage, ctx: CheckContext) -> CheckResult:
        inbound = ctx.inbound
        mail_from = inbound.mail_from
        if "@" in mail_from:
            domain, identity = mail_from.rpartition("@")[2], "mailfrom"
        else:
            domain, identity = inbound.helo.strip("[]"), "helo"
            mail_from = f"postmaster@{domain}"
        outcome = await check_host(self._resolver, inbound.peer_ip, domain, mail_from,
                                   inbound.helo, receiver=self._receiver, identity=identity)
        result = outcome.result
        detail = f"{identity}={domain} {outcome.mechanism or outcome.reason}".strip()
        args = (("domain", domain), ("identity", "MAIL FROM" if identity == "mailfrom" else "HELO"),
                *((("term", outcome.mechanism[:100]),) if outcome.mechanism else ()))
        return CheckResult.of(self.name, Hit(symbol=_SYMBOL[result], detail=detail[:200],
                                             args=args),
                              facts=SpfFacts(result=result, domain=domain, identity=identity))


CHECKS = (SpfCheck,)
