"""Failure as a declared contract: a check that runs out of time or fails is answered as
rules/symbols.toml declares (`fail`), and its facts are Unavailable, never "nothing found"."""

from __future__ import annotations

import shutil
from pathlib import Path

import aiosmtplib
import pytest

from gateway.accounts import AccountFile
from gateway.errors import ConfigError
from gateway.service import load_rules, running
from gateway.workers import Workers
from tests.conftest import DOMAIN, make_config
from tests.support.dnsserver import ThreadedDnsServer
from tests.support.sink import Sink
from tests.support.webclient import suspicious
from tests.test_auth_smtp import ZONE, original, send
from tests.test_outbound import LAB, mail
from tests.test_submission import PASSWORD, USER, Setup, cert, client, relay  # noqa: F401

INSTANT = 1e-6  # seconds: any job in the worker pool overruns it


async def test_dkim_overrunning_its_time_on_a_p_reject_domain_gets_451_not_550(
        tmp_path: Path, sink: Sink, dns_zone: ThreadedDnsServer):
    """Genuine, DKIM-aligned mail from a p=reject domain, sent from an address its SPF does
    not list (a forwarder): only DKIM can pass it. When the verification overruns, DMARC must
    not read "no DKIM" and refuse it: the sender retries."""
    dns_zone.load(ZONE)
    slow = make_config(tmp_path / "slow", timeouts={"dkim_s": INSTANT},
                       next_hop={"address": sink.address, "starttls": "off"})
    async with running(slow) as gw:
        with pytest.raises(aiosmtplib.SMTPDataError) as exc:
            await send(gw.port, original(), "bounce@liste.example")
        assert exc.value.code == 451
    assert sink.empty()
    # In time, the same message passes (so the 451 above was the timeout's doing).
    cfg = make_config(tmp_path / "ok", next_hop={"address": sink.address, "starttls": "off"})
    async with running(cfg) as gw:
        assert (await send(gw.port, original(), "bounce@liste.example")).startswith("2.0.0")
    assert b"dkim=pass" in (await sink.get()).data


async def test_an_attachment_analysis_that_overruns_holds_the_message(tmp_path: Path,
                                                                      sink: Sink):
    cfg = make_config(tmp_path, timeouts={"attachments_s": INSTANT},
                      next_hop={"address": sink.address, "starttls": "off"})
    raw = suspicious(subject="Compte rendu", body="Bonjour,\nle compte rendu.\n")
    async with running(cfg) as gw:
        _, reply = await aiosmtplib.send(raw, sender="contact@labo-analyses.example",
                                         recipients=[f"docteur@{DOMAIN}"], hostname="127.0.0.1",
                                         port=gw.port, start_tls=False)
        assert "quarantaine" in reply
        store = gw.runtime.store
        assert store is not None
        (item,) = await store.list_items()
        assert "ATTACHMENTS_TIMEOUT" in {s.name for s in item.symbols}
    assert sink.empty()


async def test_an_outbound_scan_that_overruns_holds_the_message(tmp_path: Path, cert,  # noqa: F811
                                                                relay: Sink, sink: Sink):  # noqa: F811
    """A NIR must not leave in clear because the scan was slow: held, nothing sent."""
    cfg = make_config(
        tmp_path / "data", smtp={"tls_cert": str(cert[0]), "tls_key": str(cert[1])},
        next_hop={"address": sink.address, "starttls": "off"}, timeouts={"outbound_s": INSTANT},
        submission={"listen": "127.0.0.1:0", "smarthost": relay.address,
                    "smarthost_ca_file": str(cert[0]), "cleartext_auth_networks": []})
    AccountFile(cfg.submission_users_file).add(USER, PASSWORD)
    async with running(cfg) as gw:
        smtp = await client(Setup(gw=gw, relay=relay, mailbox=sink, cert=cert[0]))
        try:
            to = "patient@gmail.com"
            _, reply = await smtp.sendmail(USER, [to], mail(to, LAB))
        finally:
            smtp.close()
        assert "quarantaine" in reply
        store = gw.runtime.store
        assert store is not None
        (item,) = await store.list_items()
        assert item.direction == "outbound"
        assert "OUTBOUND_TIMEOUT" in {s.name for s in item.symbols}
    assert relay.empty()


def test_a_symbol_table_without_a_declared_failure_is_refused(tmp_path: Path):
    rules = tmp_path / "rules"
    shutil.copytree(Path(__file__).resolve().parents[1] / "rules", rules)
    table = rules / "symbols.toml"
    text = table.read_text()
    block = text.index("[symbols.DKIM_ERROR]")
    fail = text.index('fail = "open"\n', block)
    table.write_text(text[:fail] + text[fail + len('fail = "open"\n'):])
    cfg = make_config(tmp_path / "data", gateway={"rules_dir": str(rules)})
    with pytest.raises(ConfigError, match=r"symbols\.DKIM_ERROR: fail = \"open\" or \"closed\""):
        load_rules(cfg, Workers())
    # A timeout may not fail open.
    table.write_text(text.replace('[symbols.SPF_TIMEOUT]\ngroup = "runner"\nscore = 0.0\n'
                                  'fail = "retry"', '[symbols.SPF_TIMEOUT]\ngroup = "runner"\n'
                                  'score = 0.0\nfail = "open"'))
    with pytest.raises(ConfigError, match=r"symbols\.SPF_TIMEOUT: fail = \"retry\" or \"closed\""):
        load_rules(cfg, Workers())
