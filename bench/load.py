#!/usr/bin/env python3
"""Fallback SMTP load generator, used when ../shared/bench/smtpload.py is absent.

Each of C workers sends messages one per connection (connect, EHLO, MAIL, RCPT, DATA, QUIT) and
records latency from connect to the final 250 (`total`) and from the last DATA byte to it
(`eod`). Prints one JSON object with the same keys as the shared load generator.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path


def stuffed(raw: bytes) -> bytes:
    data = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..") + b".\r\n"


async def reply(reader: asyncio.StreamReader) -> int:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            return int(line[:3])


async def worker(host: str, port: int, jobs: list[tuple[bytes, bytes]], idx: list[int],
                 count: int, total: list[float], eod: list[float], errors: dict[str, int]) -> None:
    while idx[0] < count:
        env, data = jobs[idx[0] % len(jobs)]
        idx[0] += 1
        t0 = time.perf_counter()
        writer = None
        try:
            reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
            codes = [await reply(reader)]
            writer.write(b"EHLO load.example\r\n")
            codes.append(await reply(reader))
            writer.write(env)
            codes += [await reply(reader) for _ in range(3)]
            if codes != [220, 250, 250, 250, 354]:
                raise RuntimeError(f"replies {codes}")
            writer.write(data)
            await writer.drain()
            t1 = time.perf_counter()
            code = await reply(reader)
            if code != 250:
                raise RuntimeError(f"end of data {code}")
            t2 = time.perf_counter()
            total.append(t2 - t0)
            eod.append(t2 - t1)
            writer.write(b"QUIT\r\n")
            await writer.drain()
        except Exception as exc:  # noqa: BLE001 - counted in the report
            key = f"{type(exc).__name__}: {exc}"[:100]
            errors[key] = errors.get(key, 0) + 1
        finally:
            if writer is not None:
                writer.close()


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(p / 100 * len(values) + 0.5) - 1))
    return round(values[k] * 1000, 3)


async def run(args: argparse.Namespace) -> dict[str, object]:
    corpus = Path(args.corpus)
    manifest = corpus / "manifest.json"
    jobs = []
    if manifest.exists():
        for e in json.loads(manifest.read_text()):
            env = (f"MAIL FROM:<{e['mail_from']}>\r\nRCPT TO:<{e['rcpt_to']}>\r\nDATA\r\n").encode()
            jobs.append((env, stuffed((corpus / e["file"]).read_bytes())))
    else:
        env = f"MAIL FROM:<{args.mail_from}>\r\nRCPT TO:<{args.rcpt_to}>\r\nDATA\r\n".encode()
        jobs = [(env, stuffed(p.read_bytes())) for p in sorted(corpus.glob("*.eml"))]
    total: list[float] = []
    eod: list[float] = []
    errors: dict[str, int] = {}
    idx = [0]
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(args.host, args.port, jobs, idx, args.count, total, eod, errors)
                           for _ in range(args.concurrency)))
    elapsed = time.perf_counter() - t0
    return {
        "ok": len(total), "fail": sum(errors.values()), "errors": errors,
        "elapsed_s": round(elapsed, 3), "msgs_per_s": round(len(total) / elapsed, 2),
        "lat_total_ms": {"p50": pct(total, 50), "p99": pct(total, 99)},
        "lat_eod_ms": {"p50": pct(eod, 50), "p99": pct(eod, 99)},
        "concurrency": args.concurrency,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("-c", "--concurrency", type=int, default=10)
    ap.add_argument("-n", "--count", type=int, default=500)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--mail-from", default="bench@example.com")
    ap.add_argument("--rcpt-to", default="rcpt@corp.example")
    print(json.dumps(asyncio.run(run(ap.parse_args()))))


if __name__ == "__main__":
    main()
