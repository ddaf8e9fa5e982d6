"""DKIM, DMARC and ARC through the real pipeline, with DNS answers from a server on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gateway.auth import AuthStatus
from gateway.auth.arc import ArcFacts
from gateway.auth.dkim import DkimFacts, DkimSignature
from gateway.auth.dmarc import DmarcCheck, DmarcFacts, DmarcSyntaxError, aligned, parse_record
from gateway.auth.spf import SpfFacts
from gateway.checks.base import CheckContext, CheckResult, Services
from gateway.cli import to_crlf
from gateway.message import Inbound, parse_message
from gateway.runtime import Runtime
from gateway.service import build_runtime, create_resolver
from gateway.workers import Workers
from tests.conftest import CORPUS, DOMAIN, make_config
from tests.support.dnsserver import ThreadedDnsServer
from tests.support.keys import dkim_keypair


def inbound(raw: bytes, *, mail_from: str = "", ip: str = "192.0.2.10",
            helo: str = "mail.example.org") -> Inbound:
    return Inbound(queue_id="test", peer_ip=ip, helo=helo, mail_from=mail_from,
                   rcpts=(f"docteur@{DOMAIN}",), raw=to_crlf(raw))


def facts(analysis, kind):
    return next(r.facts for r in analysis.results if isinstance(r.facts, kind))


# ---- DKIM: dkimpy's vectors ----------------------------------------------------------------

DKIM_DIR = CORPUS / "dkim-dkimpy"


def dkim_zone() -> dict:
    spec = yaml.safe_load((DKIM_DIR / "expected.yaml").read_text())
    zone: dict = {}
    for name, value in spec["dns"].items():
        if "#" in name:
            continue
        text = (DKIM_DIR / value["file"]).read_text() if isinstance(value, dict) else value
        zone[name] = [("TXT", " ".join(text.split()))]
    return zone


def dkim_cases() -> list:
    if not (DKIM_DIR / "expected.yaml").exists():
        return [pytest.param(None, None, marks=pytest.mark.skip(reason="corpus not found"))]
    spec = yaml.safe_load((DKIM_DIR / "expected.yaml").read_text())
    return [pytest.param(name, expected, id=name) for name, expected in spec["verify"].items()]


@pytest.mark.parametrize(("name", "expected"), dkim_cases())
async def test_dkim_vectors(runtime: Runtime, dns_zone: ThreadedDnsServer, name, expected):
    zone = dkim_zone()
    file = name.split("@")[0]
    if name.endswith("@corrupt-key"):
        record = zone["test._domainkey.football.example.com"][0][1]
        head, _, key = record.partition("p=")
        zone["test._domainkey.football.example.com"] = [("TXT", head + "p=" + key[:40] + "AAAA"
                                                         + key[44:])]
    dns_zone.load(zone)
    analysis = await runtime.pipeline.analyse(inbound((DKIM_DIR / file).read_bytes()))
    got = [s.result.value for s in facts(analysis, DkimFacts).signatures]
    assert got == expected


SELF_SIGNED = (b"From: Labo <resultats@labo.example>\r\nTo: docteur@cabinet.test\r\n"
               b"Subject: Resultats\r\nDate: Mon, 30 Nov 2026 10:00:00 +0100\r\n"
               b"Message-ID: <r1@labo.example>\r\n\r\nBonjour docteur.\r\n")


def signed_by_us(selector: bytes = b"s1") -> tuple[bytes, str]:
    """A message signed with a key made here (no corpus needed), and that key's record."""
    import dkim
    private, record = dkim_keypair()
    return dkim.sign(SELF_SIGNED, selector, b"labo.example", private) + SELF_SIGNED, record


@pytest.mark.parametrize("kind", ["bad-version", "unknown-k", "corrupt-p", "not-dkim", "no-k"])
async def test_dkim_bad_key_records(runtime: Runtime, dns_zone: ThreadedDnsServer, kind: str):
    """The key records dkimpy's own vectors test, rebuilt around a key made here."""
    signed, record = signed_by_us()
    p = record.split("p=", 1)[1]
    text = {"bad-version": f"v=DKIM2; k=rsa; p={p}", "unknown-k": f"v=DKIM1; k=dsa; p={p}",
            "corrupt-p": f"v=DKIM1; k=rsa; p={p[:40]}!!!!{p[44:]}",
            "not-dkim": "v=TLSRPTv1; rua=mailto:tls@labo.example",
            "no-k": f"v=DKIM1; p={p}"}[kind]
    dns_zone.load({"s1._domainkey.labo.example": [("TXT", text)]})
    analysis = await runtime.pipeline.analyse(inbound(signed))
    [sig] = facts(analysis, DkimFacts).signatures
    # Without k= the key is RSA (RFC 6376 3.6.1): it verifies.
    assert sig.result is (AuthStatus.PASS if kind == "no-k" else AuthStatus.PERMERROR)


async def test_dkim_key_lookup_timeout_is_temperror_not_fail(runtime: Runtime,
                                                              dns_zone: ThreadedDnsServer):
    signed, _ = signed_by_us()
    dns_zone.load({"s1._domainkey.labo.example": ["TIMEOUT"]})
    analysis = await runtime.pipeline.analyse(inbound(signed))
    assert [s.result for s in facts(analysis, DkimFacts).signatures] == [AuthStatus.TEMPERROR]
    names = {s.name for s in analysis.verdict.symbols}
    assert "DKIM_TEMPERROR" in names and "DKIM_FAIL" not in names


# ---- DMARC ---------------------------------------------------------------------------------

DMARC_DIR = CORPUS / "dmarc-authheaders"


def dmarc_cases() -> list:
    path = DMARC_DIR / "dmarc-cases.yaml"
    if not path.exists():
        return [pytest.param(None, None, marks=pytest.mark.skip(reason="corpus not found"))]
    spec = yaml.safe_load(path.read_text())
    out = []
    for case in spec["cases"]:
        marks = [pytest.mark.skip(reason="DMARCbis PSD tree walk: RFC 7489 only")] \
            if case.get("dmarcbis") else []
        out.append(pytest.param(spec["zone"], case, id=case["id"], marks=marks))
    return out


def dmarc_zone(zone: dict) -> dict:
    out: dict = {}
    for name, value in zone.items():
        if value is None:
            continue  # absent: NXDOMAIN
        if name.startswith("_dmarc.") or "._domainkey." in name:
            out[name] = [("TXT", value)] if value else []
        else:
            out[name] = [("A", "192.0.2.1")] if value else []
    return out


@pytest.mark.parametrize(("zone", "case"), dmarc_cases())
async def test_dmarc_cases(tmp_path: Path, dns_zone: ThreadedDnsServer, zone, case):
    dns_zone.load(dmarc_zone(zone))
    cfg = make_config(tmp_path)
    raw = to_crlf((DMARC_DIR / case["message"]).read_bytes())
    if case["dkim_results"] == "verify-it":
        rt = await build_runtime(cfg, with_store=False)
        try:
            analysis = await rt.pipeline.analyse(inbound(raw))
        finally:
            await rt.close()
        result = facts(analysis, DmarcFacts)
    else:
        sigs = tuple(DkimSignature(result=AuthStatus(d["result"]), domain=d["d"], selector="s",
                                   b="") for d in case["dkim_results"])
        earlier = (CheckResult(check="dkim", facts=DkimFacts(signatures=sigs)),
                   CheckResult(check="spf", facts=SpfFacts(result=AuthStatus.NONE,
                                                           domain="x.invalid",
                                                           identity="mailfrom")))
        check = DmarcCheck(Services(cfg=cfg, workers=Workers(), resolver=create_resolver(cfg)))
        ctx = CheckContext(cfg=cfg, inbound=inbound(raw), earlier=earlier)
        result = (await check.run(parse_message(raw), ctx)).facts
    assert isinstance(result, DmarcFacts)
    expect = case["expect"]
    assert result.result.value == expect["result"]
    if expect["result"] in ("pass", "fail"):
        assert result.policy == expect["policy"]
    if expect.get("header_from"):
        assert result.from_domain == expect["header_from"]


async def test_dmarc_of_an_internationalised_from_domain_is_looked_up_in_a_labels(
        runtime: Runtime, dns_zone: ThreadedDnsServer):
    """A From in raw UTF-8 (RFC 6532) with a U-label domain: its DMARC record is the A-label
    name's (RFC 8616 section 4), so a forged sender of that domain meets its policy."""
    dns_zone.load({"_dmarc.xn--mdecin-bva.fr": [("TXT", "v=DMARC1; p=reject")]})
    raw = ("From: Cabinet <contact@médecin.fr>\r\nTo: docteur@cabinet.test\r\n"
           "Subject: Dossier\r\nDate: Mon, 30 Nov 2026 09:00:00 +0100\r\n"
           "Message-ID: <idn@x.example>\r\n\r\nBonjour\r\n").encode()
    analysis = await runtime.pipeline.analyse(inbound(raw))
    result = facts(analysis, DmarcFacts)
    assert result.from_domain == "xn--mdecin-bva.fr"
    assert (result.result, result.policy) == (AuthStatus.FAIL, "reject")


PYDMARC = CORPUS / "dmarc-pydmarc" / "dmarc-policy-cases.yaml"


def test_dmarc_record_parsing_and_alignment(corpus: Path):
    spec = yaml.safe_load(PYDMARC.read_text())
    for case in spec["record_parsing"]["valid"]:
        record = parse_record(case["record"])
        for key in ("p", "sp", "adkim", "aspf", "pct"):
            if key in case["expect"]:
                assert getattr(record, key) == case["expect"][key], (case["record"], key)
    for case in spec["record_parsing"]["invalid_syntax"]:
        with pytest.raises(DmarcSyntaxError):
            parse_record(case["record"])
    for case in spec["alignment"]:
        assert aligned(case["from"], case["auth"], case["mode"][0]) == case["aligned"], case


@pytest.mark.parametrize(("from_domain", "auth_domain", "mode", "expected"), [
    ("info.ameli.fr", "ameli.fr", "r", True),             # subdomain, relaxed
    ("a.ameli.fr", "b.ameli.fr", "r", True),              # siblings, relaxed
    ("a.ameli.fr", "b.ameli.fr", "s", False),
    ("chu.nhs.uk", "other.nhs.uk", "r", False),           # multi-label public suffix
    ("labo.co.uk", "evil.co.uk", "r", False),
    ("cabinet.github.io", "attacker.github.io", "r", False),  # PSL private section
])
def test_dmarc_alignment_edge_cases(from_domain, auth_domain, mode, expected):
    assert aligned(from_domain, auth_domain, mode) is expected


# ---- ARC: the ValiMail suite ---------------------------------------------------------------

ARC_SUITE = CORPUS / "arc-valimail-test-suite" / "arc-draft-validation-tests.yml"


def arc_cases() -> list:
    if not ARC_SUITE.exists():
        return [pytest.param(None, None, None, marks=pytest.mark.skip(reason="corpus not found"))]
    out = []
    for scenario in yaml.safe_load_all(ARC_SUITE.read_text()):
        for name, test in scenario["tests"].items():
            if not test.get("cv"):
                continue  # '' : the suite accepts any result
            out.append(pytest.param(scenario["txt-records"], test["message"], test["cv"],
                                    id=f"{scenario['description'][:20]}-{name}"))
    return out


@pytest.mark.parametrize(("records", "message", "cv"), arc_cases())
async def test_arc_validation_suite(runtime: Runtime, dns_zone: ThreadedDnsServer, records,
                                    message, cv):
    dns_zone.load({name: [("TXT", " ".join(value.split()))] for name, value in records.items()})
    analysis = await runtime.pipeline.analyse(inbound(message.encode()))
    assert facts(analysis, ArcFacts).result.value == cv.lower()


def test_fast_relaxed_body_is_dkimpys(corpus: Path):
    """Our relaxed body canonicalisation gives dkimpy's bytes on every corpus message, in both
    line-end forms (and with chunks cut across long text)."""
    from dkim.canonicalization import Relaxed

    from gateway.deps.dkimpy import relaxed_body
    files = sorted(p for p in corpus.rglob("*") if p.is_file() and p.stat().st_size < 3_000_000)
    assert len(files) > 500
    for path in files:
        data = path.read_bytes()
        body = to_crlf(data).split(b"\r\n\r\n", 1)[-1]
        for sample in (body, b"a \t b  \r\n" * 9000 + body[:70000] + body, b"\r\n\r\n", b" "):
            assert relaxed_body(sample) == Relaxed.canonicalize_body(sample), path
