"""The gateway container's peers in docker/test.sh, in a container of their own: the DNS
server of the tests (port 53) with a small zone, and the sink (port 2525) as the next hop,
which writes each message it receives to OUT/<n>.eml (envelope in the first lines).

    python -m tests.support.container_peer ZONE.json OUT
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from tests.support.dnsserver import DnsServer
from tests.support.sink import Sink


async def main(zone_file: Path, out: Path) -> None:
    dns = DnsServer()
    zone = json.loads(zone_file.read_text())  # records as [type, value]: tuples here
    dns.load({name: [tuple(r) if isinstance(r, list) else r for r in records]
              for name, records in zone.items()})
    await dns.start("0.0.0.0", 53)
    sink = Sink(host="0.0.0.0")
    sink.port = 2525
    await sink.start()
    print("peer ready: DNS on 53, SMTP sink on 2525", flush=True)
    n = 0
    while True:
        got = await sink.queue.get()
        n += 1
        envelope = f"X-Peer-Mail-From: <{got.mail_from}>\r\nX-Peer-Rcpt-To: " \
                   f"{', '.join(got.rcpts)}\r\n".encode()
        (out / f"{n}.eml.tmp").write_bytes(envelope + got.data)
        (out / f"{n}.eml.tmp").rename(out / f"{n}.eml")
        print(f"peer: message {n} from <{got.mail_from}>", flush=True)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2])))
