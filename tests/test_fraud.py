"""Fraud with no link, each with its genuine counterpart: extortion with a bitcoin address,
callback phishing (an invoice and a number to call), and a practice member's name from outside
asking for gift cards. The invoice fraud with new bank details is in test_disguise.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.runtime import Runtime
from gateway.service import build_runtime
from gateway.symbols import Action
from tests.conftest import make_config
from tests.test_impersonation import mail, names, verdict

WALLET = "bc1qxy2kgdygjrsqtzq2n0yrf2493p83kkfjhx0wlh"


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[Runtime]:
    cfg = make_config(tmp_path, practice={"names": ["Cabinet Dupont"],
                                          "colleagues": ["Dr Claire Martin"]})
    rt = await build_runtime(cfg, with_store=False)
    yield rt
    await rt.close()


async def test_extortion_with_a_bitcoin_address_is_held(runtime):
    text = ("J'ai piraté votre ordinateur et enregistré une vidéo avec votre webcam pendant "
            "que vous visitiez des sites pour adultes. Envoyez 1200 EUR en bitcoin à l'adresse "
            f"{WALLET} sous 48 heures, sinon la vidéo sera envoyée à tous vos contacts.")
    v = await verdict(runtime, mail("Hacker <x@anon.example>", "Votre compte a été piraté",
                                    text))
    assert "FRAUD_EXTORTION" in names(v)
    assert v.action is Action.QUARANTINE


async def test_a_receipt_for_a_bitcoin_purchase_is_not_extortion(runtime):
    text = (f"Votre achat de 0,01 BTC est confirmé. Adresse de réception : {WALLET}. "
            "Merci de votre confiance.")
    v = await verdict(runtime, mail("Plateforme <recu@plateforme.example>", "Reçu", text))
    assert "FRAUD_EXTORTION" not in names(v)
    assert v.action is Action.ACCEPT


async def test_callback_phishing_is_flagged(runtime):
    text = ("Merci pour votre commande. Votre abonnement Norton 360 a été renouvelé : "
            "399,99 € ont été prélevés. Si vous n'avez pas autorisé ce paiement, appelez notre "
            "service au 01 84 88 12 34 pour l'annuler et être remboursé.")
    v = await verdict(runtime, mail("Service facturation <billing@factures-en-ligne.example>",
                                    "Facture n° 58201", text))
    assert "FRAUD_CALLBACK" in names(v)
    assert v.action is not Action.ACCEPT


async def test_a_suppliers_invoice_with_its_phone_number_is_not_callback_phishing(runtime):
    text = ("Bonjour, veuillez trouver votre facture de 84,00 € pour les compresses. "
            "Pour toute question : 04 72 00 00 00. Bonne journée.")
    v = await verdict(runtime, mail("Fournitures Dubois <compta@dubois-medical.example>",
                                    "Votre facture", text,
                                    html=f"<p>{text} <a href='https://www.dubois-medical.example/'>"
                                         "Espace client</a></p>"))
    assert "FRAUD_CALLBACK" not in names(v)
    assert v.action is Action.ACCEPT


async def test_a_colleagues_name_from_outside_asking_for_gift_cards_is_held(runtime):
    v = await verdict(runtime, mail(
        "Dr Claire Martin <dr.claire.martin.cabinet@gmail.com>", "Urgent",
        "Es-tu disponible ? J'ai besoin que tu achètes 5 cartes cadeaux Google Play de 100 € "
        "pour un patient, c'est urgent. Envoie-moi les codes en photo. Reste discrète."))
    assert {"IMPERSONATION_PRACTICE_NAME", "FRAUD_GIFT_CARD"} <= names(v)
    assert v.action is Action.QUARANTINE


async def test_the_colleague_asking_about_her_planning_is_not_held(runtime):
    v = await verdict(runtime, mail(
        "Dr Claire Martin <claire.martin@gmail.com>", "Planning de décembre",
        "Es-tu disponible mardi pour la réunion ? Bonne journée."))
    assert "FRAUD_GIFT_CARD" not in names(v)
    assert v.action is Action.ACCEPT


async def test_advance_fee_fraud_asking_replies_at_a_free_mail_address(runtime):
    """No "million": a business proposal and replies to a private free-mail address."""
    text = ("Cher ami, je suis le directeur des opérations d'une banque internationale et je "
            "vous contacte au sujet d'une proposition d'affaires strictement confidentielle. "
            "Merci de me répondre uniquement à mon adresse privée : m.okafor.prive@gmail.com")
    v = await verdict(runtime, mail("Dr. Mark Okafor <director@banque-intl.example>",
                                    "Proposition confidentielle", text))
    assert "FRAUD_ADVANCE_FEE" in names(v)
    assert v.action is not Action.ACCEPT


async def test_a_notarys_letter_with_a_free_mail_contact_is_not_advance_fee_fraud(runtime):
    """A notary's office on a small provider's domain, a succession, a confidential letter, a
    colleague's free-mail address in copy: words that support the core, never the core."""
    text = ("Maître Lefèvre vous informe que la succession de Mme Durand est ouverte. En tant "
            "que bénéficiaire, merci de nous faire parvenir votre réponse avant le 15 janvier. "
            "Ce courrier est strictement confidentiel. Contact : secretariat.lefevre@orange.fr")
    v = await verdict(runtime, mail("Office notarial Lefèvre <office@notaires-lefevre.example>",
                                    "Succession Durand", text))
    assert "FRAUD_ADVANCE_FEE" not in names(v)


async def test_a_file_with_its_password_in_the_text_is_a_sign(runtime):
    from tests.test_attachments import message_with
    raw = message_with("Facture.zip", b"PK\x03\x04 locked").replace(
        b"Veuillez trouver le document ci-joint.",
        b"Veuillez trouver la facture ci-jointe. Mot de passe de l'archive : 4471")
    assert "ATTACH_PASSWORD_GIVEN" in names(await verdict(runtime, raw))


async def test_a_labs_password_hint_is_not_a_password(runtime):
    """Labs lock results with the patient's birth date and say so: a hint, not a password."""
    from tests.test_attachments import message_with
    raw = message_with("Resultats.pdf", b"%PDF-1.4\n%%EOF\n").replace(
        b"Veuillez trouver le document ci-joint.",
        b"Vos resultats sont joints. Le mot de passe est votre date de naissance (JJMMAAAA).")
    assert "ATTACH_PASSWORD_GIVEN" not in names(await verdict(runtime, raw))
