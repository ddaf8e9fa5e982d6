"""One message: parse -> checks -> verdict -> act. Owns the per-message deadline.

`analyse` is the offline part (used by `gateway scan` too); `process` adds the action and
returns an Outcome, which only gateway/smtp.py turns into an SMTP reply.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import logging
import time
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate

from gateway import banner, headers
from gateway.auth import (
    ArcFacts,
    AuthResult,
    DkimFacts,
    DmarcFacts,
    OutboundFacts,
    SpfFacts,
    Unavailable,
)
from gateway.checks.base import Check, CheckContext, CheckResult, Hit, runner_symbols
from gateway.config import Config
from gateway.errors import DownstreamRejected, DownstreamUnavailable, ScanTimeout
from gateway.logs import log_message
from gateway.message import Direction, Inbound, ParsedMessage, parse_message
from gateway.notice import Notifier
from gateway.relay import Transaction
from gateway.senders import fold
from gateway.symbols import SymbolTable
from gateway.verdict import Action, Verdict, decide
from gateway.workers import Workers
from quarantine.store import NewItem, Store, SymbolRecord

log = logging.getLogger(__name__)

PIPELINE_SYMBOLS = frozenset({"MESSAGE_UNPARSABLE"})
_BOTH = frozenset(Direction)


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


class Pipeline:
    def __init__(self, *, cfg: Config, checks: Sequence[Check], table: SymbolTable,
                 workers: Workers, store: Store | None, templates: banner.Templates,
                 mark: str, notifier: Notifier | None = None) -> None:
        self._cfg = cfg
        self._notifier = notifier
        self._templates = templates
        self._mark = mark
        self._colleagues = [fold(n) for n in cfg.practice.colleagues]
        self._phases = [
            [c for c in checks if c.phase == 1],
            [c for c in checks if c.phase == 2],
        ]
        self._table = table
        self._workers = workers
        self._store = store
        # Messages per (day, direction, action, main reason), flushed to the store's
        # statistics by `flush_stats` (the dashboard of the web page).
        self._stats: collections.Counter[tuple[str, str, str, str]] = collections.Counter()

    # ---- analysis ---------------------------------------------------------------------

    async def analyse(self, inbound: Inbound) -> Analysis:
        """Parse once (off the loop), run every check within the budget, decide."""
        budget = self._cfg.scoring.message_budget_s
        deadline = time.monotonic() + budget
        durations: dict[str, float] = {}
        t0 = time.perf_counter()
        try:
            # In a worker process: the MIME of a huge or hostile message is killed past
            # the limit (451, the sender retries) instead of holding a thread.
            parsed = await self._workers.run_killable(
                parse_message, inbound.raw, limit_s=min(self._cfg.timeouts.parse_s, budget))
        except ScanTimeout:
            raise
        except Exception:  # noqa: BLE001 - a parser bug must not lose or bounce the message
            log.exception("parsing failed")
            result = CheckResult.of("pipeline", Hit(symbol="MESSAGE_UNPARSABLE",
                                                    detail="parser raised"))
            return Analysis(parsed=None, results=(result,),
                            verdict=decide([result], self._table, self._cfg.scoring))
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
        verdict = decide(results, self._table, self._cfg.scoring)
        return Analysis(parsed=parsed, results=tuple(results), verdict=verdict,
                        durations=durations)

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

    async def reload(self) -> None:
        """Reload what checks compile at start (YARA rules), off the loop; on an error the
        rules in use stay and the error is logged."""
        for check in [c for phase in self._phases for c in phase]:
            reload = getattr(check, "reload", None)
            if reload is None:
                continue
            try:
                await asyncio.to_thread(reload)
            except Exception:  # noqa: BLE001 - a broken rule file must not stop the gateway
                log.exception("reload of %s failed; previous rules kept", check.name)
            else:
                log.info("reloaded %s", check.name)

    # ---- action -----------------------------------------------------------------------

    async def process(self, inbound: Inbound, txn: Transaction) -> Outcome:
        started = time.perf_counter()
        try:
            analysis = await self.analyse(inbound)
        except ScanTimeout as exc:
            txn.abort()
            log.warning("scan timeout: %s", exc)
            outcome = Outcome(kind=OutcomeKind.TEMPFAIL_SCAN)
            log_message(inbound, outcome, time.perf_counter() - started)
            return outcome
        outcome = await self._act(inbound, analysis, txn)
        log_message(inbound, outcome, time.perf_counter() - started)
        self._count(inbound, outcome)
        if self._notifier is not None:
            facts = _outbound_facts(analysis)
            self._notifier.after(inbound, analysis.verdict,
                                 analysis.parsed.subject if analysis.parsed else "",
                                 exposed=facts.exposed if facts else (),
                                 delivered=outcome.kind is OutcomeKind.DELIVERED,
                                 quarantine_id=outcome.quarantine_id,
                                 delivered_to=outcome.delivered_to)
        return outcome

    async def _act(self, inbound: Inbound, analysis: Analysis, txn: Transaction) -> Outcome:
        verdict = analysis.verdict
        action = verdict.action
        if action in (Action.ACCEPT, Action.TAG):
            raw: bytes = inbound.raw
            extra: tuple[tuple[str, str], ...] = ()
            warning = self._warning_for(inbound, analysis)
            if warning is not None and analysis.parsed is not None:
                result = await self._with_banner(inbound.raw, analysis.parsed, warning)
                raw, extra = result.raw, result.fields
            try:
                await txn.send(self.result_headers(inbound, analysis, extra),
                               headers.strip_own_headers(raw, self._cfg.authserv_id))
            except DownstreamUnavailable as exc:
                log.warning("next hop unavailable: %s", exc)
                return Outcome(kind=OutcomeKind.TEMPFAIL_DOWNSTREAM, analysis=analysis)
            except DownstreamRejected as exc:
                return Outcome(kind=OutcomeKind.DOWNSTREAM_REJECTED, analysis=analysis,
                               downstream_code=exc.code, downstream_text=exc.text)
            return Outcome(kind=OutcomeKind.DELIVERED, analysis=analysis)
        if action is Action.QUARANTINE:
            secure = self._secure_share(inbound, analysis)
            if secure:
                return await self._partial_hold(inbound, analysis, txn, secure)
            txn.abort()
            return await self._quarantine(inbound, analysis)
        txn.abort()
        if action is Action.REJECT:
            return Outcome(kind=OutcomeKind.REJECTED, analysis=analysis)
        return Outcome(kind=OutcomeKind.TEMPFAIL_SCAN, analysis=analysis)

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

    def _secure_share(self, inbound: Inbound, analysis: Analysis) -> list[str]:
        """Outbound mail held only because health data would reach some recipients in clear:
        the others (MSSanté), who may have it untouched. Empty when anything else holds it."""
        verdict = analysis.verdict
        if inbound.direction is not Direction.OUTBOUND or \
                verdict.score >= self._cfg.scoring.quarantine:
            return []
        forcing = {s.name for s in verdict.symbols
                   if (sym := self._table.symbols.get(s.name)) is not None
                   and sym.action is not None and sym.action.severity >= Action.TEMPFAIL.severity}
        if forcing != {"OUTBOUND_HEALTH_CLEARTEXT_HOLD"}:
            return []
        facts = _outbound_facts(analysis)
        if facts is None or not facts.exposed:
            return []
        return [r for r in inbound.rcpts if r not in facts.exposed]

    async def _partial_hold(self, inbound: Inbound, analysis: Analysis, txn: Transaction,
                            secure: list[str]) -> Outcome:
        """Hold the copy of the recipients in clear, then deliver to the secure ones. If that
        delivery fails, the held copy is withdrawn and the sender retries the whole message."""
        clear = tuple(r for r in inbound.rcpts if r not in secure)
        held = await self._quarantine(dataclasses.replace(inbound, rcpts=clear), analysis)
        if held.kind is not OutcomeKind.QUARANTINED or held.quarantine_id is None:
            txn.abort()
            return held
        txn.restrict(secure)
        try:
            await txn.send(self.result_headers(inbound, analysis),
                           headers.strip_own_headers(inbound.raw, self._cfg.authserv_id))
        except (DownstreamUnavailable, DownstreamRejected) as exc:
            log.warning("delivery to the secure recipients failed; held copy withdrawn: %s", exc)
            assert self._store is not None
            try:
                await self._store.delete(held.quarantine_id, by="system:retry")
            except Exception:  # noqa: BLE001 - the sender retries either way; say what is left
                log.exception("held copy %s not withdrawn: the retry will hold a second one",
                              held.quarantine_id)
            return Outcome(kind=OutcomeKind.TEMPFAIL_DOWNSTREAM, analysis=analysis)
        return dataclasses.replace(held, delivered_to=tuple(secure))

    async def _quarantine(self, inbound: Inbound, analysis: Analysis) -> Outcome:
        if self._store is None:
            return Outcome(kind=OutcomeKind.TEMPFAIL_QUARANTINE, analysis=analysis)
        verdict = analysis.verdict
        parsed = analysis.parsed
        new = NewItem(
            queue_id=inbound.queue_id, received_at=inbound.received_at,
            direction=inbound.direction.value, action=verdict.action.value, score=verdict.score,
            symbols=tuple(SymbolRecord(name=s.name, score=s.score, detail=s.detail,
                                       description=s.description) for s in verdict.symbols),
            mail_from=inbound.mail_from, rcpts=inbound.rcpts,
            subject=parsed.subject if parsed else "",
            from_header=(parsed.header("From") or "") if parsed else "",
            client_ip=inbound.peer_ip, helo=inbound.helo)
        try:
            raw = (self.result_headers(inbound, analysis)
                   + headers.strip_own_headers(inbound.raw, self._cfg.authserv_id))
            item_id = await self._store.put(new, raw)
        except Exception:  # noqa: BLE001 - disk full, permissions: the sender must retry
            log.exception("quarantine write failed")
            return Outcome(kind=OutcomeKind.TEMPFAIL_QUARANTINE, analysis=analysis)
        return Outcome(kind=OutcomeKind.QUARANTINED, analysis=analysis, quarantine_id=item_id)

    def result_headers(self, inbound: Inbound, analysis: Analysis,
                       extra: Sequence[tuple[str, str]] = ()) -> bytes:
        """Our trace and result header fields, put in front of the message (whose own copies
        are removed: they are forged). Mail the practice sends out gets the trace only: the
        verdict is the practice's business, not its correspondents'."""
        verdict = analysis.verdict
        if inbound.direction is Direction.OUTBOUND:
            return headers.encode_fields([("Received", self._received(inbound)), *extra])
        fields = [
            ("Received", self._received(inbound)),
            ("Authentication-Results", authentication_results(
                self._cfg.authserv_id, analysis.results, inbound)),
            ("X-Gateway-Action", verdict.action.value),
            ("X-Gateway-Score", f"{verdict.score:g}"),
        ]
        if verdict.symbols:
            fields.append(("X-Gateway-Symbols", verdict.symbols_header()))
        fields.extend(extra)
        return headers.encode_fields(fields)

    # ---- banners ----------------------------------------------------------------------

    def _warning_for(self, inbound: Inbound, analysis: Analysis) -> banner.Warning | None:
        # Banners warn the practice's readers; mail the practice sends is never marked.
        if not self._cfg.banner.enabled or inbound.direction is Direction.OUTBOUND:
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
        parsed = await self._workers.run_killable(parse_message, raw,
                                         limit_s=self._cfg.timeouts.release_s)
        warning = banner.Warning(style=self._templates.suspect, reasons=self.reasons(symbols),
                                 note=self._templates.released_note)
        result = await self._with_banner(raw, parsed, warning)
        return headers.encode_fields(list(result.fields)) + result.raw

    def _received(self, inbound: Inbound) -> str:
        # RFC 3848: S for TLS, A for an authenticated client.
        proto = "ESMTP" + ("S" if inbound.tls else "") + ("A" if inbound.auth_user else "")
        helo = inbound.helo or "unknown"
        value = (f"from {helo} ([{inbound.peer_ip}]) by {self._cfg.gateway.hostname} "
                 f"(gateway) with {proto} id {inbound.queue_id}")
        if len(inbound.rcpts) == 1:
            value += f" for <{inbound.rcpts[0]}>"
        return f"{value}; {formatdate(inbound.received_at, localtime=True)}"


def authentication_results(authserv_id: str, results: Sequence[CheckResult],
                           inbound: Inbound) -> str:
    """RFC 8601 header value from the authentication facts."""
    parts = []
    for r in results:
        f = r.facts
        if isinstance(f, SpfFacts):
            prop = "smtp.mailfrom" if f.identity == "mailfrom" else "smtp.helo"
            value = inbound.mail_from if f.identity == "mailfrom" else f.domain
            parts.append(f"spf={f.result.value} {prop}={_ar_value(value or f.domain)}")
        elif isinstance(f, DkimFacts):
            parts += [f"dkim={s.result.value} header.d={_ar_value(s.domain)} "
                      f"header.s={_ar_value(s.selector)} header.b={_ar_value(s.b)}"
                      for s in f.signatures if s.domain]
        elif isinstance(f, ArcFacts) and f.result is not AuthResult.NONE:
            parts.append(f"arc={f.result.value}")
        elif isinstance(f, DmarcFacts) and f.from_domain:
            extra = f" policy.dmarc={f.policy}" if f.policy else ""
            override = " (trusted ARC sealer)" if f.arc_override else ""
            parts.append(f"dmarc={f.result.value}{override} "
                         f"header.from={_ar_value(f.from_domain)}{extra}")
        elif isinstance(f, Unavailable) and f.kind in _AR_METHODS:
            parts.append(f"{_AR_METHODS[f.kind]}=temperror (check unavailable)")
    return "; ".join([authserv_id, *parts]) if parts else f"{authserv_id}; none"


_AR_METHODS: dict[type, str] = {SpfFacts: "spf", DkimFacts: "dkim", ArcFacts: "arc",
                                 DmarcFacts: "dmarc"}


def _ar_value(value: str) -> str:
    """A property value, quoted when it is not a plain token (RFC 8601 2.2)."""
    if value and all(c.isalnum() or c in "-._@+/=" for c in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


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
