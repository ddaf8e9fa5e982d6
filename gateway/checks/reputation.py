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
from gateway.auth.dns import Resolver, a_label
from gateway.checks.base import CheckContext, CheckResult, Facts, Hit, Services, Unavailable
from gateway.checks.content import message_content
from gateway.config import read_toml
from gateway.errors import ConfigError, DnsPermanentError, DnsTemporaryError
from gateway.message import Direction, ParsedMessage
from gateway.netaddr import parse_ip
from gateway.senders import Registry, load_registry

log = logging.getLogger(__name__)
CACHE_S = 300.0  # answers kept per serving process
FAILURE_CACHE_S = 30.0  # a list that did not answer is not asked again this long
CACHE_ENTRIES = 20_000
WAIT_S = 1.0  # the longest a message waits for the lists

# Public resolvers, which the lists refuse to answer (Spamhaus: 127.255.255.254; URIBL:
# 127.0.0.1): Google, Cloudflare, Quad9, OpenDNS, AdGuard, Control D, the /24 or /48 of each.
# A local forwarder to them (systemd-resolved's 127.0.0.53) cannot be told from here: the
# lists' refusal answers turn them off then (`_refusing`).
_PUBLIC = [ipaddress.ip_network(n) for n in (
    "8.8.8.0/24", "8.8.4.0/24", "1.1.1.0/24", "1.0.0.0/24", "9.9.9.0/24", "149.112.112.0/24",
    "208.67.222.0/24", "208.67.220.0/24", "94.140.14.0/24", "94.140.15.0/24", "76.76.2.0/24",
    "76.76.10.0/24", "2001:4860:4860::/48", "2606:4700:4700::/48", "2620:fe::/48",
    "2620:119:35::/48", "2620:119:53::/48", "2a10:50c0::/32")]
_NOT_ROUTED = [ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "127.0.0.0/8",
    "169.254.0.0/16", "fc00::/7", "fe80::/10", "::1/128")]


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockList:
    zone: str
    codes: dict[str, str]
    bits: dict[int, str]
    refused: frozenset[str]

    def symbols(self, answers: list[str], *, domain: bool) -> list[str] | None:
        """The symbols the answers mean; None when the list refused the query. A list the
        table does not describe is read by the common convention: 127.0.0.2-127.0.1.255
        listed, 127.255.255.x refused, anything else ignored."""
        found: list[str] = []
        for answer in answers:
            if answer in self.refused or answer.startswith("127.255.255."):
                return None
            if not answer.startswith(("127.0.0.", "127.0.1.")):
                continue  # not a list answer (a wildcard, a hijacked NXDOMAIN)
            if answer in self.codes:
                found.append(self.codes[answer])
            elif self.bits:
                last = int(answer.rsplit(".", 1)[1])
                found += [s for bit, s in self.bits.items() if last & bit]
            elif not self.codes and answer not in ("127.0.0.0", "127.0.0.1"):
                found.append("URIBL_LISTED" if domain else "DNSBL_LISTED")
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
        # Sites of rules/senders/ and rules/brands/: asked of no list, so that links to them
        # (a newsletter's, a phisher's filler) do not spend the budget.
        self._known = Registry([*load_registry(cfg.rules_dir / "senders"),
                                *load_registry(cfg.rules_dir / "brands")])
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
        self._refusing: set[str] = set()  # lists that refused this process's queries
        self._cache: dict[str, tuple[float, list[str]]] = {}
        self._asking: dict[str, asyncio.Future[list[str]]] = {}  # queries in flight
        self._late: set[asyncio.Future[list[str]]] = set()  # answers no message waits for

    async def run(self, msg: ParsedMessage, ctx: CheckContext) -> CheckResult:
        if not self._on:
            return CheckResult(check=self.name)
        # (list, name to ask, what it is about, a domain?)
        queries: list[tuple[BlockList, str, str, bool]] = []
        ip = _reversed(ctx.inbound.peer_ip)
        if ip:
            queries += [(bl, f"{ip}.{bl.zone}", ctx.inbound.peer_ip, False)
                        for bl in self._ip_lists if bl.zone not in self._refusing]
        for domain in self._domains(msg, ctx):
            queries += [(bl, f"{domain}.{bl.zone}", domain, True)
                        for bl in self._domain_lists if bl.zone not in self._refusing]
        queries = queries[:self._max]
        # A list that does not answer is waited for WAIT_S at most: evidence, not a verdict,
        # and no reason to make every message wait the resolver's whole timeout.
        tasks = [asyncio.ensure_future(self._ask(name)) for _, name, _, _ in queries]
        if tasks:
            await asyncio.wait(tasks, timeout=WAIT_S)
        hits: dict[str, Hit] = {}
        for (bl, _, about, is_domain), task in zip(queries, tasks, strict=True):
            if not task.done():
                # Left to finish in the background: its answer (or its failure) is kept
                # for the next messages, which then do not wait for it.
                self._late.add(task)
                task.add_done_callback(self._late.discard)
                continue
            got = task.result()
            symbols = bl.symbols(got, domain=is_domain)
            if symbols is None:
                # Refused (a public or shared resolver, over quota): asked no more by this
                # process until it restarts, and said once.
                self._refusing.add(bl.zone)
                log.warning("DNS block list %s refused the query (%s): not scored, and not "
                            "asked again until restart; is the resolver a public or a shared "
                            "one?", bl.zone, ",".join(got))
                continue
            for symbol in symbols:
                if symbol not in hits:
                    hits[symbol] = Hit(symbol=symbol, detail=f"{about} on {bl.zone}",
                                       args=(("listed", about), ("zone", bl.zone)))
        return CheckResult(check=self.name, hits=tuple(hits.values()))

    def _domains(self, msg: ParsedMessage, ctx: CheckContext) -> list[str]:
        """The sites the message sends its reader to or comes from, in the order they are
        asked within the budget: the From, the Reply-To, the links of its files (QR codes,
        PDFs: appended last to the links, where filler links would push them out), then
        the body's links; registrable domains in their A-label (xn--) form, the practice's
        own left out."""
        hosts = [a.rpartition("@")[2] for a in (*msg.from_addresses[:1], *msg.reply_to())]
        content = message_content(ctx)
        if not isinstance(content, Unavailable):
            files = [link.host for link in content.links if link.host and not link.text]
            hosts += files[::-1] + [link.host for link in content.links if link.host]
        seen: dict[str, None] = {}
        for host in dict.fromkeys(hosts):
            host = a_label(host.lower().strip().rstrip(".>"))
            if not host or "." not in host or (
                    (host[0].isdigit() or host[0] == "[") and parse_ip(host.strip("[]"))):
                continue
            site = org_domain(host)
            if site in self._own or site in seen or self._known.owner(site) is not None:
                continue  # the practice's own, and the brands' and health senders': no list
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
        pending = self._asking.get(name)
        if pending is not None:  # the same question in flight for another message
            return await asyncio.shield(pending)
        future: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self._asking[name] = future
        try:
            try:
                answers, keep = await self._resolver.a(name), CACHE_S
            except (DnsTemporaryError, DnsPermanentError) as exc:
                log.debug("DNS block list query %s: %s", name, exc)
                answers, keep = [], FAILURE_CACHE_S  # no answer: not asked again for a while
            if len(self._cache) >= CACHE_ENTRIES:
                self._cache.clear()
            self._cache[name] = (now + keep, answers)
            future.set_result(answers)
            return answers
        finally:
            del self._asking[name]
            if not future.done():  # cancelled: whoever waits on it asks again
                future.cancel()


def _load(path: Path) -> dict[str, BlockList]:
    data = read_toml(path, "listes de blocage")
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
        hosts = [words[1] for words in (line.split() for line in lines)
                 if len(words) > 1 and words[0] == "nameserver"]
    for host in hosts:
        ip = parse_ip(host.strip())
        if ip is not None and any(ip in net for net in _PUBLIC):
            return str(ip)
    return ""




def _reversed(peer: str) -> str:
    """The address as block lists want it (1.2.3.4 -> 4.3.2.1; IPv6 in nibbles), "" for
    addresses no list knows (private, loopback)."""
    ip = parse_ip(peer)  # IPv4-mapped IPv6 unmapped: lists know the IPv4 address
    if ip is None:
        return ""
    if any(ip in net for net in _NOT_ROUTED if net.version == ip.version):
        return ""
    if ip.version == 4:
        return ".".join(reversed(str(ip).split(".")))
    return ".".join(reversed(ip.exploded.replace(":", "")))


CHECKS = (ReputationCheck,)
