"""The commands as an admin runs them: `gateway serve` (several processes) and `gateway scan`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiosmtplib

from tests.conftest import DNS, DOMAIN


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("gateway did not open its port")


async def test_serve_on_embedded_default_delivers_to_maildir(tmp_path: Path):
    port, web_port = free_port(), free_port()
    data = tmp_path / "data"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--listen", f"127.0.0.1:{port}",
         "--domain", DOMAIN, "--data-dir", str(data), "--workers", "2", "--dns", DNS.address,
         "--web-listen", f"127.0.0.1:{web_port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_port(port, proc)
        wait_port(web_port, proc)
        # The web page, served by one of the serving processes, answers (login first).
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/connexion", timeout=10) as r:
            assert r.status == 200 and "Connexion" in r.read().decode()
        for i in range(10):
            msg = (f"From: <a@labo.example>\r\nSubject: n{i}\r\n"
                   f"Date: Sat, 28 Nov 2026 10:00:00 +0100\r\n\r\ncorps {i}\r\n").encode()
            _, reply = await aiosmtplib.send(msg, sender="a@labo.example",
                                             recipients=[f"docteur@{DOMAIN}"],
                                             hostname="127.0.0.1", port=port, start_tls=False)
            assert reply.startswith("2.0.0")
        # The container's HEALTHCHECK: a client's greeting, through the serving processes.
        health = subprocess.run([sys.executable, "-m", "gateway", "health", "--listen",
                                 f"127.0.0.1:{port}", "--domain", DOMAIN],
                                capture_output=True, text=True, timeout=30)
        assert health.returncode == 0, health.stderr
        assert health.stdout.strip() == f"SMTP 127.0.0.1:{port} : en service"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the serving processes too
            raise
    assert proc.returncode == 0, stderr
    health = subprocess.run([sys.executable, "-m", "gateway", "health", "--listen",
                             f"127.0.0.1:{port}", "--domain", DOMAIN],
                            capture_output=True, text=True, timeout=30)
    assert health.returncode == 1
    assert health.stderr.strip() == f"SMTP 127.0.0.1:{port} : pas de réponse (connexion refusée)"
    box = data / "maildir" / f"docteur@{DOMAIN}" / "new"
    delivered = sorted(p.read_bytes() for p in box.iterdir())
    assert len(delivered) == 10
    assert all(m.startswith(f"Delivered-To: docteur@{DOMAIN}\nReceived: ".encode())
               for m in delivered)
    assert {m.rsplit(b"corps ", 1)[1] for m in delivered} == {f"{i}\n".encode() for i in range(10)}
    # One structured log line per message, with no subject or body.
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    summaries = [e for e in events if e.get("event") == "message"]
    assert len(summaries) == 10
    assert {e["pid"] for e in events if e["msg"] == "SMTP listening"}.__len__() == 2
    assert [e["msg"] for e in events].count("web page listening") == 1
    assert "Subject" not in stderr and "corps" not in stderr
    assert oct(os.stat(data).st_mode & 0o777) == "0o700"


def test_scan_json(tmp_path: Path):
    good = tmp_path / "good.eml"
    good.write_bytes(b"From: a@labo.example\nDate: Sat, 28 Nov 2026 10:00:00 +0100\n"
                     b"Message-ID: <1@labo.example>\nSubject: ok\n\nbonjour\n")
    bad = tmp_path / "bad.eml"
    bad.write_bytes(b"Subject: =?x-unknown?B?????=\nFrom: a@x.example, b@y.example\n\nbody\n")
    res = subprocess.run([sys.executable, "-m", "gateway", "scan", "--json", "--domain", DOMAIN,
                          "--dns", DNS.address, str(good), str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    first, second = (json.loads(line) for line in res.stdout.splitlines())
    assert first["action"] == "accept" and first["file"] == str(good)
    # No DNS records anywhere: authentication finds nothing, structure finds nothing.
    assert {s["name"] for s in first["symbols"]} == {"SPF_NONE", "DKIM_NONE", "ARC_NONE",
                                                     "DMARC_NONE"}
    assert second["file"] == str(bad)
    names = {s["name"] for s in second["symbols"]}
    assert {"FROM_MULTIPLE", "DATE_MISSING", "MESSAGE_ID_MISSING"} <= names
    assert all(s["description"] and isinstance(s["score"], float) for s in second["symbols"])


def test_serve_reports_a_taken_port_by_its_key(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = subprocess.run([sys.executable, "-m", "gateway", "serve", "--listen",
                              f"127.0.0.1:{free_port()}", "--domain", DOMAIN, "--data-dir",
                              str(tmp_path / "data"), "--web-listen", f"127.0.0.1:{port}"],
                             capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert f"web.listen: cannot listen on 127.0.0.1:{port}" in res.stderr
    assert "Traceback" not in res.stderr
