"""Outbound guard: health data detection and the clear-text policy, through the pipeline and
`gateway scan --direction outbound` (the submission port end to end: tests/test_submission.py)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from email.message import EmailMessage
from pathlib import Path

import pytest

from gateway.cli import to_crlf
from gateway.health_data import find_nirs, mask, valid_nir
from gateway.message import Direction, Inbound
from gateway.runtime import Runtime
from gateway.symbols import Action
from tests.conftest import DNS, DOMAIN


def with_key(first13: str) -> str:
    number = int(first13.replace("2A", "19").replace("2B", "18"))
    return f"{first13}{97 - number % 97:02d}"


NIR = with_key("2951099126111")  # woman, born October 1995


@pytest.mark.parametrize(("text", "valid"), [
    (NIR, True),
    (NIR[:-2] + f"{(int(NIR[-2:]) + 1) % 100:02d}", False),  # wrong key
    (with_key("18412" + "2A" + "451089"), True),  # Corsica 2A counts as 19
    (with_key("18412" + "2B" + "451089"), True),  # 2B counts as 18
    (with_key("5841299451089"), False),  # sex digit 5 does not exist
    (with_key("1841399451089"), False),  # month 13
])
def test_nir_validation(text: str, valid: bool):
    assert valid_nir(text) is valid


@pytest.mark.parametrize("spelling", ["{0}", "{1} {2} {3} {4} {5} {6} {7}",
                                      "{1}.{2}.{3}.{4}.{5}.{6}.{7}", "{1}{2}{3} {4}{5}{6} {7}"])
def test_nir_spacing_variants_are_found(spelling: str):
    n = NIR
    parts = (n[0], n[1:3], n[3:5], n[5:7], n[7:10], n[10:13], n[13:15])
    text = "Patient : " + spelling.format(n, *parts) + " (assuré)"
    assert find_nirs(text), text
    assert mask(find_nirs(text)[0]) == "2 95 10 ** *** *** **"


def test_random_15_digit_numbers_rarely_pass():
    rng = random.Random(20261128)
    n = 50_000
    hits = sum(valid_nir("".join(rng.choice("0123456789") for _ in range(15))) for _ in range(n))
    assert 0.002 < hits / n < 0.02  # about the key's 1 %, less the sex and month rules


def mail(to: str, body: str, *, subject: str = "Résultats", attachment: tuple[str, bytes] | None
         = None, ctype: str | None = None, smime_type: str = "enveloped-data") -> bytes:
    m = EmailMessage()
    m["From"] = f"secretariat@{DOMAIN}"
    m["To"] = to
    m["Subject"] = subject
    m["Date"] = "Sat, 28 Nov 2026 10:00:00 +0100"
    m["Message-ID"] = f"<out-{abs(hash((to, body)))}@{DOMAIN}>"
    if ctype:
        maintype, subtype = ctype.split("/")
        m.set_content(body.encode(), maintype=maintype, subtype=subtype,
                      params={"smime-type": smime_type}, filename="smime.p7m")
    else:
        m.set_content(body)
    if attachment:
        m.add_attachment(attachment[1], maintype="application", subtype="octet-stream",
                         filename=attachment[0])
    return to_crlf(bytes(m))


LAB = (f"Bonjour,\nVoici le compte rendu de biologie de Mme Martin, née le 12/03/1980, "
       f"NIR {NIR[0]} {NIR[1:3]} {NIR[3:5]} {NIR[5:7]} {NIR[7:10]} {NIR[10:13]} {NIR[13:]}.\n"
       "Glycémie à jeun 1,32 g/l.\n")


async def outbound(rt: Runtime, raw: bytes, to: str, *, tls: bool = True,
                   peer: str = "192.0.2.20"):
    return (await rt.pipeline.analyse(Inbound(
        queue_id="o", peer_ip=peer, helo="poste.cabinet", mail_from=f"s@{DOMAIN}",
        rcpts=(to,), raw=raw, tls=tls, direction=Direction.OUTBOUND))).verdict


@pytest.mark.promise("outbound-health-held")
async def test_lab_result_to_gmail_is_held(runtime):
    v = await outbound(runtime, mail("patient@gmail.com", LAB), "patient@gmail.com")
    names = {s.name for s in v.symbols}
    assert {"OUTBOUND_NIR", "OUTBOUND_HEALTH_CONTEXT", "OUTBOUND_HEALTH_CLEARTEXT_HOLD"} <= names
    assert v.action is Action.QUARANTINE
    reason = next(s.description for s in v.symbols if s.name == "OUTBOUND_NIR")
    assert NIR[5:] not in reason.replace(" ", "") and "2 95 10 **" in reason


@pytest.mark.promise("outbound-health-held")
async def test_same_result_to_mssante_is_delivered(runtime):
    to = "dr.x@medecin.mssante.fr"
    v = await outbound(runtime, mail(to, LAB), to)
    assert "OUTBOUND_NIR" in {s.name for s in v.symbols}
    assert not any(s.name.startswith("OUTBOUND_HEALTH_CLEARTEXT") for s in v.symbols)
    assert v.action is Action.ACCEPT


RESULTS_WITHOUT_NIR = ("Bonjour,\nRésultats de Mme Dupont Marie, née le 12/03/1965 :\n"
                       "Hémoglobine 12,1 g/dL\nLeucocytes 6,2 G/L\nTSH 2,15 mUI/L\n"
                       "Ferritine 45 ng/mL\nBien cordialement.")


@pytest.mark.promise("outbound-health-held")
async def test_clinical_results_without_a_nir_to_gmail_are_held(runtime):
    """Lab values with their units beside a patient's birth date are health data, even with
    no social security number (found by issue 16's calibration)."""
    v = await outbound(runtime, mail("marie.dupont@gmail.com", RESULTS_WITHOUT_NIR),
                       "marie.dupont@gmail.com")
    names = {s.name for s in v.symbols}
    assert "OUTBOUND_NIR" not in names
    assert {"OUTBOUND_HEALTH_CONTEXT", "OUTBOUND_HEALTH_CLEARTEXT_HOLD"} <= names
    assert v.action is Action.QUARANTINE
    to = "marie.dupont@patient.mssante.fr"
    v = await outbound(runtime, mail(to, RESULTS_WITHOUT_NIR), to)
    assert v.action is Action.ACCEPT


async def test_values_with_units_and_no_patient_are_no_health_data(runtime):
    body = ("Lettre du cabinet : un taux de glycémie à jeun au-dessus de 1,26 g/L et une "
            "HbA1c au-dessus de 6,5 % font le diagnostic. Le cabinet sera fermé le 24/12/2026.")
    v = await outbound(runtime, mail("patients@liste.example", body), "patients@liste.example")
    assert v.action is Action.ACCEPT


async def test_newsletter_mentioning_ordonnance_is_delivered(runtime):
    body = ("Lettre du cabinet : pensez à renouveler votre ordonnance avant les vacances. "
            "Le cabinet sera fermé du 1er au 15 août.")
    v = await outbound(runtime, mail("patients@liste.example", body), "patients@liste.example")
    assert not any(s.name.startswith("OUTBOUND_") for s in v.symbols)
    assert v.action is Action.ACCEPT


async def test_encrypted_smime_message_is_delivered(runtime):
    raw = mail("labo@labo.example", "MIAGCSqGSIb3DQEHA6CAMIACAQAx" + NIR,
               ctype="application/pkcs7-mime")
    v = await outbound(runtime, raw, "labo@labo.example")
    assert v.action is Action.ACCEPT


async def test_health_document_attachment_to_ordinary_address_is_held(runtime):
    hprim = b"H|\\^&|||CABINET|||||||P|H2.1\r\nP|1|||MARTIN^ANNE\r\nOBX|1|NM|GLU||1.32\r\nL|1\r\n"
    v = await outbound(runtime, mail("x@orange.fr", "Ci-joint.", attachment=("res.hpr", hprim)),
                       "x@orange.fr")
    assert "OUTBOUND_HEALTH_DOCUMENT" in {s.name for s in v.symbols}
    assert v.action is Action.QUARANTINE


def test_gateway_scan_outbound_shows_the_symbols(tmp_path: Path):
    path = tmp_path / "lab.eml"
    path.write_bytes(mail("patient@gmail.com", LAB))
    res = subprocess.run([sys.executable, "-m", "gateway", "scan", "--json", "--domain", DOMAIN,
                          "--dns", DNS.address, "--direction", "outbound", "--tls", "no",
                          "--client-ip", "192.0.2.20", "--mail-from", f"s@{DOMAIN}",
                          "--rcpt", "patient@gmail.com", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    names = {s["name"] for s in out["symbols"]}
    assert {"OUTBOUND_NIR", "OUTBOUND_CLEARTEXT_SESSION", "OUTBOUND_HEALTH_CLEARTEXT_HOLD"} <= names
    assert out["action"] == "quarantine"


def text_pdf(text: str) -> bytes:
    """A one-page PDF showing `text` in Helvetica, with a correct cross-reference table."""
    stream = f"BT /F1 11 Tf 50 750 Td ({text}) Tj ET".encode("latin-1")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def docx_with(text: str) -> bytes:
    import io
    import zipfile
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("[Content_Types].xml", "<Types/>")
        z.writestr("word/document.xml", "<w:document><w:body><w:p><w:r><w:t>" + text
                   + "</w:t></w:r></w:p></w:body></w:document>")
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["pdf", "docx"])
async def test_nir_inside_a_document_attachment_is_found(runtime, kind: str):
    line = f"Compte rendu operatoire - patiente nee le 12/03/1980 - NIR {NIR}"
    attachment = ("cr.pdf", text_pdf(line)) if kind == "pdf" else ("cr.docx", docx_with(line))
    v = await outbound(runtime, mail("x@orange.fr", "Ci-joint.", attachment=attachment),
                       "x@orange.fr")
    names = {s.name for s in v.symbols}
    assert {"OUTBOUND_NIR", "OUTBOUND_HEALTH_CONTEXT"} <= names, names
    assert v.action is Action.QUARANTINE


async def test_ins_matricule_of_a_nia_in_a_cda_is_found(runtime):
    # The INS matricule is the NIR or, while it is pending, the NIA (first digit 7 or 8),
    # with the same key; CDA documents carry it under the INS OIDs.
    nia = with_key("7951099126111")
    cda = (f'<ClinicalDocument xmlns="urn:hl7-org:v3"><recordTarget><patientRole>'
           f'<id extension="{nia}" root="1.2.250.1.213.1.4.9"/></patientRole></recordTarget>'
           f'</ClinicalDocument>').encode()
    v = await outbound(runtime, mail("x@orange.fr", "Ci-joint.", attachment=("cr.xml", cda)),
                       "x@orange.fr")
    names = {s.name for s in v.symbols}
    assert {"OUTBOUND_HEALTH_DOCUMENT", "OUTBOUND_HEALTH_CLEARTEXT_HOLD"} <= names
    assert find_nirs(f"INS {nia}") == [nia]


@pytest.mark.parametrize(("peer", "flagged"), [
    ("192.0.2.20", True), ("127.0.0.1", False), ("::1", False), ("inconnu", True)])
async def test_a_submission_in_clear_is_flagged_unless_it_never_left_the_machine(
        runtime, peer: str, flagged: bool):
    """A mail client on the network that submits without TLS exposed the message on the
    way; one on the gateway's own machine (loopback) did not. An address that cannot be
    read counts as the network (found by mutation testing)."""
    v = await outbound(runtime, mail("x@orange.fr", "Bonjour."), "x@orange.fr", tls=False,
                       peer=peer)
    assert ("OUTBOUND_CLEARTEXT_SESSION" in {s.name for s in v.symbols}) is flagged


@pytest.mark.promise("mssante-boundary")
@pytest.mark.parametrize(("address", "secure"), [
    ("dr.x@medecin.mssante.fr", True), ("x@mssante.fr", True), ("x@MSSANTE.FR.", True),
    ("x@evilmssante.fr", False), ("x@mssante.fr.example", False), ("x@mssante-fr.example", False),
    ("x@medecin.mssante.fr.evil.example", False)])
async def test_only_addresses_under_mssante_fr_are_the_secure_channel(runtime, address: str,
                                                                      secure: bool):
    """A domain ending in the letters "mssante.fr" is not under mssante.fr."""
    v = await outbound(runtime, mail(address, LAB), address)
    assert (v.action is Action.ACCEPT) is secure, v.symbols


@pytest.mark.promise("outbound-health-held")
async def test_an_smime_encrypted_message_to_a_patient_is_not_held(runtime):
    """What S/MIME encrypts is protected: the patient's MSSanté address in To, which alone
    holds a clear message to an ordinary mailbox, does not hold the encrypted one."""
    to = f"{NIR}@patient.mssante.fr, patient.martin@gmail.com"
    v = await outbound(runtime, mail(to, "MIAGCSqGSIb3DQEHA6CAMIACAQAx",
                                     ctype="application/pkcs7-mime"), "patient.martin@gmail.com")
    assert v.action is Action.ACCEPT, v.symbols
    v = await outbound(runtime, mail(to, "Bonjour, voici vos résultats."),
                       "patient.martin@gmail.com")
    assert v.action is Action.QUARANTINE


@pytest.mark.promise("outbound-health-held")
async def test_patient_mssante_address_copied_to_an_ordinary_mailbox_is_held(runtime):
    patient = f"{NIR}@patient.mssante.fr"
    raw = mail("famille@gmail.com", "Bonjour, voici l'adresse de votre mère : " + patient)
    v = await outbound(runtime, raw, "famille@gmail.com")
    hit = next(s for s in v.symbols if s.name == "OUTBOUND_PATIENT_ADDRESS")
    assert "295***@patient.mssante.fr" in hit.description and NIR not in hit.description
    assert v.action is Action.QUARANTINE
    # Mail to the patient's own MSSanté address is the secure channel.
    v = await outbound(runtime, mail(patient, LAB), patient)
    assert v.action is Action.ACCEPT


def encrypted_zip(name: str, content: bytes) -> bytes:
    """A zip whose one member carries the 'encrypted' flag (as ZipCrypto archives do); the
    zipfile module writes no encrypted archive, so the flag is set in both headers after."""
    import io
    import zipfile
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(name, content)
    data = bytearray(buf.getvalue())
    central = data.index(b"PK\x01\x02")
    data[6] |= 0x1  # local file header: general purpose flags
    data[central + 8] |= 0x1  # central directory entry: the same flags
    return bytes(data)


async def test_encrypted_archive_protects_only_its_content(runtime):
    archive = ("cr.zip", encrypted_zip("cr.pdf", b"\x00" * 64))
    v = await outbound(runtime, mail("x@orange.fr", "Ci-joint le compte rendu, mot de passe "
                                     "par téléphone.", attachment=archive), "x@orange.fr")
    names = {s.name for s in v.symbols}
    assert "OUTBOUND_ENCRYPTED_ARCHIVE" in names and v.action is Action.ACCEPT
    # The text around the archive is still clear: a NIR there is held.
    v = await outbound(runtime, mail("x@orange.fr", LAB, attachment=archive), "x@orange.fr")
    assert {"OUTBOUND_ENCRYPTED_ARCHIVE", "OUTBOUND_HEALTH_CLEARTEXT_HOLD"} <= {
        s.name for s in v.symbols}
    assert v.action is Action.QUARANTINE


async def test_encrypted_body_does_not_cover_the_subject(runtime):
    # S/MIME encrypts the body only: a NIR in the subject still leaves in clear.
    raw = mail("labo@labo.example", "MIAGCSqGSIb3DQEHA6CAMIACAQAx", subject=f"Résultats {NIR}",
               ctype="application/pkcs7-mime")
    v = await outbound(runtime, raw, "labo@labo.example")
    assert "OUTBOUND_HEALTH_CLEARTEXT_HOLD" in {s.name for s in v.symbols}


async def test_opaque_signed_smime_is_not_protection(runtime):
    raw = mail("labo@labo.example", "MIAGCSqGSIb3DQEHAqCAMIACAQEx", subject=f"Résultats {NIR}",
               ctype="application/pkcs7-mime", smime_type="signed-data")
    v = await outbound(runtime, raw, "labo@labo.example")
    assert v.action is Action.QUARANTINE
