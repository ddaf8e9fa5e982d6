"""What is done with a judged message follows the chain of its direction and action, and the
symbol table refines it: changing a symbol's action or reply in rules/symbols.toml changes
the reply the sender gets, with no code edit (and a wrong reply is refused at start)."""

from __future__ import annotations

import shutil
from pathlib import Path

import aiosmtplib
import pytest

from gateway import replies
from gateway.errors import ConfigError
from gateway.service import load_rules, running
from gateway.workers import Workers
from tests.conftest import DOMAIN, make_config
from tests.support.sink import Sink
from tests.test_attachments import EICAR, message_with

RULES = Path(__file__).resolve().parents[1] / "rules"


def rules_with(tmp_path: Path, symbol: str, old: str, new: str) -> Path:
    """A copy of rules/ where one line of one symbol's entry is changed."""
    rules = tmp_path / "rules"
    shutil.copytree(RULES, rules)
    table = rules / "symbols.toml"
    text = table.read_text()
    start = text.index(f"[symbols.{symbol}]\n")
    at = text.index(old, start)
    assert at < text.index("\n[", start + 1), f"{old!r} not in {symbol}'s entry"
    table.write_text(text[:at] + new + text[at + len(old):])
    return rules


async def send(port: int) -> str:
    _, reply = await aiosmtplib.send(
        message_with("test.txt", EICAR), sender="resultats@labo.example",
        recipients=[f"docteur@{DOMAIN}"], hostname="127.0.0.1", port=port, start_tls=False)
    return reply


async def test_the_reply_follows_the_symbol_table(tmp_path: Path, sink: Sink):
    hop = {"address": sink.address, "starttls": "off"}
    # As shipped: the test virus is refused with the generic inbound policy reply.
    async with running(make_config(tmp_path / "a", next_hop=hop)) as gw:
        with pytest.raises(aiosmtplib.SMTPDataError) as exc:
            await send(gw.port)
    assert exc.value.code == replies.POLICY_REJECT.code
    assert exc.value.message.startswith(
        f"{replies.POLICY_REJECT.status} {replies.POLICY_REJECT.text} id=")

    # Its entry names a reply of its own: that one is sent.
    named = rules_with(tmp_path / "b", "YARA_EICAR", 'action = "reject"\n',
                       'action = "reject"\nreply = "OUTBOUND_POLICY_REJECT"\n')
    cfg = make_config(tmp_path / "b", gateway={"rules_dir": str(named)}, next_hop=hop)
    async with running(cfg) as gw:
        with pytest.raises(aiosmtplib.SMTPDataError) as exc:
            await send(gw.port)
    assert f"{replies.OUTBOUND_POLICY_REJECT.text} id=" in exc.value.message

    # Its action changed to quarantine: held, and the sender is told so (no 550 left behind).
    held = rules_with(tmp_path / "c", "YARA_EICAR", 'score = 20.0\naction = "reject"',
                      'score = 12.0\naction = "quarantine"')
    cfg = make_config(tmp_path / "c", gateway={"rules_dir": str(held)}, next_hop=hop)
    async with running(cfg) as gw:
        reply = await send(gw.port)
        store = gw.runtime.store
        assert store is not None
        (item,) = await store.list_items()
    assert reply.startswith(f"{replies.QUARANTINED.status} {replies.QUARANTINED.text} id=")
    assert item.action == "quarantine"
    assert sink.empty()


@pytest.mark.parametrize(("line", "why"), [
    ('reply = "NO_SUCH_REPLY"\n', "reply: a 5xx reply"),
    ('reply = "TEMPFAIL_SCAN"\n', "reply: a 5xx reply"),  # 451 text for a refusal
    ('hold = "everyone"\n', "hold: one of exposed"),
    ('notice = "maybe"\n', "notice: one of send, list"),
    ('hold = "exposed"\n', "hold: only for a symbol with direction"),  # inbound: no one else
])
def test_a_wrong_refinement_is_refused_at_start(tmp_path: Path, line: str, why: str):
    rules = rules_with(tmp_path, "YARA_EICAR", 'action = "reject"\n',
                       f'action = "reject"\n{line}')
    cfg = make_config(tmp_path / "d", gateway={"rules_dir": str(rules)})
    with pytest.raises(ConfigError, match=f"symbols.YARA_EICAR.{why}"):
        load_rules(cfg, Workers())


def test_the_failure_contract_cannot_be_narrowed(tmp_path: Path):
    """A timeout kept for one direction would count for nothing in the other: fail open."""
    rules = rules_with(tmp_path, "ATTACHMENTS_TIMEOUT", 'fail = "closed"\n',
                       'fail = "closed"\ndirection = "inbound"\n')
    cfg = make_config(tmp_path / "d", gateway={"rules_dir": str(rules)})
    with pytest.raises(ConfigError, match="ATTACHMENTS_TIMEOUT: a failure symbol"):
        load_rules(cfg, Workers())
