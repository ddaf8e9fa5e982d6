"""Authentication end to end over SMTP: DMARC p=reject, DNS outage, a trusted ARC forwarder."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiosmtplib
import dkim
import pytest

from gateway.service import running
from tests.conftest import DOMAIN, make_config
from tests.support.dnsserver import ThreadedDnsServer
from tests.support.keys import dkim_keypair
from tests.support.sink import Sink

HOSPITAL_KEY, HOSPITAL_DNS = dkim_keypair()
LIST_KEY, LIST_DNS = dkim_keypair()
ZONE = {
    "hopital.example": [("TXT", "v=spf1 ip4:192.0.2.1 -all"), ("A", "192.0.2.1")],
    "_dmarc.hopital.example": [("TXT", "v=DMARC1; p=reject")],
    "sel._domainkey.hopital.example": [("TXT", HOSPITAL_DNS)],
    "liste.example": [("TXT", "v=spf1 ip4:127.0.0.1 -all")],
    "arc._domainkey.liste.example": [("TXT", LIST_DNS)],
}


def original() -> bytes:
    msg = (b"From: CHU <secretariat@hopital.example>\r\n"
           b"To: <docteur@" + DOMAIN.encode() + b">\r\n"
           b"Subject: Compte rendu\r\nDate: Sat, 28 Nov 2026 10:00:00 +0100\r\n"
           b"Message-ID: <cr1@hopital.example>\r\n\r\nVoir le dossier.\r\n")
    sig = dkim.sign(msg, b"sel", b"hopital.example", HOSPITAL_KEY,
                    include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    return sig + msg


def forwarded_by_list(msg: bytes) -> bytes:
    """What a mailing list does: changes the subject (DKIM breaks), records what it verified,
    and seals it with ARC."""
    changed = msg.replace(b"Subject: Compte rendu", b"Subject: [liste] Compte rendu")
    ar = (b"Authentication-Results: liste.example; dkim=pass header.d=hopital.example; "
          b"spf=pass smtp.mailfrom=hopital.example; dmarc=pass header.from=hopital.example\r\n")
    with_ar = ar + changed
    seal = dkim.arc_sign(with_ar, b"arc", b"liste.example", LIST_KEY, b"liste.example")
    return b"".join(seal) + with_ar


async def send(port: int, data: bytes, sender: str) -> str:
    _, reply = await aiosmtplib.send(data, sender=sender, recipients=[f"docteur@{DOMAIN}"],
                                     hostname="127.0.0.1", port=port, start_tls=False)
    return reply


@pytest.mark.promise("dmarc-reject-550")
async def test_dmarc_reject_domain_spoofed_gets_french_550(tmp_path: Path, sink: Sink,
                                                           dns_zone: ThreadedDnsServer):
    dns_zone.load(ZONE)
    cfg = make_config(tmp_path, next_hop={"address": sink.address, "starttls": "off"})
    spoof = original().replace(b"Voir le dossier.", b"Cliquez ici pour le dossier.")
    async with running(cfg) as gw:
        with pytest.raises(aiosmtplib.SMTPDataError) as exc:
            await send(gw.port, spoof, "bounce@attaquant.example")
        assert exc.value.code == 550
        assert exc.value.message.startswith("5.7.1 Message refuse : il n'a pas ete envoye")
        # The genuine message, from the hospital's server IP as the SPF record says, is not.
    assert sink.empty()


@pytest.mark.promise("dmarc-reject-550")
async def test_genuine_signed_mail_passes_dmarc(tmp_path: Path, sink: Sink,
                                                dns_zone: ThreadedDnsServer):
    dns_zone.load(ZONE)
    cfg = make_config(tmp_path, next_hop={"address": sink.address, "starttls": "off"})
    async with running(cfg) as gw:
        assert (await send(gw.port, original(), "bounce@liste.example")).startswith("2.0.0")
    got = await sink.get()
    ar = " ".join(got.data.split(b"\r\n\r\n")[0].decode().split())
    assert "dkim=pass header.d=hopital.example header.s=sel" in ar
    assert "dmarc=pass header.from=hopital.example policy.dmarc=reject" in ar


@pytest.mark.parametrize("trusted", [True, False])
async def test_trusted_arc_forwarder_is_delivered(tmp_path: Path, sink: Sink,
                                                  dns_zone: ThreadedDnsServer, trusted: bool):
    dns_zone.load(ZONE)
    cfg = make_config(tmp_path, next_hop={"address": sink.address, "starttls": "off"},
                      auth={"trusted_arc_sealers": ["liste.example"] if trusted else []})
    message = forwarded_by_list(original())
    async with running(cfg) as gw:
        if trusted:
            assert (await send(gw.port, message, "bounce@liste.example")).startswith("2.0.0")
        else:
            with pytest.raises(aiosmtplib.SMTPDataError) as exc:
                await send(gw.port, message, "bounce@liste.example")
            assert exc.value.code == 550
    if trusted:
        got = await sink.get()
        head = " ".join(got.data.split(b"\r\n\r\n")[0].decode().split())
        assert "arc=pass" in head and "dmarc=fail (trusted ARC sealer)" in head
        assert "DMARC_ARC_OVERRIDE" in head and "X-Gateway-Action: accept" in head
    assert sink.empty()


ATTACKER_KEY, ATTACKER_DNS = dkim_keypair()


@pytest.mark.promise("dmarc-reject-550")
async def test_a_trusted_lists_seal_replayed_under_another_seal_does_not_vouch(
        tmp_path: Path, sink: Sink, dns_zone: ThreadedDnsServer):
    """A trusted list's seal is in the chain, but the newest seal is another domain's: what
    reached the gateway comes from that domain, which may have changed anything the list's
    message signature does not cover. Only the newest sealer vouches: the spoof of a
    p=reject domain is still refused."""
    dns_zone.load(ZONE | {"arc._domainkey.attaquant.example": [("TXT", ATTACKER_DNS)],
                          "attaquant.example": [("TXT", "v=spf1 ip4:127.0.0.1 -all")]})
    cfg = make_config(tmp_path, next_hop={"address": sink.address, "starttls": "off"},
                      auth={"trusted_arc_sealers": ["liste.example"]})
    listed = (b"Authentication-Results: attaquant.example; arc=pass\r\n"
              + forwarded_by_list(original()))
    seal = dkim.arc_sign(listed, b"arc", b"attaquant.example", ATTACKER_KEY,
                         b"attaquant.example")
    assert b"cv=pass" in b"".join(seal)  # a chain that validates, the list's seal inside
    replayed = b"".join(seal) + listed
    async with running(cfg) as gw:
        with pytest.raises(aiosmtplib.SMTPDataError) as exc:
            await send(gw.port, replayed, "bounce@attaquant.example")
        assert exc.value.code == 550
    assert sink.empty()


@pytest.mark.promise("dns-trouble-451")
async def test_dns_outage_gives_451_without_hanging(tmp_path: Path, sink: Sink,
                                                     dns_zone: ThreadedDnsServer):
    dns_zone.load({name: ["TIMEOUT"] for name in ZONE} | {"hopital.example": ["TIMEOUT"]})
    cfg = make_config(tmp_path, next_hop={"address": sink.address, "starttls": "off"},
                      dns={"timeout_s": 0.5})
    async with running(cfg) as gw:
        t0 = time.monotonic()
        with pytest.raises(aiosmtplib.SMTPDataError) as exc:
            await asyncio.wait_for(send(gw.port, original(), "bounce@liste.example"), 30)
        assert exc.value.code == 451
        assert exc.value.message.startswith("4.7.1 ")
        assert time.monotonic() - t0 < 10
    assert sink.empty()


@pytest.mark.promise("dns-trouble-451")
@pytest.mark.parametrize(("policy", "code"), [("reject", 451), ("none", 250)])
async def test_an_spf_lookup_timing_out_under_p_reject_gets_451_not_a_verdict(
        tmp_path: Path, sink: Sink, dns_zone: ThreadedDnsServer, policy: str, code: int):
    """Unsigned mail whose SPF record cannot be read: DMARC cannot be decided. Under
    p=reject that is a retry (451), not a 550 nor a pass; under p=none the mail goes on."""
    dns_zone.load(ZONE | {"hopital.example": ["TIMEOUT"],
                          "_dmarc.hopital.example": [("TXT", f"v=DMARC1; p={policy}")]})
    cfg = make_config(tmp_path, next_hop={"address": sink.address, "starttls": "off"},
                      dns={"timeout_s": 0.5})
    unsigned = original().split(b"\r\n", 1)[1]  # its DKIM-Signature field removed
    while unsigned.startswith((b" ", b"\t")):  # and that field's folded lines
        unsigned = unsigned.split(b"\r\n", 1)[1]
    assert unsigned.startswith(b"From: ") and b"DKIM-Signature" not in unsigned
    async with running(cfg) as gw:
        if code == 451:
            with pytest.raises(aiosmtplib.SMTPDataError) as exc:
                await send(gw.port, unsigned, "secretariat@hopital.example")
            assert exc.value.code == 451 and exc.value.message.startswith("4.7.1 ")
            assert sink.empty()
        else:
            reply = await send(gw.port, unsigned, "secretariat@hopital.example")
            assert reply.startswith("2.0.0 ")
            delivered = (await sink.get()).data
            assert b"dmarc=temperror" in delivered


BOUNCE = (b"From: Mail Delivery System <MAILER-DAEMON@hopital.example>\r\n"
          b"To: <docteur@" + DOMAIN.encode() + b">\r\n"
          b"Subject: Undelivered Mail Returned to Sender\r\n"
          b"Date: Sat, 28 Nov 2026 10:00:00 +0100\r\nMessage-ID: <dsn1@mail.hopital.example>\r\n"
          b"\r\nVotre message n'a pas pu etre remis a secretariat@hopital.example.\r\n")


@pytest.mark.parametrize(("spf", "code"), [("v=spf1 ip4:127.0.0.1 -all", 250),
                                           ("v=spf1 ip4:192.0.2.1 -all", 550)])
async def test_a_bounce_from_the_senders_own_server_passes_dmarc_by_its_helo(
        tmp_path: Path, sink: Sink, dns_zone: ThreadedDnsServer, spf: str, code: int):
    """A delivery-status notification has a null MAIL FROM: SPF checks the HELO name, and
    DMARC aligns that name (RFC 7489 4.1). From the hospital's own server (its HELO's SPF
    lists it) the bounce passes under p=reject; from elsewhere it is still refused."""
    dns_zone.load(ZONE | {"mail.hopital.example": [("TXT", spf)]})
    cfg = make_config(tmp_path, next_hop={"address": sink.address, "starttls": "off"})
    async with running(cfg) as gw:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.port, start_tls=False,
                               local_hostname="mail.hopital.example")
        await smtp.connect()
        try:
            await smtp.ehlo()
            assert (await smtp.mail("")).code == 250  # MAIL FROM:<>
            assert (await smtp.rcpt(f"docteur@{DOMAIN}")).code == 250
            if code == 250:
                assert (await smtp.data(BOUNCE)).code == 250
            else:
                with pytest.raises(aiosmtplib.SMTPDataError) as exc:
                    await smtp.data(BOUNCE)
                assert exc.value.code == 550
        finally:
            smtp.close()
    if code == 250:
        delivered = (await sink.get()).data
        assert b"dmarc=pass" in delivered and b"smtp.helo=mail.hopital.example" in delivered
    else:
        await sink.settled()
        assert sink.empty()


@pytest.mark.parametrize(("policy", "action"), [("none", "accept"), ("quarantine", "quarantine")])
async def test_a_list_message_from_a_p_none_author_is_not_tagged(
        tmp_path: Path, sink: Sink, dns_zone: ThreadedDnsServer, policy: str, action: str):
    """A mailing list changes the subject (the author's DKIM breaks) and sends from its own
    domain (SPF passes, unaligned): DMARC fails. Under p=none the author's domain asks for no
    action, and the message is delivered untouched; under p=quarantine it is held."""
    dns_zone.load(ZONE | {"_dmarc.hopital.example": [("TXT", f"v=DMARC1; p={policy}")]})
    cfg = make_config(tmp_path / "d", next_hop={"address": sink.address, "starttls": "off"})
    relayed = original().replace(b"Subject: Compte rendu", b"Subject: [liste] Compte rendu")
    async with running(cfg) as gw:
        reply = await send(gw.port, relayed, "bounce@liste.example")
    if action == "accept":
        assert reply.startswith("2.0.0 ") and "quarantaine" not in reply
        delivered = (await sink.get()).data
        assert b"X-Gateway-Action: accept" in delivered and b"dmarc=fail" in delivered
        assert b"[SUSPECT]" not in delivered
    else:
        assert "quarantaine" in reply
        await sink.settled()
        assert sink.empty()


async def test_dmarc_pct_zero_downgrades_reject_to_quarantine(tmp_path: Path, sink: Sink,
                                                              dns_zone: ThreadedDnsServer):
    """pct=0: the published p=reject applies to no failing message; RFC 7489 6.6.4 then
    applies the next weaker policy, quarantine."""
    dns_zone.load(ZONE | {"_dmarc.hopital.example": [("TXT", "v=DMARC1; p=reject; pct=0")]})
    cfg = make_config(tmp_path, next_hop={"address": sink.address, "starttls": "off"})
    spoof = original().replace(b"Voir le dossier.", b"Cliquez ici.")
    async with running(cfg) as gw:
        reply = await send(gw.port, spoof, "bounce@attaquant.example")
    assert reply.startswith("2.0.0 Message accepte et mis en quarantaine")
    assert sink.empty()
