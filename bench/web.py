#!/usr/bin/env python3
"""What the quarantine web page costs as the quarantine grows.

    python bench/web.py [-n 5000] [--tracking 100000]

Fills a quarantine (in a temporary folder) with N items, then serves the web page in-process
and times, over real HTTP on loopback, the pages an admin opens: the list (first page), the
list searched by sender (every item's sealed personal data opened), the dashboard, and one
message page with its preview; times the quarantine digest of all those items (one
recipient: the store's items unsealed, 100 listed); then fills the message tracking with
--tracking records and
times the tracking page searched by a reply's id, by a quarantine id and by a sender's words
(sealed fields). Reports the median and the worst of 20 requests each, in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from gateway import config  # noqa: E402
from gateway.accounts import AccountFile  # noqa: E402
from gateway.service import running  # noqa: E402
from quarantine.store import NewItem, SymbolRecord, TrackRecord  # noqa: E402
from tests.support.webclient import ADMIN, Client, add_users, suspicious  # noqa: E402


async def fill(store, n: int) -> str:  # type: ignore[no-untyped-def]
    raw = suspicious("Facture en attente", html="<p>Bonjour <b>docteur</b></p>")
    now = time.time()
    last = ""
    for i in range(n):
        item = NewItem(
            queue_id=f"Q{i}", received_at=now - i * 60, direction="inbound", action="quarantine",
            score=12.5, symbols=(SymbolRecord(name="ATTACH_DANGEROUS_TYPE", score=8.0,
                                              detail="facture.js"),),
            mail_from=f"expediteur{i % 300}@labo{i % 40}.example", rcpts=("docteur@cabinet.test",),
            subject=f"Facture {i}", from_header=f"Labo <expediteur{i % 300}@labo{i % 40}.example>",
            client_ip="192.0.2.1", helo="mx.labo.example")
        last = await store.put(item, raw)
    return last


async def fill_tracking(store, n: int) -> str:  # type: ignore[no-untyped-def]
    """n tracking records (batches of 1,000, as serving processes write them); the queue id
    of one in the middle."""
    now = time.time()
    batch = []
    for i in range(n):
        queue_id = f"{i:012d}".translate(str.maketrans("0123456789", "BCDFGHJKLM"))
        batch.append(TrackRecord(
            queue_id=queue_id, received_at=now - i * 20, direction="inbound",
            outcome="delivered", action="accept", score=1.5,
            symbols=(SymbolRecord(name="SPF_NONE", score=0.5, detail="no record"),),
            quarantine_id=None, size=30_000, reply=f"250 2.0.0 Message accepte et transmis "
            f"id={queue_id}", downstream="", mail_from=f"expediteur{i % 300}@labo{i % 40}.example",
            rcpts=("docteur@cabinet.test",), delivered_to=(), subject=f"Compte rendu {i}",
            from_header=f"Labo <expediteur{i % 300}@labo{i % 40}.example>",
            client_ip="192.0.2.1", helo="mx.labo.example"))
        if len(batch) == 1000:
            await store.track(batch)
            batch = []
    if batch:
        await store.track(batch)
    return f"{n // 2:012d}".translate(str.maketrans("0123456789", "BCDFGHJKLM"))


async def timed(client: Client, path: str, times: int = 20) -> tuple[float, float]:
    samples = []
    for _ in range(times):
        t0 = time.perf_counter()
        status, _, _ = await client.get(path)
        samples.append((time.perf_counter() - t0) * 1000)
        assert status == 200, (path, status)
    return statistics.median(samples), max(samples)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=5000, help="quarantine items")
    ap.add_argument("--tracking", type=int, default=100_000, help="tracking records")
    args = ap.parse_args()
    data = Path(tempfile.mkdtemp(prefix="gw-web-bench-", dir="/dev/shm"
                                 if Path("/dev/shm").is_dir() else None))
    cfg = config.build({"gateway": {"domains": ["cabinet.test"], "data_dir": str(data),
                                    "workers": 1},
                        "smtp": {"listen": "127.0.0.1:0"}, "web": {"listen": "127.0.0.1:0"},
                        "dns": {"nameservers": ["127.0.0.1:9"], "timeout_s": 0.2}},
                       source="bench")
    add_users(AccountFile(cfg.web_users_file))
    async with running(cfg) as gw:
        t0 = time.perf_counter()
        last = await fill(gw.runtime.store, args.n)
        print(f"{args.n} items stored in {time.perf_counter() - t0:.1f} s")
        client = Client(f"http://127.0.0.1:{gw.web_port}")
        try:
            assert await client.login(ADMIN) == 303
            print("| page | median ms | worst ms |\n|---|---|---|")
            for label, path in (("list, first page", "/quarantaine"),
                                ("list searched by sender", "/quarantaine?expediteur=labo7."),
                                ("dashboard", "/"),
                                ("message page with preview", f"/quarantaine/{last}")):
                med, worst = await timed(client, path)
                print(f"| {label} | {med:.1f} | {worst:.1f} |")
            assert gw.runtime.digests is not None
            t0 = time.perf_counter()
            report = await gw.runtime.digests.send_now()
            assert report is not None
            print(f"\nquarantine digest of {report.items} held items for "
                  f"{len(report.sent)} recipient(s), delivered to the embedded Maildir: "
                  f"{(time.perf_counter() - t0) * 1000:.0f} ms")
            t0 = time.perf_counter()
            queue_id = await fill_tracking(gw.runtime.store, args.tracking)
            print(f"\n{args.tracking} tracking records stored in {time.perf_counter() - t0:.1f} s")
            print("| tracking page | median ms | worst ms |\n|---|---|---|")
            for label, path in (("by a reply's id", f"/suivi?q={queue_id}"),
                                ("by a quarantine id", f"/suivi?q={last}"),
                                ("by a sender's address", "/suivi?q=expediteur7%40labo7.example"),
                                ("by a word of every record", "/suivi?q=example"),
                                ("first page, no search", "/suivi")):
                med, worst = await timed(client, path, times=10)
                print(f"| {label} | {med:.1f} | {worst:.1f} |")
        finally:
            await client.close()


if __name__ == "__main__":
    asyncio.run(main())
