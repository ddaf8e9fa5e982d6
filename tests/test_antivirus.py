"""ClamAV as a check, against a real clamd on a Unix socket in a temporary folder with a
signature database the test writes (tests/support/clamd.py): a file only its signature
knows is refused, ClamAV's heuristics are signs, and clamd down, hung or refusing a stream
follows the failure contract (451 by default, the sender retries; judged on the rest when
the admin chose to fail open)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import zipfile
from collections.abc import AsyncIterator
from email import message_from_bytes
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest

from gateway.clamd import max_scan_time_ms, stream_max_from
from gateway.cli import to_crlf
from gateway.message import Inbound
from gateway.service import build_runtime, running
from gateway.symbols import Action
from tests.conftest import DOMAIN, make_config
from tests.support.clamd import EICAR, MARKER_SIGNATURE, SAMPLE, ClamdServer, require_clamd
from tests.support.sink import Sink
from tests.test_attachments import message_with


@pytest.fixture
async def clamd(tmp_path: Path) -> AsyncIterator[ClamdServer]:
    server = ClamdServer(tmp_path / "clamd")
    await server.start()
    yield server
    await server.stop()


def engine(address: str, **extra: object) -> dict:
    return {"clamav": {"enabled": True, "address": address, **extra}}


async def send(port: int, data: bytes) -> str:
    _, reply = await aiosmtplib.send(data, sender="resultats@labo.example",
                                     recipients=[f"docteur@{DOMAIN}"], hostname="127.0.0.1",
                                     port=port, start_tls=False, timeout=30)
    return reply


async def refused(port: int, data: bytes) -> aiosmtplib.SMTPDataError:
    with pytest.raises(aiosmtplib.SMTPDataError) as exc:
        await send(port, data)
    return exc.value


def zipped(name: str, data: bytes, *, encrypted: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, data)
    out = bytearray(buf.getvalue())
    if encrypted:  # the "encrypted" flag (bit 0) in the local header and the directory
        out[out.find(b"PK\x03\x04") + 6] |= 1
        out[out.find(b"PK\x01\x02") + 8] |= 1
    return bytes(out)


async def verdict(cfg, raw: bytes):
    rt = await build_runtime(cfg, with_store=False)
    try:
        return (await rt.pipeline.analyse(Inbound(
            queue_id="t", peer_ip="192.0.2.1", helo="mail.labo.example", mail_from="",
            rcpts=(f"docteur@{DOMAIN}",), raw=raw))).verdict
    finally:
        await rt.close()


def names(v) -> set[str]:
    return {s.name for s in v.symbols}


@pytest.mark.promise("engines-fail-closed")
async def test_a_file_only_clamav_knows_is_refused_with_french_550(tmp_path: Path, sink: Sink,
                                                                   clamd: ClamdServer):
    raw = message_with("rapport.dat", SAMPLE)
    hop = {"address": sink.address, "starttls": "off"}
    # Without ClamAV the gateway finds nothing in it (no YARA rule, type or name matches).
    async with running(make_config(tmp_path / "off", next_hop=hop)) as gw:
        assert (await send(gw.port, raw)).startswith("2.0.0 Message accepte et transmis")
    assert (await sink.get()).data.endswith(raw)
    async with running(make_config(tmp_path / "on", next_hop=hop,
                                   engines=engine(clamd.socket))) as gw:
        err = await refused(gw.port, raw)
    assert err.code == 550
    assert "logiciel malveillant" in err.message
    await sink.settled()
    assert sink.empty()


async def test_eicar_in_an_archive_names_its_signature(tmp_path: Path, clamd: ClamdServer):
    v = await verdict(make_config(tmp_path, engines=engine(clamd.socket)),
                      message_with("documents.zip", zipped("lisezmoi.txt", EICAR)))
    assert "ANTIVIRUS_MALWARE" in names(v)
    assert v.action is Action.REJECT
    hit = next(s for s in v.symbols if s.name == "ANTIVIRUS_MALWARE")
    assert "Gateway.Test.EICAR" in hit.description
    assert "Gateway.Test.EICAR" in hit.detail


async def test_held_instead_of_refused_when_the_admin_chooses(tmp_path: Path, sink: Sink,
                                                              clamd: ClamdServer):
    cfg = make_config(tmp_path, next_hop={"address": sink.address, "starttls": "off"},
                      engines=engine(clamd.socket, on_malware="quarantine"))
    async with running(cfg) as gw:
        reply = await send(gw.port, message_with("rapport.dat", SAMPLE))
        assert reply.startswith("2.0.0 Message accepte et mis en quarantaine")
        assert gw.runtime.store is not None
        (item,) = await gw.runtime.store.list_items()
    assert item.action == "quarantine"
    held = [s for s in item.symbols if s.name == "ANTIVIRUS_MALWARE_HELD"]
    assert held and MARKER_SIGNATURE in held[0].detail
    await sink.settled()
    assert sink.empty()


async def test_an_encrypted_archive_is_a_sign_not_a_verdict(tmp_path: Path, clamd: ClamdServer):
    v = await verdict(make_config(tmp_path, engines=engine(clamd.socket)),
                      message_with("facture.zip", zipped("facture.pdf", b"%PDF-1.4\n" * 50,
                                                         encrypted=True)))
    assert "ANTIVIRUS_ENCRYPTED" in names(v)
    assert "ANTIVIRUS_MALWARE" not in names(v)
    hit = next(s for s in v.symbols if s.name == "ANTIVIRUS_ENCRYPTED")
    assert "Heuristics.Encrypted.Zip" in hit.detail


async def test_clean_mail_scores_nothing(tmp_path: Path, clamd: ClamdServer):
    v = await verdict(make_config(tmp_path, engines=engine(clamd.socket)),
                      message_with("compte-rendu.txt", b"Compte rendu de consultation.\n"))
    assert not {n for n in names(v) if n.startswith("ANTIVIRUS_")}


@pytest.mark.promise("engines-fail-closed")
async def test_clamd_stopped_mid_run_gives_451_and_the_gateway_recovers(tmp_path: Path,
                                                                        sink: Sink,
                                                                        clamd: ClamdServer):
    clean = message_with("compte-rendu.txt", b"Compte rendu de consultation.\n")
    cfg = make_config(tmp_path, next_hop={"address": sink.address, "starttls": "off"},
                      engines=engine(clamd.socket, connections=1))
    async with running(cfg) as gw:
        assert (await send(gw.port, clean)).startswith("2.0.0")  # a session is now kept open
        await sink.get()
        await clamd.stop()
        err = await refused(gw.port, message_with("rapport.dat", SAMPLE))
        assert err.code == 451
        assert "reessayer" in err.message
        await sink.settled()
        assert sink.empty()
        await clamd.start()
        # The session kept from before is dead: a fresh one is opened, the retry is scanned.
        err = await refused(gw.port, message_with("rapport.dat", SAMPLE))
        assert err.code == 550
        assert (await send(gw.port, clean)).startswith("2.0.0")
    assert (await sink.get()).data.endswith(clean)


class HungClamd:
    """A socket that takes connections and never answers (clamd stuck on a scan)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.connections = 0
        self._server: asyncio.AbstractServer | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> HungClamd:
        async def take(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            self._writers.append(writer)
            with contextlib.suppress(ConnectionError):
                while await reader.read(65536):
                    pass
        self._server = await asyncio.start_unix_server(take, self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for w in self._writers:
            w.close()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


@pytest.mark.promise("engines-fail-closed")
async def test_a_clamd_that_never_answers_gives_451_in_time(tmp_path: Path, sink: Sink):
    async with HungClamd(tmp_path / "hung.sock") as hung:
        cfg = make_config(tmp_path, next_hop={"address": sink.address, "starttls": "off"},
                          engines=engine(hung.path, timeout_s=0.5))
        async with running(cfg) as gw:
            err = await refused(gw.port, message_with("rapport.dat", SAMPLE))
        assert err.code == 451
        assert hung.connections == 1
    await sink.settled()
    assert sink.empty()


async def test_failing_open_is_the_admins_choice_and_is_said(tmp_path: Path, sink: Sink):
    raw = message_with("compte-rendu.txt", b"Compte rendu de consultation.\n")
    cfg = make_config(tmp_path, next_hop={"address": sink.address, "starttls": "off"},
                      engines=engine(str(tmp_path / "absent.sock"), on_failure="open"))
    async with running(cfg) as gw:
        assert (await send(gw.port, raw)).startswith("2.0.0")
    got = message_from_bytes((await sink.get()).data)
    assert "ANTIVIRUS_UNCHECKED" in got["X-Gateway-Symbols"]


async def test_a_message_over_clamds_stream_limit_is_sent_file_by_file(tmp_path: Path):
    require_clamd()
    small = ClamdServer(tmp_path / "clamd", stream_max="8K")
    await small.start()
    try:
        m = EmailMessage()
        m["From"] = "Laboratoire <resultats@labo.example>"
        m["To"] = f"docteur@{DOMAIN}"
        m["Subject"] = "Documents"
        m.set_content("Veuillez trouver les documents ci-joints.")
        m.add_attachment(SAMPLE, maintype="application", subtype="octet-stream",
                         filename="rapport.dat")
        m.add_attachment(b"Annexe\n" * 3000, maintype="text", subtype="plain",
                         filename="annexe.txt")
        raw = to_crlf(bytes(m))
        assert len(raw) > 20_000
        # The limit read from clamd.conf: the message, then the annex, are too large.
        assert stream_max_from(small.conf) == 8192
        v = await verdict(make_config(tmp_path / "a", engines=engine(
            small.socket, clamd_conf=str(small.conf))), raw)
        assert {"ANTIVIRUS_MALWARE", "ANTIVIRUS_TOO_BIG"} <= names(v)
        too_big = next(s for s in v.symbols if s.name == "ANTIVIRUS_TOO_BIG")
        assert "annexe.txt" in too_big.description
        # Not read (no clamd.conf): clamd itself refuses the stream, and the files follow.
        v = await verdict(make_config(tmp_path / "b", engines=engine(
            small.socket, clamd_conf=str(tmp_path / "absent.conf"))), raw)
        assert {"ANTIVIRUS_MALWARE", "ANTIVIRUS_TOO_BIG"} <= names(v)
        assert v.action is Action.REJECT
    finally:
        await small.stop()


def test_stream_max_length_units(tmp_path: Path):
    conf = tmp_path / "clamd.conf"
    conf.write_text("# StreamMaxLength 1M\nStreamMaxLength 10M\nStreamMaxLength 512K\n")
    assert stream_max_from(conf) == 512 * 1024  # the last one counts, as in clamd
    conf.write_text("StreamMaxLength 2G\n")
    assert stream_max_from(conf) == 2 * 1024 ** 3
    conf.write_text("LocalSocket /run/clamd.sock\n")
    assert stream_max_from(conf) is None
    assert stream_max_from(tmp_path / "absent") is None


async def test_readyz_says_when_clamd_does_not_answer(tmp_path: Path, sink: Sink,
                                                      clamd: ClamdServer):
    from tests.test_metrics import poll
    cfg = make_config(tmp_path, next_hop={"address": sink.address, "starttls": "off"},
                      metrics={"listen": "127.0.0.1:0"}, engines=engine(clamd.socket))
    async with running(cfg) as gw:
        assert await poll(gw.metrics_port, "/readyz", 200) == "ready\n"
        await clamd.stop()
        text = await poll(gw.metrics_port, "/readyz", 503)
        assert text == f"antivirus: clamd at {clamd.socket} does not answer\n"
        await clamd.start()
        assert await poll(gw.metrics_port, "/readyz", 200) == "ready\n"


async def small_clamd(tmp_path: Path, stream_max: str = "8K") -> ClamdServer:
    require_clamd()
    server = ClamdServer(tmp_path / f"clamd-{stream_max}", stream_max=stream_max)
    await server.start()
    return server


def unpadded(pad_lines: int) -> bytes:
    """The signed file in base64 with its padding left out (mail readers decode it all the
    same), after two text files that make the message larger than one stream."""
    b64 = base64.encodebytes(SAMPLE).decode().replace("\n", "\r\n").rstrip("\r\n").rstrip("=")
    text = ("annexe " * 10 + "\r\n") * pad_lines
    return (f"From: Laboratoire <resultats@labo.example>\r\nTo: docteur@{DOMAIN}\r\n"
            "Subject: Documents\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/mixed; boundary=B42\r\n\r\n"
            "--B42\r\nContent-Type: text/plain\r\n\r\nCi-joint.\r\n"
            f"--B42\r\nContent-Type: text/plain\r\nContent-Disposition: attachment; "
            f"filename=annexe.txt\r\n\r\n{text}"
            f"--B42\r\nContent-Type: text/plain\r\nContent-Disposition: attachment; "
            f"filename=annexe2.txt\r\n\r\n{text}"
            "--B42\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: "
            "base64\r\nContent-Disposition: attachment; filename=rapport.dat\r\n\r\n"
            f"{b64}\r\n--B42--\r\n").encode()


@pytest.mark.promise("engines-fail-closed")
async def test_what_cannot_be_sent_to_clamd_is_held_never_passed(tmp_path: Path):
    """A file padded past clamd's stream limit, parts past our parser's limits, a part we
    cannot decode: each would reach the mailbox unscanned. Held instead."""
    small = await small_clamd(tmp_path)
    try:
        cfg = make_config(tmp_path / "a", engines=engine(small.socket, clamd_conf=str(small.conf)))
        padded = message_with("rapport.dat", SAMPLE + b"\0" * 20000)
        v = await verdict(cfg, padded)
        assert "ANTIVIRUS_TOO_BIG" in names(v)
        assert v.action is Action.QUARANTINE
        # The limit unknown to the gateway (clamd.conf not readable, as in a container):
        # clamd refuses the stream, and the same follows.
        v = await verdict(make_config(tmp_path / "b", engines=engine(
            small.socket, clamd_conf=str(tmp_path / "absent"))), padded)
        assert "ANTIVIRUS_TOO_BIG" in names(v)
        assert v.action is Action.QUARANTINE
        # Past the parser's part limit, the last file is never walked: held.
        m = EmailMessage()
        m["From"] = "Laboratoire <resultats@labo.example>"
        m["To"] = f"docteur@{DOMAIN}"
        m["Subject"] = "Documents"
        m.set_content("Ci-joint.")
        for i in range(1001):
            m.add_attachment(b"x\n", maintype="text", subtype="plain", filename=f"p{i}.txt")
        m.add_attachment(SAMPLE, maintype="application", subtype="octet-stream",
                         filename="rapport.dat")
        v = await verdict(cfg, to_crlf(bytes(m)))
        assert "ANTIVIRUS_INCOMPLETE" in names(v)
        assert v.action in (Action.QUARANTINE, Action.REJECT)
    finally:
        await small.stop()


async def test_base64_without_its_padding_is_read_as_mail_readers_read_it(tmp_path: Path):
    small = await small_clamd(tmp_path)
    try:
        v = await verdict(make_config(tmp_path / "a", engines=engine(
            small.socket, clamd_conf=str(small.conf))), unpadded(70))
        assert "ANTIVIRUS_MALWARE" in names(v)  # sent file by file, decoded
        assert v.action is Action.REJECT
    finally:
        await small.stop()


def test_max_scan_time_is_read(tmp_path: Path):
    conf = tmp_path / "clamd.conf"
    conf.write_text("MaxScanTime 120000\n")
    assert max_scan_time_ms(conf) == 120000
    conf.write_text("LocalSocket /x\n")
    assert max_scan_time_ms(conf) is None


async def test_a_reload_closes_the_sessions_of_the_check_it_replaced(tmp_path: Path, sink: Sink,
                                                                     clamd: ClamdServer):
    """The replaced check's sessions to clamd are closed once no message can still use them
    (after the message budget), not left open at each SIGHUP."""
    cfg = make_config(tmp_path, next_hop={"address": sink.address, "starttls": "off"},
                      scoring={"message_budget_s": 0.5}, engines=engine(clamd.socket))
    async with running(cfg) as gw:
        assert (await send(gw.port, message_with("cr.txt", b"Compte rendu.\n"))).startswith("2.0.0")
        before = gw.runtime.pipeline.check("antivirus")
        idle = list(before._clamd._idle)  # type: ignore[union-attr]
        assert len(idle) == 1 and not idle[0].writer.is_closing()
        assert await gw.reload() is None
        assert gw.runtime.pipeline.check("antivirus") is not before
        async with asyncio.timeout(10):
            while not idle[0].writer.is_closing():
                await asyncio.sleep(0.05)
        # The new check scans on sessions of its own.
        assert (await send(gw.port, message_with("cr.txt", b"Compte rendu.\n"))).startswith("2.0.0")
