"""Client addresses: parsing, networks, and the key one client is counted under."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(values: Sequence[str]) -> list[IPNetwork]:
    return [ipaddress.ip_network(v, strict=False) for v in values]


def parse_ip(text: str) -> IP | None:
    """An address as a peer gives it (zone id dropped, IPv4-mapped IPv6 unmapped)."""
    try:
        ip = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def within(ip: IP | None, nets: Sequence[IPNetwork]) -> bool:
    return ip is not None and any(ip.version == n.version and ip in n for n in nets)


def client_key(address: str) -> str:
    """What one client is counted under by the limits (next-hop slots, login throttling):
    its IPv4 address, or its IPv6 /64 (what one host is given, so that it cannot change
    address to start afresh)."""
    ip = parse_ip(address)
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip) if ip is not None else address
