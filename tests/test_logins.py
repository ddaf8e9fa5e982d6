"""Logins under attack: counters and sessions shared by the serving processes and kept across
restarts, sessions ended by any credential change, slow and malformed HTTP clients."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import subprocess
import sys
from pathlib import Path

import aiosmtplib
import pytest

from gateway.accounts import AccountFile
from gateway.service import running
from tests.conftest import DOMAIN, make_config
from tests.support.sink import Sink
from tests.support.webclient import ADMIN, READER, Client, add_users

ROOT = Path(__file__).resolve().parents[1]


def web_config(data: Path, sink: Sink, **web: object):
    cfg = make_config(data, next_hop={"address": sink.address, "starttls": "off"},
                      web={"listen": "127.0.0.1:0", **web},
                      submission={"listen": "127.0.0.1:0", "lockout_failures": 2})
    if not cfg.web_users_file.exists():
        add_users(AccountFile(cfg.web_users_file))
    return cfg


async def auth_plain(port: int, login: str, password: str) -> int:
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
    await smtp.connect()
    try:
        await smtp.ehlo()
        blob = base64.b64encode(f"\0{login}\0{password}".encode())
        return (await smtp.execute_command(b"AUTH", b"PLAIN", blob)).code
    finally:
        smtp.close()


async def test_submission_failures_are_counted_once_across_serving_processes(
        tmp_path: Path, sink: Sink):
    """Two gateways on one data folder stand for two serving processes (each has its own
    connection to the shared state, as each process has): failures alternate between them and
    the address is locked at the configured count, not at twice it."""
    cfg = web_config(tmp_path / "data", sink)
    async with running(cfg) as first, running(cfg) as second:
        ports = [first.submission_port, second.submission_port]
        codes = [await auth_plain(ports[i % 2], f"inconnu{i}@{DOMAIN}", "mauvais-mot-de-passe")
                 for i in range(8)]  # lockout_failures = 2: the address may fail 8 times
        assert codes == [535] * 8
        for port in ports:  # on either process, whatever the account
            assert await auth_plain(port, f"autre@{DOMAIN}", "mauvais-mot-de-passe") == 454
    # And after a restart.
    async with running(cfg) as again:
        assert await auth_plain(again.submission_port, f"x@{DOMAIN}", "mauvais") == 454


async def test_web_sessions_survive_a_restart_and_lockouts_too(tmp_path: Path, sink: Sink):
    cfg = web_config(tmp_path / "data", sink)
    async with running(cfg) as gw:
        admin = Client(f"http://127.0.0.1:{gw.web_port}")
        assert await admin.login(ADMIN) == 303
        guesser = Client(admin.base, source="127.0.0.5")
        for i in range(20):
            assert await guesser.login(READER.__class__(f"n{i}", "x" * 12, READER.secret,
                                                        "lecteur"), code="000000") == 401
    async with running(cfg) as gw:
        for c in (admin, guesser):
            c.base = f"http://127.0.0.1:{gw.web_port}"
        status, text, _ = await admin.get("/quarantaine")
        assert status == 200 and "Quarantaine" in text  # same cookie, new process
        assert await guesser.login(READER) == 429  # still locked out
        await admin.close()
        await guesser.close()


def cli(data: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "admin", "--domain", DOMAIN,
                           "--data-dir", str(data), *args], input=stdin, text=True,
                          capture_output=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("change", ["passwd", "reset-totp", "remove-user", "role"])
@pytest.mark.promise("web-login-2fa")
async def test_any_credential_change_ends_the_accounts_sessions(tmp_path: Path, sink: Sink,
                                                               change: str):
    cfg = web_config(tmp_path / "data", sink)
    async with running(cfg) as gw:
        base = f"http://127.0.0.1:{gw.web_port}"
        victim, bystander = Client(base), Client(base, source="127.0.0.2")
        try:
            assert await victim.login(READER) == 303
            assert await bystander.login(ADMIN) == 303
            assert (await victim.get("/quarantaine"))[0] == 200
            if change == "role":  # an edit that no command makes: the file itself
                accounts = AccountFile(cfg.web_users_file)
                path = accounts.path
                text = path.read_text().replace('"role": "lecteur"', '"role": "admin"')
                path.write_text(text)
                os.utime(path, ns=(1, 1))  # a new mtime, whatever the clock's resolution
            else:
                res = cli(cfg.data_dir, change, READER.name,
                          *(["--password-stdin"] if change == "passwd" else []),
                          stdin="un-nouveau-mot-de-passe\n")
                assert res.returncode == 0, res.stderr
                if change != "remove-user":
                    assert "1 session(s) ouverte(s)" in res.stdout
            status, _, resp = await victim.get("/quarantaine")
            assert status == 303 and resp.headers["Location"] == "/connexion"
            assert (await bystander.get("/quarantaine"))[0] == 200  # another account: kept
        finally:
            await victim.close()
            await bystander.close()


async def test_slow_http_clients_are_cut(tmp_path: Path, sink: Sink):
    cfg = web_config(tmp_path / "data", sink, header_timeout_s=1, body_timeout_s=1)
    async with running(cfg) as gw:
        loop = asyncio.get_running_loop()

        async def slow(request_head: bytes, trickle: bytes) -> float:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.web_port)
            start = loop.time()
            writer.write(request_head)
            try:
                async with asyncio.timeout(10):
                    for byte in trickle:
                        writer.write(bytes([byte]))
                        await writer.drain()
                        try:
                            if await asyncio.wait_for(reader.read(65536), 0.3) == b"":
                                break  # closed by the page
                        except TimeoutError:
                            continue
                        await reader.read()  # an answer (408), then the end
                        break
            finally:
                writer.close()
            return loop.time() - start

        held = await asyncio.gather(*(slow(b"GET /connexion HTTP/1.1\r\n", b"X-Slow: " + b"a" * 100)
                                      for _ in range(20)))
        assert max(held) < 4, held
        body = b"utilisateur=claire&mot_de_passe=" + b"x" * 100
        took = await slow(b"POST /connexion HTTP/1.1\r\nHost: x\r\nContent-Type: "
                          b"application/x-www-form-urlencoded\r\nContent-Length: "
                          + str(len(body)).encode() + b"\r\n\r\n", body)
        assert took < 4
        # The page still answers.
        client = Client(f"http://127.0.0.1:{gw.web_port}")
        assert (await client.get("/connexion"))[0] == 200
        await client.close()


async def test_malformed_http_is_a_warning_without_traceback(tmp_path: Path, sink: Sink,
                                                             caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    cfg = web_config(tmp_path / "data", sink)
    async with running(cfg) as gw:
        for junk in (b"\x16\x03\x01\x02\x00garbage\r\n\r\n", b"GET / HTTP/1.1\r\nHost\r\n\r\n",
                     b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\n\r\n"):
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.web_port)
            writer.write(junk)
            async with asyncio.timeout(10):
                answer = await reader.read()
            writer.close()
            assert answer[:12] in (b"HTTP/1.0 400", b"HTTP/1.1 400", b"HTTP/1.1 414"), answer
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert any(r.levelno == logging.WARNING and "malformed HTTP" in r.getMessage()
               for r in caplog.records)


async def test_a_client_that_never_reads_its_answers_is_cut(tmp_path: Path, sink: Sink):
    import socket

    from tests.test_hardening import established_to, wait_established

    cfg = web_config(tmp_path / "data", sink, header_timeout_s=1, body_timeout_s=1)
    async with running(cfg) as gw:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", gw.web_port))
        s.setblocking(False)
        request = b"GET /connexion HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 3000
        sent = 0
        try:
            while sent < len(request):
                sent += s.send(request[sent:])
        except BlockingIOError:
            pass  # the page stopped reading: its answers fill our (never read) buffer
        assert sent > 0
        # The page gives up on writing within body_timeout_s and closes its side.
        assert await wait_established(gw.web_port, 0, timeout=10) == 0, \
            established_to(gw.web_port)
        s.close()
        client = Client(f"http://127.0.0.1:{gw.web_port}")
        assert (await client.get("/connexion"))[0] == 200  # still serving
        await client.close()
