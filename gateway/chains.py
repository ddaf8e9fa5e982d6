"""What is done with a judged message: one chain of steps per direction and action, as data.

The verdict gives an action; the chain for (direction, action) says which steps run and which
reply the client gets, in French. Symbols may refine it from rules/symbols.toml, never from
code: `reply` (the reply when that symbol decides), `hold = "exposed"` (held only for the
recipients a check found exposed, sent to the others), `notice` (sends the sender a notice,
or is listed in it). Nothing outside this table branches on the direction to act.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gateway import replies
from gateway.message import Direction
from gateway.replies import Reply
from gateway.symbols import Action, SymbolTable
from gateway.verdict import Verdict


class Step(enum.Enum):
    BANNER = "banner"  # the French warning in the body (tag), or the external-sender mark
    VERDICT_HEADERS = "verdict_headers"  # Authentication-Results and X-Gateway-* (else trace)
    STORE = "store"  # the sealed quarantine copy (before the reply)
    DELIVER = "deliver"  # to the next hop, on the transaction opened at RCPT
    NOTICE = "notice"  # the French notice to the sender, when a symbol asks for one


class Plan(enum.Enum):
    """The action, with the one variant the verdict alone does not give."""

    ACCEPT = "accept"
    TAG = "tag"
    QUARANTINE = "quarantine"
    PARTIAL_HOLD = "partial_hold"  # held for the exposed recipients, sent to the others
    REJECT = "reject"
    TEMPFAIL = "tempfail"


@dataclass(frozen=True, slots=True)
class Chain:
    steps: frozenset[Step]
    reply: Reply

    def __contains__(self, step: object) -> bool:
        return step in self.steps


def _chain(reply: Reply, *steps: Step) -> Chain:
    return Chain(frozenset(steps), reply)


_IN, _OUT = Direction.INBOUND, Direction.OUTBOUND
B, H, S, D, N = Step.BANNER, Step.VERDICT_HEADERS, Step.STORE, Step.DELIVER, Step.NOTICE

# Mail coming in gets the verdict in its header fields and the banner; mail the practice sends
# gets neither (the verdict is the practice's business, not its correspondents'), but its
# sender may get a notice.
CHAINS: Mapping[tuple[Direction, Plan], Chain] = {
    (_IN, Plan.ACCEPT): _chain(replies.DELIVERED, B, H, D),
    (_IN, Plan.TAG): _chain(replies.DELIVERED, B, H, D),
    (_IN, Plan.QUARANTINE): _chain(replies.QUARANTINED, H, S),
    (_IN, Plan.REJECT): _chain(replies.POLICY_REJECT),
    (_IN, Plan.TEMPFAIL): _chain(replies.TEMPFAIL_SCAN),
    (_OUT, Plan.ACCEPT): _chain(replies.DELIVERED, D, N),
    (_OUT, Plan.TAG): _chain(replies.DELIVERED, D, N),
    (_OUT, Plan.QUARANTINE): _chain(replies.QUARANTINED, S, N),
    (_OUT, Plan.PARTIAL_HOLD): _chain(replies.PARTLY_HELD, S, D, N),
    (_OUT, Plan.REJECT): _chain(replies.OUTBOUND_POLICY_REJECT),
    (_OUT, Plan.TEMPFAIL): _chain(replies.TEMPFAIL_SCAN),
}


@dataclass(frozen=True, slots=True)
class Decision:
    plan: Plan
    chain: Chain
    reply: Reply  # the chain's, or that of the symbol that decided
    # A held message its sender may release with the link of her notice (stored with it).
    sender_may_release: bool = False


def plan(direction: Direction, verdict: Verdict, table: SymbolTable,
         quarantine_score: float) -> Decision:
    """The chain for this message, and its reply."""
    names = [s.name for s in verdict.symbols]
    forcing = _forcing(names, table)
    exposure_only = held_for_exposure_only(names, verdict.score, table, quarantine_score)
    chosen = Plan(verdict.action.value)
    if chosen is Plan.QUARANTINE and (direction, Plan.PARTIAL_HOLD) in CHAINS \
            and exposure_only:
        chosen = Plan.PARTIAL_HOLD
    chain = CHAINS[(direction, chosen)]
    reply = chain.reply
    for name in forcing:  # the first symbol forcing this very action names its reply
        sym = table.symbols[name]
        if sym.action is verdict.action and sym.reply:
            reply = getattr(replies, sym.reply)
            break
    return Decision(plan=chosen, chain=chain, reply=reply,
                    sender_may_release=exposure_only and Step.NOTICE in chain)


def held_for_exposure_only(names: Iterable[str], score: float, table: SymbolTable,
                           quarantine_score: float) -> bool:
    """Held for nothing but data that would reach some recipients in clear: every symbol
    forcing the hold declares `hold = "exposed"`, and the score alone would not hold it.
    Then the others may have it (partial hold), and the sender may release it herself (the
    link in her notice); held for anything else, only the practice's admin may."""
    forcing = _forcing(names, table)
    return bool(forcing) and score < quarantine_score and all(
        table.symbols[n].hold == "exposed" for n in forcing)


def _forcing(names: Iterable[str], table: SymbolTable) -> list[str]:
    """The symbols whose forced action is a hold, a refusal or a retry."""
    return [n for n in names
            if (sym := table.symbols.get(n)) is not None and sym.action is not None
            and sym.action.severity >= Action.TEMPFAIL.severity]


def notice_symbols(verdict: Verdict, table: SymbolTable) -> tuple[bool, tuple[str, ...]]:
    """Whether a symbol of the verdict asks for a notice to the sender, and the French
    explanations to list in it (in the table's order)."""
    names = {s.name: s.description for s in verdict.symbols}
    send = any(table.symbols[n].notice == "send" for n in names if n in table.symbols)
    listed = tuple(names[n] or sym.description for n, sym in table.symbols.items()
                   if sym.notice == "list" and n in names)
    return send, listed
