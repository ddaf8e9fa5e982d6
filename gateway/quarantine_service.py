"""Held mail as the people who decide about it see it: the web page, the CLI and the retention
timer use this service, never the pipeline or the whole Runtime.

Reads (list, search, one item, the audit log) go to its `store`. Each change is made here and
audited by the store itself, in the same step, whoever asks:

- `release`: the one way to release. Inbound mail goes to the practice's mailbox server with
  the warning banner, the reasons it was held and a "released" note (rendered by the
  pipeline, given here as `render_released`), plus `X-Gateway-Released` (who and when).
  Outbound mail (held by the outbound guard) goes to the smarthost as the sender wrote it:
  only our own `X-Gateway-*` and Authentication-Results fields are removed, nothing is added.
  The item is marked released only once the next hop has accepted the message; two releases
  of one item at once deliver it once (the store's compare-and-set, see `Store.release`).
- `delete`, and `purge` (the retention period, or the CLI's own).
"""

from __future__ import annotations

import asyncio
import logging
import string
import time
from collections.abc import Awaitable, Callable, Iterable
from email.utils import formatdate
from typing import Protocol

from gateway import headers
from gateway.config import NEVER_DIRECT_RELEASE
from gateway.errors import DownstreamUnavailable
from gateway.relay import NextHop, deliver
from gateway.symbols import SymbolTable
from quarantine.store import Item, Store, SymbolRecord

log = logging.getLogger(__name__)

# Findings that say part of the message was never looked at: what is in it is unknown.
NOT_ANALYSED_IN_FULL = frozenset({"MIME_TOO_COMPLEX", "MESSAGE_UNPARSABLE", "RSPAMD_UNCHECKED"})


class HasSymbols(Protocol):
    @property
    def symbols(self) -> tuple[SymbolRecord, ...]: ...

# The pipeline's rendering of a released inbound message: (symbol name, French reason)
# pairs and the held bytes in, the bytes to deliver out.
RenderReleased = Callable[[Iterable[tuple[str, str]], bytes], Awaitable[bytes]]


class Learner(Protocol):
    """A spam engine that learns from the admin's decisions (gateway/rspamd.py)."""

    async def learn(self, raw: bytes, *, spam: bool) -> bool: ...

    async def close(self) -> None: ...


LEARN_TIMEOUT_S = 15.0
LEARNT = ("learn_spam", "learn_ham")  # audit actions: the message was taught to the engine


class QuarantineService:
    def __init__(self, *, store: Store, table: SymbolTable, next_hop: NextHop,
                 smarthost: NextHop, authserv_id: str, render_released: RenderReleased,
                 flush_stats: Callable[[], Awaitable[None]], retention_days: float,
                 learner: Learner | None = None) -> None:
        self.store = store
        self.table = table  # the symbols' French texts and actions, for the pages
        self._next_hop = next_hop
        self._smarthost = smarthost
        self._authserv_id = authserv_id
        self._render_released = render_released
        self._flush_stats = flush_stats
        self.retention_days = retention_days
        self.learner = learner
        self._learning: dict[str, asyncio.Lock] = {}  # items being taught to the engine

    async def release(self, item_id: str, *, by: str, client: str = "") -> Item:
        """Deliver and mark released. Raises NotFound, NotQuarantined (released, or being
        released by someone else), DownstreamUnavailable or DownstreamRejected (then the item
        stays quarantined)."""
        async def _deliver(item: Item, raw: bytes) -> None:
            if item.direction == "outbound":
                body = headers.strip_own_headers(raw, self._authserv_id)
                await deliver(self._smarthost, item.mail_from, item.rcpts, b"", body)
                return
            stamp = f"by {by}; {formatdate(time.time())}; id {item.id}"
            head = headers.encode_fields([("X-Gateway-Released", stamp)])
            body = await self._render_released(
                ((s.name, s.description) for s in item.symbols), raw)
            await deliver(self._next_hop, item.mail_from, item.rcpts, head, body)

        try:
            return await self.store.release(item_id, by=by, deliver=_deliver, client=client)
        except TimeoutError as exc:
            raise DownstreamUnavailable(f"release of {item_id}: the next hop took too long"
                                        ) from exc

    def needs_confirmation(self, item: Item) -> bool:
        """A refused message (its sender was told no), or one held for a file the symbol
        table holds or refuses by itself (malware, a program, a macro that runs at opening):
        released only after a confirmation that names the reason, one at a time."""
        return item.state == "refused" or any(
            s.name in self.table and self.table[s.name].group == "attachments"
            and self.table[s.name].action is not None for s in item.symbols)

    def reasons(self, item: HasSymbols, n: int = 3) -> list[str]:
        """The main French reasons of an item or a tracked message, heaviest first (forced
        actions first), as the page and the digests show them."""
        table = self.table
        ranked = sorted(item.symbols, key=lambda s: (
            not (s.name in table and table[s.name].action is not None), -s.score))
        out = [s.description or (table[s.name].description if s.name in table else s.name)
               for s in ranked if s.score > 0 or (s.name in table and table[s.name].action)]
        return list(dict.fromkeys(out))[:n]

    def detail(self, s: SymbolRecord) -> str:
        """A finding's detail as a person reads it: the symbol's French template filled with
        the finding's values; "" when the symbol has none, or a value is missing (an older
        record), since the recorded `detail` is English, for the logs."""
        sym = self.table.symbols.get(s.name)
        if sym is None or not sym.detail:
            return ""
        args = dict(s.args)
        fields = {f for _, f, _, _ in string.Formatter().parse(sym.detail) if f}
        if not fields <= set(args):
            return ""
        try:  # the values as they are (no French contraction across them)
            return sym.detail.format_map(args)
        except (ValueError, IndexError, KeyError):
            return ""

    def recipient_may_release(self, item: Item, groups: Iterable[str]) -> bool:
        """May a recipient release this item herself, from her digest? Only a held item
        (not a refused copy) for her alone, none of whose reasons is outside `groups` (the
        admin's choice, `digest.direct_release_groups`). Never, whatever the configuration
        says, when any finding is about a file or an analysis that failed or stopped short
        (even one that scores nothing), or when the message was not analysed in full."""
        allowed = set(groups) - set(NEVER_DIRECT_RELEASE)
        if item.state != "quarantined" or len(item.rcpts) != 1 or not allowed \
                or self.needs_confirmation(item):
            return False
        table = self.table
        for s in item.symbols:
            sym = table.symbols.get(s.name)
            if sym is None or sym.group in NEVER_DIRECT_RELEASE or s.name in NOT_ANALYSED_IN_FULL:
                return False
            if (s.score > 0 or sym.action is not None) and sym.group not in allowed:
                return False
        return True

    async def decide(self, item_id: str, *, spam: bool, by: str, client: str = "") -> str:
        """The admin says a held message is spam or not: the decision is audited, and taught
        once to the spam engine when there is one (a message already taught is not taught
        again, whichever way; rspamd also refuses a message it learnt). A French note for
        the page; raises NotFound. Call it before a delete (the message is read)."""
        item, raw = await self.store.get(item_id)
        await self.store.audit(user=by, action="verdict_spam" if spam else "verdict_ham",
                               target=item.id, client=client)
        if self.learner is None:
            return ""
        # One lesson per message: two clicks in this process wait for each other (rspamd
        # itself refuses a message it learnt, across processes and nodes).
        lock = self._learning.setdefault(item.id, asyncio.Lock())
        try:
            async with lock:
                if await self.store.audited(item.id, LEARNT):
                    return "Ce message avait déjà été transmis au filtre antispam."
                try:
                    async with asyncio.timeout(LEARN_TIMEOUT_S):
                        if not await self.learner.learn(raw, spam=spam):
                            raise RuntimeError("the engine did not learn it")
                except Exception as exc:  # noqa: BLE001 - the decision stands, not its lesson
                    log.warning("learning %s as %s failed: %s", item.id,
                                "spam" if spam else "ham", exc)
                    await self.store.audit(user=by, action="learn_failed", target=item.id,
                                           client=client, detail=str(exc)[:200])
                    return "Le filtre antispam n'a pas pu en être informé pour le moment."
                await self.store.audit(user=by, action="learn_spam" if spam else "learn_ham",
                                       target=item.id, client=client)
        finally:
            if not lock.locked() and self._learning.get(item.id) is lock:
                del self._learning[item.id]
        return ("Le filtre antispam apprendra à reconnaître ce genre de message." if spam else
                "Le filtre antispam apprendra que ce genre de message est légitime.")

    async def close(self) -> None:
        if self.learner is not None:
            await self.learner.close()

    async def delete(self, item_id: str, *, by: str, client: str = "") -> None:
        """Raises NotFound, or NotQuarantined while someone releases it."""
        await self.store.delete(item_id, by=by, client=client)

    async def purge(self, *, by: str = "système", older_than_days: float | None = None) -> int:
        """Remove the items older than the retention period (or `older_than_days`); audited
        when asked by a person, or when something was removed."""
        days = self.retention_days if older_than_days is None else older_than_days
        n = await self.store.purge(older_than_days=days)
        if n or by != "système":
            await self.store.audit(user=by, action="purge", detail=f"{n} message(s) de plus de "
                                   f"{days:g} jours supprimé(s)")
        return n

    async def stats(self, *, since_day: str) -> list[tuple[str, str, str, str, int]]:
        """Counts per day, direction, action and main reason, this process's latest
        included."""
        await self._flush_stats()
        return await self.store.stats(since_day=since_day)
