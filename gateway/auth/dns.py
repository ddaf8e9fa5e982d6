"""The one async DNS layer every check uses (dnspython's async resolver).

One place sorts DNS outcomes into three kinds, after mailauth:
* records: a list (possibly following CNAMEs);
* no record: NXDOMAIN or NODATA, returned as an empty list (SPF counts these as void lookups);
* temporary error: timeout, SERVFAIL, REFUSED, no reachable server -> DnsTemporaryError.
A name that cannot be a DNS name (empty or over-long label) is DnsPermanentError.

Answers are cached by dnspython's TTL-respecting cache (negative answers too), so the SPF, DKIM
and DMARC lookups of one message, and of the next messages from the same sender, share it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import dns.reversename

from gateway import metrics
from gateway.errors import DnsPermanentError, DnsTemporaryError
from gateway.message import readable


@dataclass(frozen=True, slots=True, kw_only=True)
class MxRecord:
    preference: int
    exchange: str


class Resolver:
    def __init__(self, nameservers: list[tuple[str, int]], *, timeout_s: float) -> None:
        r = dns.asyncresolver.Resolver(configure=not nameservers)
        if nameservers:
            r.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in nameservers]
        r.timeout = timeout_s
        r.lifetime = timeout_s
        r.retry_servfail = False
        r.use_edns(0, 0, 1232)
        r.cache = dns.resolver.Cache()
        self._r = r
        self.timeout_s = timeout_s
        self.lookups = 0  # asked of this resolver, answered from cache or not

    @property
    def sent(self) -> int:
        """Queries that went to a nameserver (cache misses)."""
        cache = self._r.cache
        assert isinstance(cache, dns.resolver.Cache)
        return int(cache.get_statistics_snapshot().misses)

    async def _query(self, name: str, rdtype: dns.rdatatype.RdataType) -> list[object]:
        try:
            # Labels as given, byte for byte: SPF macros can put any character in a name.
            labels = name.rstrip(".").encode("utf-8").split(b".")
            qname = dns.name.Name([*labels, b""])
        except (dns.name.LabelTooLong, dns.name.EmptyLabel, dns.name.NameTooLong,
                UnicodeEncodeError) as exc:
            raise DnsPermanentError(f"not a DNS name: {name!r} ({type(exc).__name__})") from None
        self.lookups += 1
        count = metrics.get().dns_lookup
        try:
            answer = await self._r.resolve(qname, rdtype, raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN:
            count("nxdomain")
            return []
        except (dns.resolver.LifetimeTimeout, dns.exception.Timeout):
            count("timeout")
            raise DnsTemporaryError(f"DNS timeout for {name} {rdtype.name}") from None
        except dns.resolver.NoNameservers:
            count("servfail")
            raise DnsTemporaryError(f"DNS server failure for {name} {rdtype.name}") from None
        except dns.resolver.YXDOMAIN:
            count("error")
            raise DnsPermanentError(f"DNS name too long after expansion: {name}") from None
        except dns.exception.DNSException as exc:
            count("error")
            raise DnsTemporaryError(f"DNS error for {name}: {type(exc).__name__}") from None
        count("answer")
        return list(answer.rrset) if answer.rrset is not None else []

    async def txt(self, name: str) -> list[bytes]:
        """TXT records, each with its strings joined (RFC 7208 3.3, RFC 6376 3.6.2.2)."""
        return [b"".join(r.strings) for r in await self._query(name, dns.rdatatype.TXT)]  # type: ignore[attr-defined]

    async def a(self, name: str) -> list[str]:
        return [r.address for r in await self._query(name, dns.rdatatype.A)]  # type: ignore[attr-defined]

    async def aaaa(self, name: str) -> list[str]:
        return [r.address for r in await self._query(name, dns.rdatatype.AAAA)]  # type: ignore[attr-defined]

    async def mx(self, name: str) -> list[MxRecord]:
        return [MxRecord(preference=r.preference, exchange=r.exchange.to_text(omit_final_dot=True))  # type: ignore[attr-defined]
                for r in await self._query(name, dns.rdatatype.MX)]

    async def ptr(self, ip: str) -> list[str]:
        rev = dns.reversename.from_address(str(ipaddress.ip_address(ip))).to_text()
        return [r.target.to_text(omit_final_dot=True)  # type: ignore[attr-defined]
                for r in await self._query(rev, dns.rdatatype.PTR)]

    async def dkim_txt(self, name: str) -> bytes | None:
        """The DKIM key record at `name` (dkimpy wants one string or None)."""
        records = await self.txt(name)
        return records[0] if records else None


def a_label(host: str) -> str:
    """The host as DNS knows it (IDNA A-labels, RFC 8616 for the names of internationalised
    addresses); "" when it cannot be one."""
    if host.isascii():
        return host
    host = readable(host)  # raw UTF-8 the parser left escaped
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return ""
