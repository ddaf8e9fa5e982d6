"""Reputation by DNS: the sending server's address on DNS block lists (Spamhaus ZEN), and the
domains of the sender, the Reply-To and the links on domain lists (Spamhaus DBL, SURBL,
URIBL), through the gateway's own resolver.

What the answers mean is data (rules/reputation.toml). A list's "query refused" answers
(public resolver, over quota) are logged once and never scored; a list that does not answer
in time is skipped: reputation is evidence for the score, and its absence is not a verdict
(it never delays or holds mail on its own). The lists are queried only when the resolver is
not a public one, which they refuse (see README), and within `max_queries` per message.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from gateway.auth.dmarc import org_domain
from gateway.auth.dns import Resolver
from gateway.checks.base import CheckContext, CheckResult, Facts, Hit, Services, Unavailable
from gateway.checks.content import message_content
from gateway.config import read_toml
from gateway.errors import ConfigError, DnsPermanentError, DnsTemporaryError
from gateway.message import Direction, ParsedMessage

log = logging.getLogger(__name__)
CACHE_S = 300.0  # answers kept per serving process
CACHE_ENTRIES = 20_000

# Resolvers the lists refuse to answer (Spamhaus: 127.255.255.254; URIBL: 127.0.0.1).
PUBLIC_RESOLVERS = frozenset({
    "8.8.8.8", "8.8.4.4", "1.1.1.1", "1.0.0.1", "9.9.9.9", "149.112.112.112",
    "208.67.222.222", "208.67.220.220", "94.140.14.14", "94.140.15.15", "76.76.2.0",
    "2001:4860:4860::8888", "2001:4860:4860::8844", "2606:4700:4700::1111",
    "2606:4700:4700::1001", "2620:fe::fe", "2620:fe::9",
})
_NOT_ROUTED = [ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "127.0.0.0/8",
    "169.254.0.0/16", "fc00::/7", "fe80::/10", "::1/128")]


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockList:
    zone: str
    codes: dict[str, str]
    bits: dict[int, str]
    refused: frozenset[str]

    def symbols(self, answers: list[str]) -> list[str] | None:
        """The symbols the answers mean; None when the list refused the query."""
        found: list[str] = []
        for answer in answers:
            if answer in self.refused:
                return None
            if not answer.startswith("127."):
                continue  # not a list answer (a wildcard, a hijacked NXDOMAIN)
            if answer in self.codes:
                found.append(self.codes[answer])
            elif self.bits:
                last = int(answer.rsplit(".", 1)[1])
                found += [s for bit, s in self.bits.items() if last & bit]
            elif not self.codes:
                found.append("DNSBL_LISTED")  # a list the table does not describe
        return found


class ReputationCheck:
    name: ClassVar[str] = "reputation"
    phase: ClassVar[int] = 2
    produces: ClassVar[type[Facts] | None] = None
    directions: ClassVar[frozenset[Direction]] = frozenset({Direction.INBOUND})
    symbols: ClassVar[frozenset[str]] = frozenset({
        "DNSBL_LISTED", "DNSBL_EXPLOITED", "DNSBL_DYNAMIC", "URIBL_LISTED", "URIBL_PHISHING",
    })

    def __init__(self, services: Services) -> None:
        cfg = services.cfg
        self._resolver: Resolver = services.resolver
        self._own = frozenset(d.lower() for d in cfg.domains)
        r = cfg.reputation
        self._max = r.max_queries
        table = _load(cfg.rules_dir / "reputation.toml")
        self._ip_lists = [table.get(z) or _undescribed(z) for z in r.ip_lists]
        self._domain_lists = [table.get(z) or _undescribed(z) for z in r.domain_lists]
        public = _public_resolver(cfg.dns.nameservers)
        self._on = r.enabled and not public and self._max > 0
        if r.enabled and public:
            log.warning("DNS block lists off: the resolver %s is a public one, which the lists "
                        "refuse; set [dns] nameservers to a resolver of your own", public)
        self._refused_logged: set[str] = set()
        self._cache: dict[str, tuple[float, list[str]]] = {}

    async def run(self, msg: ParsedMessage, ctx: CheckContext) -> CheckResult:
        if not self._on:
            return CheckResult(check=self.name)
        queries: list[tuple[BlockList, str, str]] = []  # (list, name to ask, what it is about)
        ip = _reversed(ctx.inbound.peer_ip)
        if ip:
            queries += [(bl, f"{ip}.{bl.zone}", ctx.inbound.peer_ip) for bl in self._ip_lists]
        for domain in self._domains(msg, ctx):
            queries += [(bl, f"{domain}.{bl.zone}", domain) for bl in self._domain_lists]
        queries = queries[:self._max]
        answers = await asyncio.gather(*(self._ask(name) for _, name, _ in queries))
        hits: dict[str, Hit] = {}
        for (bl, _, about), got in zip(queries, answers, strict=True):
            symbols = bl.symbols(got)
            if symbols is None:
                if bl.zone not in self._refused_logged:
                    self._refused_logged.add(bl.zone)
                    log.warning("DNS block list %s refused the query (%s): not scored; is the "
                                "resolver a public or a shared one?", bl.zone, ",".join(got))
                continue
            for symbol in symbols:
                if symbol not in hits:
                    hits[symbol] = Hit(symbol=symbol, detail=f"{about} on {bl.zone}",
                                       args=(("listed", about), ("zone", bl.zone)))
        return CheckResult(check=self.name, hits=tuple(hits.values()))

    def _domains(self, msg: ParsedMessage, ctx: CheckContext) -> list[str]:
        """The sites the message sends its reader to or comes from: the registrable
        domains of the From, the Reply-To and the links, the practice's own left out."""
        hosts = [a.rpartition("@")[2] for a in (*msg.from_addresses[:1], *msg.reply_to())]
        content = message_content(ctx)
        if not isinstance(content, Unavailable):
            hosts += [link.host for link in content.links if link.host]
        seen: dict[str, None] = {}
        for host in hosts:
            host = host.lower().rstrip(".>")
            if not host or "." not in host or _is_ip(host.strip("[]")):
                continue
            site = org_domain(host)
            if site not in self._own and site not in seen:
                seen[site] = None
        return list(seen)

    async def _ask(self, name: str) -> list[str]:
        """The list's answer for `name`, from this process's cache when asked in the last
        CACHE_S seconds: lists answer "not listed" without a TTL the resolver can keep
        (NXDOMAIN without SOA from some mirrors), and each query counts against their quota."""
        now = time.monotonic()
        cached = self._cache.get(name)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            answers = await self._resolver.a(name)
        except (DnsTemporaryError, DnsPermanentError) as exc:
            log.debug("DNS block list query %s: %s", name, exc)
            return []  # not cached: asked again next time
        if len(self._cache) >= CACHE_ENTRIES:
            self._cache.clear()
        self._cache[name] = (now + CACHE_S, answers)
        return answers


def _load(path: Path) -> dict[str, BlockList]:
    data = read_toml(path, "block lists")
    lists: dict[str, BlockList] = {}
    try:
        for spec in data.get("list", []):
            zone = str(spec["zone"]).lower().rstrip(".")
            lists[zone] = BlockList(
                zone=zone, codes={str(k): str(v) for k, v in spec.get("codes", {}).items()},
                bits={int(k): str(v) for k, v in spec.get("bits", {}).items()},
                refused=frozenset(str(a) for a in spec.get("refused", [])))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    for bl in lists.values():
        unknown = {*bl.codes.values(), *bl.bits.values()} - ReputationCheck.symbols
        if unknown:
            raise ConfigError(f"{path}: {bl.zone}: unknown symbol(s) {', '.join(sorted(unknown))}")
    return lists


def _undescribed(zone: str) -> BlockList:
    return BlockList(zone=zone.lower().rstrip("."), codes={}, bits={}, refused=frozenset())


def _public_resolver(nameservers: tuple[str, ...]) -> str:
    """The public resolver among those the gateway asks ("" if none): the configured ones,
    or the machine's (/etc/resolv.conf)."""
    hosts = [n.rsplit(":", 1)[0].strip("[]") if n.count(":") == 1 or n.startswith("[") else n
             for n in nameservers]
    if not hosts:
        try:
            lines = Path("/etc/resolv.conf").read_text().splitlines()
        except OSError:
            lines = []
        hosts = [line.split()[1] for line in lines
                 if line.startswith("nameserver") and len(line.split()) > 1]
    return next((h for h in hosts if h in PUBLIC_RESOLVERS), "")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _reversed(peer: str) -> str:
    """The address as block lists want it (1.2.3.4 -> 4.3.2.1; IPv6 in nibbles), "" for
    addresses no list knows (private, loopback)."""
    try:
        ip = ipaddress.ip_address(peer)
    except ValueError:
        return ""
    if any(ip in net for net in _NOT_ROUTED if net.version == ip.version):
        return ""
    if ip.version == 4:
        return ".".join(reversed(str(ip).split(".")))
    return ".".join(reversed(ip.exploded.replace(":", "")))


CHECKS = (ReputationCheck,)
