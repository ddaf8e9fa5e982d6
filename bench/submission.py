#!/usr/bin/env python3
"""The outbound path: mail clients sending through the submission port.

    python bench/submission.py [-c 10] [-n 300] [--runs 3]

Starts `gateway serve` with a STARTTLS submission port and Postfix's `smtp-sink` as the
smarthost (so the leg to it is clear: every message carrying health data is held, which the
report counts). Each of C clients sends messages of the benchmark corpus as a mail client does:
connect, EHLO, STARTTLS, EHLO, AUTH PLAIN, MAIL, RCPT, DATA, QUIT, one message per connection.
Reports messages/s, p50/p99 latency (connect to the final reply), the gateway's CPU time per
message (the load generator, TLS included, shares the machine's two cores), how many were held,
and the peak memory (PSS) of the gateway's processes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.run import RssSampler, ensure_corpus, free_port, process, wait_port  # noqa: E402
from gateway.accounts import AccountFile  # noqa: E402
from tests.support.certs import self_signed  # noqa: E402

USER, PASSWORD = "secretariat@corp.example", "bench-password-long"


async def client(port: int, ctx: ssl.SSLContext, jobs: list[bytes], idx: list[int], count: int,
                 latencies: list[float], replies: dict[str, int]) -> None:
    import aiosmtplib

    while idx[0] < count:
        data = jobs[idx[0] % len(jobs)]
        idx[0] += 1
        t0 = time.perf_counter()
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, tls_context=ctx,
                               timeout=120)
        try:
            await smtp.connect()
            await smtp.ehlo()
            await smtp.starttls()
            await smtp.ehlo()
            await smtp.login(USER, PASSWORD)
            _, reply = await smtp.sendmail(USER, ["correspondant@labo.example"], data)
            kind = "held" if "quarantaine" in reply else "relayed"
            await smtp.quit()
        except aiosmtplib.SMTPException as exc:
            kind = f"error {type(exc).__name__}"
        finally:
            smtp.close()
        latencies.append((time.perf_counter() - t0) * 1000)
        replies[kind] = replies.get(kind, 0) + 1


async def load(port: int, cert: Path, corpus: Path, concurrency: int, count: int) -> dict[str, object]:
    ctx = ssl.create_default_context(cafile=str(cert))
    manifest = json.loads((corpus / "manifest.json").read_text())
    jobs = [(corpus / m["file"]).read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            for m in manifest]
    idx, latencies, replies = [0], [], {}  # type: ignore[var-annotated]
    t0 = time.perf_counter()
    await asyncio.gather(*(client(port, ctx, jobs, idx, count, latencies, replies)
                           for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100)
    return {"msgs_per_s": round(count / elapsed, 1), "p50_ms": round(statistics.median(latencies), 1),
            "p99_ms": round(q[98], 1), "replies": replies}


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its descendants (the serving processes)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(k) for k in (task / "children").read_text().split())
        except (OSError, ValueError, IndexError):
            continue
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-c", "--concurrency", type=int, default=10)
    ap.add_argument("-n", "--count", type=int, default=300)
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    sink_bin = shutil.which("smtp-sink")
    if not sink_bin:
        raise SystemExit("smtp-sink not found: install Debian's postfix (make bench does)")
    corpus = ensure_corpus(500)
    tmp = Path(tempfile.mkdtemp(prefix="gw-sub-bench-"))
    cert, key = self_signed(tmp)
    sink_port, smtp_port, sub_port = free_port(), free_port(), free_port()
    config = tmp / "gateway.toml"
    config.write_text(f"""
[gateway]
domains = ["corp.example"]
data_dir = "{tmp / 'data'}"
[smtp]
listen = "127.0.0.1:{smtp_port}"
tls_cert = "{cert}"
tls_key = "{key}"
[dns]
nameservers = ["127.0.0.1:9"]
timeout_s = 0.2
[web]
listen = ""
[submission]
listen = "127.0.0.1:{sub_port}"
smarthost = "127.0.0.1:{sink_port}"
smarthost_starttls = "off"
""")
    AccountFile(tmp / "data" / "submission-users.json").add(USER, PASSWORD)
    sink = subprocess.Popen([sink_bin, "-u", "nobody", f"127.0.0.1:{sink_port}", "1024"])
    try:
        wait_port(sink_port, sink)  # type: ignore[arg-type]
        cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
        results = []
        for _ in range(args.runs):
            with process(cmd, sub_port) as proc:
                asyncio.run(load(sub_port, cert, corpus, args.concurrency, 20))  # warm-up
                sampler = RssSampler(proc.pid)
                sampler.start()
                cpu0 = tree_cpu_s(proc.pid)
                result = asyncio.run(load(sub_port, cert, corpus, args.concurrency, args.count))
                result["gateway_cpu_ms_per_msg"] = round(
                    (tree_cpu_s(proc.pid) - cpu0) * 1000 / args.count, 1)
                result["peak_mem_mb"] = round(sampler.stop() / 1024, 1)
            results.append(result)
            print(json.dumps(result), file=sys.stderr)
        best = sorted(results, key=lambda r: r["msgs_per_s"])[len(results) // 2]  # type: ignore[arg-type,return-value]
        print("| c | msg/s | p50 / p99 ms | gateway CPU ms/msg | peak memory (PSS) MB | replies |")
        print("|---|---|---|---|---|---|")
        print(f"| {args.concurrency} | {best['msgs_per_s']} | {best['p50_ms']} / {best['p99_ms']} "
              f"| {best['gateway_cpu_ms_per_msg']} | {best['peak_mem_mb']} | {best['replies']} |")
    finally:
        sink.terminate()
        sink.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
