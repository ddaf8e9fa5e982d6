#!/usr/bin/env python3
"""Large attachments: do they hold other sessions back?

    python bench/big.py [--size-mb 10] [--seconds 20]

Runs the gateway (every check on) in front of Postfix's smtp-sink, DNS on loopback. Measures
the latency of small messages sent one after the other, first alone, then while two other
clients keep sending messages with a SIZE-MB attachment (a PDF, base64-encoded). Also reports
the large messages' throughput in MB/s.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from email.message import EmailMessage
from multiprocessing import Queue
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import aiosmtplib  # noqa: E402

from bench.run import free_port, process, wait_port  # noqa: E402
from tests.support.dnsserver import ThreadedDnsServer  # noqa: E402


def message(size: int, i: int) -> bytes:
    m = EmailMessage()
    m["From"] = f"user{i}@sender.example"
    m["To"] = "rcpt@corp.example"
    m["Subject"] = f"message {i}"
    m["Date"] = "Thu, 01 Jan 2026 00:00:00 +0000"
    m["Message-ID"] = f"<big-{i}-{size}@sender.example>"
    m.set_content("Bonjour, voici le document.\n")
    if size:
        m.add_attachment(b"%PDF-1.7\n" + os.urandom(size), maintype="application",
                         subtype="pdf", filename="examen.pdf")
    return bytes(m)


async def send(port: int, data: bytes) -> float:
    t0 = time.perf_counter()
    await aiosmtplib.send(data, sender="user@sender.example", recipients=["rcpt@corp.example"],
                          hostname="127.0.0.1", port=port, start_tls=False, timeout=120)
    return time.perf_counter() - t0


async def small_latencies(port: int, seconds: float) -> list[float]:
    out = []
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        out.append(await send(port, message(0, i)))
        i += 1
    return out


async def big_load(port: int, data: bytes, stop: asyncio.Event, sent: list[int]) -> None:
    while not stop.is_set():
        await send(port, data)
        sent.append(len(data))


def big_process(port: int, size: int, seconds: float, out: Queue[int]) -> None:
    """The large-message senders, in a process of their own: their client-side work (the
    client library's pass over 14 MB) must not stall the small-message client's loop."""
    async def run() -> None:
        big = message(size, 9999)
        stop = asyncio.Event()
        sent: list[int] = []
        loaders = [asyncio.create_task(big_load(port, big, stop, sent)) for _ in range(2)]
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.gather(*loaders)
        out.put(sum(sent))
        out.put(len(sent))
    asyncio.run(run())


async def measure(port: int, size: int, seconds: float) -> dict[str, object]:
    alone = await small_latencies(port, seconds / 2)
    queue: Queue[int] = multiprocessing.Queue()
    loader = multiprocessing.Process(target=big_process, args=(port, size, seconds, queue))
    t0 = time.perf_counter()
    loader.start()
    await asyncio.sleep(1)  # let the large messages start flowing
    loaded = await small_latencies(port, seconds - 2)
    total, count = await asyncio.to_thread(queue.get), await asyncio.to_thread(queue.get)
    await asyncio.to_thread(loader.join)
    elapsed = time.perf_counter() - t0
    sent = [total // max(count, 1)] * count
    big = b"x" * (size * 4 // 3)

    def stats(v: list[float]) -> str:
        v = sorted(v)
        return (f"{len(v)} messages, p50 {statistics.median(v) * 1000:.0f} ms, "
                f"p99 {v[int(len(v) * 0.99) - 1 if len(v) > 1 else 0] * 1000:.0f} ms")
    return {"small alone": stats(alone), "small beside big": stats(loaded),
            "big messages": f"{len(sent)} of {len(big) / 1e6:.1f} MB, "
                            f"{sum(sent) / 1e6 / elapsed:.1f} MB/s"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-mb", type=float, default=10)
    ap.add_argument("--seconds", type=float, default=20)
    args = ap.parse_args()
    sink_bin = shutil.which("smtp-sink")
    if not sink_bin:
        raise SystemExit("smtp-sink not found: install Debian's postfix")
    sink_port, port = free_port(), free_port()
    sink = subprocess.Popen([sink_bin, "-u", "nobody", f"127.0.0.1:{sink_port}", "1024"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dns = ThreadedDnsServer()
    data_dir = tempfile.mkdtemp(prefix="gw-big-")
    try:
        wait_port(sink_port, sink)  # type: ignore[arg-type]
        cmd = [sys.executable, "-m", "gateway", "serve", "--listen", f"127.0.0.1:{port}",
               "--next-hop", f"127.0.0.1:{sink_port}", "--domain", "corp.example",
               "--data-dir", data_dir, "--dns", dns.address]
        with process(cmd, port):
            result = asyncio.run(measure(port, int(args.size_mb * 1024 * 1024), args.seconds))
        for k, v in result.items():
            print(f"{k}: {v}")
    finally:
        sink.terminate()
        dns.close()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
