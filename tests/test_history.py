"""Who the practice has exchanged mail with (gateway/correspondents.py): mail it sends makes
its recipients known, authenticated mail it accepts makes its sender known, over SMTP through
the running gateway; the book keeps keyed digests only, in a 0600 file; and a change of bank
details from a first contact is held, from a known supplier it is not."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiosmtplib
import pytest

from gateway.correspondents import LEARNING, Correspondents
from gateway.service import build_runtime, running
from gateway.symbols import Action
from tests.conftest import DOMAIN, make_config
from tests.support.keys import dkim_keypair
from tests.support.sink import Sink
from tests.test_impersonation import mail, names, signed, verdict
from tests.test_submission import USER, cert, relay, send, setup  # noqa: F401 - fixtures

SUPPLIER = "compta@dubois-medical.example"
LAB_KEY, LAB_DNS = dkim_keypair()


def _known(path: Path, address: str) -> bool:
    """Asked of a new reader each time (a reader keeps its answers a minute)."""
    book = Correspondents(path, create=False)
    try:
        return book.seen_sync(address).address
    finally:
        book.close()


async def _until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def test_the_book_keeps_keyed_digests_only_in_a_private_file(tmp_path: Path):
    path = tmp_path / "correspondents.sqlite3"
    book = Correspondents(path, create=True)
    book.record_sync(["Fournisseur@Dubois-Medical.example"], sent=True)
    seen = book.seen_sync("fournisseur@dubois-medical.example")
    assert seen.address and seen.domain and seen.learning
    other = book.seen_sync("autre@dubois-medical.example")
    assert not other.address and other.domain
    book.close()
    assert path.stat().st_mode & 0o777 == 0o600
    stored = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert b"dubois" not in stored.lower() and b"fournisseur" not in stored.lower()
    # A reader finds no book: knows nobody, creates nothing.
    empty = Correspondents(tmp_path / "none.sqlite3", create=False)
    assert empty.seen_sync(SUPPLIER).learning
    assert not (tmp_path / "none.sqlite3").exists()


async def test_mail_the_practice_sends_makes_its_recipient_known(setup):  # noqa: F811
    reply = await send(setup, SUPPLIER, mail(f"Secrétariat <{USER}>", "Livraison",
                                             "Bonjour, merci pour la livraison."))
    assert reply.startswith("2.0.0")
    await setup.gw.runtime.pipeline.flush_correspondents()  # what the timer does every 10 s
    path = setup.gw.runtime.cfg.correspondents_file
    await _until(lambda: _known(path, SUPPLIER))
    assert not _known(path, "inconnu@ailleurs.example")


async def test_authenticated_mail_accepted_makes_its_sender_known(tmp_path: Path, sink: Sink,
                                                                  dns_zone):
    dns_zone.load({
        "labo-bioplus.example": [("TXT", "v=spf1 ip4:127.0.0.1 -all")],
        "_dmarc.labo-bioplus.example": [("TXT", "v=DMARC1; p=reject")],
        "s1._domainkey.labo-bioplus.example": [("TXT", LAB_DNS)],
    })
    cfg = make_config(tmp_path / "d", next_hop={"address": sink.address, "starttls": "off"})
    genuine = signed(mail("Laboratoire Bio+ <resultats@labo-bioplus.example>", "Résultats",
                          "Vos résultats sont disponibles."), b"s1", b"labo-bioplus.example",
                     LAB_KEY)
    spoofed = mail("Inconnu <x@spoof.example>", "Bonjour", "Bonjour")
    # A From whose address is raw UTF-8 (the parser keeps its bytes escaped): delivered once,
    # answered 250, and noted (found by review: it made the reply 451 after delivery, and
    # every retry delivered it again).
    accented = signed(mail("Laboratoire Bio+ <resultats@labo-bioplus.example>", "Résultats",
                           "Vos résultats.").replace(b"resultats@labo-bioplus",
                                                     "jérôme@labo-bioplus".encode()),
                      b"s1", b"labo-bioplus.example", LAB_KEY)
    async with running(cfg) as gw:
        for raw, sender in ((genuine, "bounce@labo-bioplus.example"),
                            (spoofed, "x@spoof.example"),
                            (accented, "bounce@labo-bioplus.example")):
            _, reply = await aiosmtplib.send(raw, sender=sender,
                                             recipients=[f"docteur@{DOMAIN}"],
                                             hostname="127.0.0.1", port=gw.port,
                                             start_tls=False)
            assert reply.startswith("2.0.0"), reply
            await gw.runtime.pipeline.flush_correspondents()  # the book has its key after
        for _ in range(3):
            await sink.get()
        assert sink.empty()
        await gw.runtime.pipeline.flush_correspondents()  # what the timer does every 10 s
        path = cfg.correspondents_file
        await _until(lambda: _known(path, "resultats@labo-bioplus.example"))
        assert not _known(path, "x@spoof.example")  # not authenticated: not noted
        assert _known(path, "jérôme@labo-bioplus.example")


@pytest.fixture
async def known_runtime(tmp_path: Path):
    cfg = make_config(tmp_path)
    book = Correspondents(cfg.correspondents_file, create=True)
    book.record_sync([f"patient{i}@exemple.example" for i in range(LEARNING)] + [SUPPLIER],
                     sent=True)
    book.close()
    rt = await build_runtime(cfg, with_store=False)
    yield rt
    await rt.close()


CHANGE = ("Bonjour, suite à un changement de banque, merci de noter nos nouvelles coordonnées "
          "bancaires pour le règlement de la facture F-2026-1187. Cordialement.")


async def test_new_bank_details_from_a_first_contact_are_held(known_runtime):
    v = await verdict(known_runtime, mail("Comptabilité Dubois <compta@dubois-medicale.example>",
                                          "Nouvelles coordonnées bancaires", CHANGE))
    assert {"FIRST_CONTACT", "FRAUD_PAYMENT_DETAILS"} <= names(v)
    assert v.action is Action.QUARANTINE


async def test_new_bank_details_from_a_known_supplier_are_not_held(known_runtime):
    v = await verdict(known_runtime, mail(f"Comptabilité Dubois <{SUPPLIER}>",
                                          "Nouvelles coordonnées bancaires", CHANGE))
    assert not {"FIRST_CONTACT", "FRAUD_PAYMENT_DETAILS"} & names(v)
    assert v.action is Action.ACCEPT
    # Someone else at a known organisation is no first contact either.
    v = await verdict(known_runtime, mail("Direction Dubois <direction@dubois-medical.example>",
                                          "Planning des livraisons", "Bonjour"))
    assert "FIRST_CONTACT" not in names(v)


async def test_a_new_installation_calls_nobody_a_first_contact(runtime):
    v = await verdict(runtime, mail("Comptabilité Dubois <compta@dubois-medicale.example>",
                                    "Nouvelles coordonnées bancaires", CHANGE))
    assert "FIRST_CONTACT" not in names(v)


async def test_a_new_suppliers_first_invoice_with_its_rib_is_not_held(known_runtime):
    """Sending one's RIB is not changing it (found by review)."""
    v = await verdict(known_runtime, mail("Cabinet de kinésithérapie <compta@kine-ville.example>",
                                          "Facture de rétrocession",
                                          "Bonjour, veuillez trouver ma facture et mon RIB en "
                                          "pièce jointe. Bien cordialement."))
    assert "FIRST_CONTACT" in names(v)
    assert "FRAUD_PAYMENT_DETAILS" not in names(v)
    assert v.action is Action.ACCEPT
