#!/usr/bin/env python3
"""Share of the public phishing samples and of the ham samples the gateway flags.

    python bench/corpus_report.py

Runs the gateway's pipeline (every check, default thresholds) over `../shared/corpus`
phishing-pot and spamassassin-ham samples, with a DNS server on loopback that knows no record
(the samples' domains are not resolvable here: no SPF/DKIM/DMARC evidence either way).
Prints the share flagged (tag or above) per group, and the most frequent symbols.
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from gateway import config  # noqa: E402
from gateway.cli import to_crlf  # noqa: E402
from gateway.message import Inbound  # noqa: E402
from gateway.service import build_runtime  # noqa: E402
from gateway.symbols import Action  # noqa: E402
from tests.support.dnsserver import ThreadedDnsServer  # noqa: E402

CORPUS = HERE.parent.parent / "shared" / "corpus"


async def run(dns_address: str, tmp: str) -> dict[str, object]:
    cfg = config.build({"gateway": {"domains": ["cabinet.example"], "data_dir": tmp},
                        "dns": {"nameservers": [dns_address], "timeout_s": 1}}, source="report")
    rt = await build_runtime(cfg, with_store=False)
    manifest = json.loads((CORPUS / "phishing-pot" / "manifest.json").read_text())
    groups: dict[str, list[Path]] = collections.defaultdict(list)
    for e in manifest:
        groups[f"phishing/{e['category']}"].append(CORPUS / "phishing-pot" / "samples" / e["file"])
    for path in sorted((CORPUS / "spamassassin-ham").glob("*/*.eml")):
        groups[f"ham/{path.parent.name}"].append(path)
    out: dict[str, object] = {}
    for group, files in sorted(groups.items()):
        actions: collections.Counter[str] = collections.Counter()
        symbols: collections.Counter[str] = collections.Counter()
        for path in files:
            analysis = await rt.pipeline.analyse(Inbound(
                queue_id="r", peer_ip="198.51.100.1", helo="mail.example",
                mail_from="", rcpts=("docteur@cabinet.example",), raw=to_crlf(path.read_bytes())))
            actions[analysis.verdict.action.value] += 1
            symbols.update(s.name for s in analysis.verdict.symbols if s.score > 0)
        flagged = sum(n for a, n in actions.items() if a != Action.ACCEPT.value)
        out[group] = {"messages": len(files), "flagged": flagged,
                      "share": round(flagged / len(files), 3), "actions": dict(actions),
                      "top_symbols": symbols.most_common(6)}
    await rt.close()
    return out


def main() -> None:
    if not CORPUS.is_dir():
        raise SystemExit(f"corpus not found at {CORPUS}")
    dns = ThreadedDnsServer()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = asyncio.run(run(dns.address, tmp))
    finally:
        dns.close()
    print("| group | messages | flagged (tag or above) | share | actions |")
    print("|---|---|---|---|---|")
    for group, r in result.items():
        assert isinstance(r, dict)
        print(f"| {group} | {r['messages']} | {r['flagged']} | {r['share']:.1%} | {r['actions']} |")
    for corpus in ("phishing", "ham"):
        rows = [r for g, r in result.items() if g.startswith(corpus + "/") and isinstance(r, dict)]
        n = sum(int(r["messages"]) for r in rows)
        f = sum(int(r["flagged"]) for r in rows)
        print(f"| **{corpus} (all)** | {n} | {f} | {f / max(n, 1):.1%} | |")
    print()
    for group, r in result.items():
        assert isinstance(r, dict)
        print(f"{group}: {r['top_symbols']}")


if __name__ == "__main__":
    main()
