"""The verdict is a pure function: real symbol table, real values, no mocks."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.checks.base import CheckResult, Hit
from gateway.config import DEFAULT_RULES_DIR, ScoringSection
from gateway.message import Direction
from gateway.symbols import Action, load_table
from gateway.verdict import decide

IN = Direction.INBOUND
TABLE = load_table(DEFAULT_RULES_DIR / "symbols.toml")
SCORING = ScoringSection(tag=2.0, quarantine=4.0, reject=8.0)


def result(*symbols: str, factor: float = 1.0) -> CheckResult:
    return CheckResult.of("structure", *(Hit(symbol=s, factor=factor) for s in symbols))


@pytest.mark.parametrize(("symbols", "action"), [
    ((), Action.ACCEPT),
    (("MESSAGE_ID_MISSING",), Action.ACCEPT),
    (("FROM_MISSING",), Action.TAG),
    (("FROM_MISSING", "DATE_MISSING"), Action.QUARANTINE),
    (("STRUCTURE_TIMEOUT",), Action.TEMPFAIL),
    (("MESSAGE_UNPARSABLE",), Action.QUARANTINE),
    (("STRUCTURE_ERROR",), Action.ACCEPT),
    (("ATTACHMENTS_ERROR",), Action.QUARANTINE),  # attachment analysis fails closed
])
def test_thresholds_and_forced_actions(symbols, action):
    assert decide([result(*symbols)], TABLE, SCORING, IN).action is action


def test_group_cap_limits_structure_score():
    many = ("FROM_MISSING", "SMTP_BARE_LF_DOT", "MIME_TOO_COMPLEX", "DATE_MISSING")
    v = decide([result(*many)], TABLE, ScoringSection(tag=5, quarantine=10, reject=20), IN)
    assert v.score == TABLE.group_caps["structure"] == 6.0
    assert v.action is Action.TAG


def test_symbols_sorted_by_weight_with_french_text_and_factor():
    v = decide([result("MESSAGE_ID_MISSING"), result("FROM_MISSING", factor=0.5)], TABLE,
               SCORING, IN)
    assert [s.name for s in v.symbols] == ["FROM_MISSING", "MESSAGE_ID_MISSING"]
    assert v.symbols[0].score == 1.5
    assert v.score == 2.0
    assert "expéditeur" in v.symbols[0].description
    assert v.symbols_header() == "FROM_MISSING(1.5), MESSAGE_ID_MISSING(0.5)"


def test_forced_tempfail_is_outranked_by_quarantine_score():
    v = decide([result("FROM_MISSING", "DATE_MISSING", "STRUCTURE_TIMEOUT")], TABLE, SCORING, IN)
    assert v.action is Action.QUARANTINE


def test_every_symbol_has_french_text():
    for sym in TABLE.symbols.values():
        assert sym.description and sym.description[0].isupper(), sym.name
        assert sym.description.endswith(("." , ".»")), sym.name


def test_table_errors_name_the_symbol(tmp_path: Path):
    bad = tmp_path / "symbols.toml"
    bad.write_text('[symbols.FOO_BAR]\nscore = "high"\ndescription = "x"\n'
                   '[symbols.BAZ]\nscore = 1\ndescription = "y"\naction = "explode"\n')
    from gateway.errors import ConfigError
    with pytest.raises(ConfigError) as exc:
        load_table(bad)
    assert "symbols.FOO_BAR.score" in str(exc.value)
    assert "symbols.BAZ.action" in str(exc.value)


def test_descriptions_name_the_organisation_in_good_french():
    from gateway.verdict import fill
    assert fill("Un lien imite celui de {org}.", {"org": "le laboratoire Biogroup"}) == \
        "Un lien imite celui du laboratoire Biogroup."
    assert fill("venant de {org} ({domain})", {"org": "l'AP-HP", "domain": "x.fr"}) == \
        "venant de l'AP-HP (x.fr)"
    assert fill("sans {inconnu}", {}) == "sans {inconnu}"
