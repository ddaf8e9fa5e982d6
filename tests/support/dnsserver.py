"""A tiny authoritative DNS server on loopback (UDP and TCP) for authentication tests.

Fed a zone dict: name -> list of (type, value), where type is A, AAAA, MX ((pref, host)),
TXT (a string, or a list of strings for a multi-string record), PTR, CNAME; or the bare
markers "TIMEOUT" (never answer for that name) and "SERVFAIL". Names absent from the zone are
NXDOMAIN; present names without records of the asked type answer NODATA. It records the queries.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rrset

Zone = dict[str, list]


def _rdata(rtype: str, value: object) -> dns.rdata.Rdata:
    t = dns.rdatatype.from_text(rtype)
    if rtype in ("TXT", "SPF"):
        strings = value if isinstance(value, list) else [value]
        chunks: list[bytes] = []
        for s in strings:  # a character-string holds at most 255 bytes
            data = s if isinstance(s, bytes) else str(s).encode("utf-8")
            chunks += [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]
        return dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, t, chunks)
    if rtype == "MX":
        pref, host = value  # type: ignore[misc]
        return dns.rdata.from_text(dns.rdataclass.IN, t, f"{pref} {host.rstrip('.')}.")
    if rtype in ("PTR", "CNAME"):
        return dns.rdata.from_text(dns.rdataclass.IN, t, f"{str(value).rstrip('.')}.")
    return dns.rdata.from_text(dns.rdataclass.IN, t, str(value))


class DnsServer:
    def __init__(self) -> None:
        self.zone: Zone = {}
        self.queries: list[tuple[str, str]] = []
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def load(self, zone: Zone) -> None:
        self.zone = {k.lower().rstrip("."): v for k, v in zone.items()}
        self.queries = []

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Serve on `host` (loopback; docker/test.sh's peer container: its own address),
        on `port`, or on a free port for both transports."""
        loop = asyncio.get_running_loop()
        for _ in range(20):
            if not port:
                with socket.socket() as s:
                    s.bind((host, 0))
                    port = s.getsockname()[1]
            try:
                self._tcp = await asyncio.start_server(self._tcp_client, host, port)
                self._udp, _ = await loop.create_datagram_endpoint(
                    lambda: _Udp(self), local_addr=(host, port))
            except OSError:
                if self._tcp:
                    self._tcp.close()
                port = 0
                continue
            self.port = port
            return
        raise RuntimeError("no free port for the DNS server")

    async def stop(self) -> None:
        if self._udp:
            self._udp.close()
        if self._tcp:
            self._tcp.close()
            await self._tcp.wait_closed()

    def answer(self, wire: bytes, *, tcp: bool) -> bytes | None:
        query = dns.message.from_wire(wire)
        q = query.question[0]
        name = b".".join(q.name.labels[:-1]).decode("utf-8", "replace").lower()
        rtype = dns.rdatatype.to_text(q.rdtype)
        self.queries.append((name, rtype))
        resp = dns.message.make_response(query)
        resp.flags |= dns.flags.AA
        records = self.zone.get(name)
        if records is not None and "TIMEOUT" in records and not any(
                isinstance(r, tuple) and r[0] in (rtype, "CNAME") for r in records):
            return None  # the name times out for the types it has no records of
        if records is not None and "SERVFAIL" in records:
            resp.set_rcode(dns.rcode.SERVFAIL)
        elif records is None:
            resp.set_rcode(dns.rcode.NXDOMAIN)
        else:
            self._fill(resp, name, rtype, depth=0, owner=q.name)
        limit = 65535 if tcp else max(query.payload, 512) if query.edns >= 0 else 512
        try:
            return resp.to_wire(max_size=limit)
        except dns.exception.TooBig:
            short = dns.message.make_response(query)
            short.flags |= dns.flags.TC
            return short.to_wire()

    def _fill(self, resp: dns.message.Message, name: str, rtype: str, depth: int,
              owner: dns.name.Name) -> None:
        records = self.zone.get(name, [])
        cnames = [v for r in records if isinstance(r, tuple) for k, v in [r] if k == "CNAME"]
        if cnames and rtype != "CNAME" and depth < 8:
            rrset = dns.rrset.RRset(owner, dns.rdataclass.IN, dns.rdatatype.CNAME)
            rrset.add(_rdata("CNAME", cnames[0]), ttl=300)
            resp.answer.append(rrset)
            target = str(cnames[0]).lower().rstrip(".")
            if target in self.zone and "TIMEOUT" not in self.zone[target]:
                self._fill(resp, target, rtype, depth + 1, dns.name.from_text(target))
            return
        matching = [v for r in records if isinstance(r, tuple) for k, v in [r] if k == rtype]
        if matching:
            rrset = dns.rrset.RRset(owner, dns.rdataclass.IN, dns.rdatatype.from_text(rtype))
            for value in matching:
                rrset.add(_rdata(rtype, value), ttl=300)
            resp.answer.append(rrset)

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (n,) = struct.unpack(">H", await reader.readexactly(2))
                out = self.answer(await reader.readexactly(n), tcp=True)
                if out is None:
                    continue
                writer.write(struct.pack(">H", len(out)) + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        out = self.server.answer(data, tcp=False)
        if out is not None and self.transport is not None:
            self.transport.sendto(out, addr)


class ThreadedDnsServer:
    """The server on its own event loop in a thread, for a whole test session: tests and
    subprocesses point at `address`, and change the zone with `load()`."""

    def __init__(self) -> None:
        import threading
        self.server = DnsServer()
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self.server.start())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="test-dns", daemon=True)
        self._thread.start()
        ready.wait(10)

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def queries(self) -> list[tuple[str, str]]:
        """The (name, type) queries received since the last load, oldest first."""
        return list(self.server.queries)

    def load(self, zone: Zone) -> None:
        """Swap the zone in the server's own thread, and return once it is swapped: the
        next query gets the new zone whole (one assignment), never the old one."""
        async def swap() -> None:
            self.server.load(zone)
        asyncio.run_coroutine_threadsafe(swap(), self._loop).result(10)

    def close(self) -> None:
        fut = asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop)
        fut.result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
