"""Banners over real MIME shapes: exactly once in each readable part, everything else intact.

The result is checked with CPython's own parser (decoded text, defects), not with ours.
"""

from __future__ import annotations

import email
import email.header
import email.policy
import re
from email.message import EmailMessage, Message
from pathlib import Path

import aiosmtplib
import pytest

from gateway import banner
from gateway.config import DEFAULT_RULES_DIR
from gateway.message import parse_message
from gateway.service import running
from tests.conftest import DOMAIN, make_config
from tests.support.sink import Sink
from tests.test_corpus_mime import edge_case_messages

TPL = banner.load_templates(DEFAULT_RULES_DIR / "banner.toml")
MARK = banner.marker(b"test secret")
WARNING = banner.Warning(style=TPL.suspect, reasons=(
    "Ce message se présente comme venant de l'Assurance Maladie mais n'a pas été envoyé par "
    "ses serveurs.", "La pièce jointe <facture.pdf> est en réalité un programme."))
PDF = b"%PDF-1.7\n" + bytes(range(256)) * 8


def crlf(msg: Message) -> bytes:
    return msg.as_bytes(policy=email.policy.SMTP)


def base(subject: str = "Résultats d'analyse") -> EmailMessage:
    m = EmailMessage()
    m["From"] = "Laboratoire <labo@labo.example>"
    m["To"] = f"docteur@{DOMAIN}"
    m["Subject"] = subject
    return m


def shapes() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    m = base()
    m.set_content("Bonjour,\nvos résultats sont disponibles.\n")
    out["plain-utf8"] = crlf(m)
    m = base("plain")
    m.set_content("Hello\n", charset="us-ascii")
    out["plain-ascii-7bit"] = crlf(m)
    m = base()
    m.set_content("Réponse attendue à l'hôpital\n", charset="iso-8859-1", cte="8bit")
    out["plain-latin1-8bit"] = crlf(m)
    m = base()
    m.set_content("Texte en base64 é\n", cte="base64")
    out["plain-base64"] = crlf(m)
    m = base()
    m.set_content('<html><head><title>t</title></head><BODY bgcolor="#fff"><p>Cliquez '
                  "ici é</p></BODY></html>\n", subtype="html", charset="iso-8859-1",
                  cte="quoted-printable")
    out["html-latin1-qp"] = crlf(m)
    m = base()
    m.set_content("<p>Fragment sans body</p>\n", subtype="html")
    out["html-no-body"] = crlf(m)
    m = base()
    m.set_content("Texte brut\n")
    m.add_alternative("<html><body><p>HTML</p></body></html>\n", subtype="html")
    out["alternative"] = crlf(m)
    m = base()
    m.set_content("Voir pièce jointe\n")
    m.add_alternative("<html><body><p>Voir pièce jointe</p></body></html>\n", subtype="html")
    m.add_attachment(PDF, maintype="application", subtype="pdf", filename="facture.pdf")
    m.add_attachment("note jointe\n", filename="note.txt")
    out["mixed-attachments"] = crlf(m)
    m = base()
    m.set_content("Texte\n")
    m.add_alternative('<html><body><img src="cid:logo"></body></html>\n', subtype="html")
    m.get_payload()[1].add_related(b"\x89PNG\r\n\x1a\n" + bytes(64), maintype="image",
                                   subtype="png", cid="<logo>")
    out["related-inline-image"] = crlf(m)
    inner = base("transféré")
    inner.set_content("Message d'origine\n")
    m = base("Tr: transféré")
    m.set_content("Je vous transfère ce message\n")
    m.add_attachment(inner)
    out["forwarded-rfc822"] = crlf(m)
    return out


def signed_shapes() -> dict[str, bytes]:
    out = {}
    m = base()
    m.set_content("Texte signé\n")
    signed = EmailMessage()
    signed.make_mixed()
    signed.set_type("multipart/signed")
    signed.set_param("protocol", "application/pkcs7-signature")
    for k in ("From", "To", "Subject"):
        signed[k] = m[k]
    signed.attach(EmailMessage())
    signed.get_payload()[0].set_content("Texte signé\n")
    sig = EmailMessage()
    sig.set_content(b"0\x82\x01\x00" + bytes(40), maintype="application",
                    subtype="pkcs7-signature", filename="smime.p7s")
    signed.attach(sig)
    out["smime-signed"] = crlf(signed)
    m = base()
    m.set_content(b"0\x80\x06\x09" + bytes(80), maintype="application", subtype="pkcs7-mime",
                  params={"smime-type": "enveloped-data"}, filename="smime.p7m")
    out["smime-encrypted"] = crlf(m)
    m = base()
    m.set_content("-----BEGIN PGP MESSAGE-----\n\nhQEMA1234\n-----END PGP MESSAGE-----\n")
    out["pgp-inline"] = crlf(m)
    m = base()  # Apicrypt: known by its header fields, its body an opaque text block
    m["X-Apicrypt"] = "2.0"
    m.set_content("aGVsbG8gZG9jdGV1ciBjZWNpIGVzdCBjaGlmZnLDqQ==\nQUJDREVGR0hJSktMTU5PUA==\n")
    out["apicrypt"] = crlf(m)
    return out


def leaves(data: bytes) -> dict[str, Message]:
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    out: dict[str, Message] = {}

    def visit(part: Message, path: str) -> None:
        out[path] = part
        if part.is_multipart():
            for i, sub in enumerate(part.get_payload(), 1):
                visit(sub, f"{path}.{i}")
    visit(msg, "1")
    return out


def defects(data: bytes) -> set[str]:
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    return {type(d).__name__ for p in msg.walk() for d in p.defects}


def text_of(part: Message) -> str:
    raw = part.get_payload(decode=True)
    try:
        return raw.decode(part.get_content_charset() or "us-ascii", "replace")
    except LookupError:  # a charset name no codec has
        return raw.decode("latin-1")


def same_text(a: str, b: str) -> bool:
    """Equal, but for line ends (a bare LF coded =0A in quoted-printable comes back a CRLF)."""
    def norm(t: str) -> str:
        return t.replace("\r\n", "\n").replace("\r", "\n")
    return norm(a) == norm(b)


def without_banner(text: str) -> str:
    html = re.sub(r"(\r?\n)?<table [^>]*data-gateway-banner=.*?</table>(\r?\n)?", "", text,
                  count=1, flags=re.DOTALL)
    if html != text:
        return html
    return re.sub(r"\A[⚠!] .*?\n-{72}\r?\n\r?\n?", "", text, count=1, flags=re.DOTALL)


def rewritable(part) -> bool:
    import codecs
    try:
        codecs.lookup(part.charset or "us-ascii")
    except LookupError:
        return False
    return (part.transfer_encoding or "7bit") in ("7bit", "8bit", "binary", "base64",
                                                  "quoted-printable")


def drop_subject(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in items if k.lower() != "subject"]


def check_banner(data: bytes) -> bytes:
    """Apply the banner and check every property; returns the result."""
    parsed = parse_message(data)
    result = banner.apply(data, parsed, WARNING, TPL, MARK)
    out = result.raw
    # Signed or encrypted: no part changes. Parts we cannot re-encode (unknown charset or
    # transfer encoding) keep their bytes too.
    readable = set() if result.fields else {
        p.path for p in banner.readable_parts(parsed) if rewritable(p)}
    before, after = leaves(data), leaves(out)
    assert before.keys() == after.keys()
    for path, part in after.items():
        if part.is_multipart():
            continue
        if path in readable:
            text = text_of(part)
            if part.get_content_type() == "text/html":
                assert text.count(f'data-gateway-banner="{MARK}"') == 1, path
            else:
                assert text.count(MARK) == 1, path
                assert text.startswith(("⚠ ATTENTION : CE MESSAGE SEMBLE SUSPECT",
                                        "! ATTENTION : CE MESSAGE SEMBLE SUSPECT"))
            assert same_text(without_banner(text), text_of(before[path])), path  # the rest
        else:
            assert part.get_payload() == before[path].get_payload(), path
            assert drop_subject(part.items()) == drop_subject(before[path].items()), path
    assert defects(out) <= defects(data)
    subject = email.message_from_bytes(out, policy=email.policy.default)["Subject"]
    assert str(subject).startswith("[SUSPECT]")
    # Idempotent: a second pass changes nothing.
    again = banner.apply(out, parse_message(out), WARNING, TPL, MARK)
    assert again.raw == out and not again.body_changed
    return out


@pytest.mark.parametrize("name", list(shapes()))
def test_banner_in_each_readable_part_once_and_nothing_else_changes(name: str):
    data = shapes()[name]
    out = check_banner(data)
    assert out != data


def test_charsets_stay_valid():
    out = check_banner(shapes()["plain-ascii-7bit"])
    part = leaves(out)["1"]
    assert part.get_content_charset() == "utf-8"  # us-ascii cannot hold the accents
    assert part["Content-Transfer-Encoding"] == "quoted-printable"
    assert "réf." in text_of(part)
    out = check_banner(shapes()["plain-latin1-8bit"])
    assert "Réponse attendue à l'hôpital" in text_of(leaves(out)["1"])
    out = check_banner(shapes()["html-latin1-qp"])
    part = leaves(out)["1"]
    assert part.get_content_charset() == "iso-8859-1"  # the HTML banner is pure ASCII
    html = text_of(part)
    assert html.index("<BODY bgcolor") < html.index("data-gateway-banner") < html.index("Cliquez")
    assert "&lt;facture.pdf&gt;" in html  # reasons are escaped


@pytest.mark.promise("banner-protected")
@pytest.mark.parametrize("name", list(signed_shapes()))
def test_signed_and_encrypted_mail_keeps_its_body(name: str):
    data = signed_shapes()[name]
    result = banner.apply(data, parse_message(data), WARNING, TPL, MARK)
    assert not result.body_changed
    body = data.split(b"\r\n\r\n", 1)[1]
    assert result.raw.endswith(b"\r\n\r\n" + body)
    assert b"Subject: [SUSPECT] " in result.raw
    [(name_, value)] = result.fields
    assert name_ == "X-Gateway-Warning"
    assert "Assurance Maladie" in str(email.header.make_header(email.header.decode_header(value)))


def test_forged_marker_does_not_keep_our_banner_out():
    m = base()
    m.set_content('<html><body><table data-gateway-banner="000000000000">faux</table>'
                  "</body></html>\n", subtype="html")
    check_banner(crlf(m))


def test_corpus_messages_take_the_banner_without_damage(corpus: Path):
    files = edge_case_messages(corpus)
    files += sorted((corpus / "phishing-pot" / "samples").glob("*.eml"))
    files += sorted((corpus / "spamassassin-ham").glob("*/*.eml"))
    failures = []
    for path in files:
        if path.name == "enclosed-endless.eml":
            continue
        data = path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        try:
            check_banner(data)
        except AssertionError as exc:
            failures.append(f"{path.name}: {exc}")
    assert not failures


async def test_tag_verdict_delivers_banner_and_subject_tag_over_smtp(tmp_path: Path, sink: Sink):
    cfg = make_config(tmp_path, scoring={"tag": 0.2, "quarantine": 50.0, "reject": 60.0},
                      next_hop={"address": sink.address, "starttls": "off"})
    data = shapes()["alternative"]  # no Date, no Message-ID: scored, tagged
    async with running(cfg) as gw:
        _, reply = await aiosmtplib.send(data, sender="labo@labo.example",
                                         recipients=[f"docteur@{DOMAIN}"], hostname="127.0.0.1",
                                         port=gw.port, start_tls=False)
    assert reply.startswith("2.0.0")
    got = await sink.get()
    msg = email.message_from_bytes(got.data, policy=email.policy.default)
    assert msg["X-Gateway-Action"] == "tag"
    assert str(msg["Subject"]) == "[SUSPECT] Résultats d'analyse"
    plain = msg.get_body(("plain",)).get_content()
    html = msg.get_body(("html",)).get_content()
    assert plain.startswith("⚠ ATTENTION") and "n'a pas de date d'envoi" in plain
    assert "data-gateway-banner" in html and "Texte brut" in plain


async def test_colleague_name_from_outside_gets_the_external_mark(tmp_path: Path, sink: Sink):
    cfg = make_config(tmp_path, banner={"external_mark": True},
                      practice={"colleagues": ["Dr Claire Martin"]},
                      next_hop={"address": sink.address, "starttls": "off"})
    m = base("Urgent")
    del m["From"]
    m["From"] = "Dr Claire MARTÍN <claire.martin@gmail.example>"
    m["Date"] = "Sat, 28 Nov 2026 10:00:00 +0100"
    m["Message-ID"] = "<x1@gmail.example>"
    m.set_content("Peux-tu m'envoyer le dossier du patient ?\n")
    async with running(cfg) as gw:
        await aiosmtplib.send(crlf(m), sender="claire.martin@gmail.example",
                              recipients=[f"docteur@{DOMAIN}"], hostname="127.0.0.1",
                              port=gw.port, start_tls=False)
    got = await sink.get()
    msg = email.message_from_bytes(got.data, policy=email.policy.default)
    assert msg["X-Gateway-Action"] == "accept"
    assert str(msg["Subject"]) == "[EXTERNE] Urgent"
    assert "extérieur du cabinet".upper() in msg.get_content()
