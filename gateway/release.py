"""Releasing a quarantined message: the one way, used by the CLI and the web page.

Inbound mail goes to the practice's mailbox server with the warning banner, the reasons it was
held and a "released" note (`Pipeline.released`), plus `X-Gateway-Released` (who and when).
Outbound mail (held by the outbound guard) goes to the smarthost as the sender wrote it: only
our own `X-Gateway-*` and Authentication-Results fields are removed, nothing is added.
The item is marked released only once the next hop has accepted the message; two releases of
one item at once deliver it once (the store's compare-and-set, see `Store.release`).
"""

from __future__ import annotations

import time
from email.utils import formatdate

from gateway import headers
from gateway.errors import DownstreamUnavailable
from gateway.relay import deliver
from gateway.runtime import Runtime
from quarantine.store import Item


async def release(runtime: Runtime, item_id: str, *, by: str, client: str = "") -> Item:
    """Deliver and mark released. Raises NotFound, NotQuarantined (a ValueError: released,
    or being released by someone else), DownstreamUnavailable or DownstreamRejected (then the
    item stays quarantined)."""
    store = runtime.store
    if store is None:
        raise RuntimeError("no quarantine store")

    async def _deliver(item: Item, raw: bytes) -> None:
        if item.direction == "outbound":
            body = headers.strip_own_headers(raw, runtime.cfg.authserv_id)
            await deliver(runtime.smarthost, item.mail_from, item.rcpts, b"", body)
            return
        stamp = f"by {by}; {formatdate(time.time())}; id {item.id}"
        head = headers.encode_fields([("X-Gateway-Released", stamp)])
        body = await runtime.pipeline.released(((s.name, s.description) for s in item.symbols),
                                               raw)
        await deliver(runtime.next_hop, item.mail_from, item.rcpts, head, body)

    try:
        return await store.release(item_id, by=by, deliver=_deliver, client=client)
    except TimeoutError as exc:
        raise DownstreamUnavailable(f"release of {item_id}: the next hop took too long") from exc
