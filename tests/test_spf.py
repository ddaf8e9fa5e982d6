"""SPF against the RFC 7208 test suite, through our resolver and a DNS server on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import yaml

from gateway.auth.dns import Resolver
from gateway.auth.spf import check_host
from tests.conftest import CORPUS
from tests.support.dnsserver import DnsServer, Zone

SUITE = CORPUS / "spf-openspf-pyspf" / "rfc7208-tests.yml"

# Scenarios where we deliberately differ from the suite, with the RFC reason.
DEVIATIONS: dict[str, str] = {
    "v-macro-ip6": "RFC 7208 7.3 gives %{i} of an IPv6 address as dotted nibbles; we write "
                   "them in lower case, as the RFC's own example does (DNS names are case-"
                   "insensitive, RFC 4343). The suite expects the case of the test's input "
                   "spelling (CAFE:BABE::1), which the address itself does not carry.",
}


def scenario_zone(zonedata: dict) -> Zone:
    """The suite's zone, with SPF records also served as TXT unless the name has TXT ones
    (the suite's convention: only "Selecting records" tests the type 99 RR itself)."""
    zone: Zone = {}
    for name, records in zonedata.items():
        out: list = []
        has_txt = any(isinstance(r, dict) and "TXT" in r for r in records)
        for r in records:
            if r == "TIMEOUT":
                out.append("TIMEOUT")
                continue
            (rtype, value), = r.items()
            if value == []:
                continue  # a TXT record with no string cannot be served (the suite says so)
            if rtype == "SPF":
                if not has_txt:
                    out.append(("TXT", value))
            elif rtype == "TXT":
                if value != "NONE":
                    out.append(("TXT", value))
            elif rtype == "MX":
                out.append(("MX", (value[0], value[1])))
            else:
                out.append((rtype, value))
        zone[name] = out
    return zone


def cases() -> list:
    if not SUITE.exists():
        return [pytest.param(None, None, None, marks=pytest.mark.skip(
            reason=f"RFC 7208 suite not found at {SUITE}"))]
    out = []
    for scenario in yaml.safe_load_all(SUITE.read_text()):
        for name, test in scenario["tests"].items():
            marks = []
            if name in DEVIATIONS:
                marks.append(pytest.mark.xfail(strict=True, reason=DEVIATIONS[name]))
            out.append(pytest.param(scenario["description"], scenario["zonedata"], test,
                                    id=name, marks=marks))
    return out


@pytest.fixture
async def dns_server() -> AsyncIterator[DnsServer]:
    server = DnsServer()
    await server.start()
    yield server
    await server.stop()


@pytest.mark.parametrize(("scenario", "zonedata", "test"), cases())
async def test_spf_rfc7208_suite(dns_server: DnsServer, scenario, zonedata, test):
    dns_server.load(scenario_zone(zonedata))
    resolver = Resolver([("127.0.0.1", dns_server.port)], timeout_s=0.3)
    mailfrom = test["mailfrom"]
    if mailfrom and "@" in mailfrom:
        domain, identity = mailfrom.rpartition("@")[2], "mailfrom"
    else:
        domain, identity = test["helo"], "helo"
        mailfrom = f"postmaster@{test['helo']}"
    outcome = await check_host(resolver, test["host"], domain, mailfrom, test["helo"],
                               identity=identity)
    expected = test["result"] if isinstance(test["result"], list) else [test["result"]]
    assert outcome.result.value in expected, (scenario, outcome)
    if "explanation" in test and outcome.result.value == "fail":
        # "DEFAULT" is the suite's name for the receiver's own text: we add none.
        expected_text = "" if test["explanation"] == "DEFAULT" else test["explanation"]
        assert outcome.explanation == expected_text
