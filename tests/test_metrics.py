"""Monitoring: /metrics (read with prometheus_client's own parser) summed across the serving
processes of a real `gateway serve`, /healthz, and /readyz failing when the next hop is down."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiosmtplib
from prometheus_client.parser import text_string_to_metric_families

from gateway.service import running
from tests.conftest import DNS, DOMAIN, make_config
from tests.support.sink import Sink
from tests.test_cli import free_port, wait_port


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=20) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def send(port: int, i: int) -> None:
    msg = (f"From: <a@labo.example>\r\nSubject: n{i}\r\nMessage-ID: <m{i}@labo.example>\r\n"
           f"Date: Tue, 01 Dec 2026 10:00:00 +0100\r\n\r\ncorps {i}\r\n").encode()
    _, reply = await aiosmtplib.send(msg, sender="a@labo.example",
                                     recipients=[f"docteur@{DOMAIN}"], hostname="127.0.0.1",
                                     port=port, start_tls=False)
    assert reply.startswith("2.0.0")


def serving_pids(proc_pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(proc_pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


async def test_metrics_sum_the_serving_processes_and_survive_their_restart(tmp_path: Path):
    port, mport = free_port(), free_port()
    data = tmp_path / "data"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--listen", f"127.0.0.1:{port}",
         "--domain", DOMAIN, "--data-dir", str(data), "--workers", "2", "--dns", DNS.address,
         "--web-listen", "", "--metrics-listen", f"127.0.0.1:{mport}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_port(port, proc)
        wait_port(mport, proc)
        # Four at a time: one client's share of next-hop slots per process is 5 (10 / 2).
        await asyncio.gather(*(send(port, i) for i in range(4)))
        await asyncio.gather(*(send(port, i) for i in range(4, 6)))
        # A client left connected, then every serving process killed: the parent starts new
        # ones. What the dead counted stays; their open session leaves the gauge.
        idle = socket.create_connection(("127.0.0.1", port), timeout=20)
        assert idle.makefile("rb").readline().startswith(b"220")
        first = serving_pids(proc.pid)
        assert len(first) == 2
        for pid in first:
            os.kill(pid, signal.SIGKILL)
        idle.close()
        deadline = time.monotonic() + 30
        while not (len(serving_pids(proc.pid)) == 2 and not set(serving_pids(proc.pid)) & set(first)):
            assert time.monotonic() < deadline, "serving processes not restarted"
            time.sleep(0.1)
        wait_port(port, proc)
        await asyncio.gather(*(send(port, i) for i in range(6, 10)))
        await asyncio.gather(*(send(port, i) for i in range(10, 12)))
        values = scrape(mport)
        status, text = get(mport, "/healthz")
        assert (status, text) == (200, "ok\n")
        status, text = get(mport, "/readyz")  # the embedded Maildir: writable
        assert (status, text) == (200, "ready\n")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, stderr = proc.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert proc.returncode == 0, stderr
    key = ("gateway_messages_total", (("action", "accept"), ("direction", "inbound"),
                                      ("outcome", "delivered")))
    assert values[key] == 12, {k: v for k, v in values.items() if k[0].startswith("gateway_m")}
    # The folder (in memory) is gone with the gateway.
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    [folder] = [e["metrics_folder"] for e in events if e["msg"] == "gateway starting"]
    assert folder.startswith("/dev/shm/gateway-metrics-") and not Path(folder).exists()
    assert values[("gateway_smtp_sessions", ())] == 0
    assert values[("gateway_next_hop_replies_total", (("reply", "250"),))] == 12
    assert values[("gateway_next_hop_seconds_count", ())] == 12
    # Every check's duration: one observation per message each (SPF among them).
    assert values[("gateway_check_seconds_count", (("check", "spf"),))] == 12
    assert values[("gateway_symbols_total", (("symbol", "SPF_NONE"),))] == 12
    assert values[("gateway_dns_lookups_total", (("result", "nxdomain"),))] >= 12
    assert values[("gateway_quarantine_items", ())] == 0
    assert values[("gateway_worker_jobs", (("state", "waiting"),))] == 0
    # The Grafana dashboard asks only for what the gateway exports.
    dashboard = json.loads((Path(__file__).resolve().parents[1] / "docker" /
                            "grafana-dashboard.json").read_text())
    asked = {name for panel in dashboard["panels"] for target in panel["targets"]
             for name in re.findall(r"gateway_\w+", target["expr"])}
    assert asked and asked <= {name for name, _ in values}, asked - {n for n, _ in values}
    # The log of each message agrees.
    assert len([e for e in events if e.get("event") == "message"]) == 12


async def poll(port: int, path: str, status: int, within_s: float = 20) -> str:
    """The answer of `path` once it has `status` (the readiness answer is kept 5 s)."""
    deadline = time.monotonic() + within_s
    while True:
        got, text = await asyncio.to_thread(get, port, path)
        if got == status:
            return text
        assert time.monotonic() < deadline, (got, text)
        await asyncio.sleep(0.2)


async def test_readyz_fails_when_the_next_hop_is_down(tmp_path: Path, sink: Sink):
    cfg = make_config(tmp_path / "data", next_hop={"address": sink.address, "starttls": "off"},
                      metrics={"listen": "127.0.0.1:0"})
    async with running(cfg) as gw:
        mport = gw.metrics_port
        assert await poll(mport, "/readyz", 200) == "ready\n"
        await sink.stop()
        text = await poll(mport, "/readyz", 503)
        assert text.startswith(f"next hop smtp:{sink.address}: "), text
        assert text.strip() != f"next hop smtp:{sink.address}:", "the reason is said"
        assert (await asyncio.to_thread(get, mport, "/healthz")) == (200, "ok\n")
        await sink.start()
        assert await poll(mport, "/readyz", 200) == "ready\n"


async def test_readyz_probes_the_next_hop_once_however_many_ask(tmp_path: Path):
    """A next hop that accepts and never greets; 40 requests at once: one connection."""
    accepted = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.read()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    hop = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    cfg = make_config(tmp_path / "data", next_hop={"address": hop, "starttls": "off",
                                                   "timeout_s": 2},
                      metrics={"listen": "127.0.0.1:0"})
    try:
        async with running(cfg) as gw:
            answers = await asyncio.gather(*(asyncio.to_thread(get, gw.metrics_port, "/readyz")
                                             for _ in range(40)))
        assert {status for status, _ in answers} == {503}
        assert len(accepted) == 1
    finally:
        for writer in accepted:
            writer.close()
        server.close()
