"""The symbol table: rules/symbols.toml read into frozen values.

Each symbol has a group, a default score, an optional forced action and a French explanation
for the people who read banners and the quarantine page. At start-up the table and the checks
must agree: a symbol a check may emit without an entry, or an entry no check emits, is an error.

Failure is a declared contract: the symbols the runner emits when a check does not finish,
`<CHECK>_TIMEOUT` and `<CHECK>_ERROR`, each declare `fail` instead of an action:

* "retry": the sender is asked to retry (451); timeouts only;
* "closed": the message is held in quarantine (outbound: not sent);
* "open": the message is judged on the other checks; errors only, never a timeout.

A table where one of them lacks `fail` is refused at start-up.

What is done with the message is the chain of its direction and action (gateway/chains.py);
a symbol may refine it here, never in code: `reply` (the name of the reply in
gateway/replies.py sent when it decides the action), `hold = "exposed"` (held only for the
recipients a check found exposed, sent to the others), `notice = "send"` (the sender gets a
French notice) or `notice = "list"` (its explanation is listed in that notice);
`direction` keeps a symbol for mail going one way.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gateway import replies
from gateway.config import read_toml
from gateway.errors import ConfigError


class Action(enum.Enum):
    """What a message's score or a symbol's forced action leads to, least severe first."""

    ACCEPT = "accept"
    TAG = "tag"
    TEMPFAIL = "tempfail"
    QUARANTINE = "quarantine"
    REJECT = "reject"

    @property
    def severity(self) -> int:
        return _SEVERITY[self]


_SEVERITY = {a: i for i, a in enumerate(Action)}


@dataclass(frozen=True, slots=True, kw_only=True)
class Symbol:
    name: str
    group: str
    score: float
    description: str  # French
    # French template of the finding's detail, from the hit's args (the English `detail` is
    # for the logs); empty: the detail is data alone (a domain, a file name) and shown as is.
    detail: str = ""
    action: Action | None = None  # forced minimum action
    fail: str = ""  # runner symbols: "retry", "closed" or "open" (gives the action)
    reply: str = ""  # a name in gateway/replies.py: the reply when this symbol decides
    hold: str = ""  # "exposed": held only for the exposed recipients
    notice: str = ""  # "send": the sender gets a notice; "list": listed in it
    direction: str = ""  # "inbound" or "outbound": counts only for mail going that way


@dataclass(frozen=True, slots=True, kw_only=True)
class SymbolTable:
    symbols: Mapping[str, Symbol]
    group_caps: Mapping[str, float]  # group -> maximum total score it may add

    def __getitem__(self, name: str) -> Symbol:
        return self.symbols[name]

    def __contains__(self, name: object) -> bool:
        return name in self.symbols


_SYMBOL_KEYS = {"group", "score", "description", "detail", "action", "fail", "reply", "hold",
                "notice", "direction"}
_CHOICES = {"hold": ("exposed",), "notice": ("send", "list"),
            "direction": ("inbound", "outbound")}
_REPLY_CLASS = {Action.REJECT: 5, Action.TEMPFAIL: 4}
FAIL_ACTIONS = {"retry": Action.TEMPFAIL, "closed": Action.QUARANTINE, "open": None}


def load_table(path: Path) -> SymbolTable:
    data = read_toml(path, "table des symboles")
    problems: list[str] = []
    caps: dict[str, float] = {}
    for group, spec in data.pop("groups", {}).items():
        if not isinstance(spec, dict) or set(spec) - {"max_score"}:
            problems.append(f"{path}: groups.{group}: only max_score is allowed")
            continue
        caps[group] = float(spec["max_score"])
    symbols: dict[str, Symbol] = {}
    for name, spec in data.get("symbols", {}).items():
        where = f"{path}: symbols.{name}"
        if not isinstance(spec, dict):
            problems.append(f"{where}: expected a table")
            continue
        unknown = set(spec) - _SYMBOL_KEYS
        if unknown:
            problems.append(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        if not name.isupper() or " " in name:
            problems.append(f"{where}: symbol names are UPPER_SNAKE_CASE")
        if not isinstance(spec.get("score"), int | float):
            problems.append(f"{where}.score: a number is required")
            continue
        if not isinstance(spec.get("description"), str) or not spec["description"].strip():
            problems.append(f"{where}.description: a French explanation is required")
            continue
        action = None
        fail = spec.get("fail", "")
        if fail:
            if fail not in FAIL_ACTIONS or "action" in spec:
                problems.append(f"{where}.fail: one of retry, closed, open (and no action: "
                                "fail gives it)")
                continue
            action = FAIL_ACTIONS[fail]
        if "action" in spec:
            try:
                action = Action(spec["action"])
            except ValueError:
                problems.append(f"{where}.action: one of {', '.join(a.value for a in Action)}")
                continue
        refine = {k: spec.get(k, "") for k in ("reply", "hold", "notice", "direction")}
        if refine["reply"]:
            reply = getattr(replies, str(refine["reply"]), None)
            wanted = _REPLY_CLASS.get(action) if action is not None else None
            if not isinstance(reply, replies.Reply) or wanted is None \
                    or reply.code // 100 != wanted:
                problems.append(f"{where}.reply: a {wanted or '4 or 5'}xx reply of "
                                "gateway/replies.py, with action reject (5xx) or tempfail (4xx)")
                continue
        bad = [k for k, values in _CHOICES.items() if refine[k] and refine[k] not in values]
        if bad:
            problems.append(f"{where}.{bad[0]}: one of {', '.join(_CHOICES[bad[0]])}")
            continue
        if fail and any(refine.values()):  # the failure contract is not to be narrowed
            problems.append(f"{where}: a failure symbol (fail) takes no reply, hold, notice "
                            "or direction")
            continue
        if refine["hold"] and refine["direction"] != "outbound":
            problems.append(f'{where}.hold: only for a symbol with direction = "outbound" '
                            "(mail held for some recipients is sent to the others)")
            continue
        symbols[name] = Symbol(
            name=name, group=str(spec.get("group", "misc")), score=float(spec["score"]),
            description=spec["description"].strip(), detail=str(spec.get("detail", "")).strip(),
            action=action, fail=fail,
            reply=str(refine["reply"]), hold=str(refine["hold"]), notice=str(refine["notice"]),
            direction=str(refine["direction"]))
    if set(data) - {"symbols"}:
        problems.append(f"{path}: unknown top-level key(s) {', '.join(sorted(set(data) - {'symbols'}))}")
    if problems:
        raise ConfigError("\n".join(problems))
    return SymbolTable(symbols=symbols, group_caps=caps)


def rule_symbol(name: str, meta: dict[str, object], *, where: str) -> Symbol:
    """A symbol whose policy a rule file declares in its own metadata (a third-party YARA
    set adds its symbols without a code or table change)."""
    score, text, action = meta.get("score"), meta.get("description_fr"), meta.get("action")
    if not name.isupper() or " " in name:
        raise ConfigError(f"{where}: symbol names are UPPER_SNAKE_CASE: {name}")
    try:
        value = float(score)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: symbol {name}: meta score must be a number") from None
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{where}: symbol {name}: meta description_fr (French) is required")
    try:
        forced = Action(action) if action is not None else None
    except ValueError:
        raise ConfigError(f"{where}: symbol {name}: meta action must be one of "
                          f"{', '.join(a.value for a in Action)}") from None
    return Symbol(name=name, group="attachments", score=value, description=text.strip(),
                  detail="Fichier : {file} ; règle : {rule}.", action=forced)


def extended(table: SymbolTable, more: dict[str, Symbol], *, path: Path) -> SymbolTable:
    """The table with symbols declared elsewhere (rule metadata); one declared in both places
    is refused: a policy is written once."""
    twice = sorted(set(more) & set(table.symbols))
    if twice:
        raise ConfigError(f"{path}: symbol(s) {', '.join(twice)} also given a score and a "
                          "description by rule metadata: keep one")
    return SymbolTable(symbols={**table.symbols, **more}, group_caps=table.group_caps)


def check_consistency(table: SymbolTable, emitted: frozenset[str], *, path: Path) -> None:
    """Refuse a symbol a check may emit without a table entry, and the reverse."""
    missing = sorted(emitted - set(table.symbols))
    unused = sorted(set(table.symbols) - emitted)
    problems = []
    if missing:
        problems.append(f"{path}: no entry for symbol(s) {', '.join(missing)}")
    if unused:
        problems.append(f"{path}: entries no check emits: {', '.join(unused)}")
    if problems:
        raise ConfigError("\n".join(problems))


def check_failure_contract(table: SymbolTable, check_names: list[str], *, path: Path) -> None:
    """Every check's `_TIMEOUT` declares retry or closed, its `_ERROR` open or closed: how
    the message is answered when that check cannot finish is never left to chance."""
    allowed = {"TIMEOUT": ("retry", "closed"), "ERROR": ("open", "closed")}
    problems = []
    for name in check_names:
        for kind, values in allowed.items():
            symbol = f"{name.upper()}_{kind}"
            fail = table.symbols[symbol].fail if symbol in table.symbols else ""
            if fail not in values:
                problems.append(f"{path}: symbols.{symbol}: fail = " + " or ".join(
                    f'"{v}"' for v in values) + " is required (what happens when the check "
                    f"{'runs out of time' if kind == 'TIMEOUT' else 'fails'})")
    if problems:
        raise ConfigError("\n".join(problems))
