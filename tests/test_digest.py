"""Quarantine digests ("Rapport de quarantaine"): built from mail held through the real SMTP
port, sent through the real next hop (the sink), and their links used on the real web page."""

from __future__ import annotations

import email
import email.policy
import html
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.message import EmailMessage, Message
from pathlib import Path

import aiosmtplib
import pytest

from gateway import config, digest
from gateway.accounts import AccountFile
from gateway.errors import ConfigError
from gateway.service import Running, purge_expired, running
from tests.conftest import DOMAIN, make_config
from tests.support.sink import Received, Sink
from tests.support.webclient import ADMIN, Client, add_users, suspicious

PUBLIC = "http://passerelle.cabinet.test"  # http: the test client talks plain HTTP
DOCTOR, SECRETARY, DESK = (f"docteur@{DOMAIN}", f"secretariat@{DOMAIN}", f"accueil@{DOMAIN}")
LINK = re.compile(re.escape(PUBLIC) + r"(/rapport/[\w./-]+)")


@dataclass
class Site:
    gw: Running
    sink: Sink
    client: Client


def digest_config(data: Path, sink: Sink, *, listen: str = "127.0.0.1:0",
                  public: str = PUBLIC, reject: float = 50.0,
                  **digest_section: object) -> config.Config:
    # Low thresholds: a plain bulk mail (HTML only, no unsubscribe header, no SPF record) is
    # held for "bulk" and "auth" reasons alone, which the admin lets recipients release.
    return make_config(data, next_hop={"address": sink.address, "starttls": "off"},
                       web={"listen": listen, "public_url": public},
                       scoring={"tag": 1.0, "quarantine": 1.5, "reject": reject},
                       digest={"direct_release_groups": ["bulk", "auth"], **digest_section})


def site_on_a_known_port(data: Path, sink: Sink, **kw: object) -> tuple[config.Config, str]:
    """A digest configuration whose links (web.public_url) point at the page itself, with
    the test users: what a browser test follows."""
    from tests.support.sink import _free_port
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    cfg = digest_config(data, sink, listen=f"127.0.0.1:{port}", public=base, **kw)  # type: ignore[arg-type]
    add_users(AccountFile(cfg.web_users_file))
    return cfg, base


@pytest.fixture
async def site(tmp_path: Path, sink: Sink) -> AsyncIterator[Site]:
    cfg = digest_config(tmp_path / "data", sink)
    add_users(AccountFile(cfg.web_users_file))
    async with running(cfg) as gw:
        client = Client(f"http://127.0.0.1:{gw.web_port}")
        try:
            yield Site(gw=gw, sink=sink, client=client)
        finally:
            await client.close()


def bulk(subject: str = "Nos offres de matériel médical") -> bytes:
    m = EmailMessage()
    m["From"] = "Offres Pro <offres@promo-materiel.example>"
    m["To"] = DOCTOR
    m["Subject"] = subject
    m["Date"] = "Sat, 28 Nov 2026 10:00:00 +0100"
    m["Message-ID"] = f"<bulk-{abs(hash(subject))}@promo-materiel.example>"
    m.set_content(
        "<html><body><p>Découvrez nos tensiomètres à prix réduit.</p>"
        '<p><a href="https://promo-materiel.example/catalogue">Voir le catalogue</a></p>'
        '<p style="font-size:10px">Pour vous désinscrire, <a href="https://promo-materiel.'
        'example/desinscription">cliquez ici</a>.</p></body></html>', subtype="html")
    return bytes(m).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


async def hold(gw: Running, raw: bytes, rcpts: list[str],
               sender: str = "offres@promo-materiel.example") -> str:
    """Send through the SMTP port; the quarantine id the reply names."""
    store = gw.runtime.store
    assert store is not None
    before = {i.id for i in await store.list_items(limit=1000)}
    _, reply = await aiosmtplib.send(raw, sender=sender, recipients=rcpts,
                                     hostname="127.0.0.1", port=gw.port, start_tls=False)
    assert "quarantaine" in reply, reply
    (new,) = [i.id for i in await store.list_items(limit=1000) if i.id not in before]
    return new


def take(sink: Sink) -> list[Received]:
    """Everything the sink has received so far (the deliveries awaited before)."""
    out = []
    while not sink.queue.empty():
        out.append(sink.queue.get_nowait())
    return out


def digests(received: list[Received]) -> dict[str, tuple[str, Message]]:
    """The digests among messages received: recipient -> (reverse path, parsed message)."""
    out = {}
    for r in received:
        msg = email.message_from_bytes(r.data, policy=email.policy.default)
        if msg["X-Gateway-Digest"]:
            (rcpt,) = r.rcpts
            assert rcpt not in out, f"two digests for {rcpt}"
            out[rcpt] = (r.mail_from, msg)
    return out


def text_of(msg: Message) -> str:
    return msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]


def links(msg: Message) -> list[str]:
    """The item links of a digest (not its opt-out link)."""
    return [x for x in LINK.findall(text_of(msg)) if "/desabonnement/" not in x]


@pytest.mark.promise("quarantine-digest")
async def test_digest_goes_to_each_recipient_with_held_mail_and_to_nobody_else(site: Site):
    gw = site.gw
    danger = await hold(gw, suspicious("Facture impayée"), [DOCTOR, SECRETARY],
                        sender="contact@labo-analyses.example")
    offer = await hold(gw, bulk(), [DOCTOR])
    _, reply = await aiosmtplib.send(  # a clean mail to the desk: delivered, not held
        b"From: collegue@hopital.example\r\nTo: " + DESK.encode() + b"\r\nSubject: Compte "
        b"rendu\r\nDate: Sat, 28 Nov 2026 10:00:00 +0100\r\nMessage-ID: <cr-1@hopital.example>"
        b"\r\n\r\nBonjour, voici le compte rendu.\r\n",
        sender="collegue@hopital.example", recipients=[DESK], hostname="127.0.0.1",
        port=gw.port, start_tls=False)
    assert reply.startswith("2.0.0") and "quarantaine" not in reply, reply

    assert gw.runtime.digests is not None
    report = await gw.runtime.digests.send_now()
    assert report is not None and sorted(report.sent) == [DOCTOR, SECRETARY]
    assert report.items == 2 and not report.failed
    got = digests(take(site.sink))
    assert sorted(got) == [DOCTOR, SECRETARY]  # none for the desk, nor for anyone else
    for rcpt, (reverse_path, msg) in got.items():
        assert reverse_path == "<>"  # a null sender: never bounced back, never looped
        assert msg["Auto-Submitted"] == "auto-generated"
        assert msg["To"] == rcpt and msg["From"].addresses[0].addr_spec == f"postmaster@{DOMAIN}"
        assert msg["List-Unsubscribe"].startswith(f"<{PUBLIC}/rapport/desabonnement/")
        assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        html = msg.get_body(("html",)).get_content()  # type: ignore[union-attr]
        assert "Facture impayée" in text_of(msg) and "Facture impayée" in html
    doctor = got[DOCTOR][1]
    assert doctor["Subject"] == "Rapport de quarantaine : 2 messages retenus pour vous"
    assert "Nos offres de matériel médical" in text_of(doctor)
    assert got[SECRETARY][1]["Subject"] == "Rapport de quarantaine : 1 message retenu pour vous"
    assert "Nos offres" not in text_of(got[SECRETARY][1])
    # The script attachment: a request to the admin only; the offer: a direct release.
    by_item = {link.split("/")[-1].split(".")[0]: link for link in links(doctor)}
    assert by_item[danger].split(".")[2] == "d" and by_item[offer].split(".")[2] == "l"
    assert "Demander la libération : " + PUBLIC + by_item[danger] in text_of(doctor)
    assert "Libérer ce message : " + PUBLIC + by_item[offer] in text_of(doctor)
    # The main reason, in French; nothing of the content.
    assert "Veuillez trouver la facture" not in text_of(doctor)
    assert "script" in text_of(doctor).lower() or "programme" in text_of(doctor).lower()

    # The next digest lists only what was held since this one.
    assert (await gw.runtime.digests.send_now()) is not None
    assert digests(take(site.sink)) == {}


@pytest.mark.promise("quarantine-digest")
async def test_request_link_works_once_shows_only_the_digest_and_reaches_the_admin(site: Site):
    gw = site.gw
    danger = await hold(gw, suspicious("Facture impayée", body="Code secret 4242\n"),
                        [SECRETARY], sender="contact@labo-analyses.example")
    assert gw.runtime.digests is not None
    await gw.runtime.digests.send_now()
    mail = digests(take(site.sink))[SECRETARY][1]
    (link,) = links(mail)
    (reason,) = re.findall(r"Raison : (.*)", text_of(mail))
    c = site.client
    # Opening the link does nothing by itself (mail scanners open links). The page shows
    # what the digest showed (date, sender, subject, main reason), not the content.
    status, page, _ = await c.get(link)
    assert status == 200 and "Facture impayée" in page and "contact@labo-analyses.example" in page
    assert reason.strip() in html.unescape(page) and "Code secret" not in page
    assert "Demander la libération" in page
    assert not await gw.runtime.store.release_requests(danger)  # type: ignore[union-attr]
    # The form needs the token set with the page (another site cannot post it).
    status, _, _ = await c.post(link, {"jeton": "autre"})
    assert status == 403
    status, page, _ = await c.post(link, {"jeton": c.form_token})
    assert status == 200 and "transmise" in page
    status, page, _ = await c.post(link, {"jeton": c.form_token})
    assert "déjà servi" in page
    requests = await gw.runtime.store.release_requests(danger)  # type: ignore[union-attr]
    assert [who for who, _ in requests] == [f"digest:{SECRETARY}"]
    item = await gw.runtime.store.item(danger)  # type: ignore[union-attr]
    assert item.state == "quarantined"  # asking releases nothing
    assert site.sink.empty()  # nothing delivered
    # The admin sees the request: a card on the dashboard, a filter, a line on the message.
    admin = Client(c.base)
    try:
        assert await admin.login(ADMIN) == 303
        _, dash, _ = await admin.get("/")
        assert "1</b> libération(s) demandée(s)" in dash
        _, listing, _ = await admin.get("/quarantaine?demandes=1")
        assert danger in listing and "1 message(s)" in listing
        _, msg_page, _ = await admin.get(f"/quarantaine/{danger}")
        assert f"Libération demandée par destinataire {SECRETARY} (rapport)" in msg_page
        _, journal, _ = await admin.get("/journal")
        assert "demande de libération (rapport)" in journal
    finally:
        await admin.close()


@pytest.mark.promise("quarantine-digest")
async def test_links_refuse_tampering_expire_and_never_release_a_dangerous_file(site: Site):
    gw = site.gw
    danger = await hold(gw, suspicious("Facture impayée"), [DOCTOR],
                        sender="contact@labo-analyses.example")
    offer = await hold(gw, bulk(), [DOCTOR])
    assert gw.runtime.digests is not None and gw.runtime.store is not None
    await gw.runtime.digests.send_now()
    found = {link.split("/")[-1].split(".")[0]: link for link in
             links(digests(take(site.sink))[DOCTOR][1])}
    c = site.client
    request_link = found[danger]
    head, mac = request_link.rsplit(".", 1)
    tampered = [
        head.replace(".d.", ".l.") + "." + mac,  # ask -> release
        head + "." + ("0" if mac[0] != "0" else "1") + mac[1:],  # another MAC
        head.replace(".0.d.", ".1.d.") + "." + mac,  # another recipient
        request_link.replace(danger, offer),  # another item
        head.rsplit(".", 1)[0] + f".{int(head.rsplit('.', 1)[1]) + 86400}." + mac,  # later expiry
    ]
    for link in tampered:
        for method in (c.get, lambda p: c.post(p, {"jeton": c.form_token})):
            status, page, _ = await method(link)
            assert status == 404 and "Lien invalide" in page, link
    assert (await gw.runtime.store.item(danger)).state == "quarantined"

    # A release link for the file, signed by us (a digest made before the admin changed the
    # rules): the page still asks the admin instead.
    item = await gw.runtime.store.item(danger)
    forged = digest.make_link(gw.runtime.secret, item, 0, "l", int(time.time()) + 3600)
    await c.get(f"/rapport/{forged.token}")
    status, page, _ = await c.post(f"/rapport/{forged.token}", {"jeton": c.form_token})
    assert status == 200 and "ne peut plus être libéré" in page
    assert (await gw.runtime.store.item(danger)).state == "quarantined"
    assert site.sink.empty()

    # An expired link: says so, does nothing.
    offer_item = await gw.runtime.store.item(offer)
    old = digest.make_link(gw.runtime.secret, offer_item, 0, "l", int(time.time()) - 1)
    status, page, _ = await c.get(f"/rapport/{old.token}")
    assert status == 200 and "expiré" in page and "<button" not in page.split("</table>")[1]
    status, page, _ = await c.post(f"/rapport/{old.token}", {"jeton": c.form_token})
    assert "expiré" in page and (await gw.runtime.store.item(offer)).state == "quarantined"

    # The offer's own link releases it, once; it reaches the mailbox with the banner.
    await c.get(found[offer])
    status, page, _ = await c.post(found[offer], {"jeton": c.form_token})
    assert status == 200 and "libéré" in page
    assert (await gw.runtime.store.item(offer)).state == "released"
    (released,) = take(site.sink)
    assert released.rcpts == [DOCTOR] and b"X-Gateway-Released: by digest:" + DOCTOR.encode() \
        in released.data
    status, page, _ = await c.post(found[offer], {"jeton": c.form_token})
    assert "déjà servi" in page or "déjà été traité" in page
    assert site.sink.empty()


@pytest.mark.promise("quarantine-digest")
async def test_opt_out_stops_the_next_digest_and_can_be_undone(site: Site):
    gw = site.gw
    assert gw.runtime.digests is not None
    await hold(gw, bulk("Offre 1"), [DOCTOR])
    await gw.runtime.digests.send_now()
    msg = digests(take(site.sink))[DOCTOR][1]
    optout = msg["List-Unsubscribe"].strip("<>").removeprefix(PUBLIC)
    assert optout in text_of(msg)
    c = site.client
    status, page, _ = await c.get(optout)
    assert status == 200 and "Ne plus recevoir le rapport" in page
    status, page, _ = await c.post(optout, {"jeton": c.form_token, "choix": "arreter"})
    assert "Vous ne recevrez plus" in page
    await hold(gw, bulk("Offre 2"), [DOCTOR])
    await hold(gw, bulk("Offre 2 bis"), [SECRETARY])
    await gw.runtime.digests.send_now()
    assert sorted(digests(take(site.sink))) == [SECRETARY]  # still held, just not listed
    # Back in, from the same page; then a mail client's one-click unsubscribe (RFC 8058).
    await c.get(optout)
    status, page, _ = await c.post(optout, {"jeton": c.form_token, "choix": "reprendre"})
    assert "de nouveau" in page
    await hold(gw, bulk("Offre 3"), [DOCTOR])
    await gw.runtime.digests.send_now()
    assert sorted(digests(take(site.sink))) == [DOCTOR]
    other = Client(c.base)
    try:
        status, page, _ = await other.post(optout, {"List-Unsubscribe": "One-Click"})
        assert status == 200 and "Vous ne recevrez plus" in page
    finally:
        await other.close()
    assert gw.runtime.store is not None
    assert gw.runtime.store.blind(DOCTOR) in await gw.runtime.store.digest_optouts()
    # A made-up opt-out link is refused.
    bad = optout[:-1] + ("0" if optout[-1] != "0" else "1")
    assert (await c.get(bad))[0] == 404


async def test_digest_is_sent_at_its_hour_once_and_the_first_start_sends_nothing(
        tmp_path: Path, sink: Sink):
    cfg = digest_config(tmp_path / "data", sink, hour=8)
    async with running(cfg) as gw:
        assert gw.runtime.quarantine is not None
        now = [time.time()]
        paris = digest.Digests(cfg, gw.runtime.quarantine, gw.runtime.next_hop,
                               gw.runtime.secret, clock=lambda: now[0])
        assert await paris.tick() is None  # first start: only the mark
        await hold(gw, bulk(), [DOCTOR])
        due = paris.next_due(now[0])
        assert time.strftime("%H:%M", time.gmtime(due)) in ("07:00", "06:00")  # 8:00 in Paris
        now[0] = due - 1
        assert await paris.tick() is None and sink.empty()
        now[0] = due + 30
        report = await paris.tick()
        assert report is not None and report.sent == [DOCTOR]
        now[0] = due + 90  # the next minute's tick: nothing more
        assert await paris.tick() is None
        assert list(digests(take(sink))) == [DOCTOR]


async def test_digest_waits_and_retries_when_the_mailbox_server_is_down(
        tmp_path: Path, sink: Sink):
    cfg = digest_config(tmp_path / "data", sink)
    async with running(cfg) as gw:
        assert gw.runtime.digests is not None
        await hold(gw, bulk(), [DOCTOR])
        sink.behaviour.data_reply = "451 4.3.0 try later"
        report = await gw.runtime.digests.send_now()
        assert report is not None and report.failed == [DOCTOR] and not report.sent
        sink.behaviour.data_reply = None
        await gw.runtime.digests.tick()  # the timer's next minute: tried again
        assert list(digests(take(sink))) == [DOCTOR]


async def test_disabled_domain_and_no_public_url(tmp_path: Path, sink: Sink):
    cfg = make_config(tmp_path / "data", next_hop={"address": sink.address, "starttls": "off"},
                      gateway={"domains": [DOMAIN, "annexe.test"]},
                      scoring={"tag": 1.0, "quarantine": 1.5, "reject": 50.0},
                      digest={"domains": ["annexe.test"]})
    async with running(cfg) as gw:
        assert gw.runtime.digests is not None
        await hold(gw, bulk(), [DOCTOR, "docteur@annexe.test"])
        await gw.runtime.digests.send_now()
        got = digests(take(sink))
        assert list(got) == ["docteur@annexe.test"]
        body = text_of(got["docteur@annexe.test"][1])
        assert "/rapport/" not in body and "demandez à la personne qui administre" in body
        assert got["docteur@annexe.test"][1]["List-Unsubscribe"] is None


async def test_link_pages_are_rate_limited_per_client(site: Site):
    c = site.client
    codes = [(await c.get(f"/rapport/20261128T100000-0123456789ab.0.d.1.{n:032x}"))[0]
             for n in range(70)]
    assert codes[0] == 404 and codes[-1] == 429
    # Another address is not held back by this one's guesses.
    other = Client(c.base, source="127.0.0.2")
    try:
        assert (await other.get("/rapport/20261128T100000-0123456789ab.0.d.1.0"))[0] == 404
    finally:
        await other.close()


async def test_purge_removes_requests_and_used_links_with_the_items(site: Site):
    gw = site.gw
    store = gw.runtime.store
    assert store is not None and gw.runtime.digests is not None
    held = await hold(gw, bulk(), [DOCTOR])
    await store.request_release(held, by=f"digest:{DOCTOR}")
    assert await store.use_link("f" * 32)
    assert await store.pending_requests() == 1
    gw.runtime.quarantine.retention_days = 0  # type: ignore[union-attr]
    assert await purge_expired(gw.runtime) == 1
    assert await store.pending_requests() == 0 and not await store.release_requests(held)
    assert not await store.link_used("f" * 32)


def test_config_refuses_direct_release_for_files_and_failed_analyses(tmp_path: Path):
    for group in ("attachments", "runner"):
        with pytest.raises(ConfigError, match="digest.direct_release_groups"):
            config.validate(make_config(tmp_path, digest={"direct_release_groups": [group]}))
    with pytest.raises(ConfigError, match="gateway.timezone"):
        config.validate(make_config(tmp_path, gateway={"timezone": "Europe/Lutece"}))
    with pytest.raises(ConfigError, match="digest.domains"):
        config.validate(make_config(tmp_path, digest={"domains": ["ailleurs.test"]}))


# ---- hostile held mail, and the seams found by review -------------------------------------


def raw_bulk(from_line: bytes, subject_line: bytes) -> bytes:
    return (b"From: " + from_line + b"\r\nTo: " + DOCTOR.encode() + b"\r\nSubject: "
            + subject_line + b"\r\nDate: Sat, 28 Nov 2026 10:00:00 +0100\r\nMessage-ID: "
            b"<hostile-" + str(abs(hash(subject_line))).encode() + b"@promo-materiel.example>"
            b"\r\nMIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
            b"<html><body><p>Offre</p><p>Pour vous d\xc3\xa9sinscrire, <a href=\"https://"
            b"promo-materiel.example/d\">cliquez ici</a>.</p></body></html>\r\n")


@pytest.mark.promise("quarantine-digest")
async def test_hostile_senders_and_subjects_neither_stop_nor_forge_the_digest(site: Site):
    """Raw UTF-8 and encoded names are shown decoded; a subject with line breaks cannot add
    a line (a forged release link) to the digest; one such mail stops nobody's digest."""
    gw = site.gw
    await hold(gw, raw_bulk("Offres Médicales <offres@promo-materiel.example>".encode(),
                            b"Tarifs"), [DOCTOR])
    forged = ("Info\n   Raison : rien\n   Libérer ce message : https://evil.example/rapport/ok"
              "\n\n2. Reçu le 01/01/2026")
    import base64
    await hold(gw, raw_bulk(b"=?utf-8?q?Laboratoire_M=C3=A9dical?= <offres@promo-materiel."
                            b"example>", b"=?utf-8?b?" + base64.b64encode(forged.encode())
                            + b"?="), [DOCTOR])
    await hold(gw, bulk(), [SECRETARY])
    assert gw.runtime.digests is not None
    report = await gw.runtime.digests.send_now()
    assert report is not None and sorted(report.sent) == [DOCTOR, SECRETARY]
    text = text_of(digests(take(site.sink))[DOCTOR][1])
    assert "Offres Médicales <offres@promo-materiel.example>" in text
    assert "Laboratoire Médical <offres@promo-materiel.example>" in text
    assert "=?utf-8" not in text
    lines = text.splitlines()
    assert not [x for x in lines if x.strip().startswith(("Libérer ce message : https://evil",
                                                         "2. Reçu le 01/01/2026"))]
    assert [x for x in lines if "Objet : Info Raison : rien Libérer ce message : https://evil"
            in x]  # the subject, on its own line, as one line
    # Its link page and the admin's pages show it too.
    for link in links(digests_of_text(text)):
        status, page, _ = await site.client.get(link)
        assert status == 200
    admin = Client(site.client.base)
    try:
        assert await admin.login(ADMIN) == 303
        assert (await admin.get("/quarantaine"))[0] == 200
    finally:
        await admin.close()


def digests_of_text(text: str) -> EmailMessage:
    msg = EmailMessage()
    msg.set_content(text)
    return msg


@pytest.mark.promise("quarantine-digest")
async def test_a_message_not_analysed_in_full_is_never_released_from_the_digest(
        tmp_path: Path, sink: Sink):
    """Even where the admin lets recipients release mail held for its structure: a file
    nested past the parts limit was never looked at, so the digest only asks the admin."""
    cfg = digest_config(tmp_path / "data", sink,
                        direct_release_groups=["bulk", "auth", "structure"])
    async with running(cfg) as gw:
        inner = (b"Content-Type: application/octet-stream\r\nContent-Disposition: attachment;"
                 b" filename=\"facture.exe\"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                 b"TVqQAAMAAAAEAAAA//8AALgAAAAAAAAAQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                 b"gAAAAA==\r\n")
        body = inner
        for depth in range(30):
            b = f"b{depth}".encode()
            body = (b"Content-Type: multipart/mixed; boundary=\"" + b + b"\"\r\n\r\n--" + b
                    + b"\r\n" + body + b"\r\n--" + b + b"--\r\n")
        raw = (b"From: Offres <offres@promo-materiel.example>\r\nTo: " + DOCTOR.encode()
               + b"\r\nSubject: Facture\r\nDate: Sat, 28 Nov 2026 10:00:00 +0100\r\n"
               b"Message-ID: <deep-1@promo-materiel.example>\r\nMIME-Version: 1.0\r\n" + body)
        held = await hold(gw, raw, [DOCTOR])
        assert gw.runtime.store is not None and gw.runtime.digests is not None
        names = {s.name for s in (await gw.runtime.store.item(held)).symbols}
        assert "MIME_TOO_COMPLEX" in names, names
        await gw.runtime.digests.send_now()
        (link,) = links(digests(take(sink))[DOCTOR][1])
        assert link.split(".")[2] == "d"


async def test_an_item_stored_after_a_digest_but_received_before_is_in_the_next(site: Site):
    """The digest lists items by the order they were stored, not by when they arrived: mail
    whose analysis was still running when a digest went is in the next one."""
    from quarantine.store import NewItem, SymbolRecord
    gw = site.gw
    store = gw.runtime.store
    assert store is not None and gw.runtime.digests is not None
    await gw.runtime.digests.send_now()  # nothing yet
    late = NewItem(queue_id="LATE1", received_at=time.time() - 60, direction="inbound",
                   action="quarantine", score=2.0,
                   symbols=(SymbolRecord(name="BULK_NO_UNSUBSCRIBE_HEADER", score=2.0,
                                         detail=""),),
                   mail_from="offres@promo-materiel.example", rcpts=(DOCTOR,),
                   subject="Arrivé avant, rangé après", from_header="", client_ip="", helo="")
    await store.put(late, b"Subject: x\r\n\r\nx\r\n")
    await gw.runtime.digests.send_now()
    assert "Arrivé avant, rangé après" in text_of(digests(take(site.sink))[DOCTOR][1])


async def test_a_digest_the_cli_could_not_deliver_is_sent_by_the_server_later(site: Site):
    gw = site.gw
    assert gw.runtime.digests is not None and gw.runtime.quarantine is not None
    await hold(gw, bulk(), [DOCTOR])
    cli = digest.Digests(gw.runtime.cfg, gw.runtime.quarantine, gw.runtime.next_hop,
                         gw.runtime.secret)  # as `gateway digest --envoyer` makes its own
    site.sink.behaviour.data_reply = "451 4.3.0 try later"
    report = await cli.send_now()
    assert report is not None and report.failed == [DOCTOR]
    site.sink.behaviour.data_reply = None
    await gw.runtime.digests.tick()  # the server's next minute
    assert list(digests(take(site.sink))) == [DOCTOR]
    await gw.runtime.digests.tick()
    assert site.sink.empty()  # once


async def test_opt_out_is_journaled_under_the_recipients_address(site: Site):
    gw = site.gw
    assert gw.runtime.digests is not None and gw.runtime.store is not None
    await hold(gw, bulk(), [DOCTOR])
    await gw.runtime.digests.send_now()
    optout = digests(take(site.sink))[DOCTOR][1]["List-Unsubscribe"].strip("<>")
    c = site.client
    await c.get(optout.removeprefix(PUBLIC))
    await c.post(optout.removeprefix(PUBLIC), {"jeton": c.form_token, "choix": "arreter"})
    entries, _ = await gw.runtime.store.audit_log()
    assert [(e.user, e.action) for e in entries[:2]] == [
        (f"digest:{DOCTOR}", "digest_optout"), (f"digest:{DOCTOR}", "digest_optout_view")]


def test_link_rate_limit_remembers_a_bounded_number_of_clients():
    from gateway.web.app import RateLimit
    limit = RateLimit(2, 300.0, keys=100)
    assert limit.allow("a", 0.0) and limit.allow("a", 1.0) and not limit.allow("a", 2.0)
    for n in range(1000):  # many addresses: the oldest are forgotten, memory stays bounded
        limit.allow(f"k{n}", 3.0)
    assert len(limit._hits) == 100
    assert limit.allow("a", 4.0)  # "a" was forgotten with the others
    assert limit.allow("b", 500.0) and limit.allow("b", 501.0) and not limit.allow("b", 502.0)
    assert limit.allow("b", 801.0)  # the window passed
