"""The gateway behind a front proxy or MTA: PROXY protocol (a real HAProxy in front) and
Postfix's XCLIENT. The real client's address is what SPF, DMARC and the limits see; a PROXY
header or XCLIENT from anyone not trusted is refused and logged."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import pytest

from gateway.config import Config
from gateway.service import running
from gateway.smtp import parse_xclient
from tests.conftest import DOMAIN, make_config
from tests.support.certs import self_signed
from tests.support.dnsserver import ThreadedDnsServer
from tests.support.sink import Sink

# The client is 127.0.0.2; the proxy (or front MTA) reaches the gateway from 127.0.0.1.
# Under p=reject, a gateway that read the proxy's address would refuse the mail (550).
ZONE = {
    "expediteur.test": [("TXT", "v=spf1 ip4:127.0.0.2 -all")],
    "_dmarc.expediteur.test": [("TXT", "v=DMARC1; p=reject")],
}
CLIENT = "127.0.0.2"


def message(subject: str = "Compte rendu") -> bytes:
    return (f"From: Laboratoire <resultats@expediteur.test>\r\nTo: <docteur@{DOMAIN}>\r\n"
            f"Subject: {subject}\r\nDate: Tue, 01 Dec 2026 10:00:00 +0100\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@expediteur.test>\r\n\r\n"
            f"Bonjour.\r\n").encode()


def gateway_config(tmp_path: Path, sink: Sink, smtp: dict) -> Config:
    return make_config(tmp_path / "data", next_hop={"address": sink.address, "starttls": "off"},
                       smtp=smtp)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[callable]:  # type: ignore[valid-type]
    """A real HAProxy (Debian's package) in TCP mode, sending PROXY v2 to the gateway."""
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(binary).exists():
        pytest.skip("haproxy is not installed (make system-deps installs it)")
    procs: list[subprocess.Popen[bytes]] = []

    def start(backend_port: int, version: str = "send-proxy-v2") -> int:
        front = free_port()
        conf = tmp_path / f"haproxy-{front}.cfg"
        conf.write_text(
            "global\n  maxconn 100\n"
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n"
            "  timeout server 30s\n"
            f"frontend mx\n  bind 127.0.0.1:{front}\n  default_backend gateway\n"
            f"backend gateway\n  server gw 127.0.0.1:{backend_port} {version} "
            "source 127.0.0.1\n")
        proc = subprocess.Popen([binary, "-db", "-f", str(conf)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        procs.append(proc)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else b""
            try:
                socket.create_connection(("127.0.0.1", front), timeout=0.2).close()
                return front
            except OSError:
                time.sleep(0.05)
        raise AssertionError("haproxy did not open its port")

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


async def send_from_client(port: int, *, start_tls: bool = False,
                           subject: str = "Compte rendu") -> str:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, source_address=(CLIENT, 0),
                             start_tls=start_tls, validate_certs=False, timeout=20)
    async with client:
        _, reply = await client.sendmail("resultats@expediteur.test", [f"docteur@{DOMAIN}"],
                                         message(subject))
    return reply


@pytest.mark.promise("front-proxy-trusted-only")
@pytest.mark.parametrize("version", ["send-proxy-v2", "send-proxy"])
async def test_behind_haproxy_spf_is_evaluated_on_the_real_client(
        tmp_path: Path, sink: Sink, dns_zone: ThreadedDnsServer, haproxy, version: str,
        caplog: pytest.LogCaptureFixture):
    dns_zone.load(ZONE)
    cert, key = self_signed(tmp_path)
    cfg = gateway_config(tmp_path, sink, {"proxy_protocol_hosts": ["127.0.0.1/32"],
                                          "tls_cert": str(cert), "tls_key": str(key)})
    caplog.set_level(logging.INFO)
    async with running(cfg) as gw:
        front = haproxy(gw.port, version)
        reply = await send_from_client(front)
        got = await sink.get()
        # STARTTLS makes a new session: the client stays the one the header named.
        tls_reply = await send_from_client(front, start_tls=True, subject="Chiffre")
        tls_got = await sink.get()
    assert reply.startswith("2.0.0") and tls_reply.startswith("2.0.0")
    for received in (got, tls_got):
        head = received.data.split(b"\r\n\r\n", 1)[0].decode()
        assert "spf=pass" in head and "dmarc=pass" in head, head
        assert f"[{CLIENT}]" in head.split("Received:", 2)[1], head  # our Received header
    events = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "message"]
    assert [getattr(r, "fields", {}).get("client") for r in events] == [CLIENT, CLIENT]


async def test_a_direct_client_still_works_beside_the_proxy(
        tmp_path: Path, sink: Sink, dns_zone: ThreadedDnsServer):
    """Trust is per connection: a client that is not the proxy talks plain SMTP."""
    dns_zone.load(ZONE)
    cfg = gateway_config(tmp_path, sink, {"proxy_protocol_hosts": ["127.0.0.1/32"]})
    async with running(cfg) as gw:
        reply = await send_from_client(gw.port)
        got = await sink.get()
    assert reply.startswith("2.0.0")
    assert b"spf=pass" in got.data


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    lines = []
    while True:
        line = await asyncio.wait_for(reader.readline(), 10)
        lines.append(line)
        if not line or line[3:4] != b"-":
            return b"".join(lines)


@pytest.mark.promise("front-proxy-trusted-only")
async def test_a_proxy_header_from_an_untrusted_client_is_refused_and_logged(
        tmp_path: Path, sink: Sink, caplog: pytest.LogCaptureFixture):
    cfg = gateway_config(tmp_path, sink, {"proxy_protocol_hosts": ["127.0.0.9/32"]})
    caplog.set_level(logging.INFO)
    v2 = (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11, 0, 12])
          + socket.inet_aton("192.0.2.1") + socket.inet_aton("127.0.0.1") + b"\x15\xb3\x00\x19")
    async with running(cfg) as gw:
        for header in (b"PROXY TCP4 192.0.2.1 127.0.0.1 5555 25\r\n", v2):
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            assert (await read_reply(reader)).startswith(b"220 ")
            writer.write(header)
            replies = b""
            while True:
                reply = await read_reply(reader)
                if not reply:
                    break
                replies += reply
            writer.close()
            # v2's signature reads as two empty lines first (500 each), then refused.
            assert replies.endswith(b"554 5.7.1 En-tete PROXY refuse : cette adresse n'est "
                                    b"pas un mandataire de confiance\r\n"), replies
            assert b"250" not in replies
    refused = [r for r in caplog.records
               if r.getMessage() == "PROXY header refused: not from smtp.proxy_protocol_hosts"]
    assert [r.fields["version"] for r in refused] == ["v1", "v2"]  # type: ignore[attr-defined]
    assert all(r.fields["client"] == "127.0.0.1" for r in refused)  # type: ignore[attr-defined]
    assert sink.empty()


async def test_a_trusted_proxy_must_send_its_header(tmp_path: Path, sink: Sink):
    """From the proxy's address, plain SMTP is not taken as a client's: the connection ends
    without a greeting (a header that does not parse), or past the header's timeout."""
    cfg = gateway_config(tmp_path, sink, {"proxy_protocol_hosts": ["127.0.0.1/32"],
                                          "proxy_protocol_timeout_s": 1})
    async with running(cfg) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"EHLO client.example\r\nMAIL FROM:<a@expediteur.test>\r\n")
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        said = await asyncio.wait_for(reader.read(), 10)  # nothing sent: the timeout
        writer.close()
        assert not said.startswith(b"220")
    assert sink.empty()


# ---- XCLIENT ----

async def command(writer: asyncio.StreamWriter, reader: asyncio.StreamReader, line: str) -> str:
    writer.write(line.encode() + b"\r\n")
    await writer.drain()
    return (await read_reply(reader)).decode()


@pytest.mark.promise("front-proxy-trusted-only")
async def test_xclient_from_a_trusted_front_mta_names_the_client_and_its_helo(
        tmp_path: Path, sink: Sink, dns_zone: ThreadedDnsServer):
    dns_zone.load(ZONE)
    cfg = gateway_config(tmp_path, sink, {"xclient_hosts": ["127.0.0.1/32"]})
    async with running(cfg) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        assert (await read_reply(reader)).startswith(b"220 ")
        ehlo = await command(writer, reader, "EHLO front.fournisseur.test")
        assert "250-XCLIENT ADDR NAME PORT PROTO HELO LOGIN DESTADDR DESTPORT\r\n" in ehlo
        # Not inside a transaction.
        assert (await command(writer, reader, "MAIL FROM:<x@front.test>")).startswith("250")
        assert (await command(writer, reader, f"XCLIENT ADDR={CLIENT}")).startswith("503 ")
        assert (await command(writer, reader, "RSET")).startswith("250")
        # Postfix's syntax exactly; the values in xtext (+2E is ".").
        greeting = await command(writer, reader, f"XCLIENT ADDR={CLIENT} NAME=mail.expediteur"
                                 "+2Etest PORT=40123 HELO=mail.expediteur.test PROTO=ESMTP")
        assert greeting.startswith("220 mx.cabinet.test "), greeting
        # A new session: the front MTA says EHLO again, with its own name.
        assert (await command(writer, reader, "EHLO front.fournisseur.test")).startswith("250")
        assert (await command(writer, reader, "MAIL FROM:<resultats@expediteur.test>"
                              )).startswith("250")
        # The session is now the named client's, who may not use XCLIENT (Postfix's rule).
        assert (await command(writer, reader, f"XCLIENT ADDR={CLIENT}")).startswith("550 ")
        assert (await command(writer, reader, f"RCPT TO:<docteur@{DOMAIN}>")).startswith("250")
        assert (await command(writer, reader, "DATA")).startswith("354")
        writer.write(message() + b".\r\n")
        assert (await read_reply(reader)).startswith(b"250 2.0.0")
        await command(writer, reader, "QUIT")
        writer.close()
        got = await sink.get()
    head = got.data.split(b"\r\n\r\n", 1)[0].decode()
    assert "spf=pass" in head and "dmarc=pass" in head, head
    ours = head.split("Received:", 2)[1]
    assert "mail.expediteur.test" in ours and f"[{CLIENT}]" in ours, ours
    assert "front.fournisseur.test" not in ours, ours  # XCLIENT's HELO, not the front's


@pytest.mark.promise("front-proxy-trusted-only")
async def test_xclient_from_anyone_else_is_refused(tmp_path: Path, sink: Sink,
                                                   dns_zone: ThreadedDnsServer,
                                                   caplog: pytest.LogCaptureFixture):
    dns_zone.load(ZONE)
    cfg = gateway_config(tmp_path, sink, {"xclient_hosts": ["127.0.0.9/32"]})
    caplog.set_level(logging.INFO)
    async with running(cfg) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        await read_reply(reader)
        ehlo = await command(writer, reader, "EHLO client.example")
        assert "XCLIENT" not in ehlo
        refused = await command(writer, reader, f"XCLIENT ADDR={CLIENT} HELO=mail.expediteur.test")
        assert refused.startswith("550 5.7.1 XCLIENT refuse"), refused
        # The session goes on as the client it is: SPF fails for 127.0.0.1, p=reject -> 550.
        assert (await command(writer, reader, "MAIL FROM:<resultats@expediteur.test>"
                              )).startswith("250")
        assert (await command(writer, reader, f"RCPT TO:<docteur@{DOMAIN}>")).startswith("250")
        assert (await command(writer, reader, "DATA")).startswith("354")
        writer.write(message() + b".\r\n")
        assert (await read_reply(reader)).startswith(b"550 ")
        writer.close()
    assert [r.fields["client"] for r in caplog.records  # type: ignore[attr-defined]
            if r.getMessage() == "XCLIENT refused: not from smtp.xclient_hosts"] == ["127.0.0.1"]
    assert sink.empty()


@pytest.mark.parametrize(("arg", "ok"), [
    ("ADDR=127.0.0.2", True),
    ("ADDR=IPV6:2001:db8::1 PORT=25", True),
    ("addr=127.0.0.2 helo=mx+2Eexemple+2Efr", True),
    ("ADDR=[UNAVAILABLE] HELO=x", True),  # parsed; the command then refuses the address
    ("ADDR=", False),
    ("ADDR", False),
    ("COLOUR=blue", False),
    ("HELO=a+0Db", False),  # a CR smuggled in xtext
    ("HELO=a+zz", False),
    ("", False),
])
def test_xclient_arguments(arg: str, ok: bool):
    parsed = parse_xclient(arg)
    assert (parsed is not None) == ok, parsed
    if arg.startswith("addr="):
        assert parsed == {"ADDR": "127.0.0.2", "HELO": "mx.exemple.fr"}


async def test_xclient_refuses_what_it_cannot_use(tmp_path: Path, sink: Sink):
    cfg = gateway_config(tmp_path, sink, {"xclient_hosts": ["127.0.0.1/32"]})
    async with running(cfg) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        await read_reply(reader)
        await command(writer, reader, "EHLO front.example")
        for bad in ("XCLIENT ADDR=[UNAVAILABLE]", "XCLIENT ADDR=mail.example",
                    "XCLIENT PORT=99999", "XCLIENT PROTO=HTTP", "XCLIENT HELO=a+0Db"):
            assert (await command(writer, reader, bad)).startswith("501 5.5.4 XCLIENT"), bad
        writer.close()


@pytest.mark.promise("front-proxy-trusted-only")
async def test_a_client_behind_the_proxy_never_inherits_its_xclient_right(
        tmp_path: Path, sink: Sink, dns_zone: ThreadedDnsServer, haproxy):
    """One front host both proxy and MTA (one address in both lists): the clients it proxies
    are judged on their own address, not on the front host's."""
    dns_zone.load(ZONE)
    cfg = gateway_config(tmp_path, sink, {"proxy_protocol_hosts": ["127.0.0.1/32"],
                                          "xclient_hosts": ["127.0.0.1/32"]})
    async with running(cfg) as gw:
        front = haproxy(gw.port)
        reader, writer = await asyncio.open_connection("127.0.0.1", front,
                                                       local_addr=("127.0.0.3", 0))
        assert (await read_reply(reader)).startswith(b"220 ")
        assert "XCLIENT" not in await command(writer, reader, "EHLO attaquant.example")
        forged = await command(writer, reader, f"XCLIENT ADDR={CLIENT} HELO=mail.expediteur.test")
        assert forged.startswith("550 5.7.1 XCLIENT refuse"), forged
        writer.close()
    assert sink.empty()


def test_xclient_values_are_utf8_xtext():
    assert parse_xclient("HELO=h+C3+A9llo+2Eexemple") == {"HELO": "héllo.exemple"}
    assert parse_xclient("HELO=h+C3llo") is None  # not UTF-8


async def test_the_health_probe_speaks_proxy_where_the_gateway_expects_it(
        tmp_path: Path, sink: Sink):
    from gateway import cli
    cfg = gateway_config(tmp_path, sink, {"proxy_protocol_hosts": ["127.0.0.0/8"]})
    async with running(cfg) as gw:
        conf = tmp_path / "gateway.toml"
        conf.write_text(f'[gateway]\ndomains = ["{DOMAIN}"]\n[smtp]\nlisten = '
                        f'"127.0.0.1:{gw.port}"\nproxy_protocol_hosts = ["127.0.0.0/8"]\n')
        assert await asyncio.to_thread(cli.main, ["health", "--config", str(conf)]) == 0


async def test_a_helo_cannot_write_a_trace_of_its_own(gateway, sink: Sink):
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    await read_reply(reader)
    await command(writer, reader, "EHLO mail.banque.example ([198.51.100.7]) by mx.banque.example")
    for line in ("MAIL FROM:<a@labo.example>", f"RCPT TO:<docteur@{DOMAIN}>", "DATA"):
        assert (await command(writer, reader, line))[:1] in "23"
    writer.write(b"Subject: x\r\n\r\ncorps\r\n.\r\n")
    assert (await read_reply(reader)).startswith(b"250")
    writer.close()
    got = await sink.get()
    ours = got.data.split(b"\r\n", 1)[0].decode()
    assert ours.startswith("Received: from mail.banque.example ([127.0.0.1]) by mx.cabinet.test"), ours
    assert "198.51.100.7" not in ours
