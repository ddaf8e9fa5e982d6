"""Pure: check results + symbol table + thresholds -> Verdict.

Score = sum of (symbol score x hit factor), each group capped at its `max_score`. The action
from the thresholds is then raised to the most severe forced action among the hits. Severity:
accept < tag < tempfail < quarantine < reject (a message we are unsure of, but would hold
anyway, goes to quarantine rather than back to the sender).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gateway.checks.base import CheckResult
from gateway.config import ScoringSection
from gateway.message import Direction
from gateway.symbols import Action, SymbolTable


@dataclass(frozen=True, slots=True, kw_only=True)
class ScoredSymbol:
    name: str
    score: float  # after the factor, before group caps
    description: str  # French
    detail: str
    args: tuple[tuple[str, str], ...] = ()  # the hit's values (file, rule...) for the pages


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    action: Action
    score: float
    symbols: tuple[ScoredSymbol, ...]  # sorted by |score|, largest first

    def symbols_header(self) -> str:
        return ", ".join(f"{s.name}({s.score:g})" for s in self.symbols)


class _Keep(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def fill(description: str, args: dict[str, str]) -> str:
    """The French description with its placeholders ({org}, {domain}...) filled in."""
    if "{" not in description:
        return description
    try:
        text = description.format_map(_Keep(args))
    except (ValueError, IndexError):
        return description
    # French contractions across the placeholder: "de le laboratoire" -> "du laboratoire".
    for loose, joined in (("de le ", "du "), ("de les ", "des "), ("à le ", "au "),
                          ("à les ", "aux ")):
        text = text.replace(" " + loose, " " + joined)
    return text


def decide(results: Iterable[CheckResult], table: SymbolTable, scoring: ScoringSection,
           direction: Direction) -> Verdict:
    """The verdict; a symbol the table keeps for one direction (`direction`) counts only for
    mail going that way."""
    by_group: dict[str, float] = {}
    scored: list[ScoredSymbol] = []
    forced = Action.ACCEPT
    for result in results:
        for hit in result.hits:
            sym = table[hit.symbol]
            if sym.direction and sym.direction != direction.value:
                continue
            value = round(sym.score * hit.factor, 3)
            by_group[sym.group] = by_group.get(sym.group, 0.0) + value
            scored.append(ScoredSymbol(name=sym.name, score=value,
                                       description=fill(sym.description, dict(hit.args)),
                                       detail=hit.detail, args=hit.args))
            if sym.action is not None and sym.action.severity > forced.severity:
                forced = sym.action
    total = 0.0
    for group, value in by_group.items():
        cap = table.group_caps.get(group)
        total += min(value, cap) if cap is not None else value
    total = round(total, 3)
    if total >= scoring.reject:
        action = Action.REJECT
    elif total >= scoring.quarantine:
        action = Action.QUARANTINE
    elif total >= scoring.tag:
        action = Action.TAG
    else:
        action = Action.ACCEPT
    if forced.severity > action.severity:
        action = forced
    scored.sort(key=lambda s: (-abs(s.score), s.name))
    return Verdict(action=action, score=total, symbols=tuple(scored))
