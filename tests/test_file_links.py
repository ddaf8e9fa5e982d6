"""Links inside files: QR codes in images and PDFs ("quishing"), a PDF's links, an HTML
page's links. Where they lead is judged as a link, through the pipeline with its worker
processes. The genuine counterparts: a conference invitation whose QR code leads to the
organiser's own site, a supplier's invoice linking to its own site. Hostile images (huge, a
decompression bomb, garbage) are skipped without a crash."""

from __future__ import annotations

import io
import struct
import zlib
from email.message import EmailMessage

import pytest
import segno
from PIL import Image

from gateway.cli import to_crlf
from gateway.qr import Reader
from gateway.symbols import Action
from tests.conftest import DOMAIN
from tests.test_impersonation import names, verdict

PHISH_URL = "https://mfa-renouvellement.example/auth?u=docteur"



def qr_png(url: str, *, scale: int = 6) -> bytes:
    buf = io.BytesIO()
    segno.make(url, error="m").save(buf, kind="png", scale=scale, border=4)
    return buf.getvalue()


def qr_pdf(url: str) -> bytes:
    """A one-page PDF holding the QR code as an image, as scanners and Word produce them."""
    img = Image.open(io.BytesIO(qr_png(url, scale=8))).convert("RGB")
    page = Image.new("RGB", (1240, 1754), "white")
    page.paste(img, (400, 600))
    buf = io.BytesIO()
    page.save(buf, "PDF", resolution=150)
    return buf.getvalue()


def with_file(from_: str, subject: str, text: str, filename: str, data: bytes,
              maintype: str, subtype: str) -> bytes:
    m = EmailMessage()
    m["From"] = from_
    m["To"] = f"docteur@{DOMAIN}"
    m["Subject"] = subject
    m["Date"] = "Mon, 30 Nov 2026 09:00:00 +0100"
    m["Message-ID"] = f"<{abs(hash((from_, subject, filename)))}@test.example>"
    m.set_content(text)
    m.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return to_crlf(bytes(m))


def with_inline_image(from_: str, subject: str, text: str, png: bytes) -> bytes:
    m = EmailMessage()
    m["From"] = from_
    m["To"] = f"docteur@{DOMAIN}"
    m["Subject"] = subject
    m["Date"] = "Mon, 30 Nov 2026 09:00:00 +0100"
    m["Message-ID"] = "<inline-qr@test.example>"
    m.set_content(text)
    m.add_alternative(f"<html><body><p>{text}</p><img src=\"cid:qr1\"></body></html>",
                      subtype="html")
    m.get_payload()[1].add_related(png, maintype="image", subtype="png", cid="<qr1>")
    return to_crlf(bytes(m))


QUISH_TEXT = ("Votre double authentification expire aujourd'hui. Scannez le code QR ci-joint "
              "avec votre téléphone pour la renouveler, sans quoi votre compte sera suspendu.")


@pytest.mark.parametrize("form", ["png attachment", "pdf attachment", "inline image"])
async def test_a_qr_code_leading_elsewhere_is_read_as_a_link(runtime, form):
    sender = "Service informatique <it@support-messagerie.example>"
    subject = "Renouvellement de votre authentification"
    if form == "png attachment":
        raw = with_file(sender, subject, QUISH_TEXT, "code.png", qr_png(PHISH_URL), "image", "png")
    elif form == "pdf attachment":
        raw = with_file(sender, subject, QUISH_TEXT, "procedure.pdf", qr_pdf(PHISH_URL),
                        "application", "pdf")
    else:
        raw = with_inline_image(sender, subject, QUISH_TEXT, qr_png(PHISH_URL))
    v = await verdict(runtime, raw)
    assert {"ATTACH_QR_LINK", "LINK_QR_CODE", "LURE"} <= names(v), form
    qr = next(s for s in v.symbols if s.name == "LINK_QR_CODE")
    assert "mfa-renouvellement.example" in qr.description
    assert v.action is not Action.ACCEPT, (form, v)


async def test_a_brand_asking_to_scan_a_qr_code_to_another_site_is_held(runtime):
    raw = with_file("Microsoft 365 <no-reply@m365-securite.example>",
                    "Action requise : authentification multifacteur", QUISH_TEXT,
                    "MFA.png", qr_png(PHISH_URL), "image", "png")
    v = await verdict(runtime, raw)
    assert {"BRAND_PHISH", "LINK_QR_CODE"} <= names(v)
    assert v.action is Action.QUARANTINE


async def test_a_conference_invitation_with_a_qr_code_to_its_own_site_stays_clean(runtime):
    raw = with_file("Congrès de médecine générale <contact@congres-medecine.example>",
                    "Invitation : journées de formation des 12 et 13 mars",
                    "Bonjour Docteur, vous trouverez ci-joint le programme. Scannez le code "
                    "QR pour vous inscrire en ligne.", "programme.pdf",
                    qr_pdf("https://www.congres-medecine.example/inscription"),
                    "application", "pdf")
    v = await verdict(runtime, raw)
    assert "ATTACH_QR_LINK" in names(v)  # read, and judged: its own site
    assert "LINK_QR_CODE" not in names(v)
    assert v.action is Action.ACCEPT


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header announces width x height pixels, with a tiny compressed body: a
    decompression bomb for a decoder that trusts the header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b""))


def test_images_past_the_size_bound_and_garbage_are_skipped_not_decoded():
    reader = Reader()
    big = Image.new("L", (5000, 5000), 255)
    big.paste(Image.open(io.BytesIO(qr_png(PHISH_URL))).convert("L"), (100, 100))
    buf = io.BytesIO()
    big.save(buf, "PNG")
    assert reader.image("big.png", buf.getvalue()) == []  # 25 Mpx: never decoded...
    assert reader.unread == ["big.png: 5000x5000 pixels"]  # ...and said
    assert reader.image("bomb.png", _png_header_only(100_000, 100_000)) == []
    assert reader.image("junk.png", b"\x89PNG\r\n\x1a\n" + b"\xff" * 500) == []
    # Within the bound, the same QR code is read (4,000 x 4,000: the bound).
    fits = Image.new("L", (4000, 4000), 255)
    fits.paste(Image.open(io.BytesIO(qr_png(PHISH_URL))).convert("L"), (1500, 1500))
    buf = io.BytesIO()
    fits.save(buf, "PNG")
    assert reader.image("fits.png", buf.getvalue()) == [PHISH_URL]


def test_tracking_pixels_do_not_use_up_the_images_read():
    pixel = io.BytesIO()
    Image.new("L", (1, 1), 255).save(pixel, "GIF")
    reader = Reader()
    for i in range(30):
        assert reader.image(f"pixel{i}.gif", pixel.getvalue()) == []
    assert reader.image("code.png", qr_png(PHISH_URL)) == [PHISH_URL]
    assert reader.unread == []


async def test_an_image_too_large_to_read_is_a_sign(runtime):
    canvas = Image.new("L", (4001, 4001), 255)  # just over 16 Mpx
    canvas.paste(Image.open(io.BytesIO(qr_png(PHISH_URL))).convert("L"), (100, 100))
    buf = io.BytesIO()
    canvas.save(buf, "PNG")
    v = await verdict(runtime, with_file("Service <it@support-messagerie.example>", "Code",
                                         QUISH_TEXT, "code.png", buf.getvalue(), "image", "png"))
    assert "ATTACH_IMAGE_UNREAD" in names(v)


async def test_a_bomb_image_in_a_message_is_no_crash(runtime):
    raw = with_file("Expéditeur <a@b.example>", "Photo", "Voici la photo.", "photo.png",
                    _png_header_only(60_000, 60_000), "image", "png")
    v = await verdict(runtime, raw)
    assert "ATTACH_QR_LINK" not in names(v)
    assert not {n for n in names(v) if n.endswith(("_ERROR", "_TIMEOUT"))}


def pdf_with_link(url: str, *, hex_string: bool = False) -> bytes:
    """A one-page PDF whose only content is a link annotation to `url` (written as a hex
    string, which a byte search for "(http" does not see, when asked)."""
    target = b"<" + url.encode().hex().encode() + b">" if hex_string else b"(" + url.encode() + b")"
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Annots [4 0 R] >>",
        b"<< /Type /Annot /Subtype /Link /Rect [100 700 300 720] /A << /S /URI /URI "
        + target + b" >> >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, xref)
    return bytes(out)


async def test_links_in_pdf_and_html_files_are_judged_as_links(runtime):
    raw = with_file("DocuSign <dse@sign-notice.example>", "Document à signer",
                    "Vous avez reçu un document sécurisé à consulter et signer.",
                    "Contrat.pdf", pdf_with_link("https://docs-sign-review.web.app/view"),
                    "application", "pdf")
    v = await verdict(runtime, raw)
    assert {"ATTACH_PDF_LINK", "LINK_FREE_HOSTING", "BRAND_PHISH"} <= names(v)
    assert v.action is Action.QUARANTINE
    raw = with_file("DocuSign <dse@sign-notice.example>", "Document à signer",
                    "Vous avez reçu un document sécurisé à consulter et signer.",
                    "Contrat.pdf", pdf_with_link("https://docs-sign-review.web.app/view",
                                                 hex_string=True), "application", "pdf")
    assert "LINK_FREE_HOSTING" in names(await verdict(runtime, raw))  # read by pypdf

    page = (b"<html><body><p>Votre messagerie est pleine.</p>"
            b"<a href='https://ameli-remboursement.example/connexion'>Se connecter</a>"
            b"</body></html>")
    raw = with_file("Messagerie <notification@mailbox.example>", "Messagerie pleine",
                    "Ouvrez la pièce jointe.", "Connexion.html", page,
                    "application", "octet-stream")
    v = await verdict(runtime, raw)
    assert "LINK_LOOKALIKE" in names(v)  # ameli's look-alike, read in the .html file


async def test_a_suppliers_invoice_pdf_linking_to_its_own_site_stays_clean(runtime):
    raw = with_file("Fournitures Dubois <factures@dubois-medical.example>",
                    "Facture F-2026-1187", "Bonjour, veuillez trouver notre facture.",
                    "F-2026-1187.pdf",
                    pdf_with_link("https://www.dubois-medical.example/compte/factures"),
                    "application", "pdf")
    v = await verdict(runtime, raw)
    assert "ATTACH_PDF_LINK" in names(v)
    assert v.action is Action.ACCEPT
