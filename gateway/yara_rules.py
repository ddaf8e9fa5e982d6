"""YARA rules: compiled once at start (and again on SIGHUP), installed in the worker processes
(pickled in YARA's compiled form) and scanned there.

Our rules live in rules/yara/; extra folders (third-party sets) come from the config. Each file
is compiled on its own first, so that one broken file is reported (file and line) without
losing the others; what compiles is then compiled together. Rule metadata `symbol` names the
symbol of a match; without it, YARA_MATCH. The symbol's policy is written once: in
rules/symbols.toml for our own rules, or, for a symbol a third-party folder brings, in the
rule's own metadata (`score`, `description_fr`, optionally `action`), read into the symbol
table at start (gateway/symbols.py: `rule_symbol`).
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import yara

log = logging.getLogger(__name__)

FALLBACK_SYMBOL = "YARA_MATCH"
EXTENSIONS = (".yar", ".yara", ".rule", ".rules")


@dataclass(frozen=True, slots=True, kw_only=True)
class Match:
    rule: str
    symbol: str


@dataclass(slots=True)
class LoadReport:
    files: int = 0
    rules: int = 0
    rejected: dict[str, str] = field(default_factory=dict)  # file -> error (with line)


class YaraRules:
    def __init__(self, compiled: yara.Rules, symbols: dict[str, str], report: LoadReport,
                 timeout_s: int, declared: dict[str, dict[str, object]] | None = None) -> None:
        self._rules = compiled
        self._symbols = symbols
        # symbol -> the policy a rule's metadata gives it (score, description_fr, action)
        self.declared = declared or {}
        self.report = report
        self._timeout = max(1, timeout_s)

    def __reduce__(self) -> tuple[object, ...]:
        """Pickled as YARA's own compiled form, to be installed in the worker processes."""
        saved = io.BytesIO()
        self._rules.save(file=saved)
        return (_restore, (saved.getvalue(), self._symbols, self.report, self._timeout,
                           self.declared))

    @property
    def symbols(self) -> frozenset[str]:
        return frozenset(self._symbols.values()) | {FALLBACK_SYMBOL}

    def scan(self, data: bytes, limit_s: float = math.inf) -> list[Match]:
        """Matches within the rules' timeout, or `limit_s` if less (whole seconds, 1 at
        least: YARA's unit)."""
        timeout = max(1, min(self._timeout, math.ceil(limit_s) if limit_s < math.inf
                             else self._timeout))
        try:
            matches = self._rules.match(data=data, timeout=timeout, fast=True)
        except yara.TimeoutError:
            return [Match(rule="(timeout)", symbol="YARA_TIMEOUT")]
        except yara.Error as exc:
            log.warning("YARA scan failed: %s", exc)
            return []
        return [Match(rule=m.rule, symbol=self._symbols.get(m.rule, FALLBACK_SYMBOL))
                for m in matches]


def _restore(saved: bytes, symbols: dict[str, str], report: LoadReport, timeout_s: int,
             declared: dict[str, dict[str, object]]) -> YaraRules:
    return YaraRules(yara.load(file=io.BytesIO(saved)), symbols, report, timeout_s, declared)


def rule_files(folders: list[Path]) -> list[Path]:
    out: list[Path] = []
    for folder in folders:
        out += sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS
                      and p.is_file())
    return out


def compile_rules(folders: list[Path], *, timeout_s: int = 5) -> YaraRules:
    report = LoadReport()
    good: dict[str, str] = {}
    for path in rule_files(folders):
        report.files += 1
        try:
            yara.compile(filepath=str(path), includes=True)
        except yara.SyntaxError as exc:
            report.rejected[str(path)] = str(exc)  # "path(line): error"
            continue
        except yara.Error as exc:
            report.rejected[str(path)] = str(exc)
            continue
        good[f"f{len(good)}"] = str(path)
    compiled = yara.compile(filepaths=good, includes=True) if good else yara.compile(
        source="rule gateway_empty { condition: false }")
    symbols: dict[str, str] = {}
    declared: dict[str, dict[str, object]] = {}
    for rule in compiled:
        report.rules += 1
        symbol = rule.meta.get("symbol")
        if isinstance(symbol, str) and symbol:
            symbols[rule.identifier] = symbol
            policy = {k: rule.meta[k] for k in ("score", "description_fr", "action")
                      if k in rule.meta}
            if policy:
                declared.setdefault(symbol, {**policy, "rule": rule.identifier})
    for rejected, error in report.rejected.items():
        log.error("YARA rules rejected: %s: %s", rejected, error)
    log.info("YARA rules loaded", extra={"fields": {
        "files": report.files, "rules": report.rules, "rejected": len(report.rejected)}})
    return YaraRules(compiled, symbols, report, timeout_s, declared)
