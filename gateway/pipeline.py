"""One message: parse -> checks -> verdict -> act. Owns the per-message deadline.

`analyse` is the offline part (used by `gateway scan` too); `process` adds the action and
returns an Outcome, which only gateway/smtp.py turns into an SMTP reply.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import inspect
import logging
import re
import time
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

from gateway import banner, chains, headers, metrics, replies
from gateway.auth import AuthStatus
from gateway.auth.dmarc import DmarcFacts
from gateway.chains import Step
from gateway.checks.base import (
    Check,
    CheckContext,
    CheckResult,
    Facts,
    Hit,
    Unavailable,
    runner_symbols,
)
from gateway.checks.outbound_health import OutboundFacts
from gateway.config import Config
from gateway.correspondents import Correspondents
from gateway.errors import DownstreamRejected, DownstreamUnavailable, ScanTimeout, TemporaryError
from gateway.message import Direction, Inbound, ParsedMessage, parse_message
from gateway.notice import Notifier
from gateway.relay import Transaction
from gateway.replies import Reply
from gateway.senders import fold
from gateway.symbols import Action, SymbolTable
from gateway.verdict import ScoredSymbol, Verdict, decide
from gateway.workers import Workers
from quarantine.store import NewItem, Store, SymbolRecord, TrackRecord

log = logging.getLogger(__name__)

PIPELINE_SYMBOLS = frozenset({"MESSAGE_UNPARSABLE"})
PARSE_ISOLATED_ABOVE = 1024 * 1024  # bytes: larger messages are parsed in a worker process
_BOTH = frozenset(Direction)


TRACK_BATCH = 200  # tracking records written at once, at the latest (else every few seconds)


class OutcomeKind(enum.Enum):
    DELIVERED = "delivered"
    QUARANTINED = "quarantined"
    REJECTED = "rejected"  # our policy
    DOWNSTREAM_REJECTED = "downstream_rejected"  # next hop 5xx, passed back
    TEMPFAIL_SCAN = "tempfail_scan"
    TEMPFAIL_DOWNSTREAM = "tempfail_downstream"
    TEMPFAIL_QUARANTINE = "tempfail_quarantine"


@dataclass(frozen=True, slots=True, kw_only=True)
class Analysis:
    parsed: ParsedMessage | None
    results: tuple[CheckResult, ...]
    verdict: Verdict
    durations: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    kind: OutcomeKind
    analysis: Analysis | None = None
    quarantine_id: str | None = None
    delivered_to: tuple[str, ...] = ()  # quarantined for some recipients, delivered to these
    downstream_code: int | None = None
    downstream_text: str = ""
    reply: Reply | None = None  # what the client is told (a next hop's 5xx: its own reply)


class Pipeline:
    def __init__(self, *, cfg: Config, checks: Sequence[Check], table: SymbolTable,
                 workers: Workers, store: Store | None, templates: banner.Templates,
                 mark: str, notifier: Notifier | None = None,
                 correspondents: Correspondents | None = None) -> None:
        self._cfg = cfg
        self._correspondents = correspondents
        self._writing: asyncio.Task[None] | None = None  # a batch of correspondents
        self._own = frozenset(d.lower() for d in cfg.domains)
        self._notifier = notifier
        self._templates = templates
        self._mark = mark
        self._colleagues = [fold(n) for n in cfg.practice.colleagues]
        self._phases = [
            [c for c in checks if c.phase == 1],
            [c for c in checks if c.phase == 2],
        ]
        install(checks)
        self._table = table
        self._workers = workers
        self._store = store
        # Messages per (day, direction, action, main reason), flushed to the store's
        # statistics by `flush_stats` (the dashboard of the web page).
        self._stats: collections.Counter[tuple[str, str, str, str]] = collections.Counter()
        # Message tracking records, written in batches by `flush_tracking` (Store.track).
        self._tracking: list[TrackRecord] = []
        self._tracking_task: asyncio.Task[None] | None = None

    # ---- analysis ---------------------------------------------------------------------

    async def analyse(self, inbound: Inbound) -> Analysis:
        """Parse once (off the loop), run every check within the budget, decide."""
        budget = self._cfg.scoring.message_budget_s
        deadline = time.monotonic() + budget
        durations: dict[str, float] = {}
        t0 = time.perf_counter()
        try:
            parsed = await self.parse(inbound.raw, min(self._cfg.timeouts.parse_s, budget))
        except TemporaryError:  # out of time, or no worker to parse it: the sender retries
            raise
        except Exception:  # noqa: BLE001 - a parser bug must not lose or bounce the message
            log.exception("parsing failed")
            result = CheckResult.of("pipeline", Hit(symbol="MESSAGE_UNPARSABLE",
                                                    detail="parser raised"))
            return Analysis(parsed=None, results=(result,),
                            verdict=decide([result], self._table, self._cfg.scoring,
                                           inbound.direction))
        durations["parse"] = time.perf_counter() - t0
        results: list[CheckResult] = []
        # Phase-2 checks may look up what they will need while phase 1 runs (DMARC's record
        # beside SPF's and DKIM's lookups): their answers wait in the resolver's cache.
        ctx = CheckContext(cfg=self._cfg, inbound=inbound)
        warming = [asyncio.create_task(_quietly(c.prefetch(parsed, ctx)))
                   for c in self._phases[1] if hasattr(c, "prefetch")
                   and inbound.direction in getattr(c, "directions", _BOTH)]
        for i, phase in enumerate(self._phases):
            if i == 1 and warming:
                await asyncio.wait(warming, timeout=max(deadline - time.monotonic(), 0.001))
            checks = [c for c in phase
                      if inbound.direction in getattr(c, "directions", _BOTH)]
            if not checks:
                continue
            ctx = CheckContext(cfg=self._cfg, inbound=inbound, earlier=tuple(results))
            results.extend(await self._run_phase(checks, parsed, ctx, deadline))
        for task in warming:
            task.cancel()
        for r in results:
            durations[r.check] = r.duration_s
        verdict = decide(results, self._table, self._cfg.scoring, inbound.direction)
        return Analysis(parsed=parsed, results=tuple(results), verdict=verdict,
                        durations=durations)

    async def parse(self, raw: bytes, limit_s: float) -> ParsedMessage:
        """The MIME structure. A huge message is parsed in a worker process, killed past the
        limit (ScanTimeout) instead of holding a thread; below PARSE_ISOLATED_ABOVE the parse
        is bounded (a linear walk, header fields decoded on their first 16 KB: the worst
        shapes measured take milliseconds) and a process round trip would cost more than it."""
        if len(raw) > PARSE_ISOLATED_ABOVE:
            return await self._workers.run_killable(parse_message, raw, limit_s=limit_s)
        return await self._workers.run(parse_message, raw, limit_s=limit_s)

    async def _run_phase(self, checks: list[Check], parsed: ParsedMessage, ctx: CheckContext,
                         deadline: float) -> list[CheckResult]:
        tasks = {c.name: asyncio.create_task(_run_one(c, parsed, ctx)) for c in checks}
        remaining = max(deadline - time.monotonic(), 0.001)
        done, pending = await asyncio.wait(tasks.values(), timeout=remaining)
        for task in pending:
            task.cancel()
        out: list[CheckResult] = []
        for check in checks:
            task = tasks[check.name]
            out.append(task.result() if task in done else
                       failed(check, "TIMEOUT", "message budget exhausted"))
        return out

    @property
    def correspondents(self) -> Correspondents | None:
        return self._correspondents

    def use(self, table: SymbolTable, checks: Sequence[Check],
            templates: banner.Templates) -> None:
        """Analyse the next messages with these (a reload): one swap on the event loop, so a
        message is analysed wholly with the old set or wholly with the new one. The checks'
        worker state (`install`) is given before, off the loop."""
        self._phases = [[c for c in checks if c.phase == 1], [c for c in checks if c.phase == 2]]
        self._table = table
        self._templates = templates

    def check(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)

    @property
    def checks(self) -> list[Check]:
        return [c for phase in self._phases for c in phase]


    # ---- action -----------------------------------------------------------------------

    async def process(self, inbound: Inbound, txn: Transaction) -> Outcome:
        started = time.perf_counter()
        try:
            analysis = await self.analyse(inbound)
        except TemporaryError as exc:
            txn.abort()
            log.warning("scan not possible now: %s", exc)
            outcome = Outcome(kind=OutcomeKind.TEMPFAIL_SCAN, reply=replies.TEMPFAIL_SCAN)
            log_message(inbound, outcome, time.perf_counter() - started)
            self._track(inbound, outcome)
            return outcome
        decision = chains.plan(inbound.direction, analysis.verdict, self._table,
                               self._cfg.scoring.quarantine)
        outcome = await self._act(inbound, analysis, txn, decision)
        log_message(inbound, outcome, time.perf_counter() - started)
        self._count(inbound, outcome)
        try:
            self._track(inbound, outcome)
        except Exception:  # noqa: BLE001 - the message is answered: its reply stands
            log.exception("tracking record not kept")
        try:
            self._remember(inbound, analysis, outcome)
        except Exception:  # noqa: BLE001 - the message is delivered or held: its reply stands
            log.exception("correspondents not noted")
        if Step.NOTICE in decision.chain and self._notifier is not None:
            send, findings = chains.notice_symbols(analysis.verdict, self._table)
            facts = _outbound_facts(analysis)
            if send:
                self._notifier.after(
                    inbound, analysis.parsed.subject if analysis.parsed else "",
                    findings=findings, exposed=facts.exposed if facts else (),
                    delivered=outcome.kind is OutcomeKind.DELIVERED,
                    quarantine_id=outcome.quarantine_id, delivered_to=outcome.delivered_to,
                    sender_may_release=decision.sender_may_release)
        return outcome

    def refused(self, inbound: Inbound, reply: Reply) -> Outcome:
        """A message refused before any analysis (a login writing as another's address): its
        log line and tracking record, as for every answered message."""
        outcome = Outcome(kind=OutcomeKind.REJECTED, reply=reply)
        log_message(inbound, outcome, 0.0)
        try:
            self._track(inbound, outcome)
        except Exception:  # noqa: BLE001 - the refusal stands
            log.exception("tracking record not kept")
        return outcome

    async def _act(self, inbound: Inbound, analysis: Analysis, txn: Transaction,
                   decision: chains.Decision) -> Outcome:
        """Run the decision's chain: store (all recipients, or the exposed ones), then
        deliver (to all, or to the others), each failure answered as its own tempfail."""
        chain = decision.chain
        if Step.STORE not in chain and Step.DELIVER not in chain:
            txn.abort()
            if decision.plan is not chains.Plan.REJECT:
                return Outcome(kind=OutcomeKind.TEMPFAIL_SCAN, analysis=analysis,
                               reply=decision.reply)
            kept = None
            # Not the practice's own mail refused by its outbound policy (health data it
            # chose never to send in clear), nor a sender the admin blocked.
            if self._cfg.quarantine.keep_rejected \
                    and inbound.direction is Direction.INBOUND and not any(
                        s.name == "SENDER_LIST_BLOCKED" for s in analysis.verdict.symbols):
                # A copy for the admin's review; the refusal stands whatever becomes of it.
                copy = await self._quarantine(inbound, analysis, True, state="refused")
                kept = copy.quarantine_id
            return Outcome(kind=OutcomeKind.REJECTED, analysis=analysis, reply=decision.reply,
                           quarantine_id=kept)
        verdict_headers = Step.VERDICT_HEADERS in chain
        held: Outcome | None = None
        recipients = inbound.rcpts
        if Step.STORE in chain:
            stored = inbound
            if decision.plan is chains.Plan.PARTIAL_HOLD:
                facts = _outbound_facts(analysis)
                exposed = set(facts.exposed) if facts else set(inbound.rcpts)
                recipients = tuple(r for r in inbound.rcpts if r not in exposed)
                stored = dataclasses.replace(inbound, rcpts=tuple(
                    r for r in inbound.rcpts if r in exposed))
            held = await self._quarantine(stored, analysis, verdict_headers,
                                          sender_may_release=decision.sender_may_release)
            if held.quarantine_id is None or Step.DELIVER not in chain or not recipients:
                txn.abort()  # nobody to deliver to (a partial hold of exposed ones only)
                return dataclasses.replace(held, reply=(
                    replies.TEMPFAIL_QUARANTINE if held.kind is not OutcomeKind.QUARANTINED
                    else decision.reply if recipients else replies.QUARANTINED))
            txn.restrict(list(recipients))
        raw: bytes = inbound.raw
        extra: tuple[tuple[str, str], ...] = ()
        warning = self._warning_for(analysis) if Step.BANNER in chain else None
        if warning is not None and analysis.parsed is not None:
            result = await self._with_banner(inbound.raw, analysis.parsed, warning)
            raw, extra = result.raw, result.fields
        sending = time.perf_counter()
        try:
            await txn.send(self.result_headers(inbound, analysis, extra,
                                               verdict=verdict_headers),
                           headers.strip_own_headers(raw, self._cfg.authserv_id))
            metrics.get().next_hop_answered("250", time.perf_counter() - sending)
        except (DownstreamUnavailable, DownstreamRejected) as exc:
            metrics.get().next_hop_answered(str(exc.code) if exc.code else "unreachable",
                                            time.perf_counter() - sending)
            if held is not None:  # the sender retries the whole message: withdraw the copy
                await self._withdraw(held, exc)
                return Outcome(kind=OutcomeKind.TEMPFAIL_DOWNSTREAM, analysis=analysis,
                               reply=replies.TEMPFAIL_DOWNSTREAM)
            if isinstance(exc, DownstreamRejected):
                return Outcome(kind=OutcomeKind.DOWNSTREAM_REJECTED, analysis=analysis,
                               downstream_code=exc.code, downstream_text=exc.text)
            log.warning("next hop unavailable: %s", exc)
            return Outcome(kind=OutcomeKind.TEMPFAIL_DOWNSTREAM, analysis=analysis,
                           reply=replies.TEMPFAIL_DOWNSTREAM)
        if held is not None:
            return dataclasses.replace(held, delivered_to=recipients, reply=decision.reply)
        return Outcome(kind=OutcomeKind.DELIVERED, analysis=analysis, reply=decision.reply)

    async def _withdraw(self, held: Outcome, exc: Exception) -> None:
        log.warning("delivery to the other recipients failed; held copy withdrawn: %s", exc)
        assert self._store is not None and held.quarantine_id is not None
        try:
            await self._store.delete(held.quarantine_id, by="system:retry")
        except Exception:  # noqa: BLE001 - the sender retries either way; say what is left
            log.exception("held copy %s not withdrawn: the retry will hold a second one",
                          held.quarantine_id)

    # ---- correspondents ---------------------------------------------------------------

    def _remember(self, inbound: Inbound, analysis: Analysis, outcome: Outcome) -> None:
        """Note whom the practice wrote to, and whose authenticated mail it accepted
        (gateway/correspondents.py), beside the reply, never delaying it."""
        if self._correspondents is None:
            return
        if inbound.direction is Direction.OUTBOUND:
            if analysis.parsed is not None and _automatic(analysis.parsed):
                return  # an out-of-office reply is no correspondence the practice chose
            if outcome.kind is OutcomeKind.DELIVERED:
                delivered = inbound.rcpts
            elif outcome.kind is OutcomeKind.QUARANTINED:
                delivered = outcome.delivered_to
            else:
                return
            addresses = [a for a in delivered
                         if a.rpartition("@")[2].lower().rstrip(".") not in self._own]
            sent = True
        else:
            if outcome.kind is not OutcomeKind.DELIVERED or \
                    analysis.verdict.action is not Action.ACCEPT or \
                    analysis.parsed is None or not _sender_authenticated(analysis):
                return
            addresses = list(analysis.parsed.from_addresses[:1])
            sent = False
        if not addresses:
            return
        self._correspondents.note(addresses, sent=sent)
        if self._correspondents.due() and (self._writing is None or self._writing.done()):
            self._writing = asyncio.create_task(self.flush_correspondents())

    async def flush_correspondents(self) -> None:
        """Write what the correspondents' book learnt (its batch; never disturbs mail)."""
        if self._correspondents is None:
            return
        try:
            await self._correspondents.flush()
        except Exception:  # noqa: BLE001 - history is a weight, never a reason to fail mail
            log.exception("correspondents not noted")

    async def close(self) -> None:
        """Statistics and tracking saved, correspondents written; then the history closed,
        and the checks' connections (an engine's sessions)."""
        await close_checks(self.checks)
        await self.flush_stats()
        if self._tracking_task is not None:
            await asyncio.wait([self._tracking_task], timeout=5)
        await self.flush_tracking()
        if self._correspondents is not None:
            if self._writing is not None:
                await asyncio.wait([self._writing], timeout=5)
            await self.flush_correspondents()
            await asyncio.to_thread(self._correspondents.close)

    # ---- message tracking -------------------------------------------------------------

    def _track(self, inbound: Inbound, outcome: Outcome) -> None:
        """One tracking record per answered message, kept for `flush_tracking` (a batch every
        TRACK_FLUSH_S, or at TRACK_BATCH records): never delaying the reply."""
        if self._store is None:
            return
        analysis = outcome.analysis
        verdict = analysis.verdict if analysis is not None else None
        parsed = analysis.parsed if analysis is not None else None
        self._tracking.append(TrackRecord(
            queue_id=inbound.queue_id, received_at=inbound.received_at,
            direction=inbound.direction.value, outcome=outcome.kind.value,
            action=verdict.action.value if verdict else "",
            score=verdict.score if verdict else None,
            symbols=_records(verdict.symbols if verdict else ()),
            quarantine_id=outcome.quarantine_id, size=len(inbound.raw),
            reply=reply_text(outcome, inbound.queue_id),
            downstream=(f"{outcome.downstream_code} {outcome.downstream_text}".strip()
                        if outcome.downstream_code else ""),
            mail_from=inbound.mail_from, rcpts=inbound.rcpts,
            delivered_to=outcome.delivered_to, subject=parsed.subject if parsed else "",
            from_header=(parsed.header("From") or "") if parsed else "",
            client_ip=inbound.peer_ip, helo=inbound.helo, auth_user=inbound.auth_user or ""))
        if len(self._tracking) >= TRACK_BATCH and (
                self._tracking_task is None or self._tracking_task.done()):
            self._tracking_task = asyncio.create_task(self.flush_tracking())

    async def flush_tracking(self) -> None:
        """Write the tracking records kept so far (tracking must never disturb mail: a
        failure is logged, and those records are lost)."""
        if self._store is None or not self._tracking:
            return
        batch, self._tracking = self._tracking, []
        try:
            await self._store.track(batch)
        except Exception:  # noqa: BLE001
            log.exception("%d tracking records not saved", len(batch))

    # ---- statistics -------------------------------------------------------------------

    def main_reason(self, verdict: Verdict) -> str:
        """The symbol that decided: one forcing the action taken, else the heaviest one."""
        for s in verdict.symbols:
            sym = self._table.symbols.get(s.name)
            if sym is not None and sym.action is verdict.action:
                return s.name
        return next((s.name for s in verdict.symbols if s.score > 0), "")

    def _count(self, inbound: Inbound, outcome: Outcome) -> None:
        if outcome.analysis is None:
            return
        verdict = outcome.analysis.verdict
        day = time.strftime("%Y-%m-%d", time.localtime(inbound.received_at))
        action = {OutcomeKind.QUARANTINED: "quarantine", OutcomeKind.REJECTED: "reject",
                  OutcomeKind.DELIVERED: verdict.action.value}.get(outcome.kind, "tempfail")
        self._stats[(day, inbound.direction.value, action, self.main_reason(verdict))] += 1

    async def flush_stats(self) -> None:
        if self._store is None or not self._stats:
            return
        counts, self._stats = dict(self._stats), collections.Counter()
        try:
            await self._store.add_stats(counts)
        except Exception:  # noqa: BLE001 - statistics must never disturb mail
            log.exception("statistics not saved")

    async def _quarantine(self, inbound: Inbound, analysis: Analysis, verdict_headers: bool,
                          *, sender_may_release: bool = False,
                          state: str = "quarantined") -> Outcome:
        if self._store is None:
            return Outcome(kind=OutcomeKind.TEMPFAIL_QUARANTINE, analysis=analysis)
        verdict = analysis.verdict
        parsed = analysis.parsed
        new = NewItem(
            queue_id=inbound.queue_id, received_at=inbound.received_at,
            direction=inbound.direction.value, action=verdict.action.value, score=verdict.score,
            symbols=_records(verdict.symbols),
            mail_from=inbound.mail_from, rcpts=inbound.rcpts,
            subject=parsed.subject if parsed else "",
            from_header=(parsed.header("From") or "") if parsed else "",
            client_ip=inbound.peer_ip, helo=inbound.helo, sender_may_release=sender_may_release)
        try:
            raw = (self.result_headers(inbound, analysis, verdict=verdict_headers)
                   + headers.strip_own_headers(inbound.raw, self._cfg.authserv_id))
            item_id = await self._store.put(new, raw, state=state)
        except Exception:  # noqa: BLE001 - disk full, permissions: the sender must retry
            log.exception("quarantine write failed")
            return Outcome(kind=OutcomeKind.TEMPFAIL_QUARANTINE, analysis=analysis)
        return Outcome(kind=OutcomeKind.QUARANTINED, analysis=analysis, quarantine_id=item_id)

    def result_headers(self, inbound: Inbound, analysis: Analysis,
                       extra: Sequence[tuple[str, str]] = (), *, verdict: bool) -> bytes:
        """Our header fields, put in front of the message (whose own copies are removed: they
        are forged): the trace, and with `verdict` (the chain's VERDICT_HEADERS step) the
        authentication results and our verdict."""
        fields = [("Received", self._received(inbound))]
        if verdict:
            v = analysis.verdict
            fields += [
                ("Authentication-Results", authentication_results(
                    self._cfg.authserv_id, analysis.results, inbound)),
                ("X-Gateway-Action", v.action.value),
                ("X-Gateway-Score", f"{v.score:g}"),
            ]
            if v.symbols:
                fields.append(("X-Gateway-Symbols", v.symbols_header()))
        fields.extend(extra)
        return headers.encode_fields(fields)

    # ---- banners ----------------------------------------------------------------------

    def _warning_for(self, analysis: Analysis) -> banner.Warning | None:
        if not self._cfg.banner.enabled:
            return None
        verdict = analysis.verdict
        if verdict.action is Action.TAG:
            return banner.Warning(style=self._templates.suspect,
                                  reasons=self.reasons((s.name, s.description)
                                                       for s in verdict.symbols))
        parsed = analysis.parsed
        if (self._colleagues and self._cfg.banner.external_mark and parsed is not None
                and parsed.from_addresses):
            domain = parsed.from_addresses[0].rpartition("@")[2].lower().rstrip(".")
            name = fold(parsed.from_display)
            if domain not in self._cfg.domains and any(c in name for c in self._colleagues):
                return banner.Warning(style=self._templates.external, reasons=())
        return None

    def reasons(self, symbols: Iterable[tuple[str, str]]) -> tuple[str, ...]:
        """French reasons for the banner: (name, description) of the scoring symbols, heaviest
        first; an empty description is the table's."""
        out: list[str] = []
        for name, description in symbols:
            sym = self._table.symbols.get(name)
            text = description or (sym.description if sym else "")
            if sym is None or sym.score <= 0 or not text or text in out:
                continue
            out.append(text)
        return tuple(out[:self._templates.max_reasons])

    async def _with_banner(self, raw: bytes, parsed: ParsedMessage,
                           warning: banner.Warning) -> banner.Result:
        try:
            return await self._workers.run(banner.apply, raw, parsed, warning, self._templates,
                                           self._mark, limit_s=self._cfg.timeouts.banner_s)
        except Exception:  # noqa: BLE001 - a banner bug must not hold mail back: tag only
            log.exception("banner failed; subject tag only")
            return banner.Result(raw=banner.tag_subject(raw, warning.style.subject_tag),
                                 body_changed=False, fields=())

    async def released(self, symbols: Iterable[tuple[str, str]], raw: bytes) -> bytes:
        """A quarantined message as released: with the banner, the reasons it was held and
        a note that it was released."""
        if not self._cfg.banner.enabled:
            return raw
        parsed = await self.parse(raw, self._cfg.timeouts.release_s)
        warning = banner.Warning(style=self._templates.suspect, reasons=self.reasons(symbols),
                                 note=self._templates.released_note)
        result = await self._with_banner(raw, parsed, warning)
        return headers.encode_fields(list(result.fields)) + result.raw

    def _received(self, inbound: Inbound) -> str:
        # RFC 3848: S for TLS, A for an authenticated client.
        proto = "ESMTP" + ("S" if inbound.tls else "") + ("A" if inbound.auth_user else "")
        # Its first word, brackets neutered: a HELO of "x ([198.51.100.7]) by mx.bank" must not
        # write a trace of its own into ours.
        helo = _TRACE_UNSAFE.sub("?", (inbound.helo or "").split(" ", 1)[0]) or "unknown"
        value = (f"from {helo} ([{inbound.peer_ip}]) by {self._cfg.gateway.hostname} "
                 f"(gateway) with {proto} id {inbound.queue_id}")
        if len(inbound.rcpts) == 1:
            value += f" for <{inbound.rcpts[0]}>"
        return f"{value}; {formatdate(inbound.received_at, localtime=True)}"


async def close_checks(checks: Sequence[Check], *, after_s: float = 0.0) -> None:
    """Close what the checks hold open (an engine's connections), after `after_s`: checks
    replaced by a reload, once no message analysed with them can still be running."""
    if after_s:
        await asyncio.sleep(after_s)
    for check in checks:
        closing = getattr(check, "close", None)
        if closing is not None:
            try:
                if inspect.isawaitable(done := closing()):
                    await done
            except Exception:  # noqa: BLE001 - one check's connections never stop the rest
                log.exception("closing check %s failed", check.name)


def install(checks: Sequence[Check]) -> None:
    """Give the worker processes what the checks need there (their compiled YARA rules)."""
    for check in checks:
        give = getattr(check, "install", None)
        if give is not None:
            give()


_TRACE_UNSAFE = re.compile(r"[()\[\]<>;\"\\]")


def authentication_results(authserv_id: str, results: Sequence[CheckResult],
                           inbound: Inbound) -> str:
    """RFC 8601 header value: each standard's fragment (gateway/auth/), in check order; a
    check that could not finish says temperror."""
    parts = []
    for r in results:
        if isinstance(r.facts, Facts):
            parts += r.facts.ar(inbound)
        elif isinstance(r.facts, Unavailable) and r.facts.kind.method:
            parts.append(f"{r.facts.kind.method}=temperror (check unavailable)")
    return "; ".join([authserv_id, *parts]) if parts else f"{authserv_id}; none"


def _automatic(parsed: ParsedMessage) -> bool:
    """A message a program sent for the practice (RFC 3834 Auto-Submitted, Precedence)."""
    auto = (parsed.header("Auto-Submitted") or "no").strip().lower()
    precedence = (parsed.header("Precedence") or "").strip().lower()
    return not auto.startswith("no") or precedence in ("auto_reply", "bulk", "list", "junk")


def _sender_authenticated(analysis: Analysis) -> bool:
    """The From domain passed DMARC: the sender is who the From line says."""
    return any(isinstance(r.facts, DmarcFacts) and r.facts.result is AuthStatus.PASS
               for r in analysis.results)


def _outbound_facts(analysis: Analysis) -> OutboundFacts | None:
    """What the outbound guard found about the recipients (None for inbound mail)."""
    return next((r.facts for r in analysis.results if isinstance(r.facts, OutboundFacts)), None)


async def _quietly(coro: Awaitable[None]) -> None:
    """A prefetch: its failures are seen again, and reported, by the check itself."""
    try:
        await coro
    except Exception:  # noqa: BLE001
        log.debug("prefetch failed", exc_info=True)


async def _run_one(check: Check, parsed: ParsedMessage, ctx: CheckContext) -> CheckResult:
    t0 = time.perf_counter()
    try:
        result = await check.run(parsed, ctx)
    except asyncio.CancelledError:
        raise
    except ScanTimeout as exc:  # one of its jobs ran out of time: a timeout, not an error
        log.warning("check %s timed out: %s", check.name, exc)
        result = failed(check, "TIMEOUT", str(exc))
    except Exception as exc:  # noqa: BLE001 - a failing check never cancels its siblings
        log.exception("check %s failed", check.name)
        result = failed(check, "ERROR", type(exc).__name__)
    return dataclasses.replace(result, duration_s=time.perf_counter() - t0)


def failed(check: Check, kind: str, why: str) -> CheckResult:
    """A check that did not finish: its `_TIMEOUT` or `_ERROR` symbol (what follows is the
    symbol table's `fail` declaration), and its facts Unavailable to the checks after it."""
    produces = getattr(check, "produces", None)
    return CheckResult.of(check.name, Hit(symbol=f"{check.name.upper()}_{kind}", detail=why),
                          facts=Unavailable(kind=produces, why=why) if produces else None)


def emitted_symbols(checks: Sequence[Check]) -> frozenset[str]:
    out = set(PIPELINE_SYMBOLS)
    for c in checks:
        out |= c.symbols | runner_symbols(c.name)
    return frozenset(out)


_summary = logging.getLogger("gateway.message")  # one line per message


def log_message(inbound: Inbound, outcome: Outcome, duration_s: float) -> None:
    """The one log line of each message (JSON fields)."""
    analysis = outcome.analysis
    fields: dict[str, Any] = {
        "event": "message",
        "queue_id": inbound.queue_id,
        "client": inbound.peer_ip,
        "helo": inbound.helo,
        "mail_from": inbound.mail_from,
        "rcpt_count": len(inbound.rcpts),
        "rcpts": list(inbound.rcpts),
        "size": len(inbound.raw),
        "tls": inbound.tls,
        "direction": inbound.direction.value,
        **({"auth_user": inbound.auth_user} if inbound.auth_user else {}),
        "outcome": outcome.kind.value,
        "duration_ms": round(duration_s * 1000, 1),
    }
    if analysis is not None:
        fields["action"] = analysis.verdict.action.value
        fields["score"] = analysis.verdict.score
        fields["symbols"] = [f"{s.name}({s.score:g})" for s in analysis.verdict.symbols]
        fields["check_ms"] = {k: round(v * 1000, 1) for k, v in analysis.durations.items()}
    if outcome.quarantine_id:
        fields["quarantine_id"] = outcome.quarantine_id
    if outcome.downstream_code:
        fields["downstream_code"] = outcome.downstream_code
    _summary.info("message %s", outcome.kind.value, extra={"fields": fields})
    metrics.get().message(inbound.direction.value, outcome.kind.value,
                          analysis.verdict.action.value if analysis is not None else "none",
                          [s.name for s in analysis.verdict.symbols] if analysis else [],
                          analysis.durations if analysis is not None else {})


def reply_text(outcome: Outcome, queue_id: str) -> str:
    """The reply the outcome's chain chose (a next hop's refusal: its own), with our queue id,
    by which the message's tracking record is found when its sender asks."""
    if outcome.kind is OutcomeKind.DOWNSTREAM_REJECTED:
        reply = replies.downstream_reply(outcome.downstream_code or 550, outcome.downstream_text)
    else:
        reply = str(outcome.reply or replies.TEMPFAIL_SCAN)
    return f"{reply} id={queue_id}"


def _records(symbols: Iterable[ScoredSymbol]) -> tuple[SymbolRecord, ...]:
    """The verdict's symbols as the store keeps them (quarantine items, tracking records)."""
    return tuple(SymbolRecord(name=s.name, score=s.score, detail=s.detail, args=s.args,
                              description=s.description) for s in symbols)
