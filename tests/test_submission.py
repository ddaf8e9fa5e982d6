"""Outbound guard end to end: real submission (AUTH over STARTTLS) on the gateway's submission
port, a loopback smarthost sink that requires STARTTLS, and the practice's mailbox server (a
sink too) receiving the French notices."""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import os
import re
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib
import pytest

from gateway.accounts import AccountFile
from gateway.config import Config
from gateway.service import Running, running
from tests.conftest import DOMAIN, make_config
from tests.support.certs import self_signed
from tests.support.sink import Received, Sink
from tests.test_outbound import LAB, NIR, mail

USER = f"secretariat@{DOMAIN}"
PASSWORD = "ordonnance-2026-solide"


@dataclass
class Setup:
    gw: Running
    relay: Sink  # the provider's smarthost
    mailbox: Sink  # the practice's mailbox server (inbound next hop: notices)
    cert: Path


@pytest.fixture
def cert(tmp_path: Path) -> tuple[Path, Path]:
    return self_signed(tmp_path)


@pytest.fixture
async def relay(cert: tuple[Path, Path]) -> AsyncIterator[Sink]:
    s = Sink(tls=cert)
    await s.start()
    yield s
    await s.stop()


async def start(tmp_path: Path, cert: tuple[Path, Path], relay: Sink, mailbox: Sink,
                **submission: object):
    cfg = make_config(
        tmp_path / "data", smtp={"tls_cert": str(cert[0]), "tls_key": str(cert[1])},
        next_hop={"address": mailbox.address, "starttls": "off"},
        submission={"listen": "127.0.0.1:0", "smarthost": relay.address,
                    "smarthost_ca_file": str(cert[0]), "cleartext_auth_networks": [],
                    **submission})
    AccountFile(cfg.submission_users_file).add(USER, PASSWORD)
    return running(cfg)


@pytest.fixture
async def setup(tmp_path: Path, cert, relay: Sink, sink: Sink) -> AsyncIterator[Setup]:
    async with await start(tmp_path, cert, relay, sink) as gw:
        yield Setup(gw=gw, relay=relay, mailbox=sink, cert=cert[0])


async def client(s: Setup, *, tls: bool = True, login: tuple[str, str] | None = (USER, PASSWORD)
                 ) -> aiosmtplib.SMTP:
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=s.gw.submission_port, start_tls=False,
                           tls_context=ssl.create_default_context(cafile=str(s.cert)))
    await smtp.connect()
    await smtp.ehlo()
    if tls:
        await smtp.starttls(server_hostname="mx.cabinet.test")
        await smtp.ehlo()
    if login:
        await smtp.login(*login)
    return smtp


async def send(s: Setup, to: str, raw: bytes, **kw) -> str:
    smtp = await client(s, **kw)
    try:
        _, reply = await smtp.sendmail(USER, [to], raw)
        return reply
    finally:
        smtp.close()


def parsed(got: Received) -> email.message.EmailMessage:
    return email.message_from_bytes(got.data, policy=email.policy.default)  # type: ignore[return-value]


async def test_lab_result_to_gmail_is_held_and_the_sender_gets_the_notice(setup: Setup):
    reply = await send(setup, "patient@gmail.com", mail("patient@gmail.com", LAB))
    assert "quarantaine" in reply
    notice = await setup.mailbox.get()
    assert notice.mail_from in ("", "<>") and notice.rcpts == [USER]  # null sender
    msg = parsed(notice)
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["Subject"].startswith("Message retenu")
    body = msg.get_content()
    assert "patient@gmail.com" in body and "RETENU" in body and "MSSanté" in body
    assert "2 95 10 ** *** *** **" in body  # masked NIR
    assert NIR not in body.replace(" ", "") and NIR[5:12] not in body.replace(" ", "")
    reference = msg["X-Gateway-Notice"]
    assert f"Référence du message retenu : {reference}" in body
    items = await setup.gw.runtime.store.list_items()  # type: ignore[union-attr]
    assert [(i.id, i.direction, i.rcpts) for i in items] == [
        (reference, "outbound", ("patient@gmail.com",))]
    assert setup.relay.empty()


async def test_same_result_to_mssante_is_delivered_over_tls(setup: Setup):
    to = "dr.x@medecin.mssante.fr"
    reply = await send(setup, to, mail(to, LAB))
    assert "transmis" in reply
    got = await setup.relay.get()
    assert got.rcpts == [to] and got.tls
    assert b"X-Gateway-" not in got.data and b"Authentication-Results" not in got.data
    assert b"Received: from" in got.data  # the trace only: the verdict stays in the practice
    assert b"with ESMTPSA" in got.data.replace(b"\r\n\t", b" ")
    assert setup.mailbox.empty()


async def test_newsletter_and_smime_are_delivered(setup: Setup):
    news = mail("patients@liste.example", "Pensez à renouveler votre ordonnance avant l'été.")
    assert "transmis" in await send(setup, "patients@liste.example", news)
    smime = mail("labo@labo.example", "MIAGCSqGSIb3DQEHA6CAMIACAQAx" + NIR,
                 ctype="application/pkcs7-mime")
    assert "transmis" in await send(setup, "labo@labo.example", smime)
    assert {(await setup.relay.get()).rcpts[0], (await setup.relay.get()).rcpts[0]} == {
        "patients@liste.example", "labo@labo.example"}
    assert setup.mailbox.empty()


@pytest.mark.promise("no-open-relay")
async def test_unauthenticated_client_cannot_relay(setup: Setup):
    smtp = await client(setup, login=None)
    try:
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as exc:
            await smtp.sendmail(USER, ["someone@gmail.com"], mail("someone@gmail.com", "Bonjour"))
        assert exc.value.code == 530 and "Authentification requise" in exc.value.message
    finally:
        smtp.close()
    assert setup.relay.empty()


@pytest.mark.promise("auth-over-tls")
async def test_auth_is_not_offered_before_starttls(setup: Setup):
    smtp = await client(setup, tls=False, login=None)
    try:
        assert not smtp.supports_extension("auth")
        resp = await smtp.execute_command(b"AUTH", b"PLAIN", b"AHNlY3JldGFyaWF0AHg=")
        assert resp.code == 538
    finally:
        smtp.close()


async def test_wrong_password_is_refused_then_the_connection_closed(setup: Setup):
    smtp = await client(setup, login=None)
    bad = base64.b64encode(f"\0{USER}\0mauvais mot de passe".encode())
    try:
        for _ in range(2):
            resp = await smtp.execute_command(b"AUTH", b"PLAIN", bad)
            assert resp.code == 535 and "incorrect" in resp.message
        resp = await smtp.execute_command(b"AUTH", b"PLAIN", bad)  # the third failure
        assert resp.code == 421
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await smtp.execute_command(b"NOOP")
    finally:
        smtp.close()


async def test_auth_login_the_two_step_exchange_outlook_uses(setup: Setup):
    """AUTH LOGIN (user name, then password, each base64 on its own line), as Outlook and
    many copiers log in: the same account check and counting as AUTH PLAIN."""
    smtp = await client(setup, login=None)
    try:
        resp = await smtp.auth_login(USER, "mauvais mot de passe")
    except aiosmtplib.SMTPAuthenticationError as exc:
        assert exc.code == 535 and "incorrect" in exc.message
    else:
        raise AssertionError(f"a wrong password logged in: {resp}")
    finally:
        smtp.close()
    smtp = await client(setup, login=None)
    try:
        resp = await smtp.auth_login(USER, PASSWORD)
        assert resp.code == 235
        _, reply = await smtp.sendmail(USER, ["confrere@medecin.mssante.fr"],
                                       b"From: " + USER.encode() + b"\r\nSubject: x\r\n\r\nx\r\n")
        assert reply.startswith("2.0.0")
    finally:
        smtp.close()


@pytest.mark.promise("no-open-relay")
async def test_sender_outside_the_practice_domains_is_refused(setup: Setup):
    smtp = await client(setup)
    try:
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as exc:
            await smtp.sendmail("ceo@banque.example", ["x@gmail.com"], mail("x@gmail.com", "Hi"))
        assert exc.value.code == 553
    finally:
        smtp.close()


async def test_trusted_network_relays_without_auth(tmp_path: Path, cert, relay: Sink, sink: Sink):
    async with await start(tmp_path, cert, relay, sink, trusted_networks=["127.0.0.0/8"]) as gw:
        s = Setup(gw=gw, relay=relay, mailbox=sink, cert=cert[0])
        to = "confrere@orange.fr"
        assert "transmis" in await send(s, to, mail(to, "Bonjour, rendez-vous jeudi."), login=None)
        assert (await relay.get()).rcpts == [to]


async def test_loopback_may_authenticate_without_tls_by_default(tmp_path: Path, cert, relay: Sink,
                                                               sink: Sink):
    async with await start(tmp_path, cert, relay, sink,
                           cleartext_auth_networks=["127.0.0.0/8", "::1/128"]) as gw:
        s = Setup(gw=gw, relay=relay, mailbox=sink, cert=cert[0])
        to = "confrere@orange.fr"
        assert "transmis" in await send(s, to, mail(to, "Rendez-vous jeudi."), tls=False)


@pytest.mark.parametrize("policy", ["warn", "reject"])
async def test_warn_and_reject_policies(tmp_path: Path, cert, relay: Sink, sink: Sink,
                                        policy: str):
    cfg = make_config(
        tmp_path / "data", smtp={"tls_cert": str(cert[0]), "tls_key": str(cert[1])},
        next_hop={"address": sink.address, "starttls": "off"}, outbound={"policy": policy},
        submission={"listen": "127.0.0.1:0", "smarthost": relay.address,
                    "smarthost_ca_file": str(cert[0])})
    AccountFile(cfg.submission_users_file).add(USER, PASSWORD)
    async with running(cfg) as gw:
        s = Setup(gw=gw, relay=relay, mailbox=sink, cert=cert[0])
        if policy == "warn":
            assert "transmis" in await send(s, "patient@gmail.com", mail("patient@gmail.com", LAB))
            assert (await relay.get()).rcpts == ["patient@gmail.com"]
            msg = parsed(await sink.get())
            assert msg["Subject"].startswith("Message envoyé sans protection")
            assert "patient@gmail.com" in msg.get_content()
        else:
            with pytest.raises(aiosmtplib.SMTPDataError) as exc:
                await send(s, "patient@gmail.com", mail("patient@gmail.com", LAB))
            assert exc.value.code == 550 and "MSSante" in exc.value.message
            assert relay.empty() and sink.empty()


async def test_smarthost_leg_without_tls_holds_even_mssante(tmp_path: Path, cert, sink: Sink):
    plain = Sink()
    await plain.start()
    try:
        async with await start(tmp_path, cert, plain, sink, smarthost_starttls="off") as gw:
            s = Setup(gw=gw, relay=plain, mailbox=sink, cert=cert[0])
            to = "dr.x@medecin.mssante.fr"
            assert "quarantaine" in await send(s, to, mail(to, LAB))
            body = parsed(await sink.get()).get_content()
            assert "sans chiffrement" in body and to in body
            assert plain.empty()
    finally:
        await plain.stop()


@pytest.mark.promise("no-open-relay")
async def test_inbound_port_still_refuses_to_relay(setup: Setup):
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=setup.gw.port, start_tls=False)
    await smtp.connect()
    try:
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
            await smtp.sendmail(USER, ["x@gmail.com"], mail("x@gmail.com", "Bonjour"))
    finally:
        smtp.close()


@pytest.mark.promise("secrets-private")
def test_cli_add_user_writes_an_argon2_hash_in_a_0600_file(tmp_path: Path):
    data = tmp_path / "data"
    res = subprocess.run([sys.executable, "-m", "gateway", "submission", "--domain", DOMAIN,
                          "--data-dir", str(data), "add-user", USER, "--password-stdin"],
                         input=PASSWORD + "\n", capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    path = data / "submission-users.json"
    assert os.stat(path).st_mode & 0o777 == 0o600
    text = path.read_text()
    assert "$argon2id$" in text and PASSWORD not in text
    assert AccountFile(path).verify(USER.upper(), PASSWORD) is not None
    assert AccountFile(path).verify(USER, "autre chose") is None
    res = subprocess.run([sys.executable, "-m", "gateway", "submission", "--domain", DOMAIN,
                          "--data-dir", str(data), "add-user", "court", "--password-stdin"],
                         input="abc\n", capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "trop court" in res.stderr


def with_release_links(tmp_path: Path, cert: tuple[Path, Path], relay: Sink, sink: Sink,
                       **sections: dict[str, object]) -> Config:
    """Submission with a user, notices through `sink`, the web page with a public address."""
    cfg = make_config(
        tmp_path / "data", smtp={"tls_cert": str(cert[0]), "tls_key": str(cert[1])},
        next_hop={"address": sink.address, "starttls": "off"},
        submission={"listen": "127.0.0.1:0", "smarthost": relay.address,
                    "smarthost_ca_file": str(cert[0])},
        web={"listen": "127.0.0.1:0", "public_url": "http://passerelle.cabinet.test"},
        **sections)
    AccountFile(cfg.submission_users_file).add(USER, PASSWORD)
    return cfg


async def test_sender_releases_her_held_message_from_the_link_in_the_notice(
        tmp_path: Path, cert, relay: Sink, sink: Sink):
    import aiohttp

    cfg = with_release_links(tmp_path, cert, relay, sink)
    async with running(cfg) as gw:
        s = Setup(gw=gw, relay=relay, mailbox=sink, cert=cert[0])
        reply = await send(s, "patient@gmail.com", mail("patient@gmail.com", LAB))
        assert reply.startswith("2.0.0 Message accepte et mis en quarantaine")  # no MSSanté rcpt
        body = parsed(await sink.get()).get_content()
        link = next(w for w in body.split() if w.startswith("http://passerelle.cabinet.test/"))
        path = link.removeprefix("http://passerelle.cabinet.test")
        base = f"http://127.0.0.1:{gw.web_port}"
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            async with http.get(base + path[:-4] + "0000") as r:
                assert r.status == 404  # a forged token
            async with http.get(base + path) as r:
                text = await r.text()
                assert r.status == 200 and "patient@gmail.com" in text and "Je confirme" in text
            token = text.split('name="jeton" value="')[1].split('"')[0]
            async with http.post(base + path, data={"jeton": token}) as r:
                assert r.status == 400  # the confirmation box is required
            async with http.post(base + path, data={"confirme": "1"}) as r:
                assert r.status == 403  # without the form's token (posted from elsewhere)
            assert relay.empty()
            async with http.post(base + path, data={"jeton": token, "confirme": "1"}) as r:
                assert r.status == 200 and "libéré et envoyé" in await r.text()
        got = await relay.get()
        assert got.rcpts == ["patient@gmail.com"] and got.tls
        assert b"X-Gateway-" not in got.data  # our verdict fields do not leave the practice
        assert b"Glyc" in got.data
        entries, _ = await gw.runtime.store.audit_log()  # type: ignore[union-attr]
        assert (entries[0].action, entries[0].user) == ("release", f"sender:{USER}")


async def test_remembered_login_ends_with_a_password_change(tmp_path: Path):
    accounts = AccountFile(tmp_path / "users.json")
    accounts.add(USER, PASSWORD)
    assert await accounts.verify_async(USER, PASSWORD) is not None
    assert await accounts.verify_async(USER, PASSWORD) is not None  # remembered
    assert await accounts.verify_async(USER, PASSWORD + "x") is None
    accounts.set_password(USER, "un-tout-autre-mot-de-passe")
    assert await accounts.verify_async(USER, PASSWORD) is None
    accounts.remove(USER)
    assert await accounts.verify_async(USER, "un-tout-autre-mot-de-passe") is None


async def test_implicit_tls_port(tmp_path: Path, cert, relay: Sink, sink: Sink):
    async with await start(tmp_path, cert, relay, sink, listen_tls="127.0.0.1:0") as gw:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.submission_tls_port, use_tls=True,
                               tls_context=ssl.create_default_context(cafile=str(cert[0])))
        await smtp.connect()
        try:
            await smtp.ehlo()
            assert smtp.supports_extension("auth") and not smtp.supports_extension("starttls")
            await smtp.login(USER, PASSWORD)
            to = "dr.x@medecin.mssante.fr"
            _, reply = await smtp.sendmail(USER, [to], mail(to, LAB))
            assert "transmis" in reply
        finally:
            smtp.close()
        got = await relay.get()
        assert b"with ESMTPSA" in got.data.replace(b"\r\n\t", b" ")


async def test_mixed_recipients_mssante_gets_it_the_ordinary_mailbox_copy_is_held(setup: Setup):
    doctor, patient = "dr.x@medecin.mssante.fr", "patient@gmail.com"
    smtp = await client(setup)
    try:
        _, reply = await smtp.sendmail(USER, [doctor, patient], mail(patient, LAB))
    finally:
        smtp.close()
    assert "transmis aux destinataires MSSante" in reply and "retenu" in reply
    got = await setup.relay.get()
    assert got.rcpts == [doctor] and got.tls  # untouched, over TLS
    assert setup.relay.empty()
    store = setup.gw.runtime.store
    assert store is not None
    [item] = await store.list_items()
    assert item.rcpts == (patient,)  # the held copy is the gmail recipient's only
    body = parsed(await setup.mailbox.get()).get_content()
    assert patient in body and f"envoyé aux destinataires de la messagerie sécurisée ({doctor})" \
        in body.replace("\n", " ")
    # Released later, it goes to the held recipient only.
    await setup.gw.runtime.quarantine.release(item.id, by="test")
    again = await setup.relay.get()
    assert again.rcpts == [patient]


async def test_mixed_recipients_with_the_embedded_outbox(tmp_path: Path, cert, sink: Sink):
    """No smarthost configured (the embedded default): the MSSanté copy is written to the
    local outbox, the ordinary mailbox's copy held, and only the former reaches the outbox."""
    cfg = make_config(
        tmp_path / "data", smtp={"tls_cert": str(cert[0]), "tls_key": str(cert[1])},
        next_hop={"address": sink.address, "starttls": "off"},
        submission={"listen": "127.0.0.1:0", "cleartext_auth_networks": []})
    assert cfg.smarthost is None
    AccountFile(cfg.submission_users_file).add(USER, PASSWORD)
    doctor, patient = "dr.x@medecin.mssante.fr", "patient@gmail.com"
    async with running(cfg) as gw:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.submission_port, start_tls=False,
                               tls_context=ssl.create_default_context(cafile=str(cert[0])))
        await smtp.connect()
        try:
            await smtp.starttls(server_hostname="mx.cabinet.test")
            await smtp.login(USER, PASSWORD)
            _, reply = await smtp.sendmail(USER, [doctor, patient], mail(patient, LAB))
        finally:
            smtp.close()
    assert "transmis aux destinataires MSSante" in reply and "retenu" in reply
    outbox = tmp_path / "data" / "outbox"
    assert [p.name for p in outbox.iterdir()] == [doctor]
    assert len(list((outbox / doctor / "new").iterdir())) == 1


async def test_mixed_recipients_when_the_smarthost_fails_nothing_is_kept(setup: Setup):
    setup.relay.behaviour.data_reply = "451 4.3.0 try later"
    doctor, patient = "dr.x@medecin.mssante.fr", "patient@gmail.com"
    smtp = await client(setup)
    try:
        with pytest.raises(aiosmtplib.SMTPDataError) as exc:
            await smtp.sendmail(USER, [doctor, patient], mail(patient, LAB))
        assert exc.value.code == 451  # the sender retries the whole message
    finally:
        smtp.close()
    store = setup.gw.runtime.store
    assert store is not None
    assert [i.state for i in await store.list_items(state=None)] == ["deleted"]
    assert await store.count(state="quarantined") == 0


@pytest.mark.promise("login-throttle")
async def test_guessing_over_new_connections_is_locked_out(tmp_path: Path, cert, relay: Sink,
                                                           sink: Sink):
    """Wrong passwords from one address, over new connections and for several accounts, lock
    that address out for lockout_minutes: even the right password is refused. (Not the
    growing per-account delay, whose first second a slow machine outlives: found by a
    mutation run under load.)"""
    async with await start(tmp_path, cert, relay, sink, lockout_failures=1) as gw:
        s = Setup(gw=gw, relay=relay, mailbox=sink, cert=cert[0])
        good = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
        for i in range(4):  # four accounts, one wrong password each: the address's limit
            smtp = await client(s, login=None)
            bad = base64.b64encode(f"\0guess{i}@{DOMAIN}\0mauvais mot de passe".encode())
            try:
                assert (await smtp.execute_command(b"AUTH", b"PLAIN", bad)).code == 535
            finally:
                smtp.close()
        smtp = await client(s, login=None)
        try:  # now even the right password is refused for lockout_minutes
            resp = await smtp.execute_command(b"AUTH", b"PLAIN", good)
            assert resp.code == 454 and "Trop d'essais" in resp.message
        finally:
            smtp.close()


# ---- who may send as whom (hardening) -------------------------------------------------------


async def test_sender_must_be_the_logins_own_address(setup: Setup):
    """A stolen password must not lend the practice's name to any address: the envelope
    sender and the From/Sender fields must be addresses of the login."""
    to = "patients@liste.example"
    smtp = await client(setup)
    try:
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as exc:
            await smtp.mail(f"directeur@{DOMAIN}")
        assert exc.value.code == 553 and exc.value.message.startswith("5.7.1 ")
        await smtp.rset()
        for header in ("From: <directeur@ameli.fr>", f"From: <directeur@{DOMAIN}>",
                       f'From: "secretariat@{DOMAIN}" <directeur@ameli.fr>',
                       f"From: <{USER}>\r\nSender: <directeur@ameli.fr>",
                       f"From: <{USER}>, <directeur@{DOMAIN}>",
                       "From: Service facturation",
                       # as Postfix and mail readers see them, not as Python's parser does:
                       f"From: {USER} <directeur@{DOMAIN}>",
                       f"From : <directeur@{DOMAIN}>\r\nSender: <{USER}>",
                       f"From: <{USER}>\r\nFrom : <directeur@{DOMAIN}>",
                       f"From: <{USER}> <directeur@{DOMAIN}>",
                       f"From: <{USER}> directeur@{DOMAIN}",
                       f"From: <{USER}> (directeur@ameli.fr)",
                       f"From: =?utf-8?q?directeur=40ameli=2Efr?= <{USER}>",
                       f"Sender: <{USER}>",  # no From at all
                       f"From: <{USER}>\r\nSender: " + "(" * 2000):
            raw = (f"{header}\r\nTo: <{to}>\r\nSubject: Facture\r\n\r\nBonjour\r\n").encode()
            with pytest.raises(aiosmtplib.SMTPDataError) as data_exc:
                await smtp.sendmail(USER, [to], raw)
            assert data_exc.value.code == 553, header
            assert "non autorisee" in data_exc.value.message
            assert re.search(r" id=[0-9A-Z]{12}$", data_exc.value.message), header
            await smtp.rset()
        # Its own address, in both places, goes out.
        _, reply = await smtp.sendmail(USER, [to], mail(to, "Bonjour, rendez-vous jeudi."))
        assert "transmis" in reply
        # Each refusal has its tracking record, with the login that tried.
        await setup.gw.runtime.pipeline.flush_tracking()
        store = setup.gw.runtime.store
        assert store is not None
        records, _ = await store.tracking(outcomes=("rejected",))
        assert records and all(r.auth_user == USER and r.reply.startswith("553 ")
                               and r.direction == "outbound" for r in records)
    finally:
        smtp.close()
    assert (await setup.relay.get()).rcpts == [to]
    assert setup.relay.empty()


async def test_aliases_let_a_login_send_as_other_addresses(setup: Setup):
    accounts = AccountFile(setup.gw.runtime.cfg.submission_users_file)
    accounts.set_addresses(USER, (f"accueil@{DOMAIN}", f"@rdv.{DOMAIN}"))
    to = "patients@liste.example"
    for sender in (f"accueil@{DOMAIN}",):
        raw = (f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: RDV\r\n\r\njeudi\r\n").encode()
        smtp = await client(setup)
        try:
            _, reply = await smtp.sendmail(sender, [to], raw)
            assert "transmis" in reply
            # The login itself is no longer among its addresses once aliases are listed.
            with pytest.raises(aiosmtplib.SMTPSenderRefused):
                await smtp.mail(USER)
        finally:
            smtp.close()
    assert accounts.load()[USER].may_send_as(f"qui@rdv.{DOMAIN}")
    assert not accounts.load()[USER].may_send_as(f"rdv.{DOMAIN}")
    assert not accounts.load()[USER].may_send_as(f"x@evilrdv.{DOMAIN}")
    assert (await setup.relay.get()).mail_from == f"accueil@{DOMAIN}"


def test_cli_sets_sender_addresses(tmp_path: Path):
    data = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    base = [sys.executable, "-m", "gateway", "submission", "--data-dir", str(data),
            "--domain", DOMAIN]
    subprocess.run([*base, "add-user", "cabinet", "--password-stdin", "--adresse",
                    f"accueil@{DOMAIN}"], input=f"{PASSWORD}\n", text=True, check=True,
                   env=env, capture_output=True)
    out = subprocess.run([*base, "addresses", "cabinet", f"accueil@{DOMAIN}", f"@{DOMAIN}"],
                         text=True, check=True, env=env, capture_output=True).stdout
    assert f"accueil@{DOMAIN}, @{DOMAIN}" in out
    account = AccountFile(data / "submission-users.json").load()["cabinet"]
    assert account.addresses == (f"accueil@{DOMAIN}", f"@{DOMAIN}")
    bad = subprocess.run([*base, "addresses", "cabinet", "pas une adresse"], text=True,
                         env=env, capture_output=True)
    assert bad.returncode == 1 and "adresse invalide" in bad.stderr


async def test_refused_header_frees_the_smarthost_connection(setup: Setup):
    from tests.test_hardening import established_to, wait_established

    to = "patients@liste.example"
    for header in ("Sender: " + "(" * 5000, "From: " + "<x@y> " * 20000):
        raw = f"From: <{USER}>\r\n{header}\r\nTo: <{to}>\r\n\r\nBonjour\r\n".encode()
        smtp = await client(setup)
        try:
            with pytest.raises(aiosmtplib.SMTPDataError) as exc:
                await smtp.sendmail(USER, [to], raw)
            assert exc.value.code == 553
        finally:
            smtp.close()
    assert await wait_established(setup.relay.port, 0) == 0, established_to(setup.relay.port)
    assert "transmis" in await send(setup, to, mail(to, "Bonjour, rendez-vous jeudi."))


@pytest.mark.promise("login-throttle")
async def test_parallel_logins_get_no_more_tries_than_one_by_one(tmp_path: Path, cert,
                                                                 relay: Sink, sink: Sink):
    """Each attempt is counted when it starts: sixty at once from one address get no more
    failures than the address may have (4 x lockout_failures), and the right password among
    them is refused too once the address is locked."""
    async with await start(tmp_path, cert, relay, sink, lockout_failures=2) as gw:
        async def attempt(password: str) -> int:
            smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.submission_port,
                                   start_tls=False, source_address=("127.0.0.7", 0),
                                   tls_context=ssl.create_default_context(cafile=str(cert[0])))
            await smtp.connect()
            try:
                await smtp.ehlo()
                await smtp.starttls(server_hostname="mx.cabinet.test")
                await smtp.ehlo()
                blob = base64.b64encode(f"\0{USER}\0{password}".encode())
                return (await smtp.execute_command(b"AUTH", b"PLAIN", blob)).code
            finally:
                smtp.close()

        codes = await asyncio.gather(*(attempt("mauvais-mot-de-passe") for _ in range(59)),
                                     attempt(PASSWORD))
    assert codes.count(535) <= 2  # the pair's free tries; the others had to wait (454)
    assert codes.count(235) <= 1
    assert set(codes) <= {535, 454, 235}


async def test_no_release_link_for_a_message_held_for_anything_else(
        tmp_path: Path, cert, relay: Sink, sink: Sink):
    """The sender's own link frees only a message held for health data in clear. Held also
    because its analysis could not finish (or for a dangerous file), it is for the practice's
    admin: no link in the notice, and a link made anyway is refused."""
    import aiohttp

    from gateway.notice import release_token

    cfg = with_release_links(tmp_path, cert, relay, sink, outbound={"policy": "warn"},
                             timeouts={"attachments_s": 1e-6})
    async with running(cfg) as gw:
        s = Setup(gw=gw, relay=relay, mailbox=sink, cert=cert[0])
        assert "quarantaine" in await send(s, "patient@gmail.com", mail("patient@gmail.com", LAB))
        store = gw.runtime.store
        assert store is not None
        (item,) = await store.list_items()
        assert {"ATTACHMENTS_TIMEOUT", "OUTBOUND_HEALTH_CLEARTEXT_WARN"} <= {
            x.name for x in item.symbols}
        assert not (await store.item(item.id)).sender_may_release  # decided when held
        body = parsed(await sink.get()).get_content()
        assert "données de santé" in body and "passerelle.cabinet.test" not in body
        path = f"/liberation/{item.id}/{release_token(gw.runtime.secret, item.id, USER)}"
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://127.0.0.1:{gw.web_port}{path}") as r:
            assert r.status == 404
    assert relay.empty()
