#!/usr/bin/env python3
"""What authentication (SPF, DKIM, ARC, DMARC) costs per message, cold and warm DNS cache.

    python bench/auth.py [-n 300]

Runs the gateway's own pipeline in-process over the benchmark corpus, its DNS records served on
loopback. Cold: a new resolver (empty cache) for every message. Warm: one resolver for all, as
in the running gateway. Reports the wall time of each check per message (median and p95, ms)
and the DNS queries sent per message.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.run import bench_zone, ensure_corpus  # noqa: E402
from gateway import config  # noqa: E402
from gateway.auth.dns import Resolver  # noqa: E402
from gateway.checks import create_checks  # noqa: E402
from gateway.checks.base import Services  # noqa: E402
from gateway.cli import to_crlf  # noqa: E402
from gateway.message import Inbound  # noqa: E402
from gateway.pipeline import Pipeline  # noqa: E402
from gateway.service import load_rules  # noqa: E402
from gateway.workers import Workers  # noqa: E402
from tests.support.dnsserver import ThreadedDnsServer  # noqa: E402

AUTH = ("spf", "dkim", "arc", "dmarc")


async def measure(cfg: config.Config, messages: list[tuple[dict, bytes]], port: int,
                  warm: bool) -> dict[str, object]:
    from gateway.banner import load_templates
    workers = Workers()
    table, _ = load_rules(cfg, workers)
    shared = Resolver([("127.0.0.1", port)], timeout_s=2)
    times: dict[str, list[float]] = {name: [] for name in AUTH}
    queries = 0
    for entry, raw in messages:
        resolver = shared if warm else Resolver([("127.0.0.1", port)], timeout_s=2)
        checks = create_checks(Services(cfg=cfg, workers=workers, resolver=resolver))
        pipeline = Pipeline(cfg=cfg, checks=checks, table=table, workers=workers, store=None,
                            templates=load_templates(cfg.banner_templates), mark="bench")
        before = resolver.sent
        analysis = await pipeline.analyse(Inbound(
            queue_id="bench", peer_ip="127.0.0.1", helo=entry["helo"],
            mail_from=entry["mail_from"], rcpts=(entry["rcpt_to"],), raw=raw))
        queries += resolver.sent - before
        for name in AUTH:
            times[name].append(analysis.durations.get(name, 0.0) * 1000)
    workers.close()
    total = [sum(t) for t in zip(*(times[n] for n in AUTH), strict=True)]
    out: dict[str, object] = {n: (round(statistics.median(t), 2),
                                  round(sorted(t)[int(len(t) * 0.95)], 2))
                              for n, t in times.items()}
    out["slowest check (median, p95)"] = (round(statistics.median([max(x) for x in zip(
        *(times[n] for n in AUTH), strict=True)]), 2), None)
    out["sum of checks"] = (round(statistics.median(total), 2),
                            round(sorted(total)[int(len(total) * 0.95)], 2))
    out["dns queries sent/msg"] = round(queries / len(messages), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=300)
    args = ap.parse_args()
    import json
    corpus = ensure_corpus(500)
    manifest = json.loads((corpus / "manifest.json").read_text())[:args.n]
    messages = [(e, to_crlf((corpus / e["file"]).read_bytes())) for e in manifest]
    dns_server = ThreadedDnsServer()
    dns_server.load(bench_zone(corpus))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config.build({"gateway": {"domains": ["corp.example"], "data_dir": tmp}},
                           source="bench")
        try:
            for warm in (False, True):
                res = asyncio.run(measure(cfg, messages, dns_server.port, warm))
                print(f"\n{'warm' if warm else 'cold'} cache, {len(messages)} messages "
                      "(ms per message: median, p95)")
                for k, v in res.items():
                    print(f"  {k}: {v}")
        finally:
            dns_server.close()


if __name__ == "__main__":
    main()
