"""DNS block lists against the loopback DNS server serving list zones: the sending server's
address (Spamhaus ZEN codes), the domains of links and senders (DBL codes, SURBL bit masks),
refusals never scored, a list that does not answer skipped, the per-message query budget, and
lists off when the resolver is a public one."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from gateway.checks.reputation import _public_resolver
from gateway.service import build_runtime
from gateway.symbols import Action
from tests.conftest import DNS, make_config
from tests.test_impersonation import mail, names, verdict

PEER = "198.51.100.66"
PEER_REVERSED = "66.100.51.198"


def page(href: str) -> str:
    return f'<html><body><p>Bonjour, voir <a href="{href}">le document</a>.</p></body></html>'


@pytest.mark.parametrize(("code", "symbol"), [
    ("127.0.0.2", "DNSBL_LISTED"), ("127.0.0.4", "DNSBL_EXPLOITED"),
    ("127.0.0.10", "DNSBL_DYNAMIC"),
])
async def test_the_sending_servers_address_on_zen(runtime, dns_zone, code, symbol):
    dns_zone.load({f"{PEER_REVERSED}.zen.spamhaus.org": [("A", code)]})
    v = await verdict(runtime, mail("Info <info@expediteur.example>", "Bonjour", "Bonjour"),
                      ip=PEER)
    assert symbol in names(v)
    listed = next(s for s in v.symbols if s.name == symbol)
    assert PEER in listed.description and "zen.spamhaus.org" in listed.description
    assert (f"{PEER_REVERSED}.zen.spamhaus.org", "A") in dns_zone.queries


async def test_a_phishing_link_domain_on_the_dbl_is_held(runtime, dns_zone):
    dns_zone.load({"piege-connexion.example.dbl.spamhaus.org": [("A", "127.0.1.4")]})
    v = await verdict(runtime, mail("Info <info@expediteur.example>", "Document", "Voir le lien",
                                    html=page("https://www.piege-connexion.example/login")))
    assert "URIBL_PHISHING" in names(v)
    assert v.action is Action.QUARANTINE


@pytest.mark.parametrize(("answer", "symbols"), [
    ("127.0.0.24", {"URIBL_PHISHING"}),   # PH (8) and MW (16)
    ("127.0.0.64", {"URIBL_LISTED"}),     # ABUSE
    ("127.0.0.72", {"URIBL_LISTED", "URIBL_PHISHING"}),
])
async def test_surbl_bit_masks(runtime, dns_zone, answer, symbols):
    dns_zone.load({"lien-douteux.example.multi.surbl.org": [("A", answer)]})
    v = await verdict(runtime, mail("Info <info@expediteur.example>", "Document", "Voir",
                                    html=page("http://lien-douteux.example/x")))
    assert symbols <= names(v)


async def test_a_refused_query_is_logged_never_scored(runtime, dns_zone, caplog):
    dns_zone.load({f"{PEER_REVERSED}.zen.spamhaus.org": [("A", "127.255.255.254")],
                   "expediteur.example.dbl.spamhaus.org": [("A", "127.255.255.254")]})
    with caplog.at_level(logging.WARNING, logger="gateway.checks.reputation"):
        v = await verdict(runtime, mail("Info <info@expediteur.example>", "Bonjour", "Bonjour"),
                          ip=PEER)
    assert not {n for n in names(v) if n.startswith(("DNSBL_", "URIBL_"))}
    assert v.action is Action.ACCEPT
    assert "refused the query" in caplog.text
    # A list that refuses is asked no more by this process (no wasted queries per message).
    dns_zone.load({})
    await verdict(runtime, mail("Info <info@autre.example>", "Bonjour", "Bonjour"), ip=PEER)
    assert not [n for n, _ in dns_zone.queries if n.endswith("spamhaus.org")]


async def test_a_list_that_does_not_answer_is_skipped_not_a_verdict(runtime, dns_zone):
    dns_zone.load({f"{PEER_REVERSED}.zen.spamhaus.org": ["TIMEOUT"]})
    started = time.monotonic()
    v = await verdict(runtime, mail("Info <info@expediteur.example>", "Bonjour", "Bonjour"),
                      ip=PEER)
    assert v.action is Action.ACCEPT
    assert not {n for n in names(v) if n.endswith(("_ERROR", "_TIMEOUT"))}
    assert time.monotonic() - started < 5  # the resolver's own timeout (0.5 s), not a hang


async def test_the_genuine_counterpart_and_private_addresses(runtime, dns_zone):
    """A clean sender and site: queried, not listed. A private address is never asked."""
    v = await verdict(runtime, mail("Info <info@expediteur.example>", "Bonjour", "Bonjour",
                                    html=page("https://www.expediteur.example/")), ip="10.1.2.3")
    assert not {n for n in names(v) if n.startswith(("DNSBL_", "URIBL_"))}
    asked = [name for name, _ in dns_zone.queries if name.endswith("spamhaus.org")]
    assert "expediteur.example.dbl.spamhaus.org" in asked
    assert not [n for n in asked if n.endswith("zen.spamhaus.org")]


async def test_the_query_budget_per_message(runtime, dns_zone):
    links = "".join(f'<a href="https://site{i}.example/">{i}</a> ' for i in range(60))
    await verdict(runtime, mail("Info <info@expediteur.example>", "Liens", "Voir",
                                html=f"<html><body>{links}</body></html>"), ip=PEER)
    asked = [n for n, _ in dns_zone.queries
             if n.endswith(("spamhaus.org", "surbl.org", "uribl.com"))]
    assert 0 < len(asked) <= 30


def test_lists_are_off_behind_a_public_resolver(tmp_path: Path):
    assert _public_resolver(("8.8.8.8",)) == "8.8.8.8"
    assert _public_resolver(("[2606:4700:4700::1111]:53",)) == "2606:4700:4700::1111"
    assert _public_resolver(("1.1.1.1:53", DNS.address)) == "1.1.1.1"
    assert _public_resolver(("2001:4860:4860:0:0:0:0:8888",)) == "2001:4860:4860::8888"
    assert _public_resolver(("1.1.1.2",)) == "1.1.1.2"  # Cloudflare's filtering resolver
    assert _public_resolver((DNS.address,)) == ""


async def test_a_public_resolver_turns_the_lists_off_with_a_warning(tmp_path, caplog):
    cfg = make_config(tmp_path, dns={"nameservers": ["9.9.9.9"]})
    with caplog.at_level(logging.WARNING, logger="gateway.checks.reputation"):
        rt = await build_runtime(cfg, with_store=False)
    await rt.close()
    assert "DNS block lists off" in caplog.text and "9.9.9.9" in caplog.text


async def test_filler_links_to_known_sites_do_not_hide_the_phishing_one(runtime, dns_zone):
    """Links to brands' and health senders' sites are asked of no list, and a QR code's
    link is asked before the body's: neither filler pushes the real target out of the
    budget (found by review)."""
    dns_zone.load({"piege-connexion.example.dbl.spamhaus.org": [("A", "127.0.1.4")]})
    filler = "".join(f'<a href="https://{d}/">x</a> ' for d in (
        "www.ameli.fr", "www.laposte.fr", "www.microsoft.com", "www.google.com", "www.apple.com",
        "www.paypal.com", "www.dhl.com", "www.ups.com", "www.caf.fr", "www.urssaf.fr",
        "www.docusign.com", "www.dropbox.com", "www.amazon.fr", "www.netflix.com",
        "www.linkedin.com", "www.doctolib.fr"))
    v = await verdict(runtime, mail("Info <info@expediteur.example>", "Document", "Voir",
                                    html=f"<html><body>{filler}<a href='https://"
                                         "piege-connexion.example/x'>ici</a></body></html>"))
    assert "URIBL_PHISHING" in names(v)


async def test_an_undescribed_list_reads_refusals_as_refusals(tmp_path, dns_zone):
    """A list rules/reputation.toml does not describe (Spamhaus's DQS form of ZEN): its
    127.255.255.x answers are refusals, not listings; domain lists give URIBL symbols."""
    cfg = make_config(tmp_path, reputation={"ip_lists": ["key123.zen.dq.example"],
                                            "domain_lists": ["key123.dbl.dq.example"]})
    rt = await build_runtime(cfg, with_store=False)
    try:
        dns_zone.load({f"{PEER_REVERSED}.key123.zen.dq.example": [("A", "127.255.255.254")],
                       "expediteur.example.key123.dbl.dq.example": [("A", "127.0.1.2")]})
        v = await verdict(rt, mail("Info <info@expediteur.example>", "Bonjour", "Bonjour"),
                          ip=PEER)
        assert "DNSBL_LISTED" not in names(v)
        assert "URIBL_LISTED" in names(v)
    finally:
        await rt.close()


async def test_an_ipv4_mapped_peer_is_asked_as_ipv4(runtime, dns_zone):
    dns_zone.load({f"{PEER_REVERSED}.zen.spamhaus.org": [("A", "127.0.0.2")]})
    v = await verdict(runtime, mail("Info <info@expediteur.example>", "Bonjour", "Bonjour"),
                      ip=f"::ffff:{PEER}")
    assert "DNSBL_LISTED" in names(v)
