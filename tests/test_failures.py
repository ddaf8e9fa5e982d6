"""Failure as a declared contract: a check that runs out of time or fails is answered as
rules/symbols.toml declares (`fail`), and its facts are Unavailable, never "nothing found"."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
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
from tests.test_attachments import message_with
from tests.test_auth_smtp import ZONE, original, send
from tests.test_outbound import LAB, mail
from tests.test_submission import PASSWORD, USER, Setup, cert, client, relay  # noqa: F401

INSTANT = 1e-6  # seconds: any job in the worker pool overruns it


@pytest.mark.promise("dns-trouble-451")
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


# A third-party rule that costs quadratic time in the size of what it scans, for files that
# start with "RUNN": tens of minutes on the attachment below, if nothing stopped it.
RUNAWAY_RULE = """
rule tiers_regle_lente {
    meta:
        symbol = "TIERS_LENT"
        score = 1
        description_fr = "Motif d'une règle tierce lente."
    condition:
        uint32(0) == 0x4e4e5552 and
        for all i in (0..filesize - 1) : (
            for all j in (0..filesize - 1) : ( uint8(i) != uint8(j) + 1 or uint8(i) == 0 ) )
}
"""


@pytest.mark.promise("timeouts-fail-closed")
async def test_an_attachment_analysis_that_runs_away_is_killed_frees_its_slot_and_holds(
        tmp_path: Path, sink: Sink):
    """One worker process: if the runaway job kept it, the next message's analysis could not
    run within its own limits. It is killed, the message is held, and the next one passes."""
    extra = tmp_path / "tiers"
    extra.mkdir()
    (extra / "lente.yar").write_text(RUNAWAY_RULE)
    cfg = make_config(tmp_path / "d", gateway={"job_processes": 1},
                      timeouts={"attachments_s": 1.0},
                      attachments={"yara_dirs": [str(extra)], "yara_timeout_s": 3600},
                      next_hop={"address": sink.address, "starttls": "off"})
    runaway = message_with("mesures.bin", b"RUNN" + b"\x05" * 60_000)
    async with running(cfg) as gw:
        store = gw.runtime.store
        assert store is not None
        for _ in range(2):  # as many as the threads of the thread pool: not there
            code, reply = await _send(gw.port, runaway)
            assert (code, "quarantaine" in reply) == (250, True)
        items = await store.list_items()
        assert len(items) == 2
        assert all("ATTACHMENTS_TIMEOUT" in {s.name for s in i.symbols} for i in items)
        # The same process slot analyses the next message in full, within the 1 s limit.
        code, reply = await _send(gw.port, message_with("note.txt", b"Bonjour docteur."))
        assert code == 250 and "quarantaine" not in reply
    delivered = await sink.get()
    assert b"ATTACHMENTS_TIMEOUT" not in delivered.data
    assert b"X-Gateway-Action: accept" in delivered.data
    assert sink.empty()


async def _send(port: int, raw: bytes) -> tuple[int, str]:
    errors, reply = await aiosmtplib.send(
        raw, sender="resultats@labo.example", recipients=[f"docteur@{DOMAIN}"],
        hostname="127.0.0.1", port=port, start_tls=False)
    assert not errors
    return 250, reply


@pytest.mark.promise("timeouts-fail-closed")
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


async def test_a_subject_of_200000_encoded_words_is_judged_not_retried(tmp_path: Path,
                                                                       sink: Sink):
    """The stdlib joins encoded words in quadratic time: this 4 MB Subject took 38 s to decode,
    past the parse limit (451, and the sender's retry costs as much again). Only the first
    16 KB of a field is decoded: the message is judged and delivered. Its header block is
    longer than the MIME walk reads, so it is tagged: the warning goes in a header field, and
    the rest of the message, which the walk could not tell from a body, is left as it was
    (a banner there had re-encoded the end of the Subject as text)."""
    cfg = make_config(tmp_path, next_hop={"address": sink.address, "starttls": "off"})
    subject = "\r\n ".join(["=?utf-8?q?caf=C3=A9?="] * 200_000)  # folded: 998-octet lines
    raw = (f"From: Laboratoire <resultats@labo.example>\r\nTo: docteur@{DOMAIN}\r\n"
           f"Subject: {subject}\r\nMessage-ID: <long@labo.example>\r\n"
           "Date: Sat, 28 Nov 2026 10:00:00 +0100\r\n\r\nBonjour.\r\n").encode()
    async with running(cfg) as gw:
        code, reply = await _send(gw.port, raw)
    assert code == 250 and "transmis" in reply
    data = (await sink.get()).data
    assert b"X-Gateway-Action: tag" in data and b"X-Gateway-Warning: " in data
    start = raw.index(b"From: ")
    tagged = raw[start:].replace(b"Subject: ", b"Subject: [SUSPECT] ", 1)
    assert data.endswith(tagged)


async def test_a_from_of_50000_domains_is_held_without_50000_lookups(tmp_path: Path, sink: Sink):
    """Each From domain is a DMARC lookup (RFC 7489 6.6.1): 50,000 of them held the event
    loop and the resolver for the whole message budget. Past five, the message is held."""
    cfg = make_config(tmp_path, next_hop={"address": sink.address, "starttls": "off"})
    authors = ",\r\n ".join(f"<u{i}@x{i}.example>" for i in range(50_000))
    raw = (f"From: {authors}\r\nTo: docteur@{DOMAIN}\r\nSubject: Bonjour\r\n"
           "Message-ID: <many@x0.example>\r\nDate: Sat, 28 Nov 2026 10:00:00 +0100\r\n\r\n"
           "Bonjour.\r\n").encode()
    async with running(cfg) as gw:
        code, reply = await _send(gw.port, raw)
        store = gw.runtime.store
        assert store is not None
        (item,) = await store.list_items()
    assert code == 250 and "quarantaine" in reply
    assert "DMARC_TOO_MANY_FROM_DOMAINS" in {s.name for s in item.symbols}
    assert sink.empty()


def _job_workers() -> list[int]:
    """Worker processes of this process's killable-job pools: children of its fork server."""
    def children(pid: int) -> list[int]:
        out = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out += [int(c) for c in (task / "children").read_text().split()]
        return out
    servers = [c for c in children(os.getpid())
               if b"forkserver" in Path(f"/proc/{c}/cmdline").read_bytes()]
    return [w for s in servers for w in children(s)]


async def test_a_worker_lost_while_idle_does_not_break_the_analysis(tmp_path: Path, sink: Sink):
    """A worker that dies outside a job (the kernel's out-of-memory killer taking an idle
    one) is replaced before the next job: the mail is analysed, not held as unanalysable."""
    cfg = make_config(tmp_path, gateway={"job_processes": 1},
                      next_hop={"address": sink.address, "starttls": "off"})
    note = message_with("note.txt", b"Bonjour docteur.")
    async with running(cfg) as gw:
        assert (await _send(gw.port, note))[1].find("transmis") > 0
        workers = _job_workers()
        assert workers, "the message with a file went through a worker process"
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        for _ in range(2):
            code, reply = await _send(gw.port, note)
            assert code == 250 and "transmis" in reply, reply
    for _ in range(3):
        data = (await sink.get()).data
        assert b"X-Gateway-Action: accept" in data and b"ATTACHMENTS_ERROR" not in data


def test_yara_on_the_bodies_of_one_message_shares_one_budget(tmp_path: Path):
    """A message of bodies only is scanned in a thread, which cannot be stopped: each YARA
    scan has its own timeout, and all of them share the check's limit, or 1,000 parts under
    a slow third-party rule would hold the thread for 1,000 timeouts."""
    from email.message import EmailMessage

    from gateway.attachments import Policy, analyse
    from gateway.cli import to_crlf
    from gateway.config import DEFAULT_RULES_DIR
    from gateway.message import parse_message
    from gateway.yara_rules import compile_rules

    (tmp_path / "lente.yar").write_text(RUNAWAY_RULE)
    rules = compile_rules([tmp_path], timeout_s=1)
    m = EmailMessage()
    m["From"] = "resultats@labo.example"
    m.set_content("RUNN" + "\x05" * 20_000)
    for _ in range(40):
        m.add_alternative("RUNN" + "\x05" * 20_000)
    raw = to_crlf(bytes(m))
    parsed = parse_message(raw)
    assert not parsed.has_files
    findings = analyse(raw, parsed, Policy.load(DEFAULT_RULES_DIR / "attachments.toml"), rules,
                       1.5)
    timeouts = [f for f in findings if f.symbol == "YARA_TIMEOUT"]
    assert any(f.name == "(message)" for f in timeouts)  # the budget stopped the scans
    assert len(timeouts) <= 4  # not one per part


async def test_quadratic_html_is_read_in_a_killed_worker_and_other_mail_goes_on(tmp_path: Path):
    """Markup the standard library's HTML parser reads in quadratic time (200 KB of "<a"):
    read in a worker process killed at the limit (451, the sender retries), never in a
    thread of the pool, so that a plain message beside it is judged (found by review)."""
    import asyncio

    from gateway.message import Inbound
    from gateway.service import build_runtime
    from gateway.symbols import Action
    from tests.test_impersonation import mail as plain_mail

    cfg = make_config(tmp_path, timeouts={"impersonation_s": 2})
    rt = await build_runtime(cfg, with_store=False)
    try:
        hostile = plain_mail("A <a@b.example>", "Page", "Voir", html="<a" * 100_000)
        plain = plain_mail("Labo <resultats@labo.example>", "Résultats", "Bonjour")

        async def judge(raw: bytes):
            return (await rt.pipeline.analyse(Inbound(
                queue_id="q", peer_ip="192.0.2.9", helo="h.example", mail_from="a@b.example",
                rcpts=(f"docteur@{DOMAIN}",), raw=raw))).verdict

        stalled = asyncio.ensure_future(asyncio.gather(judge(hostile), judge(hostile)))
        await asyncio.sleep(0.2)
        v = await judge(plain)
        assert v.action is Action.ACCEPT, v
        for verdict in await stalled:
            assert "CONTENT_TIMEOUT" in {s.name for s in verdict.symbols}
            assert verdict.action is Action.TEMPFAIL
    finally:
        await rt.close()
